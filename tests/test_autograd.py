"""Tests of the autograd engine (autograd.py).

Every op is checked twice: its forward value against a NumPy expression, and its
backward() against central finite differences in float64. Test bodies take the ``xp``
fixture, so they run with NumPy and, under the ``gpu`` marker, with CuPy; the finite
differences are always computed with NumPy, so a CuPy run compares the GPU's analytic
gradients with a CPU reference.
"""
import numpy as np
import pytest

import autograd
from op_check import check_op  # noqa: E402
from autograd import (Tensor, bernoulli_log_prob, check_gradients, concatenate, get_array_module,
                      logsumexp, no_grad, numerical_gradient, record, record_multi, to_numpy)

RNG_SEED = 1234


# ----------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------
def like(t, a):
    """The NumPy array (or index) ``a`` moved to the array module of tensor ``t``."""
    xp = get_array_module(t)
    if isinstance(a, tuple):
        return tuple(like(t, i) for i in a)
    return xp.asarray(a) if isinstance(a, np.ndarray) else a


def sample(shape, domain="normal", seed=RNG_SEED):
    """Random float64 inputs in a domain where the op is smooth."""
    rng = np.random.default_rng(seed)
    if domain == "normal":
        return rng.standard_normal(shape)
    if domain == "wide":  # well into the saturating parts of sigmoid / softplus
        return rng.uniform(-8, 8, shape)
    if domain == "positive":
        return rng.uniform(0.5, 2.0, shape)
    if domain == "above_minus_half":
        return rng.uniform(-0.5, 2.0, shape)
    if domain == "nonzero":  # |x| in [0.5, 2]: fine for 1/x and the kink of leaky_relu
        return rng.uniform(0.5, 2.0, shape) * rng.choice([-1.0, 1.0], shape)
    if domain == "unit":
        return rng.uniform(0.0, 1.0, shape)
    raise ValueError(domain)


def sigmoid_ref(x):
    with np.errstate(over="ignore"):  # exp(1000) = inf gives 1 / inf = 0: correct
        return 1 / (1 + np.exp(-x))


# ----------------------------------------------------------------------------------
# Elementwise unary ops
# ----------------------------------------------------------------------------------
UNARY = [
    ("exp", autograd.exp, np.exp, "normal"),
    ("log", autograd.log, np.log, "positive"),
    ("log1p", autograd.log1p, np.log1p, "above_minus_half"),
    ("sqrt", autograd.sqrt, np.sqrt, "positive"),
    ("square", autograd.square, np.square, "normal"),
    ("sigmoid", autograd.sigmoid, sigmoid_ref, "wide"),
    ("softplus", autograd.softplus, lambda x: np.log1p(np.exp(x)), "wide"),
    ("leaky_relu", autograd.leaky_relu, lambda x: np.where(x > 0, x, 0.01 * x), "nonzero"),
    ("leaky_relu slope 0.2", lambda t: autograd.leaky_relu(t, 0.2),
     lambda x: np.where(x > 0, x, 0.2 * x), "nonzero"),
    # the edge of [0, 1): a plain ReLU (MLP(..., slope=0) is accepted, so it must run)
    ("leaky_relu slope 0", lambda t: autograd.leaky_relu(t, 0),
     lambda x: np.maximum(x, 0), "nonzero"),
    ("neg", autograd.neg, np.negative, "normal"),
    ("power 3", lambda t: autograd.power(t, 3), lambda x: x ** 3, "normal"),
    ("power 0.5", lambda t: autograd.power(t, 0.5), np.sqrt, "positive"),
    ("power -1.5", lambda t: autograd.power(t, -1.5), lambda x: x ** -1.5, "positive"),
    ("Tensor.exp()", lambda t: t.exp(), np.exp, "normal"),
    ("Tensor.log()", lambda t: t.log(), np.log, "positive"),
]


@pytest.mark.parametrize("name, op, ref, domain", UNARY, ids=[u[0] for u in UNARY])
def test_unary_op(xp, name, op, ref, domain):
    x = sample((3, 4), domain)
    check_op(xp, op, x, expected=ref(x), what=name)


SCALAR_OPERATORS = [
    ("2 * x", lambda t: 2 * t, lambda x: 2 * x, "normal"),
    ("x * 2", lambda t: t * 2, lambda x: x * 2, "normal"),
    ("x + 1.5", lambda t: t + 1.5, lambda x: x + 1.5, "normal"),
    ("1.5 + x", lambda t: 1.5 + t, lambda x: 1.5 + x, "normal"),
    ("x - 1", lambda t: t - 1, lambda x: x - 1, "normal"),
    ("1 - x", lambda t: 1 - t, lambda x: 1 - x, "normal"),
    ("x / 3", lambda t: t / 3, lambda x: x / 3, "normal"),
    ("1 / x", lambda t: 1 / t, lambda x: 1 / x, "nonzero"),
    ("3 / x", lambda t: 3 / t, lambda x: 3 / x, "nonzero"),
    ("-x", lambda t: -t, lambda x: -x, "normal"),
    ("x ** 2", lambda t: t ** 2, lambda x: x ** 2, "normal"),
    ("x ** 0.5", lambda t: t ** 0.5, np.sqrt, "positive"),
    ("x ** -1", lambda t: t ** -1, lambda x: 1 / x, "nonzero"),
    ("array * x", lambda t: like(t, np.arange(12.0).reshape(3, 4)) * t,
     lambda x: np.arange(12.0).reshape(3, 4) * x, "normal"),
    ("x - array (broadcast)", lambda t: t - like(t, np.arange(4.0)),
     lambda x: x - np.arange(4.0), "normal"),
]


@pytest.mark.parametrize("name, op, ref, domain", SCALAR_OPERATORS,
                         ids=[s[0] for s in SCALAR_OPERATORS])
def test_python_operator_with_constant(xp, name, op, ref, domain):
    x = sample((3, 4), domain)
    check_op(xp, op, x, expected=ref(x), what=name)


# ----------------------------------------------------------------------------------
# Elementwise binary ops with broadcasting
# ----------------------------------------------------------------------------------
BINARY = [
    ("add", autograd.add, np.add),
    ("sub", autograd.sub, np.subtract),
    ("mul", autograd.mul, np.multiply),
    ("div", autograd.div, np.divide),
    ("a + b", lambda a, b: a + b, np.add),
    ("a - b", lambda a, b: a - b, np.subtract),
    ("a * b", lambda a, b: a * b, np.multiply),
    ("a / b", lambda a, b: a / b, np.divide),
]
SHAPES = [((3, 4), (3, 4)), ((3, 1), (4,)), ((4,), (3, 1)), ((2, 3, 4), (4,)),
          ((4,), (2, 3, 4)), ((2, 1, 4), (3, 1)), ((), (2, 3)), ((2, 3), ())]


