"""Tests of the models and objectives in lvae.py (CPU, tiny models, float64).

The central check: the full forward and backward pass of both models (LVAE and the
bottom-up VAE, with and without batch norm) against central finite differences, for
the warm-up ELBO and the importance-weighted bound. The noise is made deterministic by
drawing it from a fresh ``Noise(seed)`` at every evaluation, so the objective is a
plain function of the parameters.

Then the statistics the paper relies on: L_1 is the ELBO, L_K grows with K, the
sample KL averages to the analytic KL; the chunked evaluation of L_K; shapes and
error messages; the analysis helpers; the Noise stream.
"""
import json
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import autograd  # noqa: E402
import lvae  # noqa: E402
from autograd import no_grad, sigmoid_array  # noqa: E402
from gaussian import gaussian_kl, log_normal  # noqa: E402
from conftest import requires_cuda  # noqa: E402
from test_device_mixing import fake_cupy  # noqa: E402,F401  (a fixture)

X_DIM = 8
TINY = dict(x_dim=X_DIM, z_dims=(3, 2), hidden=(5, 4), n_dense=2)
MODELS = ["lvae", "vae"]


def tiny_model(kind="lvae", batch_norm=True, seed=1, **overrides):
    config = dict(TINY, batch_norm=batch_norm, seed=seed)
    config.update(overrides)
    return lvae.build_model(kind, **config).astype(np.float64)


def binary_batch(n, x_dim=X_DIM, seed=0):
    """float64 0/1 images with pixel probabilities that vary per pixel."""
    rng = np.random.default_rng(seed)
    probs = np.linspace(0.1, 0.9, x_dim)
    return (rng.random((n, x_dim)) < probs).astype(np.float64)


# ----------------------------------------------------------------------------------
# Gradients: the whole model against finite differences
# ----------------------------------------------------------------------------------
def _objective(model, x, objective, seed=7):
    """The scalar to check, with noise drawn afresh from Noise(seed): deterministic."""
    noise = lvae.Noise(seed)
    if objective == "elbo":
        value, _ = lvae.elbo(model, x, noise, beta=0.7)  # a warm-up beta: both terms matter
    else:
        value, _ = lvae.iw_bound(model, x, noise, samples=4)
    return value


def _check_model_gradients(model, x, objective, entries=None, seed=0):
    """backward() of the objective against central differences (eps 1e-6) for every
    parameter; ``entries`` limits the check to that many random entries per parameter."""
    model.train()
    for p in model.parameters():
        p.grad = None
    _objective(model, x, objective).backward()
    rng = np.random.default_rng(seed)
    eps = 1e-6
    checked = 0
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert p.grad.shape == p.shape, name
        flat, grad = p.data.reshape(-1), p.grad.reshape(-1)
        idx = np.arange(flat.size)
        if entries is not None and flat.size > entries:
            idx = rng.choice(flat.size, entries, replace=False)
        for j in idx:
            saved = flat[j].item()  # a copy (a CuPy 0-d index is a view)
            with no_grad():
                flat[j] = saved + eps
                plus = float(_objective(model, x, objective).data)
                flat[j] = saved - eps
                minus = float(_objective(model, x, objective).data)
            flat[j] = saved
            numeric = (plus - minus) / (2 * eps)
            analytic = float(grad[j])
            assert abs(analytic - numeric) <= 1e-6 + 1e-5 * abs(numeric), (
                f"{objective}: d/d {name}[{j}]: backward() {analytic:.10g}, "
                f"finite differences {numeric:.10g}")
            checked += 1
    return checked


@pytest.mark.parametrize("batch_norm", [True, False], ids=["bn", "no_bn"])
@pytest.mark.parametrize("kind", MODELS)
def test_elbo_gradients_match_finite_differences(kind, batch_norm):
    model = tiny_model(kind, batch_norm)
    x = binary_batch(6)
    n_params = sum(p.size for p in model.parameters())
    assert _check_model_gradients(model, x, "elbo") == n_params  # every entry


@pytest.mark.parametrize("batch_norm", [True, False], ids=["bn", "no_bn"])
@pytest.mark.parametrize("kind", MODELS)
def test_iw_bound_gradients_match_finite_differences(kind, batch_norm):
    model = tiny_model(kind, batch_norm, seed=2)
    n_params = sum(p.size for p in model.parameters())
    assert _check_model_gradients(model, binary_batch(5, seed=1), "iw") == n_params


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("objective", ["elbo", "iw"])
@pytest.mark.parametrize("kind", MODELS)
def test_gradients_on_gpu_match_finite_differences(kind, objective):
    """The same check with CuPy arrays (fused Gaussian kernels, GPU noise stream)."""
    model = tiny_model(kind, seed=3).to("cuda")
    x = autograd.cupy.asarray(binary_batch(6))
    _check_model_gradients(model, x, objective, entries=3)


def test_gradient_check_catches_a_wrong_backward(monkeypatch):
    """The check above is not vacuous: a wrong gradient in the merge is caught."""
    import gaussian
    real = gaussian.merge_backward

    def wrong(g_mu, g_var, *args):
        grads = real(g_mu, g_var, *args)
        return (grads[0] * 1.01,) + tuple(grads[1:])
    monkeypatch.setattr(gaussian, "merge_backward", wrong)
    with pytest.raises(AssertionError, match="finite differences"):
        _check_model_gradients(tiny_model("lvae", False), binary_batch(4), "elbo")


def test_fixed_noise_makes_the_objective_deterministic():
    model = tiny_model("lvae")
    x = binary_batch(6)
    with no_grad():
        a = float(_objective(model, x, "elbo").data)
        b = float(_objective(model, x, "elbo").data)
        c = float(_objective(model, x, "elbo", seed=8).data)
    assert a == b
    assert a != c


# ----------------------------------------------------------------------------------
# The bounds: L_1 = ELBO, L_K increasing in K
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", MODELS)
def test_iw_bound_with_one_sample_is_the_sample_kl_elbo(kind):
    model = tiny_model(kind).eval()
    x = binary_batch(10)
    with no_grad():
        value, terms = lvae.iw_bound(model, x, lvae.Noise(3), samples=1)
        log_w = lvae.log_weights(model, x, lvae.Noise(3), samples=1)
        log_px, layers = model(x, lvae.Noise(3), samples=1, kl="sample")
    expected = log_px.data - sum(k.data for k in layers.kl)
    np.testing.assert_allclose(log_w.data, expected, rtol=1e-12)
    np.testing.assert_allclose(float(value.data), expected.mean(), rtol=1e-12)
    np.testing.assert_allclose(terms["elbo"], expected.mean(), rtol=1e-12)


@pytest.mark.parametrize("kind", MODELS)
def test_l1_equals_the_elbo_in_expectation(kind):
    """Mean over many draws of L_1 (sample KL) = mean of the ELBO as trained (analytic
    KL where possible), within the Monte Carlo error."""
    model = tiny_model(kind, seed=3).eval()
    x = binary_batch(40, seed=2)
    draws = 400
    with no_grad():
        l1 = lvae.log_weights(model, x, lvae.Noise(0), draws).data       # (draws, B)
        log_px, layers = model(x, lvae.Noise(1), samples=draws, kl="analytic")
        elbo = log_px.data - sum(k.data for k in layers.kl)
    diff = l1.mean() - elbo.mean()
    stderr = np.sqrt(l1.var() / l1.size + elbo.var() / elbo.size)
    assert abs(diff) < 4 * stderr, (diff, stderr)


