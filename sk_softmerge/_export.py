"""Exporting a merged net without pickle: one safetensors file.

Its tensors are the merged net's ``state_dict`` and the criterion's tensor
arguments (prefixed :data:`CRITERION_PREFIX`); everything else is one JSON
document under the header metadata key :data:`METADATA_KEY`, checked on load
against the typed :class:`Metadata` schema. Loading never unpickles, and looks
names from the file up only in fixed allow-lists.
"""

import dataclasses
import hashlib
import importlib.metadata
import inspect
import json
import math
import os
import secrets
import types
import typing
from numbers import Real
from pathlib import Path

import numpy as np
import safetensors
import safetensors.torch
import torch
from sklearn.utils.validation import check_is_fitted
from skorch import NeuralNetBinaryClassifier, NeuralNetClassifier, NeuralNetRegressor

from ._devices import resolve_device
from ._nets import dry_run

FORMAT = "sk_softmerge.merged-net"  # the metadata's "format" field
FORMAT_VERSION = 3  # written by save_merged, and the only one load_merged reads
METADATA_KEY = "sk_softmerge"  # the header metadata's key of the JSON document
CRITERION_PREFIX = ".criterion."
"""Prefix of the criterion's tensor arguments among the file's tensors. No
``state_dict`` name starts with ``.``: torch refuses module, parameter and buffer
names that are empty or hold a ``.``."""

_NET_CLASSES = {
    net.__name__: net
    for net in (NeuralNetClassifier, NeuralNetBinaryClassifier, NeuralNetRegressor)
}
_LOSSES = frozenset(
    name
    for name in torch.nn.modules.loss.__all__
    if isinstance(getattr(torch.nn, name, None), type)
)
_TENSOR_DTYPES = frozenset(  # of the criterion's tensor arguments
    "float16 bfloat16 float32 float64 uint8 int8 int16 int32 int64 bool".split()
)


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    dtype: str  # "float32"
    shape: list[int]


@dataclasses.dataclass(frozen=True)
class NetSpec:
    class_: str  # "class" in the file; a key of _NET_CLASSES
    criterion: str  # a torch.nn loss class name, in _LOSSES
    criterion_arguments: dict[str, int | float | str | bool | None]  # not tensors
    predict_nonlinearity: str | None  # "auto" or None
    batch_size: int
    threshold: float | None  # a NeuralNetBinaryClassifier's; None otherwise


@dataclasses.dataclass(frozen=True)
class Metadata:
    """The checked JSON document of a file, its fields in file order."""

    format: str
    format_version: int
    package_version: str
    data_sha256: str  # of the tensor data: the bytes after the header
    tensors: dict[str, TensorSpec]  # every tensor in the file
    net: NetSpec
    classes: list[int] | list[str] | None  # None for a regressor
    n_features_in: int
    input_shape: list[int] | None  # [n_features_in], or None: not known
    unit_names: list[str]  # empty for a baseline's merge
    gates: list[list[float]]  # one row per member, one gate per unit name, or []

    @classmethod
    def parse(cls, raw, where: str) -> "Metadata":
        """Check the parsed JSON ``raw`` against the field types, then against
        :data:`_VALUE_CHECKS`; raise a ValueError at the first bad field."""
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            found = raw.get("format") if isinstance(raw, dict) else raw
            raise ValueError(
                f"{where} is not an sk_softmerge merged net: expected format "
                f"{FORMAT!r} in its metadata, got {found!r}."
            )
        version = raw.get("format_version")
        if type(version) is not int or version != FORMAT_VERSION:  # JSON true == 1
            raise ValueError(
                f"{where} has format version {version!r}; sk_softmerge "
                f"{_package_version()} reads version {FORMAT_VERSION}. Load it with "
                f"the version that wrote it ({raw.get('package_version')!r})."
            )
        meta = _build(cls, raw, "", where)
        for name, check in _VALUE_CHECKS.items():
            value = raw
            for key in name.split("."):
                value = value[key]
            if (expected := check(value, meta)) is not True:
                raise ValueError(f"{where} has {name}={value!r}; expected {expected}.")
        return meta


