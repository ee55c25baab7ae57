"""Fused CuPy kernels: each replaces a chain of array operations by one GPU kernel.

    the Gaussian ops of gaussian.py   merge, KL, log-density, forward and backward
    batch norm (+ leaky ReLU)         for layers.batch_norm, three kernels per direction
    Adam                              the whole update of one parameter
    softplus, sigmoid                 for autograd.py

For the Gaussian ops, per element, with s = 1 / (var_hat + var_p) and the same forms as gaussian.py:

    merge        mu_q  = (mu_hat var_p + mu_p var_hat) s,    var_q = var_hat var_p s
    gaussian_kl  kl    = 0.5 (log var_p - log var_q + (var_q + (mu_q - mu_p)^2) / var_p - 1)
    log_normal   logp  = -0.5 (log 2pi + log var + (z - mu)^2 / var)

and the backward of each (the derivatives are written out in gaussian.py's docstrings).

Why fuse: these ops do a few flops per element, so on a GPU their time is memory
traffic. (A kernel is a function the GPU runs for every element in parallel; each CuPy
array operation launches one.) The plain CuPy code of merge_backward launches ~18
kernels, each reading its operands from GPU memory and writing a temporary array; the
fused kernel reads every input once, keeps the intermediates (s, s^2, the mean
difference) in registers and writes each gradient once.

Each kernel body is a module-level string of plain C (arithmetic, ?:, the C maths
functions log, exp, log1p, sqrt, fabs and tanh, and `(T)` casts),
where T is CuPy's type placeholder (float or double, taken from the arrays), so one body
serves float32 and float64 and float literals are cast to T (no silent double maths in
float32). tests/test_kernels.py and tests/test_kernel_bodies.py compile the same strings
with the C compiler and compare them with the NumPy code they replace (gaussian.py,
layers.py, autograd.py), so they are checked without a GPU; the GPU tests compare the
kernels themselves with that code.

Use ``active(array)`` to ask whether the fused path is taken (CuPy arrays while fusion
is on); ``set_fusion(False)`` runs the plain CuPy reference instead, for comparisons.
So each call takes one of three paths: NumPy arrays (the CPU) run the plain array code
of gaussian.py, layers.py and autograd.py and nothing in this file; CuPy arrays run the
kernels here; CuPy arrays with fusion off run that same plain code, on the GPU. On a
CPU this file can be skipped.
"""
import math

import numpy

try:  # the same optional import as autograd.py (which uses this module, so cannot be imported here)
    import cupy
except Exception:
    cupy = None

_fusion_enabled = True


def set_fusion(enabled):
    """Turn the fused GPU kernels on or off (the plain CuPy array code runs when off)."""
    global _fusion_enabled
    _fusion_enabled = bool(enabled)


def active(array):
    """True when ``array`` is a CuPy array and fusion is on: then the kernels below run."""
    return _fusion_enabled and cupy is not None and isinstance(array, cupy.ndarray)


# ----------------------------------------------------------------------------------
# Kernel bodies: plain C, one element per call; inputs are read-only, outputs assigned
# ----------------------------------------------------------------------------------
MERGE_FWD_BODY = """
const T s = (T)1 / (var_hat + var_p);
mu_q = (mu_hat * var_p + mu_p * var_hat) * s;
var_q = var_hat * var_p * s;
"""

MERGE_BWD_BODY = """
const T s = (T)1 / (var_hat + var_p);
const T s2 = s * s;
const T diff = mu_p - mu_hat;
g_mu_hat = g_mu * var_p * s;
g_var_hat = var_p * s2 * (g_mu * diff + g_var * var_p);
g_mu_p = g_mu * var_hat * s;
g_var_p = var_hat * s2 * (g_var * var_hat - g_mu * diff);
"""

KL_FWD_BODY = """
const T diff = mu_q - mu_p;
kl = (T)0.5 * (log(var_p) - log(var_q) + (var_q + diff * diff) / var_p - (T)1);
"""