@pytest.mark.parametrize("kind", MODELS)
def test_lk_increases_with_k(kind):
    """Mean L_1 < mean L_5 < mean L_50, each gap beyond 4 standard errors of the paired
    per-image differences (averaged over repeated draws)."""
    model = tiny_model(kind, seed=4).eval()
    x = binary_batch(100, seed=3)
    repeats = 12
    bounds = {}
    for k in (1, 5, 50):
        runs = [lvae.log_likelihood_bound(model, x, k, lvae.Noise(100 * k + r))
                for r in range(repeats)]
        bounds[k] = np.mean(runs, axis=0)  # per image
    for low, high in ((1, 5), (5, 50)):
        d = bounds[high] - bounds[low]
        stderr = d.std(ddof=1) / np.sqrt(len(d))
        assert d.mean() > 4 * stderr > 0, (low, high, d.mean(), stderr)


# ----------------------------------------------------------------------------------
# log_likelihood_bound: chunking and bounded memory
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", MODELS)
def test_chunking_over_samples_does_not_change_l_k_for_one_layer(kind):
    """With one stochastic layer, chunks of samples consume the noise stream in the same
    order as one big draw (rows k of a C-ordered (K, B, units) array), so the result
    must be the same up to rounding whatever max_rows is."""
    model = tiny_model(kind, z_dims=(3,), hidden=(5,)).eval()
    x = binary_batch(7)
    k = 12
    reference = lvae.log_likelihood_bound(model, x, k, lvae.Noise(5), batch_size=7,
                                          max_rows=7 * k)
    for max_rows in (7 * 5, 7 * 3, 7, 1):  # chunks of 5, 3, 1, 1 samples
        got = lvae.log_likelihood_bound(model, x, k, lvae.Noise(5), batch_size=7,
                                        max_rows=max_rows)
        np.testing.assert_allclose(got, reference, rtol=1e-12, atol=1e-12)


def test_chunked_and_unchunked_l_k_agree_statistically():
    """With several layers the chunks draw the noise in another order, so the estimates
    differ per image but must agree on average."""
    model = tiny_model("lvae", seed=5).eval()
    x = binary_batch(200, seed=4)
    one = lvae.log_likelihood_bound(model, x, 10, lvae.Noise(1), batch_size=200,
                                    max_rows=2000)
    many = lvae.log_likelihood_bound(model, x, 10, lvae.Noise(2), batch_size=200,
                                     max_rows=600)  # chunks of 3, 3, 3, 1 samples
    d = one - many
    assert np.all(np.isfinite(one)) and np.all(np.isfinite(many))
    assert abs(d.mean()) < 4 * d.std(ddof=1) / np.sqrt(len(d)) + 1e-12


def test_l1_bound_equals_the_elbo_estimate():
    """L_1 of log_likelihood_bound is the one-sample ELBO estimate (sample KL) in
    evaluation mode, with the same draws."""
    model = tiny_model("lvae").train()
    x = binary_batch(9)
    bound = lvae.log_likelihood_bound(model, x, 1, lvae.Noise(6), batch_size=9)
    assert model.training  # restored
    model.eval()
    with no_grad():
        log_w = lvae.log_weights(model, x, lvae.Noise(6), 1).data[0]
        _, terms = lvae.iw_bound(model, x, lvae.Noise(6), 1)
    np.testing.assert_allclose(bound, log_w, rtol=1e-12)
    np.testing.assert_allclose(bound.mean(), terms["elbo"], rtol=1e-12)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(samples=0), ValueError, r"samples must be >= 1, got 0"),
    (dict(samples=-3), ValueError, r"samples must be >= 1, got -3"),
    (dict(samples=10.0), TypeError, r"samples must be an int, got 10.0"),
    (dict(batch_size=0), ValueError, r"batch_size must be >= 1, got 0"),
    (dict(batch_size=2.5), TypeError, r"batch_size must be an int, got 2.5"),
    (dict(max_rows=0), ValueError, r"max_rows must be >= 1, got 0"),
    (dict(x=np.zeros((0, X_DIM))), ValueError, r"the batch is empty \(shape \(0, 8\)\)"),
    (dict(x=np.zeros(X_DIM)), ValueError, r"expected a batch of shape \(B, 8\), got \(8,\)"),
    (dict(x=np.zeros((2, 9))), ValueError, r"expected a batch of shape \(B, 8\), got \(2, 9\)"),
    (dict(x=[[0.0] * X_DIM]), TypeError, r"x must be a NumPy or CuPy array \(or a Tensor\), not list"),
    (dict(x=np.full((2, X_DIM), 255, np.uint8)), TypeError, r"dtype uint8"),
    (dict(x=np.full((2, X_DIM), np.nan)), ValueError, r"NaN or infinite"),
    # was "'int' object is not callable", after the first batch's K samples
    (dict(progress=5), TypeError, r"progress must be a function \(done, total\) or None, got int"),
], ids=["samples 0", "samples negative", "samples float", "batch_size 0", "batch_size float",
        "max_rows 0", "no rows", "1-D x", "wrong width", "list", "uint8", "NaN", "progress"])
def test_log_likelihood_bound_rejects_bad_arguments(kwargs, error, message):
    args = dict(x=binary_batch(3), samples=4)
    args.update(kwargs)
    with pytest.raises(error, match=message):
        lvae.log_likelihood_bound(tiny_model("lvae"), **args)


@pytest.mark.parametrize("kind", MODELS)
def test_log_likelihood_bound_folds_batch_norm_without_changing_the_bound(kind):
    """log_likelihood_bound evaluates a copy with the batch norms folded into the dense
    layers: the log-weights must be those of the model in evaluation mode, and the model
    itself must be left as it was."""
    from layers import BatchNorm, fold_batch_norm
    model = tiny_model(kind, seed=8).train()
    rng = np.random.default_rng(3)
    for bn in model.modules():
        if isinstance(bn, BatchNorm):
            n = bn.gamma.shape[0]
            bn.running_mean.data[...] = rng.standard_normal(n)
            bn.running_var.data[...] = rng.uniform(0.1, 3.0, n)
            bn.beta.data[...] = rng.standard_normal(n)
    x = binary_batch(6)
    with no_grad():
        folded = lvae.log_weights(fold_batch_norm(model), x, lvae.Noise(4), 5).data
        model.eval()
        plain = lvae.log_weights(model, x, lvae.Noise(4), 5).data
    np.testing.assert_allclose(folded, plain, rtol=1e-10, atol=1e-10)
    bound = lvae.log_likelihood_bound(model.train(), x, 5, lvae.Noise(4), batch_size=6)
    lse = np.logaddexp.reduce(plain, axis=0) - np.log(5)
    np.testing.assert_allclose(bound, lse, rtol=1e-10)
    assert model.training and any(isinstance(m, BatchNorm) for m in model.modules())


