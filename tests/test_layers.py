"""Tests of the layers and the optimiser (layers.py).

The single-op layers (linear, batch_norm) are checked against NumPy expressions and
central finite differences in float64; the modules against the formulas in their
docstrings; Adam against its update written out by hand. Bodies that take ``xp`` run
with NumPy and, under the ``gpu`` marker, with CuPy.
"""
import math
import types

import numpy as np
import pytest

import autograd
import layers
from autograd import Tensor, get_array_module, no_grad, to_numpy
from op_check import check_op
from conftest import requires_cuda
from layers import (MLP, Adam, BatchNorm, Dense, GaussianLayer, LeakyReLU, Module, batch_norm,
                    linear, recompute_batchnorm_statistics)

EPS = 1e-4  # batch norm's epsilon (BatchNorm's default)


# ----------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------
def device_of(xp):
    return "cpu" if xp is np else "cuda"


def normalise(x, mean, var, gamma, beta, eps=EPS):
    return (x - mean) / np.sqrt(var + eps) * gamma + beta


def leaky(x, slope=0.01):
    return np.where(x > 0, x, slope * x)


# ----------------------------------------------------------------------------------
# linear
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("x_shape", [(5, 3), (2, 4, 3)], ids=["2-D input", "3-D input"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no bias"])
def test_linear(xp, x_shape, with_bias):
    rng = np.random.default_rng(0)
    x, w, b = rng.standard_normal(x_shape), rng.standard_normal((3, 4)), rng.standard_normal(4)
    if with_bias:
        check_op(xp, linear, x, w, b, expected=x @ w + b, what=f"linear {x_shape} with bias")
    else:
        check_op(xp, linear, x, w, expected=x @ w, what=f"linear {x_shape} without bias")


def test_linear_shape_error_names_shapes():
    with pytest.raises(ValueError, match=r"linear: input has 5 features \(shape \(2, 5\)\).*"
                                         r"expects 3 \(shape \(3, 4\)\)"):
        linear(Tensor(np.ones((2, 5))), Tensor(np.ones((3, 4))))


@pytest.mark.parametrize("call, message", [
    (lambda: linear(Tensor(np.ones((2, 3))), Tensor(np.ones((3, 2))), Tensor(np.ones(5))),
     r"linear: bias has shape \(5,\), but the weight of shape \(3, 2\) needs \(2,\)"),
    (lambda: linear(Tensor(np.ones((2, 3))), Tensor(np.ones(3))),
     r"linear: the weight must be 2-D \(n_in, n_out\), got shape \(3,\)"),
    (lambda: Dense(2, 3)(np.array(1.0, np.float32)),
     r"linear: input has no features \(shape \(\)\) but the weight expects 2"),
    (lambda: Dense.from_arrays(np.zeros((2, 3)), np.zeros(5)),
     r"Dense.from_arrays: bias has shape \(5,\), but the weight of shape \(2, 3\) needs "
     r"\(3,\)"),
    (lambda: batch_norm(Tensor(np.ones((4, 3))), Tensor(np.ones(3)), Tensor(np.zeros(3)), 1e-4,
                        np.zeros(1), np.ones(3)),
     r"batch_norm: mean has shape \(1,\), gamma \(3,\)"),
], ids=["linear bias", "linear 1-D weight", "Dense 0-d input", "from_arrays bias",
        "batch_norm mean"])
def test_dense_and_batch_norm_shape_errors_name_the_op_and_shapes(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_linear_and_batch_norm_take_plain_arrays_as_constants():
    x, w = np.ones((2, 3), np.float32), np.full((3, 2), 0.5, np.float32)
    np.testing.assert_array_equal(linear(x, Tensor(w)).data, x @ w)
    np.testing.assert_array_equal(linear(Tensor(x), w).data, x @ w)
    norm = BatchNorm(3)
    x = np.random.default_rng(0).random((4, 3)).astype(np.float32)
    np.testing.assert_array_equal(norm(x).data, BatchNorm(3)(Tensor(x)).data)
    with pytest.raises(TypeError, match=r"linear: expected a Tensor or an array, got list"):
        linear([[1.0, 2.0, 3.0]], Tensor(w))


def test_dense_forward_and_parameters(xp):
    rng = np.random.default_rng(1)
    layer = Dense(3, 4, rng=rng).to(device_of(xp))
    layer.bias.data[...] = xp.asarray(np.arange(4.0, dtype=np.float32))
    x = rng.standard_normal((2, 5, 3)).astype(np.float32)
    y = layer(Tensor(xp.asarray(x)))
    expected = x @ to_numpy(layer.weight.data) + np.arange(4.0)
    assert y.shape == (2, 5, 4) and y.dtype == np.float32, (
        "Dense should map (2, 5, 3) to (2, 5, 4) float32")
    np.testing.assert_allclose(to_numpy(y.data), expected, rtol=1e-5, atol=1e-6,
                               err_msg="Dense should compute x W + b over the last axis")
    assert [n for n, _ in layer.named_parameters()] == ["weight", "bias"]
    no_bias = Dense(3, 4, bias=False, rng=rng)
    assert no_bias.bias is None and len(no_bias.parameters()) == 1, (
        "Dense(bias=False) should have the weight as its only parameter")


# ----------------------------------------------------------------------------------
# batch_norm (the op)
# ----------------------------------------------------------------------------------
def then_leaky(y, slope):
    """The batch norm's output, through the fused leaky ReLU when slope is not None (and
    far enough from its kink at 0 for finite differences with steps of 1e-6)."""
    if slope is None:
        return y
    assert np.abs(y).min() > 1e-4, "an output too near the kink: pick another seed"
    return leaky(y, slope)


SLOPES = pytest.mark.parametrize("slope", [None, 0.01, 0.2], ids=["no ReLU", "slope 0.01",
                                                                  "slope 0.2"])


@SLOPES
@pytest.mark.parametrize("x_shape", [(6, 3), (2, 4, 3)], ids=["2-D", "3-D"])
def test_batch_norm_training_mode(xp, x_shape, slope):
    rng = np.random.default_rng(2)
    x = rng.standard_normal(x_shape) * 2 + 1
    gamma, beta = rng.uniform(0.5, 2, 3), rng.standard_normal(3)
    rows = x.reshape(-1, 3)
    expected = then_leaky(normalise(x, rows.mean(0), rows.var(0), gamma, beta), slope)
    check_op(xp, lambda t, g, b: batch_norm(t, g, b, EPS, slope=slope)[0], x, gamma, beta,
             expected=expected, rtol=1e-5, atol=1e-6,
             what=f"batch_norm training {x_shape}, slope {slope} (x, gamma, beta)")
    _, mean, var = batch_norm(Tensor(xp.asarray(x)), Tensor(xp.asarray(gamma)),
                              Tensor(xp.asarray(beta)), EPS)
    np.testing.assert_allclose(to_numpy(mean), rows.mean(0), rtol=1e-12,
                               err_msg="batch_norm should return the batch mean")
    np.testing.assert_allclose(to_numpy(var), rows.var(0), rtol=1e-12,
                               err_msg="batch_norm should return the biased batch variance")


@SLOPES
@pytest.mark.parametrize("x_shape", [(6, 3), (2, 4, 3)], ids=["2-D", "3-D"])
def test_batch_norm_evaluation_mode(xp, x_shape, slope):
    rng = np.random.default_rng(3)
    x = rng.standard_normal(x_shape)
    gamma, beta = rng.uniform(0.5, 2, 3), rng.standard_normal(3)
    mean, var = rng.standard_normal(3), rng.uniform(0.5, 2, 3)
    def fn(t, g, b):  # the running statistics live where t lives (finite differences: NumPy)
        on = get_array_module(t).asarray
        return batch_norm(t, g, b, EPS, on(mean), on(var), slope=slope)[0]
    check_op(xp, fn, x, gamma, beta,
             expected=then_leaky(normalise(x, mean, var, gamma, beta), slope),
             what=f"batch_norm evaluation {x_shape}, slope {slope} (x, gamma, beta)")


# ----------------------------------------------------------------------------------
# BatchNorm (the module)
# ----------------------------------------------------------------------------------
def test_batchnorm_train_uses_batch_stats_and_eval_uses_running_averages(xp):
    rng = np.random.default_rng(4)
    bn = BatchNorm(3).to(device_of(xp))
    gamma, beta = np.array([1.0, 2.0, 0.5], np.float32), np.array([0.0, -1.0, 3.0], np.float32)
    bn.gamma.data[...], bn.beta.data[...] = xp.asarray(gamma), xp.asarray(beta)
    x = (rng.standard_normal((8, 3)) * 3 + 5).astype(np.float32)
    y = to_numpy(bn(Tensor(xp.asarray(x))).data)
    np.testing.assert_allclose(y, normalise(x, x.mean(0), x.var(0), gamma, beta), rtol=1e-4,
                               atol=1e-4, err_msg="training mode should normalise with the batch's "
                                                  "mean and biased variance")

    running_mean, running_var = np.array([1.0, -2.0, 0.5]), np.array([4.0, 0.25, 1.0])
    bn.running_mean.data[...] = xp.asarray(running_mean)
    bn.running_var.data[...] = xp.asarray(running_var)
    bn.eval()
    y = to_numpy(bn(Tensor(xp.asarray(x))).data)
    np.testing.assert_allclose(y, normalise(x, running_mean, running_var, gamma, beta),
                               rtol=1e-5, atol=1e-5,
                               err_msg="evaluation mode should normalise with the running averages")
    y_first = to_numpy(bn(Tensor(xp.asarray(x[:1]))).data)
    np.testing.assert_allclose(
        y_first, y[:1], rtol=1e-6,
        err_msg="in evaluation mode a row's output should not depend on the batch")
    np.testing.assert_array_equal(to_numpy(bn.running_mean.data), running_mean.astype(np.float32),
                                  err_msg="evaluation mode should not change the running averages")


def test_batchnorm_running_average_update(xp):
    rng = np.random.default_rng(5)
    bn = BatchNorm(3, momentum=0.1).to(device_of(xp))
    mean, var = np.zeros(3), np.ones(3)  # the initial running averages
    for n in (2, 4, 7, 10):  # 2: the smallest batch, where unbiasing doubles the variance
        x = (rng.standard_normal((n, 3)) * 2 + 3).astype(np.float32)
        bn(Tensor(xp.asarray(x)))
        # running = (1 - momentum) * running + momentum * batch, variance unbiased (ddof=1)
        mean = 0.9 * mean + 0.1 * x.mean(0, dtype=np.float64)
        var = 0.9 * var + 0.1 * x.var(0, ddof=1, dtype=np.float64)
    np.testing.assert_allclose(to_numpy(bn.running_mean.data), mean, rtol=1e-5,
                               err_msg="running mean should follow the momentum formula")
    np.testing.assert_allclose(to_numpy(bn.running_var.data), var, rtol=1e-5,
                               err_msg="running variance should follow the momentum formula "
                                       "with the unbiased batch variance")


def test_batchnorm_momentum_none_gives_exact_average(xp):
    rng = np.random.default_rng(6)
    bn = BatchNorm(2, momentum=None).to(device_of(xp))
    batches = [(rng.standard_normal((n, 2)) * 2 - 1).astype(np.float32) for n in (3, 5, 8, 4)]
    for b in batches:
        bn(Tensor(xp.asarray(b)))
    np.testing.assert_allclose(to_numpy(bn.running_mean.data),
                               np.mean([b.mean(0) for b in batches], axis=0), rtol=1e-5,
                               err_msg="momentum=None: running mean = average of the batch means")
    np.testing.assert_allclose(to_numpy(bn.running_var.data),
                               np.mean([b.var(0, ddof=1) for b in batches], axis=0), rtol=1e-5,
                               err_msg="momentum=None: running var = average of the unbiased "
                                       "batch variances")


def _mlp_batch_stats(model, batch):
    """NumPy reference: the inputs of each batch norm of an MLP in training mode."""
    a, stats = batch.astype(np.float64), []
    for dense, bn in zip(model.dense, model.norms):
        h = a @ to_numpy(dense.weight.data).astype(np.float64)
        stats.append((h.mean(0), h.var(0, ddof=1)))
        a = leaky(normalise(h, h.mean(0), h.var(0), to_numpy(bn.gamma.data), to_numpy(bn.beta.data),
                            bn.eps), model.slope)
    return stats


@pytest.mark.parametrize("was_training", [False, True], ids=["from eval", "from train"])
def test_recompute_batchnorm_statistics(was_training):
    rng = np.random.default_rng(7)
    model = MLP(3, [4, 5], rng=rng)
    for bn in model.norms:  # make the second layer's input depend on the first's gamma, beta
        bn.gamma.data[...] = rng.uniform(0.5, 2, bn.gamma.shape)
        bn.beta.data[...] = rng.standard_normal(bn.beta.shape)
        bn.running_mean.data[...] = 100.0  # stale values that must be replaced
    model.train(was_training)
    batches = [rng.standard_normal((n, 3)).astype(np.float32) * 2 + 1 for n in (5, 8, 6)]
    outputs = []
    recompute_batchnorm_statistics(model, batches, lambda b: outputs.append(model(Tensor(b))))

    per_batch = [_mlp_batch_stats(model, b) for b in batches]
    for i, bn in enumerate(model.norms):
        np.testing.assert_allclose(to_numpy(bn.running_mean.data),
                                   np.mean([s[i][0] for s in per_batch], axis=0),
                                   rtol=1e-4, atol=1e-5,
                                   err_msg=f"norm {i}: running mean should be the exact mean of "
                                           f"the batch means")
        np.testing.assert_allclose(to_numpy(bn.running_var.data),
                                   np.mean([s[i][1] for s in per_batch], axis=0), rtol=1e-4,
                                   err_msg=f"norm {i}: running var should be the exact mean of the "
                                           f"unbiased batch variances")
        assert bn.momentum == 0.1, "the momentum should be restored afterwards"
    assert all(m.training == was_training for m in model.modules()), (
        f"every module's training flag should be restored to {was_training}")
    assert not any(o.requires_grad for o in outputs), "the statistics pass should record no graph"


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_recompute_batchnorm_statistics_restores_everything_on_error(error):
    """An error (or Ctrl-C) in the second batch: the statistics are the trained ones
    again, not the reset values nor an average over the first batch."""
    model = MLP(3, [4], rng=np.random.default_rng(8)).eval()
    norm = model.norms[0]
    norm.running_mean.data[...], norm.running_var.data[...] = 2.0, 3.0  # "trained" values
    norm.batches_seen = 7
    calls = []

    def failing_forward(batch):
        model(Tensor(batch))
        calls.append(1)
        if len(calls) == 2:
            raise error("boom")
    batches = [np.random.default_rng(i).random((4, 3)).astype(np.float32) for i in range(3)]
    with pytest.raises(error, match="boom"):
        recompute_batchnorm_statistics(model, batches, failing_forward)
    np.testing.assert_array_equal(norm.running_mean.data, 2.0, err_msg="the mean was not restored")
    np.testing.assert_array_equal(norm.running_var.data, 3.0, err_msg="the variance was not restored")
    assert norm.batches_seen == 7
    assert norm.momentum == 0.1 and not norm.training, (
        "momentum and training flag should be restored even when forward raises")
    assert autograd.is_grad_enabled(), "gradient recording should be back on"


@pytest.mark.parametrize("batches", [[], (b for b in [])], ids=["empty list", "used-up generator"])
def test_recompute_batchnorm_statistics_without_batches_keeps_the_statistics(batches):
    model = MLP(3, [4], rng=np.random.default_rng(8)).eval()
    norm = model.norms[0]
    norm.running_mean.data[...], norm.running_var.data[...] = 2.0, 3.0  # "trained" values
    list(batches)  # a generator used up before the call, e.g. by an earlier pass
    with pytest.raises(ValueError, match=r"recompute_batchnorm_statistics: no batches.*left as "
                                         r"they were"):
        recompute_batchnorm_statistics(model, batches, lambda b: model(Tensor(b)))
    np.testing.assert_array_equal(norm.running_mean.data, 2.0, err_msg="the mean was reset")
    np.testing.assert_array_equal(norm.running_var.data, 3.0, err_msg="the variance was reset")
    assert norm.momentum == 0.1 and not norm.training


@pytest.mark.parametrize("forward", [
    lambda model, copy, b: copy(Tensor(b)),                   # another model's batch norms
    lambda model, copy, b: model.eval()(Tensor(b)),           # this model, in eval mode
], ids=["another model", "eval mode"])
def test_recompute_batchnorm_statistics_refuses_a_forward_that_misses_a_batch_norm(forward):
    """Such a forward left the statistics at mean 0, variance 1, with no error."""
    model = MLP(3, [4], rng=np.random.default_rng(8)).eval()
    copy = MLP(3, [4], rng=np.random.default_rng(8))
    norm = model.norms[0]
    norm.running_mean.data[...], norm.running_var.data[...] = 2.0, 3.0  # "trained" values
    batches = [np.random.default_rng(1).standard_normal((5, 3)).astype(np.float32)]
    with pytest.raises(ValueError, match=r"forward\(batch\) ran 1 of the model's 1 batch norms "
                                         r"on no batch.*left as they were"):
        recompute_batchnorm_statistics(model, batches, lambda b: forward(model, copy, b))
    np.testing.assert_array_equal(norm.running_mean.data, 2.0, err_msg="the mean was reset")
    np.testing.assert_array_equal(norm.running_var.data, 3.0, err_msg="the variance was reset")
    assert norm.momentum == 0.1 and not norm.training


# ----------------------------------------------------------------------------------
# Dense initialisation
# ----------------------------------------------------------------------------------
def test_dense_glorot_init():
    layer = Dense(400, 300, init="glorot", rng=np.random.default_rng(9))
    w = layer.weight.data
    limit = math.sqrt(6.0 / (400 + 300))
    assert w.dtype == np.float32 and w.shape == (400, 300), "weight should be (400, 300) float32"
    assert np.abs(w).max() <= limit, f"glorot weights should lie in [-{limit:.4f}, {limit:.4f}]"
    assert np.abs(w).max() > 0.99 * limit, "glorot weights should fill the interval"
    assert abs(w.std() / (limit / math.sqrt(3)) - 1) < 0.02, (
        f"glorot std should be limit / sqrt(3) = {limit / math.sqrt(3):.4f}, got {w.std():.4f}")
    assert abs(w.mean()) < 0.01 * limit, "glorot weights should have mean 0"
    np.testing.assert_array_equal(layer.bias.data, np.zeros(300), err_msg="bias should start at 0")


def test_dense_he_init():
    w = Dense(500, 200, init="he", rng=np.random.default_rng(10)).weight.data
    std = math.sqrt(2.0 / 500)
    assert abs(w.std() / std - 1) < 0.02, (
        f"he std should be sqrt(2 / fan_in) = {std:.4f}, got {w.std():.4f}")
    assert abs(w.mean()) < 0.01 * std, "he weights should have mean 0"


def test_dense_unknown_init_is_an_error():
    with pytest.raises(ValueError, match=r"unknown init 'xavier'.*'glorot' or 'he'"):
        Dense(3, 4, init="xavier")


def test_dense_init_is_reproducible_with_a_seeded_rng():
    a = Dense(5, 4, rng=np.random.default_rng(11)).weight.data
    b = Dense(5, 4, rng=np.random.default_rng(11)).weight.data
    np.testing.assert_array_equal(a, b, err_msg="the same seed should give the same weights")


@pytest.mark.parametrize("n_in, n_out, error, message", [
    (0, 5, ValueError, r"Dense: n_in must be a positive int, got 0"),
    (-1, 5, ValueError, r"Dense: n_in must be a positive int, got -1"),
    (3, 0, ValueError, r"Dense: n_out must be a positive int, got 0"),
    (2.0, 5, TypeError, r"Dense: n_in must be an int, got 2.0 \(float\)"),
    (3, True, TypeError, r"Dense: n_out must be an int, got True \(bool\)"),
], ids=["n_in 0", "n_in negative", "n_out 0", "n_in float", "n_out bool"])
def test_dense_sizes_must_be_positive_ints(n_in, n_out, error, message):
    with pytest.raises(error, match=message):
        Dense(n_in, n_out)


def test_batch_norm_input_checks():
    with pytest.raises(ValueError, match=r"BatchNorm: n_features must be a positive int, got 0"):
        BatchNorm(0)
    with pytest.raises(TypeError, match=r"BatchNorm: n_features must be an int, got 3.0"):
        BatchNorm(3.0)
    norm = BatchNorm(3)
    with pytest.raises(ValueError, match=r"input of shape \(4, 5\) for 3 features: its last "
                                         r"axis must have 3"):
        norm(Tensor(np.ones((4, 5), np.float32)))
    with pytest.raises(ValueError, match=r"training mode needs at least 2 rows, got 1"):
        norm(Tensor(np.ones((1, 3), np.float32)))
    assert norm.eval()(Tensor(np.ones((1, 3), np.float32))).shape == (1, 3)  # fine in evaluation


@pytest.mark.parametrize("make, error, message", [
    (lambda: BatchNorm(3, momentum=2), ValueError,
     r"BatchNorm: momentum must be in \[0, 1\], got 2"),
    (lambda: BatchNorm(3, momentum=-1), ValueError, r"BatchNorm: momentum must be in \[0, 1\]"),
    (lambda: BatchNorm(3, momentum="a"), TypeError,
     r"BatchNorm: momentum must be a number, got 'a'"),
    (lambda: BatchNorm(3, eps=0), ValueError, r"BatchNorm: eps must be in \(0, inf\), got 0"),
    (lambda: BatchNorm(3, eps=-1), ValueError, r"BatchNorm: eps must be in \(0, inf\), got -1"),
    (lambda: BatchNorm(3, dtype=np.int32), TypeError, r"BatchNorm: dtype must be a floating-point"),
    (lambda: GaussianLayer(3, 2, var_eps=-1), ValueError,
     r"GaussianLayer: var_eps must be in \(0, inf\), got -1"),
    (lambda: GaussianLayer(3, 2, batch_norm="no"), TypeError,
     r"GaussianLayer: batch_norm must be True or False, got 'no'"),
    (lambda: MLP(3, []), ValueError, r"MLP: sizes is empty"),
    (lambda: MLP(3, 5), TypeError, r"MLP: sizes must be a list of layer sizes, e.g. \[512, 512\], "
                                   r"got 5"),
    (lambda: MLP(3, [4], batch_norm="yes"), TypeError,
     r"MLP: batch_norm must be True or False, got 'yes'"),
    (lambda: MLP(3, [4], slope=-5), ValueError, r"MLP: slope must be in \[0, 1\), got -5"),
    (lambda: BatchNorm(3)(np.ones((4, 3), np.float32), slope=-5), ValueError,
     r"batch_norm: slope must be in \[0, 1\), got -5"),
    (lambda: Dense(2, 3, dtype=np.int32), TypeError,
     r"Dense: dtype must be a floating-point type \(e.g. float32, float64\), got int32"),
    (lambda: Dense(2, 3, dtype="foo"), TypeError, r"Dense: 'foo' is not a NumPy dtype"),
    (lambda: Dense(2, 3, rng=5), TypeError,
     r"Dense: rng must be a NumPy random generator \(np.random.default_rng\(seed\)\), got 5"),
    (lambda: Dense(2, 3, bias="no"), TypeError, r"Dense: bias must be True or False, got 'no'"),
    (lambda: Dense(2, 2).train("no"), TypeError, r"train: mode must be True or False, got 'no'"),
    (lambda: Dense(2, 2).astype(np.int32), TypeError, r"astype: dtype must be a floating-point"),
    (lambda: Dense(2, 2).load_state_dict("weight"), TypeError,
     r"load_state_dict: state must be a dict of \{name: array\}.*got str"),
    (lambda: Dense(2, 2).load_state_dict([1, 2]), TypeError, r"load_state_dict: .* got list"),
    (lambda: Dense(2, 2).load_state_dict({"weight": "ab", "bias": np.zeros(2)}), TypeError,
     r"load_state_dict: weight must be an array, got str"),
], ids=["momentum 2", "momentum -1", "momentum str", "eps 0", "eps -1", "BatchNorm int dtype",
        "var_eps -1", "GaussianLayer batch_norm str", "MLP no sizes", "MLP int sizes",
        "MLP batch_norm str", "MLP slope", "batch_norm slope", "Dense int dtype",
        "Dense unknown dtype", "Dense int rng", "Dense bias str", "train str", "astype int",
        "load str", "load list", "load str value"])
def test_settings_out_of_range_or_of_the_wrong_type_are_errors(make, error, message):
    with pytest.raises(error, match=message):
        make()


def test_edge_settings_are_accepted():
    """momentum=None (exact averages) and 1 (the last batch only) are meaningful; NumPy
    booleans are booleans; a float64 model is what gradient checks use."""
    assert BatchNorm(3, momentum=None).momentum is None
    assert BatchNorm(3, momentum=1).momentum == 1
    assert BatchNorm(3, momentum=0).momentum == 0  # frozen running statistics
    assert not Dense(2, 2).train(np.bool_(False)).training
    assert MLP(3, (4,), batch_norm=np.bool_(True), slope=0).batch_norm is True
    assert Dense(2, 2).astype(np.float64).weight.dtype == np.float64
    Dense(2, 2, rng=np.random.RandomState(0))


def test_dense_accepts_a_plain_array_as_a_constant():
    layer = Dense(3, 2, rng=np.random.default_rng(12))
    x = np.random.default_rng(13).random((4, 3)).astype(np.float32)
    y = layer(x)
    np.testing.assert_array_equal(y.data, layer(Tensor(x)).data)
    assert layer(np.ones((4, 3), np.uint8)).dtype == np.float32, (
        "integer input should take the weight's dtype")


def test_dense_on_a_list_is_a_clear_type_error():
    with pytest.raises(TypeError, match=r"Dense: expected a Tensor or an array, got list"):
        Dense(3, 2)([[1.0, 2.0, 3.0]])


# ----------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("use_bn", [True, False], ids=["batch norm", "no batch norm"])
def test_mlp_shapes(xp, use_bn):
    model = MLP(5, [7, 3], batch_norm=use_bn, rng=np.random.default_rng(12)).to(device_of(xp))
    assert model.n_out == 3, "n_out should be the last size"
    for shape in [(4, 5), (2, 4, 5)]:
        y = model(Tensor(xp.asarray(np.random.default_rng(0).standard_normal(shape), np.float32)))
        assert y.shape == shape[:-1] + (3,) and y.dtype == np.float32, (
            f"MLP(5, [7, 3]) should map {shape} to {shape[:-1] + (3,)} float32, "
            f"got {y.shape} {y.dtype}")
    assert all((d.bias is None) == use_bn for d in model.dense), (
        "dense layers should have a bias exactly when no batch norm follows")
    assert len(model.parameters()) == (2 + 4 if use_bn else 4), (
        "2 weights plus (gamma, beta) x 2 with batch norm, (weight, bias) x 2 without")


def test_mlp_is_dense_batchnorm_leaky_relu():
    rng = np.random.default_rng(13)
    model = MLP(3, [4], rng=rng)
    x = rng.standard_normal((6, 3)).astype(np.float32)
    h = x.astype(np.float64) @ model.dense[0].weight.data
    expected = leaky(normalise(h, h.mean(0), h.var(0), 1.0, 0.0))
    np.testing.assert_allclose(model(Tensor(x)).data, expected, rtol=1e-4, atol=1e-5,
                               err_msg="MLP block should be leaky_relu(BN(x W))")
    np.testing.assert_allclose(LeakyReLU(0.2)(Tensor(np.array([-2.0, 3.0]))).data, [-0.4, 3.0],
                               err_msg="LeakyReLU(0.2) should give 0.2 x for x < 0, x otherwise")


@pytest.mark.parametrize("use_bn", [True, False], ids=["batch norm", "no batch norm"])
def test_gaussian_layer_computes_its_formula(use_bn):
    """mu = [BN](h W_mu + b_mu), var = softplus([BN](h W_v + b_v)) + eps, in float64 with
    batch-norm scales and shifts away from their initial 1 and 0."""
    rng = np.random.default_rng(15)
    layer = GaussianLayer(5, 3, batch_norm=use_bn, rng=rng).astype(np.float64)
    for p in layer.parameters():
        p.data[...] = rng.normal(0.5, 1.0, p.shape)
    h = rng.standard_normal((7, 5))
    mu, var = layer(Tensor(h))

    def head(dense, norm):
        a = h @ dense.weight.data
        if norm is None:
            return a + dense.bias.data
        return normalise(a, a.mean(0), a.var(0), norm.gamma.data, norm.beta.data)
    expected_mu = head(layer.mean_dense, layer.mean_norm)
    expected_var = np.logaddexp(0, head(layer.var_dense, layer.var_norm)) + layer.var_eps
    np.testing.assert_allclose(mu.data, expected_mu, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(var.data, expected_var, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("use_bn", [True, False], ids=["batch norm", "no batch norm"])
def test_gaussian_layer(xp, use_bn):
    rng = np.random.default_rng(14)
    layer = GaussianLayer(5, 3, batch_norm=use_bn, rng=rng).to(device_of(xp))
    h = Tensor(xp.asarray(rng.standard_normal((6, 5)), np.float32))
    mu, var = layer(h)
    assert mu.shape == var.shape == (6, 3), (
        f"mu and var should be (6, 3), got {mu.shape}, {var.shape}")
    assert float(var.data.min()) > 0, "var should be positive"

    # very negative pre-activations: softplus underflows to 0, var_eps keeps log(var) finite
    if use_bn:
        layer.var_norm.beta.data[...] = -1e3
    else:
        layer.var_dense.bias.data[...] = -1e3
    mu, var = layer(h)
    log_var = autograd.log(var)
    assert float(var.data.min()) > 0, "var should stay positive for pre-activations of -1e3"
    assert np.all(np.isfinite(to_numpy(log_var.data))), "log(var) should be finite"
    np.testing.assert_allclose(to_numpy(var.data), layer.var_eps, rtol=1e-3,
                               err_msg="var should be var_eps when softplus underflows")
    (log_var.sum() + mu.sum()).backward()
    for name, p in layer.named_parameters():
        assert np.all(np.isfinite(to_numpy(p.grad))), f"the gradient of {name} should be finite"


def randomise_batch_norms(module, rng):
    """Running statistics, gamma and beta far from their initial 0 / 1 values."""
    for bn in module.modules():
        if isinstance(bn, BatchNorm):
            n = bn.gamma.shape[0]
            xp = get_array_module(bn.gamma.data)
            bn.running_mean.data[...] = xp.asarray(rng.standard_normal(n))
            bn.running_var.data[...] = xp.asarray(rng.uniform(0.1, 3.0, n))
            bn.gamma.data[...] = xp.asarray(rng.uniform(0.3, 2.0, n))
            bn.beta.data[...] = xp.asarray(rng.standard_normal(n))


@pytest.mark.parametrize("bias", [False, True], ids=["no bias", "bias"])
def test_fold_dense_and_norm_is_evaluation_mode_batch_norm(xp, bias):
    rng = np.random.default_rng(20)
    dense = Dense(6, 4, bias=bias, rng=rng).to(device_of(xp)).astype(np.float64)
    if bias:
        dense.bias.data[...] = xp.asarray(rng.standard_normal(4))
    norm = BatchNorm(4).to(device_of(xp)).astype(np.float64)
    randomise_batch_norms(norm, rng)
    norm.eval()
    x = Tensor(xp.asarray(rng.standard_normal((5, 6))))
    expected = to_numpy(norm(dense(x)).data)
    folded = layers.fold_dense_and_norm(dense, norm)
    np.testing.assert_allclose(to_numpy(folded(x).data), expected, rtol=1e-12, atol=1e-12,
                               err_msg="x (W a) + (a (b - m) + beta) should equal BN(x W + b)")


def test_fold_batch_norm_keeps_outputs_and_leaves_the_model_alone(xp):
    rng = np.random.default_rng(21)
    model = Module()
    model.block = MLP(6, [5, 4], rng=rng)
    model.head = GaussianLayer(4, 3, rng=rng)
    model.to(device_of(xp)).astype(np.float64)
    randomise_batch_norms(model, rng)
    before = model.state_dict()
    x = Tensor(xp.asarray(rng.standard_normal((7, 6))))
    folded = layers.fold_batch_norm(model)
    model.eval()
    expected = [to_numpy(t.data) for t in model.head(model.block(x))]
    got = [to_numpy(t.data) for t in folded.head(folded.block(x))]
    for e, g, name in zip(expected, got, ("mu", "var")):
        np.testing.assert_allclose(g, e, rtol=1e-10, atol=1e-12,
                                   err_msg=f"{name} of the folded copy should equal eval mode")
    assert not any(isinstance(m, BatchNorm) for m in folded.modules()), "no batch norm left"
    assert not folded.training, "the folded copy is for evaluation"
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(value, before[name], err_msg=f"{name} was changed")
    assert len(model.block.norms) == 2 and model.head.mean_norm is not None


# ----------------------------------------------------------------------------------
# Module: parameters, state_dict, modes, devices
# ----------------------------------------------------------------------------------
class Net(Module):
    def __init__(self, seed):
        rng = np.random.default_rng(seed)
        self.encoder = MLP(4, [6, 5], rng=rng)
        self.head = GaussianLayer(5, 2, rng=rng)

    def forward(self, x):
        return self.head(self.encoder(x))


NET_PARAMETERS = [
    "encoder.dense.0.weight", "encoder.dense.1.weight",
    "encoder.norms.0.gamma", "encoder.norms.0.beta",
    "encoder.norms.1.gamma", "encoder.norms.1.beta",
    "head.mean_dense.weight", "head.var_dense.weight",
    "head.mean_norm.gamma", "head.mean_norm.beta", "head.var_norm.gamma", "head.var_norm.beta"]


def test_parameters_have_a_deterministic_order():
    names = [n for n, _ in Net(0).named_parameters()]
    assert names == NET_PARAMETERS, (
        "parameters should come in order of definition, sub-modules in place")
    net = Net(0)
    assert [id(p) for p in net.parameters()] == [id(p) for p in net.parameters()], (
        "parameters() should return the same tensors in the same order every time")
    keys = list(net.state_dict())
    assert keys[:4] == ["encoder.dense.0.weight", "encoder.dense.1.weight",
                        "encoder.norms.0.gamma", "encoder.norms.0.beta"]
    assert "encoder.norms.0.running_mean" in keys and "head.var_norm.running_var" in keys, (
        "state_dict should hold the batch norm buffers as well")
    assert len(keys) == len(NET_PARAMETERS) + 2 * 4, (
        "state_dict should hold 12 parameters and 2 buffers for each of 4 norms")


def _outputs(net, x):
    with no_grad():
        mu, var = net(Tensor(x))
    return mu.data.copy(), var.data.copy()


def test_state_dict_round_trip():
    x = np.random.default_rng(15).standard_normal((8, 4)).astype(np.float32)
    a, b = Net(0), Net(1)
    a(Tensor(x))  # moves the running averages away from their initial values
    state = a.state_dict()
    b.load_state_dict(state)
    for name, t in b.named_tensors():
        np.testing.assert_array_equal(t.data, state[name], err_msg=f"{name} should be loaded")
        assert t.dtype == np.float32, f"{name} should keep the model's dtype"
    for mode in ("eval", "train"):
        getattr(a, mode)(), getattr(b, mode)()
        for out_a, out_b in zip(_outputs(a, x), _outputs(b, x)):
            np.testing.assert_array_equal(out_a, out_b, err_msg=f"a loaded model should give the "
                                                                f"same outputs ({mode} mode)")
    state["encoder.dense.0.weight"][...] = 7.0
    assert not np.any(b.encoder.dense[0].weight.data == 7.0), "loading should copy the arrays"
    a.encoder.dense[0].weight.data[...] = 8.0
    assert not np.any(a.state_dict()["encoder.dense.1.weight"] == 8.0)
    assert not np.any(b.state_dict()["encoder.dense.0.weight"] == 8.0), (
        "state_dict should hold copies, not the model's arrays")


def test_load_state_dict_errors():
    net = Net(0)
    before = net.state_dict()
    state = net.state_dict()
    del state["encoder.norms.0.gamma"]
    with pytest.raises(KeyError, match=r"missing keys \['encoder.norms.0.gamma'\]"):
        net.load_state_dict(state)
    state = net.state_dict()
    state["extra.weight"] = np.zeros(3)
    with pytest.raises(KeyError, match=r"unexpected keys \['extra.weight'\]"):
        net.load_state_dict(state)
    state = {k: v + 1 for k, v in net.state_dict().items()}
    state["head.var_dense.weight"] = np.zeros((2, 2))
    with pytest.raises(ValueError, match=r"head.var_dense.weight has shape \(2, 2\) in the state, "
                                         r"\(5, 2\) in the model"):
        net.load_state_dict(state)
    for name, value in net.state_dict().items():
        np.testing.assert_array_equal(value, before[name],
                                      err_msg="a failed load should leave the model unchanged")


def test_train_and_eval_propagate_to_submodules():
    net = Net(0)
    assert net.eval() is net, "eval() should return the module"
    assert all(not m.training for m in net.modules()), "eval() should reach every sub-module"
    assert net.train() is net, "train() should return the module"
    assert all(m.training for m in net.modules()), "train() should reach every sub-module"
    net.train(False)
    assert not net.head.var_norm.training and not net.encoder.norms[1].training, (
        "train(False) should act as eval()")
    assert len(list(net.modules())) == 1 + 1 + 2 + 2 + 1 + 4, (
        "modules() should list Net, MLP, 2 Dense, 2 BN, the head and its 4 sub-modules")


def test_to_cpu(xp):
    net = Net(0)
    x = np.random.default_rng(16).standard_normal((8, 4)).astype(np.float32)
    expected = _outputs(net.eval(), x)
    for p in net.parameters():
        p.grad = np.ones_like(p.data)
    assert net.to(device_of(xp)) is net, "to() should return the module"
    assert all(get_array_module(t) is xp for _, t in net.named_tensors()), (
        f"to({device_of(xp)!r}) should move every parameter and buffer")
    assert all(p.grad is None for p in net.parameters()), "to() should drop stale gradients"
    got = _outputs(net, xp.asarray(x))
    for e, g in zip(expected, got):
        np.testing.assert_allclose(to_numpy(g), e, rtol=1e-5, atol=1e-6,
                                   err_msg="outputs should not depend on the device")
    net.to("cpu")
    assert all(isinstance(t.data, np.ndarray) for _, t in net.named_tensors()), (
        "to('cpu') should give NumPy arrays")


@pytest.mark.skipif(autograd.cuda_available(), reason="CUDA is available here")
def test_a_tied_parameter_is_listed_once_and_stepped_once():
    """A sub-module held under two names (tied weights) is one set of parameters: listed
    twice, Adam would refuse it (or, before it checked, step it twice per update)."""
    class Tied(Module):
        def __init__(self):
            self.first = Dense(3, 3, rng=np.random.default_rng(0))
            self.second = self.first
    net = Tied()
    assert len(net.named_parameters()) == 4  # both names are kept (state_dict has both)
    assert [id(p) for p in net.parameters()] == [id(net.first.weight), id(net.first.bias)]
    opt = Adam(net.parameters(), lr=0.1)
    before = net.first.weight.data.copy()
    net.second(net.first(Tensor(np.ones((2, 3), np.float32)))).sum().backward()
    opt.step()
    # one Adam step moves each weight by lr (|m_hat / sqrt(v_hat)| = 1 on the first step)
    np.testing.assert_allclose(np.abs(net.first.weight.data - before), 0.1, rtol=1e-3)


def test_module_to_cuda_without_cuda_is_a_clear_error():
    with pytest.raises(RuntimeError, match=r"device 'cuda'.*not available"):
        Net(0).to("cuda")


def test_module_to_unknown_device_is_an_error():
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        Net(0).to("gpu")


# ----------------------------------------------------------------------------------
# Adam
# ----------------------------------------------------------------------------------
def adam_reference(p, grads, lr, b1=0.9, b2=0.999, eps=1e-8, scales=None):
    """Adam written out: m, v, bias corrections, update, one step per gradient."""
    m, v = np.zeros_like(p), np.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        g = g * (1.0 if scales is None else scales[t - 1])
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g ** 2
        m_hat, v_hat = m / (1 - b1 ** t), v / (1 - b2 ** t)
        p = p - lr * m_hat / (np.sqrt(v_hat) + eps)
    return p, m, v


def test_adam_first_and_second_step_by_hand(xp):
    p0 = np.array([1.0, -2.0, 3.0, 0.5])
    g1, g2 = np.array([0.1, -0.5, 2.0, 0.0]), np.array([-0.3, -0.5, 1.0, 4.0])
    p = Tensor(xp.array(p0), requires_grad=True)  # a copy: Adam updates p.data in place
    opt = Adam([p], lr=0.1)

    p.grad = xp.asarray(g1)
    opt.step()
    # step 1: m = 0.1 g1, v = 0.001 g1^2, m_hat = g1, v_hat = g1^2: the step is lr * sign(g1)
    p1 = p0 - 0.1 * g1 / (np.abs(g1) + 1e-8)
    np.testing.assert_allclose(to_numpy(p.data), p1, rtol=1e-12, atol=1e-15,
                               err_msg="first Adam step should be p - lr * g / (|g| + eps)")
    np.testing.assert_allclose(to_numpy(opt.m[0]), 0.1 * g1, rtol=1e-12, err_msg="m after step 1")
    np.testing.assert_allclose(to_numpy(opt.v[0]), 0.001 * g1 ** 2, rtol=1e-12,
                               err_msg="v after step 1")

    p.grad = xp.asarray(g2)
    opt.step()
    m2 = 0.9 * 0.1 * g1 + 0.1 * g2
    v2 = 0.999 * 0.001 * g1 ** 2 + 0.001 * g2 ** 2
    p2 = p1 - 0.1 * (m2 / (1 - 0.9 ** 2)) / (np.sqrt(v2 / (1 - 0.999 ** 2)) + 1e-8)
    np.testing.assert_allclose(to_numpy(p.data), p2, rtol=1e-12, atol=1e-15,
                               err_msg="second Adam step should use bias corrections 1 - b^2")
    np.testing.assert_allclose(to_numpy(p.data), adam_reference(p0, [g1, g2], 0.1)[0], rtol=1e-12)
    assert opt.t == 2, "two steps taken"


def test_adam_skips_parameters_without_gradient():
    a, b = Tensor(np.ones(2), requires_grad=True), Tensor(np.ones(3), requires_grad=True)
    opt = Adam([a, b], lr=0.1)
    a.grad = np.array([1.0, -1.0])
    opt.step()
    np.testing.assert_array_equal(b.data, np.ones(3),
                                  err_msg="a parameter with grad None should not move")
    np.testing.assert_array_equal(opt.m[1], np.zeros(3), err_msg="...nor its moments")


def test_adam_keeps_float32():
    p = Tensor(np.ones(3, np.float32), requires_grad=True)
    opt = Adam([p], lr=0.01, clip_norm=0.5)
    p.grad = np.array([1.0, 2.0, 3.0], np.float32)
    opt.step()
    assert p.dtype == opt.m[0].dtype == opt.v[0].dtype == np.float32, "Adam should keep float32"


def test_adam_minimises_least_squares():
    rng = np.random.default_rng(17)
    A, b = rng.standard_normal((20, 3)), rng.standard_normal(20)
    x = Tensor(np.zeros(3), requires_grad=True)
    opt = Adam([x], lr=0.05)
    A_t, b_t = Tensor(A), Tensor(b)
    for _ in range(1500):
        opt.zero_grad()
        r = (A_t @ x.reshape(3, 1)).reshape(20) - b_t
        (r * r).sum().backward()
        opt.step()
    solution = np.linalg.lstsq(A, b, rcond=None)[0]
    np.testing.assert_allclose(x.data, solution, atol=1e-3,
                               err_msg="Adam should reach the least-squares solution "
                                       "of ||Ax - b||^2")


def test_adam_clip_scale_for_the_gpu_path_on_numpy():
    """The scale the GPU path applies to every gradient, min(1, c / ||g||): it runs on
    NumPy arrays too, so it is checked here without a GPU (||[3, 4]|| = 5)."""
    p = Tensor(np.zeros(2), requires_grad=True)
    for clip, expected in ((10.0, 1.0), (1.0, 0.2)):
        opt = Adam([p], clip_norm=clip)
        np.testing.assert_allclose(float(opt._device_clip_scale([np.array([3.0, 4.0])])),
                                   expected, rtol=1e-9)
    # all-zero gradients: norm 0, scale 1, and no division by zero (pytest.ini makes its
    # RuntimeWarning an error; without the guard in the denominator it was never tried)
    assert float(opt._device_clip_scale([np.zeros(2), np.zeros(3)])) == 1.0


@pytest.mark.parametrize("clip", [1.0, np.float64(1.0), np.float32(1.0), 1],
                         ids=["float", "numpy_float64", "numpy_float32", "int"])
def test_adam_clip_scale_has_the_weights_dtype(clip):
    """The GPU path hands the clip scale to the fused Adam kernel next to float32 weights:
    a float64 scale there is CuPy's "Type is mismatched". A NumPy float64 clip_norm (read
    from a config file, say) made one, as NumPy float64 / float32 is float64; Adam now
    keeps its hyperparameters as Python floats, which take the arrays' dtype. Float64
    gradients (float64 data through float32 layers) made one too: the norm is now summed
    in the weights' dtype."""
    p = Tensor(np.zeros(2, dtype=np.float32), requires_grad=True)
    opt = Adam([p], clip_norm=clip)
    for grad_dtype in (np.float32, np.float64):
        scale = opt._device_clip_scale([np.array([3.0, 4.0], dtype=grad_dtype)])
        assert np.asarray(scale).dtype == np.float32, \
            f"clip scale is {np.asarray(scale).dtype} with {np.dtype(grad_dtype)} gradients"
        np.testing.assert_allclose(float(scale), 0.2, rtol=1e-6)


def test_adam_clip_norm():
    p0, q0 = np.array([1.0, 2.0]), np.array([[0.5], [-1.0]])
    # step 1: ||(3, 4, 0, 12)|| = 13 > clip 5, scaled by 5/13; step 2: norm 1 < 5, not scaled
    grads_p = [np.array([3.0, 4.0]), np.array([0.6, 0.0])]
    grads_q = [np.array([[0.0], [12.0]]), np.array([[0.0], [0.8]])]
    p, q = Tensor(p0.copy(), requires_grad=True), Tensor(q0.copy(), requires_grad=True)
    opt = Adam([p, q], lr=0.1, clip_norm=5.0)
    for i, (gp, gq) in enumerate(zip(grads_p, grads_q)):
        p.grad, q.grad = gp.copy(), gq.copy()
        opt.step()
        assert opt.last_grad_norm == pytest.approx([13.0, 1.0][i]), "last_grad_norm should be ||g||"
        if i == 0:
            np.testing.assert_allclose(opt.m[0], 0.1 * grads_p[0] * 5 / 13, rtol=1e-12,
                                       err_msg="m should see the clipped gradient g * clip / ||g||")
    scales = [5 / 13, 1.0]
    np.testing.assert_allclose(p.data, adam_reference(p0, grads_p, 0.1, scales=scales)[0],
                               rtol=1e-12,
                               err_msg="clipped Adam should equal Adam on clipped gradients")
    np.testing.assert_allclose(q.data, adam_reference(q0, grads_q, 0.1, scales=scales)[0],
                               rtol=1e-12, err_msg="clipping should scale every parameter's grad")
    unclipped = adam_reference(p0, grads_p, 0.1)[0]
    assert not np.allclose(p.data, unclipped), "clipping should change the second step"
    np.testing.assert_array_equal(p.grad, grads_p[1], err_msg="clipping should not modify p.grad")


class DeviceArray(np.ndarray):
    """A NumPy array that stands for a CuPy array in the test below."""


class DeviceModule(types.ModuleType):
    """numpy, with every array it makes a DeviceArray: ``get_array_module`` returns this
    for a DeviceArray once it is ``autograd.cupy``, as it returns cupy for a CuPy array."""
    ndarray = DeviceArray

    def __getattr__(self, name):
        function = getattr(np, name)

        def on_device(*args, **kwargs):
            result = function(*args, **kwargs)
            return result.view(DeviceArray) if isinstance(result, np.ndarray) else result
        return on_device


def test_adam_clip_norm_on_unfused_cupy_keeps_the_norm_on_the_device(monkeypatch):
    """With fusion off on a GPU, clipping once read every gradient's sum of squares back
    to the host (``float(g @ g)``), one wait for the GPU per parameter per step. The
    norm now stays a device array, as on the fused path, and the update is the same."""
    monkeypatch.setattr(autograd, "cupy", DeviceModule("cupy_stand_in"))
    monkeypatch.setattr(Adam, "grad_norm", lambda self: pytest.fail("read the norm back"))
    p0, q0 = np.array([1.0, 2.0]), np.array([[0.5], [-1.0]])
    grads_p = [np.array([3.0, 4.0]), np.array([0.6, 0.0])]  # ||g|| 13, then 1: clip 5
    grads_q = [np.array([[0.0], [12.0]]), np.array([[0.0], [0.8]])]
    p = Tensor(p0.copy().view(DeviceArray), requires_grad=True)
    q = Tensor(q0.copy().view(DeviceArray), requires_grad=True)
    opt = Adam([p, q], lr=0.1, clip_norm=5.0)
    for gp, gq in zip(grads_p, grads_q):
        p.grad, q.grad = gp.view(DeviceArray), gq.view(DeviceArray)
        opt.step()
        assert isinstance(opt.last_grad_norm, DeviceArray), "the norm should stay on the device"
    assert float(np.asarray(opt.last_grad_norm)) == pytest.approx(1.0)
    scales = [5 / 13, 1.0]
    np.testing.assert_allclose(p.data, adam_reference(p0, grads_p, 0.1, scales=scales)[0],
                               rtol=1e-9)
    np.testing.assert_allclose(q.data, adam_reference(q0, grads_q, 0.1, scales=scales)[0],
                               rtol=1e-9)


def test_adam_state_dict_round_trip():
    rng = np.random.default_rng(18)
    shapes = [(3, 2), (2,)]
    grads = [[rng.standard_normal(s) for s in shapes] for _ in range(4)]
    a = [Tensor(rng.standard_normal(s), requires_grad=True) for s in shapes]
    opt_a = Adam(a, lr=0.01, clip_norm=1.0)
    for step in grads[:3]:
        for p, g in zip(a, step):
            p.grad = g
        opt_a.step()
    b = [Tensor(p.data.copy(), requires_grad=True) for p in a]
    opt_b = Adam(b, lr=0.01, clip_norm=1.0)
    state = opt_a.state_dict()
    opt_b.load_state_dict(state)
    assert opt_b.t == 3, "the step count should be restored"
    state["m.0"][...] = 99.0
    assert not np.any(opt_b.m[0] == 99.0), "loading should copy the moment arrays"
    for params, opt in ((a, opt_a), (b, opt_b)):
        for p, g in zip(params, grads[3]):
            p.grad = g
        opt.step()
    for pa, pb in zip(a, b):
        np.testing.assert_array_equal(pa.data, pb.data, err_msg="a restored Adam should take the "
                                                                "identical next step")


def test_adam_load_state_dict_errors():
    p = Tensor(np.ones((2, 3)), requires_grad=True)
    opt = Adam([p])
    with pytest.raises(KeyError, match=r"expected 3 entries"):
        opt.load_state_dict({"t": np.array(1)})
    with pytest.raises(ValueError, match=r"m.0 has shape \(3,\), parameter 0 has \(2, 3\)"):
        opt.load_state_dict({"t": np.array(1), "m.0": np.zeros(3), "v.0": np.zeros((2, 3))})


def test_adam_zero_grad():
    x = Tensor(np.array([1.0, 2.0]), requires_grad=True)
    opt = Adam([x])
    (x * x).sum().backward()
    opt.zero_grad()
    assert x.grad is None, "zero_grad() should clear the gradients"
    (x * 3).sum().backward()
    np.testing.assert_array_equal(x.grad, [3.0, 3.0],
                                  err_msg="after zero_grad() the next backward() should not "
                                          "accumulate")


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(lr=-0.1), ValueError, r"Adam: lr must be in \[0, inf\), got -0.1"),
    (dict(lr="0.1"), TypeError, r"Adam: lr must be a number, got '0.1' \(str\)"),
    (dict(lr=float("nan")), ValueError, r"Adam: lr must be in \[0, inf\), got nan"),
    (dict(beta1=1), ValueError, r"Adam: beta1 must be in \[0, 1\), got 1"),
    (dict(beta1=-0.5), ValueError, r"Adam: beta1 must be in \[0, 1\), got -0.5"),
    (dict(beta2=1.0), ValueError, r"Adam: beta2 must be in \[0, 1\), got 1.0"),
    (dict(beta2=-0.1), ValueError, r"Adam: beta2 must be in \[0, 1\), got -0.1"),
    (dict(eps=-1e-8), ValueError, r"Adam: eps must be in \[0, inf\), got -1e-08"),
    (dict(clip_norm=0), ValueError, r"Adam: clip_norm must be in \(0, inf\), got 0"),
    (dict(clip_norm=-1.0), ValueError, r"Adam: clip_norm must be in \(0, inf\), got -1.0"),
    (dict(beta1=True), TypeError, r"Adam: beta1 must be a number, got True \(bool\)"),
], ids=["lr negative", "lr str", "lr nan", "beta1 1", "beta1 negative", "beta2 1",
        "beta2 negative", "eps negative", "clip_norm 0", "clip_norm negative", "beta1 bool"])
def test_adam_rejects_bad_hyperparameters(kwargs, error, message):
    with pytest.raises(error, match=message):
        Adam([Tensor(np.zeros(2), requires_grad=True)], **kwargs)


@pytest.mark.parametrize("params, error, message", [
    ([], ValueError, r"Adam: params is empty"),
    (Tensor(np.zeros(2), requires_grad=True), TypeError,
     r"Adam: params must be a list of Tensors.*got Tensor"),
    (Dense(2, 2), TypeError, r"Adam: params must be a list of Tensors \(e.g. "
                             r"model.parameters\(\)\), got Dense"),
    ([np.zeros(2)], TypeError, r"Adam: params\[0\] must be a Tensor, got ndarray"),
    # e.g. model.parameters() + model.decoder.parameters(): was two updates per step
    (Dense(2, 2).parameters() * 2, ValueError, r"Adam: params\[2\] is params\[0\] again"),
], ids=["empty", "one Tensor", "a module", "arrays", "a parameter twice"])
def test_adam_rejects_bad_parameter_lists(params, error, message):
    with pytest.raises(error, match=message):
        Adam(params)


def test_adam_accepts_edge_hyperparameters():
    """beta = 0 (no averaging), eps = 0 and NumPy numbers are valid choices."""
    p = Tensor(np.array([1.0]), requires_grad=True)
    opt = Adam((q for q in [p]), lr=np.float32(0.5), beta1=0, beta2=0.0, eps=0, clip_norm=10)
    p.grad = np.array([2.0])
    opt.step()
    np.testing.assert_allclose(p.data, [0.5], rtol=1e-7)  # step lr * g / |g|


# ----------------------------------------------------------------------------------
# The fused GPU batch norm (+ leaky ReLU) against the plain array code, on CuPy
# ----------------------------------------------------------------------------------
@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("slope", [None, 0.01])
@pytest.mark.parametrize("training", [True, False])
def test_gpu_fused_batch_norm_matches_plain_code(dtype, slope, training):
    import kernels
    cupy = autograd.cupy
    rng = np.random.default_rng(3)
    x, gamma, beta = (rng.standard_normal((64, 24)) * 3 + 1, rng.random(24) + 0.5,
                      rng.standard_normal(24))
    stats = (None, None) if training else (rng.standard_normal(24), rng.random(24) + 0.2)
    g = rng.standard_normal((64, 24))
    results = []
    for fused in (True, False):
        kernels.set_fusion(fused)
        try:
            leaves = [autograd.Tensor(cupy.asarray(a, dtype=dtype), requires_grad=True)
                      for a in (x, gamma, beta)]
            mean, var = [None if s is None else cupy.asarray(s, dtype=dtype) for s in stats]
            y, m, v = layers.batch_norm(*leaves, 1e-4, mean, var, slope=slope)
            y.backward(cupy.asarray(g, dtype=dtype))
            results.append([autograd.to_numpy(a) for a in (y.data, m, v, *(t.grad for t in leaves))])
        finally:
            kernels.set_fusion(True)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == np.float32 else dict(rtol=1e-10, atol=1e-10)
    for name, fused_value, plain_value in zip(["y", "mean", "var", "dx", "dgamma", "dbeta"],
                                              *results):
        np.testing.assert_allclose(fused_value, plain_value, **tol,
                                   err_msg=f"fused batch norm: {name} differs from the plain code")


@pytest.mark.gpu
@requires_cuda
def test_gpu_fused_running_average_matches_plain_code():
    import kernels
    cupy = autograd.cupy
    x = np.random.default_rng(4).standard_normal((32, 6)).astype(np.float32)
    states = []
    for fused in (True, False):
        kernels.set_fusion(fused)
        try:
            bn = layers.BatchNorm(6).to("cuda")
            for _ in range(3):
                bn(autograd.Tensor(cupy.asarray(x)))
            states.append((autograd.to_numpy(bn.running_mean.data), autograd.to_numpy(bn.running_var.data)))
        finally:
            kernels.set_fusion(True)
    np.testing.assert_allclose(states[0][0], states[1][0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(states[0][1], states[1][1], rtol=1e-5, atol=1e-6)


def test_gaussian_layer_eps_does_not_bias_a_small_variance():
    """var_eps (default) only keeps log(var) finite: a variance of 1e-5 (a posterior
    standard deviation of 0.003) comes out within 1 % of 1e-5."""
    layer = layers.GaussianLayer(3, 2, batch_norm=False,
                                 rng=np.random.default_rng(0)).astype(np.float64)
    layer.var_dense.weight.data[...] = 0
    layer.var_dense.bias.data[...] = np.log(np.expm1(1e-5))  # softplus(bias) = 1e-5
    _, var = layer(Tensor(np.ones((4, 3))))
    np.testing.assert_allclose(var.data, 1e-5, rtol=0.01)


def test_first_nonfinite_module_names_the_model_itself():
    """When every sub-module's output is finite but the model's own forward makes an inf,
    the model itself is named ('' is the model), not None ('every layer was finite')."""
    class Net(layers.Module):
        def __init__(self):
            self.dense = layers.Dense(3, 2, rng=np.random.default_rng(0))

        def forward(self, x):
            return self.dense(x) + float("inf")  # made by the model's code, no sub-module
    net = Net()
    x = Tensor(np.ones((4, 3), np.float32))
    assert layers.first_nonfinite_module(net, lambda: net(x)) == ""
