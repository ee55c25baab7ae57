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
    ("--out=", "argument --out: an empty file name"),  # no report was written, silently
    ("--threads=0", "argument --threads: 0 is below 1"),
    ("--threads=-3", "argument --threads: -3 is below 1"),
    ("--devic=cpu", "unrecognized arguments: --devic=cpu"),  # once ran the CPU benchmark
    ("--qui", "unrecognized arguments: --qui"),
    # the last one won without a word
    ("--device=cpu", "argument --device: given twice: give it once"),
    ("--quick", "argument --quick: given twice: give it once"),
])
def test_bad_options_are_usage_errors_before_any_work(tmp_path, arg, message):
    (tmp_path / "file.txt").write_text("")
    # --device=cuda --quick on a machine without CUDA would still run the CPU checks first
    proc = run_bench("--device=cuda", "--quick", arg.format(tmp=tmp_path))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message.format(tmp=tmp_path) in proc.stderr
    assert proc.stdout == ""  # no section of the benchmark ran


# root may write anywhere: there, os.access is made to answer as for another user (for the
# locked paths only), so that the check still runs rather than skipping
AS_ANOTHER_USER = """
import os, runpy, sys
locked = sys.argv.pop(1)
real = os.access
os.access = lambda path, mode, **kw: (False if mode & os.W_OK and os.path.abspath(path)
                                      .startswith(locked) else real(path, mode, **kw))
sys.argv[0] = sys.argv[1]
del sys.argv[1]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_bench_locked(locked, *args):
    """bench.py with ``locked`` (a folder or file) not writable, also for root."""
    if os.geteuid() != 0:
        return run_bench(*args)
    return subprocess.run([sys.executable, "-c", AS_ANOTHER_USER, str(locked),
                           str(ROOT / "bench" / "bench.py"), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_an_out_folder_without_write_permission_is_refused(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    proc = run_bench_locked(locked, "--quick", f"--out={locked}/report.txt")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"argument --out: no permission to write in {locked}" in proc.stderr
    assert proc.stdout == ""  # no section of the benchmark ran
    # a report file that exists but cannot be overwritten
    (tmp_path / "old.txt").write_text("")
    (tmp_path / "old.txt").chmod(0o400)
    proc = run_bench_locked(tmp_path / "old.txt", "--quick", f"--out={tmp_path}/old.txt")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"argument --out: no permission to write {tmp_path}/old.txt" in proc.stderr


def test_device_cuda_without_cuda_fails_after_writing_its_report(tmp_path):
    """--device cuda names the GPU: on a machine without one the run must not end with
    exit 0, or bench/gpu_check.sh would report a GPU benchmark that never ran as passed.
    (--device all benchmarks whatever is present and still exits 0.)"""
    import autograd
    if autograd.cuda_available():
        pytest.skip("CUDA is available here: the GPU benchmark would run")
    report = tmp_path / "report.txt"
    proc = run_bench("--device=cuda", "--quick", f"--out={report}")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "error: --device cuda, but CUDA is not available here" in proc.stderr
    assert "skipped: no CUDA" in report.read_text()  # the report says why, and is kept


def test_gpu_check_without_cuda_says_so_and_fails(tmp_path):
    """bench/gpu_check.sh is what a session with a lent GPU runs, once, in its few minutes.
    Where CUDA is missing (CuPy not installed, no driver) every gpu test skips and pytest
    exits 0: the script must still fail, and its summary name what is missing."""
    import autograd
    if autograd.cuda_available():
        pytest.skip("CUDA is available here: the script would run the real checks")
    proc = subprocess.run(["sh", str(ROOT / "bench" / "gpu_check.sh"), str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TMPDIR": str(tmp_path)})
    assert proc.returncode == 1, proc.stdout + proc.stderr
    summary = (tmp_path / "summary.txt").read_text().splitlines()
    assert summary[0].startswith("CUDA: NOT available, the GPU tests will all skip: no CUDA: ")
    assert autograd.cuda_problem() in summary[0]
    assert [line.split(":")[0] for line in summary[1:]] == [
        "1/3 pytest -m gpu", "2/3 bench.py --device cuda",
        "3/3 train.py --device=cuda --epochs=2 --warmup=0"]
    assert "exit 1" in summary[2] and "exit 1" in summary[3]  # both refuse, not skip