def test_log_likelihood_bound_memory_is_bounded_by_max_rows(monkeypatch):
    shapes = []
    real = lvae.Noise.normal

    def recording(self, shape, like):
        shapes.append(tuple(shape))
        return real(self, shape, like)
    monkeypatch.setattr(lvae.Noise, "normal", recording)
    model = tiny_model("lvae").eval()
    x = binary_batch(25)
    samples, max_rows, batch_size = 100, 40, 10
    calls = []
    bound = lvae.log_likelihood_bound(model, x, samples, lvae.Noise(0), batch_size=batch_size,
                                      max_rows=max_rows,
                                      progress=lambda done, total: calls.append((done, total)))
    assert bound.shape == (25,) and np.all(np.isfinite(bound))
    rows = [int(np.prod(s[:-1])) for s in shapes]
    assert max(rows) <= max_rows
    # every (sample, image) pair was drawn exactly once per layer
    assert sum(rows) == samples * len(x) * model.n_layers
    assert calls == [(10, 25), (20, 25), (25, 25)]


def test_log_likelihood_bound_default_chunks_follow_max_rows(monkeypatch):
    """Without max_rows, a NumPy model's chunks hold at most lvae.MAX_ROWS['cpu'] rows."""
    shapes = []
    real = lvae.Noise.normal
    monkeypatch.setattr(lvae.Noise, "normal",
                        lambda self, shape, like: shapes.append(tuple(shape)) or real(self, shape, like))
    model = tiny_model("lvae")
    x = binary_batch(30)
    lvae.log_likelihood_bound(model, x, 1000, lvae.Noise(0), batch_size=30)
    rows = [int(np.prod(s[:-1])) for s in shapes]
    cap = lvae.MAX_ROWS["cpu"]
    assert max(rows) == cap // 30 * 30, f"chunks of {max(rows)} rows, expected {cap // 30 * 30}"
    assert sum(rows) == 1000 * 30 * model.n_layers


def test_log_likelihood_bound_with_more_images_than_max_rows(monkeypatch):
    """A batch larger than max_rows still works (one sample per chunk)."""
    shapes = []
    real = lvae.Noise.normal
    monkeypatch.setattr(lvae.Noise, "normal",
                        lambda self, shape, like: shapes.append(shape) or real(self, shape, like))
    model = tiny_model("vae").eval()
    bound = lvae.log_likelihood_bound(model, binary_batch(30), 3, lvae.Noise(0),
                                      batch_size=30, max_rows=8)
    assert bound.shape == (30,)
    assert max(int(np.prod(s[:-1])) for s in shapes) == 30


# ----------------------------------------------------------------------------------
# The bounds' values, recomputed from their definitions
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", MODELS)
def test_log_weights_are_log_joint_minus_log_q(kind):
    """log w = log p(x|z_1) + sum_i [log p(z_i|z_i+1) - log q(z_i|.)], rebuilt from the
    samples and the Gaussians the forward pass stored (top prior N(0, I)); for the LVAE
    each analytic KL term is KL(q_i || p_i) with that layer's own prior."""
    model = tiny_model(kind).eval()
    x = binary_batch(6)
    with no_grad():
        log_px, layers = model(x, lvae.Noise(3), samples=5, kl="sample")
        log_w = lvae.log_weights(model, x, lvae.Noise(3), 5).data
        _, analytic = model(x, lvae.Noise(3), samples=5, kl="analytic")
    top = model.n_layers - 1
    expected = log_px.data.copy()
    for i in range(model.n_layers):
        mu_p, var_p = (0.0, 1.0) if i == top else (layers.mu_p[i].data, layers.var_p[i].data)
        z = layers.z[i].data
        expected = expected + (log_normal(z, mu_p, var_p).data
                               - log_normal(z, layers.mu_q[i].data, layers.var_q[i].data).data).sum(-1)
        if kind == "lvae":
            mu_p, var_p = (0.0, 1.0) if i == top else (analytic.mu_p[i].data, analytic.var_p[i].data)
            np.testing.assert_allclose(
                analytic.kl_units[i].data,
                gaussian_kl(analytic.mu_q[i].data, analytic.var_q[i].data, mu_p, var_p).data,
                rtol=1e-12, err_msg=f"layer {i}: the KL is not KL(q || p) against its own prior")
    np.testing.assert_allclose(log_w, expected, rtol=1e-12, atol=1e-12)


def test_l_k_converges_to_log_p_x_by_quadrature():
    """End to end: one unit per layer, so log p(x) = log of a 2-D integral over (z_2, z_1),
    computed by 80 x 80-point Gauss-Hermite quadrature (agrees with a 1501^2 grid to
    3e-4). L_K with K = 200,000 must match it: an untrained model's importance weights
    are heavy-tailed, so a smaller K can still be a few tenths below (or, in one draw,
    above) log p(x)."""
    model = lvae.build_model("lvae", x_dim=4, z_dims=(1, 1), hidden=(6, 6), n_dense=1,
                             batch_norm=False, seed=3).astype(np.float64).eval()
    x = binary_batch(5, x_dim=4)
    nodes, weights = np.polynomial.hermite_e.hermegauss(80)  # for the weight exp(-t^2/2)
    weights = weights / weights.sum()
    with no_grad():
        mu_p, var_p = model.prior(0, autograd.Tensor(nodes[:, None]))      # p(z_1 | z_2 = node)
        z1 = mu_p.data + np.sqrt(var_p.data) * nodes[None, :]             # (z_2 node, z_1 node)
        logits = model.decode(autograd.Tensor(z1.reshape(-1, 1))).data
    log_lik = (x[:, None, :] * logits[None] - np.logaddexp(0, logits)[None]).sum(-1)
    log_px = np.logaddexp.reduce(log_lik + np.log(np.outer(weights, weights).reshape(-1)), axis=1)
    bound = lvae.log_likelihood_bound(model, x, 200_000, lvae.Noise(0))
    np.testing.assert_allclose(bound, log_px, atol=0.05)


def test_iw_bound_value_is_the_mean_log_sum_exp_minus_log_k():
    model = tiny_model().eval()
    x = binary_batch(6)
    with no_grad():
        objective, _ = lvae.iw_bound(model, x, lvae.Noise(4), samples=7)
        log_w = lvae.log_weights(model, x, lvae.Noise(4), 7).data
    expected = (np.logaddexp.reduce(log_w, axis=0) - np.log(7)).mean()
    np.testing.assert_allclose(float(objective.data), expected, rtol=1e-12)


@pytest.mark.parametrize("kind", MODELS)
def test_elbo_terms_under_warm_up(kind):
    """During warm-up the objective weights the KL by beta; the reported ELBO does not."""
    model = tiny_model(kind)
    objective, terms = lvae.elbo(model, binary_batch(6), lvae.Noise(0), beta=0.3)
    np.testing.assert_allclose(terms["elbo"], terms["log_px"] - sum(terms["kl"]), rtol=1e-12)
    np.testing.assert_allclose(float(objective.data), terms["log_px"] - 0.3 * sum(terms["kl"]),
                               rtol=1e-12)


@pytest.mark.parametrize("beta", [None, "0.5", -0.1, float("nan"), float("inf"), True])
def test_elbo_refuses_a_beta_that_is_not_a_kl_weight(beta):
    with pytest.raises(ValueError, match=r"elbo: beta is the KL weight, a finite number >= 0"):
        lvae.elbo(tiny_model("lvae"), binary_batch(4), lvae.Noise(0), beta=beta)


