"""The other fused kernels of kernels.py (batch norm + leaky ReLU, its column sums, running
averages, Adam, softplus, sigmoid) checked without a GPU: their C bodies are compiled with
the machine's C compiler into a loop over elements (over rows, for the column sums) and
compared with the plain NumPy code they replace (layers.py and autograd.py), in float32
and float64.

(The Gaussian kernels are checked the same way in test_kernels.py.)
"""
import ctypes
import shutil
import subprocess

import numpy as np
import pytest

import autograd
import kernels
import layers

# name: (body, [(parameter, kind)]) with kind "in" (read), "inout" (read and written),
# "out" (written) or "bool" (one flag for all elements)
BODIES = {
    "bn_fwd": (kernels.BATCH_NORM_FWD_BODY,
               [("x", "in"), ("mean", "in"), ("var", "in"), ("gamma", "in"), ("beta", "in"),
                ("eps", "in"), ("slope", "in"), ("xhat", "out"), ("out", "out")]),
    "bn_bwd": (kernels.BATCH_NORM_BWD_BODY,
               [("g", "in"), ("out", "in"), ("xhat", "in"), ("gamma", "in"), ("var", "in"),
                ("eps", "in"), ("dbeta", "in"), ("dgamma", "in"), ("n", "in"), ("slope", "in"),
                ("training", "bool"), ("dx", "out")]),
    "running": (kernels.RUNNING_AVERAGE_BODY,
                [("mean", "in"), ("var", "in"), ("m", "in"), ("unbias", "in"),
                 ("running_mean", "inout"), ("running_var", "inout")]),
    "adam": (kernels.ADAM_BODY,
             [("grad", "in"), ("scale", "in"), ("b1", "in"), ("one_minus_b1", "in"), ("b2", "in"),
              ("one_minus_b2", "in"), ("step_size", "in"), ("eps_hat", "in"), ("p", "inout"),
              ("m", "inout"), ("v", "inout")]),
    "softplus": (kernels.SOFTPLUS_BODY, [("x", "in"), ("y", "out")]),
    "sigmoid": (kernels.SIGMOID_BODY, [("x", "in"), ("y", "out")]),
}
DTYPES = [np.float32, np.float64]

# The batch-norm column sums (kernels.BATCH_NORM_REDUCTIONS) are compiled as a loop over
# columns that sums the term over the rows; each parameter is read per element of the
# (rows, cols) input, once per column, or once in all
REDUCTION_INPUTS = {
    "lvae_bn_var": {"x": "element", "mean": "column", "n": "scalar"},
    "lvae_bn_dbeta": {"g": "element", "out": "element", "slope": "scalar"},
    "lvae_bn_dgamma": {"g": "element", "out": "element", "xhat": "element", "slope": "scalar"},
}


def c_function(name, body, params):
    args = ["long n_elements"]
    for p, kind in params:
        args.append({"in": f"const T *in_{p}", "inout": f"T *io_{p}", "out": f"T *out_{p}",
                     "bool": f"bool {p}"}[kind])
    lines = [f"void {name}({', '.join(args)}) {{",
             "    for (long idx = 0; idx < n_elements; ++idx) {"]
    for p, kind in params:
        if kind == "in":
            lines.append(f"        const T {p} = in_{p}[idx];")
        elif kind == "inout":
            lines.append(f"        T {p} = io_{p}[idx];")
        elif kind == "out":
            lines.append(f"        T {p};")
    lines += ["        {", body, "        }"]
    lines += [f"        {'io' if kind == 'inout' else 'out'}_{p}[idx] = {p};"
              for p, kind in params if kind in ("inout", "out")]
    lines += ["    }", "}", ""]
    return "\n".join(lines)


def c_reduction(name, in_params, out_param, map_expr, post_expr):
    """A CuPy ReductionKernel over axis 0 as C: for each column, a = sum over the rows of
    map_expr, then post_expr sets the output from a (as CuPy does, with the same names)."""
    params = [p.split()[-1] for p in in_params.split(",")]
    out = out_param.split()[-1]
    index = {"element": "i * cols + j", "column": "j", "scalar": "0"}
    kinds = REDUCTION_INPUTS[name]
    args = ["long rows", "long cols"] + [f"const T *in_{p}" for p in params] + [f"T *out_{out}"]
    lines = [f"void {name}({', '.join(args)}) {{", "    for (long j = 0; j < cols; ++j) {",
             "        T a = (T)0;", "        for (long i = 0; i < rows; ++i) {"]
    lines += [f"            const T {p} = in_{p}[{index[kinds[p]]}]; (void){p};" for p in params]
    lines += [f"            a = a + ({map_expr});", "        }", "        {"]
    lines += [f"            const T {p} = in_{p}[{index[kinds[p]]}]; (void){p};"
              for p in params if kinds[p] != "element"]
    lines += [f"            T {out};", f"            {post_expr};", f"            out_{out}[j] = {out};",
              "        }", "    }", "}", ""]
    return "\n".join(lines)