@pytest.mark.parametrize("shapes", SHAPES, ids=[f"{a}-{b}" for a, b in SHAPES])
@pytest.mark.parametrize("name, op, ref", BINARY, ids=[b[0] for b in BINARY])
def test_binary_op_broadcasting(xp, name, op, ref, shapes):
    a = sample(shapes[0], "normal", seed=1)
    b = sample(shapes[1], "nonzero", seed=2)  # nonzero: b is a denominator for div
    check_op(xp, op, a, b, expected=ref(a, b), what=f"{name} with shapes {shapes}")


MATMUL_SHAPES = [((3, 4), (4, 5)),          # 2-D
                 ((2, 3, 4), (4, 5)),       # a batch against a 2-D weight
                 ((2, 3, 4), (2, 4, 5)),    # batched
                 ((1, 3, 4), (2, 4, 5)),    # batch dimension broadcast on a
                 ((3, 4), (2, 4, 5)),       # 2-D against a batch
                 ((2, 1, 3, 4), (5, 4, 2))]  # two batch dims broadcast together


@pytest.mark.parametrize("shapes", MATMUL_SHAPES, ids=[f"{a}@{b}" for a, b in MATMUL_SHAPES])
def test_matmul(xp, shapes):
    a, b = sample(shapes[0], seed=1), sample(shapes[1], seed=2)
    check_op(xp, autograd.matmul, a, b, expected=a @ b, what=f"matmul {shapes}")
    check_op(xp, lambda s, t: s @ t, a, b, expected=a @ b, what=f"operator @ {shapes}")


def test_matmul_with_constant_operands(xp):
    a, w = sample((2, 3, 4), seed=1), sample((4, 5), seed=2)
    check_op(xp, lambda t: t @ like(t, w), a, expected=a @ w, what="tensor @ array")
    check_op(xp, lambda t: like(t, a) @ t, w, expected=a @ w, what="array @ tensor (rmatmul)")


# ----------------------------------------------------------------------------------
# Reductions
# ----------------------------------------------------------------------------------
AXES = [None, 0, 1, -1, (0, 2), (2, 0), (-1, 0), (0, 1, 2)]


@pytest.mark.parametrize("keepdims", [False, True])
@pytest.mark.parametrize("axis", AXES, ids=str)
@pytest.mark.parametrize("name", ["sum", "mean"])
def test_sum_and_mean(xp, name, axis, keepdims):
    x = sample((2, 3, 4))
    op = getattr(autograd, name)
    ref = getattr(np, name)(x, axis=axis, keepdims=keepdims)
    check_op(xp, lambda t: op(t, axis, keepdims), x, expected=ref,
             what=f"{name}(axis={axis}, keepdims={keepdims})")
    check_op(xp, lambda t: getattr(t, name)(axis=axis, keepdims=keepdims), x, expected=ref,
             what=f"Tensor.{name}(axis={axis}, keepdims={keepdims})")


@pytest.mark.parametrize("keepdims", [False, True])
@pytest.mark.parametrize("axis", AXES, ids=str)
def test_logsumexp(xp, axis, keepdims):
    x = sample((2, 3, 4)) * 3
    ref = np.log(np.exp(x).sum(axis=axis, keepdims=keepdims))
    check_op(xp, lambda t: logsumexp(t, axis, keepdims), x, expected=ref,
             what=f"logsumexp(axis={axis}, keepdims={keepdims})")


def test_logsumexp_of_a_row_of_only_minus_infinity_is_minus_infinity():
    """The case logsumexp's max-guard is for: max = -inf would give -inf - -inf = NaN."""
    x = Tensor(np.array([[-np.inf, -np.inf], [0.0, 1.0]]))
    with np.errstate(divide="ignore"):  # log(0) = -inf is the right answer here
        out = logsumexp(x, axis=1).data
    assert out[0] == -np.inf
    assert out[1] == pytest.approx(np.logaddexp(0.0, 1.0), rel=1e-12)


def test_logsumexp_with_some_minus_infinity(xp):
    x = np.array([[-np.inf, 0.0, 1.0], [2.0, -np.inf, -np.inf]])
    t = Tensor(xp.asarray(x), requires_grad=True)
    out = logsumexp(t, axis=1)
    expected = np.array([np.log(1 + np.e), 2.0])
    np.testing.assert_allclose(to_numpy(out.data), expected, rtol=1e-12,
                               err_msg="-inf entries should count as exp(-inf) = 0")
    out.sum().backward()
    softmax = np.array([[0, 1 / (1 + np.e), np.e / (1 + np.e)], [1, 0, 0]])
    np.testing.assert_allclose(to_numpy(t.grad), softmax, rtol=1e-12,
                               err_msg="the gradient should be the softmax, 0 at -inf entries")


# ----------------------------------------------------------------------------------
# Shape ops
# ----------------------------------------------------------------------------------
RESHAPES = [
    ("(6, 4)", lambda t: autograd.reshape(t, (6, 4)), lambda x: x.reshape(6, 4)),
    ("(-1,)", lambda t: autograd.reshape(t, (-1,)), lambda x: x.reshape(-1)),
    ("(4, 3, 2)", lambda t: autograd.reshape(t, (4, 3, 2)), lambda x: x.reshape(4, 3, 2)),
    ("method 4, 6", lambda t: t.reshape(4, 6), lambda x: x.reshape(4, 6)),
    ("method (24, 1)", lambda t: t.reshape((24, 1)), lambda x: x.reshape(24, 1)),
    ("method -1", lambda t: t.reshape(-1), lambda x: x.reshape(-1)),
]


@pytest.mark.parametrize("name, op, ref", RESHAPES, ids=[r[0] for r in RESHAPES])
def test_reshape(xp, name, op, ref):
    x = sample((2, 3, 4))
    check_op(xp, op, x, expected=ref(x), what=f"reshape {name}")


TRANSPOSES = [
    ("None", lambda t: autograd.transpose(t), lambda x: x.transpose()),
    ("(1, 0, 2)", lambda t: autograd.transpose(t, (1, 0, 2)), lambda x: x.transpose(1, 0, 2)),
    ("(2, 0, 1)", lambda t: autograd.transpose(t, (2, 0, 1)), lambda x: x.transpose(2, 0, 1)),
    ("(-1, 0, 1)", lambda t: autograd.transpose(t, (-1, 0, 1)), lambda x: x.transpose(2, 0, 1)),
    ("(0, -1, -2)", lambda t: autograd.transpose(t, (0, -1, -2)), lambda x: x.transpose(0, 2, 1)),
    (".T", lambda t: t.T, lambda x: x.T),
    ("method ()", lambda t: t.transpose(), lambda x: x.transpose()),
    ("method 1, 2, 0", lambda t: t.transpose(1, 2, 0), lambda x: x.transpose(1, 2, 0)),
    ("method (2, 1, 0)", lambda t: t.transpose((2, 1, 0)), lambda x: x.transpose(2, 1, 0)),
]


