"""Tests of evaluate.py's handling of bad input: option values are usage errors, and an
expected error (bad checkpoint, missing data, no CUDA) prints ``error: ...`` and exits
with status 1, without a traceback. tests/test_train.py covers a normal evaluation."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import autograd  # noqa: E402
import evaluate  # noqa: E402
import checkpoint  # noqa: E402
import data  # noqa: E402
import lvae  # noqa: E402
from test_checkpoint import CONFIG, rewrite, write_checkpoint  # noqa: E402


def run_script(*args):
    """Run evaluate.py as a user would; returns the finished process."""
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "evaluate.py"), *map(str, args)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def assert_clean_error(proc, pattern):
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith("error:"), proc.stderr
    assert "Traceback" not in proc.stderr
    assert pattern in proc.stderr


@pytest.mark.parametrize("arg, message", [
    ("--samples=0", "argument --samples: 0 is below 1"),
    ("--samples=-3", "argument --samples: -3 is below 1"),
    ("--images=-5", "argument --images: -5 is below 0"),
    ("--batch_size=0", "argument --batch_size: 0 is below 1"),
    ("--seed=-1", "argument --seed: -1 is below 0"),
    ("--samples=many", "argument --samples: 'many' is not a whole number"),
])
def test_bad_option_values_are_usage_errors(tmp_path, capsys, arg, message):
    # checked before the checkpoint is even opened, so any path will do
    with pytest.raises(SystemExit) as e:
        evaluate.main([str(tmp_path / "ckpt.npz"), arg])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("arg", ["--sample=1", "--image=3", "--no_bn", "--dev=cpu"])
def test_shortened_option_names_are_usage_errors(tmp_path, capsys, arg):
    """argparse's prefix matching took --sample=1 for --samples=1: a typo or a guess
    must not silently pick an option."""
    with pytest.raises(SystemExit) as e:
        evaluate.main([str(tmp_path / "ckpt.npz"), arg])
    assert e.value.code == 2
    assert f"unrecognized arguments: {arg}" in capsys.readouterr().err


def test_help_describes_the_bound_in_whole_words(capsys):
    """--help's first paragraph comes from the module docstring, which argparse re-wraps:
    a line broken after "importance-" printed as "importance- weighted"."""
    with pytest.raises(SystemExit):
        evaluate.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "the importance-weighted bound L_K (K = 5000)" in text, text


def test_more_images_than_the_test_set_is_a_usage_error(tmp_path, capsys, monkeypatch):
    """--images=99999 used to be quietly cut to the 10000 test images: the user asked for
    a number the test set cannot give (0 asks for all), so it is an error, found before
    any evaluation (the bound is faked: it must not be called)."""
    ckpt = write_checkpoint(tmp_path / "ckpt.npz")
    monkeypatch.setattr(lvae, "log_likelihood_bound", None)
    with pytest.raises(SystemExit) as e:
        evaluate.main([ckpt, "--images=99999"])
    assert e.value.code == 2
    assert ("argument --images: 99999 is more than the 10000 images of the mnist test set "
            "(0 = all of them)") in capsys.readouterr().err


def test_bad_checkpoint_is_an_error_line_without_traceback(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint\n")
    assert_clean_error(run_script(text), "not a checkpoint written by this code")
    assert_clean_error(run_script(tmp_path / "missing.npz"), "does not exist")


@pytest.mark.parametrize("key, value, message", [
    ("z_dims", "4,2", "z_dims must be a tuple of ints"),
    ("n_dense", 1.5, "n_dense must be an int"),
    ("model", "lvea", "unknown model 'lvea'"),
])
def test_config_of_the_wrong_type_is_a_checkpoint_error(tmp_path, key, value, message):
    """The config inside a checkpoint rebuilds the model: a value of the wrong type there
    is a corrupt checkpoint, named as such (it used to be a TypeError traceback)."""
    ckpt = write_checkpoint(tmp_path / "ckpt.npz")
    rewrite(ckpt, lambda arrays, meta: meta["config"].__setitem__(key, value))
    with pytest.raises(checkpoint.CheckpointError,
                       match=f"its config does not describe a model .*{message}"):
        evaluate.load_model(ckpt)


def test_data_root_of_the_wrong_type_is_an_error_line_without_traceback(tmp_path):
    """A data_root that is not a folder name is a corrupt checkpoint (it used to be a
    TypeError traceback from pathlib)."""
    ckpt = write_checkpoint(tmp_path / "ckpt.npz", {**CONFIG, "data_root": 3})
    assert_clean_error(run_script(ckpt), "is corrupt: its data_root is 3, not a folder name")


def test_missing_data_is_an_error_line_without_traceback(tmp_path):
    (tmp_path / "empty").mkdir()
    ckpt = write_checkpoint(tmp_path / "ckpt.npz",
                            {**CONFIG, "data_root": str(tmp_path / "empty")})
    assert_clean_error(run_script(ckpt), "file not found")


def test_missing_data_in_the_checkpoints_data_root_says_whose_folder_it_is(tmp_path):
    """data.py's advice, 'leave --data_root empty', was all it said: no --data_root was
    given, the folder was the checkpoint's."""
    (tmp_path / "empty").mkdir()
    ckpt = write_checkpoint(tmp_path / "ckpt.npz",
                            {**CONFIG, "data_root": str(tmp_path / "empty")})
    with pytest.raises(data.DataError, match=r"That folder is the checkpoint's data_root: "
                                             r"give --data_root=FOLDER, or --data_root= "):
        evaluate.main([str(ckpt)])
    with pytest.raises(data.DataError) as e:  # a folder the user gave is theirs
        evaluate.main([str(ckpt), f"--data_root={tmp_path / 'empty'}"])
    assert "checkpoint's data_root" not in str(e.value)