def _build(schema, raw: dict, prefix: str, where: str):
    """``raw`` as an instance of the dataclass ``schema``, each field checked
    against its type hint (then nested dataclasses in turn), in one loop."""
    hints, values = typing.get_type_hints(schema), {}
    for field in dataclasses.fields(schema):
        key, hint = field.name.removesuffix("_"), hints[field.name]
        name, item = prefix + key, (typing.get_args(hint) or (None,))[-1]
        if key not in raw:
            raise ValueError(f"{where} has no {name}; expected {_describe(hint)}.")
        value = raw[key]
        if not _matches(value, hint):
            raise ValueError(
                f"{where} has {name}={value!r}; expected {_describe(hint)}."
            )
        if dataclasses.is_dataclass(hint):
            value = _build(hint, value, f"{name}.", where)
        elif dataclasses.is_dataclass(item):
            value = {
                k: _build(item, v, f"{name}.{k}.", where) for k, v in value.items()
            }
        values[field.name] = value
    return schema(**values)


def _matches(value, hint) -> bool:
    """Whether the JSON ``value`` has the type ``hint``. An ``int`` is not a
    ``bool`` (JSON true is a Python int); a ``float`` is a finite int or float
    (Python's JSON parser accepts NaN and infinity)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in args)
    if origin in (list, dict):
        if not isinstance(value, origin):
            return False
        return all(
            _matches(v, args[-1]) for v in (value.values() if origin is dict else value)
        )
    if dataclasses.is_dataclass(hint):
        return isinstance(value, dict)  # its fields are checked by _build
    if hint is float:
        return type(value) in (int, float) and math.isfinite(value)
    return value is None if hint is type(None) else type(value) is hint


def _describe(hint, plural: bool = False) -> str:
    """``hint`` in words: ``list[int] | None`` is "a list of integers or null"."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(arg, plural) for arg in args)
    if origin in (list, dict):
        what = {list: "list", dict: "mapping"}[origin] + "s" * plural
        of = " of strings to " if origin is dict else " of "
        return ("" if plural else "a ") + what + of + _describe(args[-1], True)
    if dataclasses.is_dataclass(hint):
        keys = ", ".join(f.name.removesuffix("_") for f in dataclasses.fields(hint))
        return f"{'objects' if plural else 'an object'} with {keys}"
    names = {int: "integer", float: "finite number", str: "string", bool: "boolean"}
    if hint in names:
        return f"{names[hint]}s" if plural else f"a{'n' * (hint is int)} {names[hint]}"
    return "null"


def _argument_names(criterion: str) -> frozenset:
    """Names of the keyword arguments of ``torch.nn.<criterion>``."""
    parameters = inspect.signature(getattr(torch.nn, criterion)).parameters.values()
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return frozenset(p.name for p in parameters if p.kind in kinds)


def _tensor_arguments(meta: Metadata) -> frozenset:
    """The criterion's arguments that may be tensors of the file."""
    return _argument_names(meta.net.criterion) - set(meta.net.criterion_arguments)


def _binary(meta: Metadata) -> bool:
    return meta.net.class_ == NeuralNetBinaryClassifier.__name__


def _classes_check(v, m: Metadata):
    if m.net.class_ == NeuralNetRegressor.__name__:
        return v is None or "null for a NeuralNetRegressor"
    if _binary(m):
        return v == [0, 1] or "[0, 1] for a NeuralNetBinaryClassifier"
    distinct = bool(v) and len(set(v)) == len(v)
    in_int64 = all(isinstance(c, str) or -(2**63) <= c < 2**63 for c in v)
    return (distinct and in_int64) or (
        "a non-empty list of distinct integers or of distinct strings"
    )


# The checks that types cannot express, run in this order once every field has
# its type: field -> check(value, metadata), True or what was expected.
_VALUE_CHECKS = {
    "net.class": lambda v, m: v in _NET_CLASSES or " or ".join(map(repr, _NET_CLASSES)),
    "net.criterion": lambda v, m: v in _LOSSES or "the class name of a torch.nn loss",
    "net.criterion_arguments": lambda v, m: (
        set(v) <= _argument_names(m.net.criterion)
        or f"a mapping from arguments of torch.nn.{m.net.criterion} "
        f"({', '.join(sorted(_argument_names(m.net.criterion)))}) to numbers, strings, "
        "booleans or null"
    ),
    "tensors": lambda v, m: (
        all(
            k.removeprefix(CRITERION_PREFIX) in _tensor_arguments(m)
            and spec.dtype in _TENSOR_DTYPES
            for k, spec in m.tensors.items()
            if k.startswith(CRITERION_PREFIX)
        )
        or f"the tensors named {CRITERION_PREFIX!r} + an argument of torch.nn."
        f"{m.net.criterion} ({', '.join(sorted(_tensor_arguments(m)))}) of dtype "
        f"{', '.join(sorted(_TENSOR_DTYPES))}"
    ),
    "net.predict_nonlinearity": lambda v, m: v in (None, "auto") or "'auto' or null",
    "net.batch_size": lambda v, m: v >= 1 or "a positive integer",
    "net.threshold": lambda v, m: (
        (v is not None) == _binary(m)
        or ("a number, for a binary net" if _binary(m) else "null")
    ),
    "classes": _classes_check,
    "n_features_in": lambda v, m: v >= 1 or "a positive integer",
    "input_shape": lambda v, m: (
        v is None
        or (v[:1] == [m.n_features_in] and min(v) >= 1)
        or f"null or a list of positive integers starting with {m.n_features_in} "
        "(n_features_in)"
    ),
    "gates": lambda v, m: (
        (v == [] == m.unit_names)  # a baseline's merge
        or (
            (len(v) >= 2 and all(len(row) == len(m.unit_names) for row in v))
            and all(0 <= gate <= 1 for row in v for gate in row)
        )
        or f"one row per member (at least 2) of {len(m.unit_names)} values in "
        "[0, 1], one per unit name (none for a merge without gates)"
    ),
}


