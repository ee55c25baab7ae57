"""Tests of the classroom exercises in notebooks/exercises (about 20 s on 2 cores).

1. checks.py on its own (NumPy only): with the reference solutions every part passes;
   with the blanks as committed every part reports NOT DONE YET; deliberately wrong
   forwards and backwards report WRONG / WRONG GRADIENT with the expected value or the
   finite-difference value in the message (and that value is right); nothing raises.
2. The layout a teacher relies on: one blank cell and one check cell per notebook, a
   solution per notebook, notebooks committed without outputs, nothing outside
   solutions/ that needs it, and no Jupyter import in the product.
   The committed notebooks are what build_exercises.py writes.
3. The notebooks run with nbclient (skipped cleanly without nbformat, nbclient and
   ipykernel): as committed, every check cell prints NOT DONE YET and no cell raises;
   with the solutions in place of the blanks, every part passes; grade.py grades a
   student's folder.
"""
import glob
import json
import math
import os
import re
import shutil
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXERCISES = os.path.join(ROOT, "notebooks", "exercises")
for path in (ROOT, EXERCISES):
    if path not in sys.path:
        sys.path.insert(0, path)

import autograd  # noqa: E402
import checks  # noqa: E402
import grade  # noqa: E402  (imports no Jupyter package until a notebook is run)
import gaussian  # noqa: E402
from autograd import Tensor, record, sigmoid_array, sum_to  # noqa: E402

# notebook -> (how its check cell calls checks.py on the student's names, parts printed)
EXERCISE_CHECKS = {
    "01_softplus": (lambda ns: checks.check_softplus(ns["softplus_array"], ns["softplus"]), 2),
    "02_merge": (lambda ns: checks.check_merge(ns["merge_forward"], ns["merge_backward"]), 2),
    "03_gaussian_kl": (lambda ns: checks.check_kl(ns["kl_forward"], ns["kl_backward"]), 2),
    "04_batchnorm_backward": (lambda ns: checks.check_batchnorm_backward(ns["batch_norm"]), 2),
    "05_iw_bound": (lambda ns: checks.check_logsumexp_and_iw_bound(
        ns["logsumexp_array"], ns["logsumexp"], ns["iw_bound"]), 3),
    "06_reparameterize": (lambda ns: checks.check_reparameterize(ns["reparameterize"]), 2),
    "07_top_down": (lambda ns: checks.check_top_down(ns["top_down"]), 2),
}
NAMES = sorted(EXERCISE_CHECKS)
HEADLINE = re.compile(r"^(PASS|NOT DONE YET|WRONG GRADIENT|WRONG): ")


def notebook_json(name):
    with open(os.path.join(EXERCISES, name + ".ipynb")) as f:
        return json.load(f)


def cells_tagged(nb, tag):
    return [c for c in nb["cells"] if tag in c.get("metadata", {}).get("tags", [])]


def source(cell):
    return cell["source"] if isinstance(cell["source"], str) else "".join(cell["source"])


def blank_source(name):
    (cell,) = cells_tagged(notebook_json(name), "exercise")
    return source(cell)


def solution_source(name):
    with open(os.path.join(EXERCISES, "solutions", name + ".py")) as f:
        return f.read()


def namespace(code, filename):
    """The names a cell defines, as the notebook would have them after running it."""
    ns = {"__name__": "exercise_cell"}
    exec(compile(code, filename, "exec"), ns)
    return ns


def solution(name):
    return namespace(solution_source(name), f"solutions/{name}.py")


def run_check(capsys, name, ns):
    """Run a notebook's check on the names in ns: (returned value, headline lines, output)."""
    ok = EXERCISE_CHECKS[name][0](ns)
    out = capsys.readouterr().out
    assert isinstance(ok, bool), f"the check returned {ok!r}, expected True or False"
    assert "Traceback" not in out, f"a traceback was printed:\n{out}"
    headlines = [line for line in out.splitlines() if HEADLINE.match(line)]
    return ok, headlines, out


# ----------------------------------------------------------------------------------
# 1. checks.py: solutions pass, blanks are not done yet
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_solution_passes_every_part(capsys, name):
    ok, headlines, out = run_check(capsys, name, solution(name))
    assert ok, f"the reference solution of {name} does not pass:\n{out}"
    assert len(headlines) == EXERCISE_CHECKS[name][1], out
    assert all(h.startswith("PASS: ") for h in headlines), out


@pytest.mark.parametrize("name", NAMES)
def test_blank_reports_not_done_yet(capsys, name):
    ns = namespace(blank_source(name), f"{name} blank cell")
    ok, headlines, out = run_check(capsys, name, ns)
    assert ok is False
    assert len(headlines) == EXERCISE_CHECKS[name][1], out
    assert all(h.startswith("NOT DONE YET: ") for h in headlines), out


def test_blanks_returning_none_or_ellipsis_are_not_done(capsys):
    for blank in (lambda x: None, lambda x: ...):
        assert checks.check_softplus(blank, solution("01_softplus")["softplus"]) is False
        out = capsys.readouterr().out
        assert out.startswith("NOT DONE YET: softplus forward: softplus_array returned"), out
    ns = solution("02_merge")
    assert checks.check_merge(lambda *a: (..., ...), ns["merge_backward"]) is False
    out = capsys.readouterr().out
    assert "NOT DONE YET: merge forward" in out and "PASS: merge backward" in out, out


# ----------------------------------------------------------------------------------
# 1. checks.py: wrong answers are named, with the value they should have had
# ----------------------------------------------------------------------------------
NUMBER = r"(-?[0-9.]+(?:e[-+]?\d+)?|-?inf|nan)"


def stable_softplus(x):
    return np.maximum(x, 0) + np.log1p(np.exp(-np.abs(x)))


def softplus_op(backward_of):
    """A softplus op whose backward is backward_of(x_data, g)."""
    def softplus(x):
        return record(stable_softplus(x.data), (x,), lambda g: backward_of(x.data, g))
    return softplus


def test_naive_softplus_overflows_and_says_where(capsys):
    ok = checks.check_softplus(lambda x: np.log(1 + np.exp(x)), solution("01_softplus")["softplus"])
    out = capsys.readouterr().out
    assert ok is False
    assert "WRONG: softplus forward: softplus_array, at x=1000: expected 1000, got inf" in out, out
    assert "hint: " in out and "log1p" in out
    assert "NOT DONE YET: softplus backward" in out  # waits for the forward


@pytest.mark.parametrize("softplus_array, hint", [
    (lambda x: np.log1p(np.exp(-np.abs(x))), "the max(x, 0) term is missing"),
    (lambda x: np.maximum(x, 0) + np.log1p(np.exp(-x)), "use e^-|x|, not e^-x"),
    (lambda x: np.log1p(np.exp(-x)), "the sign of x is flipped"),
], ids=["no max term", "no abs", "sign"])
def test_stable_softplus_mistakes_are_named(capsys, softplus_array, hint):
    with np.errstate(all="ignore"):
        assert checks.check_softplus(softplus_array, solution("01_softplus")["softplus"]) is False
    out = capsys.readouterr().out
    assert "WRONG: softplus forward: softplus_array, at x=" in out
    assert hint in out.split("hint: ")[1], out


