"""Tests of checkpoint.py on a tiny model: a file that is not a checkpoint written by
this code, or a damaged one, is a CheckpointError that names the problem (never a raw
NumPy, JSON or KeyError), and only train.py's resume (``load``) advises deleting it.

tests/test_train.py covers saving, resuming and atomic writes through train.py."""
import json
import os
import re
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import checkpoint  # noqa: E402
import lvae  # noqa: E402
from checkpoint import CheckpointError  # noqa: E402
from layers import Adam  # noqa: E402

# what train.py's config holds for a tiny model (x_dim is 784, as evaluate.py assumes)
CONFIG = {"model": "lvae", "z_dims": (4, 2), "hidden": (16, 8), "n_dense": 1,
          "batch_norm": True, "dataset": "mnist", "seed": 0, "data_root": ""}


def tiny_model(config=CONFIG):
    return lvae.build_model(config["model"], x_dim=784, z_dims=config["z_dims"],
                            hidden=config["hidden"], n_dense=config["n_dense"],
                            batch_norm=config["batch_norm"], seed=config["seed"])


def write_checkpoint(path, config=CONFIG):
    """A valid checkpoint of a freshly built tiny model, as train.py writes one."""
    net = tiny_model(config)
    progress = {"epoch": 1, "step": 0, "sums": None,
                "data_rng": np.random.default_rng(2).bit_generator.state}
    checkpoint.save(str(path), net, Adam(net.parameters()), lvae.Noise(1), dict(config),
                    [], progress)
    return str(path)


