"""Tests of the fused kernels (kernels.py) against the NumPy code they replace.

Without a GPU: every Gaussian kernel body (plain C with the type placeholder T) is
compiled with the machine's C compiler, once with T = float and once with T = double,
into a small shared library with one loop per kernel, and compared with gaussian.py's
*_forward / *_backward on random and extreme inputs. Then all the Python wrappers of
kernels.py are run on NumPy arrays, through a stand-in for CuPy (tests/cupy_standin.py)
that compiles whatever ElementwiseKernel or ReductionKernel it is given as C: with it,
gaussian.py, layers.py (batch norm, its running averages, Adam) and autograd.py
(softplus, sigmoid) take their fused paths on the CPU, and are compared with the same
code with fusion off. So a wrapper that passes arguments in the wrong order, returns the
wrong output or sums over the wrong axis fails here, not only on a GPU.

With a GPU (marker `gpu`): the fused ops against the plain CuPy path (fusion on vs off)
and against finite differences.

Tolerances: a rounding error is relative to the size of the terms a result is summed
from, not to the result (the KL of two close Gaussians is a small difference of large
terms). So each output is compared as |fused - reference| <= rtol * scale, with `scale`
the sum of the absolute values of its terms (SCALES below; for batch norm and Adam the
largest value of the array, see assert_fused_matches_plain): rtol 1e-12 in float64,
1e-5 in float32.
"""
import ctypes
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
for folder in (ROOT, TESTS):  # the project's modules, and cupy_standin next to this file
    if folder not in sys.path:
        sys.path.insert(0, folder)

import autograd  # noqa: E402
import cupy_standin  # noqa: E402
import gaussian  # noqa: E402
import kernels  # noqa: E402
import layers  # noqa: E402
from autograd import Tensor  # noqa: E402
from conftest import requires_cuda  # noqa: E402

RTOL = {np.float32: 1e-5, np.float64: 1e-12}
DTYPES = [np.float32, np.float64]

# the function that runs each kernel; gaussian.py's function of that name is its reference
FUNCTION = {
    "lvae_merge_fwd": "merge_forward",
    "lvae_merge_bwd": "merge_backward",
    "lvae_kl_fwd": "kl_forward",
    "lvae_kl_bwd": "kl_backward",
    "lvae_log_normal_fwd": "log_normal_forward",
    "lvae_log_normal_bwd": "log_normal_backward",
}
REFERENCE = {name: getattr(gaussian, f) for name, f in FUNCTION.items()}


def _merge_fwd_scale(mu_hat, var_hat, mu_p, var_p):
    s = 1 / (var_hat + var_p)
    return (abs(mu_hat) * var_p + abs(mu_p) * var_hat) * s, var_hat * var_p * s


def _merge_bwd_scale(g_mu, g_var, mu_hat, var_hat, mu_p, var_p):
    s = 1 / (var_hat + var_p)
    g_diff = abs(g_mu * (mu_p - mu_hat))
    return (abs(g_mu) * var_p * s, var_p * s * s * (g_diff + abs(g_var) * var_p),
            abs(g_mu) * var_hat * s, var_hat * s * s * (g_diff + abs(g_var) * var_hat))


def _kl_fwd_scale(mu_q, var_q, mu_p, var_p):
    diff = mu_q - mu_p
    return (0.5 * (abs(np.log(var_p)) + abs(np.log(var_q)) + (var_q + diff * diff) / var_p + 1),)


def _kl_bwd_scale(g, mu_q, var_q, mu_p, var_p):
    diff = mu_q - mu_p
    g_mu = abs(g * diff) / var_p
    return (g_mu, 0.5 * abs(g) * (1 / var_p + 1 / var_q), g_mu,
            0.5 * abs(g) / var_p * (1 + (var_q + diff * diff) / var_p))


def _log_normal_fwd_scale(z, mu, var):
    diff = z - mu
    return (0.5 * (gaussian.LOG_2PI + abs(np.log(var)) + diff * diff / var),)


def _log_normal_bwd_scale(g, z, mu, var):
    diff = z - mu
    g_z = abs(g * diff) / var
    return g_z, g_z, 0.5 * abs(g) / var * (diff * diff / var + 1)


# per output: the sum of the absolute values of the terms it is computed from (float64)
SCALES = {
    "lvae_merge_fwd": _merge_fwd_scale,
    "lvae_merge_bwd": _merge_bwd_scale,
    "lvae_kl_fwd": _kl_fwd_scale,
    "lvae_kl_bwd": _kl_bwd_scale,
    "lvae_log_normal_fwd": _log_normal_fwd_scale,
    "lvae_log_normal_bwd": _log_normal_bwd_scale,
}


def param_names(params):
    """'T mu_hat, T var_hat' -> ['mu_hat', 'var_hat']."""
    return [p.split()[-1] for p in params.split(",")]


def as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def assert_close(name, dtype, inputs, got, expected, what=""):
    """Each output of kernel `name` within RTOL[dtype] * scale of the reference."""
    got, expected = as_tuple(got), as_tuple(expected)
    scales = SCALES[name](*[np.asarray(x, dtype=np.float64) for x in inputs])
    out_names = param_names(kernels.KERNELS[name][1])
    assert len(got) == len(expected) == len(out_names)
    for out_name, g, e, scale in zip(out_names, got, expected, scales):
        g, e = autograd.to_numpy(g), autograd.to_numpy(e)
        assert g.dtype == dtype, f"{name}.{out_name}{what}: dtype {g.dtype}, expected {dtype}"
        g, e, scale = np.broadcast_arrays(g.astype(np.float64), e.astype(np.float64), scale)
        assert np.all(np.isfinite(g)), f"{name}.{out_name}{what}: non-finite values"
        err = np.abs(g - e)
        bound = RTOL[dtype] * scale + np.finfo(dtype).tiny
        if not np.all(err <= bound):
            j = np.unravel_index(np.argmax(err / bound), err.shape)
            raise AssertionError(
                f"{name}.{out_name}{what} ({np.dtype(dtype).name}): at {tuple(map(int, j))} "
                f"the kernel gives {g[j]!r}, the reference {e[j]!r}; expected them within "
                f"{RTOL[dtype]} * {scale[j]:.3g} (the size of the terms)")


