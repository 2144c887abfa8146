"""The package's layout: subsystems whose imports go one way."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parent.parent / "sk_softmerge"

LEAVES = {"_inputs", "_devices", "_nets"}
"""Modules below every subsystem: they import nothing of the package."""

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


def imported(path: Path) -> set[str]:
    """The package's modules that the file at ``path`` imports (dotted names
    below the package, ``""`` for the package itself)."""
    here = path.relative_to(PACKAGE).with_suffix("").parts
    package = here[:-1]  # the file's own package, below sk_softmerge
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
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


@pytest.mark.parametrize("path", MODULES, ids=name_of)
def test_imports_go_one_way(path):
    own = subsystem(name_of(path))
    wrong = {
        module
        for module in imported(path)
        if subsystem(module) not in ALLOWED[own] and module != ""
    }
    assert not wrong, (
        f"{name_of(path)} ({own}) imports {sorted(wrong)}, of subsystems it may "
        f"not import: it may import {sorted(ALLOWED[own])}."
    )


def test_every_module_has_a_subsystem_and_the_check_sees_imports():
    names = {name_of(path) for path in MODULES}
    assert {"_core._merger", "_align._repair", "_export", "_softmerge"} <= names
    # The walk finds relative imports at every depth.
    assert "_core._merger" in imported(PACKAGE / "_softmerge.py")
    assert "_core._evaluation" in imported(PACKAGE / "_align" / "_activations.py")
    assert "_inputs" in imported(PACKAGE / "_core" / "_training.py")


def test_a_wrong_way_import_is_found(tmp_path, monkeypatch):
    fake = PACKAGE / "_core" / "_fake_for_test.py"
    monkeypatch.setattr(
        Path, "read_text", lambda self: "from .._softmerge import _SoftMergeBase\n"
    )
    assert imported(fake) == {"_softmerge"}
    assert subsystem("_softmerge") not in ALLOWED[subsystem("_core._fake_for_test")]
