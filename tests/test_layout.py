"""The package's layout: subsystems whose imports go one way."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parent.parent / "sk_softmerge"

LEAVES = {"_inputs", "_devices", "_nets"}
"""Modules below every subsystem: they import nothing of the package but
each other."""

EXPORT = {"_export"}

ALLOWED = {
    "leaves": {"leaves"},
    "core": {"core", "leaves"},
    "align": {"align", "core", "leaves"},
    "export": {"export", "core", "leaves"},
    "estimators": {"estimators", "export", "align", "core", "leaves"},
}
"""The subsystems each subsystem may import."""


def subsystem(module: str) -> str:
    """The subsystem of ``module``, a dotted name below the package."""
    first = module.split(".")[0]
    if first == "_core":
        return "core"
    if first == "_align":
        return "align"
    if first in LEAVES:
        return "leaves"
    if first in EXPORT:
        return "export"
    return "estimators"


def imported(name: str, source: str) -> set[str]:
    """The package's modules that ``source``, the module ``name`` (dotted,
    below the package), imports: dotted names below the package, ``""`` for
    the package itself."""
    package = name.split(".")[:-1]  # the module's own package, below sk_softmerge
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - (node.level - 1)]
            target = (*base, *(node.module.split(".") if node.module else ()))
            if target:
                found.add(".".join(target))
            else:  # from . import x: the names are modules
                found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.startswith("sk_softmerge."):
                found.add(node.module.removeprefix("sk_softmerge."))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("sk_softmerge."):
                    found.add(alias.name.removeprefix("sk_softmerge."))
    return found


MODULES = sorted(
    path for path in PACKAGE.rglob("*.py") if path.name not in {"__init__.py"}
)


def name_of(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE).with_suffix("").parts)


def wrong_way(name: str, source: str) -> set[str]:
    """The modules that the module ``name`` of ``source`` may not import."""
    own = subsystem(name)
    return {
        module
        for module in imported(name, source)
        if module != "" and subsystem(module) not in ALLOWED[own]
    }


@pytest.mark.parametrize("path", MODULES, ids=name_of)
def test_imports_go_one_way(path):
    name = name_of(path)
    wrong = wrong_way(name, path.read_text())
    assert not wrong, (
        f"{name} ({subsystem(name)}) imports {sorted(wrong)}, of subsystems it "
        f"may not import: it may import {sorted(ALLOWED[subsystem(name)])}."
    )


def test_every_module_has_a_subsystem_and_the_check_sees_imports():
    names = {name_of(path) for path in MODULES}
    assert {"_core._merger", "_align._repair", "_export", "_softmerge"} <= names

    def imports_of(path):
        return imported(name_of(path), path.read_text())

    # The walk finds relative imports at every depth.
    assert "_core._merger" in imports_of(PACKAGE / "_softmerge.py")
    assert "_core._evaluation" in imports_of(PACKAGE / "_align" / "_activations.py")
    assert "_inputs" in imports_of(PACKAGE / "_core" / "_training.py")


def test_a_wrong_way_import_is_found():
    source = "from .._softmerge import _SoftMergeBase\nfrom ._gates import sample_z\n"
    assert imported("_core._fake", source) == {"_softmerge", "_core._gates"}
    assert wrong_way("_core._fake", source) == {"_softmerge"}
    # The estimators may import the core.
    assert wrong_way("_softmerge", "from ._core._gates import sample_z\n") == set()
