"""Exporting a merged net without pickle: safetensors weights and a JSON sidecar.

A merge is written as two files side by side: ``name.safetensors`` holds the
merged net's ``state_dict`` (tensors only, in the safetensors format, which
cannot hold code), and ``name.json`` holds everything else that is needed to
rebuild and check it. The sidecar is a separate file, not the safetensors
header's metadata, because it records the SHA-256 and the size of the weights
file, which a file cannot hold about itself; and a plain JSON file can be read
and reviewed without any library.

Loading never calls pickle (no ``torch.load``, no ``joblib.load``): the sidecar
is parsed as JSON, the weights file is read once, checked against the sidecar's
size and hash, and those same bytes are parsed by safetensors. Everything is
checked before the net is built, and the net is returned only once its module
holds the weights, so a bad file raises and leaves nothing half-built.
"""

import hashlib
import json
import os
import secrets
from pathlib import Path

import numpy as np
import safetensors
import safetensors.torch
import torch
from sklearn.utils.validation import check_is_fitted
from skorch import NeuralNetClassifier, NeuralNetRegressor

from ._devices import resolve_device

FORMAT = "sk_softmerge.merged-net"
"""Value of the sidecar's ``format`` field."""

FORMAT_VERSION = 1
"""Version of the file layout that this module writes and reads."""

WEIGHTS_SUFFIX = ".safetensors"
SIDECAR_SUFFIX = ".json"

_LOSSES = frozenset(
    name
    for name in torch.nn.modules.loss.__all__
    if isinstance(getattr(torch.nn, name, None), type)
)
_NONLINEARITIES = ("auto", None)
_NET_CLASSES = {net.__name__: net for net in (NeuralNetClassifier, NeuralNetRegressor)}
"""The skorch classes the format can rebuild, by name."""


def save_merged(estimator, path: str | os.PathLike) -> tuple[Path, Path]:
    """Write a fitted merge's net to ``path`` without pickle.

    Two files are written: the merged weights at ``path`` (which must end in
    ``.safetensors``) and a JSON sidecar next to it, with the same stem and the
    suffix ``.json``. The sidecar records the format version, the package
    version, the classes (``null`` for a regressor), the number of features,
    the unit names and gates, the name, shape and dtype of every tensor, the
    size and SHA-256 of the weights file, and the skorch class, criterion and
    predict nonlinearity that :func:`load_merged` needs to predict exactly as
    ``estimator`` does.

    Both files are first written to temporary files in the same directory and
    then moved into place, so a failed save leaves earlier files intact.

    Parameters
    ----------
    estimator : SoftMergeClassifier or SoftMergeRegressor
        A fitted merge whose ``merged_net_`` is a skorch ``NeuralNetClassifier``
        (with classes that are integers or strings) or ``NeuralNetRegressor``,
        with a ``torch.nn`` criterion and ``predict_nonlinearity`` ``"auto"`` or
        ``None``.
    path : str or path-like
        Where to write the weights; must end in ``.safetensors``. Existing files
        are replaced.

    Returns
    -------
    weights_path, sidecar_path : pathlib.Path
        The two files written.

    Raises
    ------
    ValueError
        If the path does not end in ``.safetensors``, or the merge holds
        something that the format cannot represent (classes that are neither
        integers nor strings, a custom criterion or predict nonlinearity).

    See Also
    --------
    load_merged : Rebuild the fitted skorch net from the two files.

    Notes
    -----
    The hash detects a weights file that was truncated, corrupted or replaced
    after saving. It is not a signature: whoever can rewrite both files can
    make them say anything, though never make loading run code. If a save is
    interrupted between moving the two files into place, the new weights sit
    next to the old sidecar, and :func:`load_merged` refuses the pair.

    Examples
    --------
    >>> import json, tempfile
    >>> from pathlib import Path
    >>> import numpy as np, torch
    >>> from sklearn.datasets import load_iris
    >>> from skorch import NeuralNetClassifier
    >>> from sk_softmerge import SoftMergeClassifier
    >>> from sk_softmerge._export import save_merged
    >>> X, y = load_iris(return_X_y=True)
    >>> X = ((X - X.mean(0)) / X.std(0)).astype(np.float32)
    >>> def mlp(n_hidden=8):
    ...     return torch.nn.Sequential(torch.nn.Linear(4, n_hidden), torch.nn.ReLU(),
    ...                                torch.nn.Linear(n_hidden, 3))
    >>> members = [NeuralNetClassifier(mlp, criterion=torch.nn.CrossEntropyLoss,
    ...                                max_epochs=5, lr=0.1, verbose=0).fit(X, y)
    ...            for _ in range(2)]
    >>> merge = SoftMergeClassifier(members, max_epochs=2, random_state=0).fit(X, y)
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     weights, sidecar = save_merged(merge, Path(folder) / "merged.safetensors")
    ...     meta = json.loads(sidecar.read_text())
    >>> weights.name, sidecar.name
    ('merged.safetensors', 'merged.json')
    >>> meta["classes"], meta["unit_names"], meta["net"]["criterion"]
    ([0, 1, 2], ['0', '2'], 'CrossEntropyLoss')
    >>> meta["tensors"]["0.weight"]
    {'dtype': 'float32', 'shape': [8, 4]}
    """
    weights_path, sidecar_path = _paths(path)
    check_is_fitted(estimator, "merged_net_")
    net = estimator.merged_net_
    net_description = _describe_net(net)
    classes = (
        None
        if isinstance(net, NeuralNetRegressor)
        else _json_classes(estimator.classes_)
    )
    module = getattr(net.module_, "_orig_mod", net.module_)
    # clone() also unties shared tensors, which safetensors refuses to write.
    state = {
        name: tensor.detach().cpu().contiguous().clone()
        for name, tensor in module.state_dict().items()
    }
    weights = safetensors.torch.save(
        state, metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)}
    )
    sidecar = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "package_version": _package_version(),
        "weights": {
            "size": len(weights),
            "sha256": hashlib.sha256(weights).hexdigest(),
        },
        "tensors": {
            name: {"dtype": _dtype_name(tensor.dtype), "shape": list(tensor.shape)}
            for name, tensor in state.items()
        },
        "net": net_description,
        "classes": classes,
        "n_features_in": int(estimator.n_features_in_),
        "unit_names": [str(name) for name in estimator.unit_names_],
        "gates": np.asarray(estimator.gates_).tolist(),
    }
    text = json.dumps(sidecar, indent=2, allow_nan=False) + "\n"
    _write_atomically({weights_path: weights, sidecar_path: text.encode("utf-8")})
    return weights_path, sidecar_path


