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

Which exercise a student's notebook is comes from the NN_name anywhere in its file name
(downloads get renamed: alice_1234_02_merge.ipynb, "03_gaussian_kl (1).ipynb"), else
from the check it calls (checks.check_merge -> 02_merge). Two notebooks of one folder
for the same exercise are both graded and flagged; code cells outside the exercise cell
that the handout lacks are named, since they are not graded.

Each check cell prints one line per part of the exercise, starting with PASS, NOT DONE
YET, WRONG or WRONG GRADIENT (see checks.py); the report counts them and repeats the
lines that did not pass. The exit status is 0 when every part of every notebook passed.
Needs nbformat, nbclient and ipykernel (requirements-test.txt); the project does not.
"""
import functools
import glob
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # the repository, for cli.py
import cli  # noqa: E402

SOLUTIONS = os.path.join(HERE, "solutions")
HEADLINE = re.compile(r"^(PASS|NOT DONE YET|WRONG GRADIENT|WRONG):")
# the parts of each exercise: one status line each
PARTS = {"01_softplus": 2, "02_merge": 2, "03_gaussian_kl": 2, "04_batchnorm_backward": 2,
         "05_iw_bound": 3, "06_reparameterize": 2, "07_top_down": 2}
# put before the check cell's code: the check uses this folder's checks.py as it is on
# disk, whatever the exercise cell did to the module it imported
RELOAD_CHECKS = "import importlib; checks = importlib.reload(checks)\n"
CHECK_CALL = re.compile(r"\bchecks\.(check_\w+)\s*\(")


def exercise_notebooks(folder=HERE):
    """The exercise notebooks of a folder (names like 01_softplus.ipynb), sorted."""
    return sorted(glob.glob(os.path.join(folder, "[0-9][0-9]_*.ipynb")))


def exercise_from_filename(path):
    """The exercise whose NN_name is in the file's name, anywhere: 02_merge for
    alice_1234_02_merge.ipynb or "02_merge (1).ipynb". None when no name, or two, are."""
    filename = os.path.basename(path).lower()
    # not preceded by a digit (102_merge) nor followed by a letter (02_merged)
    found = [name for name in PARTS if re.search(rf"(?<!\d){name}(?![a-z])", filename)]
    return found[0] if len(found) == 1 else None


@functools.lru_cache(maxsize=None)
def check_functions():
    """{'check_merge': '02_merge', ...}: the check that each handout notebook's check
    cell calls, read from the notebooks so that it cannot disagree with them."""
    found = {}
    for path in exercise_notebooks():
        name = os.path.splitext(os.path.basename(path))[0]
        for cell in tagged(read(path), "check"):
            found.update((function, name) for function in CHECK_CALL.findall(cell.source))
    return found


def exercise_from_checks(path):
    """The exercise whose check the notebook calls (checks.check_merge -> 02_merge), in
    any code cell (the tag may be gone); None when it calls none, or several, or the
    file is not a notebook."""
    try:
        nb = read(path)
    except Exception:  # not a notebook: the grading says so
        return None
    known = check_functions()
    names = {known[function] for cell in nb.cells if cell.cell_type == "code"
             for function in CHECK_CALL.findall(cell.source) if function in known}
    return names.pop() if len(names) == 1 else None


def identify(path):
    """The exercise a student's notebook is (e.g. '02_merge'), or None: by its file
    name, else by its check call."""
    return exercise_from_filename(path) or exercise_from_checks(path)


def read(path):
    """The notebook at ``path``, or a ValueError saying that it is not one. A JSON file of
    another shape (a number, a list, cells that are not objects) would otherwise fail in
    nbformat or below with "'int' object is not iterable" and the like."""
    import nbformat
    try:
        nb = nbformat.read(path, as_version=4)
        ok = isinstance(nb.cells, list) and all(_is_cell(cell) for cell in nb.cells)
    except (AttributeError, KeyError, TypeError, nbformat.ValidationError):
        ok = False  # nbformat's errors on JSON that is not a notebook
    if not ok:
        raise ValueError(f"{path}: not a Jupyter notebook (JSON, but not an object with a "
                         f"list of cells, each with a cell_type, its source and any tags)")
    return nb


def _is_cell(cell):
    """A cell as the grading reads it: a type, source text, and tags (if any) in a list."""
    metadata = cell.get("metadata", {}) if isinstance(cell, dict) else None
    return (isinstance(metadata, dict) and isinstance(metadata.get("tags", []), list)
            and isinstance(cell.get("cell_type"), str) and isinstance(cell.get("source"), str))


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
    # --log-level=ERROR: the kernel's start-up warnings (ipykernel 7 warns on every start
    # that it talks over local TCP unencrypted) would otherwise interleave with the report
    NotebookClient(nb, timeout=timeout, kernel_name="python3", allow_errors=True,
                   extra_arguments=["--log-level=ERROR"],
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
    """Execute this folder's copy of the notebook (of the same file name, e.g.
    02_merge.ipynb), with ``source`` as its exercise cell (None: leave the blank).
    Returns (headlines, errors)."""
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


def ungraded_code(path, name):
    """The student's code cells that grading drops: outside the exercise cell, not empty
    and not in the handout (a helper in a new cell, an edited check cell), as
    'cell 9: `def helper(x):`' (cells counted from 1, as Jupyter shows them). The set-up
    cell (the one that imports checks) is left out: an older handout's differs."""
    handout = {cell.source.strip() for cell in read(os.path.join(HERE, name + ".ipynb")).cells
               if cell.cell_type == "code"}
    notes = []
    for i, cell in enumerate(read(path).cells):
        code = cell.source.strip()
        if (cell.cell_type == "code" and code and code not in handout
                and "\nimport checks" not in code
                and "exercise" not in cell.get("metadata", {}).get("tags", [])):
            notes.append(f"cell {i + 1}: `{code.splitlines()[0]}`")
    return notes


