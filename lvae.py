"""The Ladder VAE (Sønderby et al., 2016) and the bottom-up hierarchical VAE it improves on.

Generative model (shared by both), with L stochastic layers z_1 (bottom) .. z_L (top):

    p(z_L) = N(0, I)
    p(z_i | z_i+1) = N(mu_p,i, var_p,i)     (mu_p,i, var_p,i) = GaussianLayer(MLP(z_i+1))
    p(x | z_1) = Bernoulli(sigmoid(logits)),  logits = Dense(MLP(z_1))

Hierarchical VAE inference, purely bottom-up:  q(z_1|x) q(z_2|z_1) ... q(z_L|z_L-1).

LVAE inference: a deterministic bottom-up pass d_i = MLP(d_i-1) (d_0 = x) gives a
Gaussian "likelihood term" (mu_hat_i, var_hat_i) per layer; then a stochastic top-down
pass through the *generative* model corrects it with the prior:

    q(z_L | x) = N(mu_hat_L, var_hat_L)
    q(z_i | .) = N(mu_q,i, var_q,i) = merge( (mu_hat_i, var_hat_i), p(z_i | z_i+1) )

where ``merge`` is the precision-weighted product of the two Gaussians (gaussian.py),
and "." stands for what q conditions z_i on: x and the sample of z_i+1 here, z_i-1 in
the bottom-up VAE.

Objective (both models): the evidence lower bound

    ELBO = E_q[ log p(x|z_1) ] - sum_i KL_i,    KL_i = E_q[ log q(z_i|.) - log p(z_i|z_i+1) ]

During warm-up, training maximises E_q[ log p(x|z_1) ] - beta * sum_i KL_i instead, with
beta rising from 0 to 1; that is a lower bound on log p(x) only once beta = 1.

In the LVAE each KL_i is analytic given the sample of z_i+1, because z_i+1 is drawn
before z_i. In the VAE, z_i+1 is drawn *after* z_i (from q(z_i+1|z_i)), so for i < L
only the one-sample estimate log q(z_i|z_i-1) - log p(z_i|z_i+1) is available.

The importance-weighted bound (Burda et al., 2016) with K samples z^k ~ q(z|x):

    L_K = log (1/K) sum_k exp( log p(x, z^k) - log q(z^k|x) )

    ELBO = E[L_1] <= E[L_K] <= E[L_K+1] <= log p(x)

The expectations are over the draws: one computed L_K is a random estimate of E[L_K]
(with K = 5000 its spread is small next to the differences between models).
"""
import contextlib
import math

import numpy as np

from autograd import (Tensor, bernoulli_log_prob, get_array_module, logsumexp, no_grad,
                      sigmoid_array, to_numpy)
from gaussian import gaussian_kl, log_normal, merge, reparameterize
from layers import MLP, Dense, GaussianLayer, Module, fold_batch_norm

PAPER_Z_DIMS = (64, 32, 16, 8, 4)          # stochastic layers, bottom to top
PAPER_HIDDEN = (512, 256, 128, 64, 32)     # width of the deterministic block of each layer


# ----------------------------------------------------------------------------------
# Argument checks: a clear error at the entry point, not a traceback from deep inside
# ----------------------------------------------------------------------------------
def _check_int(name, value, minimum=1):
    """``value`` as a Python int, or a TypeError (not an int: bools and floats too, since
    int(2.7) would silently be 2) or a ValueError (below ``minimum``) that names it."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_sizes(name, values, example):
    """A tuple of ints >= 1 from a list or tuple of layer sizes (one per stochastic layer)."""
    if not isinstance(values, (tuple, list, np.ndarray)):
        raise TypeError(f"{name} must be a tuple of ints, one per stochastic layer (e.g. "
                        f"{example}), got {values!r} ({type(values).__name__})")
    return tuple(_check_int(f"{name}[{i}]", v) for i, v in enumerate(values))


def _check_noise(who, noise):
    """Any object with Noise's methods will do (tests and bench/ bring their own); None or
    a seed would fail later as "'NoneType' object has no attribute 'normal'". Both methods
    are asked for: a NumPy Generator has a normal() too, and failed as "normal() got an
    unexpected keyword argument 'like'"."""
    if not (callable(getattr(noise, "normal", None))
            and callable(getattr(noise, "new_step", None))):
        raise TypeError(f"{who}: noise must be an lvae.Noise (the random stream of the "
                        f"samples, e.g. lvae.Noise(0)), got {type(noise).__name__}")