def save_merged(estimator, path: str | os.PathLike) -> Path:
    """Write the net of the fitted merge ``estimator`` to ``path``, a
    ``.safetensors`` file, and return its :class:`~pathlib.Path`: the public
    ``SoftMergeClassifier.save_merged`` (documented there) and its regressor's.

    The file holds the merged module's ``state_dict``, the criterion's tensor
    arguments (named ``".criterion." + argument``) and, in the header metadata
    under ``"sk_softmerge"``, the JSON document of :class:`Metadata` fields
    that :func:`load_merged` checks. What the format cannot represent is
    refused (a ValueError naming it) before anything is written; the file is
    written beside ``path``, then moved into place, so a failed save keeps an
    earlier file.
    """
    path = _checked_path(path)
    check_is_fitted(estimator, "merged_net_")
    if getattr(estimator, "_input_keys", None) is not None:
        raise ValueError(
            "save_merged stores merges of members that take one input array; this "
            f"merge was fitted on a dict X (keys {estimator._input_keys}). Use "
            "joblib, or save merged_net_.module_.state_dict() with torch."
        )
    net = estimator.merged_net_
    net_description, tensors = _describe_net(net)
    regressor = isinstance(net, NeuralNetRegressor)
    module = getattr(net.module_, "_orig_mod", net.module_)
    n_features = int(estimator.n_features_in_)
    try:
        dry_run(module, [n_features])
        input_shape = [n_features]
    except Exception:  # any failure: the module takes inputs of another shape
        input_shape = None
    # clone() also unties shared tensors, which safetensors refuses to write. No
    # state_dict name starts with the prefix (see CRITERION_PREFIX).
    for name, tensor in module.state_dict().items():
        tensors[name] = tensor.detach().cpu().contiguous().clone()
    document = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "package_version": _package_version(),
        "data_sha256": _digest(tensors),
        "tensors": _specs(tensors),
        "net": net_description,
        "classes": None if regressor else np.asarray(estimator.classes_).tolist(),
        "n_features_in": n_features,
        "input_shape": input_shape,
        # A baseline's merge has no gates: no unit names, no rows.
        "unit_names": [str(name) for name in getattr(estimator, "unit_names_", [])],
        "gates": np.asarray(getattr(estimator, "gates_", [])).tolist(),
    }
    # What load_merged would refuse is refused here, before anything is written.
    Metadata.parse(document, "save_merged cannot store this merge: it")
    text = json.dumps(document, allow_nan=False)
    data = safetensors.torch.save(tensors, metadata={METADATA_KEY: text})
    if hashlib.sha256(_data(data)).hexdigest() != document["data_sha256"]:
        raise RuntimeError("safetensors laid out the tensor data differently.")
    _write_atomically(path, data)
    return path


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    """The SHA-256 of the tensor data of ``tensors`` saved with any metadata."""
    return hashlib.sha256(_data(safetensors.torch.save(tensors))).hexdigest()


def _data(data: bytes) -> bytes:
    """The bytes of a safetensors file after its header: the tensor data."""
    return data[8 + int.from_bytes(data[:8], "little") :]