def collect(paths):
    """[(path, exercise or None)] for the paths given (notebooks or folders of them),
    and the lines to report first: a folder's missing exercises and the notebooks in
    it that are not exercises. Returns (notebooks, lines, all_found)."""
    notebooks, lines, all_found = [], [], True
    for p in paths:
        if not os.path.isdir(p):
            notebooks.append((p, identify(p) if os.path.exists(p) else None))
            continue
        found = []
        for path in sorted(glob.glob(os.path.join(p, "*.ipynb"))):
            name = identify(path)
            if name is None:  # a scratch notebook; a renamed exercise shows as MISSING
                lines.append(f"{path}: skipped: not one of the exercises (no NN_name in "
                             f"its file name, no checks.check_...() call in it)")
            else:
                found.append((path, name))
        for name in sorted(set(PARTS) - {name for _, name in found}):
            lines.append(f"{os.path.join(p, name + '.ipynb')}: MISSING")
            all_found = False
        notebooks += found
    return notebooks, lines, all_found


def duplicates(notebooks):
    """{path: problem} for notebooks of one folder that are the same exercise: all are
    graded and flagged rather than one picked silently."""
    groups = {}
    for path, name in notebooks:
        if name is not None:
            groups.setdefault((os.path.dirname(os.path.abspath(path)), name), []).append(path)
    problems = {}
    for (_, name), paths in groups.items():
        if len(paths) > 1:
            for path in paths:
                problems[path] = (f"{len(paths)} notebooks in this folder are {name}: "
                                  f"{', '.join(os.path.basename(q) for q in paths)}; "
                                  f"which one counts?")
    return problems


def main(argv=None):
    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="*", help="student notebooks or folders of them")
    parser.add_argument("--solutions", action="store_true",
                        help="grade the reference solutions in solutions/")
    parser.add_argument("--timeout", type=cli.count(1), default=300,  # nbclient: 0 = no limit
                        help="seconds per cell")
    args = parser.parse_args(argv)
    if args.solutions and args.paths:  # each path's notebook would be graded with the solution
        parser.error("--solutions grades the reference solutions, not the notebooks given: "
                     "give either --solutions or paths")
    if args.solutions and not os.path.isdir(SOLUTIONS):
        parser.error(f"--solutions: there is no {SOLUTIONS} folder: this looks like a "
                     f"students' copy, from which the handout deletes it; run --solutions "
                     f"in your own copy of the repository")

    if args.paths:
        notebooks, lines, all_pass = collect(args.paths)
        # each notebook once, also when given both itself and in its folder
        notebooks = list({os.path.abspath(p): (p, n) for p, n in notebooks}.values())
    else:
        notebooks = [(p, os.path.splitext(os.path.basename(p))[0]) for p in exercise_notebooks()]
        lines, all_pass = [], True
    for line in lines:
        print(line)
    repeated = duplicates(notebooks)
    for path, name in notebooks:
        # whose notebook, and which exercise when its name does not say: alice/x.ipynb (02_merge)
        label = path if args.paths else os.path.basename(path)
        if name is not None and os.path.basename(path) != name + ".ipynb":
            label += f" ({name})"
        notes = []
        try:
            if not os.path.exists(path):
                raise FileNotFoundError("no such file or folder")
            if name is None:
                raise ValueError(f"not one of the exercises: no NN_name "
                                 f"({', '.join(sorted(PARTS))}) in its file name and no "
                                 f"checks.check_...() call in it")
            if args.solutions:
                source = solution_source(name + ".ipynb")
            elif args.paths:
                source = student_source(path)
                notes = ungraded_code(path, name)
            else:
                source = None
            headlines, errors = grade(name + ".ipynb", source, args.timeout)
        except Exception as e:  # a missing file, a broken notebook, no kernel
            headlines, errors = [], [f"{type(e).__name__}: {e}"]
        expected = PARTS.get(name)
        if headlines and len(headlines) != expected:  # e.g. the student's code printed PASS
            errors.append(f"the checks printed {len(headlines)} status lines, not the "
                          f"exercise's {expected}: read the exercise cell")
        if path in repeated:
            errors.append(repeated[path])
        passed = sum(line.startswith("PASS:") for line in headlines)
        all_pass &= bool(headlines) and passed == len(headlines) and not errors
        print(f"{label}: {passed} of {len(headlines)} parts pass"
              + (f", {len(errors)} problem(s)" if errors else ""))
        for line in [h for h in headlines if not h.startswith("PASS:")] + errors:
            print(f"    {line}")
        if notes:  # not a failure: the grade stands, but the student may have lost work
            print(f"    note: code outside the exercise cell is not graded: {'; '.join(notes)}")
    return 0 if all_pass else 1


if __name__ == "__main__":
    sys.exit(main())