@pytest.mark.parametrize("name, op, ref", TRANSPOSES, ids=[r[0] for r in TRANSPOSES])
def test_transpose(xp, name, op, ref):
    x = sample((2, 3, 4))
    check_op(xp, op, x, expected=ref(x), what=f"transpose {name}")


INDICES = [
    ("int", 1),
    ("negative int", -1),
    ("slice", slice(1, 3)),
    ("strided slices", (slice(None), slice(0, None, 2))),
    ("ellipsis", (Ellipsis, 1)),
    ("int array with repeats", np.array([0, 2, 0, 0])),
    ("two int arrays, repeated pairs", (np.array([0, 1, 1, 3, 1]), np.array([2, 2, 0, 2, 2]))),
    ("slice and int array", (slice(None), np.array([1, 1, 0]))),
    ("boolean mask", np.array([True, False, True, True])),
]


@pytest.mark.parametrize("name, index", INDICES, ids=[i[0] for i in INDICES])
def test_getitem(xp, name, index):
    x = sample((4, 3))
    check_op(xp, lambda t: t[like(t, index)], x, expected=x[index], what=f"getitem {name}")


def test_getitem_with_a_tensor_index(xp):
    x = sample((4, 3))
    index = np.array([3, 3, 0])
    check_op(xp, lambda t: t[Tensor(like(t, index))], x, expected=x[index],
             what="getitem with an integer Tensor as index")
    # tensor() makes integers float32: NumPy's IndexError said only "arrays used as indices
    # must be of integer (or boolean) type"
    for made in ([0, 2], np.array([True, False, True, False])):
        with pytest.raises(TypeError, match=r"getitem: a Tensor index must hold integers or "
                                            r"booleans, got float32 \(tensor\(\) makes"):
            Tensor(xp.asarray(x))[autograd.tensor(xp.asarray(made))]


CONCATS = [("axis 0", [(2, 3), (4, 3)], 0),
           ("axis 1, three inputs", [(2, 3), (2, 1), (2, 2)], 1),
           ("axis -1", [(2, 3, 1), (2, 3, 2)], -1)]


@pytest.mark.parametrize("name, shapes, axis", CONCATS, ids=[c[0] for c in CONCATS])
def test_concatenate(xp, name, shapes, axis):
    arrays = [sample(s, seed=i) for i, s in enumerate(shapes)]
    check_op(xp, lambda *ts: concatenate(ts, axis=axis), *arrays,
             expected=np.concatenate(arrays, axis=axis), what=f"concatenate {name}")


def test_concatenate_with_a_constant(xp):
    a, c = sample((2, 3)), np.ones((1, 3))
    check_op(xp, lambda t: concatenate([t, like(t, c)]), a,
             expected=np.concatenate([a, c]), what="concatenate with a constant array")


# ----------------------------------------------------------------------------------
# Likelihood
# ----------------------------------------------------------------------------------
def test_bernoulli_log_prob(xp):
    logits, x = sample((3, 4), "wide", seed=1), sample((3, 4), "unit", seed=2)
    expected = x * logits - np.log1p(np.exp(logits))
    check_op(xp, bernoulli_log_prob, logits, x, expected=expected,
             what="bernoulli_log_prob (logits and targets)")
    binary = (x > 0.5).astype(np.float64)
    expected = binary * np.log(sigmoid_ref(logits)) + (1 - binary) * np.log(1 - sigmoid_ref(logits))
    check_op(xp, lambda t: bernoulli_log_prob(t, like(t, binary)), logits, expected=expected,
             what="bernoulli_log_prob against log p / log(1 - p) with binary targets")


# ----------------------------------------------------------------------------------
# Reused inputs (fan-out)
# ----------------------------------------------------------------------------------
REUSE = [
    ("x * x", lambda t: t * t, lambda x: x * x),
    ("x used by two branches", lambda t: autograd.exp(t) * t + t, lambda x: np.exp(x) * x + x),
    ("diamond", lambda t: (lambda a: (a + 1) * (a * 3))(t * 2), lambda x: (2 * x + 1) * 6 * x),
    ("x - x.mean(axis=0)", lambda t: t - t.mean(axis=0), lambda x: x - x.mean(axis=0)),
    ("x / x.sum()", lambda t: t / t.sum(), lambda x: x / x.sum()),
    ("softmax", lambda t: autograd.exp(t - logsumexp(t, axis=1, keepdims=True)),
     lambda x: np.exp(x) / np.exp(x).sum(axis=1, keepdims=True)),
    ("concatenate([x, x])", lambda t: concatenate([t, t]), lambda x: np.concatenate([x, x])),
    ("x[idx] + x[::-1]", lambda t: t[like(t, np.array([2, 2, 0]))] + t[::-1],
     lambda x: x[[2, 2, 0]] + x[::-1]),
]


@pytest.mark.parametrize("name, op, ref", REUSE, ids=[r[0] for r in REUSE])
def test_reused_input(xp, name, op, ref):
    x = sample((3, 4), "positive")
    check_op(xp, op, x, expected=ref(x), what=name)


def test_two_inputs_each_used_twice(xp):
    a, b = sample((3, 4), seed=1), sample((4,), "positive", seed=2)
    check_op(xp, lambda s, t: (s * t + s) / (t + autograd.square(s)), a, b,
             expected=(a * b + a) / (b + a * a), what="(a*b + a) / (b + a^2)")