# ----------------------------------------------------------------------------------
# Random inputs, chosen by the parameter's name
# ----------------------------------------------------------------------------------
VARIANCE_RANGES = {"moderate": (1e-1, 1e1), "wide": (1e-6, 1e6), "extreme": (1e-8, 1e8)}


def draw(name, n, regime, rng):
    """Variances log-uniform over the regime's range; means of both signs from 1e-3 to
    1e2 (and some exact zeros); gradients standard normal."""
    if name.startswith("var"):
        low, high = VARIANCE_RANGES[regime]
        return np.exp(rng.uniform(math.log(low), math.log(high), n))
    if name.startswith("g"):
        return rng.standard_normal(n)
    means = rng.choice([-1.0, 1.0], n) * np.exp(rng.uniform(math.log(1e-3), math.log(1e2), n))
    means[rng.random(n) < 0.05] = 0.0
    return means


def draw_inputs(kernel_name, dtype, regime, n=3000, seed=0):
    """Inputs for a kernel, rounded to dtype. A tenth of the elements are ties (equal
    variances and equal means: a merge of twins, KL = 0, z = mu) to probe cancellation."""
    rng = np.random.default_rng(seed)
    names = param_names(kernels.KERNELS[kernel_name][0])
    values = {name: draw(name, n, regime, rng) for name in names}
    tie = rng.random(n) < 0.1
    for a, b in [("var_hat", "var_p"), ("var_q", "var_p"), ("mu_hat", "mu_p"),
                 ("mu_q", "mu_p"), ("z", "mu")]:
        if a in values and b in values:
            values[a][tie] = values[b][tie]
    return [values[name].astype(dtype) for name in names]


# ----------------------------------------------------------------------------------
# The kernel bodies compiled with the C compiler
# ----------------------------------------------------------------------------------
def c_source(ctype):
    """One C function per kernel: loop over n elements, read the inputs, run the body,
    write the outputs. <tgmath.h> makes log(float) call logf, like CUDA's C++ overloads."""
    lines = ["#include <tgmath.h>", f"typedef {ctype} T;", ""]
    for name, (in_params, out_params, body) in kernels.KERNELS.items():
        ins, outs = param_names(in_params), param_names(out_params)
        args = ", ".join(["long n"] + [f"const T *in_{p}" for p in ins]
                         + [f"T *out_{p}" for p in outs])
        lines += [f"void {name}({args}) {{",
                  "    for (long idx = 0; idx < n; ++idx) {"]
        lines += [f"        const T {p} = in_{p}[idx];" for p in ins]
        lines += [f"        T {p};" for p in outs]
        lines += ["        {", body, "        }"]
        lines += [f"        out_{p}[idx] = {p};" for p in outs]
        lines += ["    }", "}", ""]
    return "\n".join(lines)


find_c_compiler = cupy_standin.find_c_compiler


@pytest.fixture(scope="session")
def c_kernels(tmp_path_factory):
    """{np.float32: library, np.float64: library} of the kernel bodies built with cc.

    -Wdouble-promotion -Werror: in the float build a bare double literal (0.5 instead
    of (T)0.5) is an error, as it would silently turn the float32 GPU kernel into
    double maths.
    """
    compiler = find_c_compiler()
    if compiler is None:
        pytest.skip("no C compiler found (set CC, or install gcc/clang) to compile the "
                    "kernel bodies on the CPU")
    folder = tmp_path_factory.mktemp("kernels_c")
    libraries = {}
    for dtype, ctype in [(np.float32, "float"), (np.float64, "double")]:
        source = folder / f"kernels_{ctype}.c"
        library = folder / f"kernels_{ctype}.so"
        source.write_text(c_source(ctype))
        command = [compiler, *cupy_standin.COMPILE_FLAGS, "-o", str(library), str(source),
                   "-lm"]
        result = subprocess.run(command, capture_output=True, text=True)
        assert result.returncode == 0, (f"the kernel bodies do not compile as C with T = "
                                        f"{ctype}:\n{' '.join(command)}\n{result.stderr}")
        lib = ctypes.CDLL(str(library))
        pointer = np.ctypeslib.ndpointer(dtype, flags="C_CONTIGUOUS")
        for name, (in_params, out_params, _) in kernels.KERNELS.items():
            n_args = len(param_names(in_params)) + len(param_names(out_params))
            getattr(lib, name).argtypes = [ctypes.c_long] + [pointer] * n_args
            getattr(lib, name).restype = None
        libraries[dtype] = lib
    return libraries


def run_c(libraries, name, *inputs):
    """Kernel `name` on arrays of one dtype, broadcast like an ElementwiseKernel."""
    dtype = inputs[0].dtype.type
    arrays = [np.ascontiguousarray(a) for a in np.broadcast_arrays(*inputs)]
    outs = [np.empty(arrays[0].shape, dtype) for _ in param_names(kernels.KERNELS[name][1])]
    getattr(libraries[dtype], name)(arrays[0].size, *arrays, *outs)
    return tuple(outs) if len(outs) > 1 else outs[0]