KL_BWD_BODY = """
const T diff = mu_q - mu_p;
const T inv_p = (T)1 / var_p;
g_mu_q = g * diff * inv_p;
g_var_q = (T)0.5 * g * (inv_p - (T)1 / var_q);
g_mu_p = -g_mu_q;
g_var_p = (T)0.5 * g * inv_p * ((T)1 - (var_q + diff * diff) * inv_p);
"""

LOG_NORMAL_FWD_BODY = f"""
const T diff = z - mu;
logp = -(T)0.5 * ((T){math.log(2 * math.pi)!r} + log(var) + diff * diff / var);
"""

LOG_NORMAL_BWD_BODY = """
const T diff = z - mu;
const T inv = (T)1 / var;
g_z = -g * diff * inv;
g_mu = -g_z;
g_var = (T)0.5 * g * inv * (diff * diff * inv - (T)1);
"""

# name: (input parameters, output parameters, body), in CuPy's ElementwiseKernel syntax
KERNELS = {
    "lvae_merge_fwd": ("T mu_hat, T var_hat, T mu_p, T var_p", "T mu_q, T var_q",
                       MERGE_FWD_BODY),
    "lvae_merge_bwd": ("T g_mu, T g_var, T mu_hat, T var_hat, T mu_p, T var_p",
                       "T g_mu_hat, T g_var_hat, T g_mu_p, T g_var_p", MERGE_BWD_BODY),
    "lvae_kl_fwd": ("T mu_q, T var_q, T mu_p, T var_p", "T kl", KL_FWD_BODY),
    "lvae_kl_bwd": ("T g, T mu_q, T var_q, T mu_p, T var_p",
                    "T g_mu_q, T g_var_q, T g_mu_p, T g_var_p", KL_BWD_BODY),
    "lvae_log_normal_fwd": ("T z, T mu, T var", "T logp", LOG_NORMAL_FWD_BODY),
    "lvae_log_normal_bwd": ("T g, T z, T mu, T var", "T g_z, T g_mu, T g_var",
                            LOG_NORMAL_BWD_BODY),
}

_built = {}  # name -> CuPy kernel, made on first use (CuPy compiles it per dtype on first call)


def _elementwise(name, in_params, out_params, body):
    """The ElementwiseKernel called ``name``, built once."""
    if name not in _built:
        _built[name] = cupy.ElementwiseKernel(in_params, out_params, body, name)
    return _built[name]


def _reduction(name, in_params, out_params, map_expr, post_expr):
    """The ReductionKernel called ``name`` (a sum of map_expr), built once."""
    if name not in _built:
        _built[name] = cupy.ReductionKernel(in_params, out_params, map_expr, "a + b", post_expr,
                                            "0", name)
    return _built[name]


def _kernel(name):
    """The Gaussian-op kernel called ``name`` (see KERNELS)."""
    return _elementwise(name, *KERNELS[name])


def _promoted(*args):
    """The arguments with every array cast to one dtype, the one NumPy would promote them
    to (float32 with float64 gives float64); numbers and None pass unchanged. Every kernel
    parameter has type T, and CuPy refuses arrays of two dtypes for one T."""
    dtypes = {a.dtype for a in args if isinstance(a, cupy.ndarray)}
    if len(dtypes) == 1 and next(iter(dtypes)).kind == "f":
        return args  # the usual case, on the hot path: one float dtype, nothing to cast
    dtype = numpy.result_type(*dtypes)
    if dtype.kind != "f":
        dtype = numpy.dtype(numpy.float64)
    return [a.astype(dtype, copy=False) if isinstance(a, cupy.ndarray) else a for a in args]


def _call(name, *args):
    """Run a kernel on arrays that broadcast together, promoted to one dtype (numbers take
    it); the outputs have the broadcast shape of all inputs."""
    return _kernel(name)(*_promoted(*args))


# ----------------------------------------------------------------------------------
# The same functions and signatures as the references in gaussian.py
# ----------------------------------------------------------------------------------
def merge_forward(mu_hat, var_hat, mu_p, var_p):
    """(mu_q, var_q) of the precision-weighted merge, one kernel."""
    return _call("lvae_merge_fwd", mu_hat, var_hat, mu_p, var_p)


