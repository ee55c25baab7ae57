"""The check cells of the exercise notebooks: compare a student's code with the project.

Every ``check_*`` function takes the student's functions, runs them on small float64
inputs and prints one headline per part of the exercise:

    PASS: <part>: <what was checked>
    NOT DONE YET: <part>: <which blank is still empty>
    WRONG: <part>: <the input, the expected value, the value given>
    WRONG GRADIENT: <part>: <the input, backward's value, the finite-difference value>

followed, for the last three, by indented lines with details and a hint. It returns
True when every part passed, else False, and never raises: an exception in the
student's code becomes a WRONG line naming the line that raised it. A blank is
"not done yet" when it raises NotImplementedError or returns None or ``...``.

The references are the project's own code (autograd.py, gaussian.py, layers.py,
lvae.py) and central finite differences (autograd.numerical_gradient). Importing this
module puts the project's root folder on ``sys.path``, so that a notebook in this
folder can ``import checks`` and then ``from autograd import ...``.
"""
import itertools
import math
import os
import sys
import traceback
import warnings

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import autograd  # noqa: E402
import gaussian  # noqa: E402
import layers  # noqa: E402
from autograd import Tensor, no_grad, numerical_gradient  # noqa: E402

# float64 everywhere: forward values must agree to RTOL/ATOL; gradients must agree with
# central finite differences (step 1e-6) to GRAD_RTOL/GRAD_ATOL.
RTOL, ATOL = 1e-6, 1e-9
GRAD_RTOL, GRAD_ATOL = 1e-4, 1e-6


# ----------------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------------
class NotDone(Exception):
    """A blank is still empty."""


class Wrong(Exception):
    """A value or a gradient is wrong; ``status`` is 'WRONG' or 'WRONG GRADIENT'."""

    def __init__(self, message, hint=None, status="WRONG"):
        super().__init__(message)
        self.hint, self.status = hint, status


def _fmt(value):
    """A number or a small array, short."""
    value = np.asarray(value)
    if value.ndim == 0:
        return f"{float(value):.6g}" if np.isrealobj(value) else str(value)
    return np.array2string(value, precision=6, separator=", ", threshold=12)


def _is_student_code(filename):
    """A notebook cell or a student's file: not one of the project's modules (autograd.py,
    gaussian.py, ...), not Python's or an installed library's."""
    path = os.path.abspath(filename)
    prefixes = {os.path.abspath(p) for p in (sys.prefix, sys.base_prefix)}
    library = (any(path.startswith(p + os.sep) for p in prefixes)
               or "site-packages" in path or "dist-packages" in path)
    return not (os.path.dirname(path) == ROOT or library)


def _where(exc):
    """' (in f, line 7: `y = ...`)': the innermost frame of the student's code, where
    the error usually is even when it is raised deeper (inside NumPy, or a project op);
    else the innermost frame outside this module."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if os.path.abspath(f.filename) != os.path.abspath(__file__)]
    if not frames:
        return ""
    student = [f for f in frames if _is_student_code(f.filename)]
    f = (student or frames)[-1]
    code = f": `{f.line.strip()}`" if f.line else ""
    return f" (in {f.name}, line {f.lineno}{code})"


def run_part(part, body):
    """Run one part's checks; print its headline (and details); return True on PASS."""
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore", RuntimeWarning)  # judge values, not warnings
            passed = body()
    except NotImplementedError as e:
        print(f"NOT DONE YET: {part}: fill in the blank (it raises NotImplementedError"
              f"{': ' + str(e) if str(e) else ''}).")
        return False
    except NotDone as e:
        print(f"NOT DONE YET: {part}: {e}")
        return False
    except Wrong as e:
        print(f"{e.status}: {part}: {e}")
        if e.hint:
            print(f"    hint: {e.hint}")
        return False
    except Exception as e:  # anything the student's code raised
        print(f"WRONG: {part}: your code raised {type(e).__name__}: {e}{_where(e)}")
        return False
    print(f"PASS: {part}: {passed}")
    return True


def _parts(*results):
    """True when every part passed (the parts have all run and printed already)."""
    return all(results)


# ----------------------------------------------------------------------------------
# Helpers shared by the checks
# ----------------------------------------------------------------------------------
def _blank(name, value):
    """Raise NotDone when a function returned None or ``...`` (or a tuple of them)."""
    items = value if isinstance(value, (tuple, list)) else (value,)
    if value is None or any(v is None or v is Ellipsis for v in items):
        raise NotDone(f"{name} returned {'None' if value is None else 'a blank (None or ...)'}"
                      f": fill in the blank (and check that it ends with `return`).")


def _array(name, value, shape):
    """The student's result as a float array of ``shape``, or Wrong."""
    _blank(name, value)
    if isinstance(value, Tensor):
        raise Wrong(f"{name} returned a Tensor, but it works on raw arrays: return an "
                    f"array (x.data is the array inside a Tensor).")
    if not isinstance(value, (np.ndarray, np.generic, float)):
        raise Wrong(f"{name} returned a {type(value).__name__}, expected an array (NumPy's "
                    f"functions, xp.maximum, xp.exp, ..., return arrays)")
    if np.asarray(value).dtype != np.float64:
        raise Wrong(f"{name} returned {np.asarray(value).dtype} values for float64 inputs: "
                    f"keep the inputs' precision (the checks compare in float64)")
    value = np.asarray(value, dtype=np.float64)
    if value.shape != shape:
        raise Wrong(f"{name} returned an array of shape {value.shape}, expected shape {shape}")
    return value


def _describe(inputs, index):
    """'x=1.5' or 'mu_hat=0.3, var_hat=2': the inputs at an index (elementwise ops)."""
    parts = []
    for name, a in inputs.items():
        a = np.asarray(a)
        if a.ndim == 0:
            parts.append(f"{name}={_fmt(a)}")
        elif a.ndim == len(index):
            parts.append(f"{name}={_fmt(a[tuple(min(i, n - 1) for i, n in zip(index, a.shape))])}")
    return ", ".join(parts)


def _worst(got, expected, rtol, atol):
    """Index of the entry furthest outside tolerance (nan and inf count as furthest)."""
    with np.errstate(all="ignore"):
        excess = np.abs(got - expected) - (atol + rtol * np.abs(expected))
    excess = np.where(np.isnan(excess), np.inf, excess)
    excess = np.where(got == expected, -np.inf, excess)  # equal, also when both are inf
    return np.unravel_index(np.argmax(excess), excess.shape)


def _compare(name, got, expected, inputs=None, rtol=RTOL, atol=ATOL, hint=None):
    """Wrong (with the input, expected and given values) unless got ~ expected."""
    got = _array(name, got, np.shape(expected))
    if np.allclose(got, expected, rtol=rtol, atol=atol, equal_nan=False):
        return
    i = _worst(got, expected, rtol, atol)
    at = _describe(inputs, i) if inputs else ""
    where = f"at {at}" if at else f"at index {tuple(int(k) for k in i)}"
    raise Wrong(f"{name}, {where}: expected {_fmt(expected[i])}, got {_fmt(got[i])}", hint)


