"""Sphinx configuration of the documentation site (``docs/`` is its source folder).

Build it with ``python -m pip install -e ".[docs]"`` and then
``python -m sphinx -W --keep-going -b html docs build/docs/html``.

The pages are the Markdown files of this folder (MyST), the API reference is
generated from the docstrings (autodoc and numpydoc), and the notebooks of
``notebooks/`` are rendered with their committed outputs, never executed
(MyST-NB). Sphinx reads sources only from its source folder, so each build copies
the notebooks into ``docs/notebooks/`` (git-ignored) when it starts and removes
that copy when it ends.

pytest imports this file (``--doctest-modules`` over ``docs/``): at import it only
sets names, so it needs neither Sphinx nor a build.
"""

import shutil
from pathlib import Path

import sk_softmerge

project = "sk_softmerge"
copyright = "the sk_softmerge developers"
author = "the sk_softmerge developers"
release = sk_softmerge.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.mathjax",
    "numpydoc",
    "myst_nb",  # brings myst_parser: the .md pages, and the .ipynb notebooks
]

root_doc = "index"
exclude_patterns = ["**/.ipynb_checkpoints"]
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}

# The API reference: the names of each module's __all__, with the methods that
# sk_softmerge defines (those that scikit-learn or torch define are left out,
# see skip_foreign_member).
autodoc_default_options = {"members": True, "inherited-members": True}
autodoc_member_order = "bysource"
autodoc_typehints = "none"  # the numpydoc Parameters sections give the types
numpydoc_show_class_members = False  # autodoc lists the members; no stub pages
numpydoc_validation_checks = set()

# The notebooks as committed, outputs included.
nb_execution_mode = "off"
nb_merge_streams = True
myst_enable_extensions = ["dollarmath"]

html_theme = "furo"
html_title = f"sk_softmerge {release}"

_ROOT = Path(__file__).resolve().parent.parent
_NOTEBOOKS = _ROOT / "notebooks"
_COPY = Path(__file__).resolve().parent / "notebooks"


def copy_notebooks(app):
    """Copy ``notebooks/*.ipynb`` into the source folder for this build."""
    _COPY.mkdir(exist_ok=True)
    for notebook in sorted(_NOTEBOOKS.glob("*.ipynb")):
        # copy2 keeps the modification time: unchanged notebooks are not re-read.
        shutil.copy2(notebook, _COPY / notebook.name)


def remove_notebooks(app, exception):
    """Remove the copy: nothing is left in the source folder after a build."""
    shutil.rmtree(_COPY, ignore_errors=True)


def skip_foreign_member(app, what, name, obj, skip, options):
    """Leave out the members that sk_softmerge inherits from other packages."""
    if what != "class":
        return None
    function = getattr(obj, "fget", obj)  # a property: its getter
    module = getattr(function, "__module__", None) or ""
    if not module.startswith("sk_softmerge"):
        return True
    return None


def setup(app):
    app.connect("builder-inited", copy_notebooks)
    app.connect("build-finished", remove_notebooks)
    app.connect("autodoc-skip-member", skip_foreign_member)