def load_merged(
    path: str | os.PathLike,
    module,
    *,
    device: str = "cpu",
    **module_kwargs,
) -> NeuralNetClassifier | NeuralNetRegressor:
    """Rebuild a fitted skorch net from files written by ``save_merged``.

    The sidecar and the weights file are checked in full before anything is
    built: format and version, the weights file's size and SHA-256, the
    sidecar's description of every tensor against the tensors themselves.
    Then the net is built from ``module(**module_kwargs)``, its ``state_dict``
    is checked to have exactly the file's tensor names, shapes and dtypes, and
    the weights are loaded. Nothing is unpickled.

    Parameters
    ----------
    path : str or path-like
        The weights file, ending in ``.safetensors``; its sidecar is the file
        of the same stem with the suffix ``.json``.
    module : class or callable
        The module class of the merged net (or a function returning a module):
        the net's module is ``module(**module_kwargs)``. Not an instance, whose
        weights would be overwritten.
    device : str, default="cpu"
        Device of the returned net: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or
        ``"auto"``. A module argument named ``device`` can be passed through
        :func:`functools.partial`.
    **module_kwargs
        Arguments of ``module``.

    Returns
    -------
    net : skorch.NeuralNetClassifier or skorch.NeuralNetRegressor
        An initialised net of the saved class, with the merged weights, the
        saved classes (for a classifier), criterion class, predict
        nonlinearity and batch size; its ``predict_proba`` equals the saved
        merged net's.

    Raises
    ------
    FileNotFoundError
        If the weights file or its sidecar does not exist.
    ValueError
        If either file is malformed, truncated or modified, they do not match
        each other, or the module's ``state_dict`` does not match the weights.
    TypeError
        If ``module`` is a module instance.

    See Also
    --------
    save_merged : Write the two files.
    SoftMergeClassifier.save_merged : The same, as a method of the estimator.
    SoftMergeRegressor.save_merged : The same, for a regressor.

    Examples
    --------
    >>> import tempfile
    >>> from pathlib import Path
    >>> import numpy as np, torch
    >>> from sklearn.datasets import load_iris
    >>> from skorch import NeuralNetClassifier
    >>> from sk_softmerge import SoftMergeClassifier, load_merged
    >>> X, y = load_iris(return_X_y=True)
    >>> X = ((X - X.mean(0)) / X.std(0)).astype(np.float32)
    >>> def mlp(n_hidden=8):
    ...     return torch.nn.Sequential(torch.nn.Linear(4, n_hidden), torch.nn.ReLU(),
    ...                                torch.nn.Linear(n_hidden, 3))
    >>> members = [NeuralNetClassifier(mlp, criterion=torch.nn.CrossEntropyLoss,
    ...                                max_epochs=5, lr=0.1, verbose=0).fit(X, y)
    ...            for _ in range(2)]
    >>> merge = SoftMergeClassifier(members, max_epochs=2, validation_fraction=0,
    ...                             random_state=0).fit(X, y)
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     path = Path(folder) / "merged.safetensors"
    ...     _ = merge.save_merged(path)
    ...     net = load_merged(path, mlp, n_hidden=8)
    >>> type(net).__name__, net.classes_
    ('NeuralNetClassifier', array([0, 1, 2]))
    >>> np.array_equal(net.predict_proba(X), merge.predict_proba(X))
    True
    """
    weights_path, sidecar_path = _paths(path)
    if isinstance(module, torch.nn.Module):
        raise TypeError(
            "module must be the module class (or a function building the module), "
            f"not an instance: got a {type(module).__name__} instance, and loading "
            "would overwrite its weights."
        )
    resolved_device = resolve_device(device)
    sidecar = _read_sidecar(sidecar_path)
    data = _read_weights(weights_path, sidecar["weights"])
    tensors = _parse_weights(data, weights_path)
    _check_tensors(tensors, sidecar["tensors"], weights_path, sidecar_path)

    description = sidecar["net"]
    params = {f"module__{key}": value for key, value in module_kwargs.items()}
    if sidecar["classes"] is not None:
        params["classes"] = sidecar["classes"]
    net = _NET_CLASSES[description["class"]](
        module,
        criterion=getattr(torch.nn, description["criterion"]),
        predict_nonlinearity=description["predict_nonlinearity"],
        batch_size=description["batch_size"],
        device=str(resolved_device),
        train_split=None,
        verbose=0,
        **params,
    )
    with torch.random.fork_rng(devices=[]):
        net.initialize()
    _check_module(net.module_, tensors, module, weights_path)
    net.module_.load_state_dict(tensors)
    return net