def test_backward_without_g_shows_the_finite_difference_value(capsys):
    ok = checks.check_softplus(stable_softplus,
                               softplus_op(lambda x, g: (sigmoid_array(x),)))  # forgot g
    out = capsys.readouterr().out
    assert ok is False
    assert "PASS: softplus forward" in out
    m = re.search(rf"WRONG GRADIENT: softplus backward: for x, at x={NUMBER}, g={NUMBER}: "
                  rf"backward gives {NUMBER}, finite differences give {NUMBER}", out)
    assert m, out
    x, g, given, numeric = (float(v) for v in m.groups())
    # the message's numbers are the real ones: the wrong sigma(x), and g * sigma(x)
    assert given == pytest.approx(1 / (1 + math.exp(-x)), rel=1e-4)
    assert numeric == pytest.approx(g / (1 + math.exp(-x)), rel=1e-4)


@pytest.mark.parametrize("backward_of, message", [
    (lambda x, g: g * sigmoid_array(x), "returned ndarray; it must return a tuple"),
    (lambda x, g: (g, g), "returned 2 gradients for 1 parents"),
    (lambda x, g: (g.sum(axis=0),), "returned a gradient of shape (4,) for x of shape (3, 4)"),
    (lambda x, g: (g * np.exp(x) / (1 + np.exp(x)),), "at x=1000: expected 1, got nan"),
], ids=["array not tuple", "two gradients", "wrong shape", "nan for large x"])
def test_malformed_backward_is_explained(capsys, backward_of, message):
    assert checks.check_softplus(stable_softplus, softplus_op(backward_of)) is False
    out = capsys.readouterr().out
    assert "WRONG: softplus backward: " in out and message in out, out


def test_op_that_records_no_graph(capsys):
    assert checks.check_softplus(stable_softplus, lambda x: Tensor(stable_softplus(x.data))) is False
    out = capsys.readouterr().out
    assert "records no graph" in out and "record(out_array, parents, backward)" in out, out


def test_exception_in_student_code_is_reported_not_raised(capsys):
    def softplus_array(x):
        return x + undefined_name  # noqa: F821

    assert checks.check_softplus(softplus_array, None) is False
    out = capsys.readouterr().out
    assert ("WRONG: softplus forward: your code raised NameError: name 'undefined_name' is not "
            "defined (in softplus_array, line") in out, out
    assert checks.check_softplus(None, None) is False  # not even a function
    assert "your code raised TypeError" in capsys.readouterr().out


def test_wrong_merge(capsys):
    ns = solution("02_merge")

    def mean_of_means(mu_hat, var_hat, mu_p, var_p):  # ignores the precisions
        return (mu_hat + mu_p) / 2, var_hat * var_p / (var_hat + var_p)

    assert checks.check_merge(mean_of_means, ns["merge_backward"]) is False
    out = capsys.readouterr().out
    assert re.search(rf"WRONG: merge forward: mu_q, at mu_hat={NUMBER}, var_hat={NUMBER}, "
                     rf"mu_p={NUMBER}, var_p={NUMBER}: expected {NUMBER}, got {NUMBER}", out), out
    assert "PASS: merge backward" in out  # the parts are independent

    def no_var_path(g_mu, g_var, mu_hat, var_hat, mu_p, var_p):
        grads = ns["merge_backward"](g_mu, g_var, mu_hat, var_hat, mu_p, var_p)
        return grads[0], grads[1], grads[2], g_mu * 0  # forgot d/d var_p
    assert checks.check_merge(ns["merge_forward"], no_var_path) is False
    out = capsys.readouterr().out
    assert "PASS: merge forward" in out
    assert re.search(r"WRONG GRADIENT: merge backward: for var_p, through mu_q only \(g_var = 0\), "
                     r"at .*: backward gives 0, finite differences give", out), out


@pytest.mark.parametrize("mistake, hint", [
    ("s_constant", "s = 1 / (var_hat + var_p) depends on var_hat too"),
    ("var_q_constant", "the factor var_q depends on var_p too"),
    ("other_weight", "yours is the other mean's weight"),
    ("no_var_q_part", "this is only the part through mu_q: add g_var * d var_q / d var_p"),
    ("zero", "your gradient for var_p is 0 here, where g_var = 0: the part through mu_q"),
    ("sign", "the sign is flipped"),
])
def test_merge_backward_mistakes_are_named(mistake, hint, capsys):
    """The derivations that go wrong most often each get a hint that names the mistake."""
    ns = solution("02_merge")
    right = ns["merge_backward"]

    def wrong(g_mu, g_var, mu_hat, var_hat, mu_p, var_p):
        d_mu_hat, d_var_hat, d_mu_p, d_var_p = right(g_mu, g_var, mu_hat, var_hat, mu_p, var_p)
        s = 1 / (var_hat + var_p)
        _, var_q = ns["merge_forward"](mu_hat, var_hat, mu_p, var_p)
        if mistake == "s_constant":  # s differentiated as if it did not depend on var_hat
            d_var_hat = g_mu * mu_p * s + g_var * var_p * s
        elif mistake == "var_q_constant":  # the textbook form, var_q taken as a constant
            d_var_p = -g_mu * mu_p * var_q / var_p ** 2 + g_var * var_hat ** 2 * s ** 2
        elif mistake == "other_weight":
            d_mu_hat = g_mu * var_hat * s
        elif mistake == "no_var_q_part":
            d_var_p = right(g_mu, 0 * g_var, mu_hat, var_hat, mu_p, var_p)[3]
        elif mistake == "zero":
            d_var_p = 0 * g_mu
        else:
            d_mu_p = -d_mu_p
        return d_mu_hat, d_var_hat, d_mu_p, d_var_p

    assert checks.check_merge(ns["merge_forward"], wrong) is False
    out = capsys.readouterr().out
    assert "WRONG GRADIENT: merge backward" in out and hint in out.split("hint: ")[1], out


def test_wrong_kl(capsys):
    ns = solution("03_gaussian_kl")
    without_minus_one = lambda mq, vq, mp, vp: ns["kl_forward"](mq, vq, mp, vp) + 0.5
    assert checks.check_kl(without_minus_one, ns["kl_backward"]) is False
    out = capsys.readouterr().out
    m = re.search(rf"WRONG: KL forward: kl_forward, at .*: expected {NUMBER}, got {NUMBER}", out)
    assert m and float(m.group(2)) == pytest.approx(float(m.group(1)) + 0.5), out

    def sign_error(g, mq, vq, mp, vp):
        d = list(ns["kl_backward"](g, mq, vq, mp, vp))
        d[2] = -d[2]
        return tuple(d)
    assert checks.check_kl(ns["kl_forward"], sign_error) is False
    out = capsys.readouterr().out
    m = re.search(rf"WRONG GRADIENT: KL backward: for mu_p, .*: backward gives {NUMBER}, "
                  rf"finite differences give {NUMBER}", out)
    assert m and float(m.group(1)) == pytest.approx(-float(m.group(2)), rel=1e-4), out


def batch_norm_with(dx_of):
    """The exercise's batch norm with dx = dx_of(g, gamma, xhat, inv_std, n)."""
    def batch_norm(x, gamma, beta, eps):
        n = x.shape[0]
        centred = x.data - x.data.mean(axis=0)
        inv_std = 1 / np.sqrt((centred * centred).mean(axis=0) + eps)
        xhat = centred * inv_std

        def backward(g):
            return dx_of(g, gamma.data, xhat, inv_std, n), (g * xhat).sum(axis=0), g.sum(axis=0)
        return record(gamma.data * xhat + beta.data, (x, gamma, beta), backward)
    return batch_norm


