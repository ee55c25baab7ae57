"""The teaching notebooks in notebooks/: they run top to bottom, and they are committed with
the outputs of a real run.

The execution tests run every notebook in a Jupyter kernel with LVAE_NOTEBOOK_QUICK=1 (a few
hundred images, one epoch: a few seconds each). The notebook is read into memory and run
there; the committed file is never rewritten (the executed copy is saved under pytest's
tmp_path, to look at when a test fails). They need nbformat, nbclient and ipykernel
(requirements-test.txt) and are skipped, saying so, without them. The library itself does
not depend on Jupyter.
"""
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK_DIR = os.path.join(ROOT, "notebooks")
NAMES = ["01_engine.ipynb", "02_gaussians.ipynb", "03_training_an_lvae.ipynb",
         "04_the_hierarchy.ipynb"]
WITH_FIGURES = NAMES[1:]      # notebooks 2-4 must show at least one image
MAX_BYTES = 2_000_000          # keep the repository light
CELL_TIMEOUT = 180             # seconds per cell in quick mode (they take a few)


def _path(name):
    return os.path.join(NOTEBOOK_DIR, name)


def _load_json(name):
    with open(_path(name), encoding="utf-8") as f:
        return json.load(f)


def _code_cells(nb):
    return [c for c in nb["cells"] if c["cell_type"] == "code"]


def _import_or_skip(module, why):
    """The module, or a skip naming it (any ImportError counts, e.g. a broken install)."""
    try:
        return __import__(module)
    except ImportError as error:
        pytest.skip(f"{why} needs {module} (pip install -r requirements-test.txt): {error}")


def _jupyter_or_skip():
    """nbformat and nbclient modules, or a skip that names what is missing."""
    nbformat = _import_or_skip("nbformat", "executing the notebooks")
    nbclient = _import_or_skip("nbclient", "executing the notebooks")
    _import_or_skip("ipykernel", "executing the notebooks")
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
    try:
        KernelSpecManager().get_kernel_spec("python3")
    except NoSuchKernel:
        pytest.skip("no 'python3' Jupyter kernel is installed "
                    "(python -m ipykernel install --user)")
    return nbformat, nbclient


# ------------------------------------------------------------------ they run (quick sizes)

@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_top_to_bottom_in_quick_mode(name, tmp_path, monkeypatch):
    nbformat, nbclient = _jupyter_or_skip()
    nb = nbformat.read(_path(name), as_version=4)  # in memory: the committed file stays as it is
    for cell in _code_cells(nb):                   # start from a clean notebook
        cell["outputs"], cell["execution_count"] = [], None
    monkeypatch.setenv("LVAE_NOTEBOOK_QUICK", "1")  # the kernel inherits the environment
    # one BLAS thread: the suite may share the CPU with other jobs, where busy-waiting
    # BLAS threads are many times slower; a setting made by the caller is kept
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", os.environ.get("OPENBLAS_NUM_THREADS", "1"))
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="python3",
                                     resources={"metadata": {"path": NOTEBOOK_DIR}})
    try:
        client.execute()
    finally:
        nbformat.write(nb, str(tmp_path / name))  # the executed copy, for a look after a failure
    outputs = [o for c in _code_cells(nb) for o in c["outputs"]]
    assert not [o for o in outputs if o["output_type"] == "error"], \
        f"{name} raised an error in quick mode (see {tmp_path / name})"
    if name in WITH_FIGURES:
        assert any("image/png" in o.get("data", {}) for o in outputs), \
            f"{name} should draw at least one figure in quick mode"


# ------------------------------------------------------------------ committed with outputs