def _compare_gradient(what, analytic, numeric, inputs=None, hint=None, elementwise=True):
    """WRONG GRADIENT (with the finite-difference value beside) unless they agree."""
    if np.allclose(analytic, numeric, rtol=GRAD_RTOL, atol=GRAD_ATOL):
        return
    i = _worst(analytic, numeric, GRAD_RTOL, GRAD_ATOL)
    at = _describe(inputs, i) if (inputs and elementwise) else ""
    where = f"at {at}" if at else f"at index {tuple(int(k) for k in i)}"
    raise Wrong(f"{what}, {where}: backward gives {_fmt(analytic[i])}, finite differences "
                f"give {_fmt(numeric[i])}", hint, status="WRONG GRADIENT")


def _finite_differences(scalar, arrays):
    """d scalar(*arrays) / d arrays[i] for every i, by central differences."""
    arrays = [np.array(a, dtype=np.float64) for a in arrays]
    return [numerical_gradient(scalar, arrays, i) for i in range(len(arrays))]


def _op_gradients(name, op, arrays, weights, names=None, only=None):
    """Run the student's op on leaf Tensors and backward(weights) through the engine.

    Returns one gradient per input (zeros where none arrived), after checking that the
    op returned a recorded Tensor and that its backward returned one gradient per parent
    of the right shape. With ``only`` (names), the other inputs' gradients may still be
    blank (None or ``...``): a student may do one part of a backward before the other.
    """
    leaves = [Tensor(np.array(a, dtype=np.float64), requires_grad=True) for a in arrays]
    out = op(*leaves)
    _blank(name, out)
    if not isinstance(out, Tensor):
        raise Wrong(f"{name} returned {type(out).__name__}, expected a Tensor: build it "
                    f"with record(out_array, parents, backward)")
    if not out.requires_grad or out._backward is None:
        raise Wrong(f"{name}(...) on inputs with requires_grad=True returned a Tensor that "
                    f"records no graph, so no gradient reaches the inputs: build the output "
                    f"with record(out_array, parents, backward), or from other ops")
    if all(any(p is leaf for leaf in leaves) for p in out._parents):  # a single op
        grads = out._backward(weights)  # the closure itself, to diagnose its return value
        needed = grads
        if only is not None and names and isinstance(grads, (tuple, list)):
            needed = [g for g, label in zip(grads, names) if label in only]
        _blank(f"{name}'s backward", needed)
        if not isinstance(grads, (tuple, list)):
            raise Wrong(f"{name}'s backward returned {type(grads).__name__}; it must return "
                        f"a tuple with one gradient per parent, e.g. `return (dx,)`")
        if len(grads) != len(out._parents):
            raise Wrong(f"{name}'s backward returned {len(grads)} gradients for "
                        f"{len(out._parents)} parents")
        labels = {id(leaf): label for leaf, label in zip(leaves, names or [])}
        if any(g is Ellipsis for g in grads):  # blanks outside ``only`` (_blank passed)
            out._backward = _ellipsis_as_none(out._backward)  # the engine skips a None
            grads = [None if g is Ellipsis else g for g in grads]
        for parent, g in zip(out._parents, grads):
            label = labels.get(id(parent))
            if isinstance(g, Tensor):
                which = f"{label}.data, not the Tensor {label}" if label else \
                    "x.data (the array), not the Tensor x"
                raise Wrong(f"{name}'s backward returned a Tensor as a gradient; backward "
                            f"works on arrays: use {which}")
            if g is not None and np.shape(g) != parent.shape:
                raise Wrong(f"{name}'s backward returned a gradient of shape {np.shape(g)} "
                            f"for {label or 'an input'} of shape {parent.shape}",
                            "a gradient has the shape of its input; where an input was "
                            "broadcast, sum the gradient back (autograd.sum_to)")
    out.backward(np.asarray(weights, dtype=np.float64).reshape(out.shape))
    return [np.zeros(leaf.shape) if leaf.grad is None else np.asarray(leaf.grad, np.float64)
            for leaf in leaves]


def _ellipsis_as_none(backward):
    """A backward whose ``...`` gradients (blanks) come out as None, which the engine
    skips, as it does for an input that needs no gradient."""
    def wrapped(g):
        return tuple(None if grad is Ellipsis else grad for grad in backward(g))
    return wrapped


def _weights(shape, seed=0):
    """A fixed random gradient g = dL/d(out): makes every output element matter."""
    return np.random.default_rng(seed).standard_normal(shape)


def _check_op_gradients(name, op, arrays, names, hint=None, elementwise=True, seed=0,
                        extra=None, only=None):
    """The op's backward (through the engine) against finite differences of its forward,
    for every input (or those named in ``only``)."""
    with no_grad():
        probe = op(*[Tensor(np.array(a, dtype=np.float64)) for a in arrays])
    _blank(name, probe)
    if not isinstance(probe, Tensor):
        raise Wrong(f"{name} returned {type(probe).__name__}, expected a Tensor")
    weights = _weights(probe.shape, seed)

    def scalar(*arrs):
        with no_grad():
            return float((np.asarray(op(*[Tensor(a) for a in arrs]).data) * weights).sum())

    analytic = _op_gradients(name, op, arrays, weights, names, only)
    numeric = _finite_differences(scalar, arrays)  # (cheap: the arrays are small)
    # shown at the worst entry: the inputs, any constants, and g = dL/d(out)
    inputs = dict(zip(names, arrays), **(extra or {}), g=weights)
    for input_name, a, n in zip(names, analytic, numeric):
        if only is not None and input_name not in only:
            continue
        _compare_gradient(f"for {input_name}", a, n, inputs, hint, elementwise)


# ----------------------------------------------------------------------------------
# Exercise 1: softplus
# ----------------------------------------------------------------------------------
def _softplus_hint(got, x, otherwise):
    """A hint naming the usual mistake in a stable softplus that gives ``got``, else
    ``otherwise``."""
    if not isinstance(got, np.ndarray) or got.dtype != np.float64 or got.shape != x.shape:
        return otherwise  # _compare says what is wrong with it
    with np.errstate(all="ignore"):
        candidates = {
            "the max(x, 0) term is missing: log(1 + e^x) = max(x, 0) + log1p(e^-|x|)":
                np.log1p(np.exp(-np.abs(x))),
            "use e^-|x|, not e^-x: for negative x, e^-x is large (and overflows)":
                np.maximum(x, 0) + np.log1p(np.exp(-x)),
            "this is softplus(-x) = log(1 + e^-x): the sign of x is flipped":
                autograd.softplus_array(-x),
        }
        for hint, wrong in candidates.items():
            if np.allclose(got, wrong, rtol=RTOL, atol=ATOL):
                return hint
    return otherwise