# ----------------------------------------------------------------------------------
# Numerical stability at |x| = 1e3 (pytest.ini turns overflow warnings into errors)
# ----------------------------------------------------------------------------------
BIG = np.array([-1e3, -50.0, -1.0, 0.0, 1.0, 50.0, 1e3])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_softplus_and_sigmoid_are_stable(xp, dtype):
    atol = 1e-7 if dtype == np.float32 else 1e-15  # sigmoid(-50) = 2e-22 may round to 0
    for name, op, value, slope in [
            ("softplus", autograd.softplus, np.logaddexp(0, BIG), sigmoid_ref(BIG)),
            ("sigmoid", autograd.sigmoid, sigmoid_ref(BIG), sigmoid_ref(BIG) * sigmoid_ref(-BIG))]:
        t = Tensor(xp.asarray(BIG.astype(dtype)), requires_grad=True)
        out = op(t)
        out.sum().backward()
        got, grad = to_numpy(out.data), to_numpy(t.grad)
        assert np.all(np.isfinite(got)) and np.all(np.isfinite(grad)), (
            f"{name} at |x| = 1e3 should give finite values and gradients, got {got}, {grad}")
        np.testing.assert_allclose(got, value, rtol=1e-6, atol=atol,
                                   err_msg=f"{name} at large |x| should match the stable reference")
        np.testing.assert_allclose(grad, slope, rtol=1e-6, atol=atol,
                                   err_msg=f"d {name}/dx at large |x| should match the reference")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_bernoulli_log_prob_is_stable(xp, dtype):
    logits = np.array([1e3, 1e3, -1e3, -1e3, 0.0], dtype)
    target = np.array([1.0, 0.0, 1.0, 0.0, 1.0], dtype)
    t = Tensor(xp.asarray(logits), requires_grad=True)
    out = bernoulli_log_prob(t, Tensor(xp.asarray(target)))
    out.sum().backward()
    np.testing.assert_allclose(to_numpy(out.data), [0.0, -1e3, -1e3, 0.0, -np.log(2)], rtol=1e-6,
                               err_msg="BCE from logits at |logit| = 1e3: log p is 0 when the "
                                       "logit agrees with the target, -|logit| when it does not")
    np.testing.assert_allclose(to_numpy(t.grad), [0.0, -1.0, 1.0, 0.0, 0.5], atol=1e-6,
                               err_msg="d/dlogits = target - sigmoid(logits)")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_logsumexp_is_stable(xp, dtype):
    x = np.array([[1e3, 1e3], [-1e3, -1e3], [1e3, -1e3], [-1e3, -1e3 + np.log(3)]], dtype)
    t = Tensor(xp.asarray(x), requires_grad=True)
    out = logsumexp(t, axis=1)
    out.sum().backward()
    expected = np.array([1e3 + np.log(2), -1e3 + np.log(2), 1e3, -1e3 + np.log(4)])
    np.testing.assert_allclose(to_numpy(out.data), expected, rtol=1e-6,
                               err_msg="logsumexp at |x| = 1e3 should not overflow or underflow")
    softmax = np.array([[0.5, 0.5], [0.5, 0.5], [1.0, 0.0], [0.25, 0.75]])
    # float32 holds -1e3 + log(3) only to ~6e-5 (its spacing near 1000)
    np.testing.assert_allclose(to_numpy(t.grad), softmax, atol=1e-12 if dtype == np.float64 else 1e-4,
                               err_msg="the gradient of logsumexp is the softmax, also at 1e3")


# ----------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------
def test_matmul_shape_mismatch_names_both_shapes(xp):
    a, b = Tensor(xp.zeros((3, 4))), Tensor(xp.zeros((5, 6)))
    with pytest.raises(ValueError, match=r"matmul.*\(3, 4\).*\(5, 6\)"):
        a @ b
    with pytest.raises(ValueError, match=r"matmul.*\(4,\).*\(4, 2\)"):
        autograd.matmul(Tensor(xp.zeros(4)), Tensor(xp.zeros((4, 2))))
    with pytest.raises(ValueError, match=r"matmul.*\(2, 3, 4\).*\(5, 4, 6\)"):
        Tensor(xp.zeros((2, 3, 4))) @ Tensor(xp.zeros((5, 4, 6)))  # batch dims 2 and 5


@pytest.mark.parametrize("op", ["add", "sub", "mul", "div"])
def test_bad_broadcast_names_op_and_shapes(xp, op):
    a, b = Tensor(xp.ones((3, 4))), Tensor(xp.ones((3,)))
    with pytest.raises(ValueError, match=rf"{op}: shapes \(3, 4\) and \(3,\) cannot be broadcast"):
        getattr(autograd, op)(a, b)


def test_other_shape_errors(xp):
    t = Tensor(xp.ones((2, 3)))
    with pytest.raises(ValueError, match=r"reshape: cannot reshape \(2, 3\) into \(4, 2\)"):
        t.reshape(4, 2)
    with pytest.raises(ValueError, match=r"concatenate: shapes \(2, 3\), \(2, 2\)"):
        concatenate([t, Tensor(xp.ones((2, 2)))], axis=0)
    with pytest.raises(ValueError, match=r"bernoulli_log_prob: logits \(2, 3\) and targets \(3,\)"):
        bernoulli_log_prob(t, Tensor(xp.ones(3)))


BAD_AXES = [("sum", lambda t: t.sum(axis=2), r"axis 2 is out of range for shape \(2, 3\)"),
            ("sum", lambda t: t.sum(axis=-3), r"axis -3 is out of range"),
            ("sum", lambda t: t.sum(axis=(0, 0)), r"axis \(0, 0\) names an axis twice"),
            ("sum", lambda t: t.sum(axis=(0, -2)), r"axis \(0, -2\) names an axis twice"),
            ("sum", lambda t: t.sum(axis="a"), "axis must be an int or a tuple of ints, got 'a'"),
            ("mean", lambda t: t.mean(axis=5), r"axis 5 is out of range for shape \(2, 3\)"),
            ("logsumexp", lambda t: logsumexp(t, axis=3), r"axis 3 is out of range"),
            ("transpose", lambda t: t.transpose(1, 2), r"axes \(1, 2\) is out of range"),
            ("transpose", lambda t: t.transpose(0, 0), r"axes \(0, 0\) names an axis twice"),
            ("transpose", lambda t: t.transpose(0), r"axes \(0,\) are not an order of all the 2")]


@pytest.mark.parametrize("op, call, message", BAD_AXES,
                         ids=[f"{op}-{i}" for i, (op, _, _) in enumerate(BAD_AXES)])
def test_bad_axis_names_op_axis_and_shape(xp, op, call, message):
    """NumPy's own error would come from inside its reduction code; and transpose(1, 2) of
    a 2-D tensor once silently transposed it (2 % 2 = 0 made the axes (1, 0))."""
    with pytest.raises((TypeError, ValueError), match=f"{op}: {message}"):
        call(Tensor(xp.ones((2, 3))))


def test_logsumexp_over_an_empty_axis_is_a_clear_error(xp):
    """Its max shift has nothing to take the maximum of (NumPy: "zero-size array to
    reduction operation maximum"); reducing a non-empty axis of an empty tensor is fine."""
    empty = Tensor(xp.zeros((0, 3)))
    with pytest.raises(ValueError, match=r"logsumexp: cannot reduce shape \(0, 3\) over axis 0"):
        logsumexp(empty, axis=0)
    assert logsumexp(empty, axis=1).shape == (0,)