def load_merged(
    path: str | os.PathLike,
    module,
    *,
    device: str = "cpu",
    **module_kwargs,
) -> NeuralNetClassifier | NeuralNetBinaryClassifier | NeuralNetRegressor:
    """Rebuild a fitted skorch net from a file written by :func:`save_merged`.

    Everything is checked before a net is built: the file by safetensors, its
    metadata against :class:`Metadata` (format version 3), its tensor data
    against the recorded SHA-256, its tensors against the metadata and the
    ``state_dict`` of ``module(**module_kwargs)``. Last, when ``input_shape`` is
    recorded, the module runs (in eval mode, without gradients) on zeros of shape
    ``(2, n_features_in)``. Nothing is unpickled.

    Parameters
    ----------
    path : str or path-like
        The file, ending in ``.safetensors``.
    module : class or callable
        The merged net's module class (or a function returning a module), not an
        instance: the net's module is ``module(**module_kwargs)``.
    device : str, default="cpu"
        Device of the net: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"``.
    **module_kwargs
        Arguments of ``module``.

    Returns
    -------
    net : NeuralNetClassifier, NeuralNetBinaryClassifier or NeuralNetRegressor
        An initialised net that predicts as the saved merged net.

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    ValueError
        If the file is not a valid sk_softmerge merged net of format version 3,
        or its metadata, tensors or module do not match: found and expected.
    TypeError
        If ``module`` is a module instance.

    See Also
    --------
    SoftMergeClassifier.save_merged : Write the file.

    Examples
    --------
    >>> import json, tempfile
    >>> from pathlib import Path
    >>> import numpy as np, safetensors, torch
    >>> from sklearn.datasets import load_iris
    >>> from skorch import NeuralNetClassifier
    >>> from sk_softmerge import SoftMergeClassifier, load_merged
    >>> X, y = load_iris(return_X_y=True)
    >>> X = ((X - X.mean(0)) / X.std(0)).astype(np.float32)
    >>> members = [NeuralNetClassifier(torch.nn.Linear, module__in_features=4,
    ...     module__out_features=3, criterion=torch.nn.CrossEntropyLoss,
    ...     max_epochs=5, lr=0.1, verbose=0).fit(X, y) for _ in range(2)]
    >>> merge = SoftMergeClassifier(members, max_epochs=2, random_state=0).fit(X, y)
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     path = merge.save_merged(Path(folder) / "merged.safetensors")
    ...     with safetensors.safe_open(path, "pt") as file:
    ...         meta = json.loads(file.metadata()["sk_softmerge"])
    ...     net = load_merged(path, torch.nn.Linear, in_features=4, out_features=3)
    >>> meta["format_version"], meta["classes"], meta["tensors"]["weight"]
    (3, [0, 1, 2], {'dtype': 'float32', 'shape': [3, 4]})
    >>> np.array_equal(net.predict_proba(X), merge.predict_proba(X))
    True
    """
    path = _checked_path(path)
    if isinstance(module, torch.nn.Module):
        raise TypeError(
            "module must be the module class (or a function building the module), "
            f"not an instance: got a {type(module).__name__} instance, and loading "
            "would overwrite its weights."
        )
    resolved_device = resolve_device(device)
    meta, tensors = _read(path)
    loss, arguments = _criterion(meta, tensors, path)
    params = {f"module__{key}": value for key, value in module_kwargs.items()}
    params |= {f"criterion__{key}": value for key, value in arguments.items()}
    if meta.net.class_ == NeuralNetClassifier.__name__:
        params["classes"] = meta.classes
    if meta.net.threshold is not None:
        params["threshold"] = meta.net.threshold
    net = _NET_CLASSES[meta.net.class_](
        module,
        criterion=loss,
        predict_nonlinearity=meta.net.predict_nonlinearity,
        batch_size=meta.net.batch_size,
        device=str(resolved_device),
        train_split=None,
        verbose=0,
        **params,
    )
    with torch.random.fork_rng(devices=[]):
        net.initialize()
    name = getattr(module, "__qualname__", type(module).__name__)
    where = f"The module built by {name}(...)"
    _check_same(_specs(tensors), _specs(net.module_.state_dict()), where, "the module")
    net.module_.load_state_dict(tensors)
    try:
        if meta.input_shape is not None:
            dry_run(net.module_, meta.input_shape)
    except Exception as exc:  # any failure: the module takes other inputs
        raise ValueError(
            f"{where} does not take the inputs that the merge was fitted on: the file "
            f"{str(path)!r} records n_features_in={meta.n_features_in}, and a batch "
            f"of zeros of shape {(2, *meta.input_shape)} failed: {exc}"
        ) from exc
    return net