def check_softplus(softplus_array, softplus):
    """Exercise 1: the stable forward on arrays, then the op's backward."""
    def forward():
        x = np.linspace(-6, 6, 25)
        got = softplus_array(x.copy())
        _compare("softplus_array", got, autograd.softplus_array(x), {"x": x},
                 hint=_softplus_hint(got, x, "softplus(x) = log(1 + e^x)"))
        x2 = np.array([[-2.0, 0.5, 3.0], [1.0, -0.25, 0.0]])
        got = softplus_array(x2.copy())
        _compare("softplus_array", got, autograd.softplus_array(x2), {"x": x2},
                 hint=_softplus_hint(got, x2, "work elementwise, on arrays of any shape"))
        big = np.array([-1000.0, -100.0, -40.0, 40.0, 100.0, 1000.0])
        given = big.copy()
        got = softplus_array(given)
        _compare("softplus_array", got, autograd.softplus_array(big), {"x": big},
                 hint=_softplus_hint(got, big, "e^1000 overflows to inf and e^-1000 underflows "
                                     "to 0: write log(1 + e^x) as max(x, 0) + log1p(e^-|x|)"))
        if not np.array_equal(given, big):
            raise Wrong("softplus_array changed its input x in place (e.g. x[x < 0] = 0): "
                        "the op's backward needs the original x; compute into new arrays")
        return "values match autograd.softplus_array, also for |x| up to 1000"

    def backward():
        x = np.random.default_rng(1).uniform(-4, 4, (3, 4))
        _check_op_gradients("softplus", softplus, [x], ["x"],
                            hint="d softplus(x)/dx = sigma(x) = 1 / (1 + e^-x), times g")
        big = np.array([-1000.0, -50.0, 50.0, 1000.0])
        (got,) = _op_gradients("softplus", softplus, [big], np.ones(4))
        _compare("softplus's gradient", got, autograd.sigmoid_array(big), {"x": big},
                 hint="e^x / (1 + e^x) is inf/inf = nan for large x: use sigmoid_array")
        return "backward agrees with finite differences and stays finite for |x| = 1000"

    ok = run_part("softplus forward", forward)
    if not ok:
        print("NOT DONE YET: softplus backward: checked once the forward passes.")
        return False
    return run_part("softplus backward", backward)


# ----------------------------------------------------------------------------------
# Exercise 2: the precision-weighted merge
# ----------------------------------------------------------------------------------
def _merge_inputs(seed=2, shape=(3, 4)):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape), rng.uniform(0.2, 3.0, shape),
            rng.standard_normal(shape), rng.uniform(0.2, 3.0, shape))


MERGE_NAMES = ("mu_hat", "var_hat", "mu_p", "var_p")


def _two(name, value):
    _blank(name, value)
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise Wrong(f"{name} must return two arrays (mu_q, var_q), got "
                    f"{type(value).__name__}")
    return value


def _merge_forward_hint(which, got, mu_hat, var_hat, mu_p, var_p, otherwise):
    """A hint naming the usual mistake behind a wrong ``which`` ('mu_q' or 'var_q')."""
    if not isinstance(got, np.ndarray) or got.shape != mu_hat.shape:
        return otherwise  # _compare says what is wrong with it
    mu_q, var_q = gaussian.merge_forward(mu_hat, var_hat, mu_p, var_p)
    candidates = {"var_q": {
        "variances do not add up, precisions do: 1/var_q = 1/var_hat + 1/var_p":
            var_hat + var_p,
        "this is 1 / (var_hat + var_p): add the precisions 1/var_hat and 1/var_p, then invert":
            1 / (var_hat + var_p),
    }, "mu_q": {
        "each mean is weighted by the OTHER one's variance (mu_hat by var_p): the more "
        "certain opinion, with the smaller variance, must get the larger weight":
            (mu_hat * var_hat + mu_p * var_p) / (var_hat + var_p),
        "a plain average ignores the precisions: weight each mean by its precision":
            (mu_hat + mu_p) / 2,
        "the precision-weighted sum still has to be multiplied by var_q":
            mu_hat / var_hat + mu_p / var_p,
    }}[which]
    for hint, wrong in candidates.items():
        if np.allclose(got, wrong, rtol=RTOL, atol=ATOL):
            return hint
    return otherwise


def check_merge_forward(merge_forward):
    """Exercise 2a: (mu_q, var_q) against gaussian.merge_forward."""
    def body():
        arrays = _merge_inputs()
        inputs = dict(zip(MERGE_NAMES, arrays))
        mu_q, var_q = _two("merge_forward", merge_forward(*[a.copy() for a in arrays]))
        ref_mu, ref_var = gaussian.merge_forward(*arrays)
        if (np.shape(mu_q) == ref_var.shape and np.allclose(mu_q, ref_var)
                and np.allclose(var_q, ref_mu)):
            raise Wrong("merge_forward returned (var_q, mu_q): return (mu_q, var_q), the "
                        "mean first")
        _compare("var_q", var_q, ref_var, inputs, hint=_merge_forward_hint(
            "var_q", var_q, *arrays, "var_q = 1 / (1/var_hat + 1/var_p): precisions add up"))
        _compare("mu_q", mu_q, ref_mu, inputs, hint=_merge_forward_hint(
            "mu_q", mu_q, *arrays, "mu_q = (mu_hat/var_hat + mu_p/var_p) * var_q: a "
            "precision-weighted average"))
        # extreme but legal variances: the LVAE's var = softplus(.) + 1e-8 spans this range
        var_hat = np.array([1e-8, 1e-8, 1e8, 1.0, 1e8])
        var_p = np.array([1e8, 1e-8, 1e-8, 1e-8, 1e8])
        mu_hat, mu_p = np.array([1.0, 2.0, -1.0, 0.5, 3.0]), np.array([-2.0, 0.0, 4.0, 2.0, 1.0])
        ext = (mu_hat, var_hat, mu_p, var_p)
        mu_q, var_q = _two("merge_forward", merge_forward(*[a.copy() for a in ext]))
        ref_mu, ref_var = gaussian.merge_forward(*ext)
        inputs = dict(zip(MERGE_NAMES, ext))
        # relative only: var_q is ~1e-8 here, below ATOL, so an absolute tolerance would
        # let a "safety" epsilon of 1e-9 (10 % of var_q) pass
        _compare("var_q", var_q, ref_var, inputs, atol=0.0,
                 hint="stay finite and exact for variances from 1e-8 to 1e8 (no added epsilon)")
        _compare("mu_q", mu_q, ref_mu, inputs, hint="stay finite for variances from 1e-8 to 1e8")
        return "mu_q and var_q match gaussian.merge_forward, for variances from 1e-8 to 1e8"
    return run_part("merge forward", body)


def _check_order(what, grads, numeric, names):
    """Wrong when the gradients are right but returned in another order than names."""
    arrays = [np.asarray(g, dtype=np.float64) if isinstance(g, (np.ndarray, np.generic))
              else None for g in grads]
    if any(a is None or a.shape != n.shape for a, n in zip(arrays, numeric)):
        return
    close = lambda a, n: np.allclose(a, n, rtol=GRAD_RTOL, atol=GRAD_ATOL)
    if all(close(a, n) for a, n in zip(arrays, numeric)):
        return
    for order in itertools.permutations(range(len(names))):
        if all(close(arrays[i], numeric[j]) for i, j in enumerate(order)):
            got = ", ".join(names[j] for j in order)
            raise Wrong(f"{what} returned the right gradients in the order ({got}); return "
                        f"them in the order of the inputs: ({', '.join(names)})",
                        status="WRONG GRADIENT")