def test_batch_norm_with_constant_statistics_is_wrong_and_named(capsys):
    naive = batch_norm_with(lambda g, gamma, xhat, inv_std, n: g * gamma * inv_std)
    assert checks.check_batchnorm_backward(naive) is False
    out = capsys.readouterr().out
    assert "PASS: batch norm backward, dgamma and dbeta" in out, out
    assert re.search(rf"WRONG GRADIENT: batch norm backward, dx: for x, at index \(\d, \d\): "
                     rf"backward gives {NUMBER}, finite differences give {NUMBER}", out), out
    assert "treats the batch mean and variance as constants" in out


def test_batch_norm_missing_the_variance_term(capsys):
    no_var = batch_norm_with(lambda g, gamma, xhat, inv_std, n:
                             gamma * inv_std * (g - g.sum(axis=0) / n))
    assert checks.check_batchnorm_backward(no_var) is False
    out = capsys.readouterr().out
    assert "WRONG GRADIENT: batch norm backward, dx" in out and "constants" not in out, out


def test_wrong_logsumexp_and_bound(capsys):
    ns = solution("05_iw_bound")
    naive = lambda a, axis=0: np.log(np.exp(a).sum(axis=axis))
    assert checks.check_logsumexp_and_iw_bound(naive, ns["logsumexp"], ns["iw_bound"]) is False
    out = capsys.readouterr().out
    assert re.search(r"WRONG: logsumexp forward: logsumexp_array\(a - 1000, axis=0\), at index "
                     rf"\(\d,\): expected {NUMBER}, got -inf", out), out
    assert out.count("NOT DONE YET") == 2  # backward and bound wait for the forward

    def softmax_without_g(x, axis=0):
        out = ns["logsumexp_array"](x.data, axis)
        return record(out, (x,), lambda g: (np.exp(x.data - np.expand_dims(out, axis)),))
    assert checks.check_logsumexp_and_iw_bound(ns["logsumexp_array"], softmax_without_g,
                                               ns["iw_bound"]) is False
    out = capsys.readouterr().out
    assert "WRONG GRADIENT: logsumexp backward: for a, at index" in out, out

    without_log_k = lambda log_w: ns["logsumexp"](log_w, axis=0)
    assert checks.check_logsumexp_and_iw_bound(ns["logsumexp_array"], ns["logsumexp"],
                                               without_log_k) is False
    out = capsys.readouterr().out
    m = re.search(rf"WRONG: importance-weighted bound: iw_bound, at index \(\d,\): "
                  rf"expected {NUMBER}, got {NUMBER}", out)
    assert m and float(m.group(2)) - float(m.group(1)) == pytest.approx(math.log(20), rel=1e-5), out

    detached = lambda log_w: Tensor(ns["logsumexp_array"](log_w.data, 0) - math.log(len(log_w)))
    assert checks.check_logsumexp_and_iw_bound(ns["logsumexp_array"], ns["logsumexp"],
                                               detached) is False
    assert "records no graph" in capsys.readouterr().out


def reparameterize_with(std_of, backward_of):
    def reparameterize(mu, var, eps):
        z = mu.data + std_of(var.data) * eps
        return record(z, (mu, var), lambda g: backward_of(g, mu, var, eps))
    return reparameterize


def test_wrong_reparameterize(capsys):
    right_backward = lambda g, mu, var, eps: (sum_to(g, mu.shape),
                                              sum_to(g * eps * 0.5 / np.sqrt(var.data), var.shape))
    with_var_as_std = reparameterize_with(lambda v: v, right_backward)
    assert checks.check_reparameterize(with_var_as_std) is False
    out = capsys.readouterr().out
    assert re.search(r"WRONG: reparameterize: z, at mu=.*, var=.*, eps=.*: expected", out), out

    no_sum = reparameterize_with(np.sqrt, lambda g, mu, var, eps:
                                 (g, g * eps * 0.5 / np.sqrt(var.data)))
    assert checks.check_reparameterize(no_sum) is False
    out = capsys.readouterr().out
    assert "returned a gradient of shape (4, 2, 3) for mu of shape (2, 3)" in out, out
    assert "sum_to" in out


def top_down_with(top_merge=False, kl_standard=False, detach=False, prior_of_mean=False,
                  extra_sample=False, skip_bottom=False, kl_summed=False, top_first=False,
                  up_shifted=False, top_kl_broadcast=False, top_kl_summed=False):
    """The solution of exercise 7 with one of the usual mistakes (top_kl_broadcast is
    not one: the ELBO treats a (K, B, d) top-layer KL the same as a (B, d) one)."""
    def top_down(model, up, sample):
        n = model.n_layers
        z, mu_q, var_q, kl = [None] * n, [None] * n, [None] * n, [None] * n
        mu_q[-1], var_q[-1] = gaussian.merge(*up[-1], 0.0, 1.0) if top_merge else up[-1]
        z[-1] = sample(mu_q[-1], var_q[-1])
        kl[-1] = gaussian.gaussian_kl(z[-1] * 0 + mu_q[-1] if top_kl_broadcast else mu_q[-1],
                                      var_q[-1], 0.0, 1.0)
        if top_kl_summed:
            kl[-1] = kl[-1].sum(axis=-1)
        for i in range(n - 2, 0 if skip_bottom else -1, -1):
            mu_p, var_p = model.prior(i, mu_q[i + 1] if prior_of_mean else z[i + 1])
            mu_hat = Tensor(up[i][0].data) if detach else up[i + 1 if up_shifted else i][0]
            mu_q[i], var_q[i] = gaussian.merge(mu_hat, up[i][1], mu_p, var_p)
            z[i] = sample(mu_q[i], var_q[i])
            if extra_sample:
                sample(mu_q[i], var_q[i])
            kl[i] = (gaussian.gaussian_kl(mu_q[i], var_q[i], 0.0, 1.0) if kl_standard else
                     gaussian.gaussian_kl(mu_q[i], var_q[i], mu_p, var_p))
            if kl_summed:
                kl[i] = kl[i].sum(axis=-1)
        if top_first:
            return z[::-1], mu_q[::-1], var_q[::-1], kl[::-1]
        return z, mu_q, var_q, kl
    return top_down


