"""Compare training runs the way the paper does: learning curves, and the final test bound
of each model variant against the number of stochastic layers.

    python compare.py runs/vae runs/vae-bn runs/vae-bn-wu runs/lvae --out variants.png
    python compare.py runs/layers/* --out depth.png

Each argument is a folder that train.py wrote: its ``ckpt.npz`` holds the configuration
that names the run, ``metrics.jsonl`` one record per epoch, and ``final.json`` (once the
run has finished) the test ELBO and L_K. The run's name is the paper's: VAE or LVAE,
then +BN for batch normalisation and +WU for warm-up, e.g. LVAE+BN+WU. The runs' final
L_K must have the same K and test images (train.py's --final_lk_samples and
--final_lk_images); runs without a final L_K are drawn without one.

Prints a Markdown table of the runs and writes one PNG (see plots.compare_runs).
"""
import json
import math
import sys
from pathlib import Path

import checkpoint
import cli


# what train.py's final.json holds when it has evaluated L_K
FINAL_KEYS = ("test_lk", "lk_samples", "lk_images")
# the numbers in it, and their types
FINAL_TYPES = {"epoch": int, "test_elbo": (int, float), "test_lk": (int, float),
               "stderr": (int, float), "lk_samples": int, "lk_images": int}


class RunError(ValueError):
    pass


def is_number(value):
    """A finite int or float: bool is an int to Python, and a NaN would make the figure's
    axis limits NaN."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def check_record(record, where):
    """An epoch's record as the figure reads it, checked before the table is printed:
    an integer epoch and a train_elbo, and test_elbo, test_lk where the epoch was
    evaluated (elsewhere absent or None), all numbers."""
    if not (isinstance(record, dict) and isinstance(record.get("epoch"), int)):
        raise RunError(f"{where}: not an epoch's record (an object with an integer epoch, "
                       f"as train.py writes)")
    if record.get("train_elbo") is None:
        raise RunError(f"{where}: the record has no train_elbo")
    for key in ("train_elbo", "test_elbo", "test_lk"):
        value = record.get(key)
        if value is not None and not is_number(value):
            raise RunError(f"{where}: {key} is {value!r}, not a number")


def check_config(config, ckpt):
    """The options that name a run, of the types train.py writes: a damaged or edited
    config ended in a TypeError traceback, or a wrong name (z_dims "4,2": 3 layers)."""
    def count(v):
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0
    if not (config["model"] in ("lvae", "vae") and isinstance(config["batch_norm"], bool)
            and isinstance(config["dataset"], str) and config["dataset"]
            and isinstance(config["z_dims"], list) and config["z_dims"]
            and all(count(v) for v in config["z_dims"])
            and all(count(config.get(k, 1)) for k in ("warmup", "iw_samples"))
            and isinstance(config.get("decay_lr", False), bool)):
        raise RunError(f"checkpoint {ckpt} is corrupt: its config is not one train.py writes "
                       f"(model, batch_norm, dataset, z_dims, warmup, iw_samples, decay_lr)")


def read_text(path):
    """A run file's text; bytes that are not UTF-8 (a damaged or foreign file) are a
    RunError naming the file, not a bare "'utf-8' codec can't decode" with no name."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise RunError(f"{path}: not a text file written by train.py ({e.reason} at byte "
                       f"{e.start})") from None


def read_run(folder):
    """(config, metrics, final) of a run folder; final is None if the run has not finished."""
    folder = Path(folder)
    if folder.is_file():
        raise RunError(f"{folder} is a file: give the run's folder (the one that holds ckpt.npz)")
    if not folder.is_dir():
        raise RunError(f"{folder}: no such folder")
    ckpt, metrics_path = folder / "ckpt.npz", folder / "metrics.jsonl"
    for needed in (ckpt, metrics_path):
        if not needed.is_file():
            raise RunError(f"{folder} is not a training run: it has no {needed.name}")
    config = checkpoint.read_config(str(ckpt))
    check_config(config, ckpt)
    metrics = []
    for n, line in enumerate(read_text(metrics_path).splitlines(), 1):
        if line.strip():
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise RunError(f"{metrics_path}, line {n}: not JSON ({e.msg})") from None
            check_record(record, f"{metrics_path}, line {n}")
            metrics.append(record)
    if not metrics:
        raise RunError(f"{metrics_path} is empty: the run has not finished an epoch")
    final_path, final = folder / "final.json", None
    if final_path.is_file():
        try:
            final = json.loads(read_text(final_path))
        except json.JSONDecodeError as e:
            raise RunError(f"{final_path}: not JSON ({e.msg})") from None
        if not (isinstance(final, dict) and "test_elbo" in final
                and ("test_lk" not in final or all(k in final for k in FINAL_KEYS))):
            raise RunError(f"{final_path} is not what train.py writes: it needs test_elbo, "
                           f"and with test_lk also {', '.join(FINAL_KEYS[1:])}")
        for key, kind in FINAL_TYPES.items():
            value = final.get(key, 0)
            if isinstance(value, bool) or not isinstance(value, kind):
                raise RunError(f"{final_path}: {key} is {value!r}, not a number")
            # a NaN bound was printed as nan and the figure written without a word. A NaN
            # standard error is one image's (lvae.standard_error): train.py now leaves it
            # out of final.json, but a file from before that may hold it
            if key != "stderr" and not math.isfinite(value):
                raise RunError(f"{final_path}: {key} is {value!r}, not a finite number")
        last = metrics[-1]["epoch"]
        if final.get("epoch", last) != last:  # files from before train.py wrote it lack it
            raise RunError(f"{final_path} was written at epoch {final['epoch']}, but the run "
                           f"has trained to epoch {last}: it is stale; run train.py again to "
                           f"finish the run, which rewrites it")
    return config, metrics, final


