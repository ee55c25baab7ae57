"""Figures for a Ladder VAE run: learning curves, KL per layer and unit, samples, codes.

Every plotting function writes one PNG to ``path`` and returns ``path`` (``pca`` is a
helper that returns arrays). Figures are made with
matplotlib's object interface (``Figure``), not pyplot: no window and no backend choice
are involved, so the module runs on a machine without a display (a server, CI) and does
not change the backend of a notebook that imports it.

Inputs are plain Python / NumPy data, as written by training: ``metrics`` is the list
of per-epoch dicts read from the JSONL metrics file, and per-layer lists are ordered
bottom first (``z1`` is the layer nearest the data).
"""
import matplotlib
import numpy as np
from matplotlib.figure import Figure

DPI = 110


# ---------------------------------------------------------------- helpers

def _subplots(nrows=1, ncols=1, figsize=None, layout=None, **kwargs):
    """Like pyplot.subplots, on a Figure that no window or backend manages."""
    fig = Figure(figsize=figsize, layout=layout)
    return fig, fig.subplots(nrows, ncols, **kwargs)


def _check_metrics(metrics, keys):
    """Raise ValueError unless ``metrics`` is a non-empty list of dicts holding ``keys``."""
    if metrics is None or len(metrics) == 0:
        raise ValueError("metrics is empty: need at least one epoch record")
    for i, m in enumerate(metrics):
        missing = [k for k in keys if k not in m]
        if missing:
            raise ValueError(f"metrics[{i}] lacks key(s) {missing}; has {sorted(m)}")


def _save(fig, path):
    """Write ``fig`` to ``path`` as PNG and return ``path``."""
    fig.savefig(path, dpi=DPI, format="png", bbox_inches="tight", pad_inches=0.1)
    return path


def _dot_if_one(points):
    """Line options that mark the point of a one-epoch curve, which a line alone leaves
    invisible (a one-epoch run's train ELBO and KL curves were blank)."""
    return {"marker": "o", "ms": 4} if len(points) == 1 else {}


def _as_images(images, shape):
    """Return ``images`` as an (N, H, W) float array, checking sizes."""
    images = np.asarray(images, dtype=float)
    size = int(np.prod(shape))
    if images.ndim == 1:
        images = images[None]
    if images.ndim != 2 or images.shape[1] != size:
        raise ValueError(f"images have shape {images.shape}; expected (N, {size}) "
                         f"for image shape {tuple(shape)}")
    if len(images) == 0:
        raise ValueError("no images to plot")
    return images.reshape(-1, *shape)


def _tile(images, rows, cols, pad=1):
    """Tile (N, H, W) images into one (rows*(H+pad) - pad, cols*(W+pad) - pad)
    canvas; gaps are 1."""
    n, h, w = images.shape
    canvas = np.ones((rows * (h + pad) - pad, cols * (w + pad) - pad))
    for k in range(n):
        r, c = divmod(k, cols)
        canvas[r * (h + pad):r * (h + pad) + h, c * (w + pad):c * (w + pad) + w] = images[k]
    return canvas


# ---------------------------------------------------------------- training curves

