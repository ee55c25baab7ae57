"""The command-line parser shared by evaluate.py, compare.py, bench/bench.py and
notebooks/exercises/grade.py (train.py reads its --key=value options itself, with the
same two rules).

argparse, as it comes, accepts a shortened option (--sample for --samples) and lets the last
of two copies of an option win without a word (a typo, or an edited command line): both
are usage errors here. ``count(minimum)`` is an argparse type for whole numbers with a floor.
"""
import argparse
import sys


class ArgumentParser(argparse.ArgumentParser):
    """argparse.ArgumentParser without abbreviations, refusing an option given twice."""

    def __init__(self, **kwargs):
        super().__init__(allow_abbrev=False, **kwargs)

    def parse_args(self, args=None, namespace=None):
        argv = sys.argv[1:] if args is None else list(args)
        parsed = super().parse_args(argv, namespace)  # --help and bad values first
        options = argv[:argv.index("--")] if "--" in argv else argv  # after "--": positionals
        names = [arg.split("=", 1)[0] for arg in options if arg.startswith("--")]
        repeated = [name for i, name in enumerate(names) if name in names[:i]]
        if repeated:
            self.error(f"argument {repeated[0]}: given twice: give it once")
        return parsed


def count(minimum):
    """An argparse type: a whole number >= ``minimum``. A bad value is a usage error that
    names the option, not a crash (or a silently odd result, like --images=-5) much later."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is below {minimum}")
        return value
    return parse
