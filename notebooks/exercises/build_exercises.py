"""Write the exercise notebooks from the cell texts below.

    python notebooks/exercises/build_exercises.py         # write the seven .ipynb, without outputs

The notebooks are generated so that their source stays reviewable here (as with
notebooks/build_notebooks.py): edit this file, not the .ipynb, and run it again. They
are committed blank and without outputs; tests/test_exercises.py checks that they match
this file. The reference solutions are solutions/NN_name.py, one per notebook, each a
complete replacement for the notebook's cell tagged ``exercise``. Needs nbformat.
"""
import os

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = os.path.dirname(os.path.abspath(__file__))

# The first code cell: checks.py sits next to the notebook; find it wherever the kernel
# was started (usually this folder). Importing checks puts the project on sys.path.
# Outside the repository, say so here rather than with a bare ModuleNotFoundError and
# then a NameError in every cell below (the wording of build_notebooks.py's SETUP).
SETUP = '''import sys
from pathlib import Path

for folder in [Path.cwd(), *Path.cwd().parents]:
    if (folder / "notebooks" / "exercises" / "checks.py").exists():
        sys.path.insert(0, str(folder / "notebooks" / "exercises"))
        break
else:
    raise FileNotFoundError(f"checks.py not found in {Path.cwd()} or above (it is in "
                            f"notebooks/exercises/): open this notebook from inside the "
                            f"repository")

import numpy as np

import checks  # the check cells; importing it also puts the project's folder on sys.path
from autograd import Tensor, no_grad'''

NOTEBOOKS = {}  # name -> list of cells, filled in below


def md(text):
    return new_markdown_cell(text.strip("\n"))


def code(text, tag=None):
    cell = new_code_cell(text.strip("\n"))
    if tag:
        cell.metadata["tags"] = [tag]
    return cell


def notebook(name, cells):
    NOTEBOOKS[name] = cells