def learning_curves(metrics, path):
    """Train ELBO, test ELBO and test L_K (all in nats) against epoch.

    ``metrics``: list of dicts with ``epoch`` and ``train_elbo``; evaluation epochs
    also carry ``test_elbo``, ``test_lk``, ``lk_samples`` (the K of L_K) and
    ``lk_images`` (how many test images; older runs lack it). Missing
    or None test values are skipped; sparse test points are drawn with markers.
    """
    _check_metrics(metrics, ["epoch", "train_elbo"])
    epochs = [m["epoch"] for m in metrics]
    fig, ax = _subplots(figsize=(7, 4.5))
    ax.plot(epochs, [m["train_elbo"] for m in metrics], label="train ELBO", lw=1.5,
            **_dot_if_one(epochs))

    def evaluated(key):
        pts = [(m["epoch"], m[key]) for m in metrics if m.get(key) is not None]
        return tuple(zip(*pts)) if pts else ((), ())

    x, y = evaluated("test_elbo")
    if x:
        ax.plot(x, y, "o-", ms=4, label="test ELBO")
    x, y = evaluated("test_lk")
    if x:
        ks = {m.get("lk_samples") for m in metrics if m.get("test_lk") is not None}
        ks.discard(None)
        k = "/".join(str(v) for v in sorted(ks)) if ks else "K"
        images = {m.get("lk_images") for m in metrics if m.get("test_lk") is not None}
        on = f", {images.pop()} images" if len(images) == 1 and None not in images else ""
        ax.plot(x, y, "s-", ms=4, label=f"test $L_{{{k}}}$ (K={k}{on})")
    if len(metrics) >= 20:  # a long run: the first tenth of epochs would squash the rest
        ax.set_ylim(*_later_limits([metrics], ["train_elbo", "test_elbo", "test_lk"]))
    ax.set_xlabel("epoch")
    ax.set_ylabel("nats")
    ax.set_title("Learning curves (higher is better)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return _save(fig, path)


def kl_per_layer(metrics, path, units=None):
    """KL(q||p) of each stochastic layer against epoch, with beta on a twin axis.

    ``metrics``: list of dicts with ``epoch``, ``kl`` (one float per layer, z1 first)
    and ``beta`` (the warm-up weight). ``units``: optional list of layer sizes for the
    legend ("z1 (64 units)"). The KL axis is symmetric-log so that layers collapsing
    towards 0 stay visible next to layers with tens of nats.
    """
    _check_metrics(metrics, ["epoch", "kl", "beta"])
    epochs = [m["epoch"] for m in metrics]
    lengths = sorted({len(m["kl"]) for m in metrics})
    if len(lengths) != 1 or lengths[0] == 0:
        raise ValueError(f"metrics['kl'] must hold one value per layer, the same number "
                         f"every epoch; found lengths {lengths}")
    kl = np.array([m["kl"] for m in metrics], dtype=float)  # (epochs, layers)
    n_layers = kl.shape[1]
    if units is not None and len(units) != n_layers:
        raise ValueError(f"units has {len(units)} entries but kl has {n_layers} layers")
    fig, ax = _subplots(figsize=(7, 4.5))
    for i in range(n_layers):
        label = f"z{i + 1}" + (f" ({units[i]} units)" if units is not None else "")
        ax.plot(epochs, kl[:, i], lw=1.5, label=label, **_dot_if_one(epochs))
    ax.set_yscale("symlog", linthresh=0.01)
    ax.set_xlabel("epoch")
    ax.set_ylabel("KL (nats, symlog scale)")
    ax.set_title("KL divergence per stochastic layer")
    ax.grid(alpha=0.3)
    twin = ax.twinx()
    twin.plot(epochs, [m["beta"] for m in metrics], "k--", lw=1, label="beta",
              **_dot_if_one(epochs))
    twin.set_ylabel("beta (warm-up)")
    twin.set_ylim(0, max(1.0, max(m["beta"] for m in metrics)) * 1.05)
    lines = ax.get_lines() + twin.get_lines()
    ax.legend(lines, [l.get_label() for l in lines], loc="best", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


# ---------------------------------------------------------------- comparing runs

def compare_runs(runs, path, bound_name="L_K"):
    """The paper's comparison of model variants, from several runs, in two panels.

    ``runs``: list of dicts, one per run, with ``variant`` (a name such as "LVAE+BN+WU"),
    ``layers`` (the number of stochastic layers), ``metrics`` (the per-epoch records, as
    for learning_curves) and ``bound`` (the final test L_K, or None if not finished).
    Left: the train ELBO of every run against epoch, with its test ELBO where it was
    evaluated (dots). Right: the final test bound. When the runs differ in depth, the
    bound is drawn against depth with a line per variant (the paper's layer comparison),
    and on the left colour is the depth and the line style the variant; when they share
    one depth, colour is the variant and each bound is written beside its point.
    ``bound_name`` labels the y-axis (TeX, e.g. "L_{5000}").
    """
    if not runs:
        raise ValueError("runs is empty: need at least one run")
    for run in runs:
        missing = {"variant", "layers", "metrics", "bound"} - set(run)
        if missing:
            raise ValueError(f"a run lacks key(s) {sorted(missing)}; has {sorted(run)}")
        try:
            _check_metrics(run["metrics"], ["epoch", "train_elbo"])
        except ValueError as e:
            raise ValueError(f"run {run['variant']!r}, {run['layers']} layers: {e}") from None
    variants = list(dict.fromkeys(run["variant"] for run in runs))  # in order, once each
    depths = sorted({run["layers"] for run in runs})
    by_depth = len(depths) > 1
    fig, (left, right) = _subplots(1, 2, figsize=(12, 4.6), layout="constrained",
                                   gridspec_kw={"width_ratios": [3, 2]})
    for run in runs:
        v = variants.index(run["variant"])
        if by_depth:
            color = f"C{depths.index(run['layers']) % 10}"
            style = ["-", "--", ":", "-."][v % 4]
            label = f"{run['variant']}, {run['layers']} layer{'s' * (run['layers'] > 1)}"
        else:
            color, style, label = f"C{v % 10}", "-", run["variant"]
        metrics = run["metrics"]
        left.plot([m["epoch"] for m in metrics], [m["train_elbo"] for m in metrics],
                  style, color=color, lw=1.3, label=label, **_dot_if_one(metrics))
        tests = [(m["epoch"], m["test_elbo"]) for m in metrics if m.get("test_elbo") is not None]
        if tests:
            left.plot(*zip(*tests), "o", color=color, ms=4)
    left.set_ylim(*_later_limits([run["metrics"] for run in runs], ["train_elbo", "test_elbo"]))
    left.set_xlabel("epoch")
    left.set_ylabel("ELBO (nats)")
    left.set_title("train ELBO per epoch (dots: test ELBO)")
    left.grid(alpha=0.3)
    left.legend(fontsize=8, ncol=2 if len(runs) > 6 else 1)

    finished = [run for run in runs if run["bound"] is not None]
    if not finished:
        right.text(0.5, 0.5, "no finished run", ha="center", va="center",
                   transform=right.transAxes)
        right.set_axis_off()
        return _save(fig, path)
    if by_depth:  # the bound against depth, a line per variant
        for v, name in enumerate(variants):
            pts = sorted((r["layers"], r["bound"]) for r in finished if r["variant"] == name)
            if pts:
                right.plot(*zip(*pts), ["-", "--", ":", "-."][v % 4], marker="o",
                           color="k" if v == 0 else "0.5", label=name)
        right.set_xticks(depths)
        right.set_xlabel("stochastic layers")
        right.legend(fontsize=8)
    else:  # one depth: a point per run, its value beside it
        for i, run in enumerate(finished):
            color = f"C{variants.index(run['variant']) % 10}"
            right.plot(i, run["bound"], "o", color=color)
            right.annotate(f"{run['bound']:.2f}", (i, run["bound"]), xytext=(6, 0),
                           textcoords="offset points", va="center", fontsize=8)
        right.set_xticks(range(len(finished)), [r["variant"] for r in finished],
                         rotation=20, fontsize=8)
        right.set_xlim(-0.5, len(finished) - 0.3)
        low, high = right.get_ylim()  # at least 1 nat tall: a 0.2 nat gap must look small
        if high - low < 1:
            middle = (low + high) / 2
            right.set_ylim(middle - 0.5, middle + 0.5)
        right.set_xlabel(f"{depths[0]} stochastic layer{'s' * (depths[0] > 1)}")
    right.set_ylabel(f"test ${bound_name}$ (nats)")
    right.set_title("final test bound (higher is better)")
    right.grid(alpha=0.3)
    return _save(fig, path)


def _later_limits(all_metrics, keys):
    """y-limits that show the curves of ``keys`` after their first tenth of epochs.

    The first epochs' ELBOs (-200 and lower) would otherwise squash the differences of a
    nat or two that a long run or a comparison of models is about.
    """
    low, high = np.inf, -np.inf
    for metrics in all_metrics:
        start = metrics[len(metrics) // 10]["epoch"]
        values = [(m["epoch"], m[k]) for m in metrics for k in keys if m.get(k) is not None]
        low = min([low] + [v for epoch, v in values if epoch >= start])
        high = max([high] + [v for _, v in values])
    margin = 0.05 * (high - low) + 0.1
    return low - margin, high + margin


# ---------------------------------------------------------------- KL per unit

def kl_per_unit(kl_units, path, active_threshold=0.01, activity=None):
    """Heatmap of KL per latent unit: one row per layer, units sorted by decreasing KL.

    ``kl_units``: list (z1 first) of 1-D arrays, one value per unit; rows of different
    lengths are padded with blank (masked) cells. ``activity``: optional list of the
    same shapes (e.g. Cov_x(E_q[z]) per unit); each row is then annotated with the
    number of units whose activity exceeds ``active_threshold``.
    """
    if not kl_units:
        raise ValueError("kl_units is empty: need one array per layer")
    rows = [np.asarray(k, dtype=float).ravel() for k in kl_units]
    if activity is not None:
        activity = [np.asarray(a, dtype=float).ravel() for a in activity]
        shapes = ([r.shape for r in rows], [a.shape for a in activity])
        if shapes[0] != shapes[1]:
            raise ValueError(f"activity shapes {shapes[1]} differ from kl_units shapes "
                             f"{shapes[0]}")
    width = max(len(r) for r in rows)
    # zeros under the mask, not np.ma.masked_all's uninitialised memory: matplotlib scales
    # the masked values too, and leftover bytes such as 1e308 overflow there
    grid = np.ma.masked_array(np.zeros((len(rows), width)), mask=True)
    for i, r in enumerate(rows):
        grid[i, :len(r)] = np.sort(r)[::-1]
    fig, ax = _subplots(figsize=(min(14, 4 + 0.15 * width), 1.4 + 0.5 * len(rows)),
                           layout="constrained")
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="white")  # padding is blank
    im = ax.imshow(grid, aspect="auto", cmap=cmap, interpolation="nearest")
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([f"z{i + 1} ({len(r)})" for i, r in enumerate(rows)])
    ax.set_xlabel("unit (sorted by decreasing KL within each layer)")
    ax.set_title("KL per latent unit")
    if activity is not None:  # "active / total" on a right-hand axis
        right = ax.secondary_yaxis("right")
        right.set_yticks(range(len(rows)),
                         [f"{int(np.sum(a > active_threshold))}/{len(a)}" for a in activity])
        right.set_ylabel(f"active units (activity > {active_threshold:g})")
    fig.colorbar(im, ax=ax, label="KL (nats)", pad=0.02)
    return _save(fig, path)


# ---------------------------------------------------------------- images

def image_grid(images, path, title=None, rows=None, shape=(28, 28)):
    """Grey images (N, H*W) with values in [0, 1] as a grid, without axes.

    ``rows``: number of grid rows (default: as square as possible, wider than tall).
    """
    imgs = _as_images(images, shape)
    n = len(imgs)
    if rows is not None and int(rows) < 1:
        raise ValueError(f"rows must be >= 1, got {rows}")
    cols = int(np.ceil(np.sqrt(n))) if rows is None else int(np.ceil(n / int(rows)))
    rows = int(np.ceil(n / cols))
    canvas = _tile(imgs, rows, cols)
    fig, ax = _subplots(figsize=(max(2.0, 0.5 * cols), max(2.0, 0.5 * rows) + 0.4))
    ax.imshow(canvas, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.axis("off")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return _save(fig, path)


def reconstructions(originals, recons, path, n=10, shape=(28, 28)):
    """First ``n`` originals (top row) above their reconstructions (bottom row)."""
    orig = _as_images(originals, shape)
    rec = _as_images(recons, shape)
    if orig.shape != rec.shape:
        raise ValueError(f"originals {orig.shape} and recons {rec.shape} differ in shape")
    n = min(n, len(orig))
    canvas = _tile(np.concatenate([orig[:n], rec[:n]]), 2, n)
    fig, ax = _subplots(figsize=(max(3.0, 0.6 * n), 1.8))
    ax.imshow(canvas, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([shape[0] / 2, shape[0] * 1.5 + 1])
    ax.set_yticklabels(["original", "reconstr."])
    for side in ax.spines.values():
        side.set_visible(False)
    ax.tick_params(length=0)
    ax.set_title("Reconstructions")
    fig.tight_layout()
    return _save(fig, path)


# ---------------------------------------------------------------- latent codes

def pca(x, k=2):
    """Project rows of ``x`` on its top ``k`` principal components (SVD of centred data).

    Returns (projection (N, k), explained-variance ratio (k,)); when ``x`` has fewer
    than ``k`` columns the missing components are zeros with ratio 0.
    """
    x = np.asarray(x, dtype=float)
    xc = x - x.mean(axis=0)
    _, s, vt = np.linalg.svd(xc, full_matrices=False)
    var = s ** 2
    ratio = var / var.sum() if var.sum() > 0 else np.zeros_like(var)
    proj = xc @ vt[:k].T
    if proj.shape[1] < k:  # a layer with fewer units than components
        proj = np.hstack([proj, np.zeros((len(x), k - proj.shape[1]))])
        ratio = np.concatenate([ratio, np.zeros(k - len(ratio))])
    return proj, ratio[:k]


def pca_codes(codes, labels, path):
    """2-D PCA of each layer's posterior means, one subplot per layer, coloured by label.

    ``codes``: list (z1 first) of (N, units) arrays; ``labels``: (N,) ints 0-9, or None.
    """
    if not codes:
        raise ValueError("codes is empty: need one (N, units) array per layer")
    codes = [np.asarray(c, dtype=float) for c in codes]
    codes = [c[:, None] if c.ndim == 1 else c for c in codes]
    n = len(codes[0])
    if any(c.ndim != 2 or len(c) != n for c in codes):
        raise ValueError(f"codes must all be (N, units) with the same N; got shapes "
                         f"{[c.shape for c in codes]}")
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (n,):
            raise ValueError(f"labels have shape {labels.shape}; expected ({n},)")
    L = len(codes)
    ncols = min(L, 3)
    nrows = int(np.ceil(L / ncols))
    fig, axes = _subplots(nrows, ncols, figsize=(3.2 * ncols + 1.0, 3.4 * nrows),
                             squeeze=False, layout="constrained")
    for ax in axes.flat[L:]:  # unused cells of the last row
        ax.axis("off")
    sc = None
    for i, (c, ax) in enumerate(zip(codes, axes.flat)):
        proj, ratio = pca(c)
        sc = ax.scatter(proj[:, 0], proj[:, 1], s=4, alpha=0.7,
                        c=labels if labels is not None else "tab:blue",
                        cmap="tab10" if labels is not None else None,
                        vmin=-0.5 if labels is not None else None,
                        vmax=9.5 if labels is not None else None)
        ax.set_title(f"z{i + 1} ({c.shape[1]} units)\n"
                     f"PC1 {ratio[0]:.0%}, PC2 {ratio[1]:.0%} of var.", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    if labels is not None:
        fig.colorbar(sc, ax=axes.ravel().tolist(), ticks=range(10), label="digit")
    fig.suptitle("PCA of posterior means per layer", fontsize=11)
    return _save(fig, path)
