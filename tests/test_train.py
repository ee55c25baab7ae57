"""Tests of the training script (train.py), its checkpoints (checkpoint.py) and the
evaluation script (evaluate.py), on a tiny model and a small synthetic data set.

train.py keeps its configuration as module globals that ``--key=value`` overrides
change, so every run reloads the module first. ``data.load_dataset`` is replaced by a
function returning 500 train / 128 test random grey-level images of 784 pixels.

The resume tests compare a run that was stopped (at the end of an epoch, in the middle
of one, during the end-of-epoch evaluation) and started again with one that ran
straight through: every array of the checkpoint (weights, batch-norm statistics, Adam
moments) must be bit-for-bit identical, and so must the metrics (but the timings).
"""
import importlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import autograd  # noqa: E402
import checkpoint  # noqa: E402
import data  # noqa: E402
import evaluate  # noqa: E402
import layers  # noqa: E402
import lvae  # noqa: E402
import train  # noqa: E402
from conftest import requires_cuda  # noqa: E402

TINY = ["--z_dims=4,2", "--hidden=16,8", "--n_dense=1", "--batch_size=64",
        "--eval_lk_samples=5", "--final_lk_samples=5", "--final_lk_images=20",
        "--warmup=3", "--log_interval=3"]
STEPS_PER_EPOCH = 8  # ceil(500 / 64), the last batch has 52 images
PLOTS = ["learning_curves.png", "kl_per_layer.png", "kl_per_unit.png", "samples.png",
         "reconstructions.png"]


def without(overrides, args):
    """``args`` less the options that ``overrides`` set (an option given twice is an error)."""
    keys = {arg.split("=")[0] for arg in overrides}
    return [arg for arg in args if arg.split("=")[0] not in keys]


def _synthetic_dataset():
    rng = np.random.default_rng(0)
    # grey levels with some structure: a per-pixel base level plus noise
    base = rng.random(784, dtype=np.float32)

    def images(n):
        return np.clip(base + 0.3 * rng.standard_normal((n, 784)), 0, 1).astype(np.float32)
    return data.Dataset(images(500), None, images(128), None, "synthetic")


SYNTHETIC = _synthetic_dataset()


@pytest.fixture
def fake_data(monkeypatch):
    """Replace data.load_dataset (seen by train.py and evaluate.py) for 'mnist'."""
    real = data.load_dataset

    def load(name, root=None):
        return SYNTHETIC if name == "mnist" else real(name, root)
    monkeypatch.setattr(data, "load_dataset", load)
    return SYNTHETIC


@pytest.fixture(autouse=True)
def python_sigint_handler():
    """Ctrl-C raises KeyboardInterrupt during these tests, whatever the test runner set."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture
def run(fake_data, monkeypatch):
    """run(out_dir, *overrides, final=False): a fresh train module, then main().

    final=False skips the plots and final evaluation (they do not touch the
    checkpoint) to keep the resume tests fast.
    """
    def _run(out_dir, *overrides, final=False):
        importlib.reload(train)
        if not final:
            monkeypatch.setattr(train, "finalize", lambda *args: None)
        return train.main([*without(overrides, [*TINY, f"--out_dir={out_dir}"]), *overrides])
    yield _run
    importlib.reload(train)  # leave a clean module behind


def read_ckpt(out_dir):
    with np.load(os.path.join(out_dir, "ckpt.npz"), allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    meta = json.loads(str(arrays.pop("meta")))
    return arrays, meta


def read_metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def without_timings(records):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def assert_same_checkpoint(dir_a, dir_b):
    a, meta_a = read_ckpt(dir_a)
    b, meta_b = read_ckpt(dir_b)
    assert sorted(a) == sorted(b)
    different = [k for k in a if not np.array_equal(a[k], b[k])]
    assert not different, f"arrays differ: {different[:5]}"
    for key in ("epoch", "step", "noise_rng", "data_rng"):
        assert meta_a[key] == meta_b[key], key
    assert without_timings(meta_a["history"]) == without_timings(meta_b["history"])


def assert_no_tmp_files(out_dir):
    leftovers = [p.name for p in Path(out_dir).iterdir() if p.name.endswith(".tmp")]
    assert not leftovers, leftovers


def interrupt_on_call(func, at, when=None, after=False, how="signal", sig=signal.SIGINT):
    """``func`` wrapped to interrupt on call number ``at`` (1-based), counting only the
    calls for which ``when(*args)`` is true, before ``func`` runs or (``after``) once it
    has run. how='signal' sends a real SIGINT, as Ctrl-C does (the default handler raises
    KeyboardInterrupt at once, wherever the program is); how='raise' raises
    KeyboardInterrupt itself. A plain function, so it also works patched onto a class."""
    calls = [0]

    def interrupt():
        if how == "signal":
            signal.raise_signal(sig)
        else:
            raise KeyboardInterrupt

    def wrapper(*args, **kwargs):
        hit = False
        if when is None or when(*args):
            calls[0] += 1
            hit = calls[0] == at
        if hit and not after:
            interrupt()
        result = func(*args, **kwargs)
        if hit and after:
            interrupt()
        return result
    return wrapper


# ----------------------------------------------------------------------------------
# A full run
# ----------------------------------------------------------------------------------
def test_full_run_writes_checkpoint_metrics_final_and_plots(run, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(out, "--epochs=2", "--eval_interval=1", final=True) == 0
    printed = capsys.readouterr().out
    assert "epoch 2:" in printed and "final: L_5" in printed

    for name in ["ckpt.npz", "metrics.jsonl", "final.json"] + PLOTS:
        assert (out / name).is_file(), name
    for name in PLOTS:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert_no_tmp_files(out)

    metrics = read_metrics(out)
    assert [m["epoch"] for m in metrics] == [1, 2]
    for m in metrics:
        assert {"epoch", "beta", "train_elbo", "train_log_px", "kl", "seconds", "test_elbo",
                "test_lk", "lk_samples"} <= set(m)
        assert len(m["kl"]) == 2 and all(k >= 0 for k in m["kl"])
        assert m["lk_samples"] == 5
        assert np.isfinite(m["train_elbo"]) and m["train_elbo"] < 0
        assert m["test_lk"] >= m["test_elbo"] - 1.0  # L_5 is (about) above the ELBO
    assert [m["beta"] for m in metrics] == [0.0, pytest.approx(1 / 3)]

    final = json.loads((out / "final.json").read_text())
    assert set(final) >= {"active_units", "test_elbo", "test_lk", "lk_samples", "lk_images"}
    assert final["lk_samples"] == 5 and final["lk_images"] == 20
    assert 0 < final["stderr"] < 5  # the standard error over 20 images' bounds
    assert final["epoch"] == 2
    for key in ("active_units", "informative_units"):
        assert len(final[key]) == 2
        assert all(isinstance(c, int) and 0 <= c <= u for c, u in zip(final[key], (4, 2)))

    arrays, meta = read_ckpt(out)  # no pickle needed
    assert meta["epoch"] == 2 and meta["step"] == 0
    assert meta["config"]["z_dims"] == [4, 2] and meta["config"]["model"] == "lvae"
    assert any(k.startswith("model/") for k in arrays) and "optim/t" in arrays
    assert int(arrays["optim/t"]) == 2 * STEPS_PER_EPOCH
    assert len(meta["history"]) == 2


def test_final_evaluation_recomputes_batch_norm_and_counts_informative_units_from_the_kl(
        run, tmp_path, monkeypatch):
    """finalize() recomputes the batch-norm statistics unless --bn_recompute=false, and its
    informative_units counts units whose KL (not whose activity) is above 0.01 nats."""
    calls, real = [], layers.recompute_batchnorm_statistics
    monkeypatch.setattr(layers, "recompute_batchnorm_statistics",
                        lambda *args: (calls.append(1), real(*args))[1])
    kl = [np.array([0.5, 0.0, 0.02, 0.005]), np.array([1.0, 0.0])]  # 2 and 1 above 0.01
    monkeypatch.setattr(lvae, "kl_per_unit", lambda *args: kl)
    monkeypatch.setattr(lvae, "active_units", lambda *args: ([np.zeros(4), np.zeros(2)], [0, 0]))
    assert run(tmp_path / "a", "--epochs=1", "--final_lk_samples=0", final=True) == 0
    assert calls == [1]
    assert json.loads((tmp_path / "a" / "final.json").read_text())["informative_units"] == [2, 1]
    calls.clear()
    assert run(tmp_path / "b", "--epochs=1", "--final_lk_samples=0", "--bn_recompute=false",
               final=True) == 0
    assert calls == []


def test_eval_lk_images_sets_the_images_of_the_periodic_bound(run, tmp_path):
    assert run(tmp_path / "run", "--epochs=1", "--eval_lk_images=10") == 0
    assert read_metrics(tmp_path / "run")[0]["lk_images"] == 10


def test_more_lk_images_than_the_test_set_has_uses_all_with_a_note(run, tmp_path, capsys):
    """They were cut to the test set's size with no word (only the printed count showed it)."""
    n = len(SYNTHETIC.test_x)
    assert run(tmp_path / "run", "--epochs=1", "--eval_lk_images=20000",
               "--final_lk_images=20000") == 0
    out = capsys.readouterr().out
    for key in ("eval_lk_images", "final_lk_images"):
        assert (f"note: --{key}=20000, but the mnist test set has {n} images: all of them are "
                f"used") in out
    assert read_metrics(tmp_path / "run")[0]["lk_images"] == n