def reduce(libraries, name, dtype, **values):
    """Call the compiled reduction ``name`` on a (rows, cols) problem; returns its (cols,) output."""
    kinds = REDUCTION_INPUTS[name]
    rows, cols = next(np.shape(values[p]) for p, kind in kinds.items() if kind == "element")
    shapes = {"element": (rows, cols), "column": (cols,), "scalar": (1,)}
    arrays = [np.ascontiguousarray(np.broadcast_to(np.asarray(values[p], dtype), shapes[kind]))
              for p, kind in kinds.items()]
    result = np.empty(cols, dtype)
    getattr(libraries[dtype], name)(ctypes.c_long(rows), ctypes.c_long(cols),
                                    *(a.ctypes.data_as(ctypes.c_void_p) for a in arrays),
                                    result.ctypes.data_as(ctypes.c_void_p))
    return result


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    compiler = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        pytest.skip("no C compiler found to compile the kernel bodies on the CPU")
    folder = tmp_path_factory.mktemp("kernel_bodies")
    libraries = {}
    for dtype, ctype in [(np.float32, "float"), (np.float64, "double")]:
        source = "\n".join(["#include <tgmath.h>", "#include <stdbool.h>", f"typedef {ctype} T;", ""]
                           + [c_function(name, body, params) for name, (body, params) in BODIES.items()]
                           + [c_reduction(name, *spec) for name, spec in kernels.BATCH_NORM_REDUCTIONS.items()])
        (folder / f"{ctype}.c").write_text(source)
        library = folder / f"{ctype}.so"
        command = [compiler, "-std=c99", "-O2", "-fPIC", "-shared", "-Wall", "-Wdouble-promotion",
                   "-Werror", "-o", str(library), str(folder / f"{ctype}.c"), "-lm"]
        result = subprocess.run(command, capture_output=True, text=True)
        assert result.returncode == 0, f"kernel bodies do not compile as C ({ctype}):\n{result.stderr}"
        libraries[dtype] = ctypes.CDLL(str(library))
    return libraries


def run(libraries, name, dtype, **values):
    """Call kernel body `name` on arrays (broadcast to one shape); returns the written arrays."""
    _, params = BODIES[name]
    arrays = [np.asarray(values[p], dtype=dtype) for p, kind in params if kind in ("in", "inout")]
    shape = np.broadcast_shapes(*(a.shape for a in arrays))
    args, written = [], {}
    for p, kind in params:
        if kind == "bool":
            args.append(ctypes.c_bool(values[p]))
            continue
        if kind == "out":
            array = np.empty(shape, dtype)
        else:
            array = np.ascontiguousarray(np.broadcast_to(np.asarray(values[p], dtype), shape)).copy()
        if kind in ("out", "inout"):
            written[p] = array
        args.append(array.ctypes.data_as(ctypes.c_void_p))
    getattr(libraries[dtype], name)(ctypes.c_long(int(np.prod(shape))), *args)
    return written


def close(got, expected, dtype, what):
    rtol, atol = (1e-5, 1e-6) if dtype == np.float32 else (1e-12, 1e-14)
    np.testing.assert_allclose(got, expected, rtol=rtol, atol=atol,
                               err_msg=f"{what}: the fused kernel body differs from the NumPy code")


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("slope", [None, 0.01])
def test_batch_norm_forward_body(compiled, dtype, slope):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((32, 6)) * 3).astype(dtype)
    mean, var = x.mean(axis=0), x.var(axis=0)
    gamma, beta = rng.random(6).astype(dtype) + 0.5, rng.standard_normal(6).astype(dtype)
    out, xhat, _, _ = layers.batch_norm_forward(x, gamma, beta, 1e-4, mean, var, slope)
    got = run(compiled, "bn_fwd", dtype, x=x, mean=mean, var=var, gamma=gamma, beta=beta,
              eps=1e-4, slope=1.0 if slope is None else slope)
    close(got["xhat"], xhat, dtype, "batch norm xhat")
    close(got["out"], out, dtype, "batch norm output")


