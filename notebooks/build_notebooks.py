"""Write (and optionally run) the teaching notebooks from the cell texts below.

    python notebooks/build_notebooks.py                 # write the four .ipynb, WITHOUT outputs
    python notebooks/build_notebooks.py --execute       # ... and run them in place (the committed run)
    python notebooks/build_notebooks.py --execute 03    # only the notebooks whose name contains 03
    python notebooks/build_notebooks.py --text          # new markdown only, keeping the committed outputs
    LVAE_NOTEBOOK_QUICK=1 python notebooks/build_notebooks.py --execute   # tiny sizes, for a try

The notebooks are generated so that their source stays clean and reviewable here; edit this
file, not the .ipynb, and run it again. Needs nbformat (and nbclient + ipykernel to execute);
the library itself does not depend on Jupyter.
"""
import sys
import time
from pathlib import Path
from textwrap import dedent

import nbformat

HERE = Path(__file__).resolve().parent


def md(text):
    return nbformat.v4.new_markdown_cell(dedent(text).strip())


def code(*parts):
    """A code cell from one or more texts (each dedented on its own)."""
    return nbformat.v4.new_code_cell("\n".join(dedent(p).strip() for p in parts))


# The first code cell of every notebook: find the repository root wherever the kernel starts.
SETUP = '''
# Set-up: the library lives in the repository root, one folder above notebooks/.
import os, sys, time
from pathlib import Path

def find_root(start=Path.cwd()):
    for folder in [start, *start.parents]:
        if (folder / "lvae.py").exists():
            return folder
    raise FileNotFoundError(f"lvae.py not found in {start} or above: start Jupyter inside the repository")

ROOT = find_root()
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
QUICK = os.environ.get("LVAE_NOTEBOOK_QUICK", "0") not in ("", "0")  # tiny sizes (the test suite)
'''

# Figures: our own with the inline backend; plots.py writes PNG files, which we display.
PLOTTING = '''
import tempfile
import numpy as np
import matplotlib.pyplot as plt
from IPython.display import Image, display
import plots                      # draws on its own Figures and writes them as PNG files
%matplotlib inline
plt.rcParams["figure.dpi"] = 80   # our own figures appear in the notebook, at a resolution
plots.DPI = 80                    # (plots.py's PNGs too) that keeps the committed notebooks small

_figures = tempfile.TemporaryDirectory(prefix="lvae_notebook_")  # removed when the kernel stops
FIGURES = Path(_figures.name)     # plots.py writes its PNGs here

def show(path):
    """Display a PNG written by plots.py."""
    display(Image(filename=str(path)))
'''


# ====================================================================================
# 1. The engine
# ====================================================================================
def engine():
    return [
        md(r"""
        # 1 · The engine: reverse-mode automatic differentiation

        Training a VAE means following the gradient of one number, the ELBO, with respect to
        about two million weights (1.86 million in the paper's 5-layer LVAE). This notebook opens the engine that computes those gradients,
        [`autograd.py`](../autograd.py): the same module the model uses, not a copy.

        We will see

        1. how a computation builds a **graph**,
        2. how **reverse mode** runs the chain rule backwards through it, once, for all inputs,
        3. how gradients are summed back over **broadcast** axes (`sum_to`),
        4. how to **check** any gradient against finite differences, and how to add a new op.

        *Learning path:* **1 · engine** → 2 · Gaussians → 3 · training an LVAE → 4 · the hierarchy.
        """),
        code(SETUP),
        code(PLOTTING, '''
        import inspect
        import autograd
        from autograd import Tensor, tensor, no_grad, record, sum_to, check_gradients, exp, sigmoid, softplus
        '''),
        md(r"""
        ## 1. A computation graph

        A `Tensor` holds an array in `.data`. Every operation on tensors computes its output
        *and* remembers two things: its **parents** (the inputs) and a **backward** function
        that turns $\bar{y} = \partial L / \partial y$, the gradient arriving at the output,
        into the gradients for the inputs. Take

        $$c = a\,b, \qquad d = e^{a}, \qquad L = c + d .$$

        Here is the whole of `mul`: the forward and its backward sit side by side.
        """),
        code('''
        print(inspect.getsource(autograd.mul))
        '''),
        code('''
        a = tensor(2.0, requires_grad=True);  a.name = "a"
        b = tensor(-3.0, requires_grad=True); b.name = "b"
        c = a * b;       c.name = "c = a*b"
        d = exp(a);      d.name = "d = exp(a)"
        L = c + d;       L.name = "L = c + d"

        # the nodes in topological order (each after its parents), as backward() will sort them
        for node in autograd._topological_order(L):
            kind = "leaf" if node._backward is None else "op  "
            parents = ", ".join(p.name for p in node._parents) or "-"
            print(f"{kind} {node.name:11s} value {float(node.data):8.4f}   parents: {parents}")
        '''),
        md(r"""
        ## 2. Reverse mode

        Write $\bar{v} = \partial L/\partial v$ for any node $v$. Start with $\bar{L} = 1$ and
        visit the nodes from the loss back to the leaves; each node hands each parent $u$ its
        share by the chain rule, and shares from different paths **add up**:

        $$\bar{u} \mathrel{+}= \bar{v}\,\frac{\partial v}{\partial u} .$$

        `a` is used twice (in $c$ and in $d$), so its gradient has two parts:
        $\bar{a} = \bar{c}\,b + \bar{d}\,e^{a} = b + e^{a}$, while $\bar{b} = a$.
        Below, the loop of `Tensor.backward()` written out so that it keeps the gradient of
        *every* node (the engine keeps only the leaves'), and the result of `L.backward()`.
        """),
        code('''
        def reverse_mode(root):
            """The loop of Tensor.backward(), written out: dL/d(node) for every node."""
            order = autograd._topological_order(root)     # each node after its parents
            grads = {id(root): np.ones_like(root.data)}   # dL/dL = 1
            for node in reversed(order):                  # from the loss back to the leaves
                if node._backward is None:                # a leaf: nothing further back
                    continue
                for parent, g in zip(node._parents, node._backward(grads[id(node)])):
                    if parent.requires_grad:              # fan-out: contributions add up
                        grads[id(parent)] = grads.get(id(parent), 0) + g
            return {node.name: float(grads[id(node)]) for node in order}

        by_hand = reverse_mode(L)
        L.backward()
        print("every node's gradient:", {k: round(v, 4) for k, v in by_hand.items()})
        print(f"a.grad = {float(a.grad):.6f}   expected b + e^a = {-3 + np.exp(2):.6f}")
        print(f"b.grad = {float(b.grad):.6f}   expected a       = 2")
        '''),
        code('''
        def draw_graph(root, grads):
            """The graph left to right, each node with its value and dL/d(node)."""
            order = autograd._topological_order(root)
            depth = {}
            for node in order:  # longest distance from a leaf
                depth[id(node)] = 1 + max((depth[id(p)] for p in node._parents), default=-1)
            rows = {}
            pos = {}
            for node in order:
                col = depth[id(node)]
                rows[col] = rows.get(col, 0) + 1
                pos[id(node)] = (col, -rows[col])
            fig, ax = plt.subplots(figsize=(8.5, 3.2))
            for node in order:
                x, y = pos[id(node)]
                for p in node._parents:
                    px, py = pos[id(p)]
                    ax.annotate("", (x - 0.32, y), (px + 0.32, py),
                                arrowprops=dict(arrowstyle="->", color="gray"))
                ax.text(x, y, f"{node.name}\\nvalue {float(node.data):.3f}\\n"
                              f"dL/d· = {grads[node.name]:.3f}",
                        ha="center", va="center", fontsize=9,
                        bbox=dict(boxstyle="round", fc="lavender" if node._backward else "honeydew"))
            ax.set_xlim(-0.6, max(depth.values()) + 0.6)
            ax.set_ylim(-max(rows.values()) - 0.7, -0.3)
            ax.axis("off")
            ax.set_title("forward: values flow right; backward: gradients flow left")
            plt.show()

        draw_graph(L, by_hand)
        '''),
        md(r"""
        **Why backwards?** One backward pass costs a small multiple of one forward pass, and it
        gives the gradient with respect to *all* inputs at once. Finite differences would need
        two forward passes *per weight*. For one dense layer of a VAE:
        """),
        code('''
        rng = np.random.default_rng(0)
        x = tensor(rng.random((256, 784), dtype=np.float32))       # a batch of images
        W = tensor(rng.standard_normal((784, 512), dtype=np.float32) * 0.05, requires_grad=True)

        t0 = time.perf_counter()
        for _ in range(5):
            with no_grad():
                softplus(x @ W).mean()
        t_forward = (time.perf_counter() - t0) / 5
        t0 = time.perf_counter()
        for _ in range(5):
            W.grad = None
            softplus(x @ W).mean().backward()
        t_both = (time.perf_counter() - t0) / 5
        print(f"forward {t_forward * 1e3:.1f} ms, forward + backward {t_both * 1e3:.1f} ms "
              f"for all {W.size:,} gradients")
        print(f"finite differences: {2 * W.size:,} forward passes, about "
              f"{2 * W.size * t_forward / 3600:.1f} hours")
        '''),
        md(r"""
        ## 3. Broadcasting and `sum_to`

        NumPy broadcasting stretches arrays: $a$ of shape (3, 1) times $b$ of shape (4,) gives
        an output of shape (3, 4), $y_{ij} = a_i b_j$. Each $a_i$ was *used* four times, so its
        gradient sums the four paths:

        $$\bar{a}_i = \sum_j \bar{y}_{ij}\, b_j, \qquad \bar{b}_j = \sum_i \bar{y}_{ij}\, a_i .$$

        Every binary op therefore ends its backward with `sum_to(g, input.shape)`, which sums
        over the axes that broadcasting added (in front) or stretched (size 1).
        """),
        code('''
        a = tensor(np.array([[1.0], [2.0], [3.0]]), requires_grad=True)   # (3, 1)
        b = tensor(np.array([1.0, 10.0, 100.0, 1000.0]), requires_grad=True)  # (4,)
        y = a * b                                                         # (3, 4)
        y.backward(np.ones(y.shape, dtype=np.float32))                    # L = sum of y
        print("y.shape", y.shape)
        print("a.grad (sum_j b_j = 1111):", a.grad.ravel(), " shape", a.grad.shape)
        print("b.grad (sum_i a_i = 6):   ", b.grad, " shape", b.grad.shape)

        g = np.ones((2, 3, 4))
        print("\\nsum_to of a (2, 3, 4) gradient of ones:")
        for shape in [(3, 4), (3, 1), (4,), (1, 1)]:
            print(f"  to {str(shape):7s} ->", sum_to(g, shape).ravel())
        '''),
        md(r"""
        The most common case in the model: the bias of a dense layer, shape (units,), added to a
        batch of shape (B, units). Its gradient is the sum over the batch:
        """),
        code('''
        h = tensor(rng.standard_normal((5, 3)))
        bias = tensor(np.zeros(3), requires_grad=True)
        upstream = rng.standard_normal((5, 3)).astype(np.float32)
        (h + bias).backward(upstream)
        print("bias.grad      ", bias.grad)
        print("upstream summed", upstream.sum(axis=0))
        '''),
        md(r"""
        ## 4. Checking gradients

        A backward function is easy to get wrong and hard to spot by eye, so every op is checked
        against **central finite differences** (in float64):

        $$\frac{\partial f}{\partial x_j} \approx \frac{f(x + \epsilon e_j) - f(x - \epsilon e_j)}{2\epsilon},
        \qquad \text{error} \approx \underbrace{C_1\,\epsilon^2}_{\text{Taylor}} + \underbrace{C_2\,\delta/\epsilon}_{\text{rounding}}$$

        where $\delta$ is the machine precision. Too large an $\epsilon$ and the Taylor error
        dominates; too small and we divide rounding noise by $\epsilon$. The sweet spot is near
        $\delta^{1/3}$: about $10^{-5}$ in float64 but $10^{-2}$ in float32, where the best
        achievable error is poor, which is why gradient checks run in float64.
        """),
        code('''
        x0 = rng.standard_normal(6)
        f = lambda t: (softplus(t) * t).sum()          # any smooth scalar function
        xt = Tensor(x0.copy(), requires_grad=True)
        f(xt).backward()
        exact = xt.grad                                # float64 backward pass

        epsilons = np.logspace(-12, -0.5, 45)
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for dtype in (np.float64, np.float32):
            scalar = lambda arr: float(f(Tensor(arr)).data)
            errors = [np.abs(autograd.numerical_gradient(scalar, [x0.astype(dtype)], 0, eps) - exact).max()
                      for eps in epsilons]
            ax.loglog(epsilons, errors, "o-", ms=3, label=np.dtype(dtype).name)
        ax.set_xlabel(r"step $\\epsilon$"); ax.set_ylabel("max |finite difference - backward|")
        ax.set_title("Finite differences: Taylor error vs rounding error"); ax.grid(alpha=0.3); ax.legend()
        plt.show()
        '''),
        md(r"""
        `check_gradients(fn, *arrays)` does this for every input of `fn` and every entry,
        with a random weighting of the outputs so that all of them matter. It raises an
        `AssertionError` naming the input and entry that disagree, and otherwise returns the
        pairs (backward, finite differences).
        """),
        code('''
        x = rng.standard_normal((4, 3))
        w = rng.standard_normal((3, 2))
        bias = rng.standard_normal(2)
        pairs = check_gradients(lambda x, w, bias: sigmoid(x @ w + bias), x, w, bias)
        for name, (analytic, numeric) in zip(["x", "w", "bias"], pairs):
            print(f"{name:5s} shape {str(analytic.shape):7s} max |backward - finite diff| = "
                  f"{np.abs(analytic - numeric).max():.1e}")
        '''),
        md(r"""
        ### Adding an op

        A new op is a forward computation plus `record(output, parents, backward)`. Here is
        $\tanh$, with $\frac{d}{dx}\tanh x = 1 - \tanh^2 x$, and a version with a typical slip
        (the square forgotten). The check accepts the first and catches the second.
        """),
        code('''
        def tanh(x):
            """tanh(x);  d/dx = 1 - tanh(x)^2."""
            out = np.tanh(x.data)
            return record(out, (x,), lambda g: (g * (1 - out * out),))

        def tanh_with_a_bug(x):
            out = np.tanh(x.data)
            return record(out, (x,), lambda g: (g * (1 - out),))   # forgot the square

        x = rng.standard_normal(5)
        check_gradients(tanh, x)
        print("tanh: gradients agree")
        try:
            check_gradients(tanh_with_a_bug, x)
        except AssertionError as error:
            print("tanh_with_a_bug:", error)
        '''),
        md(r"""
        The library's big ops are checked the same way (that is what `tests/` does). Batch
        normalisation is the trickiest: every output row depends on every input row through
        the batch mean and variance,
        $\bar{x} = \frac{\gamma}{\sqrt{v+\epsilon}}\big(\bar{y} - \tfrac{1}{N}\sum \bar{y}
        - \hat{x}\,\tfrac{1}{N}\sum \bar{y}\,\hat{x}\big)$:
        """),
        code('''
        from layers import batch_norm
        x = rng.standard_normal((6, 3))
        gamma, beta = rng.uniform(0.5, 2, 3), rng.standard_normal(3)
        pairs = check_gradients(lambda x, gamma, beta: batch_norm(x, gamma, beta, 1e-4)[0], x, gamma, beta)
        print("batch_norm: x, gamma, beta agree; worst difference",
              f"{max(np.abs(a - n).max() for a, n in pairs):.1e}")
        '''),
        md(r"""
        ## 5. A training loop

        With gradients, training is a loop: forward, `backward()`, an optimiser step, and
        `zero_grad()` because gradients *accumulate* in `.grad`. Evaluation runs under
        `no_grad()`, which records no graph. Here a small network from
        [`layers.py`](../layers.py) fits a noisy sine; the LVAE's loop in notebook 3 (and in
        `train.py`) has exactly this shape.
        """),
        code('''
        from layers import MLP, Dense, Adam
        from autograd import square

        x_train = np.linspace(-3, 3, 64, dtype=np.float32)[:, None]
        y_train = np.sin(2 * x_train) + 0.1 * rng.standard_normal(x_train.shape).astype(np.float32)
        body = MLP(1, [32, 32], batch_norm=False, rng=np.random.default_rng(0))
        head = Dense(32, 1, rng=np.random.default_rng(1))
        optimizer = Adam(body.parameters() + head.parameters(), lr=1e-2)

        steps = 200 if QUICK else 1500
        for step in range(steps):
            loss = square(head(body(Tensor(x_train))) - Tensor(y_train)).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step % (steps // 5) == 0 or step == steps - 1:
                print(f"step {step:4d}: mean squared error {loss.item():.4f}")

        x_plot = np.linspace(-3.5, 3.5, 300, dtype=np.float32)[:, None]
        with no_grad():
            y_plot = head(body(Tensor(x_plot))).data
        fig, ax = plt.subplots(figsize=(6, 3))
        ax.plot(x_train, y_train, "k.", label="data")
        ax.plot(x_plot, y_plot, label=f"network after {steps} Adam steps")
        ax.legend(loc="lower left", fontsize=8); ax.grid(alpha=0.3)
        plt.show()
        '''),
        md(r"""
        ## Summary

        * An op = forward + a backward closure, recorded with `record`; the graph is the set of
          parent links.
        * `backward()` sorts the graph and runs the closures once each, from the loss back,
          adding up the contributions of every path; broadcast inputs get theirs through `sum_to`.
        * `check_gradients` compares any op with finite differences in float64.

        Next: [2 · Gaussians](02_gaussians.ipynb), the ops the VAE is built from.
        """),
    ]