@pytest.mark.parametrize("mistake, messages", [
    ("top_merge", ["WRONG: top-down pass: layer z3: mu_q", "no merge"]),
    ("kl_standard", ["WRONG: top-down pass: layer z2: kl", "not against N(0, I)"]),
    ("prior_of_mean", ["WRONG: top-down pass: layer z2: mu_q has shape (5, 3), expected "
                       "(1, 5, 3)", "conditioned on the *sample*"]),
    ("extra_sample", ["sample() was called 5 times; call it once per layer (3 layers)"]),
    ("detach", ["PASS: top-down pass:", "WRONG GRADIENT: top-down pass, gradients: weight "
                "up_blocks.0.dense.0.weight", "detached copy"]),
    ("skip_bottom", ["WRONG: top-down pass: top_down's z has no value for layer index 0 (z1)",
                     "does it reach i = 0?"]),
    ("kl_summed", ["layer z2: kl has shape (1, 5), expected (1, 5, 3) (the KL per unit: "
                   "do not sum over the units)", "hint: kl[i] is the KL per unit"]),
    ("top_kl_summed", ["layer z3: kl has shape (5,), expected (5, 2)",
                       "hint: kl[i] is the KL per unit, of the shape of mu_q[i]: drop the sum"]),
    ("top_first", ["your z has [2, 3, 4] units per entry", "the lists look top first"]),
    # raised inside NumPy's broadcasting: the message points at the student's line
    ("up_shifted", ["your code raised ValueError", "(in top_down, line",
                    "`mu_q[i], var_q[i] = gaussian.merge(mu_hat, up[i][1], mu_p, var_p)`"]),
])
def test_wrong_top_down(capsys, mistake, messages):
    assert checks.check_top_down(top_down_with(**{mistake: True})) is False
    out = capsys.readouterr().out
    for message in messages:
        assert message in out, out


def test_top_layer_kl_broadcast_over_samples_passes(capsys):
    assert checks.check_top_down(top_down_with(top_kl_broadcast=True)) is True, \
        capsys.readouterr().out


# ----------------------------------------------------------------------------------
# 2. Layout: what a teacher and the tests rely on
# ----------------------------------------------------------------------------------
def test_every_notebook_has_one_blank_one_check_and_a_solution():
    notebooks = sorted(os.path.splitext(os.path.basename(p))[0]
                       for p in glob.glob(os.path.join(EXERCISES, "[0-9][0-9]_*.ipynb")))
    solutions = sorted(os.path.splitext(os.path.basename(p))[0]
                       for p in glob.glob(os.path.join(EXERCISES, "solutions", "*.py")))
    assert notebooks == NAMES and solutions == NAMES
    for name in NAMES:
        nb = notebook_json(name)
        assert nb["nbformat"] == 4
        (blank,) = cells_tagged(nb, "exercise")
        (check,) = cells_tagged(nb, "check")
        assert "NotImplementedError" in source(blank)
        assert source(check).startswith("done = checks.check_")
        cells = nb["cells"]
        assert cells.index(blank) < cells.index(check)


def test_notebooks_match_their_builder():
    """The .ipynb files are written by build_exercises.py: an edit made to one side only
    is caught here."""
    pytest.importorskip("nbformat", reason="build_exercises.py needs nbformat")
    import build_exercises
    for name in NAMES:
        built = build_exercises.build(name)
        committed = notebook_json(name)["cells"]
        assert [(c.cell_type, c.source, c.metadata.get("tags")) for c in built.cells] == \
            [(c["cell_type"], source(c), c["metadata"].get("tags")) for c in committed], \
            f"{name}.ipynb differs from build_exercises.py: run it and commit the result"


def test_notebooks_are_committed_blank_and_without_outputs():
    for name in NAMES:
        for cell in notebook_json(name)["cells"]:
            if cell["cell_type"] == "code":
                assert cell["outputs"] == [] and cell["execution_count"] is None, \
                    f"{name}.ipynb was saved with outputs: clear them before committing"


def test_nothing_but_the_solutions_needs_the_solutions_folder():
    """A teacher deletes solutions/ from the students' copy: nothing else may need it."""
    for name in NAMES:
        for cell in notebook_json(name)["cells"]:
            assert "solutions" not in source(cell) or cell["cell_type"] == "markdown", name
    with open(os.path.join(EXERCISES, "checks.py")) as f:
        assert "solutions" not in f.read()


def test_readme_lists_every_exercise():
    with open(os.path.join(EXERCISES, "README.md")) as f:
        readme = f.read()
    for name in NAMES:
        assert name + ".ipynb" in readme


def test_the_product_does_not_import_jupyter():
    jupyter = re.compile(r"^\s*(import|from)\s+(nbformat|nbclient|ipykernel|IPython|jupyter)",
                         re.MULTILINE)
    for path in glob.glob(os.path.join(ROOT, "*.py")) + [os.path.join(EXERCISES, "checks.py")]:
        with open(path) as f:
            assert not jupyter.search(f.read()), f"{path} imports a Jupyter package"
    with open(os.path.join(ROOT, "requirements.txt")) as f:
        assert not re.search(r"nbformat|nbclient|ipykernel|jupyter", f.read())


# ----------------------------------------------------------------------------------
# 3. The notebooks themselves, run by a Jupyter kernel
# ----------------------------------------------------------------------------------
def _need_jupyter():
    for module in ("nbformat", "nbclient", "ipykernel"):
        pytest.importorskip(module, reason=f"{module} is needed to run the notebooks")


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_committed_notebook_runs_and_says_not_done_yet(name):
    _need_jupyter()
    headlines, errors = grade.grade(name + ".ipynb")
    assert errors == [], f"{name}.ipynb raised in a cell: {errors}"
    assert len(headlines) == EXERCISE_CHECKS[name][1], headlines
    assert all(h.startswith("NOT DONE YET: ") for h in headlines), headlines


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_with_the_solution_passes(name):
    _need_jupyter()
    headlines, errors = grade.grade(name + ".ipynb", grade.solution_source(name + ".ipynb"))
    assert errors == [], f"{name}.ipynb with its solution raised in a cell: {errors}"
    assert len(headlines) == EXERCISE_CHECKS[name][1], headlines
    assert all(h.startswith("PASS: ") for h in headlines), headlines


@pytest.mark.slow
def test_grade_a_students_folder(tmp_path, capsys):
    """A student's copy: one exercise solved, one wrong, one with its check cell edited
    to print PASS (ignored: only the exercise cell is taken), one whose exercise cell
    replaces the check function (the check cell reloads checks.py first); the report
    says which, and lists the notebooks the folder lacks."""
    _need_jupyter()
    import nbformat

    def student(name, code, check=None):
        nb = nbformat.read(os.path.join(EXERCISES, name + ".ipynb"), as_version=4)
        grade.fill_in(nb, code)
        if check is not None:
            grade.tagged(nb, "check")[0].source = check
        nbformat.write(nb, str(tmp_path / (name + ".ipynb")))

    student("01_softplus", solution_source("01_softplus"))
    student("03_gaussian_kl", solution_source("03_gaussian_kl").replace(" - 1)", ")"))
    student("06_reparameterize", blank_source("06_reparameterize"), check="print('PASS: all')")
    student("02_merge", "merge_forward = merge_backward = None\n"
                        "checks.check_merge = lambda *a: print('PASS: merge forward: ok') or True")
    status = grade.main([str(tmp_path)])
    out = capsys.readouterr().out
    assert status == 1, out
    assert f"{tmp_path / '01_softplus.ipynb'}: 2 of 2 parts pass" in out, out
    assert "03_gaussian_kl.ipynb: 1 of 2 parts pass" in out and "WRONG: KL forward" in out, out
    assert "06_reparameterize.ipynb: 0 of 2 parts pass" in out, out
    assert "02_merge.ipynb: 0 of 2 parts pass" in out, out  # the real check ran
    for name in ("04_batchnorm_backward", "05_iw_bound", "07_top_down"):
        assert f"{tmp_path / name}.ipynb: MISSING" in out, out


