"""Tests of compare.py (reading run folders, naming the variants, refusing bounds that
cannot be compared) and of plots.compare_runs, on run folders made of tiny checkpoints."""
import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import compare  # noqa: E402
import plots  # noqa: E402
from test_checkpoint import CONFIG, rewrite, write_checkpoint  # noqa: E402
from test_plots import assert_png, fake_metrics  # noqa: E402


def make_run(folder, final=None, epochs=12, **config):
    """A run folder as train.py leaves it: ckpt.npz, metrics.jsonl, maybe final.json."""
    folder.mkdir(parents=True)
    config = {**CONFIG, "warmup": 0, "iw_samples": 1, **config}
    write_checkpoint(folder / "ckpt.npz", config)
    lines = [json.dumps(m) for m in fake_metrics(epochs=epochs, eval_every=5,
                                                 layers=len(config["z_dims"]))]
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    if final is not None:
        (folder / "final.json").write_text(json.dumps(final))
    return str(folder)


def final(lk, k=1000, images=2000):
    return {"active_units": [4, 2], "test_elbo": lk - 5, "test_lk": lk, "lk_samples": k,
            "lk_images": images}


@pytest.mark.parametrize("config, name", [
    ({"model": "vae", "batch_norm": False, "warmup": 0}, "VAE"),
    ({"model": "vae", "batch_norm": True, "warmup": 0}, "VAE+BN"),
    ({"model": "vae", "batch_norm": True, "warmup": 10}, "VAE+BN+WU"),
    ({"model": "lvae", "batch_norm": True, "warmup": 200}, "LVAE+BN+WU"),
    ({"model": "lvae", "batch_norm": True, "warmup": 0, "iw_samples": 10}, "LVAE+BN+IW10"),
    ({"model": "lvae", "batch_norm": False, "warmup": 5, "dataset": "fashion_mnist"},
     "LVAE+WU (fashion_mnist)"),
    ({"model": "lvae", "batch_norm": True, "warmup": 200, "decay_lr": True}, "LVAE+BN+WU+cos lr"),
])
def test_variant_names_are_the_papers(config, name):
    assert compare.variant({**CONFIG, "iw_samples": 1, **config}) == name