@pytest.mark.parametrize("regime", ["moderate", "wide", "extreme"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("name", list(kernels.KERNELS))
def test_c_kernel_matches_numpy_reference(c_kernels, name, dtype, regime):
    inputs = draw_inputs(name, dtype, regime)
    got = run_c(c_kernels, name, *inputs)
    expected = REFERENCE[name](*inputs)
    assert_close(name, dtype, inputs, got, expected, what=f" [{regime} variances]")


# ----------------------------------------------------------------------------------
# The Python wrappers of kernels.py, with a stand-in for CuPy that compiles the kernels
# ----------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def c_builder(request, tmp_path_factory):
    """Compiles the stand-in's kernels. The libraries are kept in pytest's cache folder
    (.pytest_cache/d/cupy_standin, named by a hash of source, compiler and flags), so
    only a changed kernel is compiled again in a later run; with the cache turned off
    (-p no:cacheprovider) they go to a temporary folder, compiled once per session."""
    compiler = find_c_compiler()
    if compiler is None:
        pytest.skip("no C compiler found (set CC, or install gcc/clang) to run the fused "
                    "kernels on the CPU")
    cache = getattr(request.config, "cache", None)
    folder = (cache.mkdir("cupy_standin") if cache is not None
              else tmp_path_factory.mktemp("standin_kernels"))
    return cupy_standin.CBuilder(folder, compiler)


@pytest.fixture
def fake_cupy(c_builder, monkeypatch):
    """kernels.py sees a 'cupy' whose arrays are NumPy arrays and whose ElementwiseKernel
    and ReductionKernel compile the kernel strings as C (tests/cupy_standin.py): so
    active(numpy_array) is True and every fused path runs, through kernels.py's own
    wrappers. Fusion is on at the start and restored afterwards."""
    fake = cupy_standin.CupyStandIn(c_builder)
    monkeypatch.setattr(kernels, "cupy", fake)
    monkeypatch.setattr(kernels, "_built", {})
    previous = kernels._fusion_enabled
    kernels.set_fusion(True)
    yield fake
    kernels.set_fusion(previous)


def broadcast_inputs(dtype, seed=1, K=3, B=4, d=5):
    """merge inputs as in the LVAE with K samples: mu_hat, var_hat (B, d) from the
    bottom-up pass, mu_p, var_p (K, B, d) from each sample's top-down pass."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((B, d)).astype(dtype),
            rng.uniform(0.1, 3.0, (B, d)).astype(dtype),
            rng.standard_normal((K, B, d)).astype(dtype),
            rng.uniform(0.1, 3.0, (K, B, d)).astype(dtype))


def test_active_without_cupy():
    """Here (no CuPy, or CuPy without a device) the fused path is never taken."""
    assert not kernels.active(np.zeros(3)), "active() must be False for NumPy arrays"
    assert gaussian._implementation("merge", np.zeros(3)) == (
        gaussian.merge_forward, gaussian.merge_backward)


def test_set_fusion_switches_active(fake_cupy):
    x = np.zeros(3)
    assert kernels.active(x)
    kernels.set_fusion(False)
    assert not kernels.active(x), "set_fusion(False) must turn the fused path off"
    kernels.set_fusion(True)
    assert kernels.active(x)


def test_kernels_are_built_once_and_named(fake_cupy):
    a = kernels._kernel("lvae_merge_fwd")
    assert kernels._kernel("lvae_merge_fwd") is a, "the kernel must be cached, not rebuilt"
    assert all(re.fullmatch(r"lvae_\w+_(fwd|bwd)", name) for name in kernels.KERNELS)
    for name, (in_params, out_params, _) in kernels.KERNELS.items():
        names = param_names(in_params) + param_names(out_params)
        assert not {"i", "n"} & set(names) and not any(n.startswith("_") for n in names), \
            f"{name}: i, n and names starting with _ are reserved by CuPy"


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
def test_wrappers_broadcast_like_the_reference(fake_cupy, dtype):
    mu_hat, var_hat, mu_p, var_p = broadcast_inputs(dtype)
    full = mu_p.shape
    rng = np.random.default_rng(2)
    g_mu, g_var = rng.standard_normal(full).astype(dtype), rng.standard_normal(full).astype(dtype)

    merge_in = (mu_hat, var_hat, mu_p, var_p)
    out = kernels.merge_forward(*merge_in)
    assert isinstance(out, tuple) and [o.shape for o in out] == [full, full]
    assert_close("lvae_merge_fwd", dtype, merge_in, out, gaussian.merge_forward(*merge_in))
    for gm, gv in [(g_mu, g_var), (None, g_var), (g_mu, None)]:
        got = kernels.merge_backward(gm, gv, *merge_in)
        assert [g.shape for g in got] == [full] * 4, "backward must give full-shape gradients"
        zero = np.zeros(full, dtype)
        inputs = (zero if gm is None else gm, zero if gv is None else gv) + merge_in
        assert_close("lvae_merge_bwd", dtype, inputs, got,
                     gaussian.merge_backward(gm, gv, *merge_in), what=f" (g_mu None: "
                     f"{gm is None}, g_var None: {gv is None})")

    z = mu_p  # (K, B, d) against (B, d), and against the standard normal as 0-d arrays
    zero_d, one_d = np.zeros((), dtype), np.ones((), dtype)
    for mu, var in [(mu_hat, var_hat), (zero_d, one_d), (0.0, 1.0)]:
        kl_in = (z, var_p, mu, var)
        assert_close("lvae_kl_fwd", dtype, kl_in, kernels.kl_forward(*kl_in),
                     gaussian.kl_forward(*kl_in))
        assert_close("lvae_kl_bwd", dtype, (g_mu,) + kl_in, kernels.kl_backward(g_mu, *kl_in),
                     gaussian.kl_backward(g_mu, *kl_in))
        ln_in = (z, mu, var)
        assert_close("lvae_log_normal_fwd", dtype, ln_in, kernels.log_normal_forward(*ln_in),
                     gaussian.log_normal_forward(*ln_in))
        assert_close("lvae_log_normal_bwd", dtype, (g_mu,) + ln_in,
                     kernels.log_normal_backward(g_mu, *ln_in),
                     gaussian.log_normal_backward(g_mu, *ln_in))


def test_wrappers_promote_mixed_dtypes_like_numpy(fake_cupy):
    """float32 means with a float64 0-d prior: the result is float64, as in NumPy."""
    z = np.linspace(-2, 2, 7, dtype=np.float32)
    mu, var = np.zeros((), np.float64), np.ones((), np.float64)
    got, expected = kernels.log_normal_forward(z, mu, var), gaussian.log_normal_forward(z, mu, var)
    assert got.dtype == expected.dtype == np.float64
    np.testing.assert_allclose(got, expected, rtol=1e-12)


def _merge_both(*t):
    return autograd.concatenate(gaussian.merge(*t), axis=0)


def _samples_and_prior(dtype):
    """(K, B, d) means and variances against a (B, d) Gaussian."""
    mu_hat, var_hat, mu_p, var_p = broadcast_inputs(dtype)
    return mu_p, var_p, mu_hat, var_hat


OPS = {  # name: (function of Tensors, input arrays given a dtype)
    "merge": (_merge_both, broadcast_inputs),
    "merge_mu_only": (lambda *t: gaussian.merge(*t)[0], broadcast_inputs),
    "merge_var_only": (lambda *t: gaussian.merge(*t)[1], broadcast_inputs),
    "kl": (gaussian.gaussian_kl, _samples_and_prior),
    "kl_standard_normal": (gaussian.gaussian_kl, lambda dt: _samples_and_prior(dt)[:2]),
    "log_normal": (gaussian.log_normal,
                   lambda dt: _samples_and_prior(dt)[:1] + _samples_and_prior(dt)[2:]),
    "log_normal_standard": (gaussian.log_normal, lambda dt: _samples_and_prior(dt)[:1]),
}


@pytest.mark.parametrize("op", list(OPS))
def test_fused_ops_match_finite_differences(fake_cupy, op):
    """Through gaussian.py's autograd ops with the fused path on (C build, float64)."""
    fn, make = OPS[op]
    arrays = make(np.float64)
    assert kernels.active(arrays[0])
    autograd.check_gradients(fn, *arrays)


# ----------------------------------------------------------------------------------
# The stand-in itself: the CuPy rules it reproduces, on small made-up kernels
# ----------------------------------------------------------------------------------
def test_stand_in_follows_cupy_rules(fake_cupy):
    """The rules of cupy.ElementwiseKernel and cupy.ReductionKernel that kernels.py's
    wrappers rely on (tests/cupy_standin.py lists them), so that the tests below, which
    trust the stand-in, are not fooled by it."""
    f64, f32 = np.arange(3.0), np.arange(3, dtype=np.float32)
    axpy = fake_cupy.ElementwiseKernel("T x, T y", "T z", "z = x * y + (T)1;", "t_axpy")
    assert axpy(f32, 2.5).dtype == np.float32, "a Python number takes the arrays' type T"
    np.testing.assert_array_equal(axpy(f64, f64[:, None]), f64 * f64[:, None] + 1)  # broadcast
    with pytest.raises(TypeError, match="mismatched"):
        axpy(f64, f32)  # one T, two dtypes
    out = np.zeros(3)
    assert axpy(f64, 2.0, out) is out and np.array_equal(out, 2 * f64 + 1), \
        "a given output is written in place (and returned)"
    with pytest.raises(ValueError, match="Out shape"):
        axpy(f64 * f64[:, None], 2.0, out)  # an output takes part in broadcasting, but
        # must already have the broadcast shape: (3,) cannot hold a (3, 3) result
    with pytest.raises(TypeError, match="Wrong number of arguments"):
        axpy(f64)
    with pytest.raises(ValueError, match="'i'"):
        fake_cupy.ElementwiseKernel("T i", "T z", "z = i;", "t_i")
    assert np.isnan(fake_cupy.ElementwiseKernel("T x", "T z", "z = z + x;", "t_read")(f64)).all(), \
        "a new output is uninitialised (NaN here): a body must not read it before writing it"

    # sum over the axis asked for of x * w, then post_map with the sum as `a`
    dot = fake_cupy.ReductionKernel("T x, T w", "T s", "x * w", "a + b", "s = a * w", "0", "t_dot")
    m = np.arange(12.0).reshape(3, 4)
    for axis, keepdims in [(0, False), (1, False), (None, False), ((0, 1), False), (-1, True)]:
        np.testing.assert_array_equal(dot(m, 2.0, axis=axis, keepdims=keepdims),
                                      4 * m.sum(axis=axis, keepdims=keepdims),
                                      err_msg=f"axis={axis}, keepdims={keepdims}")
    assert dot(m.astype(np.float32), 2.0, axis=0).dtype == np.float32
    with pytest.raises(AssertionError, match="does not compile"):
        dot(m, np.ones(4), axis=0)  # an array input is not visible in post_map_expr
    assert fake_cupy.launched["t_axpy"] == 3 and fake_cupy.launched["t_dot"] == 7


# ----------------------------------------------------------------------------------
# The other fused paths (batch norm and its running averages, Adam, softplus, sigmoid)
# on the stand-in, against the same code with fusion off
# ----------------------------------------------------------------------------------
def assert_fused_matches_plain(what, dtype, fused, plain, scale=None):
    """|fused - plain| <= RTOL[dtype] * scale everywhere, with the same dtype and shape.

    ``scale`` is the size of the terms each value is computed from. By default it is the
    largest |plain| of the array, which bounds the terms for these moderate inputs (as in
    the GPU tests): batch norm's dx = scale * (g - dbeta / N - xhat dgamma / N) can be far
    smaller than its terms, where one rounding of a term is a large relative error.
    """
    fused, plain = np.asarray(fused), np.asarray(plain)
    assert fused.dtype == plain.dtype == dtype, \
        f"{what}: dtype {fused.dtype} fused, {plain.dtype} plain, expected {np.dtype(dtype)}"
    assert fused.shape == plain.shape, f"{what}: shape {fused.shape} fused, {plain.shape} plain"
    fused, plain = fused.astype(np.float64), plain.astype(np.float64)
    rtol = RTOL[dtype]
    scale = np.broadcast_to(np.abs(plain).max() if scale is None else scale, plain.shape)
    err = np.abs(fused - plain)
    bound = rtol * scale + np.finfo(dtype).tiny
    if not np.all(err <= bound):
        j = np.unravel_index(np.argmax(err / bound), err.shape)
        raise AssertionError(f"{what} ({np.dtype(dtype).name}): at {tuple(map(int, j))} the "
                             f"fused path gives {fused[j]!r}, the plain code {plain[j]!r}; "
                             f"expected them within {rtol} * {float(scale[j]):.3g}")


def assert_all_match(what, dtype, results, scales=None):
    """Every array of results[True] (fusion on) against results[False] (fusion off);
    scales: {array name: scale} where the default does not apply."""
    assert results[True].keys() == results[False].keys()
    for name in results[False]:
        assert_fused_matches_plain(f"{what}: {name}", dtype, results[True][name],
                                   results[False][name], (scales or {}).get(name))


# kernels each direction of the fused batch norm launches
BATCH_NORM_KERNELS = {True: {"lvae_bn_var", "lvae_bn_fwd", "lvae_bn_dbeta", "lvae_bn_dgamma",
                             "lvae_bn_bwd"},
                      False: {"lvae_bn_fwd", "lvae_bn_dbeta", "lvae_bn_dgamma", "lvae_bn_bwd"}}


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("slope", [None, 0.01], ids=["no_relu", "leaky_0.01"])
@pytest.mark.parametrize("training", [True, False], ids=["training", "evaluation"])
def test_fused_batch_norm_matches_plain(fake_cupy, dtype, slope, training):
    """layers.batch_norm with fusion on (kernels.batch_norm_forward / _backward, with
    their column sums) and off: the output, the batch mean and variance, and the
    gradients of x, gamma and beta.

    x is (K, B, D) = (3, 8, 6), the LVAE's K samples of a batch: batch norm normalises
    its 24 rows. Evaluation mode normalises with given (running) statistics; training
    mode with the batch's own, which every row's gradient then depends on.
    """
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((3, 8, 6)) * 2 + 1).astype(dtype)
    gamma, beta = (rng.random(6) + 0.5).astype(dtype), rng.standard_normal(6).astype(dtype)
    stats = ((None, None) if training else
             (rng.standard_normal(6).astype(dtype), (rng.random(6) + 0.2).astype(dtype)))
    weights = rng.standard_normal(x.shape).astype(dtype)  # the gradient of the output
    results = {}
    for fused in (True, False):
        kernels.set_fusion(fused)
        fake_cupy.launched.clear()
        leaves = [Tensor(a.copy(), requires_grad=True) for a in (x, gamma, beta)]
        y, mean, var = layers.batch_norm(*leaves, 1e-4, *stats, slope=slope)
        y.backward(weights)
        assert set(fake_cupy.launched) == (BATCH_NORM_KERNELS[training] if fused else set()), \
            f"fusion {'on' if fused else 'off'}: launched {dict(fake_cupy.launched)}"
        results[fused] = {"y": y.data, "mean": mean, "var": var, "dx": leaves[0].grad,
                          "dgamma": leaves[1].grad, "dbeta": leaves[2].grad}
    mode = "training" if training else "evaluation"
    assert_all_match(f"batch norm ({mode}, slope {slope})", dtype, results)


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum_0.1", "exact_average"])
def test_fused_batch_norm_running_averages_match_plain(fake_cupy, dtype, momentum):
    """layers.BatchNorm over three training batches, with fusion on (kernels.running_average
    updates the running mean and variance in place) and off; then one evaluation batch,
    normalised with those averages. momentum None: exact averages (m = 1 / batches seen)."""
    rng = np.random.default_rng(8)
    batches = [(rng.standard_normal((16, 5)) * 3 + 2).astype(dtype) for _ in range(4)]
    gamma, beta = (rng.random(5) + 0.5).astype(dtype), rng.standard_normal(5).astype(dtype)
    results = {}
    for fused in (True, False):
        kernels.set_fusion(fused)
        fake_cupy.launched.clear()
        bn = layers.BatchNorm(5, momentum=momentum, dtype=dtype)
        bn.gamma.data[...], bn.beta.data[...] = gamma, beta
        for batch in batches[:3]:
            bn(Tensor(batch), slope=0.01)
        bn.eval()
        y = bn(Tensor(batches[3]), slope=0.01)
        assert fake_cupy.launched["lvae_bn_running"] == (3 if fused else 0)
        results[fused] = {"running_mean": bn.running_mean.data, "running_var": bn.running_var.data,
                          "evaluation output": y.data}
    assert_all_match(f"BatchNorm (momentum {momentum})", dtype, results)


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("clip_norm", [None, 0.5], ids=["no_clip", "clip_0.5"])
def test_fused_adam_matches_plain(fake_cupy, dtype, clip_norm):
    """Five Adam.step()s with fusion on (kernels.adam_update, the whole update of one
    parameter in one kernel) and off: after every step, the weights and both moments of
    every parameter. The third parameter has no gradient in steps 2 and 4: both paths
    must leave it and its moments alone then.

    With clip_norm 0.5 every step is clipped (||g|| is about 40): the fused path scales
    by min(1, c / (||g|| + 1e-12)), computed where the arrays are, the plain path by
    c / ||g||, a relative difference of 1e-12 / ||g|| (twice that in v, which goes with
    g^2): about 5e-14, within the tolerance.

    Both paths take 1 - b1 and 1 - b2 in double (in float32 inside the kernel, 1 - 0.999
    came out 1.3e-5 too small, relatively, at every step: this test found it).
    """
    rng = np.random.default_rng(11)
    shapes = [(4, 3), (3,), (5,)]
    initial = [rng.standard_normal(s).astype(dtype) for s in shapes]
    grads = [[None if (i == 2 and step in (1, 3)) else (10 * rng.standard_normal(s)).astype(dtype)
              for i, s in enumerate(shapes)] for step in range(5)]
    results = {}
    for fused in (True, False):
        kernels.set_fusion(fused)
        fake_cupy.launched.clear()
        params = [Tensor(a.copy(), requires_grad=True) for a in initial]
        optimizer = layers.Adam(params, lr=1e-2, clip_norm=clip_norm)
        history = {}
        for step, step_grads in enumerate(grads, 1):
            for p, g in zip(params, step_grads):
                p.grad = None if g is None else g.copy()
            optimizer.step()
            for i, p in enumerate(params):
                history[f"step {step}: parameter {i}"] = p.data.copy()
                history[f"step {step}: m of parameter {i}"] = optimizer.m[i].copy()
                history[f"step {step}: v of parameter {i}"] = optimizer.v[i].copy()
        assert fake_cupy.launched["lvae_adam_update"] == (13 if fused else 0)
        results[fused] = history
    for step in (2, 4):  # no gradient: unchanged since the step before
        for name in ("parameter 2", "m of parameter 2", "v of parameter 2"):
            np.testing.assert_array_equal(results[True][f"step {step}: {name}"],
                                          results[True][f"step {step - 1}: {name}"])
    assert_all_match(f"Adam (clip_norm {clip_norm})", dtype, results)


def mixed_dtype_step(fused, device="cpu", launched=None):
    """A float32 Dense (no bias) + BatchNorm + leaky ReLU fed a float64 batch, then one
    Adam step, with fusion on or off: the output, running averages, weights and Adam's m,
    as NumPy arrays. ``launched``: the stand-in's kernel counts, checked when fused."""
    kernels.set_fusion(fused)
    rng = np.random.default_rng(12)
    x, weights = rng.standard_normal((16, 6)), rng.standard_normal((16, 4))  # float64
    dense = layers.Dense(6, 4, bias=False, rng=np.random.default_rng(3), dtype=np.float32)
    bn = layers.BatchNorm(4, dtype=np.float32)
    dense.to(device)
    bn.to(device)
    params = dense.parameters() + bn.parameters()
    optimizer = layers.Adam(params, lr=1e-2, clip_norm=0.5)
    y = bn(dense(Tensor(autograd.to_device(x, device))), slope=0.01)
    y.backward(autograd.to_device(weights, device))
    optimizer.step()
    if fused and launched is not None:
        assert {"lvae_bn_fwd", "lvae_bn_bwd", "lvae_bn_running",
                "lvae_adam_update"} <= set(launched)
    result = {"y": y.data, "running_mean": bn.running_mean.data,
              "running_var": bn.running_var.data}
    result.update({f"parameter {i}": p.data for i, p in enumerate(params)})
    result.update({f"m of parameter {i}": m for i, m in enumerate(optimizer.m)})
    return {name: autograd.to_numpy(a) for name, a in result.items()}


def assert_mixed_dtype_steps_match(results):
    for name in results[False]:
        expected = np.float64 if name == "y" else np.float32
        assert_fused_matches_plain(f"mixed dtypes: {name}", expected, results[True][name],
                                   results[False][name])


def test_fused_paths_take_mixed_dtypes_as_the_plain_code_does(fake_cupy):
    """mixed_dtype_step: the plain code promotes as NumPy does (float64 activations and
    gradients; in-place updates of float32 weights and averages cast back). The fused
    kernels bind every array to one type T, and were refused by CuPy ("Type is
    mismatched") when dtypes were mixed; they now promote, and cast into in-place outputs,
    the same way: same values and same dtypes on both paths. (The dense layer has no bias:
    batch norm makes its gradient zero up to rounding, and Adam would scale that noise up.)"""
    results = {}
    for fused in (True, False):
        fake_cupy.launched.clear()
        results[fused] = mixed_dtype_step(fused, launched=fake_cupy.launched)
    assert_mixed_dtype_steps_match(results)


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
def test_fused_softplus_and_sigmoid_match_plain(fake_cupy, dtype):
    """autograd.softplus and autograd.sigmoid, values and gradients, with fusion on
    (kernels.softplus, kernels.sigmoid) and off, for x from -1000 to 1000.

    Scales by the size of the terms: softplus = max(x, 0) + log1p(e^-|x|) adds two
    non-negative terms, so it is compared relative to itself (down to its tiny values
    for very negative x); sigmoid = (1 + tanh(x / 2)) / 2 has terms of size 1 (its
    value near 0 is a difference of them); both gradients, g sigmoid(x) and
    g s (1 - s), are then within |g| of that.
    """
    x = np.concatenate([np.linspace(-30, 30, 121), [-1e3, -80, -1e-3, 0, 1e-3, 80, 1e3]])
    x = x.astype(dtype)
    g = np.random.default_rng(12).standard_normal(x.shape).astype(dtype)
    for op, kernel in [(autograd.softplus, "lvae_softplus"), (autograd.sigmoid, "lvae_sigmoid")]:
        results = {}
        for fused in (True, False):
            kernels.set_fusion(fused)
            fake_cupy.launched.clear()
            leaf = Tensor(x.copy(), requires_grad=True)
            y = op(leaf)
            y.backward(g)
            assert (fake_cupy.launched[kernel] >= 1) == fused
            results[fused] = {"value": y.data, "gradient": leaf.grad}
        value_scale = np.abs(results[False]["value"]) if op is autograd.softplus else 1.0
        assert_all_match(op.__name__, dtype, results,
                         scales={"value": value_scale, "gradient": np.abs(g)})


# ----------------------------------------------------------------------------------
# On a GPU
# ----------------------------------------------------------------------------------


@pytest.fixture
def fusion_restored():
    previous = kernels._fusion_enabled
    yield
    kernels.set_fusion(previous)


@pytest.mark.parametrize("regime", ["moderate", "extreme"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("name", list(kernels.KERNELS))
@pytest.mark.gpu
@requires_cuda
def test_gpu_kernel_matches_reference(name, dtype, regime):
    """Each fused kernel on CuPy arrays against the reference code on the same arrays."""
    cupy = autograd.cupy
    inputs = draw_inputs(name, dtype, regime)
    on_gpu = [cupy.asarray(x) for x in inputs]
    fused = getattr(kernels, FUNCTION[name])
    assert_close(name, dtype, inputs, fused(*on_gpu), REFERENCE[name](*on_gpu),
                 what=f" [GPU, {regime} variances]")


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.gpu
@requires_cuda
def test_gpu_fusion_on_matches_off(op, dtype, fusion_restored):
    """Values and gradients of gaussian.py's ops with fusion on and off, on CuPy."""
    cupy = autograd.cupy
    fn, make = OPS[op]
    arrays = make(dtype)
    weights = np.random.default_rng(3).standard_normal(
        fn(*[Tensor(a) for a in arrays]).shape).astype(dtype)
    results = {}
    for fused in (True, False):
        kernels.set_fusion(fused)
        leaves = [Tensor(cupy.asarray(a), requires_grad=True) for a in arrays]
        assert kernels.active(leaves[0].data) == fused
        out = fn(*leaves)
        assert out.dtype == dtype
        out.backward(cupy.asarray(weights))
        results[fused] = [out.numpy()] + [autograd.to_numpy(leaf.grad) for leaf in leaves]
    rtol = RTOL[dtype]
    for i, (on, off) in enumerate(zip(results[True], results[False])):
        what = "output" if i == 0 else f"gradient of input {i - 1}"
        # rounding (e.g. fused multiply-adds on the GPU) is relative to the terms: the
        # largest value of the array bounds them for these moderate inputs
        np.testing.assert_allclose(on, off, rtol=rtol, atol=rtol * np.abs(off).max(),
                                   err_msg=f"{op}: {what} differs between fused and plain CuPy")


@pytest.mark.gpu
@requires_cuda
def test_gpu_fused_paths_take_mixed_dtypes(fusion_restored):
    """mixed_dtype_step on CuPy: fusion on and off give the same values and dtypes."""
    assert_mixed_dtype_steps_match({fused: mixed_dtype_step(fused, "cuda")
                                    for fused in (True, False)})


def check_gradients_xp(xp, fn, *arrays, eps=1e-6, rtol=1e-5, atol=1e-7):
    """autograd.check_gradients for arrays of module xp (numpy or cupy), in float64:
    backward() on xp arrays against central differences of the op's forward."""
    arrays = [np.array(a, dtype=np.float64) for a in arrays]
    weights = np.random.default_rng(0).standard_normal(fn(*[Tensor(a) for a in arrays]).shape)

    def scalar(*arrs):
        with autograd.no_grad():
            out = fn(*[Tensor(xp.asarray(a)) for a in arrs])
        return float((autograd.to_numpy(out) * weights).sum())

    leaves = [Tensor(xp.asarray(a), requires_grad=True) for a in arrays]
    fn(*leaves).backward(xp.asarray(weights))
    for i, leaf in enumerate(leaves):
        numeric = autograd.numerical_gradient(scalar, arrays, i, eps)
        analytic = np.zeros_like(numeric) if leaf.grad is None else autograd.to_numpy(leaf.grad)
        np.testing.assert_allclose(analytic, numeric, rtol=rtol, atol=atol,
                                   err_msg=f"gradient of input {i} against finite differences")


@pytest.mark.parametrize("op", list(OPS))
def test_ops_match_finite_differences_on_each_backend(xp, op):
    """With NumPy the reference path; with CuPy (marker gpu) the fused kernels."""
    fn, make = OPS[op]
    if xp is not np:
        assert kernels.active(xp.zeros(1)), "the fused path should be on for CuPy arrays"
    check_gradients_xp(xp, fn, *make(np.float64))


# the kernels each Gaussian op launches: (forward, backward)
GAUSSIAN_OP_KERNELS = {
    "merge": ("lvae_merge_fwd", "lvae_merge_bwd"),
    "gaussian_kl": ("lvae_kl_fwd", "lvae_kl_bwd"),
    "gaussian_kl (standard normal prior)": ("lvae_kl_fwd", "lvae_kl_bwd"),
    "log_normal": ("lvae_log_normal_fwd", "lvae_log_normal_bwd"),
}


def _gaussian_op(name, leaves):
    mu_hat, var_hat, mu_p, var_p = leaves
    if name == "merge":
        mu_q, var_q = gaussian.merge(mu_hat, var_hat, mu_p, var_p)
        return (mu_q * var_q).sum()  # both outputs get a gradient
    if name == "gaussian_kl":
        return gaussian.gaussian_kl(mu_p, var_p, mu_hat, var_hat).sum()
    if name == "gaussian_kl (standard normal prior)":
        return gaussian.gaussian_kl(mu_p, var_p).sum()  # the prior as numbers
    return gaussian.log_normal(mu_p, mu_hat, var_hat).sum()


@pytest.mark.parametrize("name", list(GAUSSIAN_OP_KERNELS))
def test_gaussian_ops_run_the_fused_kernels_when_active(fake_cupy, name):
    """gaussian.py's dispatch: with fusion on, each op runs its fused forward kernel when
    called and its fused backward kernel in backward(), once each; with fusion off, no
    kernel at all. (The value tests compare fused with plain results, which a dispatch
    that never took the fused path, or took it for one direction only, passes
    trivially; so do the GPU fusion-on-vs-off tests.)"""
    arrays = broadcast_inputs(np.float64)
    forward_kernel, backward_kernel = GAUSSIAN_OP_KERNELS[name]
    for fused in (True, False):
        kernels.set_fusion(fused)
        fake_cupy.launched.clear()
        leaves = [Tensor(a.copy(), requires_grad=True) for a in arrays]
        loss = _gaussian_op(name, leaves)
        assert dict(fake_cupy.launched) == ({forward_kernel: 1} if fused else {}), \
            f"{name}, fusion {'on' if fused else 'off'}: forward launched {dict(fake_cupy.launched)}"
        fake_cupy.launched.clear()
        loss.backward()
        assert dict(fake_cupy.launched) == ({backward_kernel: 1} if fused else {}), \
            f"{name}, fusion {'on' if fused else 'off'}: backward launched {dict(fake_cupy.launched)}"


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("training", [True, False], ids=["training", "evaluation"])
def test_fused_batch_norm_with_slope_zero_is_a_relu(fake_cupy, dtype, training):
    """slope 0 (a plain ReLU; leaky_relu allows 0 <= slope < 1): a unit whose output is 0
    passes no gradient, on the fused path as on the plain one. Its output is then
    y * 0 = -0.0 for y < 0, which a test `out >= 0` would take for a live unit.

    Checked: fused equals plain; dbeta is the sum of g over the live units only; in
    evaluation mode (a fixed affine map) dx is exactly 0 at the dead units."""
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((24, 6)) * 2 + 1).astype(dtype)
    gamma, beta = (rng.random(6) + 0.5).astype(dtype), rng.standard_normal(6).astype(dtype)
    stats = ((None, None) if training else
             (rng.standard_normal(6).astype(dtype), (rng.random(6) + 0.2).astype(dtype)))
    weights = rng.standard_normal(x.shape).astype(dtype)
    results = {}
    for fused in (True, False):
        kernels.set_fusion(fused)
        leaves = [Tensor(a.copy(), requires_grad=True) for a in (x, gamma, beta)]
        y, _, _ = layers.batch_norm(*leaves, 1e-4, *stats, slope=0.0)
        y.backward(weights)
        results[fused] = {"y": y.data, "dx": leaves[0].grad, "dgamma": leaves[1].grad,
                          "dbeta": leaves[2].grad}
    assert_all_match(f"batch norm + ReLU ({'training' if training else 'evaluation'})", dtype,
                     results)
    live = results[True]["y"] > 0
    assert live.any() and not live.all()
    expected_dbeta = np.where(live, weights, 0).astype(np.float64).sum(axis=0).astype(dtype)
    assert_fused_matches_plain("dbeta = sum of g over live units", dtype, results[True]["dbeta"],
                               expected_dbeta, scale=np.abs(weights).sum(axis=0))
    if not training:
        assert np.all(results[True]["dx"][~live] == 0), "a dead ReLU unit passed a gradient"


def test_wrappers_run_integer_arrays_in_float64_as_numpy_does(fake_cupy):
    """Arrays of integers only (no float dtype to keep): the kernel runs in float64, the
    dtype NumPy gives the reference code (log and true division of integers)."""
    # two integer dtypes, and one (the case _promoted's shortcut for a single dtype must
    # not take: it passed the int64 arrays to the kernel unchanged, untested)
    for mu_dtype in (np.int32, np.int64):
        z, mu, var = np.arange(-3, 4), np.zeros(7, mu_dtype), np.full(7, 2)
        got = kernels.log_normal_forward(z, mu, var)
        expected = gaussian.log_normal_forward(z, mu, var)
        assert got.dtype == expected.dtype == np.float64, mu_dtype
        np.testing.assert_allclose(got, expected, rtol=1e-12, err_msg=str(mu_dtype))
