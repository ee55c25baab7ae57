"""Write (and optionally run) the teaching notebooks from the cell texts below.

    python notebooks/build_notebooks.py                 # write the four .ipynb, without outputs
    python notebooks/build_notebooks.py --execute       # ... and run them in place (the committed run)
    python notebooks/build_notebooks.py --execute 03    # only the notebooks whose name contains 03
    LVAE_NOTEBOOK_QUICK=1 python notebooks/build_notebooks.py --execute   # tiny sizes, for a try

The notebooks are generated so that their source stays clean and reviewable here; edit this
file, not the .ipynb, and run it again. Needs nbformat (and nbclient + ipykernel to execute);
the library itself does not depend on Jupyter.
"""
import os
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
import plots                      # selects matplotlib's file-only Agg backend when imported ...
%matplotlib inline
plt.rcParams["figure.dpi"] = 80   # ... so switch the notebook back to inline figures

FIGURES = Path(tempfile.mkdtemp(prefix="lvae_notebook_"))  # plots.py writes its PNGs here

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
        about a million weights. This notebook opens the engine that computes those gradients,
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
            fig, ax = plt.subplots(figsize=(7, 2.6))
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
        **Why backwards?** One backward pass costs about as much as one forward pass, and it
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
        ax.legend(); ax.grid(alpha=0.3)
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
        axes[0].set_title("samples of the reparameterised z"); axes[0].legend(fontsize=8)
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

        The posterior is their product, renormalised. Multiply the densities and complete the
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
        `merge` is one autograd op with a hand-written backward pass (the derivatives are in its
        docstring). As every op, it is checked against finite differences, both outputs at once:
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

        ## Summary

        * `reparameterize` makes a sample differentiable: $z = \mu + \sigma\epsilon$.
        * `merge` multiplies the bottom-up likelihood term and the top-down prior; precisions add.
        * `gaussian_kl` is exact and noise-free; `log_normal` gives the Monte Carlo version.
        * The bottom-up VAE can use the analytic KL only for its top layer; the LVAE for all.

        Next: [3 · training an LVAE](03_training_an_lvae.ipynb).
        """),
    ]


NOTEBOOKS = {
    "01_engine.ipynb": engine,
    "02_gaussians.ipynb": gaussians,
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


def main(argv):
    run = "--execute" in argv
    wanted = [a for a in argv if not a.startswith("--")]
    for name in NOTEBOOKS:
        if wanted and not any(w in name for w in wanted):
            continue
        nb = build(name)
        if run:
            t0 = time.perf_counter()
            execute(nb)
            print(f"{name}: executed in {time.perf_counter() - t0:.0f} s", flush=True)
        nbformat.validate(nb)
        nbformat.write(nb, str(HERE / name))
        print(f"wrote {HERE / name}")


if __name__ == "__main__":
    main(sys.argv[1:])