def _merge_gradient_hint(name, got, g_mu, g_var, mu_hat, var_hat, mu_p, var_p):
    """A hint naming the usual mistake that gives ``got`` as the gradient for ``name``.

    Each candidate below is a wrong gradient that students derive; the first one that
    ``got`` matches names the mistake (a candidate that happens to equal the true gradient
    for these inputs is skipped). Otherwise the general rule.
    """
    s = 1 / (var_hat + var_p)  # the notebook's safer form: var_q = var_hat var_p s
    mu_q, var_q = gaussian.merge_forward(mu_hat, var_hat, mu_p, var_p)
    if name.endswith("hat"):  # the input's own opinion, and the other one's
        mean, var, var_label = mu_hat, var_hat, "var_hat"
        other_mean, other_var, other_var_label = mu_p, var_p, "var_p"
    else:
        mean, var, var_label = mu_p, var_p, "var_p"
        other_mean, other_var, other_var_label = mu_hat, var_hat, "var_hat"
    if name.startswith("mu"):
        right = g_mu * other_var * s
        candidates = {
            f"the weight of {name} in mu_q is var_q / {var_label} = {other_var_label} * s; "
            f"yours is the other mean's weight": g_mu * var * s,
            f"d mu_q / d {name} = var_q / {var_label}: the factor var_q is missing": g_mu / var,
            f"your gradient for {name} is 0, but mu_q depends on {name}": 0 * right,
        }
    else:
        d_mu, d_var = s * (other_mean - mu_q), other_var ** 2 * s ** 2  # the true partials
        right = g_mu * d_mu + g_var * d_var
        candidates = {
            f"s = 1 / (var_hat + var_p) depends on {name} too (d s / d {name} = -s^2): "
            f"differentiate var_hat var_p s and (mu_hat var_p + mu_p var_hat) s with the "
            f"product rule": g_mu * other_mean * s + g_var * other_var * s,
            f"in mu_q = (mu_hat/var_hat + mu_p/var_p) var_q, the factor var_q depends on "
            f"{name} too: use the product rule":
                g_mu * (-mean * var_q / var ** 2) + g_var * d_var,
            # a 0 where g_mu = 0 means the part through var_q is missing, where g_var = 0
            # the part through mu_q (or all of it): so this order of the next three
            f"this is only the part through mu_q: add g_var * d var_q / d {name}": g_mu * d_mu,
            (f"your gradient for {name} is 0 here, where g_var = 0: the part through mu_q, "
             f"g_mu * d mu_q / d {name}, is missing" if not np.any(g_var) else
             f"your gradient for {name} is 0, but mu_q and var_q depend on {name}"): 0 * right,
            f"this is only the part through var_q: add g_mu * d mu_q / d {name}": g_var * d_var,
        }
    candidates["the sign is flipped"] = -right
    got = np.asarray(got, dtype=np.float64)
    for hint, wrong in candidates.items():
        if not np.allclose(wrong, right) and np.allclose(got, wrong, rtol=1e-6, atol=1e-9):
            return hint
    return "the gradient for an input is g_mu * d mu_q/d input + g_var * d var_q/d input"


def check_merge_backward(merge_backward):
    """Exercise 2b: the four gradients against finite differences of the true merge."""
    def body():
        arrays = _merge_inputs(seed=3)
        inputs = dict(zip(MERGE_NAMES, arrays))
        rng = np.random.default_rng(4)
        g_random = rng.standard_normal(arrays[0].shape), rng.standard_normal(arrays[0].shape)
        zero = np.zeros(arrays[0].shape)
        cases = [("through mu_q only (g_var = 0)", g_random[0], zero),
                 ("through var_q only (g_mu = 0)", zero, g_random[1]),
                 ("through both outputs", *g_random)]
        for label, g_mu, g_var in cases:
            def scalar(*arrs):
                mu_q, var_q = gaussian.merge_forward(*arrs)
                return float((g_mu * mu_q + g_var * var_q).sum())
            numeric = _finite_differences(scalar, arrays)
            grads = merge_backward(g_mu.copy(), g_var.copy(), *[a.copy() for a in arrays])
            _blank("merge_backward", grads)
            if not isinstance(grads, (tuple, list)) or len(grads) != 4:
                raise Wrong("merge_backward must return four gradients (for mu_hat, "
                            "var_hat, mu_p, var_p)")
            _check_order("merge_backward", grads, numeric, MERGE_NAMES)
            for name, got, num in zip(MERGE_NAMES, grads, numeric):
                got = _array(f"merge_backward's gradient for {name}", got, num.shape)
                _compare_gradient(f"for {name}, {label}", got, num,
                                  dict(inputs, g_mu=g_mu, g_var=g_var),
                                  hint=_merge_gradient_hint(name, got, g_mu, g_var, *arrays))
        return "all four gradients agree with finite differences (through mu_q, var_q, both)"
    return run_part("merge backward", body)


def check_merge(merge_forward, merge_backward):
    """Exercise 2: both parts."""
    return _parts(check_merge_forward(merge_forward), check_merge_backward(merge_backward))


# ----------------------------------------------------------------------------------
# Exercise 3: the analytic Gaussian KL
# ----------------------------------------------------------------------------------
def _kl_of_log_variances(mu_q, var_q, mu_p, var_p):
    """The KL as a student writes it who reads var as a log-variance (as many VAE codes
    store it): var_p - var_q for the logs, exp(var) for the variances."""
    diff = mu_q - mu_p
    return 0.5 * (var_p - var_q + (np.exp(var_q) + diff * diff) / np.exp(var_p) - 1)


def _kl_gradient_hint(name, got, g, mu_q, var_q, mu_p, var_p):
    """A hint naming the usual mistake that gives ``got`` as the gradient for ``name``,
    in the manner of _merge_gradient_hint: the first wrong candidate that ``got`` matches
    (one that happens to equal the true gradient is skipped), else the general rule."""
    index = ("mu_q", "var_q", "mu_p", "var_p").index(name)
    right = gaussian.kl_backward(g, mu_q, var_q, mu_p, var_p)[index]
    # KL(p || q) has the roles swapped: its gradients come in the order (p's, q's)
    reverse = gaussian.kl_backward(g, mu_p, var_p, mu_q, var_q)[(index + 2) % 4]
    candidates = {}
    if name.startswith("var"):
        # d/d log var = var * d/d var: the gradient of a code that stores log-variances
        candidates[f"this is the gradient for log {name} (the true one times {name}): "
                   f"{name} is a variance here, so differentiate with respect to {name} "
                   f"itself, e.g. d log {name} / d {name} = 1 / {name}"] = right * (
                       var_q if name == "var_q" else var_p)
    candidates["the sign is flipped"] = -right
    candidates["g is missing: multiply every gradient by g = dL/dKL"] = right / g
    candidates[f"this is the gradient of KL(p || q): the ELBO's KL is KL(q || p) = 0.5 "
               f"(log var_p - log var_q + (var_q + (mu_q - mu_p)^2) / var_p - 1)"] = reverse
    got = np.asarray(got, dtype=np.float64)
    for hint, wrong in candidates.items():
        if not np.allclose(wrong, right) and np.allclose(got, wrong, rtol=1e-6, atol=1e-9):
            return hint
    return "differentiate each term of the KL; multiply by g"


