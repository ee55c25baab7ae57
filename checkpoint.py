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


class CheckpointError(ValueError):
    pass


def save(path, model, optimizer, noise, config, history, progress):
    """Write model + optimiser + RNG state + progress to ``path`` atomically."""
    arrays = {f"model/{k}": v for k, v in model.state_dict().items()}
    arrays.update({f"optim/{k}": v for k, v in optimizer.state_dict().items()})
    meta = {"format": FORMAT, "config": config, "noise_rng": noise.get_state(),
            "history": history, **progress}
    arrays["meta"] = np.array(json.dumps(meta))
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # a failed write (disk full, Ctrl-C) leaves no half file behind
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _read(path):
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
        meta = json.loads(str(arrays.pop("meta")))
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except (KeyError, ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
        raise CheckpointError(f"checkpoint {path} is unreadable or corrupt ({e}); delete "
                              f"it to start afresh") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} has format {meta.get('format')}, "
                              f"this code reads format {FORMAT}")
    return arrays, meta


def _part(arrays, prefix):
    return {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}


def load(path, model, optimizer, noise, config):
    """Restore everything saved by ``save``; returns (progress dict, history)."""
    arrays, meta = _read(path)
    for key in ARCHITECTURE_KEYS:
        saved, now = meta["config"].get(key), config.get(key)
        if isinstance(now, tuple):
            saved = tuple(saved)
        if saved != now:
            raise CheckpointError(f"checkpoint {path} was trained with {key}={saved!r}, "
                                  f"but this run has {key}={now!r}: use another out_dir")
    model.load_state_dict(_part(arrays, "model/"))
    optimizer.load_state_dict(_part(arrays, "optim/"))
    noise.set_state(meta["noise_rng"])
    progress = {k: meta[k] for k in ("epoch", "step", "sums", "data_rng")}
    return progress, meta["history"]


def load_weights(path, model):
    """Load only the model weights of a checkpoint (to fine-tune or to evaluate)."""
    arrays, meta = _read(path)
    model.load_state_dict(_part(arrays, "model/"))
    return meta


def read_config(path):
    """The configuration a checkpoint was trained with."""
    return _read(path)[1]["config"]


def write_metrics(path, history):
    """Rewrite the metrics file, one JSON object per epoch (atomically, like checkpoints)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for record in history:
            f.write(json.dumps(record) + "\n")
    os.replace(tmp, path)