@pytest.mark.skipif(autograd.cuda_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_an_error_line_without_traceback(tmp_path):
    assert_clean_error(run_script(tmp_path / "ckpt.npz", "--device=cuda"),
                       "device 'cuda' was asked for")


def test_script_succeeds_with_exit_status_0(tmp_path):
    ckpt = write_checkpoint(tmp_path / "ckpt.npz")  # untrained, on the shipped MNIST
    proc = run_script(ckpt, "--samples=2", "--images=5", "--no_bn_recompute")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["samples"] == 2 and result["images"] == 5


def test_one_image_has_no_standard_error_and_the_json_line_stays_json(tmp_path):
    """One image has no spread: the line says +- nan, and the JSON line leaves stderr out
    (json.dumps would write NaN, which strict JSON readers such as jq refuse)."""
    ckpt = write_checkpoint(tmp_path / "ckpt.npz")
    proc = run_script(ckpt, "--samples=2", "--images=1", "--no_bn_recompute")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert "+- nan nats on 1 test images" in lines[-2]
    result = json.loads(lines[-1], parse_constant=lambda name: pytest.fail(f"{name} in JSON"))
    assert result["images"] == 1 and "stderr" not in result


def test_blocks_give_the_numbers_of_one_call(tmp_path, capsys):
    """evaluate.py goes through the test set a batch at a time (so that Ctrl-C keeps the
    batches done): the same bound as one call over all the images."""
    ckpt = write_checkpoint(tmp_path / "ckpt.npz")
    result = evaluate.main([ckpt, "--samples=3", "--images=25", "--batch_size=2",
                            "--no_bn_recompute"])
    net, _ = evaluate.load_model(ckpt)
    test_x = data.binarized_test_set(data.load_dataset("mnist").test_x)[:25]
    expected = lvae.log_likelihood_bound(net, test_x, 3, lvae.Noise(0), batch_size=2)
    assert result["images"] == 25
    assert result["test_lk"] == pytest.approx(float(expected.mean()), rel=1e-12)


def test_interrupt_reports_the_images_done(tmp_path, capsys, monkeypatch):
    ckpt = write_checkpoint(tmp_path / "ckpt.npz")
    real, calls = lvae.log_likelihood_bound, []

    def interrupted_on_the_third_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    monkeypatch.setattr(lvae, "log_likelihood_bound", interrupted_on_the_third_batch)
    with pytest.raises(SystemExit) as e:
        evaluate.main([ckpt, "--samples=3", "--images=25", "--batch_size=2",
                       "--no_bn_recompute"])
    assert e.value.code == 130
    err = capsys.readouterr().err
    assert re.search(r"interrupted after 4/25 images: L_3 = -?[0-9.]+ \+- [0-9.]+ nats on "
                     r"the first 4 test images", err), err


def test_defaults_are_l_5000_on_every_test_image(tmp_path, monkeypatch):
    """Without --samples and --images, evaluate.py reports the paper's number: L_5000 over
    all 10000 test images (the bound itself is faked: only what is asked for matters)."""
    ckpt = write_checkpoint(tmp_path / "ckpt.npz")
    calls = []

    def fake_bound(net, x, samples, noise, batch_size=100):
        calls.append((len(x), samples))
        return np.zeros(len(x))
    monkeypatch.setattr(lvae, "log_likelihood_bound", fake_bound)
    result = evaluate.main([ckpt, "--no_bn_recompute"])
    assert result["samples"] == 5000 and result["images"] == 10000
    assert {k for _, k in calls} == {5000} and sum(n for n, _ in calls) == 10000


def test_partial_report_gives_the_mean_and_its_standard_error(capsys):
    """After Ctrl-C: the mean over the finished images +- s / sqrt(n)."""
    evaluate.report_partial([np.array([-90.0, -92.0]), np.array([-94.0, -96.0])], 10, 7)
    # mean -93, squared deviations 9 + 1 + 1 + 9 = 20, s = sqrt(20 / 3) = 2.582,
    # standard error 2.582 / 2 = 1.291
    assert ("interrupted after 4/10 images: L_7 = -93.00 +- 1.29 nats on the first 4 test "
            "images") in capsys.readouterr().err


def test_partial_report_before_the_first_batch_says_so(capsys):
    """Ctrl-C during the first batch: no images are done, and the report says so."""
    evaluate.report_partial([], 10, 7)
    assert "interrupted before the first batch of images was done" in capsys.readouterr().err


@pytest.mark.parametrize("args", [["--samples=2", "--samples=3"], ["--images", "5", "--images=6"]])
def test_an_option_given_twice_is_a_usage_error(tmp_path, capsys, args):
    """argparse let the last one win without a word (train.py refuses it too)."""
    with pytest.raises(SystemExit) as e:
        evaluate.main([str(tmp_path / "ckpt.npz"), *args])
    assert e.value.code == 2
    assert f"argument {args[0].split('=')[0]}: given twice" in capsys.readouterr().err
