"""The JSON sidecar of an exported merged net: its format, and reading and checking it.

The sidecar is the ``.json`` file that :func:`~sk_softmerge._export.save_merged`
writes next to the ``.safetensors`` weights. This module owns its format: the
format name and version, the torch losses and skorch classes it can name, the
frozen :class:`Sidecar` that holds its checked fields, parsing the JSON and
checking it field by field (with the field tests), and the package version that
the sidecar records. Writing and loading the files, and checking the weights
against the sidecar and the module, are in ``_export``, which imports from here;
this module never imports ``_export``.
"""

import importlib.metadata
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from skorch import NeuralNetClassifier, NeuralNetRegressor

FORMAT = "sk_softmerge.merged-net"
"""Value of the sidecar's ``format`` field."""

FORMAT_VERSION = 1
"""Version of the file layout that save_merged writes and load_merged reads."""

_LOSSES = frozenset(
    name
    for name in torch.nn.modules.loss.__all__
    if isinstance(getattr(torch.nn, name, None), type)
)
_NET_CLASSES = {net.__name__: net for net in (NeuralNetClassifier, NeuralNetRegressor)}
"""The skorch classes the format can rebuild, by name."""


@dataclass(frozen=True)
class Sidecar:
    """The checked fields of a sidecar file, as :func:`load_merged` uses them.

    A field's name is its path in the JSON file, with ``_`` for ``.``:
    ``weights_size`` is ``sidecar["weights"]["size"]``.
    """

    weights_size: int  # in bytes
    weights_sha256: str  # 64 lowercase hexadecimal digits
    tensors: dict[str, dict]  # {name: {"dtype": "float32", "shape": [16, 64]}}
    net_class: str  # a key of _NET_CLASSES
    net_criterion: str  # a torch.nn loss class name, in _LOSSES
    net_predict_nonlinearity: str | None  # "auto" or None
    net_batch_size: int
    classes: list | None  # None for a regressor
    n_features_in: int
    unit_names: list[str]
    gates: list[list[float]]  # one row per member, one gate per unit name

    @classmethod
    def read(cls, sidecar_path: Path) -> "Sidecar":
        """Parse and check the sidecar file; raise if it is not a valid one."""
        where = f"The sidecar {str(sidecar_path)!r}"
        if not sidecar_path.is_file():
            raise FileNotFoundError(
                f"{where} of the weights file does not exist: save_merged writes "
                "both files, and load_merged needs both."
            )
        try:
            raw = json.loads(sidecar_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{where} is not valid JSON: {exc}.") from exc
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            found = raw.get("format") if isinstance(raw, dict) else raw
            raise ValueError(
                f"{where} is not an sk_softmerge merged-net sidecar: expected "
                f"format {FORMAT!r}, got {found!r}."
            )
        version = raw.get("format_version")
        # The bool test, since JSON true == 1 in Python.
        if version != FORMAT_VERSION or isinstance(version, bool):
            raise ValueError(
                f"{where} has format version {version!r}; sk_softmerge "
                f"{_package_version()} reads version {FORMAT_VERSION}. Load it "
                "with the sk_softmerge version that wrote it "
                f"({raw.get('package_version')!r})."
            )
        return cls._from_fields(raw, where)

    @classmethod
    def _from_fields(cls, raw: dict, where: str) -> "Sidecar":
        """Check every field of the parsed sidecar ``raw`` and keep it."""
        fields = {}

        def check(name, test, expected):
            value = raw
            for key in name.split("."):
                if not isinstance(value, dict) or key not in value:
                    raise ValueError(f"{where} has no {name}; expected {expected}.")
                value = value[key]
            if not test(value):
                raise ValueError(f"{where} has {name}={value!r}; expected {expected}.")
            fields[name.replace(".", "_")] = value

        # In file order, so that the first bad field is the one named; the tests
        # of classes and gates use fields checked before them.
        check("weights.size", _is_int(0), "a number of bytes")
        check("weights.sha256", _is_sha256, "64 lowercase hexadecimal digits")
        check(
            "tensors",
            _is_tensor_table,
            "a mapping of tensor names to {'dtype': str, 'shape': [int]}",
        )
        check(
            "net.class", _is_name_in(_NET_CLASSES), " or ".join(map(repr, _NET_CLASSES))
        )
        check(
            "net.criterion", _is_name_in(_LOSSES), "the class name of a torch.nn loss"
        )
        check("net.predict_nonlinearity", _is_named_nonlinearity, "'auto' or null")
        check("net.batch_size", _is_int(1), "a positive integer")
        if fields["net_class"] == NeuralNetRegressor.__name__:
            check(
                "classes", lambda value: value is None, "null for a NeuralNetRegressor"
            )
        else:
            check(
                "classes",
                _is_class_list,
                "a non-empty list of distinct integers or of distinct strings",
            )
        check("n_features_in", _is_int(1), "a positive integer")
        check("unit_names", _is_str_list, "a list of strings")
        n = len(fields["unit_names"])
        check(
            "gates",
            lambda rows: _is_gate_rows(rows, n),
            f"one row per member (at least 2) of {n} values in [0, 1], one per "
            "unit name",
        )
        return cls(**fields)


def _is_int(minimum: int):
    # type(), not isinstance(): JSON true and false are bools, which are ints.
    return lambda value: type(value) is int and value >= minimum


def _is_name_in(names):
    # The str test first: a list or an object from the file cannot be hashed.
    return lambda value: isinstance(value, str) and value in names


def _is_sha256(value) -> bool:
    return isinstance(value, str) and re.fullmatch("[0-9a-f]{64}", value) is not None


def _is_str_list(value) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def _is_tensor_table(value) -> bool:
    return isinstance(value, dict) and all(
        isinstance(spec, dict)
        and isinstance(spec.get("dtype"), str)
        and isinstance(spec.get("shape"), list)
        and all(map(_is_int(0), spec["shape"]))
        for spec in value.values()
    )


def _is_class_list(value) -> bool:
    if not isinstance(value, list) or not value:
        return False
    labels_ok = all(map(_is_int(-(2**63)), value)) or _is_str_list(value)
    return labels_ok and len(set(value)) == len(value)


def _is_gate_rows(rows, n_units: int) -> bool:
    # NaN, which Python's JSON parser accepts, fails 0 <= gate <= 1.
    return (
        isinstance(rows, list)
        and len(rows) >= 2
        and all(
            isinstance(row, list)
            and len(row) == n_units
            and all(type(gate) in (int, float) and 0 <= gate <= 1 for gate in row)
            for row in rows
        )
    )


def _is_named_nonlinearity(value) -> bool:
    # The str test first: a function or an array is never compared to "auto".
    return value is None or (isinstance(value, str) and value == "auto")


def _package_version() -> str:
    # From the installed metadata, not ``from . import __version__``: the
    # package root imports this module, so importing it back would be circular.
    try:
        return importlib.metadata.version("sk_softmerge")
    except importlib.metadata.PackageNotFoundError:
        # Imported from a source tree that was never installed.
        return "unknown"