def _criterion(meta: Metadata, tensors: dict, path: Path) -> tuple[type, dict]:
    """The loss class and all its arguments; the criterion's tensors are
    popped from ``tensors``. Raise if they do not build the loss."""
    arguments = {
        name.removeprefix(CRITERION_PREFIX): tensors.pop(name)
        for name in list(tensors)
        if name.startswith(CRITERION_PREFIX)
    }
    values, loss = meta.net.criterion_arguments, getattr(torch.nn, meta.net.criterion)
    try:
        loss(**values, **arguments)
    except (TypeError, ValueError, RuntimeError, KeyError) as exc:
        raise ValueError(
            f"The file {str(path)!r} has net.criterion_arguments={values!r} and "
            f"tensors {sorted(arguments)}, which do not build a torch.nn."
            f"{loss.__name__}: {exc}"
        ) from exc
    return loss, values | arguments


def _checked_path(path) -> Path:
    if Path(path).suffix != ".safetensors":
        raise ValueError(f"path must name a '.safetensors' file; got {str(path)!r}.")
    return Path(path)


def _read(path: Path) -> tuple[Metadata, dict[str, torch.Tensor]]:
    """The checked metadata and tensors of the file at ``path``."""
    where = f"The file {str(path)!r}"
    if not path.is_file():
        raise FileNotFoundError(f"{where} does not exist.")
    data = path.read_bytes()  # read once: the bytes checked are the bytes parsed
    try:
        tensors = safetensors.torch.load(data)
    except (safetensors.SafetensorError, ValueError, TypeError) as exc:
        raise ValueError(f"{where} is not a valid safetensors file: {exc}.") from exc
    # Valid, so the header is a JSON object, its metadata strings by string.
    header = json.loads(data[8 : len(data) - len(_data(data))])
    metadata = header.get("__metadata__", {})
    if METADATA_KEY not in metadata:
        raise ValueError(
            f"{where} is not an sk_softmerge merged net: its safetensors metadata "
            f"has no {METADATA_KEY!r} entry, only {sorted(metadata)}."
        )
    try:
        raw = json.loads(metadata[METADATA_KEY])
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where} has metadata that is not JSON: {exc}.") from exc
    meta = Metadata.parse(raw, where)
    digest = hashlib.sha256(_data(data)).hexdigest()
    if digest != meta.data_sha256:
        raise ValueError(
            f"{where} has tensor data of SHA-256 {digest}, but its metadata records "
            f"{meta.data_sha256}: the file was modified after saving."
        )
    specs = {name: dataclasses.asdict(spec) for name, spec in meta.tensors.items()}
    _check_same(_specs(tensors), specs, f"The metadata of {where[4:]}", "the metadata")
    return meta, tensors


def _describe_net(net) -> tuple[dict, dict[str, torch.Tensor]]:
    """The metadata's ``net`` field, and the criterion's tensor arguments by
    their names in the file."""
    if type(net) not in _NET_CLASSES.values():
        raise ValueError(
            f"save_merged writes skorch {', '.join(_NET_CLASSES)} nets; the "
            f"merged net is a {type(net).__module__}.{type(net).__qualname__}."
        )
    criterion = getattr(net.criterion_, "_orig_mod", net.criterion_)
    name = type(criterion).__name__
    if name not in _LOSSES or type(criterion) is not getattr(torch.nn, name, None):
        raise ValueError(
            "save_merged writes nets whose criterion is a torch.nn loss; the merged "
            f"net's criterion is {type(criterion).__module__}.{name}."
        )
    values, tensors = {}, {}
    for key, value in net.get_params_for("criterion").items():
        if isinstance(value, torch.Tensor):
            tensors[key] = _checked_tensor(key, value)
        else:
            values[key] = _json_argument(key, value)
    _check_rebuilds(criterion, {**values, **tensors})
    threshold = getattr(net, "threshold", None)
    if isinstance(threshold, Real) and not isinstance(threshold, bool):
        threshold = float(threshold)  # a NaN is refused with the metadata
    description = {
        "class": type(net).__name__,
        "criterion": name,
        "criterion_arguments": values,
        "predict_nonlinearity": net.predict_nonlinearity,
        "batch_size": int(net.batch_size),
        "threshold": threshold if isinstance(net, NeuralNetBinaryClassifier) else None,
    }
    return description, {CRITERION_PREFIX + k: v for k, v in tensors.items()}