def _is_array(x):
    """True for a NumPy or a CuPy array."""
    return isinstance(x, get_array_module(x).ndarray)


def gpu_generator():
    """CuPy's generator with cuRAND's Philox: a counter-based generator, cheap to reseed at
    every step, where cuRAND's default (XORWOW) sets up a state per GPU thread at each
    reseed (bench.py B2 times both). Needs CuPy."""
    from cupy.cuda import curand
    import cupy
    return cupy.random.RandomState(method=curand.CURAND_RNG_PSEUDO_PHILOX4_32_10)


_NOISE_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


class Noise:
    """Standard-normal draws for the reparameterisation trick: reproducible and resumable.

    On the CPU they come from a NumPy Generator. On the GPU they come from CuPy's
    generator (cuRAND's Philox), reseeded from the NumPy one at every ``new_step()``: the
    host generator's state alone determines every draw, and that is what checkpoints store.
    """

    def __init__(self, seed=0):
        self.rng = np.random.default_rng(_check_int("Noise: seed", seed, minimum=0))
        self._gpu_rng = None
        self._reseed = True

    def new_step(self):
        self._reseed = True

    def normal(self, shape, like):
        """eps ~ N(0, I) of ``shape``, on the device and in the dtype of the array ``like``."""
        # e.g. a model.astype(np.float16): NumPy's and CuPy's standard_normal draw only these
        # two, and refuse float16 from deep inside (NumPy: "Unsupported dtype"; 32 ns per draw)
        if like.dtype not in _NOISE_DTYPES:
            raise TypeError(f"Noise: samples are drawn in float32 or float64, not {like.dtype} "
                            f"(the model's dtype? use model.astype(np.float32))")
        xp = get_array_module(like)
        if xp is np:
            return self.rng.standard_normal(shape, dtype=like.dtype)
        if self._gpu_rng is None:
            self._gpu_rng = gpu_generator()
        if self._reseed:
            self._gpu_rng.seed(int(self.rng.integers(2 ** 62)))
            self._reseed = False
        return self._gpu_rng.standard_normal(shape, dtype=like.dtype)

    def get_state(self):
        return self.rng.bit_generator.state

    def set_state(self, state):
        self.rng.bit_generator.state = state
        self._reseed = True


class LayerResults:
    """What inference produced for each stochastic layer, index 0 = z_1 (bottom).

    z, mu_q, var_q, mu_p, var_p: Tensors of shape (K, B, units) (or (B, units));
    kl_units: the KL estimate per unit; kl: its sum over units, shape (K, B) or (B,).
    logits: the Bernoulli logits of p(x | z_1), set by the model's forward pass.
    For the top layer mu_p and var_p stay None: its prior is N(0, I), which the KL term
    uses directly (``_kl_term``'s defaults) without building arrays of zeros and ones.
    """

    def __init__(self, n):
        for name in ("z", "mu_q", "var_q", "mu_p", "var_p", "kl_units", "kl"):
            setattr(self, name, [None] * n)
        self.logits = None


def _kl_term(kind, z, mu_q, var_q, mu_p=0.0, var_p=1.0):
    """KL(q || p) per unit: analytic, or the one-sample estimate log q(z) - log p(z)."""
    if kind == "analytic":
        return gaussian_kl(mu_q, var_q, mu_p, var_p)
    return log_normal(z, mu_q, var_q) - log_normal(z, mu_p, var_p)


