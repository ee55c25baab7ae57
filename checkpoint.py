"""Checkpoints: weights, optimiser state, random-generator states and progress in one
.npz file, written atomically and read without pickle.

Atomic: the file is written to ``path + '.tmp'``, flushed to disk, then renamed over the
old one (``os.replace`` is atomic), so a crash or Ctrl-C never leaves a half-written
checkpoint. Everything that is not an array (epoch, step, RNG states, the metrics so
far) is stored as one JSON string, so ``np.load(..., allow_pickle=False)`` reads it all.
"""
import json
import os
import zipfile

import numpy as np

FORMAT = 1
# options that change the model itself: resuming with different ones is an error
ARCHITECTURE_KEYS = ("model", "z_dims", "hidden", "n_dense", "batch_norm", "dataset")
# what every checkpoint written by ``save`` holds: read_config and load_weights need the
# config (evaluate.py rebuilds the model from it), load needs the rest to resume
PROGRESS_KEYS = ("epoch", "step", "sums", "data_rng")
META_KEYS = ("config", "noise_rng", "history") + PROGRESS_KEYS
CONFIG_KEYS = ARCHITECTURE_KEYS + ("seed",)
ZIP_MAGIC = b"PK\x03\x04"  # the first bytes of an .npz (a zip archive)
# only for train.py's own out_dir/ckpt.npz: files given to --init_from or evaluate.py
# belong to the user and must not be deleted on our say-so
RESUME_ADVICE = "delete it to start the run afresh, or use another out_dir"


class CheckpointError(ValueError):
    pass


def save(path, model, optimizer, noise, config, history, progress):
    """Write model + optimiser + RNG state + progress to ``path`` atomically."""
    # refused now rather than written and then called corrupt by every reader (model.config
    # alone lacks 'dataset'); train.py's config and progress hold all of these
    missing = ([f"config[{k!r}]" for k in CONFIG_KEYS if k not in config]
               + [f"progress[{k!r}]" for k in PROGRESS_KEYS if k not in progress])
    if missing:
        raise ValueError(f"checkpoint.save: missing {', '.join(missing)}: config needs "
                         f"{', '.join(CONFIG_KEYS)} and progress {', '.join(PROGRESS_KEYS)}")
    arrays = {f"model/{k}": v for k, v in model.state_dict().items()}
    arrays.update({f"optim/{k}": v for k, v in optimizer.state_dict().items()})
    meta = {"format": FORMAT, "config": config, "noise_rng": noise.get_state(),
            "history": history, **progress}
    arrays["meta"] = np.array(json.dumps(meta, default=_plain))
    _write_atomically(path, lambda f: np.savez(f, **arrays), "wb")


def _plain(x):
    """json's hook for what it cannot write. NumPy scalars (np.float32, np.int64,
    np.bool_; np.float64 is a float already) are numbers to a user: written as such.
    Anything else stays json's TypeError."""
    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(f"Object of type {type(x).__name__} is not JSON serializable")


