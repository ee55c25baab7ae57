"""Diagonal-Gaussian operations of the LVAE, each one autograd op.

    merge        the precision-weighted merge of two Gaussians (the LVAE's key step)
    gaussian_kl  KL( N(mu_q, var_q) || N(mu_p, var_p) ), analytic, elementwise
    log_normal   log N(z; mu, var), elementwise
    reparameterize  z = mu + sqrt(var) * eps

Variances (not log-variances) are passed around: the model's heads give
var = softplus(.) + eps, which is what the merge needs (precisions 1/var).
Inputs may be Tensors, plain arrays or numbers; arrays and numbers are constants
(no gradient flows to them), so ``gaussian_kl(np.zeros(3), np.ones(3))`` just works.

For each op, ``*_forward`` and ``*_backward`` below are plain array code that works on
NumPy and CuPy arrays alike. They are the specification. On a GPU, kernels.py has fused
versions of the same functions (one CUDA kernel each instead of a dozen array
operations); they are used when ``kernels.active(array)`` says so and are tested
against these. Backward functions return full-shape gradients; the op reduces them
with ``sum_to`` where an input was broadcast (e.g. one mu_hat shared by K samples).
"""
import math
import numbers

import numpy as np

from autograd import (Tensor, as_tensor, check_same_device, get_array_module, record,
                      record_multi, sum_to)
import kernels

LOG_2PI = math.log(2 * math.pi)


# ----------------------------------------------------------------------------------
# Reference array code
# ----------------------------------------------------------------------------------
def merge_forward(mu_hat, var_hat, mu_p, var_p):
    """Product of N(mu_hat, var_hat) and N(mu_p, var_p), renormalised:

        var_q = 1 / (1/var_hat + 1/var_p) = var_hat var_p / (var_hat + var_p)
        mu_q  = (mu_hat/var_hat + mu_p/var_p) var_q = (mu_hat var_p + mu_p var_hat) / (var_hat + var_p)

    The right-hand forms need one reciprocal, s = 1 / (var_hat + var_p), instead of three,
    and the backward reuses s. They also keep the right limit where a variance goes to 0
    (mu_q -> mu_hat as var_hat -> 0), where the left-hand forms compute inf * 0; with the
    model's variances (1e-8 and up) both forms stay finite.
    """
    s = 1 / (var_hat + var_p)
    return (mu_hat * var_p + mu_p * var_hat) * s, var_hat * var_p * s


def merge_backward(g_mu, g_var, mu_hat, var_hat, mu_p, var_p):
    """Gradients of merge with s = 1/(var_hat + var_p):

        d mu_q/d mu_hat = var_p s          d mu_q/d mu_p = var_hat s
        d mu_q/d var_hat = var_p (mu_p - mu_hat) s^2
        d mu_q/d var_p   = var_hat (mu_hat - mu_p) s^2
        d var_q/d var_hat = var_p^2 s^2    d var_q/d var_p = var_hat^2 s^2
    g_mu or g_var may be None (that output got no gradient).

    Returns the gradients of (mu_hat, var_hat, mu_p, var_p), in that order. Each variance
    feeds both outputs, so the chain rule adds two terms: for var_hat,
    g_mu * d mu_q/d var_hat + g_var * d var_q/d var_hat = var_p s^2 (g_mu diff + g_var var_p)
    with diff = mu_p - mu_hat. (mu_hat and mu_p do not enter var_q: one term each.)
    """
    xp = get_array_module(mu_hat)
    s = 1 / (var_hat + var_p)
    g_mu = xp.zeros_like(s) if g_mu is None else g_mu  # an output that got no gradient
    g_var = xp.zeros_like(s) if g_var is None else g_var
    s2 = s * s
    diff = mu_p - mu_hat
    return (g_mu * var_p * s,
            var_p * s2 * (g_mu * diff + g_var * var_p),
            g_mu * var_hat * s,
            var_hat * s2 * (g_var * var_hat - g_mu * diff))


def kl_forward(mu_q, var_q, mu_p, var_p):
    """KL(N(mu_q, var_q) || N(mu_p, var_p)) per element:
        0.5 (log var_p - log var_q + (var_q + (mu_q - mu_p)^2) / var_p - 1)
    """
    xp = get_array_module(mu_q)
    diff = mu_q - mu_p
    return 0.5 * (xp.log(var_p) - xp.log(var_q) + (var_q + diff * diff) / var_p - 1)


def kl_backward(g, mu_q, var_q, mu_p, var_p):
    """d/d mu_q = (mu_q - mu_p)/var_p = -d/d mu_p,   d/d var_q = 0.5 (1/var_p - 1/var_q),
    d/d var_p = 0.5 (1/var_p - (var_q + (mu_q - mu_p)^2) / var_p^2)."""
    diff = mu_q - mu_p
    inv_p = 1 / var_p
    g_mu = g * diff * inv_p
    return (g_mu,
            0.5 * g * (inv_p - 1 / var_q),
            -g_mu,
            0.5 * g * inv_p * (1 - (var_q + diff * diff) * inv_p))


def log_normal_forward(z, mu, var):
    """log N(z; mu, var) = -0.5 (log 2pi + log var + (z - mu)^2 / var) per element."""
    xp = get_array_module(z)
    diff = z - mu
    return -0.5 * (LOG_2PI + xp.log(var) + diff * diff / var)


def log_normal_backward(g, z, mu, var):
    """d/dz = -(z - mu)/var = -d/dmu,   d/dvar = 0.5 ((z - mu)^2/var - 1) / var."""
    diff = z - mu
    inv = 1 / var
    g_z = -g * diff * inv
    return g_z, -g_z, 0.5 * g * inv * (diff * diff * inv - 1)


