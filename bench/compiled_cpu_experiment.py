#!/usr/bin/env python3
"""Experiment, not part of the product: what would compiled, fused CPU loops buy?

The CPU training step spends ~19 ms in matrix products and ~10-12 ms in element-wise
NumPy work (batch norm + leaky ReLU ~6 ms, Adam ~4 ms, the rest ~2 ms). Each NumPy call
is one pass over its arrays, plus ~1-2 us of call overhead that dominates on the narrow
layers (4 to 64 units); the NumPy code is already at few passes (bench/README.md, "CPU
step: where the time goes"). Fusing a chain into one loop needs compiled code.

This script writes three C functions (batch-norm forward and backward in training mode,
with the leaky ReLU; the Adam update), compiles them with the machine's C compiler,
checks them against the NumPy reference code of layers.py, then times one training step
of the paper's LVAE with the reference code and with the C loops swapped in, in
alternating rounds in one process. It prints the per-layer times and the step ratio.

    python bench/compiled_cpu_experiment.py

Nothing in the product uses this: the project's CPU path is NumPy (see issue 5's note).
"""
import ctypes
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import layers  # noqa: E402
import lvae  # noqa: E402
from layers import Adam  # noqa: E402

C_SOURCE = r"""
#include <math.h>
#include <stdlib.h>
#include <string.h>

/* rows x: n by d, row-major. Column statistics, then one pass writing xhat and out. */
void bn_forward(const float *restrict x, long n, long d, const float *restrict gamma,
                const float *restrict beta, float eps, int has_slope, float slope,
                float *restrict out, float *restrict xhat, float *restrict mean,
                float *restrict var) {
    float *restrict inv_std = malloc(d * sizeof(float));
    memset(mean, 0, d * sizeof(float));
    memset(var, 0, d * sizeof(float));
    for (long i = 0; i < n; ++i)
        for (long j = 0; j < d; ++j) mean[j] += x[i * d + j];
    for (long j = 0; j < d; ++j) mean[j] /= (float)n;
    for (long i = 0; i < n; ++i)
        for (long j = 0; j < d; ++j) { float c = x[i * d + j] - mean[j]; var[j] += c * c; }
    for (long j = 0; j < d; ++j) { var[j] /= (float)n; inv_std[j] = 1.0f / sqrtf(var[j] + eps); }
    for (long i = 0; i < n; ++i)
        for (long j = 0; j < d; ++j) {
            float h = (x[i * d + j] - mean[j]) * inv_std[j];
            float y = h * gamma[j] + beta[j];
            xhat[i * d + j] = h;
            out[i * d + j] = (y > 0.0f || !has_slope) ? y : y * slope;
        }
    free(inv_std);
}

/* One pass for the leaky-ReLU gradient and the two column sums, one pass for dx. */
void bn_backward(const float *restrict g, const float *restrict out,
                 const float *restrict xhat, long n, long d, const float *restrict gamma,
                 const float *restrict var, float eps, int has_slope, float slope,
                 float *restrict dx, float *restrict dgamma, float *restrict dbeta) {
    float *restrict scale = malloc(d * sizeof(float));
    memset(dgamma, 0, d * sizeof(float));
    memset(dbeta, 0, d * sizeof(float));
    for (long i = 0; i < n; ++i)
        for (long j = 0; j < d; ++j) {
            float gp = g[i * d + j] * ((out[i * d + j] > 0.0f || !has_slope) ? 1.0f : slope);
            dx[i * d + j] = gp;
            dbeta[j] += gp;
            dgamma[j] += gp * xhat[i * d + j];
        }
    for (long j = 0; j < d; ++j) scale[j] = gamma[j] / sqrtf(var[j] + eps);
    for (long i = 0; i < n; ++i)
        for (long j = 0; j < d; ++j)
            dx[i * d + j] = scale[j] * (dx[i * d + j] - dbeta[j] / (float)n
                                        - xhat[i * d + j] * dgamma[j] / (float)n);
    free(scale);
}

void adam_update(float *restrict p, const float *restrict g, float *restrict m,
                 float *restrict v, long size, float b1, float b2, float step_size,
                 float eps_hat) {
    for (long i = 0; i < size; ++i) {
        float mi = b1 * m[i] + (1.0f - b1) * g[i];
        float vi = b2 * v[i] + (1.0f - b2) * g[i] * g[i];
        m[i] = mi;
        v[i] = vi;
        p[i] -= step_size * mi / (sqrtf(vi) + eps_hat);
    }
}
"""