def test_concatenate_usage_errors(xp):
    """An empty list once raised IndexError (tensors[0]), a Tensor was silently joined row
    by row, and an axis the tensors lack was reported as shapes that "do not match"."""
    t = Tensor(xp.ones((2, 3)))
    with pytest.raises(ValueError, match="concatenate: expected at least one tensor, got none"):
        concatenate([])
    with pytest.raises(TypeError, match="concatenate: expected a list or tuple of tensors, "
                                        "got Tensor"):
        concatenate(t)
    with pytest.raises(ValueError, match=r"concatenate: axis 5 is out of range for shape \(2, 3\)"):
        concatenate([t, t], axis=5)
    with pytest.raises(TypeError, match=r"concatenate: axis must be an int, got \(0,\)"):
        concatenate([t, t], axis=(0,))
    with pytest.raises(ValueError, match=r"concatenate: shapes \(2, 3\), \(3,\) must match on "
                                         r"every axis but axis 0"):
        concatenate([t, Tensor(xp.ones(3))])
    # a generator of tensors is still taken
    assert concatenate(Tensor(xp.ones((1, 3))) for _ in range(2)).shape == (2, 3)
    with pytest.raises(TypeError, match="concatenate: expected a list or tuple of tensors, "
                                        "got ndarray"):
        concatenate(np.ones((2, 3)))


def test_other_usage_errors():
    with pytest.raises(TypeError, match="exponent must be a number"):
        Tensor(np.ones(2)) ** Tensor(np.ones(2))
    with pytest.raises(TypeError, match=r"power: the exponent must be a number .*got str"):
        Tensor(np.ones(2)) ** "a"  # once NumPy's "ufunc 'power' not supported"
    with pytest.raises(TypeError, match=r"leaky_relu: slope must be a number, got 'a'"):
        autograd.leaky_relu(Tensor(np.ones(2)), slope="a")  # once "'<=' not supported"
    with pytest.raises(ValueError, match=r"leaky_relu: slope must be in \[0, 1\), got 1.5"):
        autograd.leaky_relu(Tensor(np.ones(2)), slope=1.5)
    with pytest.raises(TypeError, match="at least one operand must be a Tensor"):
        autograd.add(1.0, 2.0)


def test_backward_on_non_scalar_without_seed_says_what_to_do(xp):
    x = Tensor(xp.ones((2, 3)), requires_grad=True)
    y = x * 2
    with pytest.raises(RuntimeError, match=r"shape \(2, 3\).*sum\(\).*backward\(grad\)"):
        y.backward()
    with pytest.raises(ValueError, match=r"grad has shape \(3,\), expected \(2, 3\)"):
        y.backward(xp.ones(3))
    with pytest.raises(RuntimeError, match="does not require grad"):
        Tensor(xp.ones(1)).backward()


def test_backward_seed_is_an_array_in_the_tensors_dtype(xp):
    """A Tensor seed made every leaf's .grad a Tensor; a list was "shape None"; a float64
    seed made the gradients of float32 parameters float64."""
    x = Tensor(xp.ones(3, dtype=np.float32), requires_grad=True)
    (x * 2).backward(Tensor(xp.ones(3)))
    assert isinstance(x.grad, get_array_module(x).ndarray) and x.grad.dtype == np.float32
    np.testing.assert_array_equal(to_numpy(x.grad), [2, 2, 2])
    with pytest.raises(TypeError, match=r"grad must be an array of shape \(3,\), got list"):
        (x * 2).backward([1.0, 1.0, 1.0])
    x.grad = None
    (x * 2).sum().backward(np.float64(1.0))  # a NumPy scalar for a one-number loss
    assert x.grad.dtype == np.float32


def test_data_that_is_not_numbers_is_refused():
    """None would become NaN through asarray, and a string or object array is no tensor."""
    for data in (None, "abc", np.array([None, 1.0]), np.array(["a"])):
        with pytest.raises(TypeError, match="Tensor data must be a NumPy or CuPy array of numbers"):
            Tensor(data)
    for data in (None, "abc", [[1.0], [2.0, 3.0]]):
        with pytest.raises(TypeError, match=r"expected numbers \(a Tensor, an array, a list or "
                                            r"a number\), got"):
            autograd.tensor(data)
    x = Tensor(np.ones(2, np.float32))
    with pytest.raises(TypeError, match="expected numbers.*got None"):
        x + None
    with pytest.raises(TypeError, match="expected numbers.*got 'a'"):
        x * "a"
    assert autograd.tensor(True).dtype == np.float32 and (x + np.int64(2)).dtype == np.float32


@pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")
def test_matrix_and_masked_arrays_are_refused():
    """np.matrix's * is a matrix product, so Tensor(m) * Tensor(m) gave m @ m with no
    error; a masked array's mask was dropped by the ops. Both are refused wherever data
    comes in: Tensor(), tensor(), and an array next to a binary op or given to a layer."""
    matrix = np.matrix([[1.0, 2.0], [3.0, 4.0]])
    masked = np.ma.masked_array([1.0, 2.0], mask=[False, True])
    for data in (matrix, masked):
        with pytest.raises(TypeError, match="Tensor data must be a plain array, got"):
            Tensor(data)
        with pytest.raises(TypeError, match="expected a plain array, got"):
            autograd.tensor(data)
    with pytest.raises(TypeError, match="matrix.*np.matrix's \\* is a matrix product"):
        Tensor(np.ones((2, 2))) * matrix
    with pytest.raises(TypeError, match="MaskedArray.*mask would be ignored"):
        autograd.exp(masked)
    plain = Tensor(np.asarray(matrix))  # the conversion the message suggests
    np.testing.assert_array_equal((plain * plain).data, [[1.0, 4.0], [9.0, 16.0]])


ONE_INPUT_OPS = [(name, getattr(autograd, name)) for name in (
    "exp", "log", "log1p", "sqrt", "square", "sigmoid", "softplus", "leaky_relu", "neg",
    "sum", "mean", "logsumexp", "transpose")] + [
    ("power", lambda x: autograd.power(x, 2)), ("reshape", lambda x: autograd.reshape(x, -1)),
    ("getitem", lambda x: autograd.getitem(x, 0)),
    ("concatenate", lambda x: concatenate([x, x]))]