def test_final_bound_on_one_image_has_no_standard_error(run, tmp_path, capsys):
    """One image has no spread: +- nan on the screen, and no stderr in final.json (JSON has
    no NaN; compare.py then shows the bound without one)."""
    assert run(tmp_path / "run", "--epochs=1", "--final_lk_images=1", final=True) == 0
    assert "+- nan on 1 test images" in capsys.readouterr().out
    final = json.loads((tmp_path / "run" / "final.json").read_text(),
                       parse_constant=lambda name: pytest.fail(f"{name} in final.json"))
    assert final["lk_images"] == 1 and "stderr" not in final


@pytest.mark.parametrize("args, note", [
    (["--eval_lk_samples=0", "--eval_lk_images=10"],
     "note: --eval_lk_images has no effect: --eval_lk_samples=0 skips the periodic L_K"),
    (["--final_lk_samples=0", "--final_lk_images=20000"],
     "note: --final_lk_images has no effect: --final_lk_samples=0 skips the final L_K"),
    (["--batch_norm=false", "--bn_recompute=false"],
     "note: --bn_recompute has no effect: --batch_norm=false leaves no statistics to recompute"),
])
def test_an_option_that_another_turns_off_gets_a_note(run, tmp_path, capsys, args, note):
    """Accepted and ignored, they changed nothing without a word. (Not errors: a command
    that skips L_K may keep its --final_lk_images.)"""
    assert run(tmp_path / "run", "--epochs=1", *args) == 0
    out = capsys.readouterr().out
    assert note in out
    assert "--final_lk_images=20000, but" not in out  # no note on images that are not used


def test_beta_rises_over_the_warm_up_and_then_stays_at_1(monkeypatch):
    monkeypatch.setattr(train, "warmup", 3)
    assert [train.beta_for(e) for e in (0, 1, 3, 4, 10)] == [0.0, pytest.approx(1 / 3), 1, 1, 1]
    monkeypatch.setattr(train, "warmup", 0)
    assert train.beta_for(0) == 1.0


def test_vae_with_iw_objective_and_no_batch_norm(run, tmp_path):
    out = tmp_path / "vae"
    assert run(out, "--model=vae", "--iw_samples=3", "--warmup=0", "--batch_norm=false", "--epochs=1") == 0
    arrays, meta = read_ckpt(out)
    assert meta["config"]["model"] == "vae" and meta["config"]["batch_norm"] is False
    assert not any("norm" in k for k in arrays)
    assert np.isfinite(read_metrics(out)[0]["train_elbo"])


def test_recorded_train_terms_are_the_batch_size_weighted_means(run, tmp_path, monkeypatch):
    """train_elbo, train_log_px and kl of an epoch: the means over its images of the terms
    of every training step (the last batch holds 52 images, the others 64)."""
    real, steps = lvae.elbo, []

    def elbo(net, x, noise, beta=1.0):
        objective, terms = real(net, x, noise, beta)
        if net.training:
            steps.append((float(terms["elbo"]), float(terms["log_px"]),
                          [float(k) for k in terms["kl"]], len(x)))
        return objective, terms
    monkeypatch.setattr(lvae, "elbo", elbo)
    out = tmp_path / "run"
    assert run(out, "--epochs=1") == 0
    assert [n for *_, n in steps] == [64] * 7 + [52]
    n = sum(b for *_, b in steps)
    record = read_metrics(out)[0]
    assert record["train_elbo"] == pytest.approx(sum(e * b for e, _, _, b in steps) / n, rel=1e-12)
    assert record["train_log_px"] == pytest.approx(sum(p * b for _, p, _, b in steps) / n, rel=1e-12)
    for i, kl in enumerate(record["kl"]):
        assert kl == pytest.approx(sum(k[i] * b for _, _, k, b in steps) / n, rel=1e-12)


@pytest.mark.parametrize("change", ["--model=vae", "--batch_norm=false", "--hidden=16,4"])
def test_init_from_another_architecture_names_the_difference(run, tmp_path, change):
    assert run(tmp_path / "a", "--epochs=1", change) == 0
    key, value = change[2:].split("=")
    with pytest.raises(checkpoint.CheckpointError, match=f"was trained with {key}=.*but this run "
                                                         f"has {key}=.*same architecture"):
        run(tmp_path / "b", "--epochs=1", f"--init_from={tmp_path / 'a' / 'ckpt.npz'}")


def test_init_from_loads_weights_only(run, tmp_path):
    assert run(tmp_path / "a", "--epochs=1") == 0
    importlib.reload(train)
    assert run(tmp_path / "b", "--epochs=1", "--lr=0",
               f"--init_from={tmp_path / 'a' / 'ckpt.npz'}") == 0
    a, _ = read_ckpt(tmp_path / "a")
    b, meta_b = read_ckpt(tmp_path / "b")
    assert meta_b["epoch"] == 1  # a fresh run, not a resume of a
    # lr=0: the weights stay those loaded (batch-norm statistics move on)
    weights = [k for k in a if k.startswith("model/") and "running" not in k]
    assert weights and all(np.array_equal(a[k], b[k]) for k in weights)