def test_grade_names_a_path_that_does_not_exist(tmp_path, capsys):
    status = grade.main([str(tmp_path / "alice")])
    out = capsys.readouterr().out
    assert status == 1 and "no such file or folder" in out, out


@pytest.mark.parametrize("text", [
    "5", "[]", '{"cells": 5, "nbformat": 4, "nbformat_minor": 5, "metadata": {}}',
    '{"cells": [5], "nbformat": 4, "nbformat_minor": 5, "metadata": {}}', "{}",
    '{"cells": [{"cell_type": "code", "id": "a", "source": "", "metadata": {"tags": 5}}], '
    '"nbformat": 4, "nbformat_minor": 5, "metadata": {}}',
])
def test_grade_names_json_that_is_not_a_notebook(tmp_path, capsys, text):
    """Valid JSON of the wrong shape used to be reported as "TypeError: 'int' object is not
    iterable" or "AttributeError: 'list' object has no attribute 'get'"."""
    pytest.importorskip("nbformat", reason="grade.py reads notebooks with nbformat")
    path = tmp_path / "01_softplus.ipynb"
    path.write_text(text)
    assert grade.main([str(path)]) == 1
    out = capsys.readouterr().out
    assert f"ValueError: {path}: not a Jupyter notebook (JSON, but not an object" in out, out


def test_grade_solutions_in_a_students_copy(tmp_path, monkeypatch, capsys):
    """In a copy without solutions/ (the handout), --solutions is a usage error saying
    why, not one FileNotFoundError per notebook."""
    monkeypatch.setattr(grade, "SOLUTIONS", str(tmp_path / "solutions"))
    with pytest.raises(SystemExit) as e:
        grade.main(["--solutions"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "students' copy" in err, err


def test_grade_keeps_the_kernels_start_up_warnings_out_of_the_report(capfd):
    """ipykernel 7 logs a warning about TCP without encryption at every kernel start:
    seven of them interleaved with the report. The kernel runs with --log-level=ERROR,
    and still runs the cells."""
    _need_jupyter()
    import nbformat
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("print(6 * 7)")])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    grade.execute(nb)
    assert nb.cells[0].outputs[0].text == "42\n"
    assert "WARNING" not in capfd.readouterr().err


def test_grade_refuses_a_shortened_option_name(capsys):
    with pytest.raises(SystemExit) as e:  # argparse took --sol for --solutions
        grade.main(["--sol"])
    assert e.value.code == 2 and "unrecognized arguments: --sol" in capsys.readouterr().err


def test_grade_knows_every_exercise_and_its_parts():
    assert grade.PARTS == {name: parts for name, (_, parts) in EXERCISE_CHECKS.items()}
    assert set(grade.PARTS) == {os.path.splitext(os.path.basename(p))[0]
                                for p in grade.exercise_notebooks()}


# ----------------------------------------------------------------------------------
# 1. More mistakes from students' trial runs: each named by its message
# ----------------------------------------------------------------------------------
def test_softplus_forward_must_return_a_float64_array_and_keep_its_input(capsys):
    op = solution("01_softplus")["softplus"]
    as_list = lambda x: stable_softplus(x).tolist()
    as_float32 = lambda x: stable_softplus(x).astype(np.float32)

    def in_place(x):
        out = np.log1p(np.exp(-np.abs(x)))
        x[x < 0] = 0  # the op's backward would then see the wrong x
        return x + out
    for wrong, message in ((as_list, "softplus_array returned a list, expected an array"),
                           (as_float32, "softplus_array returned float32 values for float64"),
                           (in_place, "softplus_array changed its input x in place")):
        assert checks.check_softplus(wrong, op) is False
        out = capsys.readouterr().out
        assert f"WRONG: softplus forward: {message}" in out, out


@pytest.mark.parametrize("wrong_forward, hint", [
    (lambda mh, vh, mp, vp: ((mh * vp + mp * vh) / (vh + vp), vh + vp),
     "variances do not add up, precisions do"),
    (lambda mh, vh, mp, vp: ((mh * vp + mp * vh) / (vh + vp), 1 / (vh + vp)),
     "add the precisions 1/var_hat and 1/var_p, then invert"),
    (lambda mh, vh, mp, vp: ((mh * vh + mp * vp) / (vh + vp), vh * vp / (vh + vp)),
     "each mean is weighted by the OTHER one's variance"),
    (lambda mh, vh, mp, vp: ((mh + mp) / 2, vh * vp / (vh + vp)),
     "a plain average ignores the precisions"),
    (lambda mh, vh, mp, vp: (mh / vh + mp / vp, vh * vp / (vh + vp)),
     "still has to be multiplied by var_q"),
], ids=["variances added", "1/(sum of variances)", "weights swapped", "plain average",
        "no var_q factor"])
def test_merge_forward_mistakes_are_named(capsys, wrong_forward, hint):
    assert checks.check_merge(wrong_forward, solution("02_merge")["merge_backward"]) is False
    out = capsys.readouterr().out
    assert "WRONG: merge forward" in out and hint in out.split("hint: ")[1], out


def test_a_reparameterize_that_sums_only_a_third_axis_is_told_why(capsys):
    """The docstring's shapes, (B, d) with eps (B, d) or (K, B, d), read as a rule on
    eps.ndim: the op's own part (eps up to (2, K, B, d)) catches eps.ndim == 3, and the
    Monte Carlo part (mu of shape (3,), eps (200000, 3)) a sum over all but the last two
    axes, and says what to sum."""
    def reparameterize_summing(axes_of):
        def reparameterize(mu, var, eps):
            std = np.sqrt(var.data)

            def backward(g):
                axes = axes_of(eps)
                return g.sum(axis=axes), (g * eps * 0.5 / std).sum(axis=axes)
            return record(mu.data + std * eps, (mu, var), backward)
        return reparameterize
    third_axis = reparameterize_summing(lambda eps: (0,) if eps.ndim == 3 else ())
    assert checks.check_reparameterize(third_axis) is False
    out = capsys.readouterr().out
    assert "returned a gradient of shape (2, 4, 2, 3) for mu of shape (2, 3)" in out, out
    all_but_two = reparameterize_summing(lambda eps: tuple(range(eps.ndim - 2)))
    assert checks.check_reparameterize(all_but_two) is False
    out = capsys.readouterr().out
    assert "PASS: reparameterize:" in out, out
    assert ("WRONG: reparameterize, Monte Carlo: with mu of shape (3,) and eps of shape "
            "(200000, 3), the gradients that reached mu and var have shapes (200000, 3)") in out, out
    assert "not a test on eps.ndim" in out


def test_a_naive_iw_bound_fails_on_very_low_log_weights(capsys):
    ns = solution("05_iw_bound")
    naive = lambda lw: autograd.log(autograd.mean(autograd.exp(lw), axis=0))
    with np.errstate(all="ignore"):
        assert checks.check_logsumexp_and_iw_bound(ns["logsumexp_array"], ns["logsumexp"],
                                                   naive) is False
    out = capsys.readouterr().out
    assert "WRONG: importance-weighted bound: iw_bound of log-weights near -1000" in out, out
    assert "build L_K from your logsumexp op" in out