def build(name):
    """The notebook ``name`` (e.g. '01_softplus') as an nbformat node, without outputs."""
    cells = NOTEBOOKS[name]
    for i, cell in enumerate(cells):
        cell.id = f"{name.split('_')[0]}-{i:02d}"  # stable ids: small diffs when edited
    nb = new_notebook(cells=cells, metadata={
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"}})
    nbformat.validate(nb)
    return nb


HOW = """
**How this notebook works.** The cell tagged *exercise* holds the blanks: replace each
`raise NotImplementedError(...)` with your code, run that cell, then run the check cell
below it. The check prints `PASS`, `NOT DONE YET` (a blank is still empty) or `WRONG`
with the input, the expected value and yours; for a gradient it shows your backward's
value beside the finite-difference one. Run the cells from the top (*Run All* works).
Keep all your code inside the exercise cell: code in new cells is not graded (the
grader takes only the exercise cell).
"""

# ----------------------------------------------------------------------------------
notebook("01_softplus", [
md(r"""
# Exercise 1: an autograd op, forward and backward (softplus)

**Learning goals**: write an op the way every op of `autograd.py` is written
(`record(out, parents, backward)`); apply the chain rule to one op; make a forward pass
numerically stable.

In the LVAE every variance comes out of a *softplus*: `GaussianLayer` in `layers.py`
computes $\sigma^2 = \mathrm{softplus}(a) + 10^{-8}$, which is positive for any
pre-activation $a$:

$$\mathrm{softplus}(x) = \log(1 + e^x), \qquad
\frac{d}{dx}\,\mathrm{softplus}(x) = \frac{e^x}{1 + e^x} = \frac{1}{1 + e^{-x}} = \sigma(x).$$

**Stability.** In float64 $e^{710}$ is already `inf`, so the formula as written gives
`inf` for large $x$, although softplus$(x) \approx x$ there. Rewrite it so that the
exponent is never positive: for $x > 0$, $\log(1 + e^x) = x + \log(1 + e^{-x})$, so
$$\mathrm{softplus}(x) = \max(x, 0) + \log\!\left(1 + e^{-|x|}\right),$$
and use `log1p(u)` $= \log(1 + u)$, which stays accurate for tiny $u$.

**Backward.** An op's `backward(g)` receives $g = \partial L / \partial\,\mathrm{out}$
(same shape as the output) and returns one gradient per parent, as a tuple:
$\partial L/\partial x = g \cdot \sigma(x)$. `sigmoid_array` (imported below) is a
stable $\sigma$ on arrays; `exp(x) / (1 + exp(x))` is `inf/inf = nan` at $x = 1000$.
"""),
md(HOW),
code(SETUP),
md("## Your code"),
code('''
from autograd import get_array_module, record, sigmoid_array


def softplus_array(x):
    """log(1 + e^x) on a raw array (NumPy or CuPy), without overflow for large |x|."""
    xp = get_array_module(x)  # numpy or cupy: use xp.maximum, xp.abs, xp.exp, xp.log1p
    # YOUR CODE HERE: return softplus of every element of x
    raise NotImplementedError("fill in softplus_array")


def softplus(x):
    """The autograd op softplus(x) on a Tensor x;  d/dx = sigma(x)."""
    out = softplus_array(x.data)

    def backward(g):
        # g = dL/d(out), an array of out's shape. Return one gradient per parent: (dx,)
        # YOUR CODE HERE
        raise NotImplementedError("fill in the backward of softplus")
    return record(out, (x,), backward)
''', tag="exercise"),
md("## Check"),
code("done = checks.check_softplus(softplus_array, softplus)", tag="check"),
md("""
## Once it passes

The naive formula next to yours, and the gradient that `backward()` collected for each
input through the engine (`Tensor.backward` calls your closure).
"""),
code('''
if done:
    x = Tensor(np.array([-1000.0, -10.0, 0.0, 10.0, 1000.0]), requires_grad=True)
    y = softplus(x)
    y.sum().backward()
    with np.errstate(over="ignore"):
        print("naive log(1 + e^x):", np.log(1 + np.exp(x.data)))
    print("softplus(x):       ", y.data)
    print("dy/dx = sigma(x):  ", x.grad)
else:
    print("Finish the exercise first.")
'''),
])

# ----------------------------------------------------------------------------------
notebook("02_merge", [
md(r"""
# Exercise 2: the precision-weighted merge

**Learning goals**: the step that makes the LVAE a *ladder*; multiplying two Gaussian
densities; writing a numerically safe form; deriving the gradients of an op with two
outputs.

In the LVAE's top-down pass, layer $i$ has two Gaussian opinions about $z_i$: the
bottom-up one from the data, $\mathcal N(\hat\mu_i, \hat\sigma^2_i)$, and the generative
model's prior given the sample above, $\mathcal N(\mu_{p,i}, \sigma^2_{p,i})$. The
approximate posterior is their product, renormalised (`gaussian.merge`, used in
`LadderVAE.infer`):

$$q(z_i \mid \cdot) \propto \mathcal N(z; \hat\mu, \hat\sigma^2)\,\mathcal N(z; \mu_p, \sigma^2_p)
\propto \mathcal N(z; \mu_q, \sigma^2_q),$$
$$\sigma^2_q = \frac{1}{\hat\sigma^{-2} + \sigma_p^{-2}}, \qquad
\mu_q = \left(\frac{\hat\mu}{\hat\sigma^2} + \frac{\mu_p}{\sigma^2_p}\right)\sigma^2_q.$$

Precisions (inverse variances) add up, and the mean is a precision-weighted average:
the posterior leans towards whichever opinion is more certain. (Check it: the exponent
of the product is a sum of two quadratics in $z$; complete the square.) The product of
the two densities is not itself normalised:
$\mathcal N(z; \hat\mu, \hat\sigma^2)\,\mathcal N(z; \mu_p, \sigma^2_p)
= \mathcal N(\hat\mu; \mu_p, \hat\sigma^2 + \sigma^2_p)\,\mathcal N(z; \mu_q, \sigma^2_q)$,
and renormalising removes the first factor, which does not depend on $z$.

**A safer form.** Multiply numerator and denominator by $\hat\sigma^2 \sigma^2_p$ to
divide only once: with $s = 1/(\hat\sigma^2 + \sigma^2_p)$,
$$\sigma^2_q = \hat\sigma^2 \sigma^2_p\, s, \qquad \mu_q = (\hat\mu\, \sigma^2_p + \mu_p \hat\sigma^2)\, s.$$
One division instead of three, and the right limit when a variance gets tiny: as
$\hat\sigma^2 \to 0$ the form above gives $\mu_q = \hat\mu$, where the textbook form
computes $\infty \cdot 0$. (Both pass the check: the model's variances, $10^{-8}$ and
up, never reach 0.)

**Backward.** `merge` has two outputs. Given $g_\mu = \partial L/\partial \mu_q$ and
$g_{\sigma^2} = \partial L / \partial \sigma^2_q$ (`g_var` in the code), the gradient for
each input $a$ is
$$\frac{\partial L}{\partial a} = g_\mu \frac{\partial \mu_q}{\partial a} + g_{\sigma^2} \frac{\partial \sigma^2_q}{\partial a}.$$
Derive the eight partial derivatives (four are zero or easy; $\partial s/\partial \hat\sigma^2 = -s^2$).
The check compares each gradient with finite differences, first through $\mu_q$ only,
then through $\sigma^2_q$ only, then both.
"""),
md(HOW),
code(SETUP),
md("## Your code"),
code('''
def merge_forward(mu_hat, var_hat, mu_p, var_p):
    """The Gaussian proportional to N(mu_hat, var_hat) N(mu_p, var_p), elementwise.

    Arrays in, (mu_q, var_q) out, each of the inputs' shape.
    """
    # YOUR CODE HERE
    raise NotImplementedError("fill in merge_forward")


def merge_backward(g_mu, g_var, mu_hat, var_hat, mu_p, var_p):
    """Given g_mu = dL/d mu_q and g_var = dL/d var_q (arrays), return the four gradients
    (dL/d mu_hat, dL/d var_hat, dL/d mu_p, dL/d var_p)."""
    # YOUR CODE HERE
    raise NotImplementedError("fill in merge_backward")
''', tag="exercise"),
md("## Check"),
code("done = checks.check_merge(merge_forward, merge_backward)", tag="check"),
md("""
## Once it passes

Your two functions as one autograd op with two outputs, written like `gaussian.merge`
(which also sums gradients over broadcast axes). The posterior follows the bottom-up
opinion ($\\hat\\mu = 2$) when it is certain and the prior ($\\mu_p = 0$) when it is not:
"""),
code('''
from autograd import record_multi


def merge(mu_hat, var_hat, mu_p, var_p):
    inputs = (mu_hat, var_hat, mu_p, var_p)
    datas = [t.data for t in inputs]
    mu_q, var_q = merge_forward(*datas)

    def backward(grads):  # an output that got no gradient comes as None: use zeros
        g_mu, g_var = (np.zeros_like(mu_q) if g is None else g for g in grads)
        return merge_backward(g_mu, g_var, *datas)
    return record_multi((mu_q, var_q), inputs, backward)


if done:
    var_hat = Tensor(np.array([0.01, 0.1, 1.0, 10.0, 100.0]), requires_grad=True)
    mu_q, var_q = merge(Tensor(np.full(5, 2.0)), var_hat, Tensor(np.zeros(5)), Tensor(np.ones(5)))
    (mu_q + var_q).sum().backward()  # both outputs get a gradient
    print("var_hat:", var_hat.data, "(bottom-up mu_hat = 2, prior N(0, 1))")
    print("mu_q:   ", mu_q.data.round(3))
    print("var_q:  ", var_q.data.round(3))
    print("d(mu_q + var_q)/d var_hat:", var_hat.grad.round(4))
else:
    print("Finish the exercise first.")
'''),
])

# ----------------------------------------------------------------------------------
notebook("03_gaussian_kl", [
md(r"""
# Exercise 3: the analytic KL divergence between two Gaussians

**Learning goals**: the KL term of the ELBO in closed form; why the LVAE can use it in
every layer; checking a closed form against a Monte Carlo estimate.

The ELBO is $\mathbb E_q[\log p(x \mid z)] - \sum_i \mathrm{KL}\big(q(z_i \mid \cdot)\,\|\,p(z_i \mid z_{i+1})\big)$.
In the LVAE, $z_{i+1}$ is drawn before $z_i$, so given that sample both distributions
are diagonal Gaussians and the KL of each unit has a closed form (`gaussian.gaussian_kl`):

$$\mathrm{KL}\big(\mathcal N(\mu_q, \sigma_q^2)\,\|\,\mathcal N(\mu_p, \sigma_p^2)\big)
= \mathbb E_q[\log q(z) - \log p(z)]
= \tfrac12\left(\log\sigma_p^2 - \log\sigma_q^2 + \frac{\sigma_q^2 + (\mu_q - \mu_p)^2}{\sigma_p^2} - 1\right).$$

(Derive it: $\log \mathcal N(z; \mu, \sigma^2) = -\frac12\big(\log 2\pi + \log\sigma^2 + (z-\mu)^2/\sigma^2\big)$,
and under $q$, $\mathbb E[(z - \mu_q)^2] = \sigma_q^2$, $\mathbb E[(z-\mu_p)^2] = \sigma_q^2 + (\mu_q - \mu_p)^2$.)
In the bottom-up VAE the lower layers' $p(z_i \mid z_{i+1})$ depends on a sample drawn
*after* $z_i$, and only the one-sample estimate $\log q(z) - \log p(z)$ is available.

**Backward.** Write `kl_backward(g, ...)` returning the gradients for
$(\mu_q, \sigma_q^2, \mu_p, \sigma_p^2)$, each $g$ times a partial derivative.
Note that the variables are *variances*, not standard deviations or log-variances.
"""),
md(HOW),
code(SETUP),
md("## Your code"),
code('''
from autograd import get_array_module


def kl_forward(mu_q, var_q, mu_p, var_p):
    """KL( N(mu_q, var_q) || N(mu_p, var_p) ) per element, on arrays."""
    xp = get_array_module(mu_q)  # xp.log
    # YOUR CODE HERE
    raise NotImplementedError("fill in kl_forward")


def kl_backward(g, mu_q, var_q, mu_p, var_p):
    """Given g = dL/dKL (an array of the KL's shape), return the four gradients
    (dL/d mu_q, dL/d var_q, dL/d mu_p, dL/d var_p)."""
    # YOUR CODE HERE
    raise NotImplementedError("fill in kl_backward")
''', tag="exercise"),
md("## Check"),
code("done = checks.check_kl(kl_forward, kl_backward)", tag="check"),
md("""
## Once it passes

The closed form against the Monte Carlo average of $\\log q(z) - \\log p(z)$ over samples
$z \\sim q$ (the estimate the bottom-up VAE has to use): unbiased, but noisy.
"""),
code('''
from gaussian import log_normal_forward

if done:
    mu_q, var_q, mu_p, var_p = 0.5, 0.8, -0.3, 2.0
    print(f"analytic KL: {float(kl_forward(*np.array([mu_q, var_q, mu_p, var_p]))):.4f}")
    rng = np.random.default_rng(0)
    for n in (1, 10, 1000, 100_000):
        z = mu_q + np.sqrt(var_q) * rng.standard_normal(n)
        estimate = (log_normal_forward(z, mu_q, var_q) - log_normal_forward(z, mu_p, var_p)).mean()
        print(f"Monte Carlo, {n:6d} samples: {estimate:.4f}")
else:
    print("Finish the exercise first.")
'''),
])

# ----------------------------------------------------------------------------------
notebook("04_batchnorm_backward", [
md(r"""
# Exercise 4: the backward pass of batch normalisation

**Learning goals**: backpropagate through an op whose every output depends on every
input row; derive a compact gradient by hand; see why "treat the statistics as
constants" is wrong.

The paper uses batch normalisation on every dense layer except the output layer of
$p(x \mid z_1)$ (the Gaussian heads included).
In training mode, for each feature (column) of a batch $x$ with $N$ rows:

$$m = \frac1N\sum_n x_n, \quad v = \frac1N\sum_n (x_n - m)^2, \quad
\hat x_n = \frac{x_n - m}{\sqrt{v + \epsilon}}, \quad y_n = \gamma\,\hat x_n + \beta.$$

`layers.batch_norm` is one op with a hand-written backward; here you write that
backward. The forward is given. Given $g_n = \partial L/\partial y_n$:

* $\partial L/\partial\beta$ and $\partial L/\partial\gamma$ are sums over the rows (easy).
* $\partial L/\partial x_n$ is the interesting one: $x_n$ reaches the loss directly
  through $\hat x_n$, and also through $m$ and $v$, which every $\hat x_k$ depends on.
  With $\hat g_n = \gamma\, g_n$ (the gradient at $\hat x_n$), derive
  $\partial L/\partial v$ and $\partial L/\partial m$, then collect the three paths.
  The result simplifies to an expression in $\hat g$, $\hat x$ and two averages over the
  rows, times $1/\sqrt{v + \epsilon}$.

Sanity checks for your formula: adding a constant to a column of $x$ does not change $y$,
so the column sums of $\partial L/\partial x$ are zero; scaling a column about its mean,
$x_n \to m + c\,(x_n - m)$, does not change $y$ either (exactly so when $\epsilon = 0$),
so $\sum_n (x_n - m)\, \partial L/\partial x_n = 0$, that is
$\sum_n \hat x_n\, \partial L/\partial x_n = 0$.
"""),
md(HOW),
code(SETUP),
md("## Your code"),
code('''
from autograd import get_array_module, record


def batch_norm(x, gamma, beta, eps):
    """Training-mode batch norm of a 2-D Tensor x (rows = examples) as one autograd op."""
    xp = get_array_module(x.data)
    n = x.shape[0]
    mean = x.data.mean(axis=0)
    centred = x.data - mean
    var = (centred * centred).mean(axis=0)
    inv_std = 1 / xp.sqrt(var + eps)
    xhat = centred * inv_std
    out = gamma.data * xhat + beta.data

    def backward(g):
        # g = dL/dy, shape (n, features). Return (dx, dgamma, dbeta): shapes of x, gamma, beta.
        # YOUR CODE HERE
        raise NotImplementedError("fill in the backward of batch_norm")
    return record(out, (x, gamma, beta), backward)
''', tag="exercise"),
md("## Check"),
code("done = checks.check_batchnorm_backward(batch_norm)", tag="check"),
md("""
## Once it passes

The two sanity checks from above, on your gradient, and the gradient you would get by
treating $m$ and $v$ as constants (it fails both):
"""),
code('''
if done:
    rng = np.random.default_rng(0)
    x = Tensor(rng.standard_normal((8, 3)) * 2 + 1, requires_grad=True)
    gamma, beta = Tensor(rng.uniform(0.5, 2, 3), requires_grad=True), Tensor(np.zeros(3))
    g = rng.standard_normal((8, 3))
    eps = 1e-12  # scaling a column leaves y unchanged only as eps -> 0
    y = batch_norm(x, gamma, beta, eps)
    y.backward(g)
    xhat = (y.data - beta.data) / gamma.data
    naive = g * gamma.data / np.sqrt(x.data.var(axis=0) + eps)
    print("column sums of dL/dx:           ", x.grad.sum(axis=0).round(8) + 0.0)
    print("sum_n xhat_n dL/dx_n:           ", (xhat * x.grad).sum(axis=0).round(8) + 0.0)
    print("the same with constant m and v: ", naive.sum(axis=0).round(4), (xhat * naive).sum(axis=0).round(4))
else:
    print("Finish the exercise first.")
'''),
])

# ----------------------------------------------------------------------------------
notebook("05_iw_bound", [
md(r"""
# Exercise 5: log-sum-exp and the importance-weighted bound

**Learning goals**: compute $\log\sum e^{a}$ without underflow; its gradient (the
softmax); the importance-weighted bound $\mathcal L_K$ that the paper uses to measure
$\log p(x)$ and to fine-tune.

With $K$ samples $z^k \sim q(z \mid x)$ and *log-weights*
$\log w_k = \log p(x, z^k) - \log q(z^k \mid x)$ (`lvae.log_weights`),
$$\mathcal L_K = \log \frac1K \sum_{k=1}^K w_k
= \log\sum_k e^{\log w_k} - \log K, \qquad
\mathbb E[\mathcal L_1] = \text{ELBO} \le \mathbb E[\mathcal L_K] \le \mathbb E[\mathcal L_{K+1}] \le \log p(x)$$
(each $\mathcal L_K$ is computed from random samples: the inequalities hold for its
expectation, and for one estimate only up to its noise).

**Why log-sum-exp.** A log-weight of a binarised MNIST image is about $-100$ nats and
can be far lower early in training; $e^{-800}$ is 0 in float64, so $\log\sum_k e^{a_k}$
computed as written gives $\log 0 = -\infty$ (and $e^{800}$ overflows to `inf`). With
$m = \max_k a_k$:
$$\log \sum_k e^{a_k} = m + \log\sum_k e^{a_k - m},$$
where every exponent is $\le 0$ and the largest term is exactly 1.

**Backward.** $\dfrac{\partial}{\partial a_k}\log\sum_j e^{a_j} = \dfrac{e^{a_k}}{\sum_j e^{a_j}} = e^{a_k - \mathrm{out}}$,
the softmax. For $\mathcal L_K$ this is the normalised importance weight
$\tilde w_k = w_k / \sum_j w_j$: the bound's gradient is the gradients of the samples'
log-weights, averaged with these weights. The reduced axis is gone from `out` and `g`:
put it back (`xp.expand_dims`, or `keepdims=True`) to broadcast against `a`.

Three functions: `logsumexp_array` (raw arrays), the op `logsumexp`, and `iw_bound`,
built from your op with Tensor arithmetic so that gradients flow.
"""),
md(HOW),
code(SETUP),
md("## Your code"),
code('''
import math

from autograd import get_array_module, record


def logsumexp_array(a, axis=0):
    """log sum_i e^{a_i} along `axis` (which is removed from the shape), without
    overflow or underflow."""
    xp = get_array_module(a)  # xp.exp, xp.log; a.max(axis=axis, keepdims=True)
    # YOUR CODE HERE
    raise NotImplementedError("fill in logsumexp_array")


def logsumexp(x, axis=0):
    """The op on a Tensor;  d out / d x_i = e^{x_i - out} (the softmax along `axis`)."""
    xp = get_array_module(x.data)
    out = logsumexp_array(x.data, axis)

    def backward(g):
        # g has out's shape (without `axis`); return (dx,), dx of x's shape
        # YOUR CODE HERE
        raise NotImplementedError("fill in the backward of logsumexp")
    return record(out, (x,), backward)


def iw_bound(log_w):
    """L_K of each image from a Tensor of log-weights of shape (K, B): a Tensor (B,)."""
    # YOUR CODE HERE: use logsumexp and Tensor arithmetic (a Tensor minus a number works)
    raise NotImplementedError("fill in iw_bound")
''', tag="exercise"),
md("## Check"),
code("done = checks.check_logsumexp_and_iw_bound(logsumexp_array, logsumexp, iw_bound)",
     tag="check"),
md("""
## Once it passes

$\\mathcal L_K$ of a small untrained LVAE (12 pixels, two stochastic layers) on random
binary images, averaged over 64 images: the bound rises with $K$ towards $\\log p(x)$.
"""),
code('''
import lvae

if done:
    model = lvae.LadderVAE(x_dim=12, z_dims=(3, 2), hidden=(8, 6), seed=0).eval()
    x = (np.random.default_rng(0).uniform(size=(64, 12)) < 0.4).astype(np.float32)
    with no_grad():
        for k in (1, 10, 100, 1000):
            log_w = lvae.log_weights(model, x, lvae.Noise(1), k)
            print(f"K = {k:4d}:  L_K = {float(iw_bound(log_w).data.mean()):.3f}")
else:
    print("Finish the exercise first.")
'''),
])

# ----------------------------------------------------------------------------------
notebook("06_reparameterize", [
md(r"""
# Exercise 6: the reparameterisation trick, and gradients of broadcast inputs

**Learning goals**: how a gradient flows through a random sample; summing a gradient
back over axes that broadcasting added; checking a gradient *estimator* by Monte Carlo.

To train the VAE, the sample $z \sim \mathcal N(\mu, \sigma^2)$ has to be
differentiable in $\mu$ and $\sigma^2$. Draw the noise outside and make the sample a
deterministic function of it (`gaussian.reparameterize`):
$$z = \mu + \sqrt{\sigma^2}\;\varepsilon, \quad \varepsilon \sim \mathcal N(0, I), \qquad
\frac{\partial z}{\partial \mu} = 1, \quad \frac{\partial z}{\partial \sigma^2} = \frac{\varepsilon}{2\sqrt{\sigma^2}}.$$

**Broadcasting.** With $K$ importance samples per image, $\mu$ and $\sigma^2$ have shape
$(B, d)$ but $\varepsilon$ and $z$ have shape $(K, B, d)$. Each of $\mu$'s entries was
used $K$ times, so its gradient is the *sum* of the $K$ contributions:
`autograd.sum_to(grad, mu.shape)` sums a gradient back to a shape. (Try it without: the
check will tell you what shape you returned.)

**Why it works.** $\nabla_{\mu,\sigma^2}\,\mathbb E[f(z)] = \mathbb E_\varepsilon\big[\nabla_{\mu,\sigma^2} f(\mu + \sigma\varepsilon)\big]$
(the gradient of the composite function with respect to $\mu$ and $\sigma^2$):
averaging the per-sample gradients estimates the gradient of the expectation. The
check tests this on $f(z) = z^2$, where $\mathbb E[z^2] = \mu^2 + \sigma^2$.
"""),
md(HOW),
code(SETUP),
md("## Your code"),
code('''
from autograd import get_array_module, record, sum_to


def reparameterize(mu, var, eps):
    """A sample z = mu + sqrt(var) * eps of N(mu, var), differentiable in mu and var.

    mu, var: Tensors of one shape, e.g. (B, d); eps: an array of that shape, or with
    extra leading axes of samples, e.g. (K, B, d) (the check also uses mu (d,), eps (K, d)).
    """
    xp = get_array_module(mu.data)
    # YOUR CODE HERE: z (an array) from mu.data, var.data and eps
    raise NotImplementedError("fill in the forward of reparameterize")

    def backward(g):
        # g has z's shape; return (dmu, dvar) of the shapes of mu and var
        # YOUR CODE HERE
        raise NotImplementedError("fill in the backward of reparameterize")
    return record(z, (mu, var), backward)
''', tag="exercise"),
md("## Check"),
code("done = checks.check_reparameterize(reparameterize)", tag="check"),
md("""
## Once it passes

The pathwise estimate of $\\partial\\,\\mathbb E[z^2] / \\partial(\\mu, \\sigma^2) = (2\\mu, 1)$
with more and more samples ($\\mu = 0.5$, $\\sigma^2 = 2$): its error shrinks like
$1/\\sqrt{K}$.
"""),
code('''
import autograd

if done:
    rng = np.random.default_rng(0)
    for k in (10, 1000, 100_000):
        mu = Tensor(np.array([0.5]), requires_grad=True)
        var = Tensor(np.array([2.0]), requires_grad=True)
        z = reparameterize(mu, var, rng.standard_normal((k, 1)))
        autograd.mean(autograd.square(z)).backward()
        print(f"K = {k:6d}: d/dmu = {mu.grad[0]:.3f} (exact 1.0), d/dvar = {var.grad[0]:.3f} (exact 1.0)")
else:
    print("Finish the exercise first.")
'''),
])


# exercise 7's check compares with the project's own pass, not with finite differences
HOW_TOP_DOWN = """
**How this notebook works.** The cell tagged *exercise* holds the blank: replace the
`raise NotImplementedError(...)` with your code, run that cell, then run the check cell
below it. The check prints `PASS`, `NOT DONE YET` (the blank is still empty) or `WRONG`
with the layer, the expected value and yours, and a hint; then it compares the gradient
of every weight through your pass with the gradient through the project's
`LadderVAE.infer`. Run the cells from the top (*Run All* works).
Keep all your code inside the exercise cell: code in new cells is not graded (the
grader takes only the exercise cell).
"""

# ----------------------------------------------------------------------------------
notebook("07_top_down", [
md(r"""
# Exercise 7: the LVAE's top-down pass

**Learning goals**: write the heart of the Ladder VAE, its inference pass; see how it
reuses the *generative* model to infer the latent variables; see why every layer's KL
term is analytic; keep track of shapes with $K$ samples per image.

**The two passes.** A deterministic *bottom-up* pass turns the image into one Gaussian
per stochastic layer (given below as `up`): $d_1 = \mathrm{MLP}(x)$,
$d_i = \mathrm{MLP}(d_{i-1})$, $(\hat\mu_i, \hat\sigma^2_i) = \mathrm{head}(d_i)$. These
are what the data alone say about $z_i$. The *top-down* pass, yours to write, then walks
down the generative model $p(z_L)\,p(z_{L-1} \mid z_L) \cdots$ and corrects each of them
with the prior:
$$q(z_L \mid x) = \mathcal N(\hat\mu_L, \hat\sigma^2_L), \qquad z_L \sim q(z_L \mid x),$$
and for $i = L-1, \dots, 1$:
$$(\mu_{p,i}, \sigma^2_{p,i}) = \text{prior of } z_i \text{ given the sample } z_{i+1}, \qquad
q(z_i \mid x, z_{i+1}) = \mathrm{merge}\big(\mathcal N(\hat\mu_i, \hat\sigma^2_i),\; \mathcal N(\mu_{p,i}, \sigma^2_{p,i})\big), \qquad
z_i \sim q(z_i \mid x, z_{i+1}).$$
The merge is the precision-weighted product of exercise 2: the posterior leans towards
whichever Gaussian is more certain. The top layer's prior is $\mathcal N(0, I)$; the
paper does not merge with it: $q(z_L \mid x)$ is the bottom-up Gaussian itself.

**The KL terms.** Because $z_{i+1}$ is drawn *before* $z_i$, given that sample both
$q(z_i \mid \cdot)$ and $p(z_i \mid z_{i+1})$ are diagonal Gaussians, and
$\mathrm{KL}_i = \mathrm{KL}\big(q(z_i \mid x, z_{i+1})\,\|\,p(z_i \mid z_{i+1})\big)$ is the
closed form of exercise 3, per unit; the top layer's is against $\mathcal N(0, I)$.
(The bottom-up VAE draws $z_{i+1}$ *after* $z_i$ and has to estimate these terms from one
sample.)

**In code.** Lists are indexed bottom first: index 0 is $z_1$, index $L-1$ is $z_L$.
You have:
* `up[i]`: the pair `(mu_hat, var_hat)` of layer index `i`, Tensors of shape $(B, d_i)$;
* `model.prior(i, z_above)`: `(mu_p, var_p)` of layer index `i` given the sample of
  layer index `i + 1`;
* `merge(mu_hat, var_hat, mu_p, var_p)` and `gaussian_kl(mu_q, var_q, mu_p, var_p)` from
  `gaussian.py` (exercises 2 and 3; numbers such as `0.0, 1.0` work for N(0, I));
* `sample(mu, var)`: a reparameterised sample (exercise 6) of shape $(K, B, d)$. Call
  it once per layer, from the top down, as soon as that layer's posterior is known: the
  check hands out the same noise as the project's code, in that order.

**Shapes**, with $B$ images and $K$ samples per image. The top layer's `mu_q`, `var_q`
and `kl` keep the shape $(B, d_L)$ of `up`; its sample `z` has shape $(K, B, d_L)$.
Below the top, the prior of a $(K, B, d_{i+1})$ sample has shape $(K, B, d_i)$, the merge
broadcasts $\hat\mu_i$ of shape $(B, d_i)$ against it, and `mu_q`, `var_q`, `z` and `kl`
all have shape $(K, B, d_i)$: nothing to do by hand. `kl[i]` is the KL *per unit*, the
shape of `mu_q[i]`, not summed over the units (the model sums it later).
"""),
md(HOW_TOP_DOWN),
code(SETUP),
md("## Your code"),
code('''
from gaussian import gaussian_kl, merge


def top_down(model, up, sample):
    """The LVAE's stochastic top-down pass.

    model: a lvae.LadderVAE (model.n_layers; model.prior(i, z_above));
    up: the bottom-up Gaussians [(mu_hat, var_hat) of each layer], bottom first;
    sample(mu, var): a reparameterised sample z ~ N(mu, var).
    Returns four lists indexed like `up` (index 0 = z_1): z, mu_q, var_q, and kl (the
    KL per unit of each layer, a Tensor of the shape of mu_q[i]).
    """
    n = model.n_layers
    z, mu_q, var_q, kl = [None] * n, [None] * n, [None] * n, [None] * n
    # YOUR CODE HERE: the top layer first, then i = n - 2, ..., 0
    raise NotImplementedError("fill in the top-down pass")
    return z, mu_q, var_q, kl
''', tag="exercise"),
md("## Check"),
code("done = checks.check_top_down(top_down)", tag="check"),
md("""
## Once it passes

The merge at work in a small untrained LVAE: for a few units of $z_1$ of one image, the
bottom-up Gaussian merged with the prior given the sample of $z_2$ gives the posterior:
its mean lies between the two, nearer the one with the smaller variance, and its
variance is below both. Then the KL of each layer.
"""),
code('''
if done:
    model = checks.tiny_lvae(seed=1)
    x = (np.random.default_rng(0).uniform(size=(4, 12)) < 0.4).astype(np.float64)
    up = checks.bottom_up(model, x)
    with no_grad():
        z, mu_q, var_q, kl = top_down(model, up, checks.sampler(1))
        mu_p, var_p = model.prior(0, z[1])
    for u in range(3):
        print(f"z1 unit {u}: bottom-up N({float(up[0][0].data[0, u]):+.2f}, {float(up[0][1].data[0, u]):.2f})"
              f" merged with prior N({float(mu_p.data[0, 0, u]):+.2f}, {float(var_p.data[0, 0, u]):.2f})"
              f"  ->  posterior N({float(mu_q[0].data[0, 0, u]):+.2f}, {float(var_q[0].data[0, 0, u]):.2f})")
    print("KL per layer, z1 first (nats, mean over 4 images):",
          [round(float(k.data.sum(axis=-1).mean()), 3) for k in kl])
else:
    print("Finish the exercise first.")
'''),
])


def main():
    for name in sorted(NOTEBOOKS):
        path = os.path.join(HERE, name + ".ipynb")
        nbformat.write(build(name), path)
        print("wrote", os.path.relpath(path))


if __name__ == "__main__":
    import sys
    if sys.argv[1:] in (["--help"], ["-h"]):
        print(__doc__.strip())
    elif sys.argv[1:]:
        sys.exit(f"build_exercises.py takes no options, got {' '.join(sys.argv[1:])!r}")
    else:
        main()