# ----------------------------------------------------------------------------------
# Resuming
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("eval_interval", [2, 10])
def test_resume_after_a_finished_run_continues_identically(run, tmp_path, eval_interval):
    """4 epochs straight = 2 epochs, then the same command with --epochs=4. With
    eval_interval=10 only the stopped run evaluates at epoch 2: evaluations must not
    change the training stream."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    flags = [f"--eval_interval={eval_interval}"]
    assert run(straight, "--epochs=4", *flags) == 0
    assert run(resumed, "--epochs=2", *flags) == 0
    assert read_ckpt(resumed)[1]["epoch"] == 2
    assert run(resumed, "--epochs=4", *flags) == 0
    a, b = read_ckpt(straight), read_ckpt(resumed)
    assert a[1]["epoch"] == b[1]["epoch"] == 4
    different = [k for k in a[0] if not np.array_equal(a[0][k], b[0][k])]
    assert not different, f"arrays differ: {different[:5]}"
    assert a[1]["noise_rng"] == b[1]["noise_rng"]
    ma, mb = without_timings(read_metrics(straight)), without_timings(read_metrics(resumed))
    if eval_interval == 2:
        assert ma == mb
    else:  # the stopped run also evaluated at its last epoch (2): compare the rest
        train_keys = ("epoch", "beta", "train_elbo", "train_log_px", "kl")
        assert [{k: r[k] for k in train_keys} for r in ma] == \
               [{k: r[k] for k in train_keys} for r in mb]
        assert ma[3] == mb[3]
        assert "test_elbo" in mb[1] and "test_elbo" not in ma[1]


def test_cosine_lr_decay_goes_from_lr_to_min_lr_and_is_used_by_adam(run, tmp_path, monkeypatch):
    """--decay_lr: epoch e trains at min_lr + (lr - min_lr)(1 + cos(pi e / (epochs - 1))) / 2
    (from lr at the first epoch to min_lr at the last, recorded per epoch), and Adam steps
    with that lr; without it the lr stays constant."""
    used = []
    real = layers.Adam.step
    monkeypatch.setattr(layers.Adam, "step", lambda self: (used.append(self.lr), real(self))[1])
    assert run(tmp_path / "cos", "--epochs=4", "--lr=1e-2", "--decay_lr=true", "--min_lr=1e-3") == 0
    # cos(0) = 1, cos(pi/3) = 1/2, cos(2 pi/3) = -1/2, cos(pi) = -1 (a linear decay would
    # give 7e-3 and 4e-3 in the middle)
    expected = [1e-2, 1e-3 + 0.75 * 9e-3, 1e-3 + 0.25 * 9e-3, 1e-3]
    assert [r["lr"] for r in read_metrics(tmp_path / "cos")] == pytest.approx(expected, rel=1e-12)
    assert used == pytest.approx(np.repeat(expected, STEPS_PER_EPOCH), rel=1e-12)

    used.clear()
    assert run(tmp_path / "constant", "--epochs=2", "--lr=1e-2") == 0
    assert [r["lr"] for r in read_metrics(tmp_path / "constant")] == [1e-2, 1e-2]
    assert set(used) == {1e-2}


def test_ctrl_c_then_resume_with_lr_decay_is_identical(run, tmp_path, monkeypatch):
    """The decayed lr is a function of the epoch alone: a run stopped in its second epoch
    resumes on the same curve."""
    flags = ["--epochs=3", "--decay_lr=true", "--min_lr=1e-4"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert run(straight, *flags) == 0
    real = layers.Adam.step
    monkeypatch.setattr(layers.Adam, "step", interrupt_on_call(real, STEPS_PER_EPOCH + 3))
    assert run(stopped, *flags) == 1
    monkeypatch.setattr(layers.Adam, "step", real)
    assert run(stopped, *flags) == 0
    assert_same_checkpoint(straight, stopped)
    assert without_timings(read_metrics(straight)) == without_timings(read_metrics(stopped))


def test_running_again_after_the_last_epoch_does_nothing(run, tmp_path):
    out = tmp_path / "run"
    assert run(out, "--epochs=1") == 0
    before = read_ckpt(out)[0]
    assert run(out, "--epochs=1") == 0
    after = read_ckpt(out)[0]
    assert all(np.array_equal(before[k], after[k]) for k in before)
    assert len(read_metrics(out)) == 1


@pytest.mark.parametrize("interrupt_at", [3, STEPS_PER_EPOCH + 5])
def test_ctrl_c_in_optimizer_step_then_resume_is_identical(run, tmp_path, monkeypatch,
                                                           interrupt_at):
    """Ctrl-C arrives during the k-th step, before its optimiser update: the step is
    finished first (never half-applied), the checkpoint holds k steps, and resuming
    gives exactly the uninterrupted run."""
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert run(straight, "--epochs=2") == 0

    handler = signal.getsignal(signal.SIGINT)
    real = layers.Adam.step
    monkeypatch.setattr(layers.Adam, "step", interrupt_on_call(real, interrupt_at))
    assert run(stopped, "--epochs=2") == 1  # main reports the interruption
    monkeypatch.setattr(layers.Adam, "step", real)
    assert signal.getsignal(signal.SIGINT) is handler  # restored
    assert_no_tmp_files(stopped)
    arrays, meta = read_ckpt(stopped)
    assert (meta["epoch"], meta["step"]) == divmod(interrupt_at, STEPS_PER_EPOCH)
    assert int(arrays["optim/t"]) == interrupt_at
    assert meta["sums"]["n"] == 64 * (interrupt_at % STEPS_PER_EPOCH)
    assert len(meta["history"]) == interrupt_at // STEPS_PER_EPOCH

    assert run(stopped, "--epochs=2") == 0
    assert_same_checkpoint(straight, stopped)
    assert without_timings(read_metrics(straight)) == without_timings(read_metrics(stopped))


@pytest.mark.parametrize("model", ["lvae", "vae"])
def test_ctrl_c_after_the_forward_pass_then_resume_is_identical(run, tmp_path, monkeypatch,
                                                                model):
    """Ctrl-C once the forward pass of a step has drawn its noise and updated the
    batch-norm statistics."""
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert run(straight, "--epochs=2", f"--model={model}") == 0
    real = lvae.elbo
    monkeypatch.setattr(lvae, "elbo", interrupt_on_call(real, STEPS_PER_EPOCH + 2, after=True,
                                                        when=lambda net, *a: net.training))
    assert run(stopped, "--epochs=2", f"--model={model}") == 1
    monkeypatch.setattr(lvae, "elbo", real)
    _, meta = read_ckpt(stopped)
    assert (meta["epoch"], meta["step"]) == (1, 2)
    assert run(stopped, "--epochs=2", f"--model={model}") == 0
    assert_same_checkpoint(straight, stopped)


def test_sigterm_then_resume_is_identical(run, tmp_path, monkeypatch):
    """`kill` (SIGTERM), as a job scheduler sends it, stops like Ctrl-C when train.py runs
    as a script: the step in progress is finished, saved, and resuming is exact."""
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert run(straight, "--epochs=2") == 0
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)  # as __main__ does
    try:
        real = layers.Adam.step
        monkeypatch.setattr(layers.Adam, "step",
                            interrupt_on_call(real, STEPS_PER_EPOCH + 2, sig=signal.SIGTERM))
        assert run(stopped, "--epochs=2") == 1
        monkeypatch.setattr(layers.Adam, "step", real)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert read_ckpt(stopped)[1]["step"] == 2
    assert run(stopped, "--epochs=2") == 0
    assert_same_checkpoint(straight, stopped)


@pytest.mark.parametrize("stop", ["SIGTERM", pytest.param("SIGHUP", marks=pytest.mark.skipif(
    not hasattr(signal, "SIGHUP"), reason="no SIGHUP on this system"))])
def test_script_saves_on_sigterm(tmp_path, stop):
    """The real thing: train.py started as a script, sent SIGTERM (`kill`) or SIGHUP (the
    terminal was closed) during its first epoch. The child starts with the signal at its
    default, as from a terminal: under `nohup pytest` it would inherit SIGHUP ignored, and
    train.py rightly keeps running then (the next test)."""
    out = tmp_path / "run"
    command = [sys.executable, str(ROOT / "train.py"), "--z_dims=4,2", "--hidden=16,8",
               "--n_dense=1", "--epochs=1000", "--warmup=0", "--eval_interval=0",
               "--final_lk_samples=0", "--log_interval=1", f"--out_dir={out}"]
    at_default = lambda: signal.signal(getattr(signal, stop), signal.SIG_DFL)  # noqa: E731
    with subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True,
                          env={**os.environ, "OPENBLAS_NUM_THREADS": "1"},
                          preexec_fn=at_default) as proc:
        for line in proc.stdout:  # wait until a few steps are done
            if "step 3/" in line:
                break
        proc.send_signal(getattr(signal, stop))
        rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1, rest
    assert "interrupted:" in rest and "run the same command again to resume" in rest
    meta = read_ckpt(out)[1]
    assert meta["epoch"] == 0 and meta["step"] >= 3


def test_script_saves_when_its_output_is_closed(tmp_path):
    """`python train.py | head`: once head has its lines, the next print fails (a broken
    pipe). That stops the run and saves it as Ctrl-C does (it used to die with nothing
    saved), and the message goes to stderr."""
    out = tmp_path / "run"
    command = [sys.executable, str(ROOT / "train.py"), "--z_dims=4,2", "--hidden=16,8",
               "--n_dense=1", "--epochs=1000", "--warmup=0", "--eval_interval=0",
               "--final_lk_samples=0", "--log_interval=1", f"--out_dir={out}"]
    with subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, env={**os.environ, "OPENBLAS_NUM_THREADS": "1"}) as proc:
        for line in proc.stdout:  # head: read a few lines, then go
            if "step 3/" in line:
                break
        proc.stdout.close()
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    assert "stopped: the output was closed (broken pipe): " in err, err
    assert "run the same command again to resume" in err and "Traceback" not in err, err
    meta = read_ckpt(out)[1]
    assert meta["epoch"] == 0 and meta["step"] >= 3


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="no SIGHUP on this system")
def test_script_started_with_sighup_ignored_keeps_running(tmp_path):
    """`nohup python train.py` ignores SIGHUP: closing the terminal must not stop the run
    (train.py handles only the stop signals left at their default)."""
    out = tmp_path / "run"
    command = [sys.executable, str(ROOT / "train.py"), "--z_dims=4,2", "--hidden=16,8",
               "--n_dense=1", "--epochs=1000", "--warmup=0", "--eval_interval=0",
               "--final_lk_samples=0", "--log_interval=1", f"--out_dir={out}"]
    with subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True,
                          env={**os.environ, "OPENBLAS_NUM_THREADS": "1"},
                          preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN)) as proc:
        lines = iter(proc.stdout)
        for line in lines:
            if "step 3/" in line:
                break
        proc.send_signal(signal.SIGHUP)
        for line in lines:  # still training: more steps come
            if "step 8/" in line:
                break
        assert proc.poll() is None, "the run stopped on SIGHUP although it was ignored"
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "interrupted:" in rest


def test_script_says_out_of_memory_without_a_traceback(tmp_path):
    """A model far too large fails at its first allocation: one line, no traceback."""
    command = [sys.executable, str(ROOT / "train.py"), "--z_dims=4,2", "--hidden=100000000,8",
               f"--out_dir={tmp_path / 'run'}"]
    resource = pytest.importorskip("resource")  # POSIX
    # an 8 GiB address-space limit makes the allocation fail on any machine, also where
    # the kernel would grant it (vm.overcommit_memory = 1) and then run out of memory
    limit = lambda: resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))  # noqa: E731
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120,
                          preexec_fn=limit, env={**os.environ, "OPENBLAS_NUM_THREADS": "1"})
    assert done.returncode == 1
    assert done.stderr.startswith("error: out of memory (Unable to allocate") and \
        "try smaller --hidden" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "run").exists()


def test_ctrl_c_in_iw_training_then_resume_is_identical(run, tmp_path, monkeypatch):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    flags = ["--epochs=2", "--iw_samples=3", "--warmup=0"]
    assert run(straight, *flags) == 0
    real = lvae.iw_bound
    monkeypatch.setattr(lvae, "iw_bound", interrupt_on_call(real, 5, after=True))
    assert run(stopped, *flags) == 1
    monkeypatch.setattr(lvae, "iw_bound", real)
    assert run(stopped, *flags) == 0
    assert_same_checkpoint(straight, stopped)


def test_ctrl_c_twice_then_resume_is_identical(run, tmp_path, monkeypatch):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert run(straight, "--epochs=3") == 0
    real = layers.Adam.step
    for at in (4, 7):  # steps 4 (epoch 1), then 4 + 7 = 11 (epoch 2, step 3)
        monkeypatch.setattr(layers.Adam, "step", interrupt_on_call(real, at))
        assert run(stopped, "--epochs=3") == 1
    monkeypatch.setattr(layers.Adam, "step", real)
    assert read_ckpt(stopped)[1]["step"] == 11 - STEPS_PER_EPOCH
    assert run(stopped, "--epochs=3") == 0
    assert_same_checkpoint(straight, stopped)


@pytest.mark.parametrize("how", ["signal", "raise"])
def test_ctrl_c_during_end_of_epoch_evaluation_then_resume_is_identical(
        run, tmp_path, monkeypatch, how):
    """Ctrl-C while epoch 2 is being evaluated: the epoch's training is done but not
    recorded. Resuming must record epoch 2 once, then train epoch 3, as straight."""
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    flags = ["--epochs=3", "--eval_interval=2"]
    assert run(straight, *flags) == 0
    real = lvae.log_likelihood_bound
    monkeypatch.setattr(lvae, "log_likelihood_bound", interrupt_on_call(real, 1, how=how))
    assert run(stopped, *flags) == 1
    monkeypatch.setattr(lvae, "log_likelihood_bound", real)
    assert [m["epoch"] for m in read_metrics(stopped)] == [1]
    assert (read_ckpt(stopped)[1]["epoch"], read_ckpt(stopped)[1]["step"]) == (1, STEPS_PER_EPOCH)
    assert run(stopped, *flags) == 0
    assert [m["epoch"] for m in read_metrics(stopped)] == [1, 2, 3]
    assert_same_checkpoint(straight, stopped)
    assert without_timings(read_metrics(straight)) == without_timings(read_metrics(stopped))


def test_a_second_ctrl_c_during_the_save_on_interrupt_waits_for_it(run, tmp_path, monkeypatch,
                                                                   capsys):
    """Ctrl-C at step 4, then Ctrl-C again while that stop's checkpoint is being written:
    the save finishes, the 4 steps are kept, and resuming continues identically."""
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert run(straight, "--epochs=2") == 0
    real_step, real_save = layers.Adam.step, checkpoint.save
    monkeypatch.setattr(layers.Adam, "step", interrupt_on_call(real_step, 4))
    monkeypatch.setattr(checkpoint, "save", interrupt_on_call(real_save, 1))
    assert run(stopped, "--epochs=2") == 1
    printed = capsys.readouterr().out
    assert "could not be written" not in printed and "holds epoch 1, after step 4" in printed
    monkeypatch.setattr(layers.Adam, "step", real_step)
    monkeypatch.setattr(checkpoint, "save", real_save)
    assert read_ckpt(stopped)[1]["step"] == 4
    assert run(stopped, "--epochs=2") == 0
    assert_same_checkpoint(straight, stopped)


def test_a_second_ctrl_c_while_the_last_steps_are_summed_waits_too(run, tmp_path, monkeypatch,
                                                                   capsys):
    """The save on Ctrl-C first adds the pending steps' terms (on a GPU a read-back that
    waits for it); a second Ctrl-C there waits as well, and nothing is lost."""
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert run(straight, "--epochs=2") == 0
    real_step = layers.Adam.step
    monkeypatch.setattr(layers.Adam, "step", interrupt_on_call(real_step, 4))
    importlib.reload(train)  # as run() does, but with add_terms patched after the reload
    monkeypatch.setattr(train, "finalize", lambda *args: None)
    # on the CPU add_terms also runs in each step (4 calls, the 4th with the stop held
    # until the step is done): call 5 is the one on the way out
    monkeypatch.setattr(train, "add_terms", interrupt_on_call(train.add_terms, 5))
    assert train.main([*TINY, f"--out_dir={stopped}", "--epochs=2"]) == 1
    assert "holds epoch 1, after step 4" in capsys.readouterr().out
    monkeypatch.setattr(layers.Adam, "step", real_step)
    assert run(stopped, "--epochs=2") == 0
    assert_same_checkpoint(straight, stopped)


def test_continuing_a_finished_run_removes_its_final_json(run, tmp_path, monkeypatch, capsys):
    """final.json describes the weights at the end of the earlier, shorter run: once more
    epochs train it is stale, so it goes, and the new end writes it again."""
    out = tmp_path / "run"
    assert run(out, "--epochs=1", "--final_lk_samples=0", final=True) == 0
    assert json.loads((out / "final.json").read_text())["epoch"] == 1
    real = lvae.kl_per_unit
    monkeypatch.setattr(lvae, "kl_per_unit", interrupt_on_call(real, 1, how="raise"))
    assert run(out, "--epochs=2", "--final_lk_samples=0", final=True) == 1  # stopped in finalize
    assert "removed" in capsys.readouterr().out and not (out / "final.json").exists()
    monkeypatch.setattr(lvae, "kl_per_unit", real)
    assert run(out, "--epochs=2", "--final_lk_samples=0", final=True) == 0
    assert json.loads((out / "final.json").read_text())["epoch"] == 2


def test_interrupt_before_any_step_is_done_saves_nothing(run, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    monkeypatch.setattr(layers.Adam, "step",
                        interrupt_on_call(layers.Adam.step, 1, how="raise"))
    assert run(out, "--epochs=1") == 1
    assert not (out / "ckpt.npz").exists()
    assert "nothing saved" in capsys.readouterr().out


@pytest.mark.gpu
@requires_cuda
def test_ctrl_c_then_resume_on_gpu_is_identical(run, tmp_path, monkeypatch):
    """On the GPU the terms are read back every log_interval (3) steps: Ctrl-C at step 5
    must still save the terms of steps 4 and 5, and resuming continues identically."""
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    flags = ["--epochs=2", "--device=cuda"]
    assert run(straight, *flags) == 0
    real = layers.Adam.step
    monkeypatch.setattr(layers.Adam, "step", interrupt_on_call(real, 5))
    assert run(stopped, *flags) == 1
    monkeypatch.setattr(layers.Adam, "step", real)
    meta = read_ckpt(stopped)[1]
    assert (meta["epoch"], meta["step"], meta["sums"]["n"]) == (0, 5, 5 * 64)
    assert run(stopped, *flags) == 0
    assert_same_checkpoint(straight, stopped)
    assert without_timings(read_metrics(straight)) == without_timings(read_metrics(stopped))


def test_deferred_interrupt_holds_ctrl_c_until_the_block_ends():
    importlib.reload(train)
    handler = signal.getsignal(signal.SIGINT)
    done = []
    with pytest.raises(KeyboardInterrupt):
        with train.deferred_interrupt():
            signal.raise_signal(signal.SIGINT)
            done.append("rest of the step")
    assert done == ["rest of the step"]
    assert signal.getsignal(signal.SIGINT) is handler
    with train.deferred_interrupt():  # no signal: nothing happens
        done.append("step")
    # an exception inside the block propagates and the handler is restored
    with pytest.raises(ZeroDivisionError):
        with train.deferred_interrupt():
            1 / 0
    assert signal.getsignal(signal.SIGINT) is handler
    # where Ctrl-C is ignored, it stays ignored
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with train.deferred_interrupt():
            signal.raise_signal(signal.SIGINT)
            done.append("ignored")
    finally:
        signal.signal(signal.SIGINT, handler)
    assert done[-1] == "ignored"
    # outside the main thread it does nothing (signals are not delivered there)
    errors = []

    def worker():
        try:
            with train.deferred_interrupt():
                done.append("thread")
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)
    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert not errors and done[-1] == "thread"


# ----------------------------------------------------------------------------------
# Checkpoint files
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("failure", [OSError, KeyboardInterrupt])
def test_checkpoint_write_is_atomic(run, tmp_path, monkeypatch, failure):
    """A failure while writing (disk full, Ctrl-C) leaves the previous checkpoint intact
    and no .tmp file."""
    out = tmp_path / "run"
    assert run(out, "--epochs=1") == 0
    before = (out / "ckpt.npz").read_bytes()

    def failing_savez(f, **arrays):
        f.write(b"half a checkpoint")
        raise failure("no space left on device")
    monkeypatch.setattr(checkpoint.np, "savez", failing_savez)
    if failure is KeyboardInterrupt:  # train.py treats it as Ctrl-C and stops cleanly
        assert run(out, "--epochs=2") == 1
    else:
        with pytest.raises(OSError, match=r"no space left on device while writing .*ckpt.npz; "
                                          r"the file there before, if any, is unchanged"):
            run(out, "--epochs=2")  # the end-of-epoch save fails
    monkeypatch.undo()
    assert (out / "ckpt.npz").read_bytes() == before
    assert_no_tmp_files(out)
    assert read_ckpt(out)[1]["epoch"] == 1


@pytest.mark.parametrize("beyond", [1, 5])  # 1: the boundary of the check
def test_a_checkpoint_step_beyond_the_epoch_is_corrupt(run, tmp_path, beyond):
    """A readable checkpoint whose step lies past the epoch's end (edited by hand, or by
    other code) is named, not a ZeroDivisionError from an empty epoch."""
    out = tmp_path / "run"
    assert run(out, "--epochs=1") == 0
    with np.load(out / "ckpt.npz", allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    meta = json.loads(str(arrays.pop("meta")))
    meta.update(step=STEPS_PER_EPOCH + beyond,
                sums={"elbo": 0.0, "log_px": 0.0, "kl": [0.0, 0.0], "n": 64})
    np.savez(out / "ckpt.npz", meta=np.array(json.dumps(meta)), **arrays)
    with pytest.raises(checkpoint.CheckpointError, match=f"corrupt: it stopped after step "
                                                         f"{STEPS_PER_EPOCH + beyond} of an epoch "
                                                         f"of {STEPS_PER_EPOCH} steps"):
        run(out, "--epochs=2")


@pytest.mark.parametrize("edit", [
    lambda meta: meta["history"][0].pop("kl"),
    lambda meta: meta.update(step=2, sums={"elbo": 0.0, "log_px": 0.0, "kl": [0.0], "n": 128}),
], ids=["record-without-kl", "sums-with-one-kl"])
def test_a_checkpoint_the_final_plots_could_not_use_is_refused_on_resuming(run, tmp_path, edit):
    """These used to train on, then stop in plots.py at the end of the run."""
    out = tmp_path / "run"
    assert run(out, "--epochs=1") == 0
    arrays, meta = read_ckpt(out)
    edit(meta)
    np.savez(out / "ckpt.npz", meta=np.array(json.dumps(meta)), **arrays)
    with pytest.raises(checkpoint.CheckpointError, match=r"ckpt\.npz is corrupt: its "
                                                         r"(history holds|sums are).*2 numbers for kl"):
        run(out, "--epochs=2", final=True)


def test_truncated_checkpoint_is_a_clear_error(run, tmp_path):
    out = tmp_path / "run"
    assert run(out, "--epochs=1") == 0
    path = out / "ckpt.npz"
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(checkpoint.CheckpointError, match="ckpt.npz.*corrupt"):
        run(out, "--epochs=2")
    with pytest.raises(checkpoint.CheckpointError, match=str(path)):
        checkpoint.read_config(str(path))
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(checkpoint.CheckpointError, match="corrupt"):
        run(out, "--epochs=2")
    with pytest.raises(checkpoint.CheckpointError, match="does not exist"):
        checkpoint.read_config(str(out / "missing.npz"))


@pytest.mark.parametrize("change", ["--z_dims=3,2", "--hidden=16,4", "--model=vae",
                                    "--n_dense=2", "--batch_norm=false"])
def test_resume_with_another_architecture_is_a_clear_error(run, tmp_path, change):
    out = tmp_path / "run"
    assert run(out, "--epochs=1") == 0
    key = change[2:].split("=")[0]
    with pytest.raises(checkpoint.CheckpointError, match=f"trained with {key}=.*another out_dir"):
        run(out, "--epochs=2", change)


def test_resume_prints_changed_options_and_refuses_a_new_init_from(run, tmp_path, capsys):
    base, other = tmp_path / "base", tmp_path / "other"
    assert run(base, "--epochs=1") == 0
    assert run(other, "--epochs=1") == 0
    capsys.readouterr()
    assert run(base, "--epochs=2", "--lr=0.0005", "--log_interval=5") == 0
    # the whole line: a change that does not matter to a resumed run (log_interval,
    # out_dir, device) is not listed
    changed = [line for line in capsys.readouterr().out.splitlines()
               if line.startswith("resuming with changed options:")]
    assert changed == ["resuming with changed options: epochs 1 -> 2, lr 0.002 -> 0.0005"]
    # fine-tuning into the base run's out_dir would resume it and ignore init_from
    with pytest.raises(ValueError, match=r"init_from=''.*ignore --init_from=.*own --out_dir"):
        run(base, "--epochs=3", f"--init_from={other / 'ckpt.npz'}")


def test_a_fine_tuning_run_resumes_without_repeating_init_from(run, tmp_path, capsys):
    base, tuned = tmp_path / "base", tmp_path / "tuned"
    assert run(base, "--epochs=1") == 0
    assert run(tuned, "--epochs=1", f"--init_from={base / 'ckpt.npz'}") == 0
    capsys.readouterr()
    assert run(tuned, "--epochs=2") == 0  # the weights come from its own checkpoint
    out = capsys.readouterr().out
    assert "resuming from" in out and "init_from" not in out
    assert read_ckpt(tuned)[1]["epoch"] == 2


def test_warm_up_as_long_as_the_run_is_noted(run, tmp_path, capsys):
    assert run(tmp_path / "run", "--epochs=2", "--warmup=2") == 0
    assert "note: --warmup=2 is not shorter than --epochs=2: beta only reaches 0.50" in \
        capsys.readouterr().out


def test_resume_in_the_middle_of_an_epoch_with_another_batch_size_is_refused(
        run, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real = layers.Adam.step
    monkeypatch.setattr(layers.Adam, "step", interrupt_on_call(real, 3, how="raise"))
    assert run(out, "--epochs=1") == 1
    monkeypatch.setattr(layers.Adam, "step", real)
    assert read_ckpt(out)[1]["step"] == 2
    with pytest.raises(ValueError, match=r"after step 2 .* batches of 64.*--batch_size=64"):
        run(out, "--epochs=1", "--batch_size=32")
    assert run(out, "--epochs=1") == 0  # the same batch size resumes


def test_resume_in_the_middle_of_an_epoch_with_fewer_epochs_is_refused(run, tmp_path,
                                                                        monkeypatch):
    """It said 'the checkpoint holds 1 epochs: nothing to train' and wrote a final.json
    for epoch 1 of weights trained 2 steps further."""
    out = tmp_path / "run"
    real = layers.Adam.step
    monkeypatch.setattr(layers.Adam, "step",
                        interrupt_on_call(real, STEPS_PER_EPOCH + 3, how="raise"))
    assert run(out, "--epochs=2") == 1
    monkeypatch.setattr(layers.Adam, "step", real)
    with pytest.raises(ValueError, match=r"stopped in epoch 2, after step 2: its weights are "
                                         r"not those of the end of epoch 1; resume with "
                                         r"--epochs=2 or more"):
        run(out, "--epochs=1", final=True)
    assert not (out / "final.json").exists()
    assert run(out, "--epochs=2") == 0


def test_a_resumed_epoch_counts_the_time_before_the_stop(run, tmp_path, monkeypatch):
    """The seconds recorded for an epoch stopped by Ctrl-C and resumed include both parts
    (a clock that advances one second per reading makes the parts visible)."""
    out = tmp_path / "run"
    clock = iter(range(10 ** 6))
    monkeypatch.setattr(train.time, "perf_counter", lambda: float(next(clock)))
    real = layers.Adam.step
    monkeypatch.setattr(layers.Adam, "step", interrupt_on_call(real, 5, after=True))
    assert run(out, "--epochs=1", "--log_interval=0") == 1
    before_stop = read_ckpt(out)[1]["sums"]["seconds"]
    assert before_stop >= 1
    monkeypatch.setattr(layers.Adam, "step", real)
    assert run(out, "--epochs=1", "--log_interval=0") == 0
    assert read_metrics(out)[0]["seconds"] > before_stop


def test_ctrl_c_during_the_end_of_epoch_save_keeps_the_epoch(run, tmp_path, monkeypatch, capsys):
    """A real SIGINT while epoch 2's checkpoint is written: the write finishes, the
    message is true, and resuming gives the straight run."""
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert run(straight, "--epochs=3") == 0
    real = checkpoint.save
    monkeypatch.setattr(checkpoint, "save", interrupt_on_call(real, 2))
    assert run(stopped, "--epochs=3") == 1
    monkeypatch.setattr(checkpoint, "save", real)
    assert "ckpt.npz holds the end of epoch 2" in capsys.readouterr().out
    assert read_ckpt(stopped)[1]["epoch"] == 2
    assert [m["epoch"] for m in read_metrics(stopped)] == [1, 2]
    assert run(stopped, "--epochs=3") == 0
    assert_same_checkpoint(straight, stopped)


def test_ctrl_c_during_the_final_evaluation_says_training_is_saved(run, tmp_path, monkeypatch,
                                                                  capsys):
    out = tmp_path / "run"
    monkeypatch.setattr(lvae, "sample_prior", interrupt_on_call(lvae.sample_prior, 1, how="raise"))
    assert run(out, "--epochs=1", final=True) == 1
    assert "interrupted during the final evaluation: training is complete and saved" in \
        capsys.readouterr().out
    assert read_ckpt(out)[1]["epoch"] == 1


# ----------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_prints_every_option_with_its_default_and_comment(run, tmp_path, capsys, flag):
    with pytest.raises(SystemExit) as stop:
        run(tmp_path, flag)
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("Train a Ladder VAE") and "Options (--key=value)" in out
    for key in train.config_keys:  # every option, on a line of its own as in the source
        assert re.search(rf"^{key} = ", out, re.M), key
    assert "warmup = 200" in out and "epochs over which beta rises" in out
    assert not (tmp_path / "ckpt.npz").exists()


def test_unknown_option_lists_the_valid_ones(run, tmp_path):
    with pytest.raises(SystemExit, match=r"unknown option 'epoch'.*epochs.*batch_size"):
        run(tmp_path, "--epoch=3")


@pytest.mark.parametrize("arg, pattern", [
    ("--epochs=abc", r"--epochs expects an integer like 2000, got 'abc'"),
    ("--lr=fast", r"--lr expects a number like 0.002"),
    ("--batch_norm=maybe", r"--batch_norm expects true or false"),
    ("--z_dims=4,x", r"--z_dims expects comma-separated integers like 64,32,16,8,4, got '4,x'"),
    ("--z_dims=4,,2", r"--z_dims expects comma-separated integers like 64,32,16,8,4, got '4,,2'"),
    # one pair of brackets, or none: these were read as 4,2
    ("--z_dims=(4,2", r"--z_dims expects comma-separated integers like .* got '\(4,2'"),
    ("--z_dims=4,2)", r"--z_dims expects comma-separated integers like .* got '4,2\)'"),
    ("--z_dims=((4,2))", r"--z_dims expects comma-separated integers like .* got '\(\(4,2\)\)'"),
])
def test_wrong_type_names_the_key_and_the_type(run, tmp_path, monkeypatch, arg, pattern):
    monkeypatch.setattr(data, "load_dataset", lambda *a: pytest.fail("accepted"))  # fails fast
    with pytest.raises(SystemExit, match=pattern):
        run(tmp_path, arg)


def test_an_option_given_twice_is_refused(run, tmp_path):
    """The last one used to win without a word."""
    with pytest.raises(SystemExit, match=r"--epochs is given twice \(--epochs=1 and "
                                         r"--epochs=2\): give it once"):
        run(tmp_path / "run", "--epochs=1", "--epochs=2")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("arg", ["--epochs", "epochs=3", "-epochs=3"])
def test_malformed_argument(run, tmp_path, arg):
    with pytest.raises(SystemExit, match="--key=value"):
        run(tmp_path, arg)


def test_overrides_are_parsed_with_the_defaults_types(fake_data):
    importlib.reload(train)
    namespace = {k: getattr(train, k) for k in train.config_keys}
    train.apply_overrides(["--epochs=7", "--lr=1e-3", "--batch_norm=False", "--z_dims=8,4,2",
                           "--out_dir=x=y"], namespace)
    assert namespace["epochs"] == 7 and isinstance(namespace["epochs"], int)
    assert namespace["lr"] == 1e-3 and namespace["batch_norm"] is False
    assert namespace["z_dims"] == (8, 4, 2) and namespace["out_dir"] == "x=y"
    # the tuple as --help prints the default (Python's form) is read too
    train.apply_overrides(["--hidden=(512, 256, 128)", "--z_dims=(8,)"], namespace)
    assert namespace["hidden"] == (512, 256, 128) and namespace["z_dims"] == (8,)


def test_a_run_that_cannot_load_its_data_leaves_no_folder(run, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(data.DataError):
        run(out, "--dataset=omniglot", f"--data_root={tmp_path / 'nothing-here'}")
    assert not out.exists()


def test_overrides_do_not_leak_after_reload(run, tmp_path):
    assert run(tmp_path / "a", "--epochs=1", "--seed=5") == 0
    importlib.reload(train)
    assert train.seed == 0 and train.epochs == 2000
    # the module's own tables, already in globals() when a reload lists the options, are not options
    assert "POSITIVE" not in train.config_keys and "STOP_SIGNALS" not in train.config_keys


@pytest.mark.skipif(autograd.cuda_available(), reason="CUDA is available here")
def test_cuda_without_cuda_is_a_clear_error(run, tmp_path):
    with pytest.raises(ValueError, match="device 'cuda'.*not available"):
        run(tmp_path / "run", "--device=cuda")


def test_unknown_device_model_and_dataset(run, tmp_path):
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        run(tmp_path / "a", "--device=tpu")
    with pytest.raises(ValueError, match=r"unknown model 'ladder'.*lvae"):
        run(tmp_path / "b", "--model=ladder")
    with pytest.raises(data.DataError, match=r"unknown data set 'cifar'.*mnist"):
        run(tmp_path / "c", "--dataset=cifar")


@pytest.mark.parametrize("arg, pattern", [
    ("--epochs=0", r"--epochs must be >= 1, got 0"),
    ("--batch_size=0", r"--batch_size must be >= 1"),
    ("--iw_samples=0", r"--iw_samples must be >= 1"),
    ("--lr=-0.001", r"--lr must be a finite number >= 0, got -0.001"),
    ("--lr=inf", r"--lr must be a finite number >= 0, got inf"),
    ("--clip_norm=-1", r"--clip_norm must be a finite number >= 0"),
    ("--clip_norm=nan", r"--clip_norm must be a finite number >= 0, got nan"),
    ("--z_dims=4", r"--z_dims has 1 layers and --hidden 2: give one hidden width per"),
    ("--z_dims=", r"--z_dims must list one size >= 1 per stochastic layer, e\.g\. "
                  r"--z_dims=64,32,16,8,4; got \(\)"),
    ("--hidden=0,8", r"--hidden must list one size >= 1 per stochastic layer"),
    ("--warmup=-5", r"--warmup must be >= 0"),
    ("--final_lk_samples=-5", r"--final_lk_samples must be >= 0"),
    ("--final_lk_images=-9990", r"--final_lk_images must be >= 0"),
    ("--seed=-1", r"--seed must be >= 0"),
    ("--out_dir=", r"--out_dir must name a folder"),
    ("--min_lr=-1e-4", r"--min_lr must be a finite number >= 0"),
    ("--decay_lr=true --min_lr=0.1", r"--min_lr=0.1 is above --lr=0.002"),
    # it was accepted and ignored: the lr stayed constant
    ("--min_lr=1e-5", r"--min_lr is the last epoch's lr of --decay_lr=true, which is off"),
    ("--decay_lr=false --min_lr=1e-5", r"--min_lr is the last epoch's lr of --decay_lr=true"),
])
def test_option_values_that_cannot_work_are_refused_before_loading_data(
        run, tmp_path, monkeypatch, arg, pattern):
    monkeypatch.setattr(data, "load_dataset", lambda *a: pytest.fail("data loaded"))
    with pytest.raises(ValueError, match=pattern):
        run(tmp_path / "run", *arg.split())


@pytest.mark.parametrize("batch_size", [1, len(SYNTHETIC.train_x) - 1])
def test_a_batch_of_one_image_with_batch_norm_is_refused(run, tmp_path, batch_size):
    """Batch norm over one row maps every input to beta: a batch of 1 (or a last batch of
    1) would train on nothing. Without batch norm it is allowed."""
    with pytest.raises(ValueError, match=f"--batch_size={batch_size}: with batch norm every "
                                         f"batch needs 2 images or more"):
        run(tmp_path / "bn", f"--batch_size={batch_size}")
    assert not (tmp_path / "bn").exists()
    assert run(tmp_path / "no_bn", f"--batch_size={batch_size}", "--batch_norm=false",
               "--epochs=1") == 0


def test_out_dir_that_is_a_file_and_warm_up_with_the_iw_bound(run, tmp_path):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a folder")
    with pytest.raises(ValueError, match="notes.txt is a file"):
        run(a_file)
    with pytest.raises(ValueError, match=r"--iw_samples=3.*--warmup=0"):
        run(tmp_path / "iw", "--iw_samples=3", "--warmup=5")


def test_script_prints_expected_errors_without_a_traceback(tmp_path):
    """Run as a script, an option error is one line on stderr and exit status 1."""
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "--epochs=0",
                             f"--out_dir={tmp_path / 'run'}"],
                            capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 1
    assert result.stderr.startswith("error: --epochs must be >= 1"), result.stderr
    assert "Traceback" not in result.stderr


def test_help_into_a_closed_pipe_is_not_an_error():
    """`python train.py --help | head` used to print "error: [Errno 32] Broken pipe" (and
    exit 1) when head had closed the pipe before the help was written. Here the pipe is
    closed before the script starts writing, so the write always fails."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run([sys.executable, str(ROOT / "train.py"), "--help"],
                                stdout=write_end, stderr=subprocess.PIPE, text=True,
                                cwd=ROOT, timeout=60)
    finally:
        os.close(write_end)
    assert result.returncode == 0 and result.stderr == "", result.stderr


