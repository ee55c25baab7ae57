"""Layers and the optimiser, built on autograd.py.

Module        parameters(), train()/eval(), state_dict()/load_state_dict(), to(device)
Dense         y = x W + b
BatchNorm     y = gamma * (x - mean) / sqrt(var + eps) + beta, over the batch axis
LeakyReLU     y = max(x, slope * x)
MLP           a block of dense layers, each followed by batch norm and leaky ReLU
GaussianLayer (mu, var) heads: mu = [BN](h W_mu + b), var = softplus([BN](h W_v + b)) + eps
              ([BN]: a batch norm when batch_norm=True)
Adam          Adam with optional clipping of the global gradient norm
fold_batch_norm  an evaluation-only copy of a model with each batch norm folded into
              its dense layer (y = x (W a) + (a (b - m) + beta), a = gamma / sqrt(v + eps))

Dense and batch norm are single autograd ops with hand-written backward passes: they
are the bulk of the work in a training step, and one op is both faster and easier to
check against finite differences than a chain of small ones.
"""
import collections.abc
import copy
import math

import numpy as np

import kernels
from autograd import (Tensor, as_input, check_same_device, get_array_module, leaky_relu,
                      no_grad, record, softplus, to_device, to_numpy)


# ----------------------------------------------------------------------------------
# Module: a container of parameters and sub-modules
# ----------------------------------------------------------------------------------
class Module:
    """Base class. Tensor attributes are the state: those with requires_grad=True are
    parameters (trained), the others are buffers (e.g. batch norm's running averages).
    Modules and lists of modules held as attributes are sub-modules. Order of definition
    gives a deterministic order of parameters and state_dict keys."""
    training = True

    def named_tensors(self, prefix=""):
        for name, value in vars(self).items():
            if isinstance(value, Tensor):
                yield prefix + name, value
            elif isinstance(value, Module):
                yield from value.named_tensors(f"{prefix}{name}.")
            elif isinstance(value, (list, tuple)):
                for i, item in enumerate(value):
                    if isinstance(item, Module):
                        yield from item.named_tensors(f"{prefix}{name}.{i}.")

    def named_parameters(self):
        return [(n, t) for n, t in self.named_tensors() if t.requires_grad]

    def parameters(self):
        """Each parameter once, in definition order: a tied one (a sub-module or Tensor held
        under two names) is listed once, or Adam would step it twice (and refuses it)."""
        unique = {id(t): t for _, t in self.named_parameters()}  # dicts keep the first order
        return list(unique.values())

    def modules(self):
        """This module and every sub-module below it."""
        yield self
        for value in vars(self).values():
            items = value if isinstance(value, (list, tuple)) else [value]
            for item in items:
                if isinstance(item, Module):
                    yield from item.modules()

    def train(self, mode=True):
        """Training mode: batch norm uses batch statistics and updates running averages."""
        mode = _check_flag("train", "mode", mode)
        for m in self.modules():
            m.training = mode
        return self

    def eval(self):
        """Evaluation mode: batch norm uses its running averages."""
        return self.train(False)

    def to(self, device):
        """Move every parameter and buffer to 'cpu' or 'cuda' (in place)."""
        for _, t in self.named_tensors():
            t.data = to_device(t.data, device)
            t.grad = None
        return self

    def astype(self, dtype):
        """Convert every parameter and buffer to ``dtype`` (float64 for gradient checks)."""
        dtype = _check_float_dtype("astype", dtype)
        for _, t in self.named_tensors():
            t.data = t.data.astype(dtype)
            t.grad = None
        return self

    def state_dict(self):
        """{name: NumPy array copy} of every parameter and buffer."""
        return {name: to_numpy(t.data).copy() for name, t in self.named_tensors()}

    def load_state_dict(self, state):
        """Load arrays by name; missing/unexpected names and wrong shapes are errors."""
        if not isinstance(state, collections.abc.Mapping):  # a str would be read as its letters
            raise TypeError(f"load_state_dict: state must be a dict of {{name: array}} (as "
                            f"state_dict() gives), got {type(state).__name__}")
        own = dict(self.named_tensors())
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise KeyError(f"load_state_dict: missing keys {missing}, unexpected keys "
                           f"{unexpected}")
        for name, t in own.items():
            value = state[name]
            if not hasattr(value, "shape"):
                raise TypeError(f"load_state_dict: {name} must be an array, got "
                                f"{type(value).__name__}")
            if tuple(value.shape) != t.shape:
                raise ValueError(f"load_state_dict: {name} has shape {tuple(value.shape)}"
                                 f" in the state, {t.shape} in the model")
        for name, t in own.items():
            xp = get_array_module(t.data)
            t.data = xp.asarray(to_numpy(state[name]), dtype=t.dtype).copy()

    def named_modules(self, prefix=""):
        """(dotted name, module) of every sub-module below this one, in definition order."""
        for name, value in vars(self).items():
            items = list(enumerate(value)) if isinstance(value, (list, tuple)) else [(None, value)]
            for i, item in items:
                if isinstance(item, Module):
                    path = f"{prefix}{name}" if i is None else f"{prefix}{name}.{i}"
                    yield path, item
                    yield from item.named_modules(path + ".")

    # a function (module, output) -> None called after every module's forward, or None;
    # set only while looking for where a NaN appeared (see first_nonfinite_module)
    _watch = None

    def __call__(self, *args, **kwargs):
        out = self.forward(*args, **kwargs)
        if Module._watch is not None:
            Module._watch(self, out)
        return out


