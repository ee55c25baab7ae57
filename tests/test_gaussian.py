"""Tests of the maths of gaussian.py on NumPy (CPU only, about a second).

Each op's backward against finite differences (autograd.check_gradients, float64),
with the broadcasting the LVAE uses (one mu_hat of shape (B, d) shared by K samples of
mu_p of shape (K, B, d)) and with the default standard-normal prior; then each forward
against an independent computation: the merge against the renormalised product of the
two densities on a grid, the KL against a Monte Carlo estimate, log_normal against the
closed form and its integral; and finite results for variances from 1e-8 to 1e8.
"""
import math
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import autograd  # noqa: E402
import gaussian  # noqa: E402
from autograd import Tensor, check_gradients  # noqa: E402

K, B, D = 3, 4, 5


def means(rng, shape):
    return rng.standard_normal(shape)


def variances(rng, shape, low=0.2, high=3.0):
    return rng.uniform(low, high, shape)


def log_uniform(rng, shape, low, high):
    return np.exp(rng.uniform(math.log(low), math.log(high), shape))


# ----------------------------------------------------------------------------------
# Gradients against finite differences
# ----------------------------------------------------------------------------------
def merge_both(*t):
    """Both outputs of merge in one tensor, so that both get a gradient."""
    return autograd.concatenate(gaussian.merge(*t), axis=0)


@pytest.mark.parametrize("output", ["both", "mu_q only", "var_q only"])
@pytest.mark.parametrize("broadcast", [False, True], ids=["same shape", "(B,d) with (K,B,d)"])
def test_merge_gradients(output, broadcast):
    rng = np.random.default_rng(0)
    p_shape = (K, B, D) if broadcast else (B, D)
    arrays = (means(rng, (B, D)), variances(rng, (B, D)),
              means(rng, p_shape), variances(rng, p_shape))
    fn = {"both": merge_both,
          "mu_q only": lambda *t: gaussian.merge(*t)[0],  # var_q gets no gradient (None)
          "var_q only": lambda *t: gaussian.merge(*t)[1]}[output]
    check_gradients(fn, *arrays)


@pytest.mark.parametrize("output", ["both", "var_q only"])
def test_merge_with_variances_smaller_than_means(output):
    """var_q alone would come out (B, 1): merge broadcasts it to mu_q's (B, D), so that
    its gradient is not counted D times next to mu_q's in the backward."""
    rng = np.random.default_rng(0)
    arrays = (means(rng, (B, D)), variances(rng, (B, 1)), means(rng, (B, D)),
              variances(rng, (B, 1)))
    fn = merge_both if output == "both" else lambda *t: gaussian.merge(*t)[1]
    check_gradients(fn, *arrays)


@pytest.mark.parametrize("case", ["same shape", "q (K,B,d) against p (B,d)", "standard normal p"])
def test_kl_gradients(case):
    rng = np.random.default_rng(1)
    q = (means(rng, (K, B, D)), variances(rng, (K, B, D)))
    if case == "same shape":
        arrays = q + (means(rng, (K, B, D)), variances(rng, (K, B, D)))
    elif case == "standard normal p":
        arrays = q
    else:
        arrays = q + (means(rng, (B, D)), variances(rng, (B, D)))
    check_gradients(gaussian.gaussian_kl, *arrays)


@pytest.mark.parametrize("case", ["same shape", "z (K,B,d) against (B,d)", "standard normal"])
def test_log_normal_gradients(case):
    rng = np.random.default_rng(2)
    z = means(rng, (K, B, D))
    if case == "same shape":
        arrays = (z, means(rng, (K, B, D)), variances(rng, (K, B, D)))
    elif case == "standard normal":
        arrays = (z,)
    else:
        arrays = (z, means(rng, (B, D)), variances(rng, (B, D)))
    check_gradients(gaussian.log_normal, *arrays)


@pytest.mark.parametrize("eps_shape, var_shape", [
    ((B, D), (B, D)),
    ((K, B, D), (B, D)),  # what the model does: K samples of each image's (B, D) Gaussian
    ((K, B, D), (B, 1)),  # one variance per image, broadcast over units and samples
], ids=["same shape", "K samples", "K samples, var (B, 1)"])
def test_reparameterize_gradients(eps_shape, var_shape):
    rng = np.random.default_rng(3)
    eps = rng.standard_normal(eps_shape)
    mu, var = means(rng, (B, D)), variances(rng, var_shape)
    z = gaussian.reparameterize(Tensor(mu), Tensor(var), eps).data
    np.testing.assert_allclose(z, mu + np.sqrt(var) * eps, rtol=1e-13)
    check_gradients(lambda mu, var: gaussian.reparameterize(mu, var, eps), mu, var)