def merge_backward(g_mu, g_var, mu_hat, var_hat, mu_p, var_p):
    """Gradients for (mu_hat, var_hat, mu_p, var_p); g_mu or g_var may be None (zero)."""
    g_mu = 0.0 if g_mu is None else g_mu
    g_var = 0.0 if g_var is None else g_var
    return _call("lvae_merge_bwd", g_mu, g_var, mu_hat, var_hat, mu_p, var_p)


def kl_forward(mu_q, var_q, mu_p, var_p):
    """KL(N(mu_q, var_q) || N(mu_p, var_p)) per element, one kernel."""
    return _call("lvae_kl_fwd", mu_q, var_q, mu_p, var_p)


def kl_backward(g, mu_q, var_q, mu_p, var_p):
    """Gradients of the KL for (mu_q, var_q, mu_p, var_p), one kernel."""
    return _call("lvae_kl_bwd", g, mu_q, var_q, mu_p, var_p)


def log_normal_forward(z, mu, var):
    """log N(z; mu, var) per element, one kernel."""
    return _call("lvae_log_normal_fwd", z, mu, var)


def log_normal_backward(g, z, mu, var):
    """Gradients of log N(z; mu, var) for (z, mu, var), one kernel."""
    return _call("lvae_log_normal_bwd", g, z, mu, var)


# ----------------------------------------------------------------------------------
# Adam: the whole update of one parameter in one kernel (layers.Adam uses it on a GPU)
# ----------------------------------------------------------------------------------
ADAM_BODY = """
const T g = grad * scale;
m = b1 * m + one_minus_b1 * g;
v = b2 * v + one_minus_b2 * g * g;
p -= step_size * m / (sqrt(v) + eps_hat);
"""


def adam_update(p, grad, m, v, scale, b1, b2, step_size, eps_hat):
    """In place: m = b1 m + (1-b1) g, v = b2 v + (1-b2) g^2, p -= step_size m / (sqrt(v) + eps_hat),
    with g = scale * grad; the twelve array operations of the plain code (thirteen with
    clipping) in one pass.

    1 - b1 and 1 - b2 are computed here, in double, as the plain code does: in float32
    inside the kernel, 1 - 0.999 would be 1 - 0.99900001 = 0.00099998713, 1.3e-5 off
    relative to 0.001."""
    kernel = _elementwise("lvae_adam_update", "T grad, T scale, T b1, T one_minus_b1, T b2, "
                          "T one_minus_b2, T step_size, T eps_hat", "T p, T m, T v", ADAM_BODY)
    if grad.dtype != p.dtype:  # float64 data through a float32 layer: cast, as NumPy's p -= g
        grad = grad.astype(p.dtype)
    kernel(grad, scale, b1, 1 - b1, b2, 1 - b2, step_size, eps_hat, p, m, v)


# ----------------------------------------------------------------------------------
# Batch norm (+ leaky ReLU): layers.batch_norm uses these on a GPU. The plain CuPy code
# takes about twenty kernel launches per direction; these take three.
# slope = 1 means no leaky ReLU (then max(y, y * slope) = y and its derivative is 1).
# ----------------------------------------------------------------------------------
BATCH_NORM_FWD_BODY = """
xhat = (x - mean) / sqrt(var + eps);
const T y = xhat * gamma + beta;
out = y > (T)0 ? y : y * slope;
"""

BATCH_NORM_BWD_BODY = """
const T gy = out > (T)0 ? g : g * slope;
const T scale = gamma / sqrt(var + eps);
dx = training ? scale * (gy - dbeta / n - xhat * dgamma / n) : scale * gy;
"""

RUNNING_AVERAGE_BODY = """
running_mean = ((T)1 - m) * running_mean + m * mean;
running_var = ((T)1 - m) * running_var + m * unbias * var;
"""

# the leaky ReLU's derivative applied to g, as the reductions below use it
GRAD_THROUGH_LEAKY = "(out > (T)0 ? g : g * slope)"