# ====================================================================================
# 2. Gaussians
# ====================================================================================
def gaussians():
    return [
        md(r"""
        # 2 · Gaussians: sampling, merging, and the KL

        Every latent unit of the model is a Gaussian $\mathcal{N}(\mu, \sigma^2)$ (the library
        passes variances $\sigma^2$, not standard deviations). Four operations in
        [`gaussian.py`](../gaussian.py) do all the work:

        | op | what | used for |
        |---|---|---|
        | `reparameterize(mu, var, eps)` | $z = \mu + \sigma\,\epsilon$ | a sample we can differentiate |
        | `merge(mu_hat, var_hat, mu_p, var_p)` | product of two Gaussians | the LVAE's posterior |
        | `gaussian_kl(mu_q, var_q, mu_p, var_p)` | $\mathrm{KL}(q\,\Vert\,p)$ in closed form | the ELBO's KL terms |
        | `log_normal(z, mu, var)` | $\log \mathcal{N}(z;\mu,\sigma^2)$ | Monte Carlo KL, importance weights |

        *Learning path:* 1 · engine → **2 · Gaussians** → 3 · training an LVAE → 4 · the hierarchy.
        """),
        md(r"""
        **The model in one screen.** A VAE explains an image $x$ with hidden variables $z$. The
        *generative model* draws $z_L \sim \mathcal{N}(0, I)$, then each $z_i \sim p(z_i \mid z_{i+1})$
        (a Gaussian whose mean and variance a network computes from $z_{i+1}$), then
        $x \sim p(x \mid z_1)$. Since $p(z \mid x)$ cannot be computed, an *inference model*
        $q(z \mid x)$ (diagonal Gaussians from another network) approximates it, and training
        maximises the evidence lower bound
        $\mathrm{ELBO}(x) = \mathbb{E}_q[\log p(x \mid z_1)] - \sum_i \mathrm{KL}_i \le \log p(x)$.
        The *bottom-up VAE* samples $q(z_1 \mid x)$, then $q(z_2 \mid z_1)$, and so on upwards. The
        *Ladder VAE* first computes a Gaussian "likelihood term" for every layer bottom-up from
        $x$, then samples top-down and combines each term with the prior $p(z_i \mid z_{i+1})$.
        Notebook 3 builds all of this; this notebook covers the Gaussian operations it needs.
        """),
        code(SETUP),
        code(PLOTTING, '''
        from autograd import Tensor, tensor, check_gradients, concatenate
        from gaussian import merge, gaussian_kl, log_normal, reparameterize

        rng = np.random.default_rng(0)
        '''),
        md(r"""
        ## 1. The reparameterisation trick

        The ELBO contains expectations $\mathbb{E}_{q_\phi(z)}[f(z)]$ whose distribution
        depends on the parameters $\phi = (\mu, \sigma^2)$. A sample $z \sim q_\phi$ is not a
        differentiable function of $\phi$... unless we draw the randomness first:

        $$z = \mu + \sigma\,\epsilon,\quad \epsilon \sim \mathcal{N}(0, 1)
        \quad\Longrightarrow\quad
        \nabla_\phi\, \mathbb{E}_{q_\phi}[f(z)] = \mathbb{E}_{\epsilon}\big[\nabla_\phi f(\mu + \sigma\epsilon)\big].$$

        Now $z$ is an ordinary op with $\partial z/\partial\mu = 1$ and
        $\partial z/\partial \sigma^2 = \epsilon / (2\sigma)$. Test it on $f(z) = z^2$, where
        $\mathbb{E}[z^2] = \mu^2 + \sigma^2$, so the gradients are $2\mu$ and $1$.
        """),
        code('''
        S = 500 if QUICK else 200_000
        mu = tensor(1.5, requires_grad=True)
        var = tensor(0.5, requires_grad=True)
        eps = rng.standard_normal(S).astype(np.float32)
        z = reparameterize(mu, var, eps)           # S samples of N(1.5, 0.5)
        loss = (z * z).mean()                      # Monte Carlo estimate of E[z^2]
        loss.backward()
        print(f"E[z^2]     MC {loss.item():.4f}   exact {1.5 ** 2 + 0.5:.4f}")
        print(f"d/d mu     MC {float(mu.grad):.4f}   exact {2 * 1.5:.4f}")
        print(f"d/d sigma2 MC {float(var.grad):.4f}   exact 1")
        '''),
        md(r"""
        The alternative without the trick, the *score-function* (REINFORCE) estimator
        $\nabla_\mu \mathbb{E}[f] = \mathbb{E}\big[f(z)\,(z-\mu)/\sigma^2\big]$, is also
        unbiased, but one sample of it is far noisier. Noise in the gradient is what the trick
        buys down, and why VAEs train with a single sample per image.
        """),
        code('''
        zs = z.data.astype(np.float64)
        reparam = 2 * zs                                # d/dmu of z^2, one sample each
        score = zs ** 2 * (zs - 1.5) / 0.5              # score-function estimate, one sample each
        grid = np.linspace(-2, 5, 400)
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
        axes[0].hist(zs, bins=80, density=True, alpha=0.5, label=f"{S:,} samples z = mu + sigma eps")
        axes[0].plot(grid, np.exp(log_normal(Tensor(grid), 1.5, 0.5).data), "k", label="N(1.5, 0.5)")
        axes[0].set_title("samples of the reparameterised z"); axes[0].legend(fontsize=8, loc="upper left")
        bins = np.linspace(-20, 30, 120)
        axes[1].hist(reparam, bins=bins, density=True, alpha=0.6, label=f"reparameterised, std {reparam.std():.1f}")
        axes[1].hist(score, bins=bins, density=True, alpha=0.6, label=f"score function, std {score.std():.1f}")
        axes[1].axvline(3.0, color="k", ls="--", lw=1, label="true gradient 3")
        axes[1].set_title(r"one-sample estimates of $\\partial\\,\\mathbb{E}[z^2]/\\partial\\mu$")
        axes[1].legend(fontsize=8)
        plt.tight_layout(); plt.show()
        '''),
        md(r"""
        ## 2. The precision-weighted merge is a product of Gaussians

        In the Ladder VAE each stochastic layer $i$ gets two opinions about $z_i$:

        * a **likelihood term** $\mathcal{N}(\hat\mu_i, \hat\sigma_i^2)$ computed bottom-up from
          the image $x$ (the data's vote), and
        * the **prior** $p(z_i \mid z_{i+1}) = \mathcal{N}(\mu_{p,i}, \sigma^2_{p,i})$ from the
          generative model, top-down.

        The LVAE *defines* its approximate posterior $q(z_i \mid \cdot)$ as their product,
        renormalised (exact Bayes if the likelihood term were the true likelihood of $z_i$; it is
        a learnt stand-in). Multiply the densities and complete the
        square in the exponent: precisions ($1/\sigma^2$) add, and the mean is the
        precision-weighted average,

        $$\frac{1}{\sigma_q^2} = \frac{1}{\hat\sigma^2} + \frac{1}{\sigma_p^2},\qquad
        \mu_q = \Big(\frac{\hat\mu}{\hat\sigma^2} + \frac{\mu_p}{\sigma_p^2}\Big)\sigma_q^2 .$$

        The posterior leans towards whichever opinion is more certain, and it is always more
        certain than either. Below: the same prior $\mathcal{N}(0, 1)$ with a likelihood term at
        $\hat\mu = 2.5$ that is confident, as certain as the prior, or vague. The dashed line
        multiplies the two densities numerically and renormalises: it lies on `merge`'s result.
        """),
        code('''
        grid = np.linspace(-4, 6, 2001)
        def density(mu, var):
            return np.exp(log_normal(Tensor(grid), mu, var).data)

        mu_p, var_p = 0.0, 1.0
        fig, axes = plt.subplots(1, 3, figsize=(12, 3.2), sharey=True)
        for ax, var_hat in zip(axes, [0.25, 1.0, 4.0]):
            mu_q, var_q = merge(Tensor(np.array(2.5)), Tensor(np.array(var_hat)), mu_p, var_p)
            mu_q, var_q = float(mu_q.data), float(var_q.data)
            product = density(mu_p, var_p) * density(2.5, var_hat)
            product /= product.sum() * (grid[1] - grid[0])          # renormalise on the grid
            ax.plot(grid, density(mu_p, var_p), label=r"prior $p(z_i|z_{i+1})$ = N(0, 1)")
            ax.plot(grid, density(2.5, var_hat), label=rf"likelihood term N(2.5, {var_hat:g})")
            ax.plot(grid, density(mu_q, var_q), lw=2.5, label=rf"merge: N({mu_q:.2f}, {var_q:.2f})")
            ax.plot(grid, product, "k--", lw=1, label="product, renormalised")
            ax.set_title(f"precisions: {1 / var_hat:g} (data) + 1 (prior) = {1 / var_q:g}", fontsize=10)
            ax.legend(fontsize=7.5, loc="upper left")
        plt.tight_layout(); plt.show()
        '''),
        md(r"""
        ### In two dimensions

        A layer has many units; with diagonal Gaussians the merge acts on each unit separately.
        Left: the prior is sure about unit 1 and vague about unit 2, the data the other way
        round; the posterior takes the sure coordinate from each and is tighter than both.
        Right: a vague prior and a confident likelihood term: the data decides.
        (Contours at 1 and 2 standard deviations.)
        """),
        code('''
        u = np.linspace(-3, 4, 281)
        Z = np.stack(np.meshgrid(u, u), axis=-1)       # (281, 281, 2): a grid of 2-D points z
        def density2d(mu, var):
            """N(z; mu, diag(var)): the sum of the per-unit log-densities."""
            return np.exp(log_normal(Tensor(Z), Tensor(np.array(mu)), Tensor(np.array(var))).data.sum(-1))

        cases = [("complementary certainty", ([0.0, 0.0], [0.15, 3.0]), ([2.0, 1.5], [3.0, 0.15])),
                 ("vague prior, confident data", ([0.0, 0.0], [2.0, 2.0]), ([2.0, 1.5], [0.2, 0.3]))]
        fig, axes = plt.subplots(1, 2, figsize=(10, 4.6))
        for ax, (title, (mp, vp), (mh, vh)) in zip(axes, cases):
            mq, vq = merge(Tensor(np.array(mh)), Tensor(np.array(vh)), Tensor(np.array(mp)), Tensor(np.array(vp)))
            parts = [("prior", mp, vp, "tab:blue"), ("likelihood term", mh, vh, "tab:orange"),
                     ("merge (posterior)", mq.data, vq.data, "tab:green")]
            for label, m, v, colour in parts:
                dens = density2d(m, v)
                levels = dens.max() * np.exp(-0.5 * np.array([4.0, 1.0]))  # 2 and 1 std
                ax.contour(u, u, dens, levels=levels, colors=colour, linewidths=[1, 2])
                ax.plot(*m, "o", color=colour, label=label)
            product = density2d(mp, vp) * density2d(mh, vh)
            posterior = density2d(mq.data, vq.data)
            gap = np.abs(product / product.sum() - posterior / posterior.sum()).max()
            ax.set_title(f"{title}\\nposterior var {np.round(vq.data, 3)}; "
                         f"|product - merge| {gap:.0e}", fontsize=9)
            ax.set_xlabel("unit 1"); ax.set_ylabel("unit 2"); ax.set_aspect("equal"); ax.legend(fontsize=8)
        plt.tight_layout(); plt.show()
        '''),
        md(r"""
        `merge` is one autograd op with a hand-written backward pass (the derivatives are in the
        docstring of `gaussian.merge_backward`). As every op, it is checked against finite differences, both outputs at once:
        """),
        code('''
        def merged(mu_hat, var_hat, mu_p, var_p):
            mu_q, var_q = merge(mu_hat, var_hat, mu_p, var_p)
            return concatenate([mu_q, var_q])

        arrays = [rng.standard_normal(5), rng.uniform(0.1, 2, 5), rng.standard_normal(5), rng.uniform(0.1, 2, 5)]
        pairs = check_gradients(merged, *arrays)
        print("merge: gradients of mu_hat, var_hat, mu_p, var_p agree; worst difference",
              f"{max(np.abs(a - n).max() for a, n in pairs):.1e}")
        '''),
        md(r"""
        ## 3. The KL divergence: analytic vs Monte Carlo

        The ELBO subtracts $\mathrm{KL}(q\,\Vert\,p) = \mathbb{E}_{q}[\log q(z) - \log p(z)]$ for
        each layer. For two Gaussians the expectation has a closed form (per unit, summed over
        the units of a layer):

        $$\mathrm{KL}\big(\mathcal{N}(\mu_q,\sigma_q^2)\,\Vert\,\mathcal{N}(\mu_p,\sigma_p^2)\big)
        = \tfrac12\Big(\log\frac{\sigma_p^2}{\sigma_q^2} + \frac{\sigma_q^2 + (\mu_q-\mu_p)^2}{\sigma_p^2} - 1\Big).$$

        Without it we would average $\log q(z) - \log p(z)$ over samples $z \sim q$: unbiased,
        but noisy, with a standard deviation shrinking only like $1/\sqrt{S}$. A VAE trains
        with $S = 1$, and a single sample of the estimate can even be negative, though a KL
        never is.
        """),
        code('''
        mq, vq, mp, vp = 1.0, 0.5, 0.0, 2.0
        analytic = float(gaussian_kl(Tensor(np.array(mq)), vq, mp, vp).data)
        repeats = 50 if QUICK else 400
        sizes = np.unique(np.logspace(0, 2 if QUICK else 4, 13).astype(int))
        means, stds = [], []
        for n in sizes:
            z = mq + np.sqrt(vq) * rng.standard_normal((repeats, n))
            estimate = (log_normal(Tensor(z), mq, vq) - log_normal(Tensor(z), mp, vp)).data.mean(axis=1)
            means.append(estimate.mean()); stds.append(estimate.std())
        means, stds = np.array(means), np.array(stds)

        z1 = mq + np.sqrt(vq) * rng.standard_normal(100_000 if not QUICK else 1000)
        single = (log_normal(Tensor(z1), mq, vq) - log_normal(Tensor(z1), mp, vp)).data
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.4))
        axes[0].fill_between(sizes, means - stds, means + stds, alpha=0.3, label="MC mean ± 1 std")
        axes[0].semilogx(sizes, means, "o-", ms=3)
        axes[0].axhline(analytic, color="k", ls="--", label=f"analytic KL = {analytic:.4f}")
        axes[0].set_xlabel("samples S per estimate"); axes[0].set_ylabel("nats")
        axes[0].set_title(f"KL(N(1, 0.5) || N(0, 2)): Monte Carlo over {repeats} repeats"); axes[0].legend()
        axes[1].hist(single, bins=100, density=True)
        axes[1].axvline(analytic, color="k", ls="--")
        axes[1].set_title(f"one-sample estimates: std {single.std():.2f}, "
                          f"{(single < 0).mean():.0%} negative", fontsize=10)
        plt.tight_layout(); plt.show()
        print(f"analytic {analytic:.4f};  MC with S={sizes[-1]}: {means[-1]:.4f} ± {stds[-1]:.4f}")
        '''),
        md(r"""
        ## 4. Why the bottom-up VAE's lower KLs cannot be analytic

        The analytic formula needs $q$ and $p$ to be two *fixed* Gaussians. Take two layers.

        **Bottom-up VAE.** Sample $z_1 \sim q(z_1\mid x)$, *then* $z_2 \sim q(z_2\mid z_1)$. The
        KL term of layer 1 is
        $\mathbb{E}_{q(z_1|x)\,q(z_2|z_1)}\big[\log q(z_1\mid x) - \log p(z_1\mid z_2)\big]$, and the
        prior $p(z_1\mid z_2)$ is computed from a $z_2$ that was itself drawn *from* $z_1$. Taking
        "the analytic KL between $q(z_1|x)$ and $p(z_1|z_2)$" for the drawn $z_2$ pretends that
        $z_2$ does not depend on $z_1$, and gives the wrong expectation. So the VAE must use the
        one-sample estimate $\log q(z_1|x) - \log p(z_1|z_2)$ (`lvae.py` does).

        **LVAE.** The order is reversed: $z_2$ is drawn first, then
        $q(z_1\mid x, z_2) = \mathrm{merge}\big(\mathcal{N}(\hat\mu_1,\hat\sigma_1^2),\, p(z_1\mid z_2)\big)$.
        Given $z_2$, both $q$ and $p$ of layer 1 are fixed Gaussians, and
        $\mathbb{E}_{z_2}\big[\mathrm{KL}(q(z_1|x,z_2)\,\Vert\,p(z_1|z_2))\big]$ is exact with the
        analytic KL inside.

        A linear toy shows the size of the mistake. Let $q(z_1|x) = \mathcal{N}(m, s^2)$,
        $q(z_2|z_1) = \mathcal{N}(a z_1, t^2)$ and $p(z_1|z_2) = \mathcal{N}(b z_2, u^2)$. Working
        out $\mathbb{E}[(z_1 - b z_2)^2]$ both ways, the plug-in "analytic" value is off by exactly
        $ab\,s^2/u^2$: correct only when the layers do not talk to each other ($ab = 0$).
        """),
        code('''
        m, s2, t2, u2, b = 0.5, 0.4, 0.2, 0.5, 1.0
        S = 2000 if QUICK else 200_000
        couplings = np.linspace(-1.5, 1.5, 13)

        def exact_term(a):
            """E[log q(z1|x) - log p(z1|z2)] in closed form for the linear toy."""
            second_moment = (1 - a * b) ** 2 * (m ** 2 + s2) + b ** 2 * t2   # E[(z1 - b z2)^2]
            return 0.5 * (np.log(u2 / s2) - 1 + second_moment / u2)

        honest, plug_in = [], []
        for a in couplings:
            z1 = m + np.sqrt(s2) * rng.standard_normal(S)            # z1 ~ q(z1 | x)
            z2 = a * z1 + np.sqrt(t2) * rng.standard_normal(S)       # z2 ~ q(z2 | z1): drawn from z1
            z1t, mu_p = Tensor(z1), Tensor(b * z2)
            honest.append((log_normal(z1t, m, s2) - log_normal(z1t, mu_p, u2)).data.mean())
            plug_in.append(gaussian_kl(m, s2, mu_p, u2).data.mean())  # treats p(z1|z2) as fixed: wrong

        fig, ax = plt.subplots(figsize=(6.5, 3.8))
        ax.plot(couplings, [exact_term(a) for a in couplings], "k-", label="exact expectation")
        ax.plot(couplings, honest, "o", label="mean of log q - log p (the VAE's estimate)")
        ax.plot(couplings, plug_in, "s", mfc="none", label="analytic KL at the drawn z2 (wrong)")
        ax.plot(couplings, [exact_term(a) + a * b * s2 / u2 for a in couplings], ":", color="gray",
                label=r"exact + $ab\\,s^2/u^2$")
        ax.set_xlabel("coupling a of q(z2 | z1)"); ax.set_ylabel("KL term of layer 1 (nats)")
        ax.set_title("Bottom-up VAE: the lower KL is not an analytic KL"); ax.legend(fontsize=8)
        ax.grid(alpha=0.3); plt.show()
        '''),
        md(r"""
        And in the LVAE's order the analytic KL and the Monte Carlo average agree, because
        $z_1$ is drawn after $z_2$ from a Gaussian fixed by it:
        """),
        code('''
        mu_hat1, var_hat1, mu_hat2, var_hat2 = 0.8, 0.3, -0.4, 0.6      # bottom-up likelihood terms
        z2 = mu_hat2 + np.sqrt(var_hat2) * rng.standard_normal(S)       # z2 ~ q(z2 | x): drawn first
        mu_p, var_p = Tensor(b * z2), u2                                 # p(z1 | z2)
        mu_q, var_q = merge(mu_hat1, var_hat1, mu_p, var_p)             # q(z1 | x, z2)
        z1 = reparameterize(mu_q, var_q, rng.standard_normal(S))
        mc = (log_normal(z1, mu_q, var_q) - log_normal(z1, mu_p, var_p)).data
        analytic = gaussian_kl(mu_q, var_q, mu_p, var_p).data
        print(f"LVAE order: Monte Carlo {mc.mean():.4f} ± {mc.std() / np.sqrt(S):.4f}, "
              f"analytic {analytic.mean():.4f}")
        print(f"spread of the per-sample values: Monte Carlo std {mc.std():.3f}, analytic std {analytic.std():.3f}")
        '''),
        md(r"""
        The analytic term still varies with $z_2$, but it removes the noise of $z_1$: one reason
        the LVAE's gradients are less noisy than the VAE's.

        Note also that the exact curve above dips below zero: in the bottom-up VAE the term of one
        layer, $\mathbb{E}[\log q(z_1|x) - \log p(z_1|z_2)]$, is not a KL divergence by itself
        and can be negative. Only the sum over all layers,
        $\mathrm{KL}\big(q(z_1,z_2|x)\,\Vert\,p(z_1,z_2)\big)$, is a KL and is never negative.
        So "KL per layer" of a bottom-up VAE is a bookkeeping split of the total, not $L$ separate KLs.

        ## Summary

        * `reparameterize` makes a sample differentiable: $z = \mu + \sigma\epsilon$.
        * `merge` multiplies the bottom-up likelihood term and the top-down prior; precisions add.
        * `gaussian_kl` is exact and noise-free; `log_normal` gives the Monte Carlo version.
        * The bottom-up VAE can use the analytic KL only for its top layer; the LVAE for all.

        Next: [3 · training an LVAE](03_training_an_lvae.ipynb).
        """),
    ]