def _sample(mu, var, noise, samples):
    """z = mu + sqrt(var) eps with eps of shape (samples, B, units) (broadcast over mu)."""
    # mu of shape (B, units) depends on x alone: eps adds the sample axis. mu of shape
    # (samples, B, units) was computed from a sample above and has it already.
    eps_shape = mu.shape if mu.ndim == 3 else (samples,) + mu.shape
    return reparameterize(mu, var, noise.normal(eps_shape, like=mu.data))


class HierarchicalModel(Module):
    """The generative model p(x|z_1) p(z_1|z_2) ... p(z_L) that both inference models share:
    the base class of LadderVAE and of HierarchicalVAE (the bottom-up baseline).

    x_dim: size of x; z_dims: units per stochastic layer (bottom to top); hidden: width of
    each layer's deterministic block; n_dense: dense layers per block; batch_norm: on every
    dense layer but the output; seed: for the initial weights.
    """
    kind = None

    def __init__(self, x_dim=784, z_dims=PAPER_Z_DIMS, hidden=PAPER_HIDDEN, n_dense=2,
                 batch_norm=True, seed=0):
        x_dim, n_dense = _check_int("x_dim", x_dim), _check_int("n_dense", n_dense)
        z_dims = _check_sizes("z_dims", z_dims, PAPER_Z_DIMS)
        hidden = _check_sizes("hidden", hidden, PAPER_HIDDEN)
        if len(z_dims) < 1 or len(z_dims) != len(hidden):
            raise ValueError(f"z_dims {z_dims} and hidden {hidden} must be non-empty and of "
                             f"the same length (one deterministic block per stochastic layer)")
        if not isinstance(batch_norm, (bool, np.bool_)):  # "no" or 0 would pass for a flag
            raise TypeError(f"batch_norm must be True or False, got {batch_norm!r}")
        batch_norm, seed = bool(batch_norm), _check_int("seed", seed, minimum=0)
        self.config = dict(model=self.kind, x_dim=x_dim, z_dims=z_dims, hidden=hidden,
                           n_dense=n_dense, batch_norm=batch_norm, seed=seed)
        self.x_dim, self.z_dims, self.n_layers = x_dim, z_dims, len(z_dims)
        self.rng = np.random.default_rng(seed)
        blocks = lambda n_in, width: MLP(n_in, [width] * n_dense, batch_norm, rng=self.rng)
        # p(z_i | z_i+1): an MLP of z_i+1 as wide as the block of layer i+1, then a Gaussian head
        self.prior_blocks = [blocks(z_dims[i + 1], hidden[i + 1]) for i in range(self.n_layers - 1)]
        self.prior_heads = [GaussianLayer(hidden[i + 1], z_dims[i], batch_norm, rng=self.rng)
                            for i in range(self.n_layers - 1)]
        # p(x | z_1): an MLP of z_1, then a dense layer to the Bernoulli logits (no batch norm)
        self.decoder = blocks(z_dims[0], hidden[0])
        self.output = Dense(hidden[0], x_dim, bias=True, rng=self.rng)

    def prior(self, i, z_above):
        """(mu_p, var_p) of the prior of layer index i given the sample of layer i+1 above
        (0-based: prior(0, z_2) is p(z_1 | z_2)); i runs from 0 to L-2."""
        return self.prior_heads[i](self.prior_blocks[i](z_above))

    def decode(self, z1):
        """Bernoulli logits of p(x | z_1)."""
        return self.output(self.decoder(z1))

    def _check_batch(self, x, on_host=False):
        """x as a Tensor, once it is known to be a batch of images the model can score:
        a float array (or Tensor) of shape (B, x_dim), B >= 1, with values in [0, 1]
        (the means of a Bernoulli likelihood), of the model's dtype and on its device
        (``on_host``: a NumPy array that the caller moves to the device itself).
        Unchecked, other input fails deep inside NumPy or CuPy, or silently gives a wrong
        ELBO (or a float64 one from a float32 model), or a NaN that training-mode batch
        norm writes into its running averages for good."""
        name = type(self).__name__
        data = x.data if isinstance(x, Tensor) else x
        if not _is_array(data):
            raise TypeError(f"{name}: x must be a NumPy or CuPy array (or a Tensor), not "
                            f"{type(data).__name__}")
        weight = self.output.weight.data  # says where the model is and its dtype
        x_device = "cpu" if get_array_module(data) is np else "cuda"
        model_device = "cpu" if get_array_module(weight) is np else "cuda"
        if on_host and x_device != "cpu":
            raise TypeError(f"{name}: x must be a NumPy array here (it is moved to the "
                            f"model's device a batch at a time), got a CuPy array")
        if not on_host and x_device != model_device:
            raise TypeError(f"{name}: x is on {x_device} but the model is on "
                            f"{model_device}: move x with to_device(x, '{model_device}')")
        if data.ndim != 2 or data.shape[1] != self.x_dim:
            raise ValueError(f"{name}: expected a batch of shape (B, {self.x_dim}), got "
                             f"{data.shape}")
        if data.shape[0] == 0:
            raise ValueError(f"{name}: the batch is empty (shape {data.shape}); pass at "
                             f"least one image")
        if data.dtype.kind != "f":
            raise TypeError(f"{name}: x has dtype {data.dtype}, expected floating-point "
                            f"pixels in [0, 1] (for 0..255 grey levels use "
                            f"x.astype(np.float32) / 255)")
        if data.dtype != weight.dtype:  # float64 pixels would make every result float64
            raise TypeError(f"{name}: x has dtype {data.dtype} but the model's parameters "
                            f"are {weight.dtype}: pass x.astype(np.{weight.dtype})")
        # The value check reads every pixel: cheap on the CPU (~0.1 ms of a ~30 ms step),
        # but on a GPU bringing the answer back to the host would make the CPU wait for
        # the GPU at every step, so CuPy batches are not checked.
        if get_array_module(data) is np:
            low, high = data.min(), data.max()  # NaN propagates to both
            if not (np.isfinite(low) and np.isfinite(high)):
                raise ValueError(f"{name}: x contains NaN or infinite values")
            if low < 0 or high > 1:
                raise ValueError(f"{name}: x must have values in [0, 1] (the means of a "
                                 f"Bernoulli likelihood), got values from {low} to {high}")
        return x if isinstance(x, Tensor) else Tensor(x)

    def forward(self, x, noise, samples=1, kl="analytic"):
        """Run inference and the generative model on a batch x of shape (B, x_dim).

        samples: K posterior samples per image. z and everything computed from a sample
        have a leading axis of size K; what depends on x alone (the bottom-up Gaussians,
        the LVAE's top-layer q and its analytic KL, the VAE's q(z_1|x)) keeps shape
        (B, ...) and broadcasts against it;
        kl: 'analytic' (where possible) or 'sample' (log q - log p at the sample, needed
        for log-weights). Returns (log_px of shape (K, B), LayerResults).
        """
        x = self._check_batch(x)
        if kl not in ("analytic", "sample"):
            raise ValueError(f"kl must be 'analytic' or 'sample', not {kl!r}")
        samples = _check_int("samples", samples)
        _check_noise(type(self).__name__, noise)
        layers = self.infer(x, noise, samples, kl)
        logits = self.decode(layers.z[0])
        xp = get_array_module(x.data)
        # logits are (K, B, x_dim) and x is (B, x_dim): x repeated for each sample (a view)
        targets = Tensor(xp.broadcast_to(x.data, logits.shape))
        log_px = bernoulli_log_prob(logits, targets).sum(axis=-1)
        layers.logits = logits
        return log_px, layers


