"""Tests of the figures (plots.py): each writes a real PNG, bad inputs fail clearly.

CPU only, a few seconds in all. Skipped where matplotlib is not installed.
"""
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


import plots  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
UNITS = [64, 32, 16, 8, 4]


def assert_png(path):
    """``path`` exists, starts with the PNG signature and is over 1 kB."""
    path = Path(path)
    assert path.is_file(), path
    head = path.read_bytes()[:8]
    assert head == PNG_SIGNATURE, head
    assert path.stat().st_size > 1024, path.stat().st_size


def fake_metrics(epochs=30, eval_every=10, layers=5):
    """Per-epoch records as training writes them to the JSONL metrics file."""
    out = []
    for e in range(1, epochs + 1):
        m = {"epoch": e, "train_elbo": -120 + 30 * np.exp(-e / 5),
             "kl": [20 * 0.5 ** i * (1 - np.exp(-e / 8)) + 1e-4 for i in range(layers)],
             "beta": min(1.0, e / 20)}
        if e % eval_every == 0:
            m.update(test_elbo=m["train_elbo"] - 2, test_lk=m["train_elbo"] + 1,
                     lk_samples=5000)
        else:
            m.update(test_elbo=None, test_lk=None)
        out.append(m)
    return out


def test_plots_need_no_display_and_leave_the_backend_alone(tmp_path):
    """A notebook's (or any caller's) backend stays as it was; no pyplot, no window."""
    script = (
        "import sys, matplotlib, numpy as np\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "matplotlib.use('svg')\n"
        "import plots\n"
        f"plots.image_grid(np.zeros((4, 784)), {str(tmp_path / 'g.png')!r})\n"
        "assert matplotlib.get_backend() == 'svg', matplotlib.get_backend()\n"
        "assert 'matplotlib.pyplot' not in sys.modules\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env={**os.environ, "DISPLAY": "", "MPLBACKEND": ""})
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "g.png").read_bytes().startswith(PNG_SIGNATURE)


def test_learning_curves(tmp_path):
    path = tmp_path / "curves.png"
    assert plots.learning_curves(fake_metrics(), path) == path
    assert_png(path)


def test_long_curves_are_drawn_without_their_first_tenth_squashing_the_rest():
    metrics = fake_metrics(epochs=100, eval_every=10)
    metrics[0]["train_elbo"] = -500.0  # the first epoch of a real run is far below the rest
    low, high = plots._later_limits([metrics], ["train_elbo", "test_elbo", "test_lk"])
    later = [m["train_elbo"] for m in metrics[10:]] + [m["test_elbo"] for m in metrics[10:]
                                                        if m["test_elbo"] is not None]
    assert min(later) - 2 < low < min(later) and low > -200
    assert high > max(m["test_lk"] for m in metrics if m["test_lk"] is not None)


def test_learning_curves_without_eval_epochs(tmp_path):
    metrics = [{"epoch": e, "train_elbo": -100.0 - e} for e in range(3)]
    assert_png(plots.learning_curves(metrics, tmp_path / "c.png"))


def test_a_one_epoch_run_is_drawn(tmp_path, monkeypatch):
    """One epoch is one point: a line alone draws nothing, so a one-epoch run's train
    ELBO, KL and beta curves were blank. Each such curve gets a marker."""
    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or path)
    metrics = fake_metrics(epochs=1, eval_every=1)
    plots.learning_curves(metrics, tmp_path / "c.png")
    plots.kl_per_layer(metrics, tmp_path / "kl.png")
    plots.compare_runs([{"variant": "VAE", "layers": 5, "metrics": metrics, "bound": None}],
                       tmp_path / "cmp.png")
    lines = [line for fig in figures for ax in fig.axes for line in ax.get_lines()]
    assert len(lines) == 3 + 6 + 2  # (train, test, L_K), (5 layers, beta), (train, test)
    for line in lines:
        assert line.get_marker() not in (None, "None", ""), line.get_label()
    # a longer run keeps its plain lines
    figures.clear()
    plots.learning_curves(fake_metrics(epochs=3), tmp_path / "c3.png")
    assert figures[0].axes[0].get_lines()[0].get_marker() in (None, "None", "")


def test_learning_curves_rejects_empty_and_missing_keys(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        plots.learning_curves([], tmp_path / "c.png")
    with pytest.raises(ValueError, match="train_elbo"):
        plots.learning_curves([{"epoch": 1}], tmp_path / "c.png")


def test_kl_per_layer(tmp_path):
    path = plots.kl_per_layer(fake_metrics(), tmp_path / "kl.png", units=UNITS)
    assert_png(path)
    assert_png(plots.kl_per_layer(fake_metrics(layers=2), tmp_path / "kl2.png"))


def test_kl_per_layer_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        plots.kl_per_layer([], tmp_path / "kl.png")
    with pytest.raises(ValueError, match="units has 5 entries but kl has 3 layers"):
        plots.kl_per_layer(fake_metrics(layers=3), tmp_path / "kl.png", units=UNITS)
    ragged = fake_metrics(epochs=2)
    ragged[1]["kl"] = ragged[1]["kl"][:2]
    with pytest.raises(ValueError, match=r"found lengths \[2, 5\]"):
        plots.kl_per_layer(ragged, tmp_path / "kl.png")


def test_kl_per_unit_with_activity(tmp_path):
    rng = np.random.default_rng(0)
    kl = [rng.exponential(0.5, u) for u in UNITS]
    activity = [rng.exponential(0.05, u) for u in UNITS]
    path = plots.kl_per_unit(kl, tmp_path / "units.png", activity=activity)
    assert_png(path)
    assert_png(plots.kl_per_unit(kl, tmp_path / "units_plain.png"))


def test_kl_per_unit_shows_sorted_kls_and_active_counts(tmp_path, monkeypatch):
    """What the figure holds, not only that a PNG was written: each layer's KLs in
    decreasing order, and "active/total" per layer on the right-hand axis."""
    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or path)
    kl = [np.array([0.1, 0.7, 0.3]), np.array([0.2, 0.5])]
    activity = [np.array([0.5, 0.0, 0.02]), np.array([0.001, 0.3])]
    plots.kl_per_unit(kl, tmp_path / "units.png", activity=activity)
    ax = figures[0].axes[0]
    grid = ax.get_images()[0].get_array()
    np.testing.assert_array_equal(grid[0], [0.7, 0.3, 0.1])
    np.testing.assert_array_equal(grid[1, :2], [0.5, 0.2])
    assert grid.mask[1, 2], "the shorter layer is padded with a masked cell"
    right = ax.child_axes[0]  # the secondary y axis
    assert [t.get_text() for t in right.get_yticklabels()] == ["2/3", "1/2"]