def test_the_standard_normal_defaults():
    """gaussian_kl(m, v) is the KL against N(0, 1); log_normal(z) is log N(z; 0, 1)."""
    rng = np.random.default_rng(4)
    m, v, z = means(rng, (B, D)), variances(rng, (B, D)), means(rng, (B, D))
    kl = gaussian.gaussian_kl(Tensor(m), Tensor(v)).data
    np.testing.assert_allclose(kl, 0.5 * (v + m * m - 1 - np.log(v)), rtol=1e-13)
    np.testing.assert_allclose(gaussian.log_normal(Tensor(z)).data,
                               -0.5 * z * z - 0.5 * math.log(2 * math.pi), rtol=1e-13)


def test_plain_arrays_and_numbers_give_the_values_of_tensors():
    """The ops accept arrays and numbers as constants: the same values as with Tensors,
    and the dtype of the arrays (float64 for numbers alone, as Python floats are)."""
    rng = np.random.default_rng(12)
    m, v, mp, vp, z, eps = (means(rng, (B, D)), variances(rng, (B, D)), means(rng, (B, D)),
                            variances(rng, (B, D)), means(rng, (B, D)), means(rng, (B, D)))
    pairs = [
        (gaussian.gaussian_kl(m, v, mp, vp), gaussian.gaussian_kl(*map(Tensor, (m, v, mp, vp)))),
        (gaussian.gaussian_kl(m, v), gaussian.gaussian_kl(Tensor(m), Tensor(v))),
        (gaussian.log_normal(z, m, v), gaussian.log_normal(*map(Tensor, (z, m, v)))),
        (gaussian.log_normal(z), gaussian.log_normal(Tensor(z))),
        (gaussian.merge(m, v, mp, vp)[0], gaussian.merge(*map(Tensor, (m, v, mp, vp)))[0]),
        (gaussian.merge(m, v, mp, vp)[1], gaussian.merge(*map(Tensor, (m, v, mp, vp)))[1]),
        (gaussian.reparameterize(m, v, eps), gaussian.reparameterize(Tensor(m), Tensor(v), eps)),
        (gaussian.gaussian_kl(Tensor(m), v, mp, 2.0), gaussian.gaussian_kl(*map(
            Tensor, (m, v, mp, np.full_like(m, 2.0))))),
    ]
    for got, expected in pairs:
        assert isinstance(got, Tensor)
        assert got.dtype == np.float64
        np.testing.assert_array_equal(got.data, expected.data)
    np.testing.assert_array_equal(gaussian.gaussian_kl(np.zeros(3), np.ones(3)).data, 0)
    assert gaussian.log_normal(np.zeros(2, np.float32)).dtype == np.float32


def test_numbers_take_the_dtype_of_the_first_tensor_not_of_the_first_array():
    """A float32 array before a float64 Tensor: the number 0.1 becomes float64 (the Tensor's
    dtype), so the result equals the float64 formula, not one rounded through float32."""
    m32 = np.array([0.3, -0.2], np.float32)
    v = Tensor(np.array([0.5, 2.0]))
    got = gaussian.gaussian_kl(m32, v, 0.1, 1.0)
    assert got.dtype == np.float64
    expected = gaussian.kl_forward(m32.astype(np.float64), v.data, 0.1, 1.0)
    np.testing.assert_allclose(got.data, expected, rtol=1e-14)
    # two Tensors: the first one's dtype, float32 here (0.1 rounded to float32), not the
    # last one's (last-Tensor-wins passed the case above, which has only one Tensor)
    got = gaussian.gaussian_kl(Tensor(m32), v, 0.1, 1.0)
    assert got.dtype == np.float64  # float32 with float64 gives float64
    f32 = [np.array(a, np.float32) for a in (0.1, 1.0)]
    expected = gaussian.kl_forward(m32, v.data, *f32)  # mu_q - mu_p in float32
    np.testing.assert_allclose(got.data, expected, rtol=1e-14)
    as_float64 = gaussian.kl_forward(m32, v.data, np.array(0.1), np.array(1.0))
    assert not np.allclose(got.data, as_float64, rtol=1e-10, atol=0), \
        "the case cannot tell the first Tensor's dtype from the last one's"
    kl = gaussian.gaussian_kl(0.5, 2.0)  # numbers only
    assert kl.dtype == np.float64
    assert float(kl.data) == pytest.approx(0.5 * (2.0 + 0.25 - 1 - math.log(2.0)), rel=1e-15)