def _all_finite(value):
    """Whether every array in a module's output (a Tensor, an array or a tuple) is finite."""
    if isinstance(value, (list, tuple)):
        return all(_all_finite(v) for v in value)
    data = value.data if isinstance(value, Tensor) else value
    if not hasattr(data, "dtype"):
        return True
    return bool(get_array_module(data).isfinite(data).all())


def first_nonfinite_module(model, run):
    """Where a NaN or inf first appears: call ``run()`` (a forward pass through ``model``)
    with every module's output checked, and return the dotted name of the first module,
    in the order they ran, whose output is not finite ('' for the model itself), or None.

    A module's sub-modules finish before it does, so the name is the innermost module
    that produced the first bad value, e.g. 'up_blocks.1.dense.0'. Before the pass, a
    parameter that is already non-finite is reported as 'parameter <name>' (buffers are
    not: batch norm's running averages may have taken in the failed step's NaN, and a
    training-mode pass does not use them). Slow (it reads every output back), so it is
    meant for diagnosis after a failure.
    """
    for name, t in model.named_parameters():
        if not _all_finite(t):
            return f"parameter {name}"
    names = {id(m): name for name, m in model.named_modules()}
    names[id(model)] = ""
    found = []

    def watch(module, out):
        if not found and id(module) in names and not _all_finite(out):
            found.append(names[id(module)])
    Module._watch = watch
    try:
        run()
    finally:
        Module._watch = None
    return found[0] if found else None


# ----------------------------------------------------------------------------------
# Dense
# ----------------------------------------------------------------------------------
def _check_weight_and_bias(op, weight, bias):
    """A dense layer's weight must be 2-D (n_in, n_out) and its bias (if any) hold one value
    per output: a bias of another length would broadcast, or fail inside NumPy."""
    if weight.ndim != 2:
        raise ValueError(f"{op}: the weight must be 2-D (n_in, n_out), got shape {weight.shape}")
    if bias is not None and tuple(bias.shape) != (weight.shape[1],):
        raise ValueError(f"{op}: bias has shape {tuple(bias.shape)}, but the weight of shape "
                         f"{weight.shape} needs ({weight.shape[1]},): one value per output")


def linear(x, weight, bias=None):
    """x @ W (+ b) over the last axis of x, as one op. Arrays are taken as constants.

    Backward: dx = g W^T,  dW = x^T g,  db = sum of g over the rows.
    Leading axes of x (batch, importance samples) are folded into rows.
    """
    weight, x = as_input("linear", weight), as_input("linear", x)
    bias = None if bias is None else as_input("linear", bias)
    check_same_device("linear", x, weight)
    _check_weight_and_bias("linear", weight, bias)
    if x.ndim == 0 or x.shape[-1] != weight.shape[0]:
        features = x.shape[-1] if x.ndim else "no"  # a 0-d array has no feature axis
        raise ValueError(f"linear: input has {features} features (shape {x.shape}) but "
                         f"the weight expects {weight.shape[0]} (shape {weight.shape})")
    rows = x.data.reshape(-1, x.shape[-1])
    out = rows @ weight.data
    if bias is not None:
        out += bias.data
    out = out.reshape(x.shape[:-1] + (weight.shape[1],))
    parents = (x, weight) if bias is None else (x, weight, bias)

    def backward(g):
        g = g.reshape(-1, g.shape[-1])
        grads = [(g @ weight.data.T).reshape(x.shape) if x.requires_grad else None,
                 rows.T @ g if weight.requires_grad else None]
        if bias is not None:
            grads.append(g.sum(axis=0) if bias.requires_grad else None)
        return grads
    return record(out, parents, backward)