def variant(config):
    """The paper's name of the model a configuration trains, e.g. 'LVAE+BN+WU'."""
    name = config["model"].upper()
    if config["batch_norm"]:
        name += "+BN"
    if config.get("warmup", 0) > 0:
        name += "+WU"
    if config.get("iw_samples", 1) > 1:  # fine-tuned on the importance-weighted bound
        name += f"+IW{config['iw_samples']}"
    if config.get("decay_lr"):  # not the paper's: a cosine learning-rate decay
        name += "+cos lr"
    if config["dataset"] != "mnist":
        name += f" ({config['dataset']})"
    return name


def layers(n):
    return f"{n} stochastic layer" + "s" * (n != 1)


def check_out(path):
    """Before any work: the figure must be a .png in a folder that exists."""
    out = Path(path)
    if out.suffix.lower() != ".png":
        raise RunError(f"--out {path!r}: the figure is a PNG, give a name ending in .png")
    if out.is_dir():
        raise RunError(f"--out {path}: is a folder, give a file name ending in .png")
    if not out.resolve().parent.is_dir():
        raise RunError(f"--out {path}: folder {out.parent} does not exist")


def main(argv):
    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run folders written by train.py")
    parser.add_argument("--out", default="compare.png", help="the PNG to write")
    args = parser.parse_args(argv)
    check_out(args.out)
    resolved = [Path(f).resolve() for f in args.runs]  # run and run/ are one folder
    repeated = sorted({f for f, r in zip(args.runs, resolved) if resolved.count(r) > 1})
    if repeated:
        raise RunError(f"run folder given more than once: {', '.join(repeated)}")

    runs, evaluations = [], {}
    for folder in args.runs:
        config, metrics, final = read_run(folder)
        bound = final.get("test_lk") if final else None
        if bound is not None:
            evaluations[folder] = (final["lk_samples"], final["lk_images"])
        runs.append({"variant": variant(config), "layers": len(config["z_dims"]),
                     "metrics": metrics, "bound": bound, "final": final or {},
                     "folder": folder})

    if len(set(evaluations.values())) > 1:
        raise RunError("the runs' final bounds are not comparable, they differ in K or in the "
                       "test images: " + ", ".join(f"{f}: L_{k} on {n} images"
                                                    for f, (k, n) in evaluations.items())
                       + ". Run train.py again on a finished run with the others' "
                       "--final_lk_samples and --final_lk_images (and its other options "
                       "unchanged): it redoes only the final evaluation")

    print("| run | epochs | test ELBO | test L_K | active units | folder |")
    print("| --- | --- | --- | --- | --- | --- |")
    for run in runs:
        final = run["final"]
        elbo = f"{final['test_elbo']:.2f}" if "test_elbo" in final else "not finished"
        lk = "-"
        if "test_lk" in final:  # runs from before final.json held the standard error lack it
            error = f" +- {final['stderr']:.2f}" if "stderr" in final else ""
            lk = f"L_{final['lk_samples']} = {final['test_lk']:.2f}{error} ({final['lk_images']} images)"
        print(f"| {run['variant']}, {layers(run['layers'])} | {run['metrics'][-1]['epoch']} "
              f"| {elbo} | {lk} | {final.get('active_units', '-')} | {run['folder']} |")

    import plots  # matplotlib only now, once the runs have been read
    bound = f"L_{{{next(iter(evaluations.values()))[0]}}}" if evaluations else "L_K"
    try:
        plots.compare_runs(runs, args.out, bound_name=bound)
    except OSError as e:  # e.g. the disk is full
        raise RunError(f"--out {args.out}: could not be written ({e.strerror or e})") from None
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except ValueError as e:  # RunError, CheckpointError, plots' checks: each names its cause
        sys.exit(f"error: {e}")