# ----------------------------------------------------------------------------------
# NaN handling
# ----------------------------------------------------------------------------------
def _nan_elbo(at, term):
    """lvae.elbo whose terms get a NaN at training call number ``at``."""
    real = lvae.elbo
    calls = [0]

    def elbo(net, x, noise, beta=1.0):
        objective, terms = real(net, x, noise, beta)
        if net.training:
            calls[0] += 1
            if calls[0] == at:
                if term == "log_px":
                    terms["log_px"] = np.float32("nan")
                else:
                    terms["kl"] = list(terms["kl"])
                    terms["kl"][term] = np.float32("nan")
        return objective, terms
    return elbo


def test_nan_kl_stops_with_the_layer_name_and_keeps_the_last_good_checkpoint(
        run, tmp_path, monkeypatch):
    good, bad = tmp_path / "good", tmp_path / "bad"
    assert run(good, "--epochs=1") == 0
    monkeypatch.setattr(lvae, "elbo", _nan_elbo(STEPS_PER_EPOCH + 3, term=1))
    with pytest.raises(FloatingPointError, match=r"epoch 2, step 3.*layer z2.*ckpt\.npz"):
        run(bad, "--epochs=3")
    assert_no_tmp_files(bad)
    a, meta = read_ckpt(bad)
    assert meta["epoch"] == 1 and meta["step"] == 0
    b, _ = read_ckpt(good)
    # the weights of the last completed epoch (evaluation at the end of the 1-epoch run
    # moves only the noise stream)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert [m["epoch"] for m in read_metrics(bad)] == [1]