@pytest.mark.parametrize("name, op", ONE_INPUT_OPS, ids=[o[0] for o in ONE_INPUT_OPS])
def test_every_op_takes_an_array_as_a_constant_and_refuses_other_types(xp, name, op):
    """As binary ops do, every op takes a NumPy or CuPy array in place of a Tensor (a
    constant); anything else is a TypeError naming the op and the type, not an
    AttributeError about .data from inside it."""
    x = xp.asarray(sample((2, 3), "positive"))
    out = op(x)
    np.testing.assert_array_equal(to_numpy(out.data), to_numpy(op(Tensor(x)).data))
    assert not out.requires_grad and get_array_module(out) is xp
    for bad, type_name in (("a", "str"), (None, "NoneType"), ([1.0, 2.0], "list")):
        with pytest.raises(TypeError, match=f"{name}: expected a Tensor or an array, got "
                                            f"{type_name}"):
            op(bad)


def test_item_of_any_one_element_tensor(xp):
    """backward() accepts any one-element result as the scalar loss; item() reads it back."""
    x = Tensor(xp.ones((1, 3)), requires_grad=True)
    loss = x.sum(axis=1)  # shape (1,)
    loss.backward()
    assert loss.item() == 3.0 and isinstance(loss.item(), float)
    with pytest.raises(ValueError,
                       match=r"item\(\) needs a tensor with one element, got shape \(1, 3\)"):
        x.item()


@pytest.mark.skipif(autograd.cuda_available(), reason="CUDA is available here")
def test_cuda_without_cuda_is_a_clear_error():
    with pytest.raises(RuntimeError, match=r"device 'cuda'.*not available.*device='cpu'"):
        autograd.check_device("cuda")
    with pytest.raises(RuntimeError, match="device 'cuda'"):
        autograd.to_device(np.ones(3), "cuda")


def test_cupy_older_than_14_is_named(monkeypatch):
    """CuPy 13 promotes as NumPy 1 did (a float32 array / 65536 is float64), and 13.2 and
    older fail under NumPy 2, so an older CuPy makes 'cuda' unavailable, and asking for it
    says which version was found."""
    for old in ("12.3.0", "13.2.0", "13.3.0", "13.6.0", "13.6.0rc1"):
        assert f"CuPy {old} is too old" in autograd.cupy_version_problem(old)
    for new in ("14.0.0", "14.0.0rc1", "14.2.0", "15.0.0"):
        assert autograd.cupy_version_problem(new) is None
    monkeypatch.setattr(autograd, "_CUDA_AVAILABLE", False)
    monkeypatch.setattr(autograd, "_CUDA_PROBLEM", autograd.cupy_version_problem("13.6.0"))
    with pytest.raises(RuntimeError, match=r"CUDA is not available here: CuPy 13.6.0 is too "
                                           r"old: CuPy 14.0 or newer.*device='cpu'"):
        autograd.check_device("cuda")


def test_unknown_device_is_an_error():
    with pytest.raises(ValueError, match=r"unknown device 'gpu'.*'cpu' or 'cuda'"):
        autograd.check_device("gpu")
    x = np.arange(3.0)
    y = autograd.to_device(x, "cpu")
    assert isinstance(y, np.ndarray) and np.array_equal(y, x) and autograd.check_device("cpu") == "cpu"


FLOAT32_OPS = [
    ("2 * x", lambda t: 2 * t), ("x * 2.5", lambda t: t * 2.5), ("x + 1", lambda t: t + 1),
    ("1 - x", lambda t: 1 - t), ("x / 3", lambda t: t / 3), ("1 / x", lambda t: 1 / t),
    ("x ** 2", lambda t: t ** 2), ("x ** 0.5", lambda t: t ** 0.5), ("-x", lambda t: -t),
    ("exp", autograd.exp), ("log", autograd.log), ("log1p", autograd.log1p),
    ("sqrt", autograd.sqrt), ("square", autograd.square), ("sigmoid", autograd.sigmoid),
    ("softplus", autograd.softplus), ("leaky_relu", autograd.leaky_relu),
    ("sum", lambda t: t.sum(axis=0)), ("mean", lambda t: t.mean()),
    ("logsumexp", lambda t: logsumexp(t, axis=1)),
    ("matmul", lambda t: t @ Tensor(get_array_module(t).ones((4, 2), dtype=np.float32))),
    ("bernoulli_log_prob", lambda t: bernoulli_log_prob(t, 0.5 * t)),
    ("getitem", lambda t: t[like(t, np.array([0, 0]))]), ("transpose", lambda t: t.T),
    ("concatenate", lambda t: concatenate([t, t], axis=1)),
    ("mean(x) - 0.1 / x", lambda t: t.mean(axis=1, keepdims=True) - 0.1 / t),
]


@pytest.mark.parametrize("name, op", FLOAT32_OPS, ids=[f[0] for f in FLOAT32_OPS])
def test_float32_stays_float32(xp, name, op):
    t = Tensor(xp.asarray(sample((3, 4), "positive"), dtype=np.float32), requires_grad=True)
    out = op(t)
    assert out.dtype == np.float32, f"{name} on float32 should give float32, got {out.dtype}"
    out.backward(xp.ones(out.shape, dtype=np.float32))
    assert t.grad.dtype == np.float32, (
        f"the gradient of {name} should be float32, got {t.grad.dtype}")


def test_tensor_constructor_dtypes():
    assert autograd.tensor([1, 2, 3]).dtype == np.float32, "lists should become float32"
    assert autograd.tensor(np.arange(3)).dtype == np.float32, "integer arrays should become float32"
    assert autograd.tensor(np.ones(2)).dtype == np.float64, "a float64 array should stay float64"
    assert autograd.tensor(np.ones(2), dtype=np.float32).dtype == np.float32, "dtype= should win"


# ----------------------------------------------------------------------------------
# Graph mechanics
# ----------------------------------------------------------------------------------
def test_no_grad_records_nothing(xp):
    x = Tensor(xp.ones(3), requires_grad=True)
    assert autograd.is_grad_enabled(), "recording should be on by default"
    with no_grad():
        assert not autograd.is_grad_enabled(), "recording should be off inside no_grad()"
        y = autograd.exp(x * 2).sum()
        a, b = record_multi([x.data, x.data], (x,), lambda grads: (grads[0],))
    for t in (y, a, b):
        assert t.requires_grad is False, "an op inside no_grad() should not require grad"
        assert t._parents == () and t._backward is None, "no_grad() should record no graph"
    assert autograd.is_grad_enabled(), "recording should be back on after no_grad()"
    assert (x * 2).requires_grad, "ops after no_grad() should record again"


def test_no_grad_nests_and_survives_exceptions():
    with no_grad():
        with no_grad():
            pass
        assert not autograd.is_grad_enabled(), "leaving an inner no_grad() should keep it off"
    with pytest.raises(KeyError):
        with no_grad():
            raise KeyError("boom")
    assert autograd.is_grad_enabled(), "an exception inside no_grad() should restore recording"