def test_a_mixed_call_still_differentiates_the_tensors():
    """Arrays are constants: the Tensor inputs get their gradients, the arrays none."""
    rng = np.random.default_rng(13)
    mu = Tensor(means(rng, (B, D)), requires_grad=True)
    var = variances(rng, (B, D))
    gaussian.gaussian_kl(mu, var).sum().backward()
    np.testing.assert_allclose(mu.grad, mu.data, rtol=1e-13)  # d KL / d mu_q = mu_q / 1


@pytest.mark.parametrize("call, message", [
    (lambda: gaussian.gaussian_kl(np.zeros(3), "1"), r"gaussian_kl: var_q must be a Tensor, an "
                                                     r"array or a number, not str"),
    (lambda: gaussian.merge([0.0], 1.0, 0.0, 1.0), r"merge: mu_hat must be .* not list"),
    (lambda: gaussian.log_normal(None), r"log_normal: z must be .* not NoneType"),
    (lambda: gaussian.reparameterize(np.zeros(2), True, np.ones(2)),
     r"reparameterize: var must be .* not bool"),
    (lambda: gaussian.reparameterize(np.zeros(2), np.ones(2), None),
     r"reparameterize: eps must be .* not NoneType"),
], ids=["gaussian_kl str", "merge list", "log_normal None", "reparameterize bool",
        "reparameterize eps None"])
def test_other_inputs_are_a_clear_type_error(call, message):
    with pytest.raises(TypeError, match=message):
        call()