def _make_a_weight_nan(optimizer):
    optimizer.params[0].data[0] = np.nan


def _overflow_an_adam_moment(optimizer):
    optimizer.v[3][...] = np.inf


@pytest.mark.parametrize("spoil, what", [(_make_a_weight_nan, r"\S+"),
                                         (_overflow_an_adam_moment, r"Adam's v of \S+")],
                         ids=["weight", "adam_v"])
def test_an_update_that_makes_a_weight_or_adam_state_nan_is_never_saved(run, tmp_path,
                                                                         monkeypatch, spoil, what):
    """The last update of an epoch is seen by no forward pass before the end-of-epoch
    save: a NaN it puts into a weight must not replace the last good checkpoint. Nor may
    Adam's state: a squared gradient can overflow v to inf while every weight stays
    finite, and checkpoint.load would refuse that state."""
    out = tmp_path / "run"
    assert run(out, "--epochs=1") == 0
    before, _ = read_ckpt(out)
    real, calls = layers.Adam.step, [0]

    def step(self):
        real(self)
        calls[0] += 1
        if calls[0] == STEPS_PER_EPOCH:  # the last step of epoch 2
            spoil(self)
    monkeypatch.setattr(layers.Adam, "step", step)
    with pytest.raises(FloatingPointError, match=rf"epoch 2: the update made {what} NaN or inf\. "
                                                 r"Stopped before saving: the last good"):
        run(out, "--epochs=3")
    after, meta = read_ckpt(out)
    assert meta["epoch"] == 1 and all(np.array_equal(before[k], after[k]) for k in before)
    assert [m["epoch"] for m in read_metrics(out)] == [1]
    monkeypatch.setattr(layers.Adam, "step", real)
    assert run(out, "--epochs=2") == 0  # and the run resumes from it


