"""check_op: the forward/backward check shared by the engine's and the layers' tests."""
import numpy as np

from autograd import Tensor, get_array_module, no_grad, numerical_gradient, to_numpy


def check_op(xp, fn, *arrays, expected=None, rtol=1e-5, atol=1e-7, what="op"):
    """Check ``fn`` (Tensors -> Tensor) on float64 inputs.

    Forward on ``xp`` against ``expected`` (an array computed with NumPy), then the
    gradient of sum(fn(...) * w), w fixed and random, against finite differences of the
    same function evaluated with NumPy.
    """
    arrays = [np.array(a, dtype=np.float64) for a in arrays]
    leaves = [Tensor(xp.asarray(a), requires_grad=True) for a in arrays]
    out = fn(*leaves)
    assert get_array_module(out) is xp, f"{what}: output should stay on {xp.__name__}"
    if expected is not None:
        expected = np.asarray(expected)
        assert out.shape == expected.shape, (
            f"{what}: forward shape should be {expected.shape}, got {out.shape}")
        np.testing.assert_allclose(to_numpy(out.data), expected, rtol=1e-10, atol=1e-12,
                                   err_msg=f"{what}: forward should equal the NumPy expression")
    weights = np.random.default_rng(0).standard_normal(out.shape)
    out.backward(xp.asarray(weights))

    def scalar(*arrs):
        with no_grad():
            return float((to_numpy(fn(*[Tensor(a) for a in arrs]).data) * weights).sum())

    for i, (leaf, a) in enumerate(zip(leaves, arrays)):
        numeric = numerical_gradient(scalar, [x.copy() for x in arrays], i)
        assert leaf.grad is not None, f"{what}: input {i} should have received a gradient"
        assert leaf.grad.shape == a.shape, (
            f"{what}: gradient of input {i} should have the input's shape {a.shape}, "
            f"got {leaf.grad.shape}")
        np.testing.assert_allclose(
            to_numpy(leaf.grad), numeric, rtol=rtol, atol=atol,
            err_msg=f"{what}: backward() for input {i} should match central finite differences")