@pytest.mark.parametrize("n_ops", [1000, 5000])
def test_long_chain_backward_has_no_recursion_error(xp, n_ops):
    x = Tensor(xp.asarray(np.array([1.0, 2.0])), requires_grad=True)
    y = x
    for i in range(n_ops):
        y = y * 1.001 if i % 2 else y + 0.5
    y.sum().backward()
    np.testing.assert_allclose(to_numpy(x.grad), [1.001 ** (n_ops // 2)] * 2, rtol=1e-10,
                               err_msg=f"a chain of {n_ops} ops should backprop the product "
                                       f"of its local derivatives")


def test_gradients_accumulate_over_two_backward_calls(xp):
    x = Tensor(xp.asarray(np.array([1.0, -2.0, 3.0])), requires_grad=True)
    (x * x).sum().backward()
    np.testing.assert_allclose(to_numpy(x.grad), [2.0, -4.0, 6.0], err_msg="first backward: 2x")
    (x * x).sum().backward()
    np.testing.assert_allclose(to_numpy(x.grad), [4.0, -8.0, 12.0],
                               err_msg="a second backward() should add to the first (4x)")


def test_leaf_reached_by_many_paths_gets_the_sum(xp):
    x = Tensor(xp.asarray(np.array([0.5, 2.0])), requires_grad=True)
    terms = [x * k for k in range(1, 51)]
    total = terms[0]
    for t in terms[1:]:
        total = total + t
    total.sum().backward()
    np.testing.assert_allclose(to_numpy(x.grad), [1275.0, 1275.0],
                               err_msg="sum_k k*x over k = 1..50 should have gradient 1275")
    assert terms[0].grad is None, "intermediate (non-leaf) tensors should not keep a .grad"


def test_constants_and_detach_get_no_gradient(xp):
    x = Tensor(xp.asarray(np.array([1.0, 2.0])), requires_grad=True)
    c = Tensor(xp.asarray(np.array([3.0, 4.0])))
    (x * c + x.detach() * x).sum().backward()
    assert c.grad is None, "a tensor without requires_grad should get no gradient"
    np.testing.assert_allclose(to_numpy(x.grad), [4.0, 6.0],
                               err_msg="d/dx (x*c + stop(x)*x) = c + x: detach() cuts the graph")


def _split_halves(x):
    """A two-output op made with record_multi: the first k rows and the rest."""
    k = x.shape[0] // 2

    def backward(grads):
        xp = get_array_module(x.data)
        g = xp.zeros(x.shape, dtype=x.dtype)
        if grads[0] is not None:
            g[:k] = grads[0]
        if grads[1] is not None:
            g[k:] = grads[1]
        return (g,)
    return record_multi([x.data[:k], x.data[k:]], (x,), backward)


@pytest.mark.parametrize("use", ["first", "second", "both", "first twice"])
def test_record_multi(xp, use):
    data = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]])
    x = Tensor(xp.asarray(data), requires_grad=True)
    top, bottom = _split_halves(x)
    np.testing.assert_array_equal(to_numpy(top.data), data[:2], err_msg="first output")
    np.testing.assert_array_equal(to_numpy(bottom.data), data[2:], err_msg="second output")
    loss = {"first": lambda: (top * 3).sum(),
            "second": lambda: (bottom * bottom).sum(),
            "both": lambda: (top * 3).sum() + (bottom * bottom).sum(),
            "first twice": lambda: (top * 3).sum() + top.sum()}[use]()
    loss.backward()
    expected = {"first": np.r_[np.full((2, 2), 3.0), np.zeros((2, 2))],
                "second": np.r_[np.zeros((2, 2)), 2 * data[2:]],
                "both": np.r_[np.full((2, 2), 3.0), 2 * data[2:]],
                "first twice": np.r_[np.full((2, 2), 4.0), np.zeros((2, 2))]}[use]
    np.testing.assert_allclose(to_numpy(x.grad), expected,
                               err_msg=f"record_multi with {use} output(s) used: each output's "
                                       f"gradient should reach its rows, zeros elsewhere")


def test_record_multi_gradient_check():
    x = sample((4, 3))
    check_gradients(lambda t: (lambda a, b: concatenate([autograd.exp(a), b * a]))(
        *_split_halves(t)), x)


def test_record_with_constant_parents_records_nothing():
    c = Tensor(np.ones(2))
    out = record(c.data * 2, (c,), lambda g: (g,))
    assert not out.requires_grad and out._backward is None, (
        "an op whose parents need no gradient should not keep its backward")


# ----------------------------------------------------------------------------------
# The gradient checker itself
# ----------------------------------------------------------------------------------
def test_check_gradients_catches_a_wrong_backward():
    def bad_square(x):  # forgets the factor 2
        return record(x.data ** 2, (x,), lambda g: (g * x.data,))
    with pytest.raises(AssertionError, match="gradient of input 0 is wrong"):
        check_gradients(bad_square, sample((3,)))
    pairs = check_gradients(autograd.square, sample((3,)))
    assert len(pairs) == 1, "check_gradients should return one (analytic, numeric) pair per input"


def test_check_gradients_with_scalar_output():
    check_gradients(lambda t: (t * t).sum(), sample((2, 3)))


def test_numerical_gradient_on_non_contiguous_arrays():
    x = sample((3, 4))
    for name, arr in [("transposed", sample((4, 3)).T), ("Fortran-ordered", np.asfortranarray(x)),
                      ("strided view", sample((6, 4))[::2])]:
        grad = numerical_gradient(lambda a: float((a ** 3).sum()), [arr], 0)
        np.testing.assert_allclose(grad, 3 * arr ** 2, rtol=1e-6,
                                   err_msg=f"finite differences on a {name} array should be 3x^2")
    check_gradients(lambda t: t * t, np.asfortranarray(x))


def test_numerical_gradient_refuses_arrays_it_cannot_nudge():
    """An integer array truncated x +- eps: the gradient of x^2 at [1, 2] was [500000,
    1500000], with no error."""
    square = lambda a: float((a * a).sum())
    for arrays, got in [([np.array([1, 2])], "numpy.ndarray of dtype int64"),
                        ([[1.0, 2.0]], r"\[1.0, 2.0\]")]:
        with pytest.raises(TypeError, match=r"arrays\[0\] must be a floating-point NumPy array"
                                            r".*got " + got):
            numerical_gradient(square, arrays, 0)
    np.testing.assert_allclose(numerical_gradient(square, [np.array([1.0, 2.0])], 0), [2, 4])


