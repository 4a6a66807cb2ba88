"""The chapters hold narrative, parameters and plots; their logic lives in `llfc_core.book` (tested there).

Checked on the notebooks' source, without running them: no code cell defines a function, a class or a
named lambda; no code cell is longer than `MAX_LINES`; no cell reaches into a private name of the book or
the core; every chapter opens with the same install cell; and every name the narrative puts in backticks
(`claims.lemma1`, `llfc_core.metrics.layer_summary`, `lmc.barrier`) still exists, so the text cannot
point at a function that moved.
"""
import ast
import importlib
import re
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
CHAPTERS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
# The longest code cell may have this many lines (blank lines and comments included): the longest today
# draws one figure per quantity in a loop. A cell that needs more is computing something the book layer
# should (`claims`, `width`, `plots`).
MAX_LINES = 15
INSTALL_CELL = 1  # cells[0] is the chapter's introduction (markdown), cells[1] installs llfc-core


def code_cells(path):
    return [c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]


def python(source: str) -> ast.Module:
    """A cell's source as Python: IPython magics and shell escapes (`%pip`, `!ls`) become `pass`."""
    lines = [re.sub(r"^(\s*)[%!].*$", r"\1pass", line) for line in source.splitlines()]
    return ast.parse("\n".join(lines))


def lines(source: str) -> int:
    return len(source.strip("\n").splitlines())


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_no_cell_defines_a_function_or_class(path):
    for cell in code_cells(path):
        for node in ast.walk(python(cell.source)):
            assert not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)), (
                f"{path.stem}: `{node.name}` is defined in a notebook; put it in llfc_core.book and call it")
            named = (isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign, ast.NamedExpr))
                     and isinstance(node.value, ast.Lambda))
            assert not named, f"{path.stem}: a lambda assigned to a name (line {node.lineno}); write a function in llfc_core.book"


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_no_cell_is_longer_than_max_lines(path):
    long = [(i, lines(c.source)) for i, c in enumerate(code_cells(path)) if lines(c.source) > MAX_LINES]
    assert not long, f"{path.stem}: code cells (index among code cells, lines) over {MAX_LINES} lines: {long}"


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_no_cell_uses_a_private_name(path):
    for cell in code_cells(path):
        for node in ast.walk(python(cell.source)):
            if isinstance(node, ast.Attribute):
                assert not (node.attr.startswith("_") and not node.attr.startswith("__")), (
                    f"{path.stem}: uses the private `{node.attr}`; make it public where it is defined")
            if isinstance(node, ast.ImportFrom):
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{path.stem}: imports the private {private} from {node.module}"


def test_every_chapter_opens_with_the_same_install_cell():
    """One install cell, verbatim in every chapter; it cannot import llfc_core (it installs it).
    (`test_chapters` checks its repository URL and its `find_spec` test.)"""
    cells = {p.stem: nbformat.read(p, as_version=4).cells[INSTALL_CELL] for p in CHAPTERS}
    sources = {c.source.strip() for c in cells.values()}
    assert len(sources) == 1, "the install cells differ between chapters"
    (source,) = sources
    assert all(c.cell_type == "code" and "remove-cell" in c.metadata.get("tags", []) for c in cells.values())
    tree = python(source)
    imported = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)] + [
        a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not any(m and m.split(".")[0] == "llfc_core" for m in imported)


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_opens_in_colab_with_a_gpu(path):
    """Opened from the book's launch button, Colab starts the runtime the notebook's metadata asks for: a GPU."""
    metadata = nbformat.read(path, as_version=4).metadata
    assert metadata.get("accelerator") == "GPU", f"{path.stem}: notebook metadata lacks \"accelerator\": \"GPU\""
    assert metadata.get("colab", {}).get("provenance") == [], f"{path.stem}: metadata lacks \"colab\": {{\"provenance\": []}}"


def resolves(name: str) -> bool:
    """A dotted name from the narrative: a claim id, or an attribute of llfc_core, of one of its modules,
    or of one of llfc_core.book's (`claims.lemma1`, `matching.covariance_weight_matching`)."""
    from llfc_core.book import claims

    if name in claims.CLAIMS:
        return True
    parts = name.split(".")
    if parts[0] != "llfc_core":
        return any(resolves(f"{prefix}.{name}") for prefix in ("llfc_core.book", "llfc_core"))
    for split in range(len(parts), 0, -1):  # the longest importable prefix, then attributes
        try:
            target = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for attr in parts[split:]:
            if not hasattr(target, attr):
                return False
            target = getattr(target, attr)
        return True
    return False


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_narrative_names_what_exists(path):
    cells = nbformat.read(path, as_version=4).cells
    text = "\n".join(c.source for c in cells if c.cell_type == "markdown")
    names = set(re.findall(r"`([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+)`", text))
    missing = sorted(n for n in names if not resolves(n))
    assert not missing, f"{path.stem}: the narrative names {missing}, which do not exist (moved or renamed?)"