# The training loop of notebooks 3 and 4: train.py's loop, shortened (no checkpoints).
TRAIN_LOOP = '''
def test_elbo(net, x, noise):
    """Mean ELBO (beta = 1) of the rows of x, in evaluation mode, without gradients."""
    net.eval()
    with no_grad():
        _, terms = lvae.elbo(net, x, noise)
    net.train()
    return float(terms["elbo"])

def train(net, epochs, warmup, seed=0):
    """Adam on the warm-up objective E[log p(x|z)] - beta * KL, beta rising 0 -> 1 over `warmup` epochs.
    Returns (steps, history): per-step beta/ELBO/KL per layer, and per-epoch records for plots.py."""
    optimizer = Adam(net.parameters(), lr=LR)
    noise, data_rng = lvae.Noise(seed + 1), np.random.default_rng(seed + 2)
    steps, history = [], []
    for epoch in range(epochs):
        beta = 1.0 if warmup <= 0 else min(1.0, epoch / warmup)
        t0, first = time.perf_counter(), len(steps)
        for batch in data.iterate_minibatches(train_x, BATCH, data_rng):  # fresh binarisation
            noise.new_step()
            objective, terms = lvae.elbo(net, batch, noise, beta)
            optimizer.zero_grad()
            (-objective).backward()
            optimizer.step()
            steps.append({"beta": beta, "elbo": float(terms["elbo"]), "kl": [float(k) for k in terms["kl"]]})
        epoch_steps = steps[first:]
        record = {"epoch": epoch + 1, "beta": beta,
                  "train_elbo": float(np.mean([s["elbo"] for s in epoch_steps])),
                  "kl": np.mean([s["kl"] for s in epoch_steps], axis=0).tolist(),
                  "test_elbo": test_elbo(net, test_x, noise), "seconds": time.perf_counter() - t0}
        history.append(record)
        print(f"epoch {epoch + 1}: beta {beta:.2f}, train ELBO {record['train_elbo']:7.2f}, "
              f"test ELBO {record['test_elbo']:7.2f}, KL per layer (z1..z{net.n_layers}) "
              + " ".join(f"{k:5.2f}" for k in record["kl"]) + f"  ({record['seconds']:.0f} s)")
    return steps, history
'''


