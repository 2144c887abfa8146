"""The JSON sidecar of an exported merged net: its format, and reading and checking it.

The sidecar is the ``.json`` file that :func:`~sk_softmerge._export.save_merged`
writes next to the ``.safetensors`` weights. This module owns its format: the
format name and versions, the torch losses and skorch classes it can name, how
criterion arguments are written as JSON and read back, the frozen
:class:`Sidecar` that holds its checked fields, parsing the JSON and checking it
field by field (with the field tests), and the package version that the sidecar
records. Writing and loading the files, and checking the weights against the
sidecar and the module, are in ``_export``, which imports from here; this
module never imports ``_export``.

Version 2 added ``net.criterion_arguments``, ``net.threshold`` (and the
``NeuralNetBinaryClassifier`` class) and ``input_shape``; a version 1 sidecar
is still read, as a net whose criterion has no arguments and whose input shape
is not known.
"""

import importlib.metadata
import inspect
import json
import math
import re
from dataclasses import dataclass
from numbers import Integral, Real
from pathlib import Path

import numpy as np
import torch
from skorch import NeuralNetBinaryClassifier, NeuralNetClassifier, NeuralNetRegressor

FORMAT = "sk_softmerge.merged-net"
"""Value of the sidecar's ``format`` field."""

FORMAT_VERSION = 2
"""Version of the file layout that save_merged writes."""

READABLE_VERSIONS = (1, 2)
"""Versions of the file layout that load_merged reads."""

_LOSSES = frozenset(
    name
    for name in torch.nn.modules.loss.__all__
    if isinstance(getattr(torch.nn, name, None), type)
)
_NET_CLASSES = {
    net.__name__: net
    for net in (NeuralNetClassifier, NeuralNetBinaryClassifier, NeuralNetRegressor)
}
"""The skorch classes the format can rebuild, by name."""

_VERSION_1_NET_CLASSES = (NeuralNetClassifier.__name__, NeuralNetRegressor.__name__)