def test_sample_prior_draws_every_layer():
    """The same draws replayed by hand: z_L = eps, then z_i = mu_p + sqrt(var_p) eps."""
    model = tiny_model(z_dims=(3, 2, 2), hidden=(5, 4, 4))
    images = lvae.sample_prior(model, 5, lvae.Noise(1))
    noise, like = lvae.Noise(1), np.zeros(1)
    with lvae.evaluation(model):
        z = autograd.Tensor(noise.normal((5, 2), like))
        for i in (1, 0):
            mu, var = model.prior(i, z)
            z = autograd.Tensor(mu.data + np.sqrt(var.data) * noise.normal(mu.shape, like))
        expected = autograd.sigmoid_array(model.decode(z).data)
    np.testing.assert_allclose(images, expected, rtol=1e-12, atol=1e-15)


# ----------------------------------------------------------------------------------
# KL: analytic vs sample
# ----------------------------------------------------------------------------------
def test_lvae_sample_kl_averages_to_analytic_kl():
    """Same noise seed -> the same z samples; given z_i+1, the mean over samples of
    log q(z_i) - log p(z_i) is the analytic KL of that layer."""
    model = tiny_model("lvae", z_dims=(3, 2, 2), hidden=(5, 4, 4), seed=6).eval()
    x = binary_batch(4)
    k = 4000
    with no_grad():
        _, analytic = model(x, lvae.Noise(9), samples=k, kl="analytic")
        _, sample = model(x, lvae.Noise(9), samples=k, kl="sample")
    for i in range(model.n_layers):
        np.testing.assert_array_equal(analytic.z[i].data, sample.z[i].data)
        a, s = analytic.kl[i].data, sample.kl[i].data           # (K, B)
        assert np.all(a >= 0)
        d = s - a                                               # zero mean, per image
        stderr = d.std(axis=0, ddof=1) / np.sqrt(k)
        assert np.all(np.abs(d.mean(axis=0)) < 4.5 * stderr + 1e-12), (i, d.mean(0), stderr)
        # and per unit too
        du = (sample.kl_units[i].data - analytic.kl_units[i].data).reshape(k, -1)
        se_u = du.std(axis=0, ddof=1) / np.sqrt(k)
        assert np.all(np.abs(du.mean(axis=0)) < 4.5 * se_u + 1e-12), i


def test_vae_lower_kls_are_always_sample_estimates():
    model = tiny_model("vae", seed=6).eval()
    x = binary_batch(4)
    k = 4000
    with no_grad():
        _, analytic = model(x, lvae.Noise(9), samples=k, kl="analytic")
        _, sample = model(x, lvae.Noise(9), samples=k, kl="sample")
    np.testing.assert_array_equal(analytic.kl[0].data, sample.kl[0].data)
    top_a, top_s = analytic.kl[1].data, sample.kl[1].data
    assert not np.array_equal(top_a, top_s)
    d = top_s - top_a
    assert np.all(np.abs(d.mean(0)) < 4.5 * d.std(0, ddof=1) / np.sqrt(k))


# ----------------------------------------------------------------------------------
# Shapes and errors
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kl", ["analytic", "sample"])
@pytest.mark.parametrize("samples", [1, 4])
@pytest.mark.parametrize("kind", MODELS)
def test_forward_shapes(kind, samples, kl):
    model = tiny_model(kind)
    b = 6
    log_px, layers = model(binary_batch(b), lvae.Noise(0), samples=samples, kl=kl)
    assert log_px.shape == (samples, b)
    assert layers.logits.shape == (samples, b, X_DIM)
    for name in ("z", "mu_q", "var_q", "mu_p", "var_p", "kl_units", "kl"):
        assert len(getattr(layers, name)) == model.n_layers, name
    for i, units in enumerate(model.z_dims):
        # posteriors computed from x alone have no sample axis; the others have one
        no_sample_axis = (kind == "lvae" and i == model.n_layers - 1) or (kind == "vae" and i == 0)
        assert layers.z[i].shape == (samples, b, units)
        # the analytic KL of a posterior without a sample axis has none either (it
        # broadcasts against the other layers' (K, B) terms)
        lead = (b,) if (kl == "analytic" and no_sample_axis
                        and i == model.n_layers - 1) else (samples, b)
        assert layers.kl_units[i].shape == lead + (units,), (i, layers.kl_units[i].shape)
        assert layers.kl[i].shape == lead
        expected = (b, units) if no_sample_axis else (samples, b, units)
        assert layers.mu_q[i].shape == expected, (i, layers.mu_q[i].shape)
        assert layers.var_q[i].shape == expected
        assert np.all(layers.var_q[i].data > 0)
        if i < model.n_layers - 1:
            assert layers.mu_p[i].shape == (samples, b, units)
            assert np.all(layers.var_p[i].data > 0)
        else:
            assert layers.mu_p[i] is None and layers.var_p[i] is None


@pytest.mark.parametrize("kind", MODELS)
def test_elbo_terms(kind):
    model = tiny_model(kind)
    objective, terms = lvae.elbo(model, binary_batch(6), lvae.Noise(0), beta=1.0)
    assert objective.shape == ()
    assert len(terms["kl"]) == model.n_layers
    np.testing.assert_allclose(terms["elbo"], terms["log_px"] - sum(terms["kl"]), rtol=1e-12)
    np.testing.assert_allclose(float(objective.data), terms["elbo"], rtol=1e-12)
    assert terms["log_px"] < 0

    # the terms from the model's outputs, in plain NumPy (the same noise, so the same draws)
    x = binary_batch(6)
    with no_grad():
        _, layers = model(x, lvae.Noise(0))
    logits = layers.logits.data
    log_px = (x * logits - np.logaddexp(0, logits)).sum(-1).mean()
    np.testing.assert_allclose(terms["log_px"], log_px, rtol=1e-12)

    def log_normal(z, mu, var):
        return -0.5 * (np.log(2 * np.pi * var) + (z - mu) ** 2 / var)
    top = model.n_layers - 1
    for i, kl in enumerate(terms["kl"]):
        mu_q, var_q, z = layers.mu_q[i].data, layers.var_q[i].data, layers.z[i].data
        mu_p, var_p = ((0.0, 1.0) if i == top else (layers.mu_p[i].data, layers.var_p[i].data))
        if kind == "lvae" or i == top:  # analytic given the sample above
            units = 0.5 * (np.log(var_p) - np.log(var_q) + (var_q + (mu_q - mu_p) ** 2) / var_p - 1)
        else:  # the bottom-up VAE's lower layers: the one-sample estimate
            units = log_normal(z, mu_q, var_q) - log_normal(z, mu_p, var_p)
        np.testing.assert_allclose(kl, units.sum(-1).mean(), rtol=1e-10, err_msg=f"KL of z{i + 1}")


def test_build_model_unknown_name():
    with pytest.raises(ValueError, match=r"unknown model 'ladder'.*lvae.*vae"):
        lvae.build_model("ladder", **TINY)


@pytest.mark.parametrize("kind", MODELS)
def test_wrong_input_shape_names_the_expected_shape(kind):
    model = tiny_model(kind)
    with pytest.raises(ValueError, match=r"expected a batch of shape \(B, 8\).*\(4, 9\)"):
        model(np.zeros((4, X_DIM + 1)), lvae.Noise(0))
    with pytest.raises(ValueError, match=r"\(B, 8\)"):
        model(np.zeros(X_DIM), lvae.Noise(0))


