"""Every chapter executed end to end with papermill at the smoke profile, then the book built with -W.

The chapters share the session's private cache (conftest), so models are trained once; results go to a
private results folder, never to the committed results/. The tour (chapter 0) trains through the model
cache only: it reads no result tables, checks no claims and writes nothing under results/.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CHAPTERS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
TOUR = "00_tour"  # the whole paper in one sitting, for teaching: no tables, no claims, no results/
KERNEL = "python3"


def test_every_chapter_is_in_the_toc():
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [c["file"] for part in toc["parts"] for c in part["chapters"]]
    assert [f"notebooks/{p.stem}" for p in CHAPTERS] == [f for f in files if f.startswith("notebooks/")]
    assert len(CHAPTERS) == 7 and CHAPTERS[0].stem == TOUR


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_templates_have_no_outputs_and_a_parameters_cell(path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), "commit notebooks without outputs"
    assert sum("parameters" in c.metadata.get("tags", []) for c in code) == 1


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_colab_cell_uses_the_one_repository_url(path):
    url = yaml.safe_load((ROOT / "_config.yml").read_text())["repository"]["url"]
    install = nbformat.read(path, as_version=4).cells[1].source
    assert f'REPO_URL = "{url}"' in install and "find_spec(\"llfc_core\") is None" in install
    assert '"llfc-core[colab] @ git+{REPO_URL}"' in install  # papermill and plotting, no book builder
    # Google Drive is offered, never mounted by default: every line that names it is a comment
    assert all(line.lstrip().startswith("#") for line in install.splitlines() if "drive" in line.lower())


@pytest.fixture(scope="module")
def kernel():
    """papermill needs a registered kernel; register it for this interpreter if it is missing."""
    from jupyter_client.kernelspec import KernelSpecManager

    if KERNEL not in KernelSpecManager().find_kernel_specs():
        subprocess.run([sys.executable, "-m", "ipykernel", "install", "--sys-prefix", "--name", KERNEL], check=True)
    return KERNEL


@pytest.mark.slow
@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_chapter_runs_in_smoke_profile(path, kernel, tmp_path):
    import papermill

    out = tmp_path / path.name
    results = Path(os.environ["LLFC_RESULTS"]) / "smoke"
    before = {p: p.stat().st_mtime_ns for p in results.rglob("*")} if results.exists() else {}
    papermill.execute_notebook(str(path), str(out), kernel_name=kernel, parameters={"profile": "smoke"},
                               cwd=str(ROOT / "notebooks"), progress_bar=False)
    nb = nbformat.read(out, as_version=4)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    text = "".join(o.get("text", "") + json.dumps(o.get("data", {})) for c in nb.cells if c.cell_type == "code"
                   for o in c.outputs)
    assert "profile 'smoke'" in text and "image/png" in text  # every chapter says its profile and draws figures
    if path.stem == TOUR:  # no tables read or written, no claims: results/ is left as it was
        assert before == ({p: p.stat().st_mtime_ns for p in results.rglob("*")} if results.exists() else {})
        return
    assert "claim" in text  # the checks table was shown
    manifest = json.loads((results / "manifest.json").read_text())
    assert path.stem in manifest["chapters"] and manifest["profile"] == "smoke"


@pytest.mark.slow
def test_book_builds_with_warnings_as_errors(built_book):
    """After the chapters ran, the book executes them again (reading the smoke results) and renders."""
    for page in ["notebooks/00_tour.html", "notebooks/01_lmc.html", "notebooks/04_matching.html", "book/intro.html",
                 "book/references.html"]:
        assert (built_book / page).exists(), page
    assert "colab.research.google.com" in (built_book / "notebooks/02_llfc.html").read_text()
    assert (built_book / "_static/mathjax/tex-chtml.js").exists()  # math renders without a CDN
    assert (built_book / "results/smoke/lmc.csv").exists()  # the chapters' data links have a target