class LadderVAE(HierarchicalModel):
    """The LVAE: deterministic bottom-up pass, then a top-down pass that merges each
    bottom-up Gaussian with the generative model's prior (module docstring)."""
    kind = "lvae"

    def __init__(self, x_dim=784, z_dims=PAPER_Z_DIMS, hidden=PAPER_HIDDEN, n_dense=2,
                 batch_norm=True, seed=0):
        super().__init__(x_dim, z_dims, hidden, n_dense, batch_norm, seed)
        n_in = (x_dim,) + tuple(hidden[:-1])  # d_i = MLP(d_i-1), d_0 = x
        self.up_blocks = [MLP(n_in[i], [hidden[i]] * n_dense, batch_norm, rng=self.rng)
                          for i in range(self.n_layers)]
        self.up_heads = [GaussianLayer(hidden[i], z_dims[i], batch_norm, rng=self.rng)
                         for i in range(self.n_layers)]

    def infer(self, x, noise, samples, kl):
        """The module docstring's LVAE inference: a LayerResults with z, q, p and the KL
        of every layer (forward's arguments; forward then decodes z_1)."""
        # bottom-up: up[i] = (mu_hat_i, var_hat_i) for every layer, computed once per image
        h, up = x, []
        for block, head in zip(self.up_blocks, self.up_heads):
            h = block(h)
            up.append(head(h))
        # top-down: the top layer's posterior is the bottom-up Gaussian itself
        top, out = self.n_layers - 1, LayerResults(self.n_layers)
        mu_q, var_q = up[top]
        z = _sample(mu_q, var_q, noise, samples)
        out.z[top], out.mu_q[top], out.var_q[top] = z, mu_q, var_q
        out.kl_units[top] = _kl_term(kl, z, mu_q, var_q)
        for i in range(top - 1, -1, -1):
            mu_p, var_p = self.prior(i, z)  # p(z_i | z_i+1) at the sample z just drawn
            mu_hat, var_hat = up[i]
            mu_q, var_q = merge(mu_hat, var_hat, mu_p, var_p)
            z = _sample(mu_q, var_q, noise, samples)
            out.z[i], out.mu_q[i], out.var_q[i], out.mu_p[i], out.var_p[i] = z, mu_q, var_q, mu_p, var_p
            out.kl_units[i] = _kl_term(kl, z, mu_q, var_q, mu_p, var_p)
        out.kl = [k.sum(axis=-1) for k in out.kl_units]
        return out


