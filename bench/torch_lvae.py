"""The same Ladder VAE and bottom-up hierarchical VAE as lvae.py, in eager PyTorch.

This is the baseline of bench/bench.py: the model a careful PyTorch user would write
for the paper's architecture, with no torch.compile and no hand-fused kernels. It is
not part of the product (torch is not a dependency of the project).

Architecture and objective, exactly as lvae.py / layers.py:

* MLP block: [Linear (no bias) -> BatchNorm (eps 1e-4, momentum 0.1) -> leaky ReLU (0.01)]
  x n_dense; batch norm over the feature axis, every leading axis folded into rows.
* GaussianLayer: mu = BN(Linear(h)), var = softplus(BN(Linear(h))) + 1e-8.
* Generative model: p(z_i | z_i+1) = GaussianLayer(MLP(z_i+1)) with blocks of width
  hidden[i+1]; p(x | z_1) = Bernoulli(logits = Linear_with_bias(MLP(z_1))), width hidden[0].
* LVAE: deterministic bottom-up MLPs d_i = MLP(d_i-1) with Gaussian heads
  (mu_hat_i, var_hat_i); top-down, q(z_L) = N(mu_hat_L, var_hat_L) and
  q(z_i) = precision-weighted merge of (mu_hat_i, var_hat_i) with p(z_i | z_i+1);
  every KL analytic.
* VAE: q(z_i | z_i-1) bottom-up; the top KL analytic, the lower ones the one-sample
  estimate log q(z_i|.) - log p(z_i|z_i+1).
* ELBO = mean over the batch of log p(x|z_1) - beta * sum_i KL_i; Adam.

Parameter names mirror ours (``up_blocks.0.dense.0.weight`` ...), so ``copy_from`` can
load a LadderVAE/HierarchicalVAE's weights (Linear weights transposed, BatchNorm's
gamma/beta = weight/bias), and ``check_equivalence`` compares the two objectives,
gradients and one Adam step on the same weights and the same noise.

    python bench/torch_lvae.py        # parameter counts and the equivalence check
"""
import math
import os
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

PAPER_Z_DIMS = (64, 32, 16, 8, 4)
PAPER_HIDDEN = (512, 256, 128, 64, 32)
LOG_2PI = math.log(2 * math.pi)


class BatchNorm(nn.BatchNorm1d):
    """BatchNorm1d over the last axis; leading axes (samples, batch) are rows."""

    def __init__(self, n):
        super().__init__(n, eps=1e-4, momentum=0.1)

    def forward(self, x):
        if x.dim() == 2:
            return super().forward(x)
        return super().forward(x.reshape(-1, x.shape[-1])).reshape(x.shape)


class MLP(nn.Module):
    def __init__(self, n_in, sizes, batch_norm=True, slope=0.01):
        super().__init__()
        dims = [n_in] + list(sizes)
        self.dense = nn.ModuleList(nn.Linear(a, b, bias=not batch_norm)
                                   for a, b in zip(dims[:-1], dims[1:]))
        self.norms = nn.ModuleList(BatchNorm(n) for n in sizes) if batch_norm else None
        self.slope = slope

    def forward(self, x):
        for i, dense in enumerate(self.dense):
            x = dense(x)
            if self.norms is not None:
                x = self.norms[i](x)
            x = F.leaky_relu(x, self.slope)
        return x


class GaussianLayer(nn.Module):
    def __init__(self, n_in, n_out, batch_norm=True, var_eps=1e-8):
        super().__init__()
        self.mean_dense = nn.Linear(n_in, n_out, bias=not batch_norm)
        self.var_dense = nn.Linear(n_in, n_out, bias=not batch_norm)
        self.mean_norm = BatchNorm(n_out) if batch_norm else None
        self.var_norm = BatchNorm(n_out) if batch_norm else None
        self.var_eps = var_eps

    def forward(self, h):
        mu, pre_var = self.mean_dense(h), self.var_dense(h)
        if self.mean_norm is not None:
            mu, pre_var = self.mean_norm(mu), self.var_norm(pre_var)
        return mu, F.softplus(pre_var) + self.var_eps


# ---------------------------------------------------------------- Gaussian algebra
def merge(mu_hat, var_hat, mu_p, var_p):
    """Precision-weighted product of two diagonal Gaussians (same form as gaussian.py)."""
    s = 1 / (var_hat + var_p)
    return (mu_hat * var_p + mu_p * var_hat) * s, var_hat * var_p * s


def _log(v):
    """log of a tensor or of a Python number (a number stays on the host: no copy to
    the GPU and no synchronisation)."""
    return torch.log(v) if torch.is_tensor(v) else math.log(v)


def gaussian_kl(mu_q, var_q, mu_p=0.0, var_p=1.0):
    """KL(N(mu_q, var_q) || N(mu_p, var_p)) per element."""
    diff = mu_q - mu_p
    return 0.5 * (_log(var_p) - torch.log(var_q) + (var_q + diff * diff) / var_p - 1)