def test_a_checkpoint_with_a_nan_optimiser_state_is_refused_on_resuming(run, tmp_path):
    """It used to resume and stop at the next step blaming --lr for a NaN weight."""
    out = tmp_path / "run"
    assert run(out, "--epochs=1") == 0
    arrays, meta = read_ckpt(out)
    arrays = {k: np.full_like(v, np.nan) if k.startswith("optim/m.") else v
              for k, v in arrays.items()}
    np.savez(out / "ckpt.npz", meta=np.array(json.dumps(meta)), **arrays)
    with pytest.raises(checkpoint.CheckpointError, match=r"ckpt\.npz is corrupt: its optimiser "
                                                         r"state is unusable .*m\.0 holds"):
        run(out, "--epochs=2")


def test_a_nan_found_late_on_a_gpu_names_its_own_step(tmp_path):
    """On a GPU the terms are read back every log_interval steps: the message names the
    step that made the NaN, not the step that found it."""
    good = {"log_px": -90.0, "elbo": -100.0, "kl": [5.0, 5.0]}
    bad = {"log_px": float("nan"), "elbo": float("nan"), "kl": [5.0, 5.0]}
    pending = [(good, 64, "epoch 1, step 1"), (bad, 64, "epoch 1, step 2"),
               (good, 64, "epoch 1, step 3")]
    with pytest.raises(FloatingPointError, match=r"^epoch 1, step 2: the reconstruction term.*"
                                                 r"found 1 step\(s\) later"):
        train.check_finite(pending, str(tmp_path / "ckpt.npz"), locate=lambda: "not this")