def batch_norm_solution_with(dx_of=lambda dx: dx, dgamma_of=lambda dgamma, g: dgamma):
    """The solution of exercise 4 with dx replaced by dx_of(dx) and dgamma by
    dgamma_of(dgamma, g)."""
    real = solution("04_batchnorm_backward")["batch_norm"]

    def batch_norm(x, gamma, beta, eps=1e-5):
        out = real(x, gamma, beta, eps)
        backward = out._backward

        def partial(g):
            dx, dgamma, dbeta = backward(g)
            return dx_of(dx), dgamma_of(dgamma, g), dbeta
        out._backward = partial
        return out
    return batch_norm


def test_batch_norm_dx_left_as_zero_or_blank(capsys):
    """A student who does dgamma and dbeta first: a dx of zeros is named as such, and a
    dx still None does not hold up the check of dgamma and dbeta."""
    with_dx = batch_norm_solution_with
    assert checks.check_batchnorm_backward(with_dx(np.zeros_like)) is False
    out = capsys.readouterr().out
    assert "PASS: batch norm backward, dgamma and dbeta" in out, out
    assert "your dx is 0 everywhere (a placeholder?)" in out, out
    assert checks.check_batchnorm_backward(with_dx(lambda dx: None)) is False
    out = capsys.readouterr().out
    assert "PASS: batch norm backward, dgamma and dbeta" in out, out
    assert "NOT DONE YET" in out, out


def test_merge_outputs_or_gradients_in_another_order(capsys):
    ns = solution("02_merge")
    swapped = lambda *a: ns["merge_forward"](*a)[::-1]
    assert checks.check_merge(swapped, ns["merge_backward"]) is False
    assert "merge_forward returned (var_q, mu_q)" in capsys.readouterr().out

    def reordered(*args):
        d_mu_hat, d_var_hat, d_mu_p, d_var_p = ns["merge_backward"](*args)
        return d_mu_hat, d_mu_p, d_var_hat, d_var_p
    assert checks.check_merge(ns["merge_forward"], reordered) is False
    out = capsys.readouterr().out
    assert ("WRONG GRADIENT: merge backward: merge_backward returned the right gradients in "
            "the order (mu_hat, mu_p, var_hat, var_p)") in out, out


@pytest.mark.parametrize("mistake, hint", [
    (lambda kl, mq, vq, mp, vp: 2 * kl(mq, vq, mp, vp), "the factor 0.5 is missing"),
    (lambda kl, mq, vq, mp, vp: kl(mp, vp, mq, vq), "your values are KL(p || q)"),
    (lambda kl, mq, vq, mp, vp: kl(mq, vq, mp, vp) + 0.5, "the '- 1' inside the bracket"),
    (lambda kl, mq, vq, mp, vp: kl(mq, vq, mp, vp) - 0.25 * np.log(vp / vq),
     "use the variances in the logs, not standard deviations"),
], ids=["twice", "reversed", "without -1", "log of std"])
def test_kl_forward_mistakes_get_their_own_hint(capsys, mistake, hint):
    ns = solution("03_gaussian_kl")
    wrong = lambda *a: mistake(ns["kl_forward"], *a)
    assert checks.check_kl(wrong, ns["kl_backward"]) is False
    out = capsys.readouterr().out
    assert "WRONG: KL forward" in out and hint in out, out


@pytest.mark.parametrize("dx_of, hint", [
    (lambda g, gamma, xhat, inv_std, n: gamma * inv_std * (g - xhat * (g * xhat).mean(axis=0)),
     "the column sums of your dx are not 0"),
    (lambda g, gamma, xhat, inv_std, n: gamma * inv_std * (
        g - g.mean(axis=0) + xhat * (g * xhat).mean(axis=0)),
     "the column sums of xhat * dx are not 0"),
    (lambda g, gamma, xhat, inv_std, n: inv_std * (
        g - g.mean(axis=0) - xhat * (g * xhat).mean(axis=0)),
     "off by a factor per column: is it scaled by gamma"),
], ids=["no mean term", "wrong sign", "no gamma"])
def test_batch_norm_dx_hint_names_the_broken_identity(capsys, dx_of, hint):
    assert checks.check_batchnorm_backward(batch_norm_with(dx_of)) is False
    out = capsys.readouterr().out
    assert "WRONG GRADIENT: batch norm backward, dx" in out and hint in out, out


def test_logsumexp_backward_without_the_reduced_axis_put_back(capsys):
    """g * exp(a - out) broadcasts by luck along axis 0; along axis 1 of a square array it
    broadcasts too, silently wrong: the check tests that case."""
    ns = solution("05_iw_bound")

    def no_expand_dims(x, axis=0):
        out = ns["logsumexp_array"](x.data, axis)
        return record(out, (x,), lambda g: (g * np.exp(x.data - out),))
    assert checks.check_logsumexp_and_iw_bound(ns["logsumexp_array"], no_expand_dims,
                                               ns["iw_bound"]) is False
    out = capsys.readouterr().out
    assert "WRONG GRADIENT: logsumexp backward: for a" in out and "expand_dims" in out, out


# ----------------------------------------------------------------------------------
# 1. A teacher's review: hints that name the mistake, blanks and shapes
# ----------------------------------------------------------------------------------
def kl_backward_with(mistake):
    """The solution's kl_backward with one of the usual mistakes."""
    right = solution("03_gaussian_kl")["kl_backward"]

    def kl_backward(g, mq, vq, mp, vp):
        d = list(right(g, mq, vq, mp, vp))
        if mistake == "log var_q":  # d/d log var_q = var_q d/d var_q
            d[1] = d[1] * vq
        elif mistake == "log var_p":
            d[3] = d[3] * vp
        elif mistake == "sign":
            d[1] = -d[1]
        elif mistake == "no g":
            d = list(right(np.ones_like(g), mq, vq, mp, vp))
        elif mistake == "KL(p||q)":  # the gradients of KL(p || q), for (mu_q, ..., var_p)
            d_mp, d_vp, d_mq, d_vq = right(g, mp, vp, mq, vq)
            d = [d_mq, d_vq, d_mp, d_vp]
        return tuple(d)
    return kl_backward


@pytest.mark.parametrize("mistake, where, hint", [
    ("log var_q", "for var_q", "this is the gradient for log var_q (the true one times var_q)"),
    ("log var_p", "for var_p", "this is the gradient for log var_p (the true one times var_p)"),
    ("sign", "for var_q", "the sign is flipped"),
    ("no g", "for mu_q", "g is missing"),
    ("KL(p||q)", "for mu_q", "this is the gradient of KL(p || q)"),
])
def test_kl_backward_mistakes_are_named(capsys, mistake, where, hint):
    ns = solution("03_gaussian_kl")
    assert checks.check_kl(ns["kl_forward"], kl_backward_with(mistake)) is False
    out = capsys.readouterr().out
    assert f"WRONG GRADIENT: KL backward: {where}, at" in out, out
    assert hint in out.split("hint: ")[1], out


def test_kl_forward_written_for_log_variances_is_named(capsys):
    def kl_forward(mq, vq, mp, vp):  # var read as log-variance, as many VAE codes store it
        return 0.5 * (vp - vq + (np.exp(vq) + (mq - mp) ** 2) / np.exp(vp) - 1)
    assert checks.check_kl(kl_forward, solution("03_gaussian_kl")["kl_backward"]) is False
    out = capsys.readouterr().out
    assert "WRONG: KL forward" in out and "the KL written for log-variances" in out, out