def check_kl_forward(kl_forward):
    """Exercise 3a: KL(N(mu_q, var_q) || N(mu_p, var_p)) against gaussian.kl_forward."""
    def body():
        arrays = _merge_inputs(seed=5)
        inputs = dict(zip(("mu_q", "var_q", "mu_p", "var_p"), arrays))
        got, expected = kl_forward(*[a.copy() for a in arrays]), gaussian.kl_forward(*arrays)
        hint = "0.5 (log var_p - log var_q + (var_q + (mu_q - mu_p)^2) / var_p - 1)"
        if np.shape(got) == expected.shape and isinstance(got, np.ndarray):
            if np.allclose(got, 2 * expected):
                hint = "your values are exactly twice the KL: the factor 0.5 is missing"
            elif np.allclose(got, gaussian.kl_forward(arrays[2], arrays[3], arrays[0], arrays[1])):
                hint = ("your values are KL(p || q): the KL of the ELBO is KL(q || p), the "
                        "expectation taken under q (var_q over var_p inside)")
            elif np.allclose(got, expected + 0.5):
                hint = "your values are 0.5 too large: the '- 1' inside the bracket is missing"
            elif np.allclose(got, expected - 0.25 * np.log(arrays[3] / arrays[1])):
                hint = ("the log terms are halved: log var is 2 log sigma, so use the "
                        "variances in the logs, not standard deviations")
            elif np.allclose(got, _kl_of_log_variances(*arrays)):
                hint = ("your values are the KL written for log-variances (var_p - var_q "
                        "and exp(var)): here var_q and var_p are variances, so take "
                        "log var_p - log var_q and divide by var_p itself")
        _compare("kl_forward", got, expected, inputs, hint=hint)
        same = (arrays[0], arrays[1], arrays[0].copy(), arrays[1].copy())
        _compare("kl_forward", kl_forward(*same), np.zeros(arrays[0].shape),
                 dict(zip(("mu_q", "var_q", "mu_p", "var_p"), same)),
                 hint="KL(q || q) = 0: check the '- 1'")
        return "matches gaussian.kl_forward, and KL(q || q) = 0"
    return run_part("KL forward", body)


def check_kl_backward(kl_backward):
    """Exercise 3b: the four gradients against finite differences of the true KL."""
    def body():
        arrays = _merge_inputs(seed=6)
        names = ("mu_q", "var_q", "mu_p", "var_p")
        g = np.random.default_rng(7).standard_normal(arrays[0].shape)
        numeric = _finite_differences(
            lambda *arrs: float((g * gaussian.kl_forward(*arrs)).sum()), arrays)
        grads = kl_backward(g.copy(), *[a.copy() for a in arrays])
        _blank("kl_backward", grads)
        if not isinstance(grads, (tuple, list)) or len(grads) != 4:
            raise Wrong("kl_backward must return four gradients (for mu_q, var_q, mu_p, var_p)")
        inputs = dict(zip(names, arrays))
        for name, got, num in zip(names, grads, numeric):
            got = _array(f"kl_backward's gradient for {name}", got, num.shape)
            _compare_gradient(f"for {name}", got, num, dict(inputs, g=g),
                              hint=_kl_gradient_hint(name, got, g, *arrays))
        return "all four gradients agree with finite differences"
    return run_part("KL backward", body)


def check_kl(kl_forward, kl_backward):
    """Exercise 3: both parts."""
    return _parts(check_kl_forward(kl_forward), check_kl_backward(kl_backward))


# ----------------------------------------------------------------------------------
# Exercise 4: batch norm backward
# ----------------------------------------------------------------------------------
def _batch_norm_dx_hint(dx, x, eps):
    """Which of the two identities that the true dx satisfies a wrong dx breaks: its
    column sums are 0 (adding a constant to a column does not change y), and so are the
    column sums of xhat * dx (scaling a column about its mean does not change y, up to
    eps)."""
    if not np.any(dx):
        return ("your dx is 0 everywhere (a placeholder?): x reaches the loss through xhat "
                "directly and through the batch mean and variance, which every row moves")
    xhat = (x - x.mean(axis=0)) / np.sqrt(x.var(axis=0) + eps)
    scale = max(float(np.abs(dx).max()), 1e-12)
    if not np.allclose(dx.sum(axis=0) / scale, 0, atol=1e-6):
        return ("the column sums of your dx are not 0, but they must be (adding a constant "
                "to a column of x does not change y): the term from the batch mean is "
                "missing or wrong (a mean over the N rows, not N - 1)")
    # the second holds only up to about eps / var (eps breaks the scale invariance a
    # little): a loose tolerance, still far below what a missing or wrong term gives
    if not np.allclose((xhat * dx).sum(axis=0) / scale, 0, atol=1e-2):
        return ("the column sums of xhat * dx are not 0, but they must be (scaling a column "
                "about its mean does not change y): the term from the batch variance, "
                "xhat times the column mean of g * gamma * xhat, is missing or has the "
                "wrong sign")
    return ("both identities hold (columns of dx and of xhat * dx sum to 0), so dx is off "
            "by a factor per column: is it scaled by gamma / sqrt(var + eps)?")


def check_batchnorm_backward(batch_norm):
    """Exercise 4: the training-mode batch norm op; its backward against finite
    differences, in two parts: (dgamma, dbeta), then dx."""
    rng = np.random.default_rng(8)
    x = rng.standard_normal((6, 3)) * np.array([1.0, 3.0, 0.5]) + np.array([0.0, 2.0, -1.0])
    gamma, beta, eps = rng.uniform(0.5, 2.0, 3), rng.standard_normal(3), 1e-4
    op = lambda x_, gamma_, beta_: batch_norm(x_, gamma_, beta_, eps)
    names = ["x", "gamma", "beta"]

    def forward_unchanged():
        with no_grad():
            y = op(Tensor(x.copy()), Tensor(gamma.copy()), Tensor(beta.copy()))
            ref, _, _ = layers.batch_norm(Tensor(x.copy()), Tensor(gamma), Tensor(beta), eps)
        _blank("batch_norm", y)
        if not isinstance(y, Tensor):
            raise Wrong(f"batch_norm returned {type(y).__name__}, expected a Tensor")
        _compare("batch_norm's output", y.data, ref.data,
                 hint="the forward pass is given: it should match layers.batch_norm")

    def parameters():
        forward_unchanged()
        _check_op_gradients("batch_norm", op, [x, gamma, beta], names, elementwise=False,
                            seed=9, only=("gamma", "beta"),
                            hint="y = gamma * xhat + beta for every row: dbeta = sum of g "
                            "over the rows, dgamma = sum of g * xhat over the rows")
        return "dgamma and dbeta agree with finite differences (6 rows, 3 features)"

    def inputs():
        forward_unchanged()
        # the usual mistake, treating mean and variance as constants: name it when seen
        w = _weights(x.shape, seed=9)
        analytic = _op_gradients("batch_norm", op, [x, gamma, beta], w, names, only=("x",))
        naive = w * gamma / np.sqrt(x.var(axis=0) + eps)
        hint = _batch_norm_dx_hint(analytic[0], x, eps)
        if np.allclose(analytic[0], naive, rtol=1e-6, atol=1e-9):
            hint = ("dx = g * gamma / sqrt(var + eps) treats the batch mean and variance "
                    "as constants, but every row moves them: with g_xhat = g * gamma, "
                    "subtract the column mean of g_xhat and xhat times the column mean "
                    "of g_xhat * xhat, then scale by 1 / sqrt(var + eps)")
        _check_op_gradients("batch_norm", op, [x, gamma, beta], names, elementwise=False,
                            seed=9, only=("x",), hint=hint)
        return "dx agrees with finite differences (6 rows, 3 features)"

    return _parts(run_part("batch norm backward, dgamma and dbeta", parameters),
                  run_part("batch norm backward, dx", inputs))