def log_normal(z, mu=0.0, var=1.0):
    """log N(z; mu, var) per element."""
    diff = z - mu
    return -0.5 * (LOG_2PI + _log(var) + diff * diff / var)


class _Model(nn.Module):
    """The generative model shared by both (as lvae.HierarchicalModel)."""
    kind = None

    def __init__(self, x_dim=784, z_dims=PAPER_Z_DIMS, hidden=PAPER_HIDDEN, n_dense=2,
                 batch_norm=True):
        super().__init__()
        self.x_dim, self.z_dims, self.n_layers = x_dim, tuple(z_dims), len(z_dims)
        L = self.n_layers
        block = lambda n_in, width: MLP(n_in, [width] * n_dense, batch_norm)
        self.prior_blocks = nn.ModuleList(block(z_dims[i + 1], hidden[i + 1]) for i in range(L - 1))
        self.prior_heads = nn.ModuleList(GaussianLayer(hidden[i + 1], z_dims[i], batch_norm)
                                         for i in range(L - 1))
        self.decoder = block(z_dims[0], hidden[0])
        self.output = nn.Linear(hidden[0], x_dim, bias=True)
        # bottom-up input widths: the LVAE's d_i = MLP(d_i-1), the VAE's q(z_i | z_i-1)
        up_in = (x_dim,) + tuple(hidden[:-1] if self.kind == "lvae" else z_dims[:-1])
        self.up_blocks = nn.ModuleList(block(up_in[i], hidden[i]) for i in range(L))
        self.up_heads = nn.ModuleList(GaussianLayer(hidden[i], z_dims[i], batch_norm)
                                      for i in range(L))
        self.normal = None  # a callable (shape, like) -> noise; None: torch.randn

    def _eps(self, shape, like):
        if self.normal is not None:
            return self.normal(shape, like)
        return torch.randn(shape, dtype=like.dtype, device=like.device)

    def sample(self, mu, var, samples):
        shape = mu.shape if mu.dim() == 3 else (samples,) + tuple(mu.shape)
        return mu + torch.sqrt(var) * self._eps(shape, mu)

    def prior(self, i, z_above):
        return self.prior_heads[i](self.prior_blocks[i](z_above))

    def forward(self, x, samples=1, kl="analytic"):
        """(log p(x|z_1) of shape (K, B), [KL_i of shape (K, B) or (B,)])."""
        z1, kls = self.infer(x, samples, kl)
        logits = self.output(self.decoder(z1))
        log_px = -F.binary_cross_entropy_with_logits(
            logits, x.expand_as(logits), reduction="none").sum(-1)
        return log_px, kls


class LadderVAE(_Model):
    kind = "lvae"

    def infer(self, x, samples, kl):
        h, up = x, []
        for block, head in zip(self.up_blocks, self.up_heads):
            h = block(h)
            up.append(head(h))
        top = self.n_layers - 1
        mu_q, var_q = up[top]
        z = self.sample(mu_q, var_q, samples)
        kls = [None] * self.n_layers
        kls[top] = self._kl(kl, z, mu_q, var_q)
        for i in range(top - 1, -1, -1):
            mu_p, var_p = self.prior(i, z)
            mu_q, var_q = merge(up[i][0], up[i][1], mu_p, var_p)
            z = self.sample(mu_q, var_q, samples)
            kls[i] = self._kl(kl, z, mu_q, var_q, mu_p, var_p)
        return z, [k.sum(-1) for k in kls]

    @staticmethod
    def _kl(kind, z, mu_q, var_q, mu_p=0.0, var_p=1.0):
        if kind == "analytic":
            return gaussian_kl(mu_q, var_q, mu_p, var_p)
        return log_normal(z, mu_q, var_q) - log_normal(z, mu_p, var_p)


class HierarchicalVAE(_Model):
    kind = "vae"

    def infer(self, x, samples, kl):
        zs, qs, below = [], [], x
        for block, head in zip(self.up_blocks, self.up_heads):
            mu_q, var_q = head(block(below))
            below = self.sample(mu_q, var_q, samples)
            zs.append(below)
            qs.append((mu_q, var_q))
        top = self.n_layers - 1
        kls = [None] * self.n_layers
        kls[top] = LadderVAE._kl(kl, zs[top], *qs[top])
        for i in range(top):
            mu_p, var_p = self.prior(i, zs[i + 1])
            kls[i] = log_normal(zs[i], *qs[i]) - log_normal(zs[i], mu_p, var_p)
        return zs[0], [k.sum(-1) for k in kls]


MODELS = {"lvae": LadderVAE, "vae": HierarchicalVAE}


def build_model(kind="lvae", **config):
    return MODELS[kind](**config)