class HierarchicalVAE(HierarchicalModel):
    """The bottom-up hierarchical VAE: q(z_1|x) q(z_2|z_1) ... q(z_L|z_L-1)."""
    kind = "vae"

    def __init__(self, x_dim=784, z_dims=PAPER_Z_DIMS, hidden=PAPER_HIDDEN, n_dense=2,
                 batch_norm=True, seed=0):
        super().__init__(x_dim, z_dims, hidden, n_dense, batch_norm, seed)
        n_in = (x_dim,) + tuple(z_dims[:-1])  # q(z_i | z_i-1), z_0 = x
        self.up_blocks = [MLP(n_in[i], [hidden[i]] * n_dense, batch_norm, rng=self.rng)
                          for i in range(self.n_layers)]
        self.up_heads = [GaussianLayer(hidden[i], z_dims[i], batch_norm, rng=self.rng)
                         for i in range(self.n_layers)]

    def infer(self, x, noise, samples, kl):
        out, below = LayerResults(self.n_layers), x
        for i, (block, head) in enumerate(zip(self.up_blocks, self.up_heads)):
            mu_q, var_q = head(block(below))
            below = _sample(mu_q, var_q, noise, samples)
            out.z[i], out.mu_q[i], out.var_q[i] = below, mu_q, var_q
        top = self.n_layers - 1
        out.kl_units[top] = _kl_term(kl, out.z[top], out.mu_q[top], out.var_q[top])
        for i in range(top):  # p(z_i | z_i+1) needs z_i+1, drawn after z_i: no analytic KL
            out.mu_p[i], out.var_p[i] = self.prior(i, out.z[i + 1])
            out.kl_units[i] = _kl_term("sample", out.z[i], out.mu_q[i], out.var_q[i],
                                       out.mu_p[i], out.var_p[i])
        out.kl = [k.sum(axis=-1) for k in out.kl_units]
        return out


MODELS = {"lvae": LadderVAE, "vae": HierarchicalVAE}


def build_model(model="lvae", **config):
    """LadderVAE ('lvae') or HierarchicalVAE ('vae') with the given sizes (the sizes and
    the seed are checked by ``HierarchicalModel``)."""
    if not isinstance(model, str) or model not in MODELS:
        raise ValueError(f"unknown model {model!r}: choose one of {sorted(MODELS)}")
    return MODELS[model](**config)


