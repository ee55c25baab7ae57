"""Run the exercise notebooks and count the parts that pass: for teachers (and the tests).

    python notebooks/exercises/grade.py --solutions        # do the reference solutions pass?
    python notebooks/exercises/grade.py STUDENT_FOLDER     # grade a student's notebooks
    python notebooks/exercises/grade.py 01_softplus.ipynb  # ... or some of them
    python notebooks/exercises/grade.py                    # the blank notebooks: NOT DONE YET

A student's notebook is not run as it is: only its cell tagged ``exercise`` is taken,
put into this folder's copy of the same notebook in place of the blank, and that copy
is executed here, next to this folder's checks.py, which the check cell reloads first.
So editing the check cells or a copy of checks.py changes nothing, and a report whose
number of parts is not the exercise's is flagged. This guards against accidents, not
against a determined student: the exercise cell runs in the same kernel as the check,
so it could still patch the project's modules; read any exercise cell that touches
``checks``, ``print`` or the project's modules.

Each check cell prints one line per part of the exercise, starting with PASS, NOT DONE
YET, WRONG or WRONG GRADIENT (see checks.py); the report counts them and repeats the
lines that did not pass. The exit status is 0 when every part of every notebook passed.
Needs nbformat, nbclient and ipykernel (requirements-test.txt); the project does not.
"""
import argparse
import glob
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
SOLUTIONS = os.path.join(HERE, "solutions")
HEADLINE = re.compile(r"^(PASS|NOT DONE YET|WRONG GRADIENT|WRONG):")
# the parts of each exercise: one status line each
PARTS = {"01_softplus": 2, "02_merge": 2, "03_gaussian_kl": 2, "04_batchnorm_backward": 2,
         "05_iw_bound": 3, "06_reparameterize": 2, "07_top_down": 2}
# put before the check cell's code: the check uses this folder's checks.py as it is on
# disk, whatever the exercise cell did to the module it imported
RELOAD_CHECKS = "import importlib; checks = importlib.reload(checks)\n"


def exercise_notebooks(folder=HERE):
    """The exercise notebooks of a folder (names like 01_softplus.ipynb), sorted."""
    return sorted(glob.glob(os.path.join(folder, "[0-9][0-9]_*.ipynb")))


def read(path):
    import nbformat
    return nbformat.read(path, as_version=4)


def tagged(nb, tag):
    """The cells of a notebook that carry ``tag`` in their metadata."""
    return [cell for cell in nb.cells if tag in cell.get("metadata", {}).get("tags", [])]


def fill_in(nb, source):
    """The notebook with its (single) exercise cell's code replaced by ``source``."""
    cells = tagged(nb, "exercise")
    if len(cells) != 1:
        raise ValueError(f"expected one cell tagged 'exercise', found {len(cells)}")
    cells[0].source = source
    return nb


def solution_source(notebook_path):
    """The reference solution of a notebook: solutions/<same name>.py."""
    name = os.path.splitext(os.path.basename(notebook_path))[0]
    with open(os.path.join(SOLUTIONS, name + ".py")) as f:
        return f.read()


def execute(nb, timeout=300):
    """Run every cell in a fresh kernel, in this folder; errors are kept as outputs."""
    from nbclient import NotebookClient
    NotebookClient(nb, timeout=timeout, kernel_name="python3", allow_errors=True,
                   resources={"metadata": {"path": HERE}}).execute()
    return nb


def results(nb):
    """(headlines, errors) of an executed notebook: the status line of every part
    printed by the check cells, and 'cell N: Type: message' for cells that raised."""
    headlines, errors = [], []
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        for out in cell.get("outputs", []):
            if out.output_type == "error":
                errors.append(f"cell {i}: {out.ename}: {out.evalue}")
            elif out.output_type == "stream" and "check" in cell.metadata.get("tags", []):
                headlines += [line for line in out.text.splitlines() if HEADLINE.match(line)]
    return headlines, errors


def grade(notebook_path, source=None, timeout=300):
    """Execute this folder's copy of the notebook, with ``source`` as its exercise cell
    (None: leave the blank). Returns (headlines, errors)."""
    nb = read(os.path.join(HERE, os.path.basename(notebook_path)))
    if source is not None:
        fill_in(nb, source)
    for cell in tagged(nb, "check"):
        cell.source = RELOAD_CHECKS + cell.source
    return results(execute(nb, timeout))


def student_source(path):
    """The code of the student's exercise cell."""
    cells = tagged(read(path), "exercise")
    if len(cells) != 1:
        raise ValueError(f"{path}: expected one cell tagged 'exercise', found {len(cells)} "
                         f"(was the tag removed? View > Cell Toolbar > Tags in Jupyter)")
    return cells[0].source


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="*", help="student notebooks or folders of them")
    parser.add_argument("--solutions", action="store_true",
                        help="grade the reference solutions in solutions/")
    parser.add_argument("--timeout", type=int, default=300, help="seconds per cell")
    args = parser.parse_args(argv)

    if args.paths:
        notebooks = []
        for p in args.paths:
            notebooks += exercise_notebooks(p) if os.path.isdir(p) else [p]
    else:
        notebooks = exercise_notebooks()
    known = {os.path.basename(p) for p in exercise_notebooks()}
    all_pass = True
    for folder in [p for p in args.paths if os.path.isdir(p)]:
        missing = known - {os.path.basename(p) for p in exercise_notebooks(folder)}
        for name in sorted(missing):
            print(f"{os.path.join(folder, name)}: MISSING")
            all_pass = False
    for path in notebooks:
        name = os.path.basename(path)
        label = path if args.paths else name  # whose notebook: alice/02_merge.ipynb
        try:
            if not os.path.exists(path):
                raise FileNotFoundError("no such file or folder")
            if name not in known:
                raise ValueError(f"not one of the exercises ({', '.join(sorted(known))})")
            if args.solutions:
                source = solution_source(path)
            elif args.paths:
                source = student_source(path)
            else:
                source = None
            headlines, errors = grade(path, source, args.timeout)
        except Exception as e:  # a missing file, a broken notebook, no kernel
            headlines, errors = [], [f"{type(e).__name__}: {e}"]
        expected = PARTS.get(os.path.splitext(name)[0])
        if headlines and len(headlines) != expected:  # e.g. the student's code printed PASS
            errors.append(f"the checks printed {len(headlines)} status lines, not the "
                          f"exercise's {expected}: read the exercise cell")
        passed = sum(line.startswith("PASS:") for line in headlines)
        all_pass &= bool(headlines) and passed == len(headlines) and not errors
        print(f"{label}: {passed} of {len(headlines)} parts pass"
              + (f", {len(errors)} problem(s)" if errors else ""))
        for line in [h for h in headlines if not h.startswith("PASS:")] + errors:
            print(f"    {line}")
    return 0 if all_pass else 1


if __name__ == "__main__":
    sys.exit(main())
