"""bench/bench.py's options are checked before any work: a bad --out or --threads used to
be found only when the report was written (after minutes of benchmark) or never."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_bench(*args):
    return subprocess.run([sys.executable, str(ROOT / "bench" / "bench.py"), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("arg, message", [
    ("--out={tmp}", "argument --out: {tmp} is a folder; give a file name"),
    ("--out={tmp}/file.txt/x.txt", "argument --out: {tmp}/file.txt is a file, not a folder"),
    ("--out={tmp}/file.txt/a/b.txt", "argument --out: {tmp}/file.txt is a file, not a folder"),
    ("--threads=0", "argument --threads: must be >= 1, got 0"),
    ("--threads=-3", "argument --threads: must be >= 1, got -3"),
    ("--devic=cpu", "unrecognized arguments: --devic=cpu"),  # once ran the CPU benchmark
    ("--qui", "unrecognized arguments: --qui"),
])
def test_bad_options_are_usage_errors_before_any_work(tmp_path, arg, message):
    (tmp_path / "file.txt").write_text("")
    # --device=cuda --quick on a machine without CUDA would still run the CPU checks first
    proc = run_bench("--device=cuda", "--quick", arg.format(tmp=tmp_path))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message.format(tmp=tmp_path) in proc.stderr
    assert proc.stdout == ""  # no section of the benchmark ran


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_an_out_folder_without_write_permission_is_refused(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    proc = run_bench("--quick", f"--out={locked}/report.txt")
    assert proc.returncode == 2 and f"no permission to write in {locked}" in proc.stderr