def test_sum_to_undoes_broadcasting():
    g = np.ones((2, 3, 4))
    for shape, value in [((4,), 6), ((3, 1), 8), ((1, 3, 1), 8), ((), 24), ((2, 3, 4), 1)]:
        out = autograd.sum_to(g, shape)
        assert out.shape == shape, f"sum_to should give shape {shape}, got {out.shape}"
        np.testing.assert_array_equal(out, np.full(shape, float(value)),
                                      err_msg=f"sum_to {shape} should sum {value} ones")


def test_numpy_1_is_refused_with_a_clear_error():
    """NumPy 1.x promotes dtypes differently (a float32 0-d array / 3 is float64 there):
    importing the engine under it stops with an ImportError that says what to install."""
    for old in ("1.24.4", "1.26.0"):
        with pytest.raises(ImportError, match=f"needs NumPy 2.0 or newer, found NumPy {old}"):
            autograd.check_numpy_version(old)
    for new in ("2.0.2", "2.4.6", "3.0.0.dev0"):
        autograd.check_numpy_version(new)


@pytest.mark.parametrize("number", [0.5, np.float64(0.5), np.float32(0.5), np.int64(2)],
                         ids=["python_float", "numpy_float64", "numpy_float32", "numpy_int64"])
def test_numbers_take_the_tensor_dtype(number):
    """A number next to a Tensor, Python or NumPy scalar, takes the Tensor's dtype, as in
    PyTorch: NumPy 2 alone would make float32 * np.float64(0.5) float64, and a float64
    gradient would then flow into a float32 model (and meet its fused GPU kernels)."""
    for dtype in (np.float32, np.float64):
        x = Tensor(np.array([1.0, 2.0], dtype), requires_grad=True)
        y = (x * number + number - x / number).sum()
        assert y.dtype == dtype, f"{type(number).__name__} made {y.dtype} from {np.dtype(dtype)}"
        y.backward()
        assert x.grad.dtype == dtype
        np.testing.assert_allclose(x.grad, [float(number) - 1 / float(number)] * 2, rtol=1e-6)


def test_numbers_next_to_integer_tensors_promote_as_in_numpy():
    """A number is cast to a *floating* Tensor's dtype, but an integer or boolean Tensor
    would turn 0.5 into 0 (and 2.5 into 2): there NumPy 2's promotion applies instead."""
    ints = Tensor(np.array([1, 2, 3]))
    for got, expected in [((ints * 0.5).data, [0.5, 1.0, 1.5]),
                          ((ints / 2.5).data, [0.4, 0.8, 1.2]),
                          ((0.5 - ints).data, [-0.5, -1.5, -2.5]),
                          ((ints * [0.5]).data, [0.5, 1.0, 1.5]),
                          ((Tensor(np.array([True, False])) * 0.5).data, [0.5, 0.0])]:
        assert got.dtype == np.float64
        np.testing.assert_allclose(got, expected)
    assert (Tensor(np.array([1, 2], np.int32)) + 2).dtype == np.int32  # a Python int is "weak"
    with pytest.raises(OverflowError, match="Python integer 300 out of bounds for uint8"):
        Tensor(np.array([0], np.uint8)) + 300  # NumPy 2 raises too; the cast gave 44


def test_requires_grad_needs_floating_point_data():
    """The gradient of an integer is meaningless (it was computed, and rounded, as one)."""
    for make in (lambda: Tensor(np.arange(3), requires_grad=True),
                 lambda: Tensor(np.array([True]), requires_grad=True),
                 lambda: autograd.tensor(np.ones(3), dtype=np.int32, requires_grad=True)):
        with pytest.raises(TypeError, match="requires_grad=True must hold floating-point "
                                            "numbers, got dtype (int|bool)"):
            make()
    assert autograd.tensor(np.arange(3), requires_grad=True).dtype == np.float32


def test_check_gradients_checks_every_input():
    """A wrong gradient for the *second* input is caught: every input is compared, not
    only the first."""
    def bad_mul(a, b):  # d(ab)/db = a; this backward says 2a
        return record(a.data * b.data, (a, b), lambda g: (g * b.data, g * 2 * a.data))
    with pytest.raises(AssertionError, match="gradient of input 1 is wrong"):
        check_gradients(bad_mul, sample((3,)), sample((3,), seed=2))


def test_check_gradients_catches_a_missing_gradient():
    """A backward that returns None for an input the output depends on is a wrong
    gradient (0 against the finite differences), not a pass."""
    def forgets_b(a, b):
        return record(a.data * b.data, (a, b), lambda g: (g * b.data, None))
    with pytest.raises(AssertionError, match="gradient of input 1 is wrong"):
        check_gradients(forgets_b, sample((3,)), sample((3,), seed=2))


def test_check_gradients_on_a_function_that_cuts_or_leaves_the_graph():
    """An output built from .data records no graph: that is a wrong gradient (0), not
    backward()'s "no input was made with requires_grad=True"; a constant is right (0);
    an array instead of a Tensor was "'numpy.ndarray' object has no attribute 'backward'"."""
    with pytest.raises(AssertionError, match=r"gradient of input 0 is wrong: .* backward\(\) "
                                             r"gives 0, finite differences give"):
        check_gradients(lambda a: Tensor(a.data * 2), np.ones(3))
    check_gradients(lambda a: Tensor(np.ones(3)), np.ones(3))  # a constant: 0 is right
    with pytest.raises(TypeError, match=r"check_gradients: fn must return a Tensor, got "
                                        r"numpy.ndarray of dtype float64"):
        check_gradients(lambda a: a.data * 2, np.ones(3))


def test_check_gradients_weights_the_outputs_unevenly():
    """The outputs are weighted by a random w, so that a backward that puts g's entries in
    the wrong places is caught: reversing x with a backward that does not reverse g is
    right for g = 1 everywhere, and wrong for any other g."""
    def reverse_without_reversing_g(x):
        return record(x.data[::-1].copy(), (x,), lambda g: (g,))  # should be g[::-1]
    with pytest.raises(AssertionError, match="gradient of input 0 is wrong"):
        check_gradients(reverse_without_reversing_g, sample((4,)))


def test_check_gradients_catches_a_gradient_half_a_percent_off():
    """The default tolerance is tight enough to catch a backward 0.5 % off (finite
    differences in float64 agree to ~1e-8)."""
    def square_slightly_off(x):
        return record(x.data ** 2, (x,), lambda g: (g * 2.01 * x.data,))
    with pytest.raises(AssertionError, match="gradient of input 0 is wrong"):
        check_gradients(square_slightly_off, sample((3,), "positive"))