def test_reparameterize_with_var_as_log_variance_is_named(capsys):
    right_backward = lambda g, mu, var, eps: (sum_to(g, mu.shape),
                                              sum_to(g * eps * 0.5 / np.sqrt(var.data), var.shape))
    as_log_variance = reparameterize_with(lambda v: np.exp(v / 2), right_backward)
    assert checks.check_reparameterize(as_log_variance) is False
    out = capsys.readouterr().out
    assert "WRONG: reparameterize: z, at" in out, out
    assert "z = mu + exp(var / 2) * eps treats var as a log-variance" in out, out


def test_reparameterize_summing_only_the_first_axis_is_wrong(capsys):
    """A backward that sums axis 0 alone passes with one extra axis (K, B, d): the check
    also draws eps with two, (2, K, B, d)."""
    def backward(g, mu, var, eps):
        d_var = g * eps * 0.5 / np.sqrt(var.data)
        if g.ndim > mu.ndim:
            return g.sum(axis=0), d_var.sum(axis=0)
        return g, d_var
    assert checks.check_reparameterize(reparameterize_with(np.sqrt, backward)) is False
    out = capsys.readouterr().out
    assert ("WRONG: reparameterize: reparameterize's backward returned a gradient of shape "
            "(4, 2, 3) for mu of shape (2, 3)") in out, out


def test_batch_norm_dx_left_as_ellipsis_and_gamma_named(capsys):
    """`return ..., dgamma, dbeta` is a blank dx (the README's rule), not a gradient of
    shape (); and a wrong dgamma is named as gamma's in the dx part too."""
    assert checks.check_batchnorm_backward(batch_norm_solution_with(lambda dx: ...)) is False
    out = capsys.readouterr().out
    assert "PASS: batch norm backward, dgamma and dbeta" in out, out
    assert "NOT DONE YET: batch norm backward, dx: batch_norm's backward returned" in out, out
    not_summed = batch_norm_solution_with(dgamma_of=lambda dgamma, g: g)  # shape (6, 3)
    assert checks.check_batchnorm_backward(not_summed) is False
    out = capsys.readouterr().out
    assert ("WRONG: batch norm backward, dx: batch_norm's backward returned a gradient of "
            "shape (6, 3) for gamma of shape (3,)") in out, out
    assert "an input of shape" not in out, out


# ----------------------------------------------------------------------------------
# 2. A teacher's review: the set-up cell, the graded cell, renamed downloads
# ----------------------------------------------------------------------------------
def test_setup_cell_outside_the_repository_says_so(tmp_path):
    """A notebook opened outside the repository: one clear error in the set-up cell, not
    a bare ModuleNotFoundError for checks and NameErrors after it."""
    import subprocess
    setup = next(source(c) for c in notebook_json("01_softplus")["cells"]
                 if c["cell_type"] == "code")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([sys.executable, "-c", setup], cwd=tmp_path, env=env,
                         capture_output=True, text=True)
    assert run.returncode != 0
    assert "FileNotFoundError: checks.py not found in" in run.stderr, run.stderr
    assert "open this notebook from inside the repository" in run.stderr, run.stderr


def test_students_are_told_to_keep_their_code_in_the_exercise_cell():
    for name in NAMES:
        how = [source(c) for c in notebook_json(name)["cells"]
               if source(c).startswith("**How this notebook works.**")]
        assert len(how) == 1 and "code in new cells is not graded" in how[0], name


@pytest.mark.parametrize("filename, exercise", [
    ("alice_1234_02_merge.ipynb", "02_merge"),
    ("03_gaussian_kl (1).ipynb", "03_gaussian_kl"),
    ("Bob-07_TOP_DOWN.ipynb", "07_top_down"),
    ("merge.ipynb", None),
    ("102_merge.ipynb", None),
])
def test_grade_reads_the_exercise_from_a_renamed_file(filename, exercise):
    assert grade.exercise_from_filename(filename) == exercise


def test_grade_reads_the_exercise_from_the_check_call(tmp_path):
    pytest.importorskip("nbformat", reason="grade.py reads notebooks with nbformat")
    import nbformat
    for name in NAMES:
        nb = nbformat.read(os.path.join(EXERCISES, name + ".ipynb"), as_version=4)
        for cell in grade.tagged(nb, "check"):
            cell.metadata["tags"] = []  # the tag lost: the call still says which
        nbformat.write(nb, str(tmp_path / "Untitled.ipynb"))
        assert grade.identify(str(tmp_path / "Untitled.ipynb")) == name
    nbformat.write(nbformat.v4.new_notebook(), str(tmp_path / "scratch.ipynb"))
    assert grade.identify(str(tmp_path / "scratch.ipynb")) is None


@pytest.mark.slow
def test_grade_a_folder_of_renamed_downloads(tmp_path, capsys):
    """Downloads renamed by a learning platform are graded as their exercise; two files
    for one exercise are both flagged; a helper in a new cell is named as not graded."""
    _need_jupyter()
    import nbformat

    def student(name, filename, code, extra=None):
        nb = nbformat.read(os.path.join(EXERCISES, name + ".ipynb"), as_version=4)
        grade.fill_in(nb, code)
        if extra:
            nb.cells.append(nbformat.v4.new_code_cell(extra))
        nbformat.write(nb, str(tmp_path / filename))

    student("02_merge", "alice_1234_02_merge.ipynb", solution_source("02_merge"),
            extra="def helper(x):\n    return x")
    student("03_gaussian_kl", "03_gaussian_kl (1).ipynb", blank_source("03_gaussian_kl"))
    student("03_gaussian_kl", "03_gaussian_kl.ipynb", blank_source("03_gaussian_kl"))
    student("01_softplus", "Untitled.ipynb", solution_source("01_softplus"))
    status = grade.main([str(tmp_path)])
    out = capsys.readouterr().out
    assert status == 1, out
    assert f"{tmp_path / 'alice_1234_02_merge.ipynb'} (02_merge): 2 of 2 parts pass" in out, out
    assert "note: code outside the exercise cell is not graded: cell " in out, out
    assert "`def helper(x):`" in out, out
    assert f"{tmp_path / 'Untitled.ipynb'} (01_softplus): 2 of 2 parts pass" in out, out
    assert out.count("2 notebooks in this folder are 03_gaussian_kl: 03_gaussian_kl (1).ipynb, "
                     "03_gaussian_kl.ipynb") == 2, out
    for name in ("01_softplus", "02_merge", "03_gaussian_kl"):
        assert f"{tmp_path / name}.ipynb: MISSING" not in out, out
    assert "not one of the exercises" not in out, out


def test_ungraded_code_ignores_an_older_set_up_cell(tmp_path):
    """A notebook from an earlier handout has another set-up cell (the one that imports
    checks): that is no student code; a helper in a new cell is."""
    import nbformat
    nb = nbformat.read(os.path.join(EXERCISES, "02_merge.ipynb"), as_version=4)
    setup = next(c for c in nb.cells if c.cell_type == "code" and "import checks" in c.source)
    setup.source = setup.source.replace("else:\n", "else:  # an edit of an older version\n")
    nb.cells.append(nbformat.v4.new_code_cell("def helper(x):\n    return x"))
    nbformat.write(nb, str(tmp_path / "02_merge.ipynb"))
    notes = grade.ungraded_code(str(tmp_path / "02_merge.ipynb"), "02_merge")
    assert len(notes) == 1 and "`def helper(x):`" in notes[0], notes