def batch_norm_problem(dtype, slope, training, seed, offset=1.0):
    """A batch of 32 x 6 inputs (standard deviation 2, mean ``offset``) and output
    gradients, with layers.py's forward and backward results:
    (x, g, gamma, (out, xhat, mean, var), (dx, dgamma, dbeta))."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((32, 6)) * 2 + offset).astype(dtype)
    gamma, beta = rng.random(6).astype(dtype) + 0.5, rng.standard_normal(6).astype(dtype)
    g = rng.standard_normal((32, 6)).astype(dtype)
    forward = layers.batch_norm_forward(x, gamma, beta, 1e-4, slope=slope)
    out, xhat, _, var = forward
    return x, g, gamma, forward, layers.batch_norm_backward(g, out, xhat, gamma, var, 1e-4,
                                                             training, slope)


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("slope", [None, 0.01])
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_backward_body(compiled, dtype, slope, training):
    _, g, gamma, (out, xhat, _, var), (dx, dgamma, dbeta) = batch_norm_problem(dtype, slope,
                                                                               training, seed=1)
    got = run(compiled, "bn_bwd", dtype, g=g, out=out, xhat=xhat, gamma=gamma, var=var, eps=1e-4,
              dbeta=dbeta, dgamma=dgamma, n=len(g), slope=1.0 if slope is None else slope,
              training=training)
    close(got["dx"], dx, dtype, f"batch norm dx (training={training})")


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("slope", [None, 0.01])
@pytest.mark.parametrize("offset", [1.0, 1e3], ids=["mean 1", "mean 1000"])
def test_batch_norm_column_sums(compiled, dtype, slope, offset):
    """The batch variance, dbeta and dgamma of the fused batch norm's reductions. With a
    mean far from 0 (1000, standard deviation 2) the variance must be summed from the
    centred values as layers.py does: sum(x^2 - mean^2), equal in exact arithmetic,
    loses the variance to cancellation in float32 (and passed with the mean near 1)."""
    x, g, _, (out, xhat, mean, var), (_, dgamma, dbeta) = batch_norm_problem(
        dtype, slope, True, seed=4, offset=offset)
    s = 1.0 if slope is None else slope
    close(reduce(compiled, "lvae_bn_var", dtype, x=x, mean=mean, n=len(x)), var, dtype,
          "batch variance")
    close(reduce(compiled, "lvae_bn_dbeta", dtype, g=g, out=out, slope=s), dbeta, dtype, "dbeta")
    close(reduce(compiled, "lvae_bn_dgamma", dtype, g=g, out=out, xhat=xhat, slope=s), dgamma,
          dtype, "dgamma")


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
def test_running_average_body(compiled, dtype):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((16, 5)).astype(dtype)
    bn = layers.BatchNorm(5, dtype=dtype)
    bn.running_mean.data[...] = rng.standard_normal(5)
    start_mean, start_var = bn.running_mean.data.copy(), bn.running_var.data.copy()
    bn(autograd.Tensor(x))
    got = run(compiled, "running", dtype, mean=x.mean(axis=0), var=x.var(axis=0), m=0.1,
              unbias=16 / 15, running_mean=start_mean, running_var=start_var)
    close(got["running_mean"], bn.running_mean.data, dtype, "running mean")
    close(got["running_var"], bn.running_var.data, dtype, "running variance")


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("clip", [None, 0.5])
def test_adam_body(compiled, dtype, clip):
    """Three steps of layers.Adam's NumPy code against three calls of the fused body."""
    rng = np.random.default_rng(3)
    p = autograd.Tensor(rng.standard_normal(50).astype(dtype), requires_grad=True)
    optimizer = layers.Adam([p], lr=1e-2, clip_norm=clip)
    fused = {"p": p.data.copy(), "m": np.zeros(50, dtype), "v": np.zeros(50, dtype)}
    for t in range(1, 4):
        p.grad = rng.standard_normal(50).astype(dtype)
        norm = float(np.sqrt(p.grad.astype(np.float64) @ p.grad))
        scale = 1.0 if clip is None or norm <= clip else clip / norm
        bc1, bc2 = 1 - 0.9 ** t, 1 - 0.999 ** t
        fused = run(compiled, "adam", dtype, grad=p.grad, scale=scale, b1=0.9, b2=0.999,
                    one_minus_b1=1 - 0.9, one_minus_b2=1 - 0.999,
                    step_size=1e-2 * np.sqrt(bc2) / bc1, eps_hat=1e-8 * np.sqrt(bc2), **fused)
        optimizer.step()
        close(fused["p"], p.data, dtype, f"Adam parameters after step {t}")
        close(fused["m"], optimizer.m[0], dtype, f"Adam m after step {t}")
        close(fused["v"], optimizer.v[0], dtype, f"Adam v after step {t}")


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
def test_softplus_and_sigmoid_bodies(compiled, dtype):
    x = np.concatenate([np.linspace(-30, 30, 121), [-1e3, -80, 80, 1e3]]).astype(dtype)
    close(run(compiled, "softplus", dtype, x=x)["y"], autograd.softplus_array(x), dtype, "softplus")
    close(run(compiled, "sigmoid", dtype, x=x)["y"], autograd.sigmoid_array(x), dtype, "sigmoid")