_TENSOR_DTYPES = {
    str(dtype).removeprefix("torch."): dtype
    for dtype in (
        torch.float16,
        torch.bfloat16,
        torch.float32,
        torch.float64,
        torch.uint8,
        torch.int8,
        torch.int16,
        torch.int32,
        torch.int64,
        torch.bool,
    )
}
"""The dtypes of the tensor criterion arguments that the sidecar can hold."""


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
    net_criterion_arguments: dict  # as encode_criterion_arguments writes them
    net_predict_nonlinearity: str | None  # "auto" or None
    net_batch_size: int
    net_threshold: float | None  # a NeuralNetBinaryClassifier's; None otherwise
    classes: list | None  # None for a regressor
    n_features_in: int
    input_shape: list[int] | None  # [n_features_in], or None: not known
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
        # The type test, since JSON true == 1 in Python.
        if type(version) is not int or version not in READABLE_VERSIONS:
            raise ValueError(
                f"{where} has format version {version!r}; sk_softmerge "
                f"{_package_version()} reads versions "
                f"{', '.join(map(str, READABLE_VERSIONS))}. Load it with the "
                f"sk_softmerge version that wrote it ({raw.get('package_version')!r})."
            )
        return cls._from_fields(raw, where, version)

    @classmethod
    def _from_fields(cls, raw: dict, where: str, version: int) -> "Sidecar":
        """Check every field of the parsed sidecar ``raw`` of format ``version``
        and keep it; fields that ``version`` lacks get the value that means what
        that version did."""
        fields = {}

        def check(name, test, expected, keep=True):
            value = raw
            for key in name.split("."):
                if not isinstance(value, dict) or key not in value:
                    raise ValueError(f"{where} has no {name}; expected {expected}.")
                value = value[key]
            if not test(value):
                raise ValueError(f"{where} has {name}={value!r}; expected {expected}.")
            if keep:
                fields[name.replace(".", "_")] = value

        # In file order, so that the first bad field is the one named; the tests
        # of later fields use fields checked before them.
        check("weights.size", _is_int(0), "a number of bytes")
        check("weights.sha256", _is_sha256, "64 lowercase hexadecimal digits")
        check(
            "tensors",
            _is_tensor_table,
            "a mapping of tensor names to {'dtype': str, 'shape': [int]}",
        )
        names = _NET_CLASSES if version >= 2 else _VERSION_1_NET_CLASSES
        check("net.class", _is_name_in(names), " or ".join(map(repr, names)))
        check(
            "net.criterion", _is_name_in(_LOSSES), "the class name of a torch.nn loss"
        )
        if version >= 2:
            allowed = _argument_names(fields["net_criterion"])
            check(
                "net.criterion_arguments",
                lambda value: isinstance(value, dict) and set(value) <= allowed,
                "a mapping from arguments of "
                f"torch.nn.{fields['net_criterion']} ({', '.join(sorted(allowed))}) "
                "to their values",
            )
            for name in fields["net_criterion_arguments"]:
                check(
                    f"net.criterion_arguments.{name}",
                    _is_argument,
                    "a number, a string, a boolean, null or a tensor "
                    "{'dtype': str, 'shape': [int], 'values': [one number per "
                    "element]}",
                    keep=False,
                )
        else:
            fields["net_criterion_arguments"] = {}
        check("net.predict_nonlinearity", _is_named_nonlinearity, "'auto' or null")
        check("net.batch_size", _is_int(1), "a positive integer")
        binary = fields["net_class"] == NeuralNetBinaryClassifier.__name__
        if version < 2:
            fields["net_threshold"] = None
        elif binary:
            check("net.threshold", _is_finite, "a number, for a binary net")
        else:
            check("net.threshold", lambda value: value is None, "null")
        if fields["net_class"] == NeuralNetRegressor.__name__:
            check(
                "classes", lambda value: value is None, "null for a NeuralNetRegressor"
            )
        elif binary:
            check(
                "classes",
                lambda value: _is_class_list(value) and value == [0, 1],
                "[0, 1] for a NeuralNetBinaryClassifier",
            )
        else:
            check(
                "classes",
                _is_class_list,
                "a non-empty list of distinct integers or of distinct strings",
            )
        check("n_features_in", _is_int(1), "a positive integer")
        if version >= 2:
            n_features = fields["n_features_in"]
            check(
                "input_shape",
                lambda value: value is None or _is_shape(value, n_features),
                f"null or a list of positive integers starting with {n_features} "
                "(n_features_in)",
            )
        else:
            fields["input_shape"] = None
        check("unit_names", _is_str_list, "a list of strings")
        n = len(fields["unit_names"])
        check(
            "gates",
            lambda rows: _is_gate_rows(rows, n),
            f"one row per member (at least 2) of {n} values in [0, 1], one per "
            "unit name",
        )
        return cls(**fields)


def encode_criterion_arguments(arguments: dict) -> dict:
    """The criterion's arguments as the sidecar's ``net.criterion_arguments``.

    Numbers, strings, booleans and ``None`` are written as JSON values; a
    tensor as ``{"dtype": ..., "shape": [...], "values": [...]}``, its elements
    flattened in row-major order (every float16, bfloat16, float32 or float64
    value is written exactly). ``np.float64(0.1)`` is written as ``0.1`` and
    read back as a Python float.

    Parameters
    ----------
    arguments : dict of str to object
        The net's ``criterion__`` arguments, without the prefix.

    Returns
    -------
    encoded : dict of str to object
        JSON values, by argument name.

    Raises
    ------
    ValueError
        If an argument is neither a number, a string, a boolean, ``None`` nor a
        tensor, or is a number or tensor that is not finite, or a tensor of a
        dtype the sidecar cannot hold; the message names it.

    Examples
    --------
    >>> import torch
    >>> from sk_softmerge._sidecar import encode_criterion_arguments
    >>> encode_criterion_arguments(
    ...     {"weight": torch.tensor([1.0, 0.5]), "label_smoothing": 0.1})
    {'weight': {'dtype': 'float32', 'shape': [2], 'values': [1.0, 0.5]},
     'label_smoothing': 0.1}
    >>> encode_criterion_arguments({"weight": [1.0, 0.5]})
    Traceback (most recent call last):
        ...
    ValueError: save_merged stores criterion arguments that are numbers, ...
    criterion__weight is [1.0, 0.5], of type list. ...
    """
    return {name: _encode(name, value) for name, value in arguments.items()}