@pytest.mark.parametrize("call, message", [
    (lambda: gaussian.merge(Tensor(np.ones(3)), np.ones(3), np.zeros(4), np.ones(4)),
     r"merge: the input shapes do not broadcast together: mu_hat \(3,\), var_hat \(3,\), "
     r"mu_p \(4,\), var_p \(4,\)"),
    (lambda: gaussian.gaussian_kl(np.zeros(4), np.ones(3)),
     r"gaussian_kl: the input shapes .*: mu_q \(4,\), var_q \(3,\), mu_p \(\), var_p \(\)"),
    (lambda: gaussian.log_normal(np.zeros((2, 4)), np.zeros(3)),
     r"log_normal: the input shapes .*: z \(2, 4\), mu \(3,\), var \(\)"),
    (lambda: gaussian.reparameterize(np.zeros(4), np.ones(4), np.ones((2, 3))),
     r"reparameterize: the input shapes .*: mu \(4,\), var \(4,\), eps \(2, 3\)"),
], ids=["merge", "gaussian_kl", "log_normal", "reparameterize eps"])
def test_shapes_that_do_not_broadcast_are_an_error_naming_the_op_and_shapes(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# ----------------------------------------------------------------------------------
# The merge
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("mu_hat, var_hat, mu_p, var_p", [
    (1.5, 0.3, -0.5, 2.0),
    (0.0, 1e-2, 3.0, 1e2),     # a confident encoder pulls the merge to itself
    (-2.0, 4.0, 2.0, 4.0),     # equal precisions: the midpoint, half the variance
])
def test_merge_is_the_renormalised_product_of_densities(mu_hat, var_hat, mu_p, var_p):
    """On a fine 1-D grid, N(x; mu_hat, var_hat) N(x; mu_p, var_p) renormalised has
    mean mu_q and variance var_q; its integral is N(mu_hat; mu_p, var_hat + var_p)."""
    sd = math.sqrt(max(var_hat, var_p))
    x = np.linspace(min(mu_hat, mu_p) - 15 * sd, max(mu_hat, mu_p) + 15 * sd, 400001)
    dx = x[1] - x[0]
    log_product = (gaussian.log_normal_forward(x, mu_hat, var_hat)
                   + gaussian.log_normal_forward(x, mu_p, var_p))
    density = np.exp(log_product)
    integral = density.sum() * dx
    mean = (x * density).sum() * dx / integral
    variance = ((x - mean) ** 2 * density).sum() * dx / integral

    mu_q, var_q = gaussian.merge_forward(np.float64(mu_hat), var_hat, mu_p, var_p)
    np.testing.assert_allclose(mean, mu_q, rtol=1e-9, atol=1e-12,
                               err_msg="merged mean: expected the mean of the product")
    np.testing.assert_allclose(variance, var_q, rtol=1e-8,
                               err_msg="merged variance: expected the product's variance")
    np.testing.assert_allclose(
        integral, math.exp(gaussian.log_normal_forward(np.float64(mu_hat), mu_p, var_hat + var_p)),
        rtol=1e-9, err_msg="the product integrates to N(mu_hat; mu_p, var_hat + var_p)")


def test_merge_equals_the_precision_form_for_extreme_variances():
    """var_q = 1/(1/var_hat + 1/var_p), mu_q = (mu_hat/var_hat + mu_p/var_p) var_q, for
    variances from 1e-8 to 1e8 (float64); the merge is symmetric and never wider than
    either input."""
    rng = np.random.default_rng(5)
    n = 10000
    mu_hat, mu_p = 100 * rng.standard_normal(n), 100 * rng.standard_normal(n)
    var_hat, var_p = log_uniform(rng, n, 1e-8, 1e8), log_uniform(rng, n, 1e-8, 1e8)
    mu_q, var_q = gaussian.merge_forward(mu_hat, var_hat, mu_p, var_p)

    precision_var = 1 / (1 / var_hat + 1 / var_p)
    np.testing.assert_allclose(var_q, precision_var, rtol=1e-14)
    # relative to the terms: mu_hat/var_hat and mu_p/var_p may nearly cancel
    terms = (np.abs(mu_hat) / var_hat + np.abs(mu_p) / var_p) * precision_var
    error = np.abs(mu_q - (mu_hat / var_hat + mu_p / var_p) * precision_var)
    assert np.all(error <= 1e-14 * terms), f"worst relative error {np.max(error / terms):.3g}"

    mu_swapped, var_swapped = gaussian.merge_forward(mu_p, var_p, mu_hat, var_hat)
    np.testing.assert_array_equal(var_swapped, var_q)
    np.testing.assert_allclose(mu_swapped, mu_q, rtol=1e-15, atol=1e-15 * terms.max())
    assert np.all(var_q <= np.minimum(var_hat, var_p))


def test_merge_limits():
    """A far more certain input wins: var_hat = 1e-8 against var_p = 1e8 gives q = hat."""
    mu_q, var_q = gaussian.merge_forward(np.array([3.0]), np.array([1e-8]),
                                         np.array([-7.0]), np.array([1e8]))
    np.testing.assert_allclose(mu_q, 3.0, rtol=1e-14)
    np.testing.assert_allclose(var_q, 1e-8, rtol=1e-14)


# ----------------------------------------------------------------------------------
# The KL divergence
# ----------------------------------------------------------------------------------
def test_kl_matches_monte_carlo():
    """E_q[log q(z) - log p(z)] over 1e6 samples of q, within 5 standard errors."""
    rng = np.random.default_rng(6)
    mu_q = np.array([0.3, 1.0, -0.7, 2.0])
    var_q = np.array([0.5, 2.0, 0.05, 1.0])
    mu_p = np.array([-0.2, 0.0, -0.5, 1.0])
    var_p = np.array([1.5, 1.0, 0.1, 4.0])
    n = 1_000_000
    z = mu_q + np.sqrt(var_q) * rng.standard_normal((n, 4))
    log_ratio = (gaussian.log_normal_forward(z, mu_q, var_q)
                 - gaussian.log_normal_forward(z, mu_p, var_p))
    estimate = log_ratio.mean(axis=0)
    standard_error = log_ratio.std(axis=0) / math.sqrt(n)
    kl = gaussian.kl_forward(mu_q, var_q, mu_p, var_p)
    assert np.all(np.abs(estimate - kl) < 5 * standard_error), (
        f"analytic KL {kl} against Monte Carlo {estimate} +- {standard_error}")


def test_kl_is_zero_for_equal_gaussians_and_positive_otherwise():
    rng = np.random.default_rng(7)
    mu, var = 10 * rng.standard_normal(1000), log_uniform(rng, 1000, 1e-8, 1e8)
    np.testing.assert_allclose(gaussian.kl_forward(mu, var, mu, var), 0, atol=1e-15)
    other_mu, other_var = 10 * rng.standard_normal(1000), log_uniform(rng, 1000, 1e-8, 1e8)
    assert np.all(gaussian.kl_forward(mu, var, other_mu, other_var) > 0)


# ----------------------------------------------------------------------------------
# The log-density
# ----------------------------------------------------------------------------------
def test_log_normal_closed_form():
    """Against -log(sqrt(2 pi var)) - (z - mu)^2 / (2 var), element by element in math."""
    rng = np.random.default_rng(8)
    z, mu = 10 * rng.standard_normal(200), 10 * rng.standard_normal(200)
    var = log_uniform(rng, 200, 1e-8, 1e8)
    expected = [-math.log(math.sqrt(2 * math.pi * v)) - (a - b) ** 2 / (2 * v)
                for a, b, v in zip(z, mu, var)]
    np.testing.assert_allclose(gaussian.log_normal_forward(z, mu, var), expected, rtol=1e-12)


@pytest.mark.parametrize("mu, var", [(0.0, 1.0), (-3.0, 1e-6), (5.0, 1e6)])
def test_log_normal_integrates_to_one(mu, var):
    t = np.linspace(-20, 20, 200001)  # in standard deviations: the spacing stays exact
    x = mu + math.sqrt(var) * t
    total = np.exp(gaussian.log_normal_forward(x, mu, var)).sum() * math.sqrt(var) * (t[1] - t[0])
    np.testing.assert_allclose(total, 1.0, rtol=1e-10, err_msg="a density integrates to 1")


# ----------------------------------------------------------------------------------
# Extreme variances
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_extreme_variances_give_finite_values_and_gradients(dtype):
    """Variances from 1e-8 to 1e8 (both inputs at either end), means up to +-100:
    every op's output and every gradient is finite in float32 and float64 (overflow
    would also raise, as pytest.ini turns RuntimeWarnings into errors)."""
    rng = np.random.default_rng(9)
    ends = np.array([1e-8, 1e8])
    shape = (4, 2, 2)  # every combination of the two ends for var_hat and var_p
    var_a = np.broadcast_to(ends[:, None], (2, 2))[None].repeat(4, 0)
    var_b = np.broadcast_to(ends[None, :], (2, 2))[None].repeat(4, 0)
    arrays = {
        "mu_a": (100 * rng.standard_normal(shape)).astype(dtype),
        "var_a": var_a.astype(dtype),
        "mu_b": (100 * rng.standard_normal(shape)).astype(dtype),
        "var_b": var_b.astype(dtype),
    }
    leaves = {k: Tensor(v, requires_grad=True) for k, v in arrays.items()}
    mu_a, var_a, mu_b, var_b = leaves.values()
    mu_q, var_q = gaussian.merge(mu_a, var_a, mu_b, var_b)
    outputs = [mu_q, var_q,
               gaussian.gaussian_kl(mu_a, var_a, mu_b, var_b),
               gaussian.gaussian_kl(mu_a, var_a),
               gaussian.log_normal(mu_b, mu_a, var_a),
               gaussian.reparameterize(mu_a, var_a, np.ones(shape, dtype))]
    loss = outputs[0].sum()
    for out in outputs:
        assert out.dtype == dtype
        assert np.all(np.isfinite(out.data)), "an op gave a non-finite value"
        loss = loss + out.sum()
    loss.backward()
    for name, leaf in leaves.items():
        assert np.all(np.isfinite(leaf.grad)), f"non-finite gradient for {name}"


def test_merge_with_a_zero_variance_returns_that_input():
    """The limit the docstring promises for the s = 1/(var_hat + var_p) forms: an input
    with variance 0 is certain, and the merge returns it exactly (mean, variance 0),
    where the precision forms would compute mu/0 and inf * 0 (and pytest.ini turns the
    divide-by-zero warning into an error)."""
    mu_q, var_q = gaussian.merge_forward(np.array([3.0, -1.0]), np.array([0.0, 2.0]),
                                         np.array([-7.0, 5.0]), np.array([2.0, 0.0]))
    np.testing.assert_array_equal(mu_q, [3.0, 5.0])
    np.testing.assert_array_equal(var_q, [0.0, 0.0])