def test_metrics_file_is_rewritten_from_the_checkpoint_on_resume(run, tmp_path):
    out = tmp_path / "run"
    assert run(out, "--epochs=2") == 0
    (out / "metrics.jsonl").write_text((out / "metrics.jsonl").read_text().splitlines()[0] + "\n")
    assert run(out, "--epochs=2") == 0  # nothing left to train; the file is whole again
    assert [m["epoch"] for m in read_metrics(out)] == [1, 2]


def test_nan_reconstruction_term_in_the_first_epoch(run, tmp_path, monkeypatch):
    out = tmp_path / "bad"
    monkeypatch.setattr(lvae, "elbo", _nan_elbo(2, term="log_px"))
    with pytest.raises(FloatingPointError, match=r"reconstruction term log p\(x\|z1\)"):
        run(out, "--epochs=2")
    assert not (out / "ckpt.npz").exists()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu,
    requires_cuda])])
def test_a_real_overflow_is_located_in_the_layer_where_it_appeared(run, tmp_path, monkeypatch,
                                                                  device):
    """One weight of the second bottom-up block's dense layer made huge: its output
    overflows to inf at the first step, and the message names that layer (on a GPU too,
    with the check at every step: --log_interval=1)."""
    real = lvae.build_model

    def build(*args, **kwargs):
        net = real(*args, **kwargs)
        net.up_blocks[1].dense[0].weight.data[:] = 3e38
        return net
    monkeypatch.setattr(lvae, "build_model", build)
    with pytest.raises(FloatingPointError,
                       match=r"epoch 1, step 1: .*NaN or inf; it first appeared in the output of "
                             r"up_blocks\.1\.dense\.0 \(Dense\)\. Stopped: nothing was saved yet"):
        run(tmp_path / "run", "--epochs=1", f"--device={device}", "--log_interval=1")


def test_a_diverging_run_stops_with_its_message_and_no_numpy_warnings(run, tmp_path):
    """NumPy's overflow warnings (errors here: pytest.ini) came before the message that
    says what happened and what to do, which is all there is now."""
    with pytest.raises(FloatingPointError, match=r"epoch 1, step \d+: .* NaN or inf.*Try a "
                                                 r"lower --lr"):
        run(tmp_path / "run", "--epochs=1", "--lr=1e10")


def test_first_nonfinite_module_names_a_bad_parameter_first():
    net = lvae.build_model("lvae", z_dims=(4, 2), hidden=(16, 8), n_dense=1)
    x = np.random.default_rng(0).random((8, 784), dtype=np.float32)
    forward = lambda: lvae.elbo(net, x, lvae.Noise(0))  # noqa: E731
    assert layers.first_nonfinite_module(net, forward) is None
    net.prior_heads[0].var_dense.weight.data[0, 0] = np.nan
    assert layers.first_nonfinite_module(net, forward) == "parameter prior_heads.0.var_dense.weight"
    assert layers.Module._watch is None  # the hook is removed afterwards


# ----------------------------------------------------------------------------------
# evaluate.py
# ----------------------------------------------------------------------------------
def test_evaluate_main_on_a_tiny_checkpoint(run, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(out, "--epochs=1", "--eval_interval=0", "--eval_lk_samples=0") == 0
    capsys.readouterr()
    ckpt = str(out / "ckpt.npz")
    result = evaluate.main([ckpt, "--samples=7", "--images=30", "--batch_size=16"])
    printed = capsys.readouterr().out
    assert result["samples"] == 7 and result["images"] == 30
    assert np.isfinite(result["test_lk"]) and result["test_lk"] < 0
    assert result["stderr"] > 0
    assert "L_7 =" in printed
    assert json.loads(printed.strip().splitlines()[-1])["test_lk"] == result["test_lk"]
    # deterministic given --seed
    again = evaluate.main([ckpt, "--samples=7", "--images=30", "--batch_size=16"])
    assert again["test_lk"] == result["test_lk"]
    # without recomputing batch-norm statistics: runs, gives another number
    kept = evaluate.main([ckpt, "--samples=7", "--images=30", "--no_bn_recompute"])
    assert np.isfinite(kept["test_lk"]) and kept["test_lk"] != result["test_lk"]


def test_evaluate_recomputes_statistics_over_the_training_set(run, tmp_path, capsys):
    """evaluate.py's number, rebuilt by hand: batch-norm statistics over the training
    images (batches of 1000 drawn with --seed + 1, apart from the noise's stream), then L_K
    of the test images, one bound per image; its mean and standard error are what
    evaluate.py reports."""
    out = tmp_path / "run"
    assert run(out, "--epochs=1", "--eval_interval=0", "--eval_lk_samples=0") == 0
    result = evaluate.main([str(out / "ckpt.npz"), "--samples=6", "--images=40", "--seed=3"])
    capsys.readouterr()
    net, _ = evaluate.load_model(str(out / "ckpt.npz"))
    noise = lvae.Noise(3)
    batches = data.iterate_minibatches(SYNTHETIC.train_x, 1000, np.random.default_rng(4))
    layers.recompute_batchnorm_statistics(net, batches, lambda b: lvae.elbo(net, b, noise))
    test_x = data.binarized_test_set(SYNTHETIC.test_x)[:40]
    bound = lvae.log_likelihood_bound(net, test_x, 6, noise)
    assert result["test_lk"] == pytest.approx(float(bound.mean()), rel=1e-12)
    stderr = bound.astype(np.float64).std(ddof=1) / np.sqrt(40)  # s / sqrt(n), s with n - 1
    assert result["stderr"] == pytest.approx(stderr, rel=1e-12)


def test_data_root_is_stored_absolute_and_evaluate_can_override_it(run, tmp_path, monkeypatch,
                                                                    fake_data):
    """A relative --data_root is stored as an absolute path, so evaluate.py finds the data
    from any folder; evaluate.py --data_root replaces the stored one."""
    monkeypatch.chdir(tmp_path)
    assert run(tmp_path / "run", "--epochs=1", "--data_root=my/data") == 0
    assert read_ckpt(tmp_path / "run")[1]["config"]["data_root"] == str(tmp_path / "my" / "data")
    roots = []
    monkeypatch.setattr(data, "load_dataset",
                        lambda name, root=None: roots.append(root) or fake_data)
    ckpt = str(tmp_path / "run" / "ckpt.npz")
    for extra in ([], ["--data_root=elsewhere"], ["--data_root="]):
        evaluate.main([ckpt, "--samples=2", "--images=4", "--no_bn_recompute", *extra])
    assert roots == [str(tmp_path / "my" / "data"), "elsewhere", None]


def test_evaluate_rebuilds_the_trained_model(run, tmp_path):
    out = tmp_path / "run"
    assert run(out, "--epochs=1", "--model=vae") == 0
    net, config = evaluate.load_model(str(out / "ckpt.npz"))
    assert isinstance(net, lvae.HierarchicalVAE) and config["z_dims"] == [4, 2]
    arrays, _ = read_ckpt(out)
    state = net.state_dict()
    assert all(np.array_equal(state[k], arrays["model/" + k]) for k in state)


def test_evaluate_bad_checkpoint(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="does not exist"):
        evaluate.main([str(tmp_path / "nothing.npz"), "--samples=2"])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, requires_cuda])])