# ====================================================================================
# 3. Training an LVAE
# ====================================================================================
def training():
    return [
        md(r"""
        # 3 · Training a Ladder VAE on MNIST

        We take the model of [`lvae.py`](../lvae.py) apart, push one batch through it by hand,
        then train it for a few epochs exactly as [`train.py`](../train.py) does, and look at
        learning curves, samples, reconstructions, and what the KL warm-up does.

        The committed outputs come from a real run of this notebook: the paper's 5-layer
        architecture trained for a few epochs on a 2-core CPU (minutes, not the paper's 2000
        epochs, so expect a test ELBO around $-100$ nats rather than $-85$).

        *Learning path:* 1 · engine → 2 · Gaussians → **3 · training an LVAE** → 4 · the hierarchy.
        """),
        code(SETUP),
        code(PLOTTING, '''
        import data, lvae
        from autograd import Tensor, no_grad, bernoulli_log_prob
        from gaussian import merge, gaussian_kl, reparameterize
        from layers import Adam, recompute_batchnorm_statistics
        '''),
        code('''
        # Sizes: the committed run (a few minutes on 2 CPU cores) or tiny ones (LVAE_NOTEBOOK_QUICK=1)
        Z_DIMS = (64, 32, 16, 8, 4)           # the paper's stochastic layers, bottom (z1) to top (z5)
        HIDDEN = (512, 256, 128, 64, 32)      # width of each layer's deterministic block
        N_TRAIN = 500 if QUICK else 60_000    # training images
        EPOCHS = 1 if QUICK else 6            # the paper: up to 2000
        WARMUP = 1 if QUICK else 3            # epochs for beta to rise from 0 to 1 (the paper: 200)
        BATCH, LR = 256, 2e-3                 # the paper's batch size and learning rate
        N_TEST = 200 if QUICK else 2000       # test images for the evaluations
        LK_SAMPLES = 10 if QUICK else 100     # K of the importance-weighted bound L_K
        print(f"{'QUICK' if QUICK else 'full'} run: {N_TRAIN} training images, {EPOCHS} epochs, warm-up {WARMUP}")
        '''),
        md(r"""
        ## 1. Data: dynamically binarised MNIST

        The model's likelihood $p(x\mid z_1)$ is a product of Bernoullis, one per pixel, so it
        sees **binary** images. The grey level of a pixel is used as the probability of a 1, and
        every epoch draws a *fresh* binary image (`iterate_minibatches`): a regulariser, since the
        model never sees the same binary digit twice. The test set is binarised once, with a
        fixed seed, so that all evaluations use the same images.
        """),
        code('''
        ds = data.load_mnist()
        train_x = ds.train_x[:N_TRAIN]
        test_x = data.binarized_test_set(ds.test_x)[:N_TEST]
        print("train", train_x.shape, "test", test_x.shape, "grey levels in", (train_x.min(), train_x.max()))

        rng = np.random.default_rng(0)
        digit = ds.train_x[:1]
        draws = [data.binarize(digit, rng) for _ in range(5)]
        fig, axes = plt.subplots(1, 6, figsize=(9, 1.8))
        for ax, image, title in zip(axes, [digit] + draws, ["grey levels"] + [f"epoch {i + 1}" for i in range(5)]):
            ax.imshow(image.reshape(28, 28), cmap="gray", vmin=0, vmax=1); ax.set_title(title, fontsize=9); ax.axis("off")
        plt.show()
        '''),
        md(r"""
        ## 2. The model, piece by piece

        With $L = 5$ stochastic layers $z_1$ (64 units) ... $z_5$ (4 units):

        * **Generative model** (top-down): $p(z_5) = \mathcal{N}(0, I)$,
          $p(z_i \mid z_{i+1}) = \mathcal{N}(\mu_{p,i}, \sigma^2_{p,i})$ from an MLP of $z_{i+1}$
          and a Gaussian head (`prior_blocks`, `prior_heads`), and
          $p(x \mid z_1) = \mathrm{Bernoulli}(\mathrm{sigmoid}(\text{logits}))$ (`decoder`, `output`).
        * **Inference, bottom-up** (deterministic): $d_1 = \mathrm{MLP}(x)$,
          $d_i = \mathrm{MLP}(d_{i-1})$, each with a Gaussian head giving the likelihood term
          $(\hat\mu_i, \hat\sigma^2_i)$ (`up_blocks`, `up_heads`).
        * **Inference, top-down** (stochastic): $q(z_5\mid x) = \mathcal{N}(\hat\mu_5, \hat\sigma^2_5)$,
          then for $i = 4, \dots, 1$: sample $z_{i+1}$, compute the prior $p(z_i\mid z_{i+1})$ with
          the *generative* network, and merge it with the likelihood term (notebook 2):
          $q(z_i\mid\cdot) = \mathrm{merge}\big((\hat\mu_i,\hat\sigma_i^2), (\mu_{p,i},\sigma^2_{p,i})\big)$.

        The top-down pass of inference *is* the generative model: its parameters are shared.
        Every dense layer except the output has batch normalisation; activations are leaky ReLU;
        variances are $\mathrm{softplus}(\cdot) + 10^{-8}$.
        """),
        code('''
        net = lvae.LadderVAE(z_dims=Z_DIMS, hidden=HIDDEN, seed=0)
        count = lambda modules: sum(p.size for m in modules for p in m.parameters())
        parts = [("bottom-up blocks   d_i = MLP(d_i-1)", net.up_blocks),
                 ("bottom-up heads    (mu_hat_i, var_hat_i)", net.up_heads),
                 ("top-down blocks    of p(z_i | z_i+1)", net.prior_blocks),
                 ("top-down heads     (mu_p_i, var_p_i)", net.prior_heads),
                 ("decoder            p(x | z_1)", [net.decoder, net.output])]
        for name, modules in parts:
            print(f"{name:42s} {count(modules):>9,} parameters")
        print(f"{'total':42s} {count([net]):>9,}")
        '''),
        md(r"""
        ### One batch by hand

        Here is `LadderVAE.infer` written out with the ops of notebooks 1 and 2, on 8 images.
        Each sample has a leading axis of size $K$ (posterior samples per image; here $K=1$).
        With the same random numbers it must give exactly what `net(x, noise)` gives.
        """),
        code('''
        x = next(data.iterate_minibatches(train_x, 8, np.random.default_rng(1)))
        noise = lvae.Noise(42)
        top = net.n_layers - 1
        with no_grad():
            # bottom-up: a likelihood term (mu_hat_i, var_hat_i) for every layer
            h, up = Tensor(x), []
            for block, head in zip(net.up_blocks, net.up_heads):
                h = block(h)
                up.append(head(h))
            # top-down: the top layer's posterior is its likelihood term; prior N(0, I)
            mu_q, var_q = up[top]
            z = reparameterize(mu_q, var_q, noise.normal((1,) + mu_q.shape, like=mu_q.data))
            kl = {top: gaussian_kl(mu_q, var_q).sum(axis=-1)}
            for i in range(top - 1, -1, -1):
                mu_p, var_p = net.prior(i, z)                      # p(z_i | z_i+1), generative network
                mu_q, var_q = merge(up[i][0], up[i][1], mu_p, var_p)
                z = reparameterize(mu_q, var_q, noise.normal(mu_q.shape, like=mu_q.data))
                kl[i] = gaussian_kl(mu_q, var_q, mu_p, var_p).sum(axis=-1)   # analytic, given z_i+1
            logits = net.decode(z)                                 # p(x | z_1)
            log_px = bernoulli_log_prob(logits, Tensor(np.broadcast_to(x, logits.shape))).sum(axis=-1)

            log_px_lib, results = net(x, lvae.Noise(42))           # the library, same random numbers
        for i in range(net.n_layers):
            print(f"z{i + 1}: {Z_DIMS[i]:2d} units, sample shape {results.z[i].shape}, KL by hand "
                  f"{kl[i].data.mean():7.3f}, library {results.kl[i].data.mean():7.3f}")
        print(f"log p(x|z1): by hand {log_px.data.mean():.3f}, library {log_px_lib.data.mean():.3f}")
        print("largest difference:", max(np.abs(log_px.data - log_px_lib.data).max(),
                                         *(np.abs(kl[i].data - results.kl[i].data).max() for i in range(net.n_layers))))
        '''),
        md(r"""
        ## 3. The objective and warm-up

        The evidence lower bound, per image,

        $$\mathrm{ELBO}(x) = \mathbb{E}_q\big[\log p(x\mid z_1)\big] - \sum_{i=1}^{L} \mathrm{KL}_i
        \;\le\; \log p(x),$$

        is a reconstruction term minus what it costs to encode $x$ in each layer. Early in
        training the cheapest way to raise it is often to switch latent units *off*: set
        $q(z_i|\cdot) = p(z_i|z_{i+1})$ so that $\mathrm{KL}_i = 0$, before the decoder has learnt
        to use them. **Deterministic warm-up** trains on

        $$\mathbb{E}_q\big[\log p(x\mid z_1)\big] - \beta \sum_i \mathrm{KL}_i,\qquad
        \beta = \min\big(1,\ (\text{epoch} - 1)/N_t\big),$$

        with epochs numbered from 1 as printed below and $\beta$ constant within an epoch: the
        first epoch trains with $\beta = 0$, no KL penalty at all. Units are free at first and
        become costly gradually. `lvae.elbo(net, x, noise, beta)`
        returns this objective (a Tensor to maximise) and the terms at $\beta = 1$. The loop
        below is `train.py`'s, without the checkpoints.
        """),
        code(TRAIN_LOOP),
        code('''
        t_start = time.perf_counter()
        steps_wu, history_wu = train(net, EPOCHS, WARMUP)
        print(f"trained in {time.perf_counter() - t_start:.0f} s")
        '''),
        md(r"""
        ### Learning curves

        Train ELBO is averaged over each epoch's batches (with the epoch's $\beta$ in the KL
        weight of the *objective*, but reported at $\beta = 1$); test ELBO is measured at the end
        of each epoch in evaluation mode. The figures come from [`plots.py`](../plots.py).

        Test is *above* train here, and that is not a bug: the train ELBO averages the whole
        epoch, during which the model was still improving, and is computed with training-mode
        batch norm on freshly binarised images, while the test ELBO uses the end-of-epoch
        weights in evaluation mode.
        """),
        code('''
        show(plots.learning_curves(history_wu, FIGURES / "learning_curves.png"))
        show(plots.kl_per_layer(history_wu, FIGURES / "kl_per_layer.png", units=list(Z_DIMS)))
        '''),
        md(r"""
        ## 4. Samples and reconstructions

        The paper evaluates with batch-norm statistics collected over the training set, not with
        the moving averages of training; `recompute_batchnorm_statistics` does that. Then
        `sample_prior` runs the generative model alone: $z_5 \sim \mathcal{N}(0, I)$, each
        $z_i \sim p(z_i \mid z_{i+1})$, and the Bernoulli means of $p(x\mid z_1)$.
        `reconstruct` encodes a test image, samples $z$ from $q(z\mid x)$ and decodes it.
        """),
        code('''
        eval_noise = lvae.Noise(7)
        recompute_batchnorm_statistics(net, data.iterate_minibatches(train_x, 1000, np.random.default_rng(3)),
                                       lambda batch: lvae.elbo(net, batch, eval_noise))
        show(plots.image_grid(lvae.sample_prior(net, 100, eval_noise), FIGURES / "samples.png",
                              title=f"LVAE samples after {EPOCHS} epochs"))
        show(plots.reconstructions(test_x[:12], lvae.reconstruct(net, test_x[:12], eval_noise),
                                   FIGURES / "reconstructions.png", n=12))
        '''),
        md(r"""
        ### How good is it? ELBO and the importance-weighted bound

        The ELBO is a bound; the importance-weighted bound
        $L_K = \mathbb{E}\big[\log \frac1K \sum_k p(x, z^k)/q(z^k\mid x)\big]$ with $K$ posterior
        samples is tighter and approaches $\log p(x)$ as $K$ grows (the paper reports $L_{5000}$).
        Below, $L_K$ is computed on the first 500 test images (it costs $K$ passes per image),
        and the ELBO on the same images, so that their difference is the bound's tightness
        alone (test images differ in difficulty: the ELBO over all the test images loaded above
        is printed too). Both are Monte Carlo estimates: other noise would move them by a few
        tenths of a nat.
        """),
        code('''
        n_lk = min(500, N_TEST)
        elbo_all = test_elbo(net, test_x, eval_noise)
        elbo_same = test_elbo(net, test_x[:n_lk], eval_noise)
        t0 = time.perf_counter()
        lk = lvae.log_likelihood_bound(net, test_x[:n_lk], samples=LK_SAMPLES, noise=eval_noise)
        print(f"test ELBO {elbo_all:.2f} nats ({len(test_x)} images)")
        print(f"test ELBO {elbo_same:.2f} nats (the first {n_lk} images)")
        print(f"test L_{LK_SAMPLES} {lk.mean():.2f} nats (the same {n_lk} images, "
              f"{time.perf_counter() - t0:.0f} s): {lk.mean() - elbo_same:.2f} nats above their ELBO")
        print("(the paper's L_5000 after 2000 epochs: about -82 nats; this code's run of the full "
              "recipe: L_5000 -81.25, test ELBO -84.44; we trained for minutes)")
        '''),
        md(r"""
        ## 5. What warm-up does to the KL

        Train the same model from the same initial weights and the same data stream, but with
        $\beta = 1$ from the first step, and compare the KL of each layer step by step.
        """),
        code('''
        net_nowu = lvae.LadderVAE(z_dims=Z_DIMS, hidden=HIDDEN, seed=0)
        steps_nowu, history_nowu = train(net_nowu, EPOCHS, warmup=0)
        '''),
        code('''
        def smooth(values, width=20):
            values = np.asarray(values, dtype=float)
            width = max(1, min(width, len(values) // 5))
            kernel = np.ones(width) / width
            return np.array([np.convolve(v, kernel, mode="valid") for v in values.T]).T

        fig, axes = plt.subplots(1, 2, figsize=(12, 3.8), sharey=True)
        for ax, (title, steps) in zip(axes, [(f"with warm-up over {WARMUP} epochs", steps_wu),
                                             ("without warm-up (beta = 1)", steps_nowu)]):
            kl = smooth([s["kl"] for s in steps])
            for i in range(kl.shape[1]):
                ax.plot(kl[:, i], label=f"z{i + 1} ({Z_DIMS[i]} units)")
            ax.set_yscale("symlog", linthresh=0.1); ax.set_xlabel("training step"); ax.set_title(title)
            ax.grid(alpha=0.3)
            twin = ax.twinx()
            twin.plot([s["beta"] for s in steps], "k--", lw=1); twin.set_ylim(0, 1.05)
            twin.set_ylabel("beta (dashed)")
        axes[0].set_ylabel("KL per layer (nats, symlog)")
        fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=5, fontsize=9,
                   bbox_to_anchor=(0.5, -0.06))
        plt.tight_layout(); plt.show()

        eval_nowu = lvae.Noise(7)
        recompute_batchnorm_statistics(net_nowu, data.iterate_minibatches(train_x, 1000, np.random.default_rng(3)),
                                       lambda batch: lvae.elbo(net_nowu, batch, eval_nowu))
        for name, model, noise_ in [("warm-up   ", net, lvae.Noise(8)), ("no warm-up", net_nowu, lvae.Noise(8))]:
            kl_units = lvae.kl_per_unit(model, test_x, noise_)
            _, active = lvae.active_units(model, test_x, noise_)
            print(f"{name}: test ELBO {test_elbo(model, test_x, noise_):7.2f}, KL per layer "
                  + " ".join(f"{k.sum():5.2f}" for k in kl_units) + f", active units {active}")
        '''),
        md(r"""
        With warm-up, $\beta = 0$ during the whole first epoch: encoding costs nothing, and the
        KL of the lower layers **grows** (z1 from about 30 to 50 nats) while z5's stays near its
        initial 2.5. As soon as $\beta > 0$ the KLs are squeezed, more and more as
        $\beta \to 1$; without warm-up the KL is held down from the first step. After a few
        epochs the two runs differ by a few nats per layer at most, and in a run this short
        warm-up need not give the better ELBO: its purpose is the long run, keeping units
        alive until the decoder has learnt to use them (the paper warms up for 200 epochs).
        A unit counts as *active* (Burda et al.) when its posterior mean varies across images:
        $\mathrm{Var}_x(\mathbb{E}_q[z_u \mid x]) > 0.01$. After a few epochs nearly every unit
        passes this test in both runs, for a reason notebook 4 explains (batch norm on the
        means); the KL per unit says more. The per-unit picture of the warm-up run:
        """),
        code('''
        noise_ = lvae.Noise(9)
        activity, active = lvae.active_units(net, test_x, noise_)
        show(plots.kl_per_unit(lvae.kl_per_unit(net, test_x, noise_), FIGURES / "kl_per_unit.png", activity=activity))
        '''),
        md(r"""
        ## Summary

        * The LVAE = a deterministic bottom-up pass + a stochastic top-down pass that shares the
          generative model and merges the two at every layer.
        * Training is the loop of notebook 1 on `lvae.elbo`, with dynamic binarisation and warm-up.
        * `sample_prior`, `reconstruct`, `log_likelihood_bound`, `kl_per_unit` and
          `active_units` are the evaluation tools; `train.py` runs all of this from the command line.

        Next: [4 · the hierarchy](04_the_hierarchy.ipynb): VAE vs LVAE, layer by layer.
        """),
    ]


