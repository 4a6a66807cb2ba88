"""Sphinx extension for the book: publish the result tables with the site, and a clean console.

* Every chapter links the CSVs it read and the manifest (`llfc_core.book.chapter.Chapter.sources`, captions of
`Chapter.figure`) as `../results/<profile>/<file>`; this copies `results/` (or $LLFC_RESULTS) into the
built site under that path, so the links work offline and a reader can take the numbers away.
* sphinx-thebe adds its inline configuration on an event that a Jupyter Book build fires twice, so
  every page declared `const THEBE_JS_URL` twice (a SyntaxError in the console): exact duplicate
  scripts are dropped.
* The theme reads the colour mode from localStorage and logs an error when a first visit finds none;
  an empty mode is set to the theme's own default, 'auto', before the theme's script runs.
"""
import os
import shutil
from pathlib import Path

PUBLISHED = (".csv", ".json")


def copy_results(app, exception):
    if exception is not None or app.builder.format != "html":
        return
    root = Path(os.environ.get("LLFC_RESULTS", Path(app.confdir) / "results"))
    if not root.is_dir():
        return
    for path in root.glob("*/*"):
        if path.suffix in PUBLISHED:
            target = Path(app.outdir) / "results" / path.parent.name / path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)


def drop_duplicate_scripts(app, pagename, templatename, context, doctree):
    seen, kept = set(), []
    for script in context.get("script_files", []):
        # The two copies differ only in an empty filename given as None or as '' (an inline script).
        key = (getattr(script, "filename", str(script)) or "", tuple(sorted(getattr(script, "attributes", {}).items())))
        if key not in seen:
            seen.add(key)
            kept.append(script)
    # In place: handlers after this one (sphinx.ext.mathjax) add to this very list, and Sphinx resets it
    # before every page.
    context["script_files"][:] = kept


FIRST_VISIT_MODE = "if (!document.documentElement.dataset.mode) { document.documentElement.dataset.mode = 'auto'; }"


def setup(app):
    app.add_js_file(None, body=FIRST_VISIT_MODE, priority=100)
    # html-page-context stops at the first handler that returns a template, so this one runs first.
    app.connect("html-page-context", drop_duplicate_scripts, priority=100)
    app.connect("build-finished", copy_results)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