def test_a_kl_gradient_one_percent_off_is_wrong(capsys):
    """Gradients must agree with finite differences far better than 1 %: a kl_backward
    whose gradient for var_p is 1 % too large does not pass."""
    right = solution("03_gaussian_kl")["kl_backward"]

    def kl_backward(g, mu_q, var_q, mu_p, var_p):
        d_mu_q, d_var_q, d_mu_p, d_var_p = right(g, mu_q, var_q, mu_p, var_p)
        return d_mu_q, d_var_q, d_mu_p, 1.01 * d_var_p
    assert checks.check_kl_backward(kl_backward) is False
    assert "WRONG GRADIENT: KL backward: for var_p" in capsys.readouterr().out


@pytest.mark.parametrize("epsilon", [1e-7, 1e-9])
@pytest.mark.parametrize("guarded", ["both", "var_hat"])
def test_merge_forward_must_be_exact_at_extreme_variances(capsys, guarded, epsilon):
    """An epsilon added 'for safety' to a variance is invisible for variances near 1 and
    far off at the model's smallest variances (1e-8): the check must try those too,
    for each of the two variances, and compare them relatively (1e-9 is below ATOL)."""
    def merge_forward(mu_hat, var_hat, mu_p, var_p):
        var_hat = var_hat + epsilon
        if guarded == "both":
            var_p = var_p + epsilon
        var_q = 1 / (1 / var_hat + 1 / var_p)
        return (mu_hat / var_hat + mu_p / var_p) * var_q, var_q
    assert checks.check_merge_forward(merge_forward) is False
    assert "WRONG: merge forward: " in capsys.readouterr().out


def test_top_down_conditioned_on_the_mean_of_the_samples_is_wrong(capsys):
    """Conditioning the prior on the average of the K samples of the layer above equals
    the right pass when K = 1: the values must also be checked with K > 1."""
    def top_down(model, up, sample):
        n = model.n_layers
        z, mu_q, var_q, kl = [None] * n, [None] * n, [None] * n, [None] * n
        mu_q[-1], var_q[-1] = up[-1]
        z[-1] = sample(mu_q[-1], var_q[-1])
        kl[-1] = gaussian.gaussian_kl(mu_q[-1], var_q[-1], 0.0, 1.0)
        for i in range(n - 2, -1, -1):
            mu_p, var_p = model.prior(i, autograd.mean(z[i + 1], axis=0, keepdims=True))
            mu_q[i], var_q[i] = gaussian.merge(up[i][0], up[i][1], mu_p, var_p)
            z[i] = sample(mu_q[i], var_q[i])
            kl[i] = gaussian.gaussian_kl(mu_q[i], var_q[i], mu_p, var_p)
        return z, mu_q, var_q, kl
    assert checks.check_top_down_values(top_down) is False
    assert "WRONG: top-down pass" in capsys.readouterr().out


@pytest.fixture
def fake_grading(monkeypatch):
    """grade.grade replaced by canned (headlines, errors) per exercise (all parts pass
    unless a test says otherwise); returns the dict to edit and the list of calls."""
    canned = {name: ([f"PASS: part {k}: ok" for k in range(parts)], [])
              for name, parts in grade.PARTS.items()}
    calls = []

    def fake(notebook, source=None, timeout=300):
        name = os.path.splitext(os.path.basename(notebook))[0]
        calls.append(name)
        return canned[name]
    monkeypatch.setattr(grade, "grade", fake)
    return canned, calls


def test_grade_all_passing_exits_0(fake_grading, capsys):
    assert grade.main([]) == 0, capsys.readouterr().out


def test_grade_fails_when_one_part_fails(fake_grading, capsys):
    """One WRONG part among passing ones: the exit status says not everything passed."""
    canned, _ = fake_grading
    canned["02_merge"] = (["PASS: merge forward: ok", "WRONG: merge backward: no"], [])
    assert grade.main([]) == 1
    assert "02_merge.ipynb: 1 of 2 parts pass" in capsys.readouterr().out


def test_grade_flags_a_wrong_number_of_status_lines(fake_grading, capsys):
    """A notebook printing three PASS lines for a two-part exercise (the student's code
    printed one) is flagged and does not pass."""
    canned, _ = fake_grading
    canned["01_softplus"] = (["PASS: a", "PASS: b", "PASS: c"], [])
    assert grade.main([]) == 1
    assert "the checks printed 3 status lines, not the exercise's 2" in capsys.readouterr().out


def test_grade_fails_a_notebook_that_printed_no_status_line(fake_grading, capsys):
    """No status line at all (the check cell never ran) is not a pass."""
    canned, _ = fake_grading
    canned["06_reparameterize"] = ([], [])
    assert grade.main([]) == 1
    assert "06_reparameterize.ipynb: 0 of 0 parts pass" in capsys.readouterr().out


def test_grade_counts_only_the_check_cells_lines():
    """A PASS printed by the exercise cell is not a status line; only the check cells'."""
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.v4.new_notebook()
    exercise = nbformat.v4.new_code_cell("print('PASS: all done')", metadata={"tags": ["exercise"]})
    check = nbformat.v4.new_code_cell("checks.check_merge(...)", metadata={"tags": ["check"]})
    exercise.outputs = [nbformat.v4.new_output("stream", name="stdout", text="PASS: all done\n")]
    check.outputs = [nbformat.v4.new_output("stream", name="stdout",
                                            text="WRONG: merge forward: x\nPASS: merge backward: y\n")]
    nb.cells = [exercise, check]
    headlines, errors = grade.results(nb)
    assert headlines == ["WRONG: merge forward: x", "PASS: merge backward: y"] and errors == []


def test_grade_a_notebook_given_twice_once(fake_grading, tmp_path, capsys):
    """A notebook named on its own and through its folder is graded once, not flagged as
    two notebooks for one exercise."""
    pytest.importorskip("nbformat")
    _, calls = fake_grading
    shutil.copy(os.path.join(EXERCISES, "01_softplus.ipynb"), tmp_path / "01_softplus.ipynb")
    grade.main([str(tmp_path), str(tmp_path / "01_softplus.ipynb")])
    out = capsys.readouterr().out
    assert calls == ["01_softplus"], out
    assert "which one counts?" not in out, out


@pytest.mark.parametrize("argv, message", [
    # the paths' notebooks were reported under their names, graded with the solutions
    (["--solutions", "alice"], "give either --solutions or paths"),
    # nbclient took these for no time limit at all
    (["--timeout=0"], "argument --timeout: 0 is below 1"),
    (["--timeout=-5"], "argument --timeout: -5 is below 1"),
    # the last one won without a word
    (["--timeout=5", "--timeout", "10"], "argument --timeout: given twice: give it once"),
])
def test_grade_refuses_options_it_would_not_honour(capsys, monkeypatch, argv, message):
    monkeypatch.setattr(grade, "grade", lambda *a: pytest.fail("graded"))
    with pytest.raises(SystemExit) as e:
        grade.main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err