# ====================================================================================
# 4. The hierarchy
# ====================================================================================
def hierarchy():
    return [
        md(r"""
        # 4 · The hierarchy: bottom-up VAE vs Ladder VAE

        The paper's central claim is about *depth*: in a bottom-up hierarchical VAE the upper
        stochastic layers tend to **collapse** (their KL goes to zero, their units carry no
        information about $x$), while the LVAE, whose inference runs top-down through the
        generative model, keeps units active in all layers. We train both models with the
        same recipe (batch norm + warm-up), architecture, initial seed and data stream, and
        measure, layer by layer:

        * the **KL** per layer and per unit (how many nats each layer encodes),
        * the **active units** (Burda et al.): unit $u$ is active when
          $A_u = \mathrm{Cov}_x\big(\mathbb{E}_{q}[z_u\mid x]\big) > 0.01$,
        * a **PCA** of each layer's codes, and **samples** that vary one layer at a time.

        The paper's result comes from 2000 epochs. Here we can afford a few epochs per model on
        a 2-core CPU; we say below what shows at this size and what does not.

        *Learning path:* 1 · engine → 2 · Gaussians → 3 · training an LVAE → **4 · the hierarchy**.
        """),
        code(SETUP),
        code(PLOTTING, '''
        import data, lvae
        from autograd import Tensor, no_grad, sigmoid_array, to_numpy
        from gaussian import reparameterize
        from layers import Adam, recompute_batchnorm_statistics, BatchNorm
        '''),
        code('''
        # Sizes: the committed run (a few minutes on 2 CPU cores) or tiny ones (LVAE_NOTEBOOK_QUICK=1)
        Z_DIMS = (64, 32, 16, 8, 4)           # the paper's stochastic layers, bottom (z1) to top (z5)
        HIDDEN = (512, 256, 128, 64, 32)      # width of each layer's deterministic block
        N_TRAIN = 500 if QUICK else 60_000
        EPOCHS = 1 if QUICK else 8            # per model (the paper: 2000)
        WARMUP = 1 if QUICK else 4            # (the paper: 200)
        BATCH, LR = 256, 2e-3
        N_TEST = 200 if QUICK else 2000       # test images for KL, active units, ELBO
        N_PCA = 100 if QUICK else 1000        # test images in the PCA plots
        LK_SAMPLES = 10 if QUICK else 100
        print(f"{'QUICK' if QUICK else 'full'} run: {N_TRAIN} training images, {EPOCHS} epochs per model, warm-up {WARMUP}")

        ds = data.load_mnist()
        train_x = ds.train_x[:N_TRAIN]
        test_x = data.binarized_test_set(ds.test_x)[:N_TEST]
        test_y = ds.test_y[:N_TEST]
        '''),
        md(r"""
        ## 1. Two inference models for one generative model

        Both models share the generative model $p(x|z_1)\,p(z_1|z_2)\cdots p(z_L)$. They differ
        in $q$:

        * **VAE** (bottom-up): $q(z_1|x)\,q(z_2|z_1)\cdots q(z_L|z_{L-1})$. Each layer sees only the
          sample below it. As notebook 2 showed, only the top layer's KL is analytic; the others
          use the one-sample estimate $\log q(z_i|z_{i-1}) - \log p(z_i|z_{i+1})$.
        * **LVAE**: a deterministic bottom-up pass, then top-down sampling in which each layer
          merges the data's likelihood term with the prior $p(z_i|z_{i+1})$. All KLs are analytic.

        Same training loop as notebook 3:
        """),
        code(TRAIN_LOOP),
        code('''
        models, runs = {}, {}
        for kind in ("vae", "lvae"):
            print(f"--- {kind.upper()}")
            t0 = time.perf_counter()
            models[kind] = lvae.build_model(kind, z_dims=Z_DIMS, hidden=HIDDEN, seed=0)
            runs[kind] = train(models[kind], EPOCHS, WARMUP)
            print(f"{kind.upper()} trained in {time.perf_counter() - t0:.0f} s")
        '''),
        md(r"""
        ## 2. KL per layer during training

        (For the VAE the lower layers' "KL" is the one-sample estimate of
        $\mathbb{E}[\log q(z_i|z_{i-1}) - \log p(z_i|z_{i+1})]$, averaged over the epoch.)
        """),
        code('''
        for kind in ("vae", "lvae"):
            path = plots.kl_per_layer(runs[kind][1], FIGURES / f"kl_per_layer_{kind}.png", units=list(Z_DIMS))
            print(kind.upper()); show(path)
        '''),
        md(r"""
        ## 3. After training: ELBO, $L_K$, KL per unit, active units

        As in the paper, batch-norm statistics are first recomputed over the training set.
        """),
        code('''
        results = {}
        for kind, net in models.items():
            noise = lvae.Noise(7)
            recompute_batchnorm_statistics(net, data.iterate_minibatches(train_x, 1000, np.random.default_rng(3)),
                                           lambda batch: lvae.elbo(net, batch, noise))
            kl_units = lvae.kl_per_unit(net, test_x, noise)
            activity, active = lvae.active_units(net, test_x, noise)
            lk = lvae.log_likelihood_bound(net, test_x[:min(500, N_TEST)], samples=LK_SAMPLES, noise=noise)
            results[kind] = dict(kl_units=kl_units, activity=activity, active=active,
                                 elbo=test_elbo(net, test_x, noise), lk=float(lk.mean()))

        for r in results.values():  # units whose KL, averaged over x, is above 0.01 nats
            r["informative"] = [int((k > 0.01).sum()) for k in r["kl_units"]]

        print(f"{'':6s}{'test ELBO':>10s}{f'L_{LK_SAMPLES}':>9s}   {'':18s}" + "".join(f"{f'z{i + 1}':>7s}" for i in range(len(Z_DIMS))))
        for kind, r in results.items():
            print(f"{kind.upper():6s}{r['elbo']:10.2f}{r['lk']:9.2f}   KL (nats)         " + "".join(f"{k.sum():7.2f}" for k in r["kl_units"]))
            print(f"{'':28s}active units      " + "".join(f"{f'{a}/{n}':>7s}" for a, n in zip(r["active"], Z_DIMS)))
            print(f"{'':28s}units KL > 0.01   " + "".join(f"{f'{a}/{n}':>7s}" for a, n in zip(r["informative"], Z_DIMS)))
        '''),
        code('''
        for kind, r in results.items():
            print(kind.upper())
            show(plots.kl_per_unit(r["kl_units"], FIGURES / f"kl_per_unit_{kind}.png", activity=r["activity"]))
        '''),
        code('''
        layers_ = np.arange(len(Z_DIMS))
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
        for shift, (kind, r) in zip((-0.2, 0.2), results.items()):
            axes[0].bar(layers_ + shift, [k.sum() for k in r["kl_units"]], width=0.4, label=kind.upper())
            axes[1].bar(layers_ + shift, np.array(r["active"]) / np.array(Z_DIMS), width=0.4, label=kind.upper())
            unit_kl = np.concatenate([np.sort(k)[::-1] for k in r["kl_units"][2:]])
            axes[2].plot(unit_kl, "o-", ms=3, label=kind.upper())
        axes[0].set_title("KL per layer (nats)"); axes[0].set_yscale("log")
        axes[1].set_title("fraction of active units (A_u > 0.01)"); axes[1].set_ylim(0, 1.3)
        for ax in axes[:2]:
            ax.set_xticks(layers_, [f"z{i + 1}\\n({n})" for i, n in enumerate(Z_DIMS)])
            ax.legend(loc="upper center", ncol=2, fontsize=8)
        bounds = np.cumsum(Z_DIMS[2:])[:-1]
        for b in bounds:
            axes[2].axvline(b - 0.5, color="gray", lw=0.5)
        axes[2].set_yscale("symlog", linthresh=1e-3); axes[2].axhline(0.01, color="r", lw=0.8)
        axes[2].set_title("KL of each unit of z3 | z4 | z5, sorted (symlog)"); axes[2].legend()
        plt.tight_layout(); plt.show()
        '''),
        md(r"""
        Read the per-unit KL of the VAE with care: for its lower layers it is the Monte Carlo
        estimate of $\mathbb{E}[\log q(z_u|z_{i-1}) - \log p(z_u|z_{i+1})]$, which (notebook 2)
        is a share of the total KL, not a KL by itself, and can come out slightly negative for a
        unit that encodes nothing. The LVAE's per-unit KLs are analytic and never negative.
        "Units KL > 0.01" in the table counts the units whose KL is above 0.01 nats. The KL
        bounds what a unit encodes about $x$: a unit under 0.01 nats encodes at most that, while
        one above it need not encode anything (a mismatch between $q$ and the prior that is the
        same for every $x$ counts too).
        """),
        md(r"""
        ### Why (almost) every unit counts as active here

        Every Gaussian head has batch normalisation on its mean: $\mu = \gamma\,\hat{h} + b$
        (scale $\gamma$, shift $b$), where $\hat{h}$ has unit variance over the data. So the activity of a unit whose mean is
        the head's output is about $\gamma^2$, whatever the unit encodes, and a unit becomes
        "inactive" only once training has shrunk its $\gamma$ below $0.1$. (In the VAE the
        posterior mean of an upper layer is averaged over samples of the layer below, which
        lowers its activity, for most units a little; in the LVAE the merge with the prior
        changes it for all but the top layer.) With Adam at this learning rate that takes many
        epochs: the KL per unit is the more sensitive measure after a short run. The plot below
        shows it: the points lie on the diagonal or below it (the LVAE's merged layers, and a
        few VAE units far below), and only units whose $\gamma$ has shrunk fall under the
        threshold.

        The activity also misses one kind of collapse in the LVAE. A merged unit whose posterior
        equals its prior has KL 0, yet its mean is the prior's mean $\mu_p(z_{i+1})$, which moves
        with $x$ whenever the layer above does: by Burda's measure it counts as active, though it
        carries nothing of its own. "Units KL > 0.01" counts those as inactive. (`active_units`
        estimates $\mathbb{E}_q[z_u\mid x]$ from 10 posterior draws and subtracts the sampling
        noise of that estimate, which would otherwise add to $A_u$.)
        """),
        code('''
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for kind, marker in (("vae", "o"), ("lvae", "s")):
            net, r = models[kind], results[kind]
            gammas = np.concatenate([to_numpy(head.mean_norm.gamma.data) ** 2 for head in net.up_heads])
            act = np.concatenate(r["activity"])
            ax.loglog(gammas, act, marker, ms=4, mfc="none", label=kind.upper())
        lims = [1e-3, 10]
        ax.plot(lims, lims, "k:", lw=1, label="activity = gamma^2")
        ax.axhline(0.01, color="r", lw=0.8, label="active threshold 0.01")
        ax.set_xlabel("gamma^2 of the unit's mean batch norm"); ax.set_ylabel("activity A_u")
        ax.legend(fontsize=8); ax.grid(alpha=0.3); plt.show()
        '''),
        md(r"""
        ## 4. PCA of each layer's codes

        The posterior means $\mathbb{E}_q[z_i\mid x]$ of 1000 test digits, projected on their two
        principal components, coloured by the digit's label. A layer that encodes the digit's
        identity separates the classes.
        """),
        code('''
        for kind, net in models.items():
            codes = lvae.posterior_means(net, test_x[:N_PCA], lvae.Noise(11))
            print(kind.upper())
            show(plots.pca_codes(codes, test_y[:N_PCA], FIGURES / f"pca_{kind}.png"))
        '''),
        md(r"""
        ## 5. Samples that vary one layer at a time

        Generate with fixed noise in every layer but one: row $z_k$ draws 8 different values of
        layer $k$'s noise $\epsilon_k$ (with $z_k = \mu_{p,k} + \sigma_{p,k}\epsilon_k$) while the
        other layers keep theirs, so the row shows what layer $k$ controls. A collapsed layer
        would give 8 identical images. The number on the right is the mean pixel standard
        deviation across the row.
        """),
        code('''
        def generate(net, eps):
            """Decode the generative model with given noise eps[i] (one array per layer, bottom first)."""
            net.eval()
            with no_grad():
                top = net.n_layers - 1
                z = Tensor(eps[top])
                for i in range(top - 1, -1, -1):
                    mu, var = net.prior(i, z)
                    z = reparameterize(mu, var, eps[i])
                images = sigmoid_array(net.decode(z).data)
            net.train()
            return images

        def vary_one_layer(net, n=8, seed=0):
            rng = np.random.default_rng(seed)
            base = [rng.standard_normal((1, d)).astype(np.float32) for d in net.z_dims]
            rows = []
            for k in reversed(range(net.n_layers)):          # top layer first
                eps = [np.repeat(e, n, axis=0) for e in base]
                eps[k] = rng.standard_normal((n, net.z_dims[k])).astype(np.float32)
                rows.append((k, generate(net, eps)))
            return rows

        fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
        for ax, (kind, net) in zip(axes, models.items()):
            rows = vary_one_layer(net)
            canvas = np.ones((len(rows) * 29, 8 * 29))
            for r, (k, images) in enumerate(rows):
                for c, image in enumerate(images):
                    canvas[r * 29:r * 29 + 28, c * 29:c * 29 + 28] = image.reshape(28, 28)
                ax.text(8 * 29 + 3, r * 29 + 14, f"{images.std(axis=0).mean():.3f}", va="center", fontsize=9)
            ax.imshow(canvas, cmap="gray", vmin=0, vmax=1)
            ax.set_yticks([r * 29 + 14 for r in range(len(rows))], [f"vary z{k + 1}" for k, _ in rows])
            ax.set_xticks([]); ax.set_title(kind.upper())
        plt.tight_layout(); plt.show()

        # the same measure averaged over 20 different settings of the other layers' noise
        bases = 5 if QUICK else 20
        spread = {kind: np.mean([[images.std(axis=0).mean() for _, images in vary_one_layer(net, seed=s)]
                                 for s in range(bases)], axis=0) for kind, net in models.items()}
        print(f"mean pixel std when one layer varies (average over {bases} settings of the others):")
        print("      " + "".join(f"{f'z{k + 1}':>7s}" for k in reversed(range(len(Z_DIMS)))))
        for kind, values in spread.items():
            print(f"{kind.upper():6s}" + "".join(f"{v:7.3f}" for v in values))
        '''),
        md(r"""
        ## 6. What this run shows, and what it does not
        """),
        code('''
        upper = slice(len(Z_DIMS) // 2, None)              # the upper half of the hierarchy
        layers_txt = ", ".join(f"z{i + 1}" for i in range(len(Z_DIMS))[upper])
        measures = {"KL (nats)": lambda r: sum(float(k.sum()) for k in r["kl_units"][upper]),
                    "active units": lambda r: sum(r["active"][upper]),
                    "units KL > 0.01": lambda r: sum(r["informative"][upper])}
        paper_way = 0
        print(f"upper layers {layers_txt} ({sum(Z_DIMS[upper])} units):")
        for name, measure in measures.items():
            v, l = measure(results["vae"]), measure(results["lvae"])
            lower = v < 0.9 * l                      # at least 10% lower, not a rounding difference
            paper_way += lower
            note = "VAE clearly lower: the paper's direction" if lower else ""
            print(f"  {name:16s} VAE {v:7.4g}   LVAE {l:7.4g}   {note}")
        if paper_way == len(measures):
            print("-> as in the paper: the bottom-up VAE uses its upper layers less than the LVAE.")
        elif paper_way:
            print(f"-> mixed: {paper_way} of {len(measures)} measures point the paper's way.")
        else:
            print("-> the paper's collapse of the VAE's upper layers does NOT show in this run.")
        '''),
        md(r"""
        **Honest reading of the committed run.** (The printout above is computed from the run,
        so it stays right if you rerun with other sizes; this paragraph describes the committed
        run, executed 2026-12-07.) After 8 epochs per model (1,880 Adam steps each) on the
        paper's 5-layer architecture, the two models are about equally good (test ELBO $-98.2$
        vs $-98.0$ nats, $L_{100}$ $-90.4$ vs $-90.2$), and the paper's collapse of the VAE's
        upper layers does **not** show:

        * Nothing has collapsed in either model. By the $A_u > 0.01$ criterion 122 of the
          VAE's 124 units and 123 of the LVAE's are active (two units of the VAE's $z_5$ are
          off, one of the LVAE's). In $z_3..z_5$ the LVAE has more units carrying over 0.01
          nats (20 of 28, against 16).
        * The VAE's upper layers $z_3..z_5$ carry less KL than the LVAE's (4.52 vs 5.45 nats),
          the paper's direction, but not layer by layer: its $z_4$ and $z_5$ carry less (0.26
          and 1.39 vs 1.05 and 1.86 nats), its $z_3$ more (2.87 vs 2.54). And the gap is within
          run-to-run variation after so short a training. Two earlier executions of this
          notebook, whose numbers differ from these only by floating-point rounding (OpenBLAS's
          build and thread count change it) amplified over 1,880 steps, had 4.98 vs 5.88 and
          4.97 vs 5.06 nats, and in the first of them the VAE had *more* units over 0.01 nats
          in $z_3..z_5$ (20 against 18).
        * The larger differences are elsewhere: the LVAE puts more information into $z_1$ (13.9
          vs 12.7 nats), the VAE into $z_2$ (9.1 vs 6.2). Averaged over 20 settings of the
          other layers (the table above), varying the LVAE's $z_5$ moves the pixels more than
          varying the VAE's (0.094 vs 0.059), and it is the LVAE's layer that moves them most,
          while in the VAE $z_3$ does (0.087). In the single setting of the figure, the $z_5$,
          $z_4$ and $z_3$ rows of both models change the digit, the $z_2$ rows mostly keep it,
          and the $z_1$ rows keep the same 6 and change its style. The LVAE's top layer moving
          its samples most leans towards the paper's picture of the LVAE using its top layers
          for global structure, but it is one run of each model.

        Why no collapse here: with batch norm and warm-up (this notebook's recipe), any collapse
        develops only over hundreds of epochs (the paper trains 2000, with a 200-epoch warm-up).
        Batch norm keeps the activity of a unit whose posterior mean is a batch-normed head's
        output near $\gamma^2$ (here mostly 0.3 to 3) until training slowly shrinks $\gamma$, and
        warm-up deliberately keeps units alive early on. In exploratory runs of the same code (not part of this
        notebook) with batch norm: 10 epochs with warm-up over 0, 5 or 10 epochs, 15 epochs, and
        60 epochs on half of MNIST (the steps of 30 full epochs), every unit but at most one of
        $z_5$ stayed active in both models, and the upper layers' KL did not differ consistently.
        *Without* batch norm (`batch_norm=False`, 10 epochs) units collapse fast, but in both
        models, and which one keeps more depends on the recipe: with a 5-epoch warm-up the VAE
        kept 64/3/0/0/0 active units in $z_1..z_5$ and the LVAE 23/0/0/0/0; without warm-up the
        VAE kept 18/0/0/0/0 and the LVAE 64/20/1/0/0.

        Measured since with `train.py` on the whole training set (README › Results; the logs
        are in `bench/results/`). In the 30-epoch runs (a 10-epoch warm-up for the +WU
        variants), the plain VAE (no batch norm, no warm-up) collapses: from the second epoch its $z_2..z_5$ carry 0.00-0.01 nats,
        and 12/0/0/0/0 units are active. VAE+BN, VAE+BN+WU and LVAE+BN+WU keep nearly all their
        units. $L_{1000}$ ranks them in the paper's order VAE < VAE+BN < VAE+BN+WU ($-92.07$,
        $-86.92$, $-86.07$), while LVAE+BN+WU ($-86.16$) ties VAE+BN+WU. At 200 epochs with the
        paper's 200-epoch warm-up, the LVAE trails the VAE+BN+WU until epoch 150 and then ends
        ahead: test ELBO $-87.04$ vs $-87.93$, $L_{1000}$ $-82.59$ vs $-82.75$, with active units
        64/32/16/7/2 vs 56/28/15/8/2.

        To test the paper's claim itself, run the full recipe (ideally on a GPU), e.g.
        `python train.py --model=vae --device=cuda --out_dir=runs/vae` and
        `python train.py --model=lvae --device=cuda --out_dir=runs/lvae`, and compare
        `active_units` in each run's `final.json` and the `kl_per_unit.png` figures.

        *End of the learning path.*
        """),
    ]