def elbo(model, x, beta=1.0):
    """Mean over the batch of log p(x|z) - beta * sum_i KL_i (to be maximised)."""
    log_px, kls = model(x)
    kl_total = kls[0]
    for k in kls[1:]:
        kl_total = kl_total + k
    return (log_px - beta * kl_total).mean()


def n_parameters(model):
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- checks against ours
def _ours_to_torch_name(name):
    """'up_blocks.0.norms.1.gamma' -> 'up_blocks.0.norms.1.weight'."""
    head, _, leaf = name.rpartition(".")
    return head + "." + {"gamma": "weight", "beta": "bias"}.get(leaf, leaf)


def copy_from(torch_model, ours):
    """Load the weights and batch-norm buffers of our model into the torch model."""
    own = dict(torch_model.named_parameters())
    own.update(torch_model.named_buffers())
    done = set()
    with torch.no_grad():
        for name, t in ours.named_tensors():
            target = own[_ours_to_torch_name(name)]
            value = torch.from_numpy(np.array(np.asarray(t.data)))
            if value.dim() == 2:  # our Dense weight is (n_in, n_out); nn.Linear's (out, in)
                value = value.T
            if tuple(value.shape) != tuple(target.shape):
                raise ValueError(f"{name}: ours {tuple(value.shape)}, torch {tuple(target.shape)}")
            target.copy_(value.to(target.dtype))
            done.add(_ours_to_torch_name(name))
    missing = [n for n, _ in torch_model.named_parameters() if n not in done]
    if missing:
        raise KeyError(f"torch parameters not set from ours: {missing}")


def check_equivalence(kind="lvae", batch=64, seed=0):
    """Same weights, same noise, float64: compare ELBO, gradients, batch-norm running
    statistics and the parameters after one Adam step. Returns a dict of the largest
    relative differences (all should be ~1e-12)."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if repo not in sys.path:
        sys.path.insert(0, repo)
    import lvae
    from layers import Adam

    ours = lvae.build_model(kind, seed=seed).astype(np.float64)
    theirs = build_model(kind).double()
    copy_from(theirs, ours)
    rng = np.random.default_rng(seed)
    x = (rng.random((batch, 784)) < 0.3).astype(np.float64)

    draws = []

    class RecordingNoise(lvae.Noise):
        def normal(self, shape, like):
            eps = super().normal(shape, like)
            draws.append(eps)
            return eps

    obj, _ = lvae.elbo(ours, x, RecordingNoise(seed + 1), beta=0.7)
    replay = iter(draws)

    def normal(shape, like):
        eps = next(replay)
        assert tuple(eps.shape) == tuple(shape), (eps.shape, shape)
        return torch.from_numpy(eps).to(like)
    theirs.normal = normal
    t_obj = elbo(theirs, torch.from_numpy(x), beta=0.7)
    theirs.normal = None

    opt = Adam(ours.parameters(), lr=2e-3)
    opt.zero_grad()
    (-obj).backward()
    t_opt = torch.optim.Adam(theirs.parameters(), lr=2e-3, eps=1e-8)
    t_opt.zero_grad()
    (-t_obj).backward()

    def rel(a, b, floor=1e-30):
        """max |a - b| / max |b|; ``floor`` keeps a gradient that is zero up to
        rounding (e.g. of a batch norm's beta under a batch-centred input) from
        turning rounding noise into a large relative difference."""
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), floor))

    t_params = dict(theirs.named_parameters())
    t_params.update(theirs.named_buffers())

    def torch_value(name, grad=False):
        t = t_params[_ours_to_torch_name(name)]
        v = (t.grad if grad else t).detach().numpy()
        return v.T if v.ndim == 2 else v

    out = {"elbo": rel(obj.data, t_obj.item())}
    named = ours.named_parameters()
    scale = max(float(np.max(np.abs(p.grad))) for _, p in named)
    out["grad"] = max(rel(p.grad, torch_value(n, grad=True), 1e-6 * scale) for n, p in named)
    out["bn_running_stats"] = max(rel(t.data, torch_value(n)) for n, t in ours.named_tensors()
                                  if n.endswith(("running_mean", "running_var")))
    opt.step()
    t_opt.step()
    # Adam's first step moves every parameter by ~lr whatever the gradient's size, so a
    # gradient that is zero up to rounding moves it by an arbitrary +-lr: skip those
    tiny = {n for n, p in named if np.max(np.abs(p.grad)) < 1e-6 * scale}
    out["after_adam_step"] = max(rel(p.data, torch_value(n)) for n, p in named if n not in tiny)
    return out


if __name__ == "__main__":
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, repo)
    import lvae
    for kind in ("lvae", "vae"):
        ours = sum(p.size for p in lvae.build_model(kind).parameters())
        theirs = n_parameters(build_model(kind))
        print(f"{kind}: parameters ours {ours:,}, torch {theirs:,}: "
              f"{'same' if ours == theirs else 'DIFFERENT'}")
        print(f"  float64 equivalence, largest relative difference: {check_equivalence(kind)}")