# ----------------------------------------------------------------------------------
# Objectives
# ----------------------------------------------------------------------------------
def elbo(model, x, noise, beta=1.0):
    """The training objective with KL weight beta, to be *maximised*.

    Returns (objective, terms): objective = mean over the batch of
    log p(x|z) - beta * sum_i KL_i (a Tensor); terms holds the batch means of
    'elbo' (beta = 1), 'log_px' and 'kl' (one per layer, bottom first), as NumPy scalars
    (0-d arrays on a GPU).
    """
    # a number is checked here; a Tensor beta (bench/cuda_graph.py keeps it on the GPU so that
    # a recorded step can change it) is not read back, which would wait for the GPU
    if not isinstance(beta, Tensor) and (
            isinstance(beta, bool) or not isinstance(beta, (int, float, np.floating, np.integer))
            or not 0 <= beta < math.inf):
        raise ValueError(f"elbo: beta is the KL weight, a finite number >= 0 (warm-up takes it "
                         f"from 0 to 1), got {beta!r}")
    log_px, layers = model(x, noise, samples=1)
    kl_total = layers.kl[0]
    for k in layers.kl[1:]:
        kl_total = kl_total + k
    objective = (log_px - beta * kl_total).mean()
    terms = {"elbo": (log_px.data - kl_total.data).mean(), "log_px": log_px.data.mean(),
             "kl": [k.data.mean() for k in layers.kl]}
    return objective, terms


def log_weights(model, x, noise, samples):
    """log w_k = log p(x, z^k) - log q(z^k | x) for K = samples posterior draws: a (K, B)
    Tensor. With one-sample KL terms, log w = log p(x | z) - sum_i (log q - log p)(z_i)."""
    return _log_weights(*model(x, noise, samples=samples, kl="sample"))


def _log_weights(log_px, layers):
    log_w = log_px
    for k in layers.kl:
        log_w = log_w - k
    return log_w


def iw_bound(model, x, noise, samples):
    """The importance-weighted bound L_K averaged over the batch, to be maximised (the
    paper's fine-tuning uses K = 10): L_K = logsumexp_k(log w_k) - log K.

    Returns (objective, terms) like ``elbo``; the terms are one-sample estimates
    averaged over the K samples ('elbo' is the mean log-weight).
    """
    log_px, layers = model(x, noise, samples=samples, kl="sample")
    log_w = _log_weights(log_px, layers)
    objective = (logsumexp(log_w, axis=0) - math.log(samples)).mean()
    terms = {"elbo": log_w.data.mean(), "log_px": log_px.data.mean(),
             "kl": [k.data.mean() for k in layers.kl]}
    return objective, terms


# Rows per forward pass of log_likelihood_bound. On the CPU, bigger is slower: a temporary
# array above 32 MB (glibc's largest threshold for serving allocations from its heap) is
# mapped afresh from the OS at every allocation, and every 4 KB page of it then faults
# and is zeroed. 20000 rows of 784 logits are 63 MB; 2048 rows keep every array near
# 6 MB, in the cache (1.6x more samples per second than 20000 here). On a GPU, big
# chunks spread the cost of each kernel launch over more rows.
MAX_ROWS = {"cpu": 2048, "cuda": 20000}