def compile_library(folder):
    compiler = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        sys.exit("no C compiler found (cc, gcc or clang): this experiment needs one")
    source, library = os.path.join(folder, "fused.c"), os.path.join(folder, "fused.so")
    with open(source, "w") as f:
        f.write(C_SOURCE)
    command = [compiler, "-std=c99", "-O3", "-march=native", "-fno-math-errno", "-fPIC",
               "-shared", "-o", library, source, "-lm"]
    subprocess.run(command, check=True)
    lib = ctypes.CDLL(library)
    P, L, F, I = ctypes.c_void_p, ctypes.c_long, ctypes.c_float, ctypes.c_int
    lib.bn_forward.argtypes = [P, L, L, P, P, F, I, F, P, P, P, P]
    lib.bn_backward.argtypes = [P, P, P, L, L, P, P, F, I, F, P, P, P]
    lib.adam_update.argtypes = [P, P, P, P, L, F, F, F, F]
    return lib, " ".join(command[1:6])


def fused_functions(lib):
    """Drop-in replacements for layers.batch_norm_forward/backward and Adam.step (float32,
    training mode; evaluation mode and other dtypes go to the reference code)."""
    reference_forward, reference_backward = layers.batch_norm_forward, layers.batch_norm_backward

    def forward(rows, gamma, beta, eps, mean=None, var=None, slope=None):
        if mean is not None or rows.dtype != np.float32:
            return reference_forward(rows, gamma, beta, eps, mean, var, slope)
        rows = np.ascontiguousarray(rows)
        n, d = rows.shape
        out, xhat = np.empty_like(rows), np.empty_like(rows)
        mean, var = np.empty(d, np.float32), np.empty(d, np.float32)
        lib.bn_forward(rows.ctypes.data, n, d, gamma.ctypes.data, beta.ctypes.data, eps,
                       slope is not None, slope or 0.0, out.ctypes.data, xhat.ctypes.data,
                       mean.ctypes.data, var.ctypes.data)
        return out, xhat, mean, var

    def backward(g, out, xhat, gamma, var, eps, training, slope=None):
        if not training or g.dtype != np.float32:
            return reference_backward(g, out, xhat, gamma, var, eps, training, slope)
        g = np.ascontiguousarray(g)
        n, d = g.shape
        dx, dgamma, dbeta = np.empty_like(g), np.empty(d, np.float32), np.empty(d, np.float32)
        lib.bn_backward(g.ctypes.data, out.ctypes.data, xhat.ctypes.data, n, d,
                        gamma.ctypes.data, var.ctypes.data, eps, slope is not None,
                        slope or 0.0, dx.ctypes.data, dgamma.ctypes.data, dbeta.ctypes.data)
        return dx, dgamma, dbeta

    def adam_step(self):
        self.t += 1
        b1, b2 = self.beta1, self.beta2
        bc1, bc2 = 1 - b1 ** self.t, 1 - b2 ** self.t
        step_size, eps_hat = self.lr * math.sqrt(bc2) / bc1, self.eps * math.sqrt(bc2)
        for p, m, v in zip(self.params, self.m, self.v):
            if p.grad is not None:
                g = np.ascontiguousarray(p.grad)
                lib.adam_update(p.data.ctypes.data, g.ctypes.data, m.ctypes.data,
                                v.ctypes.data, p.size, b1, b2, step_size, eps_hat)
    return forward, backward, adam_step