def _as_path(path):
    """``path`` as a str, or a TypeError: open(5) would quietly use file descriptor 5."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"expected a file path (a str or pathlib.Path), got "
                        f"{type(path).__name__} {path!r}")
    return os.fspath(path)


def _write_atomically(path, write, mode="w"):
    """Call write(file) on ``path + '.tmp'``, flush it to disk, then rename it over ``path``.

    Readers see the old file or the new one, never half of one. (The rename itself reaches
    the disk when the folder's entry is written: a power cut just after it may still show
    the old file, which is the old checkpoint, not a damaged one.)"""
    path = _as_path(path)
    tmp = path + ".tmp"
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:  # a failed write (disk full, Ctrl-C) leaves no half file behind
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError) and e.filename is None:  # a full disk names no file: say which
            message = (f"{e.strerror or e} while writing {path}; the file there before, if "
                       f"any, is unchanged")
            raise (OSError(e.errno, message) if e.errno else OSError(message)) from e
        raise


def _read(path):
    """(arrays, meta) of a checkpoint written by ``save``; any other file, or a damaged
    one, is a CheckpointError that names the problem."""
    path = _as_path(path)
    if not path:  # e.g. evaluate.py "": "checkpoint  does not exist" would hide the cause
        raise CheckpointError("the checkpoint's path is empty")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except OSError as e:
        raise CheckpointError(f"checkpoint {path} cannot be read ({e})") from None
    # an .npz is a zip archive; checking its magic bytes first keeps NumPy from taking
    # any other file for a pickle (and from advising to load it "unsafely")
    if magic != ZIP_MAGIC:
        raise CheckpointError(f"{path} is not a checkpoint written by this code (not an "
                              f".npz archive): another kind of file, or corrupt")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
        raise CheckpointError(f"checkpoint {path} is unreadable or corrupt ({e})") from None
    if "meta" not in arrays:
        raise CheckpointError(f"{path} is not a checkpoint written by this code (an .npz "
                              f"archive without a 'meta' entry)")
    try:
        meta = json.loads(str(arrays.pop("meta")))
    except ValueError as e:
        raise CheckpointError(f"checkpoint {path} is corrupt: its 'meta' entry is not "
                              f"valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint {path} is corrupt: its 'meta' entry is a JSON "
                              f"{type(meta).__name__}, not an object")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} has format {meta.get('format')}, "
                              f"this code reads format {FORMAT}")
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise CheckpointError(f"checkpoint {path} is corrupt: its metadata lacks "
                              f"{', '.join(missing)}")
    config = meta["config"]
    if not isinstance(config, dict):
        raise CheckpointError(f"checkpoint {path} is corrupt: its config is not a dict")
    missing = [k for k in CONFIG_KEYS if k not in config]
    if missing:
        raise CheckpointError(f"checkpoint {path} is corrupt: its config lacks "
                              f"{', '.join(missing)}")
    return arrays, meta


def _part(arrays, prefix):
    return {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}


def _load_model_state(path, arrays, model):
    """Load the checkpoint's weights into ``model``, after checking they are finite numbers
    (NaN weights would only show up later as a NaN loss or a meaningless evaluation)."""
    state = _part(arrays, "model/")
    for name, value in state.items():
        if value.dtype.kind not in "biuf":
            raise CheckpointError(f"checkpoint {path}: weight {name} holds {value.dtype} "
                                  f"data, not numbers")
        if not np.all(np.isfinite(value)):
            raise CheckpointError(f"checkpoint {path}: weight {name} holds NaN or "
                                  f"infinite values")
    try:
        model.load_state_dict(state)
    except (KeyError, ValueError) as e:  # missing/unexpected names, wrong shapes
        raise CheckpointError(f"checkpoint {path} does not fit this model: "
                              f"{e.args[0] if e.args else e}") from None


def load(path, model, optimizer, noise, config):
    """Restore everything saved by ``save``; returns (progress dict, history).

    train.py resumes from its own out_dir/ckpt.npz with this, so a damaged file gets the
    advice to delete it (load_weights' files are the user's: no such advice there).
    """
    try:
        arrays, meta = _read(path)
    except CheckpointError as e:
        raise CheckpointError(f"{e}; {RESUME_ADVICE}") from None
    _check_architecture(path, meta["config"], config, ARCHITECTURE_KEYS, "use another out_dir")
    try:
        _check_progress(path, meta)
        _load_model_state(path, arrays, model)
    except CheckpointError as e:
        raise CheckpointError(f"{e}; {RESUME_ADVICE}") from None
    try:  # Adam checks every entry (t, m.i, v.i: present, of the right shape, finite)
        optimizer.load_state_dict(_part(arrays, "optim/"))
    except (KeyError, ValueError) as e:  # the weights are sound (checked above): say so
        raise CheckpointError(
            f"checkpoint {path} is corrupt: its optimiser state is unusable "
            f"({e.args[0] if e.args else e}). Its weights are sound: --init_from={path} with "
            f"another --out_dir starts a new run from them; or {RESUME_ADVICE}") from None
    noise.set_state(meta["noise_rng"])  # checked by _check_progress
    progress = {k: meta[k] for k in ("epoch", "step", "sums", "data_rng")}
    return progress, meta["history"]


def _is_number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _is_count(x):
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _are_numbers(x, n):
    return isinstance(x, list) and len(x) == n and all(_is_number(v) for v in x)


def _is_record(record, n_layers):
    """An epoch record with what the end of the run plots from it (plots.py); the test
    values only in the epochs that were evaluated."""
    return (isinstance(record, dict) and _is_count(record.get("epoch"))
            and _is_number(record.get("beta")) and _is_number(record.get("train_elbo"))
            and _are_numbers(record.get("kl"), n_layers)
            and all(record.get(k) is None or _is_number(record[k])
                    for k in ("test_elbo", "test_lk")))


def _check_progress(path, meta):
    """The parts of the metadata only a resumed run uses: counters, history, the sums of
    an unfinished epoch and RNG states. (Checked now: a bad history record or KL list
    would otherwise stop the run only at its end, in the plots.)"""
    for key in ("epoch", "step"):
        value = meta[key]
        if not _is_count(value):
            raise CheckpointError(f"checkpoint {path} is corrupt: {key} is {value!r}, "
                                  f"not a count")
    n_layers = len(meta["config"]["z_dims"])  # that of this run: _check_architecture ran
    history = meta["history"]
    if not isinstance(history, list):
        raise CheckpointError(f"checkpoint {path} is corrupt: its history is not a list of "
                              f"epoch records")
    for record in history:
        if not _is_record(record, n_layers):
            raise CheckpointError(f"checkpoint {path} is corrupt: its history holds {record!r}, "
                                  f"not an epoch record (numbers for epoch, beta, train_elbo, "
                                  f"and test_elbo and test_lk if evaluated; {n_layers} numbers "
                                  f"for kl)")
    sums = meta["sums"]
    if sums is not None and not (isinstance(sums, dict) and _is_number(sums.get("elbo"))
                                 and _is_number(sums.get("log_px"))
                                 and _is_count(sums.get("n")) and sums["n"] > 0  # a divisor
                                 and _is_number(sums.get("seconds", 0.0))
                                 and _are_numbers(sums.get("kl"), n_layers)):
        raise CheckpointError(f"checkpoint {path} is corrupt: its sums are {sums!r}, not the "
                              f"sums of steps done (numbers for elbo and log_px, a count >= 1 "
                              f"for n, {n_layers} numbers for kl)")
    for key in ("noise_rng", "data_rng"):
        try:  # NumPy validates a state when it is set: try it on a scratch generator
            np.random.default_rng().bit_generator.state = meta[key]
        except (TypeError, ValueError, KeyError):
            raise CheckpointError(f"checkpoint {path} is corrupt: {key} is not a valid "
                                  f"random-generator state") from None


def _check_architecture(path, saved_config, config, keys, advice):
    """Refuse a checkpoint trained with other values of ``keys`` than ``config``, naming
    the first that differs (rather than the first weight whose shape differs)."""
    for key in keys:
        saved, now = saved_config.get(key), config.get(key)
        if isinstance(now, tuple) and isinstance(saved, list):
            saved = tuple(saved)
        if saved != now:
            raise CheckpointError(f"checkpoint {path} was trained with {key}={saved!r}, "
                                  f"but this run has {key}={now!r}: {advice}")


def load_weights(path, model, config=None):
    """Load only the model weights of a checkpoint (to fine-tune or to evaluate). With the
    run's ``config``, a checkpoint of another architecture is refused by name first."""
    arrays, meta = _read(path)
    if config is not None:  # the data set may differ, if its images have the same size
        _check_architecture(path, meta["config"], config,
                            [k for k in ARCHITECTURE_KEYS if k != "dataset"],
                            "--init_from needs a checkpoint of the same architecture")
    _load_model_state(path, arrays, model)
    return meta


def read_config(path):
    """The configuration a checkpoint was trained with."""
    return _read(path)[1]["config"]


def write_metrics(path, history):
    """Rewrite the metrics file, one JSON object per epoch (atomically, like checkpoints)."""
    _write_atomically(path, lambda f: f.writelines(json.dumps(r, default=_plain) + "\n"
                                                   for r in history))


def write_json(path, obj):
    """Write ``obj`` as an indented JSON file, atomically (e.g. final.json)."""
    _write_atomically(path, lambda f: json.dump(obj, f, indent=1, default=_plain))