NOTEBOOKS = {
    "01_engine.ipynb": engine,
    "02_gaussians.ipynb": gaussians,
    "03_training_an_lvae.ipynb": training,
    "04_the_hierarchy.ipynb": hierarchy,
}


def build(name):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    nb.cells = NOTEBOOKS[name]()
    return nb


def execute(nb, timeout=1800):
    import nbclient
    client = nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3",
                                     resources={"metadata": {"path": str(HERE)}})
    client.execute()
    return nb


def with_new_text(name):
    """The committed notebook with this file's markdown, its code cells and outputs kept.

    For edits of the prose only: the committed outputs stay those of the real run. A code
    cell that differs from this file's, or one added or removed, is an error: that needs
    --execute. Markdown cells may be added (not removed).
    """
    committed = nbformat.read(str(HERE / name), as_version=4)
    old, cells, j = committed.cells, [], 0
    for cell in build(name).cells:
        if cell.cell_type == "markdown":
            if j < len(old) and old[j].cell_type == "markdown":
                old[j].source = cell.source
                cell, j = old[j], j + 1
            cells.append(cell)
            continue
        if not (j < len(old) and old[j].cell_type == "code" and old[j].source == cell.source):
            sys.exit(f"{name}: code cell {len(cells)} differs from the committed one (or a cell "
                     f"was removed): run with --execute instead of --text")
        cells.append(old[j])
        j += 1
    if j != len(old):
        sys.exit(f"{name}: the committed notebook has cells this file no longer makes: "
                 f"run with --execute instead of --text")
    committed.cells = cells
    return committed


def main(argv):
    if "--help" in argv or "-h" in argv:
        print(__doc__.strip())
        return
    # refuse a mistyped flag: a plain rebuild would replace the committed outputs
    unknown = [a for a in argv if a.startswith("-") and a not in ("--execute", "--text")]
    if unknown:
        sys.exit(f"unknown option {unknown[0]!r}: use --execute, --text or --help")
    run = "--execute" in argv
    text_only = "--text" in argv
    wanted = [a for a in argv if not a.startswith("--")]
    unmatched = [w for w in wanted if not any(w in name for name in NOTEBOOKS)]
    if unmatched:
        sys.exit(f"no notebook name contains {unmatched[0]!r}: {', '.join(NOTEBOOKS)}")
    for name in NOTEBOOKS:
        if wanted and not any(w in name for w in wanted):
            continue
        if text_only:
            nb = with_new_text(name)
        else:
            nb = build(name)
        if run and not text_only:
            t0 = time.perf_counter()
            execute(nb)
            print(f"{name}: executed in {time.perf_counter() - t0:.0f} s", flush=True)
        nbformat.validate(nb)
        nbformat.write(nb, str(HERE / name))
        print(f"wrote {HERE / name}")


if __name__ == "__main__":
    main(sys.argv[1:])