def _json_argument(name: str, value):
    """A criterion argument that is not a tensor, as a JSON value."""
    value = value.item() if isinstance(value, np.generic) else value
    if value is None or isinstance(value, str | int) or _matches(value, float):
        return value
    raise ValueError(
        "save_merged stores criterion arguments that are finite numbers, strings, "
        "booleans, None or tensors, since nothing else can be stored without "
        f"pickle; criterion__{name} is {value!r}, of type {type(value).__qualname__}"
        ". Pass a value of one of those types, or save the merge with joblib."
    )


def _checked_tensor(name: str, value: torch.Tensor) -> torch.Tensor:
    """A criterion's tensor argument, on the CPU; raise if the format refuses it."""
    dtype = str(value.dtype).removeprefix("torch.")
    if dtype not in _TENSOR_DTYPES:
        raise ValueError(
            f"save_merged stores tensor criterion arguments of dtype "
            f"{', '.join(sorted(_TENSOR_DTYPES))}; criterion__{name} has dtype {dtype}."
        )
    value = value.detach().cpu().contiguous().clone()
    if value.is_floating_point() and not bool(torch.isfinite(value).all()):
        raise ValueError(f"save_merged stores finite tensors; criterion__{name} isn't.")
    return value


def _check_rebuilds(criterion: torch.nn.Module, arguments: dict) -> None:
    """Raise if ``type(criterion)(**arguments)`` differs from ``criterion`` in a
    buffer or a public attribute (a criterion passed as an instance, or changed
    after it was built): the file stores the criterion as its class and arguments."""
    loss, call = type(criterion).__name__, ", ".join(f"{k}=..." for k in arguments)
    found, rebuilt = (
        {k: v for k, v in vars(c).items() if not k.startswith("_") and k != "training"}
        | dict(c.named_buffers())
        for c in (criterion, type(criterion)(**arguments))
    )
    for key in sorted(found.keys() | rebuilt.keys()):
        if not _same(found.get(key), rebuilt.get(key)):
            raise ValueError(
                "save_merged stores the criterion as its class and its criterion__ "
                f"arguments, but the merged net's criterion is not torch.nn.{loss}"
                f"({call}): its {key} is {found.get(key)!r}, not "
                f"{rebuilt.get(key)!r}. Pass the criterion as a class with criterion__ "
                f"arguments (criterion=torch.nn.{loss}, criterion__weight=...), not as "
                "an instance or changed after fit."
            )


def _same(value, other) -> bool:
    if isinstance(value, torch.Tensor) and isinstance(other, torch.Tensor):
        same_kind = value.dtype == other.dtype and value.shape == other.shape
        return same_kind and torch.equal(value.detach().cpu(), other.detach().cpu())
    try:
        return bool(value == other)
    except (TypeError, ValueError, RuntimeError):  # an array, say
        return value is other


def _specs(tensors: dict[str, torch.Tensor]) -> dict[str, dict]:
    """The dtype and shape of each tensor, as the metadata records them."""
    return {
        name: {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
        for name, t in tensors.items()
    }


def _check_same(found: dict, expected: dict, subject: str, holder: str) -> None:
    """Raise if the tensors ``found`` in the file differ from those ``expected``
    by ``holder`` (the metadata or the module), both as :func:`_specs` gives."""
    # Sorted: safetensors does not keep the order in which tensors were saved.
    missing, extra = sorted(expected.keys() - found), sorted(found.keys() - expected)
    differences = [f"the file is missing tensors {missing} that {holder} has"] * bool(
        missing
    ) + [f"the file has extra tensors {extra} that {holder} lacks"] * bool(extra)
    differences += [
        f"{name!r} has {key} {show(found[name][key])} in the file, but "
        f"{show(expected[name][key])} in {holder}"
        for name in sorted(expected.keys() & found.keys())
        for key, show in (("shape", tuple), ("dtype", str))  # a shape as (16, 64)
        if found[name][key] != expected[name][key]
    ]
    if differences:
        raise ValueError(
            f"{subject} does not match the file: " + "; ".join(differences) + "."
        )


def _write_atomically(target: Path, data: bytes) -> None:
    name = target.with_name(f".{target.name}.{secrets.token_hex(8)}.tmp")
    try:
        # os.open applies the umask, so the final file gets the usual mode.
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(name, target)
    finally:
        name.unlink(missing_ok=True)


def _package_version() -> str:
    # Not ``from . import __version__``: the package root imports this module.
    try:
        return importlib.metadata.version("sk_softmerge")
    except importlib.metadata.PackageNotFoundError:  # a source tree, not installed
        return "unknown"