def test_bad_forward_arguments():
    model = tiny_model("lvae")
    with pytest.raises(ValueError, match="kl must be"):
        model(binary_batch(2), lvae.Noise(0), kl="exact")
    with pytest.raises(ValueError, match="samples must be >= 1"):
        model(binary_batch(2), lvae.Noise(0), samples=0)


@pytest.mark.parametrize("kind", MODELS)
def test_z_dims_hidden_length_mismatch(kind):
    with pytest.raises(ValueError, match="same length"):
        lvae.build_model(kind, x_dim=8, z_dims=(3, 2), hidden=(5,))
    with pytest.raises(ValueError, match="non-empty"):
        lvae.build_model(kind, x_dim=8, z_dims=(), hidden=())
    with pytest.raises(ValueError, match=r"z_dims\[1\] must be >= 1, got 0"):
        lvae.build_model(kind, x_dim=8, z_dims=(3, 0), hidden=(5, 4))


@pytest.mark.parametrize("override, error, message", [
    (dict(z_dims=4), TypeError, r"z_dims must be a tuple of ints.*got 4"),
    (dict(hidden=None), TypeError, r"hidden must be a tuple of ints.*got None"),
    (dict(z_dims=(3, 2.5)), TypeError, r"z_dims\[1\] must be an int, got 2.5"),
    (dict(x_dim=8.0), TypeError, r"x_dim must be an int, got 8.0"),
    (dict(x_dim=True), TypeError, r"x_dim must be an int, got True"),
    (dict(x_dim=0), ValueError, r"x_dim must be >= 1, got 0"),
    (dict(n_dense=1.5), TypeError, r"n_dense must be an int, got 1.5"),
    (dict(batch_norm="no"), TypeError, r"batch_norm must be True or False, got 'no'"),
    (dict(seed=-1), ValueError, r"seed must be >= 0, got -1"),
    (dict(seed=1.5), TypeError, r"seed must be an int, got 1.5"),
], ids=["z_dims int", "hidden None", "z_dims float entry", "x_dim float", "x_dim bool",
        "x_dim 0", "n_dense float", "batch_norm str", "seed negative", "seed float"])
def test_build_model_rejects_bad_sizes_and_flags(override, error, message):
    with pytest.raises(error, match=message):
        lvae.build_model("lvae", **dict(TINY, **override))


def test_build_model_accepts_lists_and_numpy_ints():
    """What a JSON config or a NumPy computation gives is fine, and is stored as ints."""
    model = lvae.build_model("vae", x_dim=np.int64(X_DIM), z_dims=[3, 2],
                             hidden=np.array([5, 4]), batch_norm=np.bool_(False),
                             seed=np.int64(3))
    config = model.config
    assert config["z_dims"] == (3, 2) and config["hidden"] == (5, 4)
    assert all(type(v) is int for v in (config["x_dim"], config["seed"], *config["hidden"]))
    assert config["batch_norm"] is False
    json.dumps(config)  # checkpoints store the config as JSON


@pytest.mark.parametrize("x, error, message", [
    ([[0.0] * X_DIM], TypeError, r"x must be a NumPy or CuPy array \(or a Tensor\), not list"),
    (None, TypeError, r"x must be a NumPy or CuPy array.*not NoneType"),
    (np.zeros((0, X_DIM)), ValueError, r"the batch is empty \(shape \(0, 8\)\)"),
    (np.full((2, X_DIM), 255, np.uint8), TypeError, r"dtype uint8.*astype\(np.float32\) / 255"),
    (np.full((2, X_DIM), 255.0), ValueError, r"values in \[0, 1\].*from 255.0 to 255.0"),
    (np.full((2, X_DIM), -0.5), ValueError, r"values in \[0, 1\].*from -0.5"),
    (np.where(np.arange(X_DIM) == 3, np.nan, 0.0)[None], ValueError, r"NaN or infinite"),
    (np.full((2, X_DIM), np.inf), ValueError, r"NaN or infinite"),
], ids=["list", "None", "empty batch", "uint8", "0..255 floats", "negative", "NaN", "inf"])
@pytest.mark.parametrize("kind", MODELS)
def test_forward_rejects_bad_batches(kind, x, error, message):
    model = tiny_model(kind)
    with pytest.raises(error, match=rf"{type(model).__name__}: .*{message}"):
        model(x, lvae.Noise(0))
    with pytest.raises(error, match=message):  # the objectives go through the same check
        lvae.elbo(model, x, lvae.Noise(0))


