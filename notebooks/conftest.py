"""Execute the notebooks of this folder as tests of the plain ``python -m pytest``.

nbmake collects notebooks only when ``--nbmake`` is given, and then every notebook
under the paths pytest visits. This hook collects the notebooks of this folder
without the flag; with it, it steps aside and leaves them to nbmake.
"""

from nbmake.pytest_items import NotebookFile


def pytest_collect_file(file_path, parent):
    if file_path.suffix == ".ipynb" and not parent.config.option.nbmake:
        return NotebookFile.from_parent(parent, path=file_path)
    return None