def log_likelihood_bound(model, x, samples=5000, noise=None, batch_size=100,
                         max_rows=None, progress=None):
    """L_K for every row of x (a NumPy array, or a Tensor of one), in evaluation mode,
    without gradients.

    Memory stays bounded whatever K is: images go in batches and samples in chunks of at
    most ``max_rows`` rows (default ``MAX_ROWS`` of the model's device; at least one sample
    per pass, so a batch larger than max_rows makes passes of batch_size rows), and the
    log-sum-exp over samples is accumulated as we go:
    LSE(a u b) = logaddexp(LSE(a), LSE(b)). progress(done, total) is called per batch.
    The batch norms are folded into their dense layers first (``layers.fold_batch_norm``):
    the same bound, computed with fewer passes over the K samples.
    """
    samples, batch_size = _check_int("samples", samples), _check_int("batch_size", batch_size)
    if max_rows is not None:
        max_rows = _check_int("max_rows", max_rows)
    if progress is not None and not callable(progress):  # else it fails after the first batch
        raise TypeError(f"log_likelihood_bound: progress must be a function (done, total) or "
                        f"None, got {type(progress).__name__}")
    x = x.data if isinstance(x, Tensor) else x
    model._check_batch(x, on_host=True)  # once, here on the host even for a GPU model
    noise = noise if noise is not None else Noise(0)
    _check_noise("log_likelihood_bound", noise)
    xp = get_array_module(model.output.weight.data)
    if max_rows is None:
        max_rows = MAX_ROWS["cpu" if xp is np else "cuda"]
    results = []
    model = fold_batch_norm(model)
    with evaluation(model):
        for start in range(0, len(x), batch_size):
            xb = xp.asarray(x[start:start + batch_size])
            chunk = max(1, min(samples, max_rows // len(xb)))  # samples per forward pass
            total = None  # log sum_k w_k over the chunks so far, one per image
            for done in range(0, samples, chunk):
                k = min(chunk, samples - done)
                noise.new_step()
                lse = logsumexp(log_weights(model, xb, noise, k), axis=0).data
                total = lse if total is None else xp.logaddexp(total, lse)
            results.append(to_numpy(total - math.log(samples)))  # the 1/K of L_K
            if progress is not None:
                progress(min(start + batch_size, len(x)), len(x))
    return np.concatenate(results)


def standard_error(values):
    """The standard error of the mean of ``values`` (e.g. L_K of each test image):
    s / sqrt(n), with s the sample standard deviation (n - 1 in its denominator). It says how
    far the mean could move on another test set of the same size. NaN for fewer than two
    values: one image says nothing about the spread."""
    values = np.asarray(values, dtype=np.float64)
    if values.size < 2:
        return float("nan")
    return float(values.std(ddof=1) / math.sqrt(values.size))


# ----------------------------------------------------------------------------------
# Analysis: KL per unit, active units, samples, reconstructions
# ----------------------------------------------------------------------------------
@contextlib.contextmanager
def evaluation(model):
    """Evaluation mode (batch norm with its running averages) without recording
    gradients; the model's previous mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with no_grad():
            yield
    finally:
        model.train(was_training)


def _evaluate(model, x, noise, samples=1, kl="analytic"):
    """Inference on x in evaluation mode: (log_px, LayerResults)."""
    x = x.data if isinstance(x, Tensor) else x
    # checked before asarray, which made a list float64 and the error then advise x.astype
    model._check_batch(x, on_host=get_array_module(x) is np)  # NumPy x: moved just below
    with evaluation(model):
        xb = get_array_module(model.output.weight.data).asarray(x)
        return model(xb, noise, samples=samples, kl=kl)


def kl_per_unit(model, x, noise):
    """Mean KL of each latent unit over the rows of x: a list (bottom first) of arrays.

    Analytic where the model's KL is analytic; for the VAE's lower layers it is the
    one-sample estimate log q - log p, whose per-unit mean can be slightly negative.
    """
    _, layers = _evaluate(model, x, noise)
    return [to_numpy(k.data.reshape(-1, k.shape[-1]).mean(axis=0)) for k in layers.kl_units]


def posterior_mean_draws(model, x, noise, samples=10):
    """mu_q,i for ``samples`` posterior draws of every layer: a list of (samples, B, units)
    arrays. mu_q,i depends on other layers' samples (in the LVAE on the sample of z_i+1
    above, through the prior in the merge; in the bottom-up VAE on the sample of z_i-1
    below); where it does not, the draws are equal."""
    _, layers = _evaluate(model, x, noise, samples=samples)
    draws = []
    for mu in layers.mu_q:
        mu = to_numpy(mu.data)
        draws.append(mu if mu.ndim == 3 else np.broadcast_to(mu, (samples,) + mu.shape))
    return draws


def posterior_means(model, x, noise, samples=10):
    """E_q[z_i | x] for every layer, a list of (B, units) arrays: the mean mu_q,i averaged
    over ``samples`` posterior draws (see posterior_mean_draws)."""
    return [mu.mean(axis=0) for mu in posterior_mean_draws(model, x, noise, samples)]


def active_units(model, x, noise, threshold=0.01, samples=10):
    """Activity A_u = Cov_x(E_q[z_u | x]) of every unit (Burda et al., 2016); a unit is
    active when A_u > threshold. Returns (list of activity arrays, list of counts).

    E_q[z_u | x] is estimated by the mean m_x of K = ``samples`` draws of mu_q,u, so the
    plain variance of m_x over the rows adds the sampling noise E_x[Var(mu_q,u | x)] / K
    to A_u. That floor is subtracted, with the within-x variance s_x^2 estimated from the
    K draws:   A_u ~ Var_x(m_x) - mean_x(s_x^2) / K   (both variances with ddof=1),
    an unbiased estimate that can come out slightly below 0 for a dead unit. Without the
    correction, K = 10 counted collapsed units of the LVAE's lower layers as active.

    Where E_q[z_u | x] is a batch-normed head of x alone (the LVAE's top layer, the VAE's
    z_1), its activity is about gamma^2, the scale of the mean head's batch norm
    (``mean_norm.gamma``) when the evaluation statistics match the data's (after
    recompute_batchnorm_statistics), so such a unit is inactive only once training has
    shrunk gamma below 0.1. Elsewhere the mean mixes in other layers' samples. In the
    LVAE, a unit whose q equals its prior has E_q[z_i | x] = E_q[mu_p(z_i+1)], which
    still varies with x when the layer above is active: by this measure such a unit
    counts as active although it carries no information of its own. Its KL (kl_per_unit)
    is 0, which is the test for that collapse. Early in training nearly every unit
    counts as active; KL per unit tells more then.
    """
    samples = _check_int("active_units: samples, the draws that estimate the sampling noise "
                         "it subtracts,", samples, minimum=2)
    # bool is an int to Python; a NaN threshold would silently count no unit as active
    real = (isinstance(threshold, (int, float, np.integer, np.floating))
            and not isinstance(threshold, bool))
    if not (real and math.isfinite(threshold)):
        raise TypeError(f"active_units: threshold must be a finite number (the activity above "
                        f"which a unit is active, e.g. 0.01), got {threshold!r}")
    draws = posterior_mean_draws(model, x, noise, samples)  # checks x (forward does)
    if draws[0].shape[1] < 2:
        raise ValueError(f"active_units needs 2 images or more (A_u is a variance over x), "
                         f"got {draws[0].shape[1]}")
    activity = []
    for mu in draws:
        sampling_noise = mu.var(axis=0, ddof=1).mean(axis=0) / samples
        activity.append(mu.mean(axis=0).var(axis=0, ddof=1) - sampling_noise)
    return activity, [int((a > threshold).sum()) for a in activity]


def sample_prior(model, n, noise):
    """n images drawn from the model: z_L ~ N(0, I), then z_i ~ p(z_i|z_i+1), then
    the Bernoulli means sigmoid(logits). Returns a NumPy array (n, x_dim)."""
    n = _check_int("sample_prior: n, the number of images,", n)
    _check_noise("sample_prior", noise)
    with evaluation(model):
        like = model.output.weight.data
        top = model.n_layers - 1
        z = Tensor(noise.normal((n, model.z_dims[top]), like=like))
        for i in range(top - 1, -1, -1):
            mu, var = model.prior(i, z)
            z = reparameterize(mu, var, noise.normal(mu.shape, like=like))
        return to_numpy(sigmoid_array(model.decode(z).data))


def reconstruct(model, x, noise):
    """Bernoulli means of p(x | z_1) for one posterior sample z ~ q(z|x) per row of x."""
    _, layers = _evaluate(model, x, noise)
    return to_numpy(sigmoid_array(layers.logits.data))[0]