# ----------------------------------------------------------------------------------
# Exercise 5: the importance-weighted bound with log-sum-exp
# ----------------------------------------------------------------------------------
def _reference_logsumexp(a, axis):
    with no_grad():
        return np.asarray(autograd.logsumexp(Tensor(np.asarray(a, np.float64)), axis=axis).data)


def check_logsumexp_forward(logsumexp_array):
    def body():
        rng = np.random.default_rng(10)
        a = rng.standard_normal((5, 3))
        for axis in (0, 1):
            _compare(f"logsumexp_array(a, axis={axis})", logsumexp_array(a.copy(), axis),
                     _reference_logsumexp(a, axis), hint="log sum_i e^{a_i} along the axis")
        # log-weights of real images are around -100 nats: e^-100 is tiny, e^-1000 is 0
        for shift in (-1000.0, 1000.0):
            b = a + shift
            label = f"logsumexp_array(a {'+' if shift > 0 else '-'} {abs(shift):g}, axis=0)"
            _compare(label, logsumexp_array(b.copy(), 0), _reference_logsumexp(b, 0),
                     hint="e^-1000 underflows to 0 (log 0 = -inf) and e^1000 overflows: "
                     "with m = max_i a_i, log sum_i e^{a_i} = m + log sum_i e^{a_i - m}")
        return "matches autograd.logsumexp along both axes, also for values of +-1000"
    return run_part("logsumexp forward", body)


def check_logsumexp_backward(logsumexp):
    def body():
        a = np.random.default_rng(11).standard_normal((4, 3)) * 2
        _check_op_gradients("logsumexp", lambda t: logsumexp(t, 0), [a], ["a"],
                            hint="d/da_i = e^{a_i - out} (the softmax along the axis), "
                            "times g broadcast back over that axis", elementwise=False)
        # along axis 1 of a square array, out and g broadcast against a without an error
        # even when the reduced axis was not put back, and then give wrong values
        square = np.random.default_rng(12).standard_normal((4, 4))
        _check_op_gradients("logsumexp along axis 1", lambda t: logsumexp(t, 1), [square],
                            ["a"], elementwise=False,
                            hint="put the reduced axis back before broadcasting against a: "
                            "xp.expand_dims(out, axis) and xp.expand_dims(g, axis)")
        big = a - 1000.0
        (got,) = _op_gradients("logsumexp", lambda t: logsumexp(t, 0), [big], np.ones(3))
        softmax = np.exp(big - _reference_logsumexp(big, 0))
        _compare("logsumexp's gradient", got, softmax,
                 hint="for a = -1000 e^a / sum e^a is 0/0: use e^{a - out} instead")
        return ("backward (the softmax) agrees with finite differences along both axes, "
                "also for a of -1000")
    return run_part("logsumexp backward", body)


def _tiny_log_weights(samples=20, batch=4):
    """Log-weights log p(x, z^k) - log q(z^k|x) of a small untrained LVAE: (K, B)."""
    import lvae
    model = lvae.LadderVAE(x_dim=12, z_dims=(3, 2), hidden=(8, 6), seed=0)
    x = (np.random.default_rng(12).uniform(size=(batch, 12)) < 0.4).astype(np.float32)
    model.eval()
    with no_grad():
        log_w = lvae.log_weights(model, x, lvae.Noise(0), samples)
    return np.asarray(log_w.data, dtype=np.float64)


def check_iw_bound(iw_bound):
    def body():
        log_w = _tiny_log_weights()
        k = log_w.shape[0]
        expected = _reference_logsumexp(log_w, 0) - math.log(k)
        with no_grad():
            got = iw_bound(Tensor(log_w.copy()))
        _blank("iw_bound", got)
        if not isinstance(got, Tensor):
            raise Wrong(f"iw_bound returned {type(got).__name__}, expected a Tensor (use your "
                        f"logsumexp op, then Tensor arithmetic)")
        _compare("iw_bound", got.data, expected,
                 hint="L_K = logsumexp_k(log w_k) - log K, one value per image (axis 0 is k)")
        with no_grad():  # log-weights early in training: e^-1000 is 0 in float64
            low = iw_bound(Tensor(log_w - 1000.0))
        _compare("iw_bound of log-weights near -1000", np.asarray(low.data), expected - 1000.0,
                 hint="e^-1000 is 0 in float64: build L_K from your logsumexp op, not from "
                 "exp and mean")
        one = iw_bound(Tensor(log_w[:1].copy()))
        _compare("iw_bound with K = 1", one.data, log_w[0],
                 hint="with one sample L_1 = log w_1 (the ELBO estimate)")
        _check_op_gradients("iw_bound", iw_bound, [log_w[:5, :3]], ["log_w"],
                            hint="the gradient of L_K is the normalised importance weight "
                            "w_k / sum_j w_j of each sample", elementwise=False)
        return (f"L_K of a small LVAE's log-weights (K = {k}) matches the reference, "
                f"L_1 = log w, and gradients flow")
    return run_part("importance-weighted bound", body)


def check_logsumexp_and_iw_bound(logsumexp_array, logsumexp, iw_bound):
    """Exercise 5: stable logsumexp (forward, backward), then L_K."""
    if not check_logsumexp_forward(logsumexp_array):
        print("NOT DONE YET: logsumexp backward: checked once the forward passes.")
        print("NOT DONE YET: importance-weighted bound: checked once logsumexp passes.")
        return False
    if not check_logsumexp_backward(logsumexp):
        print("NOT DONE YET: importance-weighted bound: checked once logsumexp passes.")
        return False
    return check_iw_bound(iw_bound)


# ----------------------------------------------------------------------------------
# Exercise 6: the reparameterisation trick
# ----------------------------------------------------------------------------------
def _reparameterize_hint(got, mu, var, eps):
    """A hint naming what a wrong z computes: var read as a standard deviation or as a
    log-variance (as many VAE codes store it), else the rule."""
    candidates = {
        "var is a variance, not a standard deviation: z = mu + sqrt(var) * eps":
            mu + var * eps,
        "z = mu + exp(var / 2) * eps treats var as a log-variance; here var is the "
        "variance itself: z = mu + sqrt(var) * eps": mu + np.exp(var / 2) * eps,
    }
    if isinstance(got, np.ndarray) and got.shape == mu.shape:
        for hint, wrong in candidates.items():
            if np.allclose(got, wrong, rtol=RTOL, atol=ATOL):
                return hint
    return "z = mu + sqrt(var) * eps: var is a variance, not a standard deviation"