def decode_criterion_arguments(encoded: dict) -> dict:
    """The criterion's arguments from a checked ``net.criterion_arguments``.

    Parameters
    ----------
    encoded : dict of str to object
        Written by :func:`encode_criterion_arguments` and checked by
        :meth:`Sidecar.read`.

    Returns
    -------
    arguments : dict of str to object
        Tensors (on the CPU) for tensors, the JSON values otherwise.

    Examples
    --------
    >>> import torch
    >>> from sk_softmerge._sidecar import (
    ...     decode_criterion_arguments, encode_criterion_arguments)
    >>> weight = torch.tensor([[1, 2], [3, 4]], dtype=torch.float16)
    >>> decoded = decode_criterion_arguments(encode_criterion_arguments(
    ...     {"weight": weight, "reduction": "sum"}))
    >>> torch.equal(decoded["weight"], weight), decoded["weight"].dtype
    (True, torch.float16)
    >>> decoded["reduction"]
    'sum'
    """
    return {
        name: (
            torch.tensor(value["values"], dtype=_TENSOR_DTYPES[value["dtype"]]).reshape(
                value["shape"]
            )
            if isinstance(value, dict)
            else value
        )
        for name, value in encoded.items()
    }


def _encode(name: str, value):
    where = f"criterion__{name}"
    if value is None or isinstance(value, str | bool):
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, Integral):
        return int(value)
    if isinstance(value, Real):
        if not math.isfinite(value):
            raise ValueError(
                f"save_merged stores finite numbers in JSON; {where} is {value!r}."
            )
        return float(value)
    if isinstance(value, torch.Tensor):
        dtype = str(value.dtype).removeprefix("torch.")
        if dtype not in _TENSOR_DTYPES:
            raise ValueError(
                f"save_merged stores tensor criterion arguments of dtype "
                f"{', '.join(_TENSOR_DTYPES)}; {where} has dtype {dtype}."
            )
        flat = value.detach().cpu().reshape(-1)
        if flat.is_floating_point() and not bool(torch.isfinite(flat).all()):
            raise ValueError(
                f"save_merged stores finite tensors in JSON; {where} holds NaN or "
                "infinite values."
            )
        return {"dtype": dtype, "shape": list(value.shape), "values": flat.tolist()}
    raise ValueError(
        "save_merged stores criterion arguments that are numbers, strings, "
        "booleans, None or tensors, since nothing else can be stored without "
        f"pickle; {where} is {value!r}, of type {type(value).__qualname__}. Pass a "
        "value of one of those types, or save the merge with joblib."
    )


def _argument_names(criterion: str) -> frozenset:
    """Names of the keyword arguments of ``torch.nn.<criterion>``."""
    parameters = inspect.signature(getattr(torch.nn, criterion)).parameters.values()
    return frozenset(
        p.name
        for p in parameters
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    )


def _is_argument(value) -> bool:
    if value is None or isinstance(value, str | bool | int):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    return _is_tensor_argument(value)


def _is_tensor_argument(value) -> bool:
    if not (
        isinstance(value, dict)
        and set(value) == {"dtype", "shape", "values"}
        and _is_name_in(_TENSOR_DTYPES)(value["dtype"])
        and isinstance(value["shape"], list)
        and all(map(_is_int(0), value["shape"]))
        and isinstance(value["values"], list)
        and len(value["values"]) == math.prod(value["shape"])
    ):
        return False
    dtype = _TENSOR_DTYPES[value["dtype"]]
    if dtype is torch.bool:
        return all(type(item) is bool for item in value["values"])
    if dtype.is_floating_point:
        return all(map(_is_finite, value["values"]))
    limits = torch.iinfo(dtype)
    return all(
        type(item) is int and limits.min <= item <= limits.max
        for item in value["values"]
    )


def _is_int(minimum: int):
    # type(), not isinstance(): JSON true and false are bools, which are ints.
    return lambda value: type(value) is int and value >= minimum


def _is_finite(value) -> bool:
    # NaN and infinity, which Python's JSON parser accepts, are refused.
    return type(value) in (int, float) and math.isfinite(value)


def _is_name_in(names):
    # The str test first: a list or an object from the file cannot be hashed.
    return lambda value: isinstance(value, str) and value in names


def _is_sha256(value) -> bool:
    return isinstance(value, str) and re.fullmatch("[0-9a-f]{64}", value) is not None


def _is_str_list(value) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def _is_shape(value, n_features: int) -> bool:
    return (
        isinstance(value, list)
        and len(value) >= 1
        and value[0] == n_features
        and all(map(_is_int(1), value))
    )


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