def test_a_rejected_batch_leaves_batch_norm_statistics_alone():
    """A NaN pixel in training mode must not reach (and poison) the running averages."""
    model = tiny_model("lvae").train()
    before = model.state_dict()
    x = binary_batch(4)
    x[1, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        lvae.elbo(model, x, lvae.Noise(0))
    after = model.state_dict()
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_forward_accepts_tensors_float32_and_grey_levels():
    """Legitimate inputs: a Tensor, float32 as data.py gives, grey levels in [0, 1]."""
    model = tiny_model("lvae")
    x = binary_batch(3)
    expected, _ = model(x, lvae.Noise(0))
    got, _ = model(autograd.Tensor(x), lvae.Noise(0))
    np.testing.assert_array_equal(got.data, expected.data)
    grey = np.random.default_rng(0).random((3, X_DIM)).astype(np.float32)
    model32 = lvae.build_model("lvae", **TINY)  # float32, like data.py's images
    objective, terms = lvae.elbo(model32, grey, lvae.Noise(0))
    assert np.isfinite(float(objective.data))
    assert objective.dtype == terms["elbo"].dtype == np.float32


@pytest.mark.parametrize("model_dtype, x_dtype", [(np.float32, np.float64),
                                                  (np.float64, np.float32)])
def test_forward_rejects_input_of_another_dtype(model_dtype, x_dtype):
    """A float64 batch into a float32 model used to make every result float64 (twice
    the memory and time, silently); the other way round loses the float64 checks."""
    model = tiny_model("lvae").astype(model_dtype)
    x = binary_batch(2).astype(x_dtype)
    with pytest.raises(TypeError, match=f"x has dtype {np.dtype(x_dtype)} but the "
                                        f"model's parameters are {np.dtype(model_dtype)}"):
        model(x, lvae.Noise(0))
    with pytest.raises(TypeError, match="model's parameters"):
        lvae.log_likelihood_bound(model, x, samples=2)


@pytest.mark.parametrize("samples", [2.0, "4", True])
def test_forward_samples_must_be_an_int(samples):
    with pytest.raises(TypeError, match="samples must be an int"):
        tiny_model("lvae")(binary_batch(2), lvae.Noise(0), samples=samples)


@pytest.mark.parametrize("n_layers", [1, 3, 6])
@pytest.mark.parametrize("kind", MODELS)
def test_one_to_six_layers_build_and_train(kind, n_layers):
    z_dims = tuple(range(n_layers + 1, 1, -1))          # e.g. (4, 3, 2)
    hidden = tuple(range(n_layers + 4, 4, -1))
    model = tiny_model(kind, z_dims=z_dims, hidden=hidden, n_dense=1)
    assert model.n_layers == n_layers
    x = binary_batch(5)
    objective, terms = lvae.elbo(model, x, lvae.Noise(0))
    objective.backward()
    assert len(terms["kl"]) == n_layers
    assert all(p.grad is not None and np.all(np.isfinite(p.grad)) for p in model.parameters())
    value, _ = lvae.iw_bound(model, x, lvae.Noise(0), samples=3)
    assert np.isfinite(float(value.data))
    assert lvae.log_likelihood_bound(model, x, 4).shape == (5,)


def test_default_model_is_the_papers():
    model = lvae.build_model("lvae", batch_norm=True)
    assert model.z_dims == lvae.PAPER_Z_DIMS
    assert model.config["hidden"] == lvae.PAPER_HIDDEN
    assert model.config["model"] == "lvae"


# ----------------------------------------------------------------------------------
# Analysis helpers
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("kind", MODELS)
def test_analysis_helpers_restore_mode_and_leave_state_alone(kind, training):
    model = tiny_model(kind).train(training)
    before = model.state_dict()
    x = binary_batch(20)

    kl = lvae.kl_per_unit(model, x, lvae.Noise(0))
    assert [k.shape for k in kl] == [(u,) for u in model.z_dims]
    assert model.training == training

    activity, counts = lvae.active_units(model, x, lvae.Noise(0))
    assert [a.shape for a in activity] == [(u,) for u in model.z_dims]
    assert all(0 <= c <= u for c, u in zip(counts, model.z_dims))
    assert all(isinstance(c, int) for c in counts)
    assert model.training == training

    images = lvae.sample_prior(model, 7, lvae.Noise(0))
    assert images.shape == (7, X_DIM)
    assert images.min() >= 0 and images.max() <= 1
    assert model.training == training

    recon = lvae.reconstruct(model, x, lvae.Noise(0))
    assert recon.shape == (20, X_DIM)
    assert recon.min() >= 0 and recon.max() <= 1
    assert model.training == training

    means = lvae.posterior_means(model, x, lvae.Noise(0))
    assert [m.shape for m in means] == [(20, u) for u in model.z_dims]
    assert model.training == training

    after = model.state_dict()  # evaluation mode: batch-norm statistics untouched
    assert all(np.array_equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("kind", ["lvae", "vae"])
def test_posterior_means_average_mu_q_over_the_samples(kind):
    """E_q[z_i | x]: mu_q of the layers that depend on a sample, averaged over the draws
    (not one draw's mu_q); mu_q itself where it is a function of x alone."""
    model = tiny_model(kind).eval()
    x = binary_batch(6)
    means = lvae.posterior_means(model, x, lvae.Noise(3), samples=10)
    with no_grad():
        _, layers = model(x, lvae.Noise(3), samples=10)
    for i, (got, mu) in enumerate(zip(means, layers.mu_q)):
        mu = mu.data
        expected = mu.mean(axis=0) if mu.ndim == 3 else mu
        np.testing.assert_allclose(got, expected, rtol=1e-12, err_msg=f"layer z{i + 1}")
        if mu.ndim == 3:  # a layer that depends on a sample: the draws differ
            assert not np.allclose(got, mu[0]), f"layer z{i + 1}: one draw, not the average"
    sampled = [i for i, mu in enumerate(layers.mu_q) if mu.data.ndim == 3]
    assert sampled, "some layer's mean depends on a sample"


def test_kl_per_unit_is_the_mean_analytic_kl():
    model = tiny_model("lvae").eval()
    x = binary_batch(10)
    kl = lvae.kl_per_unit(model, x, lvae.Noise(2))
    with no_grad():
        _, layers = model(x, lvae.Noise(2))
    for i, k in enumerate(kl):
        assert np.all(k >= 0)
        units = layers.kl_units[i].data.reshape(-1, model.z_dims[i])  # (K*B or B, units)
        np.testing.assert_allclose(k, units.mean(axis=0), rtol=1e-12)


@pytest.mark.parametrize("batch_norm", [True, False], ids=["bn", "no_bn"])
def test_a_unit_with_constant_posterior_mean_is_inactive(batch_norm):
    model = tiny_model("lvae", batch_norm=batch_norm)
    top = model.n_layers - 1
    # the top posterior mean is the bottom-up head's mean: make unit 0 ignore x
    model.up_heads[top].mean_dense.weight.data[:, 0] = 0
    x = binary_batch(50)
    activity, counts = lvae.active_units(model, x, lvae.Noise(0), threshold=0.0)
    assert activity[top][0] < 1e-20
    assert np.all(activity[top][1:] > 0)
    assert counts[top] == model.z_dims[top] - 1
    # with the default threshold 0.01 the count can only be lower
    _, default_counts = lvae.active_units(model, x, lvae.Noise(0))
    assert default_counts[top] <= counts[top]
    # a unit whose posterior mean varies strongly with x is active
    model.up_heads[top].mean_dense.weight.data[:, 1] *= 50
    activity, counts = lvae.active_units(model, x, lvae.Noise(0))
    assert activity[top][1] > 0.01 and counts[top] >= 1


def collapsed_lvae(top_collapsed=True):
    """An LVAE whose lower layers have an uninformative bottom-up term (var_hat = 1e6,
    mu_hat constant), so q(z_i | .) is p(z_i | z_i+1) up to 1e-6; with ``top_collapsed``
    also q(z_top | x) = N(0, I) exactly. Then E_q[z | x] is the same for every x, and
    every unit's activity is 0. Otherwise the lower layers' E_q[z | x] follows the top
    layer, through the prior, while each of their samples is noisy."""
    model = lvae.build_model("lvae", x_dim=X_DIM, z_dims=(8, 4), hidden=(16, 8), n_dense=2,
                             seed=1).astype(np.float64).eval()
    *lower, top = model.up_heads
    if top_collapsed:
        top.mean_norm.gamma.data[:] = 0
        top.mean_norm.beta.data[:] = 0
        top.var_norm.gamma.data[:] = 0
        top.var_norm.beta.data[:] = np.log(np.e - 1)  # softplus(beta) = 1
    for head in lower:
        head.mean_norm.gamma.data[:] = 0
        head.var_norm.gamma.data[:] = 0
        head.var_norm.beta.data[:] = 1e6
    return model


def test_active_units_subtracts_the_sampling_noise_of_its_estimate():
    """E_q[z | x] is estimated from K draws, so the plain variance over x of that estimate
    carries Var(mu_q | x) / K of sampling noise; active_units subtracts it. Without the
    correction, K = 10 counts the collapsed lower units of this model as active."""
    model, x = collapsed_lvae(), binary_batch(500)
    kl = lvae.kl_per_unit(model, x, lvae.Noise(0))
    assert all(np.all(k < 1e-4) for k in kl), "the model is collapsed: KL per unit ~ 0"
    draws = lvae.posterior_mean_draws(model, x, lvae.Noise(0), samples=10)
    naive = draws[0].mean(axis=0).var(axis=0)
    assert np.any(naive > 0.01), "the uncorrected estimate would count dead units"
    activity, counts = lvae.active_units(model, x, lvae.Noise(0), samples=10)
    assert counts == [0, 0]
    assert all(np.all(np.abs(a) < 0.01) for a in activity)


def test_active_units_estimate_agrees_with_many_samples():
    """The corrected activity at K = 10 and the plain one at K = 1000 (whose noise floor is
    100 times smaller, below 1e-4 here) estimate the same Cov_x(E_q[z | x]); the plain
    estimate at K = 10 is further off than the tolerance."""
    model, x = collapsed_lvae(top_collapsed=False), binary_batch(300)
    corrected, _ = lvae.active_units(model, x, lvae.Noise(1), samples=10)
    few = lvae.posterior_mean_draws(model, x, lvae.Noise(1), samples=10)
    many = lvae.posterior_mean_draws(model, x, lvae.Noise(2), samples=1000)
    for i, (a, mu_few, mu) in enumerate(zip(corrected, few, many)):
        reference = mu.mean(axis=0).var(axis=0)
        np.testing.assert_allclose(a, reference, rtol=0.05, atol=0.003, err_msg=f"layer z{i + 1}")
    naive_error = np.abs(few[0].mean(axis=0).var(axis=0) - many[0].mean(axis=0).var(axis=0))
    assert naive_error.max() > 0.003


def test_active_units_is_its_unbiased_formula():
    """Activity = Var_x(mean of the K draws) - mean_x(Var of the K draws) / K, both variances
    with ddof=1 (so that the subtraction is unbiased). The statistical tests above cannot
    tell ddof=0 from ddof=1; this one compares with the formula on the same draws."""
    model, x, k = tiny_model("lvae"), binary_batch(30), 10
    draws = lvae.posterior_mean_draws(model, x, lvae.Noise(0), samples=k)  # (K, images, units)
    activity, counts = lvae.active_units(model, x, lvae.Noise(0), samples=k)
    for i, (a, mu) in enumerate(zip(activity, draws)):
        expected = mu.mean(axis=0).var(axis=0, ddof=1) - mu.var(axis=0, ddof=1).mean(axis=0) / k
        np.testing.assert_allclose(a, expected, rtol=1e-12, atol=1e-15, err_msg=f"layer z{i + 1}")
    # the counts are of the units above the threshold; this model has units on both sides
    # of 0.01, so the default threshold (0.01, Burda et al.) and default K (10) are checked too
    assert counts == [int((a > 0.01).sum()) for a in activity]
    assert 0 < sum(counts) < sum(a.size for a in activity), "every unit on one side of 0.01"
    default_activity, default_counts = lvae.active_units(model, x, lvae.Noise(0))
    assert default_counts == counts
    for a, b in zip(default_activity, activity):
        np.testing.assert_array_equal(a, b)
    assert lvae.active_units(model, x, lvae.Noise(0), threshold=1e-6)[1] != counts


def test_active_units_needs_two_samples_and_two_images():
    with pytest.raises(ValueError, match="samples, the draws .* must be >= 2, got 1"):
        lvae.active_units(tiny_model("lvae"), binary_batch(5), lvae.Noise(0), samples=1)
    with pytest.raises(ValueError, match="2 images or more"):
        lvae.active_units(tiny_model("lvae"), binary_batch(1), lvae.Noise(0))
    # the boundary: two images and two draws are enough (a variance with ddof=1 of two values)
    activity, _ = lvae.active_units(tiny_model("lvae"), binary_batch(2), lvae.Noise(0), samples=2)
    assert all(np.all(np.isfinite(a)) for a in activity)


def test_analysis_helpers_take_a_tensor_of_images():
    model, x = tiny_model("lvae"), binary_batch(6)
    for helper in (lvae.kl_per_unit, lvae.active_units, lvae.posterior_means, lvae.reconstruct):
        a, b = helper(model, autograd.Tensor(x), lvae.Noise(0)), helper(model, x, lvae.Noise(0))
        np.testing.assert_equal(a, b, err_msg=helper.__name__)


def test_analysis_helpers_refuse_a_list_of_images():
    """As forward does: a list used to become a float64 array, refused as "x has dtype
    float64 ...: pass x.astype(np.float32)", advice a list cannot follow."""
    model, x = tiny_model("lvae"), binary_batch(6).tolist()
    for helper in (lvae.kl_per_unit, lvae.active_units, lvae.posterior_means, lvae.reconstruct):
        with pytest.raises(TypeError, match=r"x must be a NumPy or CuPy array \(or a Tensor\), "
                                            r"not list"):
            helper(model, x, lvae.Noise(0))


def test_noise_must_be_a_noise_stream():
    with pytest.raises(TypeError, match=r"LadderVAE: noise must be an lvae.Noise .*got NoneType"):
        lvae.elbo(tiny_model("lvae"), binary_batch(4), None)
    # a NumPy Generator has a normal() method too: it failed as "normal() got an unexpected
    # keyword argument 'like'" (and in log_likelihood_bound as "no attribute 'new_step'")
    with pytest.raises(TypeError, match=r"LadderVAE: noise must be an lvae.Noise .*got Generator"):
        lvae.elbo(tiny_model("lvae"), binary_batch(4), np.random.default_rng(0))
    with pytest.raises(TypeError, match=r"log_likelihood_bound: noise must be an lvae.Noise"):
        lvae.log_likelihood_bound(tiny_model("lvae"), binary_batch(4), 2,
                                  noise=np.random.default_rng(0))


@pytest.mark.parametrize("call, message", [
    # used to fail as "'str' object has no attribute 'new_step'" and the like
    (lambda m: lvae.log_likelihood_bound(m, binary_batch(4), 5, "noise"),
     r"log_likelihood_bound: noise must be an lvae.Noise .*got str"),
    (lambda m: lvae.sample_prior(m, 3, None),
     r"sample_prior: noise must be an lvae.Noise .*got NoneType"),
])
def test_every_entry_point_checks_its_noise(call, message):
    with pytest.raises(TypeError, match=message):
        call(tiny_model("lvae"))


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(samples="10"), TypeError, r"active_units: samples, .* must be an int, got '10'"),
    (dict(samples=2.5), TypeError, r"active_units: samples, .* must be an int, got 2.5"),
    (dict(threshold="a"), TypeError, r"active_units: threshold must be a finite number"),
    (dict(threshold=float("nan")), TypeError, r"threshold must be a finite number .*got nan"),
    (dict(threshold=True), TypeError, r"threshold must be a finite number .*got True"),
    (dict(x=5), TypeError, r"LadderVAE: x must be a NumPy or CuPy array \(or a Tensor\), not int"),
])
def test_active_units_checks_its_arguments(kwargs, error, message):
    args = {"x": binary_batch(4), **kwargs}
    with pytest.raises(error, match=message):
        lvae.active_units(tiny_model("lvae"), noise=lvae.Noise(0), **args)