@pytest.mark.parametrize("name", NAMES)
def test_committed_notebook_has_the_outputs_of_a_full_run(name):
    nb = _load_json(name)
    cells = _code_cells(nb)
    assert cells, f"{name} has no code cells"
    counts = [c.get("execution_count") for c in cells]
    assert all(isinstance(n, int) for n in counts), \
        f"{name}: every code cell should have been executed before committing (execution " \
        f"counts {counts}); run `python notebooks/build_notebooks.py --execute`"
    assert counts == sorted(counts) and len(set(counts)) == len(counts), \
        f"{name} should be executed once, top to bottom (execution counts {counts})"
    outputs = [o for c in cells for o in c.get("outputs", [])]
    errors = [o.get("ename") for o in outputs if o["output_type"] == "error"]
    assert not errors, f"{name} was committed with errors: {errors}"
    text = "".join("".join(o.get("text", "")) for o in outputs if o["output_type"] == "stream")
    assert "QUICK run" not in text, f"{name} was committed from a LVAE_NOTEBOOK_QUICK=1 run"
    if name in WITH_FIGURES:
        images = [o for o in outputs if "image/png" in o.get("data", {})]
        assert images, f"{name} should be committed with its figures (image/png outputs)"
    size = os.path.getsize(_path(name))
    assert size < MAX_BYTES, f"{name} is {size:,} bytes; keep it under {MAX_BYTES:,} (lower dpi)"


def _builder():
    _import_or_skip("nbformat", "building the notebooks")
    sys.path.insert(0, NOTEBOOK_DIR)
    try:
        import build_notebooks
    finally:
        sys.path.remove(NOTEBOOK_DIR)
    return build_notebooks


@pytest.mark.parametrize("name", NAMES)
def test_committed_notebook_matches_its_generator(name):
    """The .ipynb are written by notebooks/build_notebooks.py: an edit of one without the
    other (or a hand edit of a notebook) shows up here."""
    build_notebooks = _builder()
    expected = [(c["cell_type"], c["source"]) for c in build_notebooks.build(name).cells]
    committed = [(c["cell_type"], "".join(c["source"])) for c in _load_json(name)["cells"]]
    assert committed == expected, \
        f"{name} differs from what notebooks/build_notebooks.py generates: run " \
        f"`python notebooks/build_notebooks.py --execute {name[:2]}` and commit the result"


def test_text_only_rebuild_keeps_outputs_and_refuses_changed_code(monkeypatch):
    """--text: new prose into the committed notebook, outputs kept; changed code refused."""
    build_notebooks = _builder()
    name = "02_gaussians.ipynb"
    committed = build_notebooks.nbformat.read(_path(name), as_version=4)
    real_build = build_notebooks.build

    def build_with(edit):
        def build(n):
            nb = real_build(n)
            edit(nb.cells)
            return nb
        monkeypatch.setattr(build_notebooks, "build", build)

    def new_prose(cells):
        first_md = next(c for c in cells if c.cell_type == "markdown")
        first_md.source += "\n\nA new sentence."
        cells.insert(1, build_notebooks.md("A new cell."))
    build_with(new_prose)
    nb = build_notebooks.with_new_text(name)
    assert len(nb.cells) == len(committed.cells) + 1
    assert nb.cells[0].source.endswith("A new sentence.") and nb.cells[1].source == "A new cell."
    old_code = [c for c in committed.cells if c.cell_type == "code"]
    new_code = [c for c in nb.cells if c.cell_type == "code"]
    assert old_code and [c.outputs for c in old_code] == [c.outputs for c in new_code]

    def changed_code(cells):
        cell = next(c for c in cells if c.cell_type == "code")
        cell.source += "\nx = 1"
    build_with(changed_code)
    with pytest.raises(SystemExit, match="differs from the committed one"):
        build_notebooks.with_new_text(name)


@pytest.mark.parametrize("argv, message", [
    (["--txet"], "unknown option '--txet'"),
    (["--execute", "07"], "no notebook name contains '07'"),
])
def test_a_mistyped_build_command_writes_nothing(monkeypatch, argv, message):
    """A plain rebuild writes the notebooks without outputs: a typo must not trigger one."""
    build_notebooks = _builder()
    monkeypatch.setattr(build_notebooks.nbformat, "write",
                        lambda *a: pytest.fail("a notebook was written"))
    with pytest.raises(SystemExit, match=message):
        build_notebooks.main(argv)


def test_build_help_prints_the_usage_and_writes_nothing(monkeypatch, capsys):
    build_notebooks = _builder()
    monkeypatch.setattr(build_notebooks.nbformat, "write",
                        lambda *a: pytest.fail("a notebook was written"))
    build_notebooks.main(["--help"])
    assert "--execute" in capsys.readouterr().out