# The column sums of batch norm, as CuPy ReductionKernels over the rows (axis 0):
# name: (input parameters, output parameter, the term summed (a C expression), the
# output from the sum `a`). tests/test_kernel_bodies.py compiles these expressions too.
BATCH_NORM_REDUCTIONS = {
    "lvae_bn_var": ("T x, T mean, T n", "T var", "(x - mean) * (x - mean)", "var = a / n"),
    "lvae_bn_dbeta": ("T g, T out, T slope", "T s", GRAD_THROUGH_LEAKY, "s = a"),
    "lvae_bn_dgamma": ("T g, T out, T xhat, T slope", "T s", GRAD_THROUGH_LEAKY + " * xhat",
                       "s = a"),
}


def _column_sum(name):
    """The batch-norm ReductionKernel ``name`` of BATCH_NORM_REDUCTIONS."""
    return _reduction(name, *BATCH_NORM_REDUCTIONS[name])


def batch_norm_forward(rows, gamma, beta, eps, mean=None, var=None, slope=None):
    """Fused version of layers.batch_norm_forward: (out, xhat, mean, var)."""
    rows, gamma, beta, mean, var = _promoted(rows, gamma, beta, mean, var)
    if mean is None:
        mean = rows.mean(axis=0)
        var = _column_sum("lvae_bn_var")(rows, mean, len(rows), axis=0)
    forward = _elementwise("lvae_bn_fwd", "T x, T mean, T var, T gamma, T beta, T eps, T slope",
                           "T xhat, T out", BATCH_NORM_FWD_BODY)
    xhat, out = forward(rows, mean, var, gamma, beta, eps, 1.0 if slope is None else slope)
    return out, xhat, mean, var


def batch_norm_backward(g, out, xhat, gamma, var, eps, training, slope=None):
    """Fused version of layers.batch_norm_backward: (dx, dgamma, dbeta)."""
    g, out, xhat, gamma, var = _promoted(g, out, xhat, gamma, var)
    slope = 1.0 if slope is None else slope
    dbeta = _column_sum("lvae_bn_dbeta")(g, out, slope, axis=0)
    dgamma = _column_sum("lvae_bn_dgamma")(g, out, xhat, slope, axis=0)
    backward = _elementwise("lvae_bn_bwd", "T g, T out, T xhat, T gamma, T var, T eps, T dbeta, "
                            "T dgamma, T n, T slope, bool training", "T dx", BATCH_NORM_BWD_BODY)
    dx = backward(g, out, xhat, gamma, var, eps, dbeta, dgamma, len(g), slope, training)
    return dx, dgamma, dbeta


def running_average(mean, var, m, unbias, running_mean, running_var):
    """running = (1 - m) running + m batch (variance times unbias), in place, one kernel."""
    kernel = _elementwise("lvae_bn_running", "T mean, T var, T m, T unbias",
                          "T running_mean, T running_var", RUNNING_AVERAGE_BODY)
    if mean.dtype != running_mean.dtype:  # float64 data through a float32 layer: cast, as NumPy does
        mean, var = mean.astype(running_mean.dtype), var.astype(running_mean.dtype)
    kernel(mean, var, m, unbias, running_mean, running_var)


# ----------------------------------------------------------------------------------
# Softplus and sigmoid (autograd.py uses these on a GPU): one kernel each instead of
# six array operations (softplus) and four (sigmoid)
# ----------------------------------------------------------------------------------
SOFTPLUS_BODY = "y = (x > (T)0 ? x : (T)0) + log1p(exp(-fabs(x)));"
SIGMOID_BODY = "y = (T)0.5 * ((T)1 + tanh((T)0.5 * x));"


def softplus(x):
    """log(1 + e^x) = max(x, 0) + log1p(e^-|x|), one kernel."""
    return _elementwise("lvae_softplus", "T x", "T y", SOFTPLUS_BODY)(x)


def sigmoid(x):
    """1 / (1 + e^-x) = (1 + tanh(x/2)) / 2, one kernel."""
    return _elementwise("lvae_sigmoid", "T x", "T y", SIGMOID_BODY)(x)
