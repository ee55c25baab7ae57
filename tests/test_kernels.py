"""Tests of the fused kernels (kernels.py) against the NumPy reference in gaussian.py.

Without a GPU: every kernel body (plain C with the type placeholder T) is compiled with
the machine's C compiler, once with T = float and once with T = double, into a small
shared library with one loop per kernel, and compared with gaussian.py's *_forward /
*_backward on random and extreme inputs. The Python wrappers of kernels.py are run too,
on NumPy arrays, through a stand-in for cupy.ElementwiseKernel that calls that library.

With a GPU (marker `gpu`): the fused ops against the plain CuPy path (fusion on vs off)
and against finite differences.

Tolerances: a rounding error is relative to the size of the terms a result is summed
from, not to the result (the KL of two close Gaussians is a small difference of large
terms). So each output is compared as |fused - reference| <= rtol * scale, with `scale`
the sum of the absolute values of its terms (SCALES below): rtol 1e-12 in float64,
1e-5 in float32.
"""
import ctypes
import math
import os
import re
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import autograd  # noqa: E402
import gaussian  # noqa: E402
import kernels  # noqa: E402
from autograd import Tensor  # noqa: E402

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


def find_c_compiler():
    for candidate in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if candidate and shutil.which(candidate):
            return shutil.which(candidate)
    return None


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
        command = [compiler, "-std=c99", "-O2", "-fPIC", "-shared", "-Wall",
                   "-Wdouble-promotion", "-Werror", "-o", str(library), str(source), "-lm"]
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
# The Python wrappers of kernels.py, with a stand-in for CuPy that runs the C build
# ----------------------------------------------------------------------------------
class CElementwiseKernel:
    """Behaves like cupy.ElementwiseKernel for parameters that are all of type T:
    arrays must share one dtype (CuPy raises TypeError otherwise), numbers take it,
    inputs broadcast, one output is returned bare and several as a tuple."""

    def __init__(self, libraries, in_params, out_params, operation, name):
        assert kernels.KERNELS[name] == (in_params, out_params, operation), \
            f"kernel {name} was built from a body other than KERNELS[{name!r}]"
        self.libraries, self.name, self.n_in = libraries, name, len(param_names(in_params))

    def __call__(self, *args):
        assert len(args) == self.n_in, f"{self.name}: {len(args)} arguments, expected {self.n_in}"
        dtypes = {a.dtype for a in args if isinstance(a, np.ndarray)}
        if len(dtypes) != 1:
            raise TypeError(f"Type is mismatched: {self.name} got arrays of dtypes {dtypes}")
        dtype = dtypes.pop()
        assert all(isinstance(a, (np.ndarray, int, float)) for a in args), \
            f"{self.name}: arguments must be arrays or Python numbers"
        return run_c(self.libraries, self.name, *[np.asarray(a, dtype) for a in args])


@pytest.fixture
def fake_cupy(c_kernels, monkeypatch):
    """kernels.py sees a 'cupy' whose arrays are NumPy arrays and whose kernels are the
    C build, so active(numpy_array) is True and gaussian.py takes the fused path."""
    fake = types.SimpleNamespace(
        ndarray=np.ndarray,
        ElementwiseKernel=lambda *a: CElementwiseKernel(c_kernels, *a))
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
# On a GPU
# ----------------------------------------------------------------------------------
requires_cuda = pytest.mark.skipif(not autograd.cuda_available(),
                                   reason="needs CuPy and a CUDA device")


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