def rewrite(path, edit):
    """Open a checkpoint's arrays and metadata, let ``edit(arrays, meta)`` change them in
    place, and write them back."""
    with np.load(path, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    meta = json.loads(str(arrays.pop("meta")))
    edit(arrays, meta)
    np.savez(path, meta=np.array(json.dumps(meta)), **arrays)
    return path


def set_meta_text(path, text):
    """Replace a checkpoint's metadata by ``text`` (which need not be a JSON object)."""
    with np.load(path, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    arrays["meta"] = np.array(text)
    np.savez(path, **arrays)
    return path


def resume(path):
    """What train.py does to resume: load everything into a fresh model."""
    net = tiny_model()
    return checkpoint.load(path, net, Adam(net.parameters()), lvae.Noise(0), CONFIG)


def test_load_restores_weights_adam_and_noise_into_another_model(tmp_path):
    """Everything a resumed run needs comes from the file, not from the fresh objects."""
    net = tiny_model()
    optimizer, noise = Adam(net.parameters(), lr=0.01), lvae.Noise(1)
    rng = np.random.default_rng(3)
    for _ in range(2):  # two steps of Adam: moments and t are not their initial values
        for p in net.parameters():
            p.grad = rng.standard_normal(p.shape).astype(p.dtype)
        optimizer.step()
    noise.normal((4, 2), like=np.zeros(1, np.float32))  # the noise stream has moved on
    progress = {"epoch": 3, "step": 5, "sums": None,
                "data_rng": np.random.default_rng(2).bit_generator.state}
    path = str(tmp_path / "ckpt.npz")
    checkpoint.save(path, net, optimizer, noise, dict(CONFIG), [], progress)

    other = tiny_model({**CONFIG, "seed": 5})
    other_optimizer, other_noise = Adam(other.parameters(), lr=0.01), lvae.Noise(9)
    checkpoint.load(path, other, other_optimizer, other_noise, CONFIG)
    saved, loaded = net.state_dict(), other.state_dict()
    assert all(np.array_equal(saved[k], loaded[k]) for k in saved)
    adam, other_adam = optimizer.state_dict(), other_optimizer.state_dict()
    assert adam.keys() == other_adam.keys() and int(other_adam["t"]) == 2
    assert all(np.array_equal(adam[k], other_adam[k]) for k in adam)
    assert other_noise.get_state() == noise.get_state()


def test_a_valid_checkpoint_round_trips(tmp_path):
    path = write_checkpoint(tmp_path / "ckpt.npz")
    progress, history = resume(path)
    assert progress["epoch"] == 1 and history == []
    assert checkpoint.read_config(path)["z_dims"] == [4, 2]
    net = tiny_model({**CONFIG, "seed": 5})  # other initial weights
    checkpoint.load_weights(path, net)
    saved = tiny_model().state_dict()
    assert all(np.array_equal(v, saved[k]) for k, v in net.state_dict().items())


# ---------------------------------------------------------------- not a checkpoint

def test_npy_file_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, np.zeros(3))
    with pytest.raises(CheckpointError, match="not a checkpoint written by this code"):
        checkpoint.read_config(str(path))


def test_text_file_is_not_a_checkpoint_and_pickle_is_not_suggested(tmp_path):
    path = tmp_path / "README.md"
    path.write_text("# a text file\n")
    with pytest.raises(CheckpointError, match="not a checkpoint written by this code") as e:
        checkpoint.read_config(str(path))
    assert "pickle" not in str(e.value)  # our checkpoints never need it


def test_npz_without_meta_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "other.npz"
    np.savez(path, a=np.zeros(3))
    with pytest.raises(CheckpointError, match="without a 'meta' entry"):
        checkpoint.read_config(str(path))


UNPICKLED = []  # what _PickleTrap's unpickling appends to: it must stay empty


def _record_unpickling():
    UNPICKLED.append("unpickled")
    return "unpickled"


class _PickleTrap:
    """An object whose unpickling runs code (any pickle can): a checkpoint is read with
    allow_pickle=False, so a file that holds one is refused before it is unpickled."""

    def __reduce__(self):
        return _record_unpickling, ()


@pytest.mark.parametrize("entry", ["model/output.weight", "optim/t", "extra"])
def test_an_object_array_in_a_checkpoint_is_refused_without_unpickling_it(tmp_path, entry):
    """The module docstring's promise, 'read without pickle': an .npz whose valid meta sits
    next to an object array (a pickle) is a CheckpointError, and the pickle never runs.
    (With allow_pickle=True the trap ran and read_config returned the config.)"""
    path = write_checkpoint(tmp_path / "ckpt.npz")
    with np.load(path, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    arrays[entry] = np.array([_PickleTrap()], dtype=object)
    np.savez(path, **arrays)  # np.savez pickles object arrays
    UNPICKLED.clear()
    for read in (checkpoint.read_config, lambda p: checkpoint.load_weights(p, tiny_model()),
                 resume):
        with pytest.raises(CheckpointError, match=r"unreadable or corrupt \(Object arrays "
                                                  r"cannot be loaded when allow_pickle=False"):
            read(path)
    assert UNPICKLED == [], "reading a checkpoint unpickled an object array"


def test_directory_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="cannot be read"):
        checkpoint.read_config(str(tmp_path))


# ---------------------------------------------------------------- damaged structure

def test_meta_that_is_not_a_json_object(tmp_path):
    path = set_meta_text(write_checkpoint(tmp_path / "ckpt.npz"), "[1, 2]")
    with pytest.raises(CheckpointError, match="'meta' entry is a JSON list"):
        checkpoint.read_config(path)


def test_meta_that_is_not_json(tmp_path):
    path = set_meta_text(write_checkpoint(tmp_path / "ckpt.npz"), "{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        checkpoint.read_config(path)


@pytest.mark.parametrize("key", ["config", "noise_rng", "data_rng", "history"])
def test_missing_metadata_entry_is_named(tmp_path, key):
    path = rewrite(write_checkpoint(tmp_path / "ckpt.npz"), lambda a, m: m.pop(key))
    with pytest.raises(CheckpointError, match=f"lacks {key}"):
        checkpoint.read_config(path)
    with pytest.raises(CheckpointError, match=f"lacks {key}"):
        resume(path)


def test_missing_config_entry_is_named(tmp_path):
    path = rewrite(write_checkpoint(tmp_path / "ckpt.npz"),
                   lambda a, m: m["config"].pop("z_dims"))
    with pytest.raises(CheckpointError, match="config lacks z_dims"):
        checkpoint.read_config(path)


@pytest.mark.parametrize("key, bad", [("noise_rng", {"bit_generator": "PCG64"}),
                                      ("noise_rng", [1, 2]),
                                      ("data_rng", {"bit_generator": "MT19937", "state": {}})])
def test_bad_generator_state_is_named(tmp_path, key, bad):
    path = rewrite(write_checkpoint(tmp_path / "ckpt.npz"),
                   lambda a, m: m.update({key: bad}))
    with pytest.raises(CheckpointError, match=f"{key} is not a valid random-generator"):
        resume(path)


# an epoch record and the sums of an unfinished epoch, as train.py writes them (2 layers)
RECORD = {"epoch": 1, "beta": 1.0, "lr": 0.002, "train_elbo": -200.0, "train_log_px": -190.0,
          "kl": [8.0, 2.0], "seconds": 1.5, "test_elbo": -180.0}
SUMS = {"elbo": -12800.0, "log_px": -12000.0, "kl": [600.0, 200.0], "n": 64, "seconds": 0.5}


@pytest.mark.parametrize("sums", [SUMS, {**SUMS, "n": 1},
                                  {k: v for k, v in SUMS.items() if k != "seconds"}],
                         ids=["sums", "one image so far", "no seconds"])
def test_a_checkpoint_in_the_middle_of_an_epoch_round_trips(tmp_path, sums):
    """Also the edges of the checks below: a count of 1 (one image of batch size 1 done)
    is a valid divisor, and the time spent is optional."""
    progress = {"history": [RECORD, {**RECORD, "epoch": 2, "test_elbo": None}], "step": 1,
                "sums": sums}
    path = rewrite(write_checkpoint(tmp_path / "ckpt.npz"), lambda a, m: m.update(progress))
    state, history = resume(path)
    assert history == progress["history"] and state["sums"] == sums


@pytest.mark.parametrize("key, bad", [
    ("epoch", -1), ("step", "3"), ("sums", [1]), ("epoch", True),
    ("sums", {"elbo": "x", "log_px": 0.0, "kl": [0.0, 0.0], "n": 1}),
    ("sums", {"elbo": 0.0, "log_px": 0.0, "kl": 0.0, "n": 1}),
    ("history", [1, 2]), ("history", [{"train_elbo": -90.0}]), ("history", {"epoch": 1}),
    # what the end of the run plots must be there: it used to fail only then, in plots.py
    ("history", [{"epoch": 1, "train_elbo": -1.0}]), ("history", [{"epoch": 1}]),
    ("history", [{**RECORD, "kl": [1.0]}]), ("history", [{**RECORD, "test_elbo": "x"}]),
    ("sums", {**SUMS, "kl": [0.0]}),  # one KL per layer: zip() cut the epoch's to one
    ("sums", {**SUMS, "n": 0}),  # the divisor of the epoch's means
    ("sums", {**SUMS, "n": 64.5}),
    # each bad in one entry only, the rest valid: the cases above that are bad in two ways
    # (kl and another) passed with that other check deleted
    ("sums", {**SUMS, "elbo": None}), ("sums", {**SUMS, "log_px": "-12000"}),
    ("sums", {**SUMS, "seconds": [0.5]}),
    ("history", [{k: v for k, v in RECORD.items() if k != "beta"}]),
    ("history", [{**RECORD, "train_elbo": None}]), ("history", [{**RECORD, "epoch": -1}]),
    ("history", [{**RECORD, "test_lk": "x"}]),
])
def test_bad_progress_is_named(tmp_path, key, bad):
    path = rewrite(write_checkpoint(tmp_path / "ckpt.npz"),
                   lambda a, m: m.update({key: bad}))
    with pytest.raises(CheckpointError, match=f"corrupt: (its )?{key}"):
        resume(path)


def test_optimiser_state_that_does_not_fit(tmp_path):
    path = rewrite(write_checkpoint(tmp_path / "ckpt.npz"),
                   lambda a, m: a.update({"optim/m.0": np.zeros((1, 1), np.float32)}))
    with pytest.raises(CheckpointError, match="optimiser state is unusable.*m.0 has shape"):
        resume(path)


def _negative(a):
    return -np.abs(a) - 1


@pytest.mark.parametrize("edit, problem", [
    (lambda a: a.update({"optim/t": np.array(["x"])}), r"t must be a step count"),
    (lambda a: a.update({"optim/t": np.array(-5)}), r"t must be a step count.*-5"),
    (lambda a: a.update({"optim/t": np.array(2.5)}), r"t must be a step count"),
    (lambda a: a.update({"optim/v.0": _negative(a["optim/v.0"])}), r"v.0 holds negative"),
    (lambda a: a.update({k: np.full_like(v, np.nan) for k, v in a.items()
                         if k.startswith(("optim/m.", "optim/v."))}),
     r"m.0 holds values that are not finite"),
    (lambda a: a.update({"optim/m.1": np.full(a["optim/m.1"].shape, "x")}),
     r"m.1 holds values that are not finite numbers \(<U1\)"),
    (lambda a: a.update({"optim/x": a.pop("optim/v.0")}), r"missing \['v.0'\], unexpected \['x'\]"),
    (lambda a: a.pop("optim/t"), r"missing \['t'\]"),
], ids=["t-text", "t-negative", "t-float", "v-negative", "all-nan", "m-text", "v-renamed",
        "t-missing"])
def test_a_damaged_optimiser_state_is_named_and_the_weights_offered(tmp_path, edit, problem):
    """Adam's state used to be loaded unchecked: a bad t stopped the run with a TypeError or
    a math domain error, a NaN or negative v as a NaN weight blamed on the learning rate."""
    path = rewrite(write_checkpoint(tmp_path / "ckpt.npz"), lambda a, m: edit(a))
    name = re.escape(path)
    with pytest.raises(CheckpointError, match=rf"{name} is corrupt: its optimiser state is "
                                              rf"unusable \(.*{problem}.*\)\. Its weights are "
                                              rf"sound: --init_from={name} with another"):
        resume(path)


def test_adam_loads_nothing_from_a_damaged_state():
    """All entries are checked before any is loaded: a failed load leaves Adam as it was."""
    net = tiny_model()
    adam = Adam(net.parameters())
    state = adam.state_dict()
    state.update({"t": np.array(7), "v.3": -np.ones_like(state["v.3"])})
    with pytest.raises(ValueError, match="v.3 holds negative values"):
        adam.load_state_dict(state)
    assert adam.t == 0 and all(not v.any() for v in adam.v)


def test_weights_of_another_model_are_a_clear_error(tmp_path):
    path = write_checkpoint(tmp_path / "ckpt.npz", {**CONFIG, "hidden": (16, 4)})
    with pytest.raises(CheckpointError, match="does not fit this model.*shape"):
        checkpoint.load_weights(path, tiny_model())


# ---------------------------------------------------------------- non-finite weights

def test_non_finite_weights_name_the_first_bad_tensor(tmp_path):
    path = write_checkpoint(tmp_path / "ckpt.npz")
    names = [k for k in tiny_model().state_dict()]

    def poison(arrays, meta):
        arrays[f"model/{names[2]}"] = np.full_like(arrays[f"model/{names[2]}"], np.nan)
        arrays[f"model/{names[5]}"] = np.full_like(arrays[f"model/{names[5]}"], np.inf)
    rewrite(path, poison)
    with pytest.raises(CheckpointError, match=f"weight {names[2]} holds NaN or infinite"):
        checkpoint.load_weights(path, tiny_model())
    with pytest.raises(CheckpointError, match=f"weight {names[2]} holds NaN or infinite"):
        resume(path)


# ---------------------------------------------------------------- advice

def test_only_resuming_advises_deleting_a_damaged_file(tmp_path):
    path = tmp_path / "ckpt.npz"
    blob = Path(write_checkpoint(path)).read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CheckpointError, match="ckpt.npz is unreadable or corrupt.*delete it"):
        resume(str(path))
    # a file given to --init_from or evaluate.py belongs to the user: no deleting advice
    for read in (checkpoint.read_config, lambda p: checkpoint.load_weights(p, tiny_model())):
        with pytest.raises(CheckpointError, match="corrupt") as e:
            read(str(path))
        assert "delete" not in str(e.value)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoint.read_config(str(tmp_path / "missing.npz"))


def test_empty_checkpoint_path_is_named():
    """evaluate.py "" said "checkpoint  does not exist", the empty name invisible."""
    with pytest.raises(CheckpointError, match="the checkpoint's path is empty"):
        checkpoint.read_config("")


def test_saved_file_is_a_plain_zip(tmp_path):
    # the magic-byte check in _read relies on this
    path = write_checkpoint(tmp_path / "ckpt.npz")
    assert zipfile.is_zipfile(path)
    assert Path(path).read_bytes()[:4] == checkpoint.ZIP_MAGIC


def test_weights_load_into_the_same_architecture_on_another_dataset(tmp_path):
    """Fine-tuning on another data set of 28x28 images is allowed (--init_from)."""
    path = write_checkpoint(tmp_path / "ckpt.npz")
    net = tiny_model()
    checkpoint.load_weights(path, net, {**CONFIG, "dataset": "fashion_mnist"})
    with pytest.raises(checkpoint.CheckpointError, match="hidden"):
        checkpoint.load_weights(path, net, {**CONFIG, "hidden": (16, 4)})


def test_numpy_scalars_are_written_as_numbers(tmp_path):
    """np.float64 always was (a float subclass): np.float32, np.int64 and np.bool_ were a
    TypeError from the json module."""
    record = {**RECORD, "epoch": np.int64(1), "train_elbo": np.float32(-200.5),
              "kl": [np.float32(8.0), 2.0]}
    path = rewrite(write_checkpoint(tmp_path / "ckpt.npz"), lambda a, m: None)
    net = tiny_model()
    progress = {"epoch": np.int64(1), "step": 0, "sums": None,
                "data_rng": np.random.default_rng(2).bit_generator.state}
    checkpoint.save(path, net, Adam(net.parameters()), lvae.Noise(1), dict(CONFIG), [record],
                    progress)
    state, history = resume(path)  # the loaded values pass its checks: plain numbers
    assert state["epoch"] == 1 and history[0]["train_elbo"] == -200.5
    checkpoint.write_metrics(str(tmp_path / "metrics.jsonl"), [record])
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["kl"] == [8.0, 2.0]
    checkpoint.write_json(str(tmp_path / "final.json"), {"units": np.int64(3), "ok": np.bool_(1)})
    assert json.loads((tmp_path / "final.json").read_text()) == {"units": 3, "ok": True}
    with pytest.raises(TypeError, match="Object of type ndarray is not JSON serializable"):
        checkpoint.write_json(str(tmp_path / "final.json"), {"kl": np.zeros(3)})
    assert not (tmp_path / "final.json.tmp").exists()


def test_a_path_must_be_a_path(tmp_path):
    """An int used to be taken as a file descriptor: load_weights(5, net) read (and closed)
    whatever file 5 was."""
    path = write_checkpoint(tmp_path / "ckpt.npz")
    with open(path, "rb") as f:
        with pytest.raises(TypeError, match=r"expected a file path \(a str or pathlib.Path\), "
                                            r"got int"):
            checkpoint.load_weights(f.fileno(), tiny_model())
        os.fstat(f.fileno())  # still open
    with pytest.raises(TypeError, match="expected a file path"):
        checkpoint.write_json(None, {})
    # pathlib.Path works everywhere (save used to fail on path + '.tmp')
    net, progress = tiny_model(), {"epoch": 1, "step": 0, "sums": None, "data_rng": None}
    checkpoint.save(tmp_path / "p.npz", net, Adam(net.parameters()), lvae.Noise(1),
                    dict(CONFIG), [], progress)
    assert checkpoint.read_config(tmp_path / "p.npz")["seed"] == 0


def test_save_refuses_what_every_reader_would_call_corrupt(tmp_path):
    """A model's own config lacks 'dataset', and progress needs four entries: such a file
    was written, then refused by read_config, load_weights and load as corrupt."""
    net = tiny_model()
    path = tmp_path / "ckpt.npz"
    with pytest.raises(ValueError, match=r"checkpoint.save: missing config\['dataset'\], "
                                         r"progress\['step'\], progress\['sums'\], "
                                         r"progress\['data_rng'\]: config needs"):
        checkpoint.save(path, net, Adam(net.parameters()), lvae.Noise(1), net.config, [],
                        {"epoch": 1})
    assert not path.exists() and not (tmp_path / "ckpt.npz.tmp").exists()


def test_a_file_reaches_the_disk_before_it_replaces_the_old_one(tmp_path, monkeypatch):
    """fsync, then rename: a power cut leaves the old file or the new one, whole."""
    log, real_replace = [], os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: log.append("fsync"))
    monkeypatch.setattr(os, "replace", lambda a, b: (log.append("replace"), real_replace(a, b)))
    checkpoint.write_json(str(tmp_path / "final.json"), {"a": 1})
    assert log == ["fsync", "replace"]
    assert json.loads((tmp_path / "final.json").read_text()) == {"a": 1}