def _package_version() -> str:
    # Imported late: the package's __init__ imports this module first.
    from . import __version__

    return __version__


def _paths(path) -> tuple[Path, Path]:
    weights_path = Path(path)
    if weights_path.suffix != WEIGHTS_SUFFIX:
        raise ValueError(
            f"path must name a {WEIGHTS_SUFFIX!r} file (its sidecar is the "
            f"{SIDECAR_SUFFIX!r} file of the same stem); got {str(path)!r}."
        )
    return weights_path, weights_path.with_suffix(SIDECAR_SUFFIX)


def _describe_net(net) -> dict:
    if type(net) not in _NET_CLASSES.values():
        raise ValueError(
            "save_merged writes skorch NeuralNetClassifier and NeuralNetRegressor "
            f"nets; the merged net is a {type(net).__module__}."
            f"{type(net).__qualname__}."
        )
    criterion = getattr(net.criterion_, "_orig_mod", net.criterion_)
    name = type(criterion).__name__
    if name not in _LOSSES or type(criterion) is not getattr(torch.nn, name, None):
        raise ValueError(
            "save_merged writes nets whose criterion is a torch.nn loss; the merged "
            f"net's criterion is {type(criterion).__module__}.{name}."
        )
    if not _is_named_nonlinearity(net.predict_nonlinearity):
        raise ValueError(
            "save_merged writes nets whose predict_nonlinearity is 'auto' or None, "
            "since a function cannot be stored without pickle; got "
            f"{net.predict_nonlinearity!r}."
        )
    return {
        "class": type(net).__name__,
        "criterion": name,
        "predict_nonlinearity": net.predict_nonlinearity,
        "batch_size": int(net.batch_size),
    }


def _is_named_nonlinearity(value) -> bool:
    return any(
        value is choice or (isinstance(value, str) and value == choice)
        for choice in _NONLINEARITIES
    )


