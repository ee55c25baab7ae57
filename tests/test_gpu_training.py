"""Training on CuPy: one full step against the NumPy step, and a short MNIST run.

Both need a CUDA device (marker `gpu`); they are skipped cleanly without one.
"""
import importlib
import json
import os

import numpy as np
import pytest

import autograd
import kernels
import layers
import lvae
from conftest import requires_cuda

pytestmark = [pytest.mark.gpu, requires_cuda]


class HostNoise:
    """The same eps on every device: drawn with NumPy, then moved to the data's device."""

    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)

    def normal(self, shape, like):
        eps = self.rng.standard_normal(shape).astype(like.dtype)
        return autograd.get_array_module(like).asarray(eps)

    def new_step(self):
        pass


def one_step(model_kind, device, fused, dtype):
    """Build a model from fixed weights, take one Adam step, return what it produced."""
    net = lvae.build_model(model_kind, z_dims=(16, 8, 4), hidden=(128, 64, 32), seed=5)
    net.astype(dtype)
    x = (np.random.default_rng(6).random((128, 784)) < 0.3).astype(dtype)
    if device == "cuda":
        net.to("cuda")
    optimizer = layers.Adam(net.parameters(), lr=LR, clip_norm=50.0)
    before = net.state_dict()
    kernels.set_fusion(fused)
    try:
        objective, terms = lvae.elbo(net, autograd.to_device(x, device), HostNoise(7), beta=0.5)
        optimizer.zero_grad()
        (-objective).backward()
        grads = {name: autograd.to_numpy(p.grad) for name, p in net.named_parameters()}
        optimizer.step()
    finally:
        kernels.set_fusion(True)
    return float(objective.data), grads, before, net.state_dict()


LR = 1e-3


def compare_steps(gpu, cpu, dtype, fused=True):
    """Assert that two one_step results agree (see the test's docstring)."""
    rtol = 1e-8 if dtype == np.float64 else 1e-3
    label = f"CuPy ({'fused' if fused else 'unfused'}) differs from NumPy"
    np.testing.assert_allclose(gpu[0], cpu[0], rtol=rtol, err_msg="objective differs")
    # some gradients are exactly zero in exact arithmetic (a shift that a batch norm
    # below removes): compare those on the scale of all the arrays, not their own
    overall = max(np.abs(g).max() for g in cpu[1].values())
    for name, expected in cpu[1].items():
        scale = max(np.abs(expected).max(), 1e-3 * overall)
        np.testing.assert_allclose(gpu[1][name], expected, rtol=0, atol=rtol * scale,
                                   err_msg=f"gradient {name}: {label}")
    # Adam's first step moves each weight by -lr g / (|g| + eps), i.e. by lr against the
    # sign of its gradient. Where the gradient is zero up to rounding its sign, and so the
    # step, is set by rounding: compare the steps where |g| > 1% of the largest gradient
    # (the two gradients agree far closer than that, so their signs agree), and require
    # that there are such entries. The batch-norm statistics (not Adam's) are compared as
    # values, to the gradients' tolerance on the scale of all of them.
    compared = 0
    for name, grad in cpu[1].items():
        decided = np.abs(grad) > 1e-2 * overall
        steps = [after[name][decided] - cpu[2][name][decided] for after in (gpu[3], cpu[3])]
        np.testing.assert_allclose(steps[0], steps[1], rtol=1e-3, atol=1e-3 * LR,
                                   err_msg=f"Adam's step of {name}: {label}")
        assert np.allclose(np.abs(steps[1]), LR, rtol=1e-2), f"{name}: a first step of lr"
        compared += int(decided.sum())
    assert compared > 1000, f"only {compared} weights had a decided step"
    buffers = [k for k in cpu[3] if k not in cpu[1]]
    scale = max(np.abs(cpu[3][k]).max() for k in buffers)
    for name in buffers:
        np.testing.assert_allclose(gpu[3][name], cpu[3][name], rtol=0, atol=rtol * scale,
                                   err_msg=f"{name} after the step: {label}")


@pytest.mark.parametrize("model_kind", ["lvae", "vae"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_a_training_step_on_cupy_equals_the_numpy_step(model_kind, fused, dtype):
    """Same weights, same eps: the objective, every gradient and Adam's step agree with
    NumPy: gradients to 1e-8 (float64) or 1e-3 (float32) of each array's largest value (at
    least a thousandth of the largest of all); the step of every weight whose gradient's
    sign is not a matter of rounding, to 1e-3 of its size (see compare_steps). cuBLAS and
    OpenBLAS sum in different orders."""
    compare_steps(one_step(model_kind, "cuda", fused, dtype),
                  one_step(model_kind, "cpu", True, dtype), dtype, fused)


def test_a_short_mnist_run_on_the_gpu(tmp_path):
    """One epoch of the paper's LVAE on MNIST with device=cuda: it learns (test ELBO above
    -140 nats after one epoch; about -126 is typical) and writes a checkpoint that loads on
    the CPU."""
    import train
    importlib.reload(train)
    out = tmp_path / "run"
    assert train.main(["--device=cuda", "--epochs=1", "--warmup=0", "--eval_lk_samples=100",
                       "--eval_lk_images=200", "--final_lk_samples=0", "--log_interval=0",
                       f"--out_dir={out}"]) == 0
    importlib.reload(train)
    with open(os.path.join(out, "final.json")) as f:
        final = json.load(f)
    assert final["test_elbo"] > -140, f"after one epoch on the GPU the test ELBO is {final['test_elbo']}"
    net = lvae.build_model("lvae")
    import checkpoint
    checkpoint.load_weights(os.path.join(out, "ckpt.npz"), net)  # host arrays: loads on the CPU
    assert autograd.get_array_module(net.output.weight.data) is np