@pytest.mark.parametrize("seed, error, message", [
    (-1, ValueError, "Noise: seed must be >= 0, got -1"),
    ("a", TypeError, "Noise: seed must be an int, got 'a'"),
    (1.5, TypeError, "Noise: seed must be an int, got 1.5"),
])
def test_noise_seed_is_checked(seed, error, message):
    with pytest.raises(error, match=message):  # was an error from NumPy's bit_generator.pyx
        lvae.Noise(seed)


def test_standard_error_uses_the_sample_standard_deviation():
    # 1, 2, 3: mean 2, sum of squared deviations 2, s^2 = 2 / (3 - 1) = 1, so 1 / sqrt(3)
    assert lvae.standard_error([1.0, 2.0, 3.0]) == pytest.approx(1 / np.sqrt(3), rel=1e-12)
    assert lvae.standard_error(np.array([-90.0, -90.0], np.float32)) == 0.0
    assert np.isnan(lvae.standard_error([-90.0]))  # one image: no spread to speak of
    assert np.isnan(lvae.standard_error([]))


def test_log_likelihood_bound_takes_a_tensor_of_images():
    model, x = tiny_model("lvae"), binary_batch(4)
    np.testing.assert_array_equal(
        lvae.log_likelihood_bound(model, autograd.Tensor(x), 3, lvae.Noise(0)),
        lvae.log_likelihood_bound(model, x, 3, lvae.Noise(0)))