def check_reparameterize(reparameterize):
    """Exercise 6: z = mu + sqrt(var) eps as an op, with broadcasting over samples."""
    def forward_and_gradients():
        rng = np.random.default_rng(13)
        mu, var = rng.standard_normal((2, 3)), rng.uniform(0.2, 3.0, (2, 3))
        eps = rng.standard_normal((2, 3))
        with no_grad():
            z = reparameterize(Tensor(mu.copy()), Tensor(var.copy()), eps.copy())
            ref = gaussian.reparameterize(Tensor(mu), Tensor(var), eps)
        _blank("reparameterize", z)
        if not isinstance(z, Tensor):
            raise Wrong(f"reparameterize returned {type(z).__name__}, expected a Tensor")
        _compare("z", z.data, ref.data, {"mu": mu, "var": var, "eps": eps},
                 hint=_reparameterize_hint(z.data, mu, var, eps))
        _check_op_gradients("reparameterize", lambda m, v: reparameterize(m, v, eps),
                            [mu, var], ["mu", "var"], extra={"eps": eps},
                            hint="dz/dmu = 1, dz/dvar = eps / "
                            "(2 sqrt(var)); multiply by g")
        # K samples share one (mu, var): eps has an extra leading axis; and two extra
        # axes, so that a backward summing over axis 0 alone does not pass
        eps_k = rng.standard_normal((4, 2, 3))
        eps_2k = rng.standard_normal((2, 4, 2, 3))
        for noise in (eps_k, eps_2k):
            _check_op_gradients("reparameterize", lambda m, v: reparameterize(m, v, noise),
                                [mu, var], ["mu", "var"], elementwise=False,
                                hint=f"with eps of shape {noise.shape} and mu of shape "
                                f"{mu.shape}: first each sample's gradient at the full shape "
                                "(g for mu, g * eps / (2 sqrt(var)) for var), then the sum "
                                "over every axis eps adds in front: "
                                "autograd.sum_to(grad, mu.shape)")
        return "z and its gradients agree with gaussian.reparameterize and finite " \
               "differences, also with K samples per (mu, var)"

    def monte_carlo():
        mu, var = np.array([0.5, -1.0, 2.0]), np.array([0.3, 1.0, 4.0])
        eps = np.random.default_rng(14).standard_normal((200_000, 3))
        mu_t, var_t = Tensor(mu.copy(), requires_grad=True), Tensor(var.copy(), requires_grad=True)
        z = reparameterize(mu_t, var_t, eps)
        _blank("reparameterize", z)
        loss = autograd.mean(autograd.square(z), axis=0).sum()  # estimates sum E[z^2]
        loss.backward()
        if np.shape(mu_t.grad) != mu.shape or np.shape(var_t.grad) != var.shape:
            raise Wrong(f"with mu of shape {mu.shape} and eps of shape {eps.shape}, the "
                        f"gradients that reached mu and var have shapes {np.shape(mu_t.grad)} "
                        f"and {np.shape(var_t.grad)}",
                        "sum over every axis that eps adds in front of mu's shape: "
                        "autograd.sum_to(grad, mu.shape), not a test on eps.ndim")
        # E[z^2] = mu^2 + var: d/dmu = 2 mu, d/dvar = 1. The per-sample estimates are
        # 2 z and z eps / sqrt(var); allow 6 standard errors of their average.
        n, zs = len(eps), mu + np.sqrt(var) * eps
        se_mu = (2 * zs).std(axis=0) / np.sqrt(n)
        se_var = (zs * eps / np.sqrt(var)).std(axis=0) / np.sqrt(n)
        inputs = {"mu": mu, "var": var}
        _compare("pathwise estimate of d E[z^2]/d mu", mu_t.grad, 2 * mu, inputs, rtol=0,
                 atol=float(6 * se_mu.max()))
        _compare("pathwise estimate of d E[z^2]/d var", var_t.grad, np.ones(3), inputs,
                 rtol=0, atol=float(6 * se_var.max()))
        return "with 200000 samples, the gradient of the average of z^2 estimates " \
               "d(mu^2 + var)/d(mu, var) = (2 mu, 1)"

    if not run_part("reparameterize", forward_and_gradients):
        print("NOT DONE YET: reparameterize, Monte Carlo: checked once the op passes.")
        return False
    return run_part("reparameterize, Monte Carlo", monte_carlo)


# ----------------------------------------------------------------------------------
# Exercise 7: the LVAE's top-down pass
# ----------------------------------------------------------------------------------
TOP_DOWN_SIZES = dict(x_dim=12, z_dims=(4, 3, 2), hidden=(10, 8, 6), n_dense=1)


def tiny_lvae(seed=0):
    """A small float64 LVAE with three stochastic layers (4, 3 and 2 units)."""
    import lvae
    return lvae.LadderVAE(seed=seed, **TOP_DOWN_SIZES).astype(np.float64)


def bottom_up(model, x):
    """The LVAE's deterministic bottom-up pass: [(mu_hat_i, var_hat_i)], bottom first
    (what ``LadderVAE.infer`` computes before its top-down pass)."""
    h, up = x if isinstance(x, Tensor) else Tensor(x), []
    for block, head in zip(model.up_blocks, model.up_heads):
        h = block(h)
        up.append(head(h))
    return up


def sampler(samples, seed=7):
    """sample(mu, var): z = mu + sqrt(var) eps, eps drawn in call order, K = samples per
    image; sample.calls counts the calls."""
    import lvae
    noise = lvae.Noise(seed)

    def sample(mu, var):
        sample.calls += 1
        return lvae._sample(mu, var, noise, samples)
    sample.calls = 0
    return sample


def _top_down_run(top_down, model, x, samples):
    """The student's lists (z, mu_q, var_q, kl), after checking their form."""
    sample = sampler(samples)
    result = top_down(model, bottom_up(model, x), sample)
    _blank("top_down", result)
    if not isinstance(result, (tuple, list)) or len(result) != 4:
        raise Wrong("top_down must return four lists: (z, mu_q, var_q, kl)")
    n = model.n_layers
    for name, items in zip(("z", "mu_q", "var_q", "kl"), result):
        if not isinstance(items, (tuple, list)) or len(items) != n:
            raise Wrong(f"top_down's {name} must be a list with one entry per layer ({n}), "
                        f"bottom first, got {type(items).__name__}"
                        + (f" of length {len(items)}" if isinstance(items, (tuple, list)) else ""))
        empty = [i for i, item in enumerate(items) if item is None]
        if len(empty) == n:
            _blank(f"top_down's {name}", None)
        if empty:
            raise Wrong(f"top_down's {name} has no value for layer "
                        f"{', '.join(f'index {i} (z{i + 1})' for i in empty)}",
                        "the top layer first, then a loop over i = n - 2, ..., 0: does it "
                        "reach i = 0?")
        for i, item in enumerate(items):
            _blank(f"top_down's {name}[{i}]", item)
            if not isinstance(item, Tensor):
                raise Wrong(f"{name}[{i}] is a {type(item).__name__}, expected a Tensor (use "
                            f"merge, gaussian_kl and sample: they return Tensors)")
    units = [item.shape[-1] for item in result[0]]
    if units != list(model.z_dims) and units[::-1] == list(model.z_dims):
        raise Wrong(f"your z has {units} units per entry, the model's layers have "
                    f"{list(model.z_dims)} from z_1 up: the lists look top first",
                    "index 0 must be z_1, the bottom layer (fill z[i], mu_q[i], ... at the "
                    "layer's own index rather than appending as you go down)")
    if sample.calls != n:
        raise Wrong(f"sample() was called {sample.calls} times; call it once per layer "
                    f"({n} layers), from the top layer down",
                    "z_i is drawn right after q(z_i | .) is known: the top layer first, "
                    "then each layer below from its merged posterior")
    return result