def test_epoch_on_device_gives_the_same_batches_and_generator_state(device):
    """train.py moves a GPU epoch in one copy: the batches (the last one partial) and the
    data generator's state afterwards must be those of the per-batch stream."""
    x = np.random.default_rng(0).random((10, 6)).astype(np.float32)
    rng_a, rng_b = np.random.default_rng(7), np.random.default_rng(7)
    expected = list(data.iterate_minibatches(x, 4, rng_a))
    got = train.epoch_on_device(data.iterate_minibatches(x, 4, rng_b), device)
    assert [len(b) for b in got] == [4, 4, 2]
    for e, g in zip(expected, got):
        assert autograd.get_array_module(g) is autograd.get_array_module(
            autograd.to_device(e, device)), f"batches should live on {device}"
        np.testing.assert_array_equal(autograd.to_numpy(g), e)
    assert rng_a.bit_generator.state == rng_b.bit_generator.state


def test_cosine_decay_over_a_single_epoch_trains_at_lr(run, tmp_path):
    """--decay_lr with --epochs=1: the one epoch is the first, at --lr (no division by
    epochs - 1 = 0)."""
    assert run(tmp_path / "one", "--epochs=1", "--decay_lr=true", "--lr=1e-2",
               "--min_lr=1e-3") == 0
    assert [r["lr"] for r in read_metrics(tmp_path / "one")] == [1e-2]


def test_running_a_finished_run_again_keeps_its_final_json(run, tmp_path, monkeypatch, capsys):
    """With nothing left to train, final.json still describes these weights: it is not
    removed, so a final evaluation interrupted on the rerun leaves it in place."""
    out = tmp_path / "run"
    assert run(out, "--epochs=1", "--final_lk_samples=0", final=True) == 0
    capsys.readouterr()
    monkeypatch.setattr(lvae, "kl_per_unit", interrupt_on_call(lvae.kl_per_unit, 1, how="raise"))
    assert run(out, "--epochs=1", "--final_lk_samples=0", final=True) == 1
    printed = capsys.readouterr().out
    assert "removed" not in printed
    assert ("the checkpoint holds 1 epochs and --epochs=1: nothing to train, only the final "
            "evaluation runs again (a larger --epochs trains on)") in printed
    assert json.loads((out / "final.json").read_text())["epoch"] == 1


def test_an_interrupt_raised_inside_the_end_of_epoch_save_then_resume_is_identical(
        run, tmp_path, monkeypatch):
    """A KeyboardInterrupt raised (not signalled, so not held) inside epoch 2's save, after
    the epoch went into the history: the checkpoint written on the way out must not
    keep epoch 2 in its history, or resuming records epoch 2 twice."""
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert run(straight, "--epochs=3") == 0
    real = checkpoint.save
    monkeypatch.setattr(checkpoint, "save", interrupt_on_call(real, 2, how="raise"))
    assert run(stopped, "--epochs=3") == 1
    monkeypatch.setattr(checkpoint, "save", real)
    assert run(stopped, "--epochs=3") == 0
    assert [m["epoch"] for m in read_metrics(stopped)] == [1, 2, 3]
    assert_same_checkpoint(straight, stopped)


def test_which_pending_step_made_the_nan_decides_how_it_is_located(tmp_path):
    """Only the latest pending step can be re-run (locate()); a NaN in an earlier one
    says how many steps later it was found."""
    good = {"log_px": -90.0, "elbo": -100.0, "kl": [5.0, 5.0]}
    bad = {"log_px": float("nan"), "elbo": float("nan"), "kl": [5.0, 5.0]}
    path = str(tmp_path / "ckpt.npz")
    latest_bad = [(good, 64, "epoch 1, step 1"), (good, 64, "epoch 1, step 2"),
                  (bad, 64, "epoch 1, step 3")]
    with pytest.raises(FloatingPointError, match=r"^epoch 1, step 3: .*; LOCATED\. Stopped"):
        train.check_finite(latest_bad, path, locate=lambda: "LOCATED")

    def must_not_locate():
        raise AssertionError("locate() re-runs the latest step, not the one that made the NaN")
    first_bad = [(bad, 64, "epoch 1, step 1"), (good, 64, "epoch 1, step 2"),
                 (good, 64, "epoch 1, step 3")]
    with pytest.raises(FloatingPointError, match=r"^epoch 1, step 1: .*found 2 step\(s\) later"):
        train.check_finite(first_bad, path, locate=must_not_locate)


def test_on_the_cpu_a_nan_is_found_at_the_step_that_made_it(run, tmp_path, monkeypatch):
    """On the CPU the terms are checked at every step (log_interval only spaces the GPU's
    read-backs): a NaN at step 2 (log_interval 3) is found at step 2 and located there."""
    monkeypatch.setattr(lvae, "elbo", _nan_elbo(2, term=1))
    with pytest.raises(FloatingPointError) as e:
        run(tmp_path / "run", "--epochs=1")
    message = str(e.value)
    assert message.startswith("epoch 1, step 2: the KL term of layer z2 became NaN"), message
    assert "step(s) later" not in message, message


def test_locate_nonfinite_replays_the_step_with_its_own_noise():
    """The forward pass that looks for the NaN draws exactly the noise of the step that
    made it (a NaN caused by one draw must reappear)."""
    importlib.reload(train)
    net = lvae.build_model("lvae", z_dims=(4, 2), hidden=(16, 8), n_dense=1)
    x = (np.random.default_rng(0).random((8, 784)) < 0.3).astype(np.float32)
    noise = lvae.Noise(0)
    draws, real = [], noise.normal
    noise.normal = lambda shape, like: draws.append(real(shape, like)) or draws[-1]
    noise.new_step()
    state = noise.get_state()
    train.training_objective(net, x, noise, 1.0)  # the step
    step_draws = list(draws)
    draws.clear()
    train.locate_nonfinite(net, x, noise, state, 1.0)
    assert len(draws) == len(step_draws)
    for a, b in zip(draws, step_draws):
        np.testing.assert_array_equal(a, b)


def test_boolean_options_take_1_and_0(fake_data):
    """--flag=1 and --flag=0 are read as true and false (the message for a bad value
    offers 'true or false'; apply_overrides also accepts 1 and 0)."""
    importlib.reload(train)
    namespace = {k: getattr(train, k) for k in train.config_keys}
    train.apply_overrides(["--decay_lr=1", "--batch_norm=0"], namespace)
    assert namespace["decay_lr"] is True and namespace["batch_norm"] is False


def test_cosine_decay_to_min_lr_equal_to_lr_is_allowed(tmp_path):
    """--decay_lr with --min_lr equal to --lr is a constant lr, not an error (only a
    min_lr above lr is refused)."""
    importlib.reload(train)
    config = {k: getattr(train, k) for k in train.config_keys}
    config.update(decay_lr=True, lr=1e-3, min_lr=1e-3, out_dir=str(tmp_path / "run"))
    train.validate_config(config)


def test_the_batch_size_may_change_between_epochs(run, tmp_path, capsys):
    """Resuming at an epoch's end with another --batch_size is allowed (only the middle of
    an epoch needs the old one); the change is printed."""
    out = tmp_path / "run"
    assert run(out, "--epochs=1") == 0
    assert run(out, "--epochs=2", "--batch_size=50") == 0
    assert "batch_size 64 -> 50" in capsys.readouterr().out
    assert [m["epoch"] for m in read_metrics(out)] == [1, 2]


def test_test_elbo_is_the_mean_over_images_of_chunks_of_unequal_size():
    """test_elbo runs the test set in chunks of 1000 images: their ELBOs must be weighted
    by their sizes. (The tests' test sets have 128 images, one chunk: the unweighted mean
    of the chunk means passed.) 2500 images make chunks of 1000, 1000 and 500, and the
    last 500 are of another kind (all pixels on), so the chunk means differ."""
    net = lvae.build_model("lvae", x_dim=8, z_dims=(3, 2), hidden=(5, 4), n_dense=1, seed=0)
    rng = np.random.default_rng(0)
    x = (rng.random((2500, 8)) < 0.2).astype(np.float32)
    x[2000:] = 1.0
    got = train.test_elbo(net, x, lvae.Noise(3))
    per_image, noise = [], lvae.Noise(3)  # the same draws, chunk by chunk
    with lvae.evaluation(net):
        for start in (0, 1000, 2000):
            log_px, layers_out = net(x[start:start + 1000], noise)
            elbo = log_px.data - sum(k.data for k in layers_out.kl)  # (1, images)
            per_image.append(elbo.reshape(-1).astype(np.float64))
    per_image = np.concatenate(per_image)
    assert per_image.shape == (2500,)
    assert got == pytest.approx(per_image.mean(), rel=1e-6)
    chunk_means = [c.mean() for c in np.split(per_image, [1000, 2000])]
    assert abs(np.mean(chunk_means) - per_image.mean()) > 1e-3 * abs(per_image.mean()), \
        "the chunks' means do not differ enough to tell the two means apart"