def test_kl_per_unit_padding_is_not_uninitialised_memory(tmp_path):
    """Short layers are padded with masked cells; matplotlib's colormap still multiplies
    the values under the mask. Made with np.ma.masked_all they were whatever memory the
    grid got: after an array of 1e308 was freed, "overflow encountered in multiply", which
    failed this suite at random. The array below is freed just before the plot so that
    the grid is likely to reuse its memory (it did, 20 times in 20, before the fix)."""
    kl = [np.random.default_rng(0).exponential(0.5, u) for u in UNITS]
    for attempt in range(3):
        leftover = np.full((len(UNITS), max(UNITS)), 1e308)
        del leftover
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            assert_png(plots.kl_per_unit(kl, tmp_path / f"units{attempt}.png"))


def test_kl_per_unit_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        plots.kl_per_unit([], tmp_path / "u.png")
    with pytest.raises(ValueError, match="activity shapes"):
        plots.kl_per_unit([np.ones(4)], tmp_path / "u.png", activity=[np.ones(3)])


def test_image_grid(tmp_path):
    images = np.random.default_rng(1).random((12, 784))
    path = plots.image_grid(images, tmp_path / "grid.png", title="Samples")
    assert_png(path)
    assert_png(plots.image_grid(images, tmp_path / "grid2.png", rows=2))


def test_tile_puts_each_image_in_its_cell():
    images = np.arange(5 * 3 * 4, dtype=float).reshape(5, 3, 4)
    canvas = plots._tile(images, rows=2, cols=3)
    assert canvas.shape == (2 * 4 - 1, 3 * 5 - 1)  # 1-pixel gaps between cells
    for k in range(5):
        r, c = divmod(k, 3)
        np.testing.assert_array_equal(canvas[r * 4:r * 4 + 3, c * 5:c * 5 + 4], images[k])
    assert np.all(canvas[3, :] == 1) and np.all(canvas[:, 4] == 1)  # the gaps are white
    assert np.all(canvas[4:, 10:] == 1)  # the empty sixth cell too


def test_image_grid_rejects_wrong_size(tmp_path):
    with pytest.raises(ValueError, match="rows must be >= 1, got 0"):
        plots.image_grid(np.zeros((5, 784)), tmp_path / "g.png", rows=0)
    with pytest.raises(ValueError, match=r"\(5, 100\).*784.*\(28, 28\)"):
        plots.image_grid(np.zeros((5, 100)), tmp_path / "g.png")
    with pytest.raises(ValueError, match="no images"):
        plots.image_grid(np.zeros((0, 784)), tmp_path / "g.png")


def test_reconstructions(tmp_path):
    rng = np.random.default_rng(2)
    x = rng.random((15, 784))
    path = plots.reconstructions(x, np.clip(x + 0.1, 0, 1), tmp_path / "rec.png")
    assert_png(path)


def test_reconstructions_rejects_mismatch(tmp_path):
    with pytest.raises(ValueError, match="differ"):
        plots.reconstructions(np.zeros((4, 784)), np.zeros((3, 784)), tmp_path / "r.png")


def test_pca_recovers_dominant_direction():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(500, 1)) * [[10.0, 0.0, 0.0]] + rng.normal(size=(500, 3)) * 0.1
    x = x + 100.0  # far from the origin: PCA must centre the data first
    proj, ratio = plots.pca(x)
    assert proj.shape == (500, 2)
    assert ratio[0] > 0.99 and ratio[0] >= ratio[1]
    np.testing.assert_allclose(proj.mean(axis=0), 0, atol=1e-10)
    # the first component is the direction the data varies along: x's first column
    assert abs(np.corrcoef(proj[:, 0], x[:, 0])[0, 1]) > 0.999
    proj1, ratio1 = plots.pca(x[:, :1])  # one unit: second component is zeros
    assert np.all(proj1[:, 1] == 0) and ratio1[1] == 0


def test_pca_codes(tmp_path):
    rng = np.random.default_rng(4)
    n = 200
    labels = rng.integers(0, 10, n)
    codes = [rng.normal(size=(n, u)) + labels[:, None] for u in [8, 4, 1]]
    assert_png(plots.pca_codes(codes, labels, tmp_path / "pca.png"))
    assert_png(plots.pca_codes(codes, None, tmp_path / "pca_nolabels.png"))


def test_pca_codes_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        plots.pca_codes([], None, tmp_path / "p.png")
    with pytest.raises(ValueError, match="same N"):
        plots.pca_codes([np.zeros((10, 2)), np.zeros((9, 2))], None, tmp_path / "p.png")
    with pytest.raises(ValueError, match="labels"):
        plots.pca_codes([np.zeros((10, 2))], np.zeros(7), tmp_path / "p.png")