def _json_classes(classes) -> list:
    classes = np.asarray(classes)
    if classes.dtype.kind in "iu":
        return [int(label) for label in classes]
    if classes.dtype.kind == "U" or (
        classes.dtype.kind == "O" and all(isinstance(c, str) for c in classes)
    ):
        return [str(label) for label in classes]
    raise ValueError(
        "save_merged stores classes as JSON integers or strings; got classes "
        f"{classes.tolist()!r} of dtype {classes.dtype}. Fit the members on integer "
        "or string labels to export the merge."
    )


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _write_atomically(contents: dict[Path, bytes]) -> None:
    temporary = {}
    try:
        for target, data in contents.items():
            name = target.with_name(f".{target.name}.{secrets.token_hex(8)}.tmp")
            # os.open applies the umask, so the final files get the usual mode.
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            temporary[target] = name
            with os.fdopen(fd, "wb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
        for target, name in temporary.items():
            os.replace(name, target)
    finally:
        for name in temporary.values():
            name.unlink(missing_ok=True)


def _read_sidecar(sidecar_path: Path) -> dict:
    if not sidecar_path.is_file():
        raise FileNotFoundError(
            f"The sidecar {str(sidecar_path)!r} of the weights file does not exist: "
            "save_merged writes both files, and load_merged needs both."
        )
    try:
        sidecar = json.loads(sidecar_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(
            f"The sidecar {str(sidecar_path)!r} is not valid JSON: {exc}."
        ) from exc
    where = f"The sidecar {str(sidecar_path)!r}"
    if not isinstance(sidecar, dict) or sidecar.get("format") != FORMAT:
        found = sidecar.get("format") if isinstance(sidecar, dict) else sidecar
        raise ValueError(
            f"{where} is not an sk_softmerge merged-net sidecar: expected format "
            f"{FORMAT!r}, got {found!r}."
        )
    version = sidecar.get("format_version")
    if version != FORMAT_VERSION or isinstance(version, bool):
        raise ValueError(
            f"{where} has format version {version!r}; sk_softmerge "
            f"{_package_version()} "
            f"reads version {FORMAT_VERSION}. Load it with the sk_softmerge "
            f"version that wrote it ({sidecar.get('package_version')!r})."
        )
    _check_sidecar_fields(sidecar, where)
    return sidecar


def _check_sidecar_fields(sidecar: dict, where: str) -> None:
    def fail(field, expected):
        value = sidecar
        for key in field.split("."):
            value = value.get(key) if isinstance(value, dict) else None
        raise ValueError(f"{where} has {field}={value!r}; expected {expected}.")

    def is_int(value, minimum=0):
        return (
            isinstance(value, int) and not isinstance(value, bool) and value >= minimum
        )

    weights = sidecar.get("weights")
    if not isinstance(weights, dict) or not is_int(weights.get("size")):
        fail("weights.size", "a number of bytes")
    sha = weights.get("sha256")
    if not (
        isinstance(sha, str) and len(sha) == 64 and set(sha) <= set("0123456789abcdef")
    ):
        fail("weights.sha256", "64 lowercase hexadecimal digits")

    tensors = sidecar.get("tensors")
    if not isinstance(tensors, dict) or not all(
        isinstance(spec, dict)
        and isinstance(spec.get("dtype"), str)
        and isinstance(spec.get("shape"), list)
        and all(is_int(n) for n in spec["shape"])
        for spec in tensors.values()
    ):
        fail("tensors", "a mapping of tensor names to {'dtype': str, 'shape': [int]}")

    net = sidecar.get("net")
    if not isinstance(net, dict) or net.get("class") not in _NET_CLASSES:
        fail("net.class", " or ".join(map(repr, _NET_CLASSES)))
    if net.get("criterion") not in _LOSSES:
        fail("net.criterion", "the class name of a torch.nn loss")
    if not _is_named_nonlinearity(net.get("predict_nonlinearity", "missing")):
        fail("net.predict_nonlinearity", "'auto' or null")
    if not is_int(net.get("batch_size"), minimum=1):
        fail("net.batch_size", "a positive integer")

    classes = sidecar.get("classes", "missing")
    if net["class"] == NeuralNetRegressor.__name__:
        if classes is not None:
            fail("classes", "null for a NeuralNetRegressor")
    elif not (
        isinstance(classes, list)
        and classes
        and (
            all(is_int(c, minimum=-(2**63)) for c in classes)
            or all(isinstance(c, str) for c in classes)
        )
        and len(set(classes)) == len(classes)
    ):
        fail("classes", "a non-empty list of distinct integers or of distinct strings")
    if not is_int(sidecar.get("n_features_in"), minimum=1):
        fail("n_features_in", "a positive integer")

    units = sidecar.get("unit_names")
    if not isinstance(units, list) or not all(isinstance(u, str) for u in units):
        fail("unit_names", "a list of strings")
    gates = sidecar.get("gates")
    if not (
        isinstance(gates, list)
        and len(gates) >= 2
        and all(
            isinstance(row, list)
            and len(row) == len(units)
            and all(
                isinstance(g, int | float) and not isinstance(g, bool) and 0 <= g <= 1
                for g in row
            )
            for row in gates
        )
    ):
        fail(
            "gates",
            f"one row per member (at least 2) of {len(units)} values in [0, 1], "
            "one per unit name",
        )


def _read_weights(weights_path: Path, recorded: dict) -> bytes:
    if not weights_path.is_file():
        raise FileNotFoundError(
            f"The weights file {str(weights_path)!r} does not exist."
        )
    data = weights_path.read_bytes()
    if len(data) != recorded["size"]:
        raise ValueError(
            f"The weights file {str(weights_path)!r} has {len(data)} bytes, but its "
            f"sidecar records {recorded['size']}: the file is truncated or was "
            "replaced after saving."
        )
    digest = hashlib.sha256(data).hexdigest()
    if digest != recorded["sha256"]:
        raise ValueError(
            f"The SHA-256 of the weights file {str(weights_path)!r} is {digest}, but "
            f"its sidecar records {recorded['sha256']}: the file was modified after "
            "saving, or the sidecar belongs to another file."
        )
    return data


def _parse_weights(data: bytes, weights_path: Path) -> dict[str, torch.Tensor]:
    try:
        return safetensors.torch.load(data)
    except (safetensors.SafetensorError, ValueError, TypeError) as exc:
        raise ValueError(
            f"The weights file {str(weights_path)!r} is not a valid safetensors "
            f"file: {exc}."
        ) from exc


def _check_tensors(
    tensors: dict, recorded: dict, weights_path: Path, sidecar_path: Path
) -> None:
    mismatches = _differences(
        {name: (_dtype_name(t.dtype), list(t.shape)) for name, t in tensors.items()},
        {name: (spec["dtype"], spec["shape"]) for name, spec in recorded.items()},
        found_in="the weights file",
        expected_by="the sidecar",
    )
    if mismatches:
        raise ValueError(
            f"The sidecar {str(sidecar_path)!r} does not match the weights file "
            f"{str(weights_path)!r}: " + "; ".join(mismatches) + "."
        )


def _check_module(
    module: torch.nn.Module, tensors: dict, factory, weights_path: Path
) -> None:
    mismatches = _differences(
        {name: (_dtype_name(t.dtype), list(t.shape)) for name, t in tensors.items()},
        {
            name: (_dtype_name(t.dtype), list(t.shape))
            for name, t in module.state_dict().items()
        },
        found_in="the weights file",
        expected_by="the module",
    )
    if mismatches:
        name = getattr(factory, "__qualname__", type(factory).__name__)
        raise ValueError(
            f"The module built by {name}(...) does not match the weights file "
            f"{str(weights_path)!r}: " + "; ".join(mismatches) + "."
        )


def _differences(
    found: dict, expected: dict, *, found_in: str, expected_by: str
) -> list[str]:
    # Sorted: safetensors does not keep the order in which tensors were saved.
    missing = sorted(expected.keys() - found.keys())
    extra = sorted(found.keys() - expected.keys())
    differences = []
    if missing:
        differences.append(
            f"{found_in} is missing tensors {missing} that {expected_by} has"
        )
    if extra:
        differences.append(
            f"{found_in} has extra tensors {extra} that {expected_by} lacks"
        )
    for name, (dtype, shape) in expected.items():
        if name not in found:
            continue
        found_dtype, found_shape = found[name]
        if found_shape != shape:
            differences.append(
                f"{name!r} has shape {tuple(found_shape)} in {found_in}, but "
                f"{tuple(shape)} in {expected_by}"
            )
        if found_dtype != dtype:
            differences.append(
                f"{name!r} has dtype {found_dtype} in {found_in}, but {dtype} in "
                f"{expected_by}"
            )
    return differences