# ----------------------------------------------------------------------------------
# The ops
# ----------------------------------------------------------------------------------
def _implementation(name, array):
    """The fused kernel when the data is on the GPU and fusion is on, else the reference."""
    if kernels.active(array):
        return getattr(kernels, name + "_forward"), getattr(kernels, name + "_backward")
    return globals()[name + "_forward"], globals()[name + "_backward"]


def _reduce(grads, inputs):
    """Sum each gradient back to its input's shape; None for inputs without grad."""
    return tuple(sum_to(g, t.shape) if t.requires_grad else None for g, t in zip(grads, inputs))


def _tensors(op, **inputs):
    """The inputs of ``op`` as Tensors. Tensors pass through; a NumPy or CuPy array
    becomes a constant (no gradient flows to it), as ``tensor()`` makes it; a number
    becomes a constant of the dtype of the first Tensor (or, if there is none, of the
    first array; float64 if all the inputs are numbers: that is what a Python float is). Anything else, or arrays on
    different devices (NumPy and CuPy), is a TypeError; shapes that do not broadcast
    together are a ValueError that names the op and every input's shape."""
    like = None
    for name, x in inputs.items():
        if isinstance(x, Tensor) or isinstance(x, get_array_module(x).ndarray):
            if like is None or (isinstance(x, Tensor) and not isinstance(like, Tensor)):
                like = x
        elif isinstance(x, bool) or not isinstance(x, numbers.Real):
            raise TypeError(f"{op}: {name} must be a Tensor, an array or a number, not "
                            f"{type(x).__name__}")
    if like is None:  # numbers only
        like = Tensor(np.asarray(next(iter(inputs.values())), dtype=np.float64))
    check_same_device(op, *inputs.values())
    like = as_tensor(like)
    tensors = tuple(as_tensor(x, like=like) for x in inputs.values())
    try:  # shapes only, no data is read: checked here, before either the reference code
        np.broadcast_shapes(*(t.shape for t in tensors))  # or a fused GPU kernel runs
    except ValueError:
        shapes = ", ".join(f"{name} {t.shape}" for name, t in zip(inputs, tensors))
        raise ValueError(f"{op}: the input shapes do not broadcast together: {shapes}") from None
    return tensors


def merge(mu_hat, var_hat, mu_p, var_p):
    """Precision-weighted merge: the Gaussian proportional to
    N(mu_hat, var_hat) N(mu_p, var_p). Returns (mu_q, var_q) as Tensors.

    In the LVAE, (mu_hat, var_hat) come from the bottom-up pass over x and (mu_p, var_p)
    from the generative top-down pass; the posterior leans towards whichever is more
    certain (has the larger precision 1/var).
    """
    inputs = _tensors("merge", mu_hat=mu_hat, var_hat=var_hat, mu_p=mu_p, var_p=var_p)
    forward, backward = _implementation("merge", inputs[0].data)
    # both outputs get the full broadcast shape (views, no copies). var_q depends on the
    # variances only, so it could come out smaller than mu_q (variances shared by a batch);
    # its gradient, already summed over the batch, would then be broadcast against mu_q's in
    # the backward formulas and summed over the batch again by _reduce: counted B times.
    # (gaussian_kl and log_normal have one output: nothing to align.)
    xp = get_array_module(inputs[0].data)
    shape = np.broadcast_shapes(*(t.shape for t in inputs))
    datas = [xp.broadcast_to(t.data, shape) for t in inputs]
    mu_q, var_q = forward(*datas)
    # gs: the gradients of (mu_q, var_q), collected by record_multi's joint node
    return tuple(record_multi((mu_q, var_q), inputs,
                              lambda gs: _reduce(backward(gs[0], gs[1], *datas), inputs)))


def gaussian_kl(mu_q, var_q, mu_p=0.0, var_p=1.0):
    """KL( N(mu_q, var_q) || N(mu_p, var_p) ) elementwise (default p: the standard normal).

    0.5 (log var_p - log var_q + (var_q + (mu_q - mu_p)^2) / var_p - 1); sum over the
    units of a layer for that layer's KL term.
    """
    inputs = _tensors("gaussian_kl", mu_q=mu_q, var_q=var_q, mu_p=mu_p, var_p=var_p)
    forward, backward = _implementation("kl", inputs[0].data)
    datas = [t.data for t in inputs]
    return record(forward(*datas), inputs, lambda g: _reduce(backward(g, *datas), inputs))


def log_normal(z, mu=0.0, var=1.0):
    """log N(z; mu, var) elementwise (default: the standard normal)."""
    inputs = _tensors("log_normal", z=z, mu=mu, var=var)
    forward, backward = _implementation("log_normal", inputs[0].data)
    datas = [t.data for t in inputs]
    return record(forward(*datas), inputs, lambda g: _reduce(backward(g, *datas), inputs))


def reparameterize(mu, var, eps):
    """A sample z = mu + sqrt(var) * eps of N(mu, var), differentiable in mu and var
    (eps ~ N(0, I) is drawn outside). dz/dmu = 1, dz/dvar = eps / (2 sqrt(var))."""
    mu, var, eps = _tensors("reparameterize", mu=mu, var=var, eps=eps)
    eps = eps.data  # noise: no gradient flows to it
    xp = get_array_module(mu.data)
    std = xp.sqrt(var.data)
    z = mu.data + std * eps
    inputs = (mu, var)
    return record(z, inputs, lambda g: _reduce((g, g * eps * 0.5 / std), inputs))