@pytest.mark.parametrize("n, error", [(0, ValueError), (-1, ValueError), (2.5, TypeError),
                                      (True, TypeError)])
def test_sample_prior_needs_a_positive_count(n, error):
    with pytest.raises(error, match="sample_prior: n, the number of images, must be"):
        lvae.sample_prior(tiny_model("lvae"), n, lvae.Noise(0))


def test_sample_prior_is_reproducible_and_uses_the_noise():
    model = tiny_model("lvae")
    a = lvae.sample_prior(model, 5, lvae.Noise(1))
    b = lvae.sample_prior(model, 5, lvae.Noise(1))
    c = lvae.sample_prior(model, 5, lvae.Noise(2))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


# ----------------------------------------------------------------------------------
# Noise
# ----------------------------------------------------------------------------------
def test_noise_same_seed_same_draws():
    like = np.zeros(1, np.float64)
    a, b, c = lvae.Noise(4), lvae.Noise(4), lvae.Noise(5)
    x, y, z = a.normal((3, 2), like), b.normal((3, 2), like), c.normal((3, 2), like)
    np.testing.assert_array_equal(x, y)
    assert not np.array_equal(x, z)
    assert x.dtype == np.float64
    assert a.normal((2,), np.zeros(1, np.float32)).dtype == np.float32


def test_a_model_in_a_dtype_noise_cannot_draw_is_named():
    """A float16 model failed inside NumPy: "Unsupported dtype dtype('float16') for
    standard_normal"."""
    model = tiny_model("lvae").astype(np.float16)
    message = r"Noise: samples are drawn in float32 or float64, not float16"
    with pytest.raises(TypeError, match=message):
        lvae.elbo(model, binary_batch(4).astype(np.float16), lvae.Noise(0))
    with pytest.raises(TypeError, match=message):
        lvae.sample_prior(model, 2, lvae.Noise(0))


def test_noise_state_round_trip_through_json():
    like = np.zeros(1, np.float64)
    noise = lvae.Noise(11)
    noise.normal((5,), like)
    state = json.loads(json.dumps(noise.get_state()))  # as stored in a checkpoint
    expected = noise.normal((4, 3), like)
    noise.normal((7,), like)
    noise.set_state(state)
    np.testing.assert_array_equal(noise.normal((4, 3), like), expected)
    other = lvae.Noise(0)
    other.set_state(state)
    np.testing.assert_array_equal(other.normal((4, 3), like), expected)


def test_noise_state_is_a_copy():
    like = np.zeros(1, np.float64)
    noise = lvae.Noise(1)
    state = noise.get_state()
    first = noise.normal((3,), like)
    noise.set_state(state)
    np.testing.assert_array_equal(noise.normal((3,), like), first)


@pytest.mark.parametrize("kind", MODELS)
def test_each_prior_is_conditioned_on_the_sample_of_the_layer_above(kind):
    """mu_p,i and var_p,i that the forward pass stores are p(z_i | z_i+1) at the *sample*
    z_i+1 (not at its mean mu_q,i+1), in both models."""
    model = tiny_model(kind, z_dims=(3, 2, 2), hidden=(5, 4, 4)).eval()
    x = binary_batch(6)
    with no_grad():
        _, out = model(x, lvae.Noise(3), samples=4)
        for i in range(model.n_layers - 1):
            mu_p, var_p = model.prior(i, out.z[i + 1])
            np.testing.assert_allclose(out.mu_p[i].data, mu_p.data, rtol=1e-12,
                                       err_msg=f"mu_p of z{i + 1}")
            np.testing.assert_allclose(out.var_p[i].data, var_p.data, rtol=1e-12,
                                       err_msg=f"var_p of z{i + 1}")


def test_reconstruct_is_the_bernoulli_mean_of_a_posterior_sample():
    """reconstruct = sigmoid(decode(z_1)) for one posterior sample z ~ q(z | x), the same
    draw as a forward pass with the same noise (not 1 - p, not the logits)."""
    model, x = tiny_model("lvae").eval(), binary_batch(6)
    recon = lvae.reconstruct(model, x, lvae.Noise(5))
    with no_grad():
        _, out = model(x, lvae.Noise(5))
        expected = sigmoid_array(model.decode(out.z[0]).data)[0]
    np.testing.assert_allclose(recon, expected, rtol=1e-12, atol=1e-15)


class FakeGpuGenerator:
    """What lvae.gpu_generator returns, on the CPU: seed() then standard_normal()."""

    def __init__(self):
        self.rng = None

    def seed(self, value):
        self.rng = np.random.default_rng(value)

    def standard_normal(self, shape, dtype):
        return self.rng.standard_normal(shape).astype(dtype)


@pytest.fixture
def gpu_stand_ins(fake_cupy, monkeypatch):
    """Noise's GPU path on the CPU: arrays made by the returned converter count as CuPy's,
    and the device generator is FakeGpuGenerator."""
    monkeypatch.setattr(lvae, "gpu_generator", FakeGpuGenerator)
    return fake_cupy


def test_gpu_noise_is_determined_by_the_host_state(gpu_stand_ins):
    """On a GPU the draws come from a device generator reseeded from the host one: after
    set_state the draws replay (locate_nonfinite, resuming), and after new_step two
    streams with the same host state draw the same, whatever each drew before."""
    like = gpu_stand_ins(np.zeros(1, np.float32))
    noise = lvae.Noise(0)
    noise.new_step()
    state = noise.get_state()
    first = noise.normal((3, 2), like)
    noise.normal((5,), like)
    noise.set_state(state)
    np.testing.assert_array_equal(noise.normal((3, 2), like), first)
    other = lvae.Noise(1)
    other.set_state(noise.get_state())
    noise.new_step()
    other.new_step()
    np.testing.assert_array_equal(noise.normal((4,), like), other.normal((4,), like))


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_gpu_noise_is_fresh_at_every_step_and_has_the_dtype_asked_for(gpu_stand_ins, dtype):
    """On a GPU (here its stand-ins): each
    new_step() reseeds from the host generator, so consecutive steps, and streams with
    different seeds, draw different noise; the draws have the dtype of ``like`` (float64
    models too)."""
    like = gpu_stand_ins(np.zeros(1, dtype))
    noise, other = lvae.Noise(0), lvae.Noise(1)
    noise.new_step()
    other.new_step()
    first, from_other = noise.normal((50,), like), other.normal((50,), like)
    noise.new_step()
    second = noise.normal((50,), like)
    assert first.dtype == second.dtype == dtype
    assert not np.array_equal(first, second), "two steps drew the same noise"
    assert not np.array_equal(first, from_other), "two seeds drew the same noise"