def test_compare_prints_a_table_and_writes_the_figure(tmp_path, capsys):
    runs = [make_run(tmp_path / "vae", {**final(-90.5), "stderr": 0.21}, model="vae", warmup=3),
            make_run(tmp_path / "lvae", final(-90.1), warmup=3),
            make_run(tmp_path / "unfinished", None, epochs=4)]
    out = tmp_path / "cmp.png"
    assert compare.main(runs + ["--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| VAE+BN+WU, 2 stochastic layers | 12 | -95.50 | L_1000 = -90.50 +- 0.21 (2000 images)" in table
    assert "| LVAE+BN+WU, 2 stochastic layers | 12 | -95.10 | L_1000 = -90.10" in table
    assert "| LVAE+BN, 2 stochastic layers | 4 | not finished | - |" in table
    assert_png(out)


def test_compare_over_depth(tmp_path):
    runs = [make_run(tmp_path / f"{m}-{k}", final(-91 + k / 3), model=m, warmup=3,
                     z_dims=(4, 2, 1)[:k], hidden=(16, 8, 4)[:k])
            for m in ("vae", "lvae") for k in (1, 2, 3)]
    out = tmp_path / "depth.png"
    assert compare.main(runs + ["--out", str(out)]) == 0
    assert_png(out)


def test_bounds_with_different_k_or_images_are_refused(tmp_path):
    a = make_run(tmp_path / "a", final(-90, k=1000))
    b = make_run(tmp_path / "b", final(-89, k=5000))
    c = make_run(tmp_path / "c", final(-89, images=10000))
    for other in (b, c):
        with pytest.raises(compare.RunError, match="not comparable") as e:
            compare.main([a, other, "--out", str(tmp_path / "x.png")])
        # and what to do about it
        assert "--final_lk_samples and --final_lk_images" in str(e.value)
    assert not (tmp_path / "x.png").exists()


def test_folders_that_are_not_runs_are_named(tmp_path):
    with pytest.raises(compare.RunError, match="no such folder"):
        compare.read_run(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(compare.RunError, match="has no ckpt.npz"):
        compare.read_run(tmp_path / "empty")
    run = make_run(tmp_path / "run")
    (Path(run) / "metrics.jsonl").write_text('{"epoch": 1, "train_elbo": -100}\n{"epoch": 2,\n')
    with pytest.raises(compare.RunError, match="metrics.jsonl, line 2: not JSON"):
        compare.read_run(run)
    (Path(run) / "metrics.jsonl").write_text("\n")
    with pytest.raises(compare.RunError, match="is empty"):
        compare.read_run(run)
    run = make_run(tmp_path / "finished", final(-90))
    (Path(run) / "final.json").write_text('{"test_elbo": -95, "test_lk"')
    with pytest.raises(compare.RunError, match="final.json: not JSON"):
        compare.read_run(run)
    for text in ('{"test_elbo": -95, "test_lk": -90}', "-90", '{"test_lk": -90}'):
        (Path(run) / "final.json").write_text(text)
        with pytest.raises(compare.RunError, match="needs test_elbo, and with test_lk also"):
            compare.read_run(run)


def test_compare_runs_bad_inputs(tmp_path):
    good = {"variant": "LVAE", "layers": 2, "metrics": fake_metrics(), "bound": -90.0}
    with pytest.raises(ValueError, match="runs is empty"):
        plots.compare_runs([], tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"lacks key\(s\) \['bound'\]"):
        plots.compare_runs([{k: v for k, v in good.items() if k != "bound"}], tmp_path / "x.png")
    with pytest.raises(ValueError, match="run 'LVAE', 2 layers: metrics is empty"):
        plots.compare_runs([{**good, "metrics": []}], tmp_path / "x.png")
    # no finished run: the curves alone
    assert_png(plots.compare_runs([{**good, "bound": None}], tmp_path / "curves.png"))


def test_malformed_run_files_are_named(tmp_path):
    run = make_run(tmp_path / "run", final(-90))
    with pytest.raises(compare.RunError, match="ckpt.npz is a file: give the run's folder"):
        compare.read_run(Path(run) / "ckpt.npz")
    (Path(run) / "metrics.jsonl").write_text('{"epoch": 1, "train_elbo": -100}\n[1, 2]\n')
    with pytest.raises(compare.RunError, match="line 2: not an epoch's record"):
        compare.read_run(run)
    run = make_run(tmp_path / "typed", {**final(-90), "test_elbo": "x"})
    with pytest.raises(compare.RunError, match=r"final.json: test_elbo is 'x', not a number"):
        compare.read_run(run)


def test_a_final_json_from_an_earlier_end_is_stale(tmp_path):
    """final.json records the epoch it was written at; metrics that go further mean the
    run was continued after it (train.py removes it then; an edited folder may not)."""
    run = make_run(tmp_path / "run", {**final(-90), "epoch": 10}, epochs=12)
    with pytest.raises(compare.RunError, match="written at epoch 10, but the run has trained "
                                               "to epoch 12: it is stale"):
        compare.read_run(run)
    (Path(run) / "final.json").write_text(json.dumps({**final(-90), "epoch": 12}))
    assert compare.read_run(run)[2]["epoch"] == 12


@pytest.mark.parametrize("out, message", [
    ("x.txt", "give a name ending in .png"),
    ("folder.png", "is a folder"),
    ("missing/x.png", "folder .*missing does not exist"),
])
def test_a_bad_out_is_refused_before_any_work(tmp_path, capsys, out, message):
    (tmp_path / "folder.png").mkdir()
    run = make_run(tmp_path / "run", final(-90))
    with pytest.raises(compare.RunError, match=message):
        compare.main([run, "--out", str(tmp_path / out)])
    assert capsys.readouterr().out == ""  # no table printed before the error


def test_a_shortened_option_name_is_a_usage_error(tmp_path, capsys):
    run = make_run(tmp_path / "run")
    with pytest.raises(SystemExit) as e:  # argparse took --ou for --out
        compare.main([run, "--ou", str(tmp_path / "x.png")])
    assert e.value.code == 2 and "unrecognized arguments: --ou" in capsys.readouterr().err


def test_a_run_given_twice_is_refused(tmp_path):
    run = make_run(tmp_path / "run", final(-90))
    for again in (run, run + "/", str(Path(run) / ".." / "run")):
        with pytest.raises(compare.RunError, match="given more than once"):
            compare.main([run, again, "--out", str(tmp_path / "x.png")])


def test_the_table_shows_each_runs_active_units(tmp_path, capsys):
    """The active units column holds final.json's counts per layer."""
    run_dir = make_run(tmp_path / "lvae", final(-90.1), warmup=3)
    assert compare.main([run_dir, "--out", str(tmp_path / "c.png")]) == 0
    assert (f"| LVAE+BN+WU, 2 stochastic layers | 12 | -95.10 | L_1000 = -90.10 (2000 images) "
            f"| [4, 2] | {run_dir} |") in capsys.readouterr().out


def test_a_run_without_metrics_is_named(tmp_path):
    """A folder with ckpt.npz but no metrics.jsonl is not a training run: a RunError
    naming the file, not a FileNotFoundError."""
    run_dir = make_run(tmp_path / "run", final(-90))
    os.remove(os.path.join(run_dir, "metrics.jsonl"))
    with pytest.raises(compare.RunError, match="has no metrics.jsonl"):
        compare.read_run(run_dir)


@pytest.mark.parametrize("record", ['{"epoch": "1"}', '{"epoch": 1.5}', '{"train_elbo": -100}'])
def test_a_metrics_record_needs_an_integer_epoch(tmp_path, record):
    run_dir = make_run(tmp_path / "run")
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        f.write(record + "\n")
    with pytest.raises(compare.RunError, match="line 1: not an epoch's record"):
        compare.read_run(run_dir)


@pytest.mark.parametrize("record, message", [
    ('{"epoch": 1, "train_elbo": "abc"}', "train_elbo is 'abc', not a number"),
    ('{"epoch": 1, "train_elbo": -90, "test_lk": [1]}', r"test_lk is \[1\], not a number"),
    ('{"epoch": 1, "train_elbo": -90, "test_elbo": true}', "test_elbo is True, not a number"),
    ('{"epoch": 1, "train_elbo": NaN}', "train_elbo is nan, not a number"),
    ('{"epoch": 1, "train_elbo": null}', "the record has no train_elbo"),
    ('{"epoch": 1}', "the record has no train_elbo"),
])
def test_a_bad_metrics_record_is_refused_before_the_table(tmp_path, capsys, record, message):
    """A value the figure cannot plot used to end in a TypeError traceback from plots.py,
    and a record without train_elbo in an error printed after the table."""
    good = make_run(tmp_path / "good")
    bad = make_run(tmp_path / "bad")
    with open(os.path.join(bad, "metrics.jsonl"), "a") as f:
        f.write(record.replace('"epoch": 1', '"epoch": 13') + "\n")
    with pytest.raises(compare.RunError, match=f"metrics.jsonl, line 13: {message}"):
        compare.main([good, bad, "--out", str(tmp_path / "cmp.png")])
    assert capsys.readouterr().out == ""  # nothing printed before the error
    assert not (tmp_path / "cmp.png").exists()


@pytest.mark.parametrize("key, value", [("test_elbo", True), ("lk_samples", 1000.5),
                                        ("epoch", 12.0)])
def test_final_json_numbers_have_their_types(tmp_path, key, value):
    """A bool is not a number, and K, the image count and the epoch are whole numbers."""
    run_dir = make_run(tmp_path / "run", {**final(-90), "epoch": 12, key: value})
    with pytest.raises(compare.RunError, match=f"final.json: {key} is"):
        compare.read_run(run_dir)


@pytest.mark.parametrize("key", ["test_lk", "test_elbo"])
def test_final_json_bounds_must_be_finite(tmp_path, capsys, key):
    """A NaN bound was printed as nan in the table and the figure written without a word."""
    run_dir = make_run(tmp_path / "run", {**final(-90), key: float("nan")})
    with pytest.raises(compare.RunError, match=f"final.json: {key} is nan, not a finite number"):
        compare.main([run_dir, "--out", str(tmp_path / "x.png")])
    assert capsys.readouterr().out == ""


def test_a_single_image_final_bound_with_a_nan_standard_error_is_compared(tmp_path, capsys):
    """A final.json of --final_lk_images=1 from before train.py left stderr out holds NaN
    there (lvae.standard_error of one image): not an error."""
    run_dir = make_run(tmp_path / "run", {**final(-90, images=1), "stderr": float("nan")})
    assert compare.main([run_dir, "--out", str(tmp_path / "x.png")]) == 0
    assert "L_1000 = -90.00 +- nan (1 images)" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["metrics.jsonl", "final.json"])
def test_a_run_file_that_is_not_text_is_named(tmp_path, name):
    """Bytes that are not UTF-8 gave "error: 'utf-8' codec can't decode byte 0xff in
    position 0", naming no file."""
    run_dir = make_run(tmp_path / "run", final(-90))
    with open(os.path.join(run_dir, name), "ab") as f:
        f.write(b"\xff\xfe\n")
    with pytest.raises(compare.RunError, match=f"{name}: not a text file written by train.py"):
        compare.read_run(run_dir)


def test_an_option_given_twice_is_a_usage_error(tmp_path, capsys):
    """argparse wrote the last --out without a word (train.py refuses a repeat too)."""
    run = make_run(tmp_path / "run", final(-90))
    with pytest.raises(SystemExit) as e:
        compare.main([run, "--out", str(tmp_path / "a.png"), f"--out={tmp_path / 'b.png'}"])
    assert e.value.code == 2 and "argument --out: given twice" in capsys.readouterr().err
    assert not (tmp_path / "b.png").exists()


@pytest.mark.parametrize("key, value", [("model", 5), ("model", ""), ("z_dims", 4),
                                        ("z_dims", "4,2"), ("batch_norm", None),
                                        ("warmup", "x"), ("iw_samples", "2")])
def test_a_checkpoint_config_of_the_wrong_type_is_named(tmp_path, capsys, key, value):
    """It ended in an AttributeError or TypeError traceback, or a wrong name (z_dims "4,2"
    counted 3 stochastic layers)."""
    run_dir = make_run(tmp_path / "run", final(-90))
    rewrite(os.path.join(run_dir, "ckpt.npz"),
            lambda arrays, meta: meta["config"].__setitem__(key, value))
    with pytest.raises(compare.RunError, match=r"ckpt.npz is corrupt: its config is not one "
                                               r"train.py writes"):
        compare.main([run_dir, "--out", str(tmp_path / "x.png")])
    assert capsys.readouterr().out == ""