def check_size(layer, name, n):
    """A layer's size must be a positive int (not a bool, float or array)."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise TypeError(f"{layer}: {name} must be an int, got {n!r} ({type(n).__name__})")
    if n < 1:
        raise ValueError(f"{layer}: {name} must be a positive int, got {n}")


def _check_number(owner, name, value, low, high=None, low_open=False, high_open=True):
    """A real number (not a bool or a string) with low <= value < high (low < value if
    ``low_open``, value <= high if not ``high_open``): the settings of layers and of Adam,
    checked when they are given rather than when a step first uses them."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{owner}: {name} must be a number, got {value!r} "
                        f"({type(value).__name__})")
    too_low = value <= low if low_open else value < low
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high or not math.isfinite(value):
        interval = (("(" if low_open else "[") + f"{low}, "
                    + ("inf)" if high is None else f"{high}" + (")" if high_open else "]")))
        raise ValueError(f"{owner}: {name} must be in {interval}, got {value}")


def _check_flag(owner, name, value):
    """``value`` as a bool; anything but True or False is a TypeError: "no" or "yes" would
    otherwise both count as True."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{owner}: {name} must be True or False, got {value!r}")
    return bool(value)


def _check_float_dtype(owner, dtype):
    """``dtype`` as a NumPy floating-point dtype: weights stored as integers would be
    rounded to 0 and +-1, and no gradient step could move them."""
    try:
        dtype = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"{owner}: {dtype!r} is not a NumPy dtype") from None
    if dtype.kind != "f":
        raise TypeError(f"{owner}: dtype must be a floating-point type (e.g. float32, "
                        f"float64), got {dtype}")
    return dtype


class Dense(Module):
    """Fully connected layer y = x W + b.

    init='glorot': W ~ U(-a, a), a = sqrt(6 / (fan_in + fan_out)) (Lasagne's default,
    used by the paper's code); init='he': W ~ N(0, 2 / fan_in).
    bias=False when a batch norm follows (its beta plays the role of the bias).
    """

    def __init__(self, n_in, n_out, bias=True, init="glorot", rng=None, dtype=np.float32):
        check_size("Dense", "n_in", n_in)
        check_size("Dense", "n_out", n_out)
        bias, dtype = _check_flag("Dense", "bias", bias), _check_float_dtype("Dense", dtype)
        rng = rng if rng is not None else np.random.default_rng()
        if not isinstance(rng, (np.random.Generator, np.random.RandomState)):
            raise TypeError(f"Dense: rng must be a NumPy random generator "
                            f"(np.random.default_rng(seed)), got {rng!r}")
        if init == "glorot":
            limit = math.sqrt(6.0 / (n_in + n_out))
            w = rng.uniform(-limit, limit, size=(n_in, n_out))
        elif init == "he":
            w = rng.standard_normal((n_in, n_out)) * math.sqrt(2.0 / n_in)
        else:
            raise ValueError(f"Dense: unknown init {init!r}: use 'glorot' or 'he'")
        self.weight = Tensor(w.astype(dtype), requires_grad=True)
        self.bias = Tensor(np.zeros(n_out, dtype), requires_grad=True) if bias else None

    @classmethod
    def from_arrays(cls, weight, bias=None, requires_grad=True):
        """A Dense layer holding the given arrays (no random initialisation)."""
        layer = cls.__new__(cls)
        layer.weight = Tensor(weight, requires_grad=requires_grad)
        layer.bias = None if bias is None else Tensor(bias, requires_grad=requires_grad)
        _check_weight_and_bias("Dense.from_arrays", layer.weight, layer.bias)
        return layer

    def forward(self, x):
        """x W + b for a Tensor x; a NumPy or CuPy array becomes a constant Tensor."""
        return linear(as_input("Dense", x), self.weight, self.bias)


# ----------------------------------------------------------------------------------
# Batch normalisation
# ----------------------------------------------------------------------------------
def _column_dot(a, b):
    """sum_i a[i, j] b[i, j] for every column j: NumPy's einsum needs no temporary;
    CuPy's einsum costs more per call than a product and a sum."""
    if get_array_module(a) is np:
        return np.einsum("ij,ij->j", a, b)
    return (a * b).sum(axis=0)


def batch_norm_forward(rows, gamma, beta, eps, mean=None, var=None, slope=None):
    """Reference array code of the batch-norm op (rows: (N, D); see ``batch_norm``).

    Returns (out, xhat, mean, var). mean/var None: the batch's own statistics.
    """
    xp = get_array_module(rows)
    if mean is None:
        mean = rows.mean(axis=0)
        centred = rows - mean
        var = _column_dot(centred, centred) / len(rows)
    else:
        centred = rows - mean
    xhat = centred
    xhat *= 1.0 / xp.sqrt(var + eps)  # in place: `centred` is not needed any more
    out = xhat * gamma
    out += beta
    if slope is not None:
        xp.maximum(out, out * slope, out=out)  # leaky ReLU, in place
    return out, xhat, mean, var


def batch_norm_backward(g, out, xhat, gamma, var, eps, training, slope=None):
    """Reference array code of the batch-norm op's backward: (dx, dgamma, dbeta)."""
    xp = get_array_module(g)
    if slope is not None:  # through the leaky ReLU first: out > 0 exactly where its input is
        leaky_grad = (out > 0).astype(g.dtype)
        leaky_grad *= 1 - slope
        leaky_grad += slope  # 1 where out > 0, else slope
        g = leaky_grad * g
    # the formulas of batch_norm's docstring, with N = n, v = var
    n = len(g)
    dbeta = g.sum(axis=0)
    dgamma = _column_dot(g, xhat)
    scale = gamma / xp.sqrt(var + eps)
    if training:
        dx = g - dbeta / n
        dx -= xhat * (dgamma / n)
        dx *= scale
    else:
        dx = g * scale
    return dx, dgamma, dbeta


def batch_norm(x, gamma, beta, eps, mean=None, var=None, slope=None):
    """Normalise each feature (last axis) over all other axes, then scale and shift
    (and, if ``slope`` is given, apply a leaky ReLU: one op instead of two).

    Training (mean=var=None), with N rows, batch mean m and biased variance v:
        xhat = (x - m) / sqrt(v + eps),   y = gamma * xhat + beta
        dbeta = sum g,   dgamma = sum g * xhat,
        dx = gamma / sqrt(v + eps) * (g - dbeta / N - xhat * dgamma / N)
    (the last two terms are how every row's statistics depend on every row).
    Evaluation (running mean and var given): a fixed affine map, dx = g * gamma / sqrt(var + eps).
    On a GPU, kernels.py runs each direction in three fused kernels.
    Returns (y, mean, variance): the batch's statistics in training, the given ones in
    evaluation.
    """
    # input checks; the maths starts at `fused = ...`
    x = as_input("batch_norm", x)
    check_same_device("batch_norm", x, gamma)
    if x.ndim == 0 or x.shape[-1] != gamma.shape[0]:
        raise ValueError(f"batch_norm: input of shape {x.shape} for {gamma.shape[0]} features: "
                         f"its last axis must have {gamma.shape[0]}")
    for name, value in (("beta", beta), ("mean", mean), ("var", var)):
        if value is not None and value.shape != gamma.shape:  # (1,) would broadcast silently
            raise ValueError(f"batch_norm: {name} has shape {value.shape}, gamma {gamma.shape}: "
                             f"each needs one value per feature")
    if slope is not None:  # as leaky_relu checks it; -5 would compute something else silently
        _check_number("batch_norm", "slope", slope, low=0, high=1)
    rows = x.data.reshape(-1, x.shape[-1])
    training = mean is None
    if training and rows.shape[0] < 2:
        raise ValueError(f"batch norm in training mode needs at least 2 rows, got "
                         f"{rows.shape[0]}: one row normalises every feature to 0, whatever "
                         f"the input")
    fused = kernels.active(rows)  # a GPU's fused kernels, or the reference code above
    forward = kernels.batch_norm_forward if fused else batch_norm_forward
    out, xhat, mean, var = forward(rows, gamma.data, beta.data, eps, mean, var, slope)

    def backward(g):
        backward_fn = kernels.batch_norm_backward if fused else batch_norm_backward
        dx, dgamma, dbeta = backward_fn(g.reshape(rows.shape), out, xhat, gamma.data, var,
                                        eps, training, slope)
        return (dx.reshape(x.shape) if x.requires_grad else None,
                dgamma if gamma.requires_grad else None,
                dbeta if beta.requires_grad else None)
    y = record(out.reshape(x.shape), (x, gamma, beta), backward)
    return y, mean, var


class BatchNorm(Module):
    """Batch normalisation over features (Ioffe and Szegedy, 2015).

    Training: normalise with the batch's statistics and update running averages
        running = (1 - momentum) * running + momentum * batch   (variance unbiased).
    Evaluation: normalise with the running averages.
    ``momentum=None`` makes the running averages exact averages over all batches seen
    since ``reset_running_stats()``: that is how statistics are recomputed over a whole
    data set (see ``recompute_batchnorm_statistics``).
    """

    def __init__(self, n_features, momentum=0.1, eps=1e-4, dtype=np.float32):
        check_size("BatchNorm", "n_features", n_features)
        if momentum is not None:  # None has a meaning: exact averages (see above)
            _check_number("BatchNorm", "momentum", momentum, low=0, high=1,
                          high_open=False)
        # eps = 0 divides by zero on a feature that is constant over the batch
        _check_number("BatchNorm", "eps", eps, low=0, low_open=True)
        dtype = _check_float_dtype("BatchNorm", dtype)
        self.gamma = Tensor(np.ones(n_features, dtype), requires_grad=True)
        self.beta = Tensor(np.zeros(n_features, dtype), requires_grad=True)
        self.running_mean = Tensor(np.zeros(n_features, dtype))
        self.running_var = Tensor(np.ones(n_features, dtype))
        self.momentum, self.eps = momentum, eps
        self.batches_seen = 0

    def reset_running_stats(self):
        self.running_mean.data[...] = 0
        self.running_var.data[...] = 1
        self.batches_seen = 0

    def forward(self, x, slope=None):
        """Batch norm of x, followed by a leaky ReLU with this slope if one is given."""
        if not self.training:
            y, _, _ = batch_norm(x, self.gamma, self.beta, self.eps,
                                 self.running_mean.data, self.running_var.data, slope)
            return y
        y, mean, var = batch_norm(x, self.gamma, self.beta, self.eps, slope=slope)
        n = x.size // x.shape[-1]
        self.batches_seen += 1
        # m: the weight of this batch. With momentum None it is 1/k for the k-th batch,
        # which keeps `running` the plain average of the k batches: (1 - 1/k) avg + batch / k
        m = self.momentum if self.momentum is not None else 1.0 / self.batches_seen
        # running_var estimates the population variance: the batch's var divides by n,
        # n / (n - 1) turns it into the unbiased estimate (Bessel's correction)
        unbias = n / max(n - 1, 1)
        if kernels.active(mean):
            kernels.running_average(mean, var, m, unbias, self.running_mean.data,
                                    self.running_var.data)
        else:
            self.running_mean.data *= 1 - m
            self.running_mean.data += m * mean
            self.running_var.data *= 1 - m
            self.running_var.data += (m * unbias) * var
        return y


def recompute_batchnorm_statistics(model, batches, forward):
    """Replace every batch norm's running averages by averages over ``batches``.

    The paper evaluates with statistics collected over the training set, not the
    moving averages of training. ``forward(batch)`` runs the model in training mode
    (without recording gradients) so that each batch norm sees batch statistics.
    """
    norms = [m for m in model.modules() if isinstance(m, BatchNorm)]
    # what to put back if this fails: after no batches at all (an empty list, a generator
    # already used up), an error or Ctrl-C midway, the statistics are the trained ones,
    # not mean 0, variance 1 or an average over part of the data
    saved = [(bn.momentum, bn.running_mean.data.copy(), bn.running_var.data.copy(),
              bn.batches_seen) for bn in norms]
    modes = [(m, m.training) for m in model.modules()]  # every module's flag, not only BN's
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None
    model.train()
    done = False
    try:
        with no_grad():
            for batch in batches:
                forward(batch)
                done = True
        if not done:
            raise ValueError("recompute_batchnorm_statistics: no batches (an empty list, or "
                             "a generator already used up?); the statistics are left as they "
                             "were")
        # one that saw no batch would be left at mean 0, variance 1: forward ran another
        # model (e.g. a fold_batch_norm copy) or put this one in eval mode (kl_per_unit...)
        unseen = [bn for bn in norms if bn.batches_seen == 0]
        if unseen:
            raise ValueError(f"recompute_batchnorm_statistics: forward(batch) ran {len(unseen)} "
                             f"of the model's {len(norms)} batch norms on no batch; it must run "
                             f"this model in training mode (e.g. lvae.elbo(model, batch, "
                             f"noise)); the statistics are left as they were")
    except BaseException:
        for bn, (_, mean, var, seen) in zip(norms, saved):
            bn.running_mean.data[...], bn.running_var.data[...], bn.batches_seen = mean, var, seen
        raise
    finally:
        for bn, (momentum, *_) in zip(norms, saved):
            bn.momentum = momentum
        for m, training in modes:
            m.training = training


# ----------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------
class LeakyReLU(Module):
    """y = x for x > 0, slope * x otherwise."""

    def __init__(self, slope=0.01):
        self.slope = slope

    def forward(self, x):
        return leaky_relu(x, self.slope)


class MLP(Module):
    """Dense -> [BatchNorm] -> leaky ReLU, repeated for each size in ``sizes``.

    The paper's deterministic blocks are MLP(n_in, [n, n]): two dense layers.
    """

    def __init__(self, n_in, sizes, batch_norm=True, slope=0.01, rng=None):
        if isinstance(sizes, str) or not hasattr(sizes, "__iter__"):
            raise TypeError(f"MLP: sizes must be a list of layer sizes, e.g. [512, 512], got "
                            f"{sizes!r}")
        sizes = list(sizes)
        if not sizes:
            raise ValueError("MLP: sizes is empty; a block needs at least one layer")
        batch_norm = _check_flag("MLP", "batch_norm", batch_norm)
        _check_number("MLP", "slope", slope, low=0, high=1)  # a leaky ReLU's slope
        self.dense = []
        for n_out in sizes:
            self.dense.append(Dense(n_in, n_out, bias=not batch_norm, rng=rng))
            n_in = n_out
        self.norms = [BatchNorm(n) for n in sizes] if batch_norm else []
        self.batch_norm, self.slope, self.n_out = batch_norm, slope, n_in

    def forward(self, x):
        for i, dense in enumerate(self.dense):
            x = dense(x)
            if self.batch_norm:  # batch norm and leaky ReLU as one op
                x = self.norms[i](x, slope=self.slope)
            else:
                x = leaky_relu(x, self.slope)
        return x

    def fold_batch_norm(self):
        """Fold each batch norm into its dense layer (in place; see ``fold_batch_norm``)."""
        if self.batch_norm:
            self.dense = [fold_dense_and_norm(d, n) for d, n in zip(self.dense, self.norms)]
            self.norms, self.batch_norm = [], False


class GaussianLayer(Module):
    """Mean and variance of a diagonal Gaussian from features h.

        mu  = [BN](h W_mu + b_mu)
        var = softplus([BN](h W_v + b_v)) + eps     (eps keeps var > 0 so log var is finite)
    """

    def __init__(self, n_in, n_out, batch_norm=True, var_eps=1e-8, rng=None):
        batch_norm = _check_flag("GaussianLayer", "batch_norm", batch_norm)
        # var_eps <= 0 would let the variance reach 0 (log var = -inf) or go negative
        _check_number("GaussianLayer", "var_eps", var_eps, low=0, low_open=True)
        self.mean_dense = Dense(n_in, n_out, bias=not batch_norm, rng=rng)
        self.var_dense = Dense(n_in, n_out, bias=not batch_norm, rng=rng)
        self.mean_norm = BatchNorm(n_out) if batch_norm else None
        self.var_norm = BatchNorm(n_out) if batch_norm else None
        self.var_eps = var_eps

    def forward(self, h):
        mu, pre_var = self.mean_dense(h), self.var_dense(h)
        if self.mean_norm is not None:
            mu, pre_var = self.mean_norm(mu), self.var_norm(pre_var)
        return mu, softplus(pre_var) + self.var_eps

    def fold_batch_norm(self):
        """Fold each batch norm into its dense layer (in place; see ``fold_batch_norm``)."""
        if self.mean_norm is not None:
            self.mean_dense = fold_dense_and_norm(self.mean_dense, self.mean_norm)
            self.var_dense = fold_dense_and_norm(self.var_dense, self.var_norm)
            self.mean_norm = self.var_norm = None


def fold_dense_and_norm(dense, norm):
    """One Dense layer that computes norm(dense(x)) as evaluation mode does.

    With its running mean m and variance v, a batch norm in evaluation mode is a fixed
    affine map of each feature: y = a (x W + b - m) + beta with a = gamma / sqrt(v + eps).
    So  y = x (W a) + (a (b - m) + beta):  the scale goes into the weight's columns and
    the rest into the bias, and the batch norm's passes over the data disappear.
    """
    xp = get_array_module(dense.weight.data)
    a = norm.gamma.data / xp.sqrt(norm.running_var.data + norm.eps)
    bias = norm.beta.data - a * norm.running_mean.data
    if dense.bias is not None:
        bias = bias + a * dense.bias.data
    return Dense.from_arrays(dense.weight.data * a, bias.astype(dense.weight.dtype),
                             requires_grad=dense.weight.requires_grad)


def fold_batch_norm(model):
    """A copy of ``model`` for evaluation only, with every batch norm folded into the
    dense layer before it (``fold_dense_and_norm``): the same outputs as ``model.eval()``
    up to rounding, with fewer passes over the data (the importance-weighted bound over
    K = 5000 samples spent 30 % of its time in batch norms in one measurement; folded, it
    ran 1.19x faster). Training the copy would train a network without batch norm: don't.
    """
    folded = copy.deepcopy(model).eval()
    for module in list(folded.modules()):
        if isinstance(module, (MLP, GaussianLayer)):
            module.fold_batch_norm()
    return folded


# ----------------------------------------------------------------------------------
# Optimiser
# ----------------------------------------------------------------------------------
def _check_adam_params(params):
    """The parameters as a non-empty list of Tensors, or a TypeError/ValueError."""
    if isinstance(params, (Tensor, Module)) or not hasattr(params, "__iter__"):
        raise TypeError(f"Adam: params must be a list of Tensors (e.g. model.parameters()), "
                        f"got {type(params).__name__}")
    params = list(params)
    if not params:
        raise ValueError("Adam: params is empty; pass the Tensors to train "
                         "(e.g. model.parameters())")
    first = {}  # id -> index: a Tensor listed twice would be updated twice per step
    for i, p in enumerate(params):
        if not isinstance(p, Tensor):
            raise TypeError(f"Adam: params[{i}] must be a Tensor, got {type(p).__name__}")
        if first.setdefault(id(p), i) != i:
            raise ValueError(f"Adam: params[{i}] is params[{first[id(p)]}] again; each "
                             f"parameter must be listed once, or it takes two steps at a time")
    return params


class Adam:
    """Adam (Kingma and Ba, 2015), updating parameters in place.

        m = b1 m + (1 - b1) g,     v = b2 v + (1 - b2) g^2
        p -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)

    clip_norm: if set, gradients are scaled by min(1, clip_norm / ||g||) where ||g|| is
    the norm of all gradients together (the paper's code clips the gradient norm).
    """

    def __init__(self, params, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, clip_norm=None):
        self.params = _check_adam_params(params)
        # lr = 0 is allowed: the weights stay, batch-norm statistics move
        _check_number("Adam", "lr", lr, low=0)
        _check_number("Adam", "beta1", beta1, low=0, high=1)  # beta = 1: 1 - beta^t = 0 divides
        _check_number("Adam", "beta2", beta2, low=0, high=1)
        _check_number("Adam", "eps", eps, low=0)
        if clip_norm is not None:
            _check_number("Adam", "clip_norm", clip_norm, low=0, low_open=True)
        # Python floats, whatever number type came in: a NumPy float64 next to float32
        # arrays would make float64 results (NumPy's promotion rules), which the fused
        # GPU kernel refuses; a Python float takes the arrays' dtype.
        self.lr, self.beta1, self.beta2, self.eps = float(lr), float(beta1), float(beta2), float(eps)
        self.clip_norm = None if clip_norm is None else float(clip_norm)
        self.t = 0
        self.m = [get_array_module(p.data).zeros_like(p.data) for p in self.params]
        self.v = [get_array_module(p.data).zeros_like(p.data) for p in self.params]
        self.last_grad_norm = None
        self._buffers = {}  # dtype -> scratch buffer for step() without the fused kernel

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    def grad_norm(self):
        """sqrt(sum of squares of every gradient), as a float."""
        total = 0.0
        for p in self.params:
            if p.grad is not None:
                g = p.grad.reshape(-1)
                total += float(g @ g)
        return math.sqrt(total)

    def step(self):
        """One Adam update of every parameter that has a gradient."""
        self.t += 1
        self.update(*self.step_scalars())

    def step_scalars(self):
        """(step_size, eps_hat) of step t, with the bias corrections bc = 1 - beta^t folded in:
        lr (m / bc1) / (sqrt(v / bc2) + eps) = step_size m / (sqrt(v) + eps_hat)."""
        bc1, bc2 = 1 - self.beta1 ** self.t, 1 - self.beta2 ** self.t
        return self.lr * math.sqrt(bc2) / bc1, self.eps * math.sqrt(bc2)

    def update(self, step_size, eps_hat):
        """The update itself, with the scalars of ``step_scalars`` (numbers, or 0-d arrays
        on the parameters' device: a CUDA graph replays with whatever they hold)."""
        b1, b2 = self.beta1, self.beta2
        if kernels.active(self.params[0].data):  # GPU with fusion on: one kernel per parameter
            grads = [p.grad for p in self.params if p.grad is not None]
            scale = 1.0 if self.clip_norm is None else self._device_clip_scale(grads)
            for p, m, v in zip(self.params, self.m, self.v):
                if p.grad is not None:  # the whole update in one fused kernel
                    kernels.adam_update(p.data, p.grad, m, v, scale, b1, b2, step_size, eps_hat)
            return
        # The plain path (NumPy, or CuPy with fusion off): first the clipping scale, then
        # the maths of the class docstring, in place (lr and eps folded into step_size and
        # eps_hat, see step_scalars).
        scale = None  # None: no clipping this step
        if self.clip_norm is not None and get_array_module(self.params[0].data) is not np:
            # CuPy with fusion off: the norm stays on the GPU, as on the fused path
            scale = self._device_clip_scale([p.grad for p in self.params if p.grad is not None])
        elif self.clip_norm is not None:
            self.last_grad_norm = self.grad_norm()
            if self.last_grad_norm > self.clip_norm:
                scale = self.clip_norm / self.last_grad_norm
        for p, m, v in zip(self.params, self.m, self.v):
            if p.grad is None:
                continue
            xp = get_array_module(p.data)
            g = p.grad if scale is None else p.grad * scale
            tmp = self._scratch(p)  # in-place ops on one reused buffer: no allocations
            xp.multiply(g, 1 - b1, out=tmp)
            m *= b1
            m += tmp                     # m = b1 m + (1 - b1) g
            xp.multiply(g, g, out=tmp)
            tmp *= 1 - b2
            v *= b2
            v += tmp                     # v = b2 v + (1 - b2) g^2
            xp.sqrt(v, out=tmp)
            tmp += eps_hat
            xp.divide(m, tmp, out=tmp)
            tmp *= step_size
            p.data -= tmp

    def _device_clip_scale(self, grads):
        """min(1, clip_norm / ||g||) as a 0-d device array: reading the norm back to the
        host would make the CPU wait for the GPU at every step."""
        xp = get_array_module(self.params[0].data)
        total = xp.zeros((), dtype=self.params[0].dtype)  # the weights' dtype, as the kernel's T
        for g in grads:
            g = g.reshape(-1)
            total += g @ g
        self.last_grad_norm = xp.sqrt(total)
        return xp.minimum(1, self.clip_norm / (self.last_grad_norm + 1e-12))

    def _scratch(self, p):
        """A work buffer of p's shape: a view of one buffer as large as the largest parameter."""
        buffer = self._buffers.get(p.data.dtype)
        if buffer is None or get_array_module(buffer) is not get_array_module(p.data):
            size = max(q.size for q in self.params)
            buffer = self._buffers[p.data.dtype] = get_array_module(p.data).empty(size, p.dtype)
        return buffer[:p.size].reshape(p.shape)

    def state_dict(self):
        state = {"t": np.array(self.t)}
        for i, (m, v) in enumerate(zip(self.m, self.v)):
            state[f"m.{i}"], state[f"v.{i}"] = to_numpy(m).copy(), to_numpy(v).copy()
        return state

    def load_state_dict(self, state):
        """Restore t, m and v as saved by state_dict, every entry checked first (nothing
        is changed if one is bad): a damaged state would otherwise surface steps later,
        as a math error or as a NaN weight that looks like a too-high learning rate."""
        names = {"t"} | {f"{k}.{i}" for i in range(len(self.params)) for k in "mv"}
        if set(state) != names:
            raise KeyError(f"Adam.load_state_dict: expected {len(names)} entries (t, m.i, v.i "
                           f"for {len(self.params)} parameters), got {len(state)}: missing "
                           f"{sorted(names - set(state))}, unexpected {sorted(set(state) - names)}")
        t = to_numpy(state["t"])
        if t.shape != () or t.dtype.kind not in "iu" or t < 0:
            raise ValueError(f"Adam.load_state_dict: t must be a step count (an integer >= 0), "
                             f"got {t!r}")
        for i, p in enumerate(self.params):
            for name in (f"m.{i}", f"v.{i}"):
                value = to_numpy(state[name])
                if tuple(value.shape) != p.shape:
                    raise ValueError(f"Adam.load_state_dict: {name} has shape "
                                     f"{tuple(value.shape)}, parameter {i} has {p.shape}")
                if value.dtype.kind not in "iuf" or not np.isfinite(value).all():
                    raise ValueError(f"Adam.load_state_dict: {name} holds values that are not "
                                     f"finite numbers ({value.dtype})")
                if name[0] == "v" and (value < 0).any():  # a mean of squares: sqrt(v) is taken
                    raise ValueError(f"Adam.load_state_dict: {name} holds negative values")
        self.t = int(t)
        for i, p in enumerate(self.params):
            xp = get_array_module(p.data)
            self.m[i] = xp.asarray(to_numpy(state[f"m.{i}"]), dtype=p.dtype).copy()
            self.v[i] = xp.asarray(to_numpy(state[f"v.{i}"]), dtype=p.dtype).copy()
