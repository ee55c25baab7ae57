"""cli.py: the parser of evaluate.py, compare.py, bench.py and grade.py refuses a shortened
option and an option given twice (the scripts' own tests check their messages)."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cli  # noqa: E402


def parser():
    p = cli.ArgumentParser(prog="script")
    p.add_argument("paths", nargs="*")
    p.add_argument("--samples", type=cli.count(1), default=5)
    p.add_argument("--quick", action="store_true")
    return p


@pytest.mark.parametrize("argv, message", [
    (["--samples=2", "--samples=3"], "argument --samples: given twice: give it once"),
    (["--samples", "2", "--samples=3"], "argument --samples: given twice: give it once"),
    (["--quick", "a", "--quick"], "argument --quick: given twice: give it once"),
    (["--sample=2"], "unrecognized arguments: --sample=2"),  # not taken for --samples
    (["--samples=0"], "argument --samples: 0 is below 1"),
    (["--samples=2.5"], "argument --samples: '2.5' is not a whole number"),
])
def test_usage_errors(capsys, argv, message):
    with pytest.raises(SystemExit) as stop:
        parser().parse_args(argv)
    assert stop.value.code == 2
    assert message in capsys.readouterr().err


def test_after_a_double_dash_everything_is_a_path():
    args = parser().parse_args(["--samples=2", "--", "--samples=2"])
    assert args.samples == 2 and args.paths == ["--samples=2"]


def test_without_args_it_reads_the_command_line(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["script", "--quick", "--quick"])
    with pytest.raises(SystemExit):
        parser().parse_args()
    assert "argument --quick: given twice" in capsys.readouterr().err
    monkeypatch.setattr(sys, "argv", ["script", "--samples=7", "x"])
    assert vars(parser().parse_args()) == {"paths": ["x"], "samples": 7, "quick": False}