def check_against_reference(forward, backward, adam_step):
    rng = np.random.default_rng(0)
    for width, slope in [(4, None), (64, 0.01), (512, 0.01)]:
        x = rng.standard_normal((256, width)).astype(np.float32)
        g = rng.standard_normal((256, width)).astype(np.float32)
        gamma = rng.uniform(0.5, 1.5, width).astype(np.float32)
        beta = rng.standard_normal(width).astype(np.float32)
        ref = layers.batch_norm_forward(x, gamma, beta, 1e-4, slope=slope)
        got = forward(x, gamma, beta, 1e-4, slope=slope)
        for a, b in zip(ref, got):
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)
        ref_b = layers.batch_norm_backward(g, *ref[:2], gamma, ref[3], 1e-4, True, slope)
        got_b = backward(g, *got[:2], gamma, got[3], 1e-4, True, slope)
        for a, b in zip(ref_b, got_b):
            np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-4)
    params = []
    for _ in range(2):
        net = lvae.build_model("lvae", x_dim=20, z_dims=(3, 2), hidden=(8, 6), seed=1)
        for p in net.parameters():
            p.grad = np.random.default_rng(p.size).standard_normal(p.shape).astype(np.float32)
        params.append(net.parameters())
    opt_ref, opt_c = Adam(params[0], lr=2e-3), Adam(params[1], lr=2e-3)
    for _ in range(3):
        opt_ref.step()
        adam_step(opt_c)
    for a, b in zip(params[0], params[1]):
        np.testing.assert_allclose(b.data, a.data, rtol=1e-5, atol=1e-6)


def median_us(fn, n=300):
    for _ in range(20):
        fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e6 * float(np.median(times))


def main():
    with tempfile.TemporaryDirectory() as folder:
        lib, flags = compile_library(folder)
        forward, backward, adam_step = fused_functions(lib)
        check_against_reference(forward, backward, adam_step)
        print(f"compiled with {flags}; batch norm and Adam match layers.py (float32)")
        print("\nbatch norm + leaky ReLU, training mode, 256 rows (median us per call):")
        rng = np.random.default_rng(1)
        for width in (8, 64, 512):
            x = rng.standard_normal((256, width)).astype(np.float32)
            g = rng.standard_normal((256, width)).astype(np.float32)
            gamma, beta = np.ones(width, np.float32), np.zeros(width, np.float32)
            out, xhat, _, var = layers.batch_norm_forward(x, gamma, beta, 1e-4, slope=0.01)
            times = [median_us(lambda: f(x, gamma, beta, 1e-4, slope=0.01))
                     for f in (layers.batch_norm_forward, forward)]
            times += [median_us(lambda: f(g, out, xhat, gamma, var, 1e-4, True, 0.01))
                      for f in (layers.batch_norm_backward, backward)]
            print(f"  {width:4d} units: forward NumPy {times[0]:6.1f}, C {times[1]:6.1f};  "
                  f"backward NumPy {times[2]:6.1f}, C {times[3]:6.1f}")
        step_ratio(forward, backward, adam_step)


def step_ratio(forward, backward, adam_step, rounds=12, per_round=6):
    ds = data.load_dataset("mnist")
    batches = data.iterate_minibatches(ds.train_x, 256, np.random.default_rng(0))
    xs = [next(batches) for _ in range(8)]
    net = lvae.build_model("lvae", seed=0)
    opt = Adam(net.parameters(), lr=2e-3)
    noise = lvae.Noise(1)
    variants = {"NumPy reference": (layers.batch_norm_forward, layers.batch_norm_backward,
                                    Adam.step),
                "C batch norm + Adam": (forward, backward, adam_step)}
    times = {name: [] for name in variants}
    try:
        for _ in range(rounds):
            for name, (fwd, bwd, step) in variants.items():
                layers.batch_norm_forward, layers.batch_norm_backward, Adam.step = fwd, bwd, step
                for i in range(per_round + 1):
                    t0 = time.perf_counter()
                    noise.new_step()
                    objective, _ = lvae.elbo(net, xs[i % len(xs)], noise, beta=1.0)
                    opt.zero_grad()
                    (-objective).backward()
                    opt.step()
                    if i:  # the first step of a round warms the caches up
                        times[name].append(time.perf_counter() - t0)
    finally:
        layers.batch_norm_forward, layers.batch_norm_backward, Adam.step = variants[
            "NumPy reference"]
    print(f"\ntraining step, paper's LVAE, batch 256, float32 ({rounds} alternating rounds "
          f"of {per_round} steps; load average {os.getloadavg()[0]:.2f}):")
    base = np.median(times["NumPy reference"])
    for name, t in times.items():
        print(f"  {name:20s} median {1e3 * np.median(t):5.1f} ms, fastest {1e3 * min(t):5.1f} ms"
              f"  ({np.median(t) / base:.2f}x)")


if __name__ == "__main__":
    main()