def _diagnose_layer(i, top, name, got, reference, up):
    """A hint for a wrong value in layer index i: the usual mistakes, tested."""
    mu_hat, var_hat = up[i]
    close = lambda a: np.shape(a) == got.shape and np.allclose(got, a, rtol=RTOL, atol=ATOL)
    if name in ("mu_q", "var_q"):
        index = 0 if name == "mu_q" else 1
        if i == top:
            if close(gaussian.merge(mu_hat, var_hat, 0.0, 1.0)[index].data):
                return ("the top layer's posterior is the bottom-up Gaussian itself: "
                        "q(z_L | x) = N(mu_hat_L, var_hat_L), no merge (its prior N(0, I) "
                        "only enters its KL term)")
            return "q(z_L | x) = N(mu_hat_L, var_hat_L): take up[L - 1] as it is"
        if close(up[i][index].data):
            return ("below the top, merge the bottom-up Gaussian with the prior: "
                    "mu_p, var_p = model.prior(i, z[i + 1]), then merge(mu_hat, var_hat, mu_p, var_p)")
        return ("(mu_q,i, var_q,i) = merge(mu_hat_i, var_hat_i, mu_p,i, var_p,i), where "
                "(mu_p,i, var_p,i) = model.prior(i, z[i + 1]) is conditioned on the *sample* "
                "of the layer above (model.prior(i, ...) is the prior of layer index i)")
    if name == "z":
        return ("z_i = sample(mu_q_i, var_q_i), from the layer's merged posterior, once per "
                "layer and from the top down (the noise comes in that order)")
    if got.ndim == np.ndim(reference.kl_units[i].data) - 1:  # summed over the units
        return ("kl[i] is the KL per unit, of the shape of mu_q[i]: drop the sum over the "
                "units (the model sums them later)")
    if i == top:
        return "the top layer's KL is against N(0, I): gaussian_kl(mu_q, var_q, 0.0, 1.0)"
    against_standard = gaussian.gaussian_kl(reference.mu_q[i], reference.var_q[i], 0.0, 1.0)
    if close(against_standard.data):
        return ("below the top, the KL is against the layer's prior p(z_i | z_i+1) = "
                "N(mu_p,i, var_p,i), not against N(0, I)")
    return "kl_i = gaussian_kl(mu_q_i, var_q_i, mu_p_i, var_p_i), per unit"


def _shape_note(i, top, name, got, expected):
    """Why a shape may be off, when the shapes themselves say it."""
    if name == "kl" and got.shape == expected.shape[:-1]:
        return " (the KL per unit: do not sum over the units)"
    if i < top and got.ndim == expected.ndim - 1:
        return (" (below the top, the prior of a sample of shape (K, B, units) gives every "
                "array the leading K axis)")
    return ""


def _compare_layers(result, reference, up):
    """Compare layer by layer from the top down, in the order they are computed. The KL
    of the top layer may come as (B, units) or broadcast to the samples' (K, B, units)."""
    top, by_name = len(up) - 1, dict(zip(("z", "mu_q", "var_q", "kl"), result))
    for i in range(top, -1, -1):
        for name in ("mu_q", "var_q", "z", "kl"):  # in the order a layer computes them
            items = by_name[name]
            expected = (reference.kl_units if name == "kl" else getattr(reference, name))[i].data
            got = items[i].data
            try:
                shape = np.broadcast_shapes(got.shape, expected.shape)
            except ValueError:
                shape = None
            if shape is None or (name != "kl" and got.shape != expected.shape):
                raise Wrong(f"layer z{i + 1}: {name} has shape {got.shape}, expected "
                            f"{expected.shape}{_shape_note(i, top, name, got, expected)}",
                            _diagnose_layer(i, top, name, got, reference, up))
            got_b, expected_b = np.broadcast_to(got, shape), np.broadcast_to(expected, shape)
            if not np.allclose(got_b, expected_b, rtol=RTOL, atol=ATOL):
                k = _worst(got_b, expected_b, RTOL, ATOL)
                raise Wrong(f"layer z{i + 1}: {name}, at index {tuple(int(j) for j in k)}: "
                            f"expected {_fmt(expected_b[k])}, got {_fmt(got_b[k])}",
                            _diagnose_layer(i, top, name, got, reference, up))


def _top_down_batch():
    return (np.random.default_rng(15).uniform(size=(5, 12)) < 0.4).astype(np.float64)


def check_top_down_values(top_down):
    def body():
        import lvae
        model, x = tiny_lvae(), _top_down_batch()
        for samples in (1, 3):
            reference = model.infer(Tensor(x), lvae.Noise(7), samples, "analytic")
            result = _top_down_run(top_down, model, x, samples)
            _compare_layers(result, reference, bottom_up(model, x))
        return ("z, mu_q, var_q and the KL of every layer match LadderVAE.infer, with 1 and "
                "with 3 samples per image")
    return run_part("top-down pass", body)


def check_top_down_gradients(top_down):
    """Gradients of every weight through the student's pass against LadderVAE.infer's."""
    def body():
        import lvae
        model, x = tiny_lvae(), _top_down_batch()
        rng = np.random.default_rng(16)
        weights = [rng.standard_normal((3, 5, d)) for d in model.z_dims]

        def gradients(run):
            for p in model.parameters():
                p.grad = None
            z, kl = run()
            objective = None  # a sum that every z and KL term enters with its own weight
            for z_i, kl_i, w in zip(z, kl, weights):
                # the KL summed over units, averaged over samples and images as the ELBO
                # does: a top-layer KL of shape (B, d) or broadcast to (K, B, d) counts the same
                term = (z_i * w).sum() + kl_i.sum(axis=-1).mean()
                objective = term if objective is None else objective + term
            objective.backward()
            return {name: p.grad for name, p in model.named_parameters() if p.grad is not None}

        def reference_run():
            layers = model.infer(Tensor(x), lvae.Noise(7), 3, "analytic")
            return layers.z, layers.kl_units

        def student_run():
            z, _, _, kl = _top_down_run(top_down, model, x, 3)
            return z, kl
        expected, got = gradients(reference_run), gradients(student_run)
        for name, g in expected.items():
            if name not in got:
                raise Wrong(f"no gradient reaches the weight {name}",
                            "keep everything a Tensor made by ops (model.prior, merge, sample, "
                            "gaussian_kl): a Tensor built from .data cuts the graph",
                            status="WRONG GRADIENT")
            if not np.allclose(got[name], g, rtol=GRAD_RTOL, atol=GRAD_ATOL):
                k = _worst(np.asarray(got[name]), g, GRAD_RTOL, GRAD_ATOL)
                raise Wrong(f"weight {name}, at index {tuple(int(j) for j in k)}: your pass "
                            f"gives {_fmt(got[name][k])}, LadderVAE.infer gives {_fmt(g[k])}",
                            "a value is right but reached another way: is a prior, a merge "
                            "or a sample computed from a detached copy?", status="WRONG GRADIENT")
        return (f"the gradients of all {len(expected)} weights through your pass equal "
                f"those through LadderVAE.infer (3 samples per image)")
    return run_part("top-down pass, gradients", body)


def check_top_down(top_down):
    """Exercise 7: the LVAE's top-down pass, its values, then its gradients."""
    if not check_top_down_values(top_down):
        print("NOT DONE YET: top-down pass, gradients: checked once the values pass.")
        return False
    return check_top_down_gradients(top_down)
