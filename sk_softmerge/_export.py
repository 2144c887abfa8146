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
holds the weights and has run on a batch of the recorded input shape, so a bad
file raises and leaves nothing half-built.
"""

import hashlib
import itertools
import json
import math
import os
import secrets
from numbers import Real
from pathlib import Path

import numpy as np
import safetensors
import safetensors.torch
import torch
from sklearn.utils.validation import check_is_fitted
from skorch import NeuralNetBinaryClassifier, NeuralNetClassifier, NeuralNetRegressor

from ._devices import resolve_device
from ._inputs import takes_integers
from ._nets import module_dtype
from ._sidecar import (
    _LOSSES,
    _NET_CLASSES,
    FORMAT,
    FORMAT_VERSION,
    Sidecar,
    _is_named_nonlinearity,
    _package_version,
    decode_criterion_arguments,
    encode_criterion_arguments,
)

WEIGHTS_SUFFIX = ".safetensors"
SIDECAR_SUFFIX = ".json"


def save_merged(estimator, path: str | os.PathLike) -> tuple[Path, Path]:
    """Write a fitted merge's net to ``path`` without pickle.

    Two files are written: the merged weights at ``path`` (which must end in
    ``.safetensors``) and a JSON sidecar next to it, with the same stem and the
    suffix ``.json``. The sidecar records the format version, the package
    version, the classes (``null`` for a regressor), the number of features
    and the input shape, the unit names and gates, the name, shape and dtype
    of every tensor, the size and SHA-256 of the weights file, and the skorch
    class, criterion and its arguments, predict nonlinearity, batch size and
    (for a ``NeuralNetBinaryClassifier``) threshold that :func:`load_merged`
    needs to predict exactly as ``estimator`` does.

    The criterion's arguments (the net's ``criterion__`` parameters) are
    stored in the sidecar as JSON: numbers, strings, booleans and ``None`` as
    they are, a tensor (``criterion__weight``, ``criterion__pos_weight``) as
    ``{"dtype": ..., "shape": [...], "values": [...]}``, its elements in
    row-major order, written exactly. The input shape is ``[n_features_in]``
    when the merged module runs on a batch of zeros of shape
    ``(2, n_features_in)``, which :func:`load_merged` then checks the module
    it builds against; it is ``null`` otherwise, as for images of shape
    ``(1, 28, 28)``, whose ``n_features_in_`` is their first dimension (1, as
    :func:`sklearn.utils.validation.validate_data` counts features of
    multi-dimensional inputs) and does not tell the input shape.

    Both files are first written to temporary files in the same directory and
    then moved into place, so a failed save leaves earlier files intact.

    Parameters
    ----------
    estimator : SoftMergeClassifier or SoftMergeRegressor
        A fitted merge whose ``merged_net_`` is a skorch ``NeuralNetClassifier``
        (with classes that are integers or strings), ``NeuralNetBinaryClassifier``
        or ``NeuralNetRegressor``, with a ``torch.nn`` criterion whose
        ``criterion__`` arguments are numbers, strings, booleans, ``None`` or
        tensors, and ``predict_nonlinearity`` ``"auto"`` or ``None``.
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
        integers nor strings, a custom criterion or predict nonlinearity, a
        criterion argument that is a function or another object, named in the
        message, or a criterion instance that its class and ``criterion__``
        arguments do not rebuild).

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
    >>> meta["classes"], meta["net"]["criterion"], meta["net"]["criterion_arguments"]
    ([0, 1, 2], 'CrossEntropyLoss', {})
    >>> meta["n_features_in"], meta["input_shape"]
    (4, [4])
    >>> meta["unit_names"][:3], len(meta["gates"]), len(meta["gates"][0])
    (['0[0]', '0[1]', '0[2]'], 2, 11)
    >>> meta["tensors"]["0.weight"]
    {'dtype': 'float32', 'shape': [8, 4]}
    """
    weights_path, sidecar_path = _paths(path)
    check_is_fitted(estimator, "merged_net_")
    if getattr(estimator, "_input_keys", None) is not None:
        raise ValueError(
            "save_merged stores merges of members that take one input array; this "
            f"merge was fitted on a dict X (keys {estimator._input_keys}). Use "
            "joblib, or save merged_net_.module_.state_dict() with torch."
        )
    net = estimator.merged_net_
    net_description = _describe_net(net)
    classes = (
        None
        if isinstance(net, NeuralNetRegressor)
        else _json_classes(estimator.classes_)
    )
    module = getattr(net.module_, "_orig_mod", net.module_)
    n_features = int(estimator.n_features_in_)
    try:
        _dry_run(module, [n_features])
        input_shape = [n_features]
    except Exception:  # any failure: the module takes inputs of another shape
        input_shape = None
    # clone() also unties shared tensors, which safetensors refuses to write.
    state = {
        name: tensor.detach().cpu().contiguous().clone()
        for name, tensor in module.state_dict().items()
    }
    weights = safetensors.torch.save(
        state, metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)}
    )
    # The layout that Sidecar.read checks field by field.
    sidecar = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "package_version": _package_version(),
        "weights": {
            "size": len(weights),
            "sha256": hashlib.sha256(weights).hexdigest(),
        },
        "tensors": _specs(state),
        "net": net_description,
        "classes": classes,
        "n_features_in": n_features,
        "input_shape": input_shape,
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
) -> NeuralNetClassifier | NeuralNetBinaryClassifier | NeuralNetRegressor:
    """Rebuild a fitted skorch net from files written by ``save_merged``.

    The sidecar and the weights file are checked in full before anything is
    built: format and version, the weights file's size and SHA-256, the
    sidecar's description of every tensor against the tensors themselves.
    Then the net is built from ``module(**module_kwargs)``, its ``state_dict``
    is checked to have exactly the file's tensor names, shapes and dtypes, and
    the weights are loaded. Last, when the sidecar records an input shape
    (``[n_features_in]``), the module is run in eval mode, without gradients,
    on a batch of zeros of shape ``(2, n_features_in)``: a module that does not
    take the inputs the merge was fitted on is refused here, not at its first
    prediction. Sidecars without an input shape (merges fitted on
    multi-dimensional inputs, such as images, and version 1 files) skip this
    check. Nothing is unpickled.

    Sidecars of version 1 are read too: their nets are rebuilt with the
    criterion's default arguments, which is what version 1 stored.

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
    net : NeuralNetClassifier, NeuralNetBinaryClassifier or NeuralNetRegressor
        An initialised net of the saved class, with the merged weights, the
        saved classes (for a ``NeuralNetClassifier``), threshold (for a
        ``NeuralNetBinaryClassifier``), criterion class and arguments, predict
        nonlinearity and batch size; its ``predict_proba`` and ``predict``
        equal the saved merged net's.

    Raises
    ------
    FileNotFoundError
        If the weights file or its sidecar does not exist.
    ValueError
        If either file is malformed, truncated or modified, they do not match
        each other, the module's ``state_dict`` does not match the weights, or
        the module does not run on a batch of the sidecar's ``n_features_in``
        features.
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
    sidecar = Sidecar.read(sidecar_path)
    tensors = _read_weights(weights_path, sidecar)
    found = _specs(tensors)
    where = f"The sidecar {str(sidecar_path)!r}"
    _check_same(found, sidecar.tensors, where, "the sidecar", weights_path)
    params = {f"module__{key}": value for key, value in module_kwargs.items()}
    arguments = decode_criterion_arguments(sidecar.net_criterion_arguments)
    _check_criterion(sidecar, arguments, where)
    params.update({f"criterion__{key}": value for key, value in arguments.items()})
    if sidecar.net_class == NeuralNetClassifier.__name__:
        params["classes"] = sidecar.classes
    if sidecar.net_threshold is not None:
        params["threshold"] = sidecar.net_threshold
    net = _NET_CLASSES[sidecar.net_class](
        module,
        criterion=getattr(torch.nn, sidecar.net_criterion),
        predict_nonlinearity=sidecar.net_predict_nonlinearity,
        batch_size=sidecar.net_batch_size,
        device=str(resolved_device),
        train_split=None,
        verbose=0,
        **params,
    )
    with torch.random.fork_rng(devices=[]):
        net.initialize()
    name = getattr(module, "__qualname__", type(module).__name__)
    built = _specs(net.module_.state_dict())
    where = f"The module built by {name}(...)"
    _check_same(found, built, where, "the module", weights_path)
    net.module_.load_state_dict(tensors)
    if sidecar.input_shape is not None:
        shape = (2, *sidecar.input_shape)
        try:
            _dry_run(net.module_, sidecar.input_shape)
        except Exception as exc:  # any failure: the module takes other inputs
            raise ValueError(
                f"The module built by {name}(...) does not take the inputs that "
                f"the merge was fitted on: the sidecar {str(sidecar_path)!r} "
                f"records n_features_in={sidecar.n_features_in}, and a batch of "
                f"zeros of shape {shape} failed: {exc}"
            ) from exc
    return net


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
    if not _is_named_nonlinearity(net.predict_nonlinearity):
        raise ValueError(
            "save_merged writes nets whose predict_nonlinearity is 'auto' or None, "
            "since a function cannot be stored without pickle; got "
            f"{net.predict_nonlinearity!r}."
        )
    arguments = encode_criterion_arguments(net.get_params_for("criterion"))
    _check_rebuilds(criterion, arguments)
    return {
        "class": type(net).__name__,
        "criterion": name,
        "criterion_arguments": arguments,
        "predict_nonlinearity": net.predict_nonlinearity,
        "batch_size": int(net.batch_size),
        "threshold": _threshold(net),
    }


def _check_criterion(sidecar: Sidecar, arguments: dict, where: str) -> None:
    """Raise a ValueError if the sidecar's criterion and its ``arguments`` do
    not build a loss; ``where`` names the sidecar to start the message."""
    loss = sidecar.net_criterion
    try:
        getattr(torch.nn, loss)(**arguments)
    except (TypeError, ValueError, RuntimeError, KeyError) as exc:
        raise ValueError(
            f"{where} has net.criterion_arguments="
            f"{sidecar.net_criterion_arguments!r}, which do not build a "
            f"torch.nn.{loss}: {exc}"
        ) from exc


def _threshold(net) -> float | None:
    """A binary net's threshold, as a float; ``None`` for other nets."""
    if not isinstance(net, NeuralNetBinaryClassifier):
        return None
    threshold = net.threshold
    if (
        isinstance(threshold, bool)
        or not isinstance(threshold, Real)
        or not math.isfinite(threshold)
    ):
        raise ValueError(
            "save_merged stores the threshold of a NeuralNetBinaryClassifier as a "
            f"finite number; the merged net's threshold is {threshold!r}."
        )
    return float(threshold)


def _check_rebuilds(criterion: torch.nn.Module, arguments: dict) -> None:
    """Raise if ``type(criterion)(**arguments)`` (decoded) differs from
    ``criterion``: in a buffer, or in an attribute such as ``reduction``.

    The sidecar stores the criterion as its class and arguments, so a criterion
    passed to skorch as an instance, or changed after it was built, would be
    reloaded as another one.
    """
    loss = type(criterion).__name__
    call = ", ".join(f"{key}=..." for key in arguments)
    rebuilt = type(criterion)(**decode_criterion_arguments(arguments))
    difference = criterion_difference(criterion, rebuilt)
    if difference is not None:
        raise ValueError(
            f"save_merged stores the criterion as its class and its criterion__ "
            f"arguments, but the merged net's criterion is not torch.nn.{loss}"
            f"({call}): {difference}. Pass the criterion as a class "
            f"with criterion__ arguments (criterion=torch.nn.{loss}, "
            "criterion__weight=...), not as an instance or changed after fit."
        )


def criterion_difference(
    criterion: torch.nn.Module, other: torch.nn.Module
) -> str | None:
    """How ``other`` differs from ``criterion``, or ``None`` if it does not.

    Compared: the class, the buffers (``weight``, ``pos_weight``; values and
    dtypes, wherever they are), and the public attributes (``reduction``,
    ``label_smoothing``, ``ignore_index``...) but for ``training``.

    Examples
    --------
    >>> import torch
    >>> from sk_softmerge._export import criterion_difference
    >>> weight = torch.tensor([1.0, 2.0])
    >>> criterion = torch.nn.CrossEntropyLoss(weight=weight, label_smoothing=0.1)
    >>> print(criterion_difference(
    ...     criterion, torch.nn.CrossEntropyLoss(weight=weight, label_smoothing=0.1)))
    None
    >>> criterion_difference(criterion, torch.nn.CrossEntropyLoss(weight=weight))
    'its label_smoothing is 0.1, not 0.0'
    >>> criterion_difference(criterion, torch.nn.CrossEntropyLoss())
    "it has buffers ['weight'], not []"
    """
    if type(criterion) is not type(other):
        return f"it is a {type(criterion).__qualname__}, not {type(other).__qualname__}"
    buffers, other_buffers = criterion.state_dict(), other.state_dict()
    if list(buffers) != list(other_buffers):
        return f"it has buffers {list(buffers)}, not {list(other_buffers)}"
    for key, tensor in buffers.items():
        if not _same(tensor, other_buffers[key]):
            return f"its buffer {key} is {tensor!r}, not {other_buffers[key]!r}"
    attributes, other_attributes = (
        {
            key: value
            for key, value in vars(loss).items()
            if not key.startswith("_") and key != "training"
        }
        for loss in (criterion, other)
    )
    for key in sorted(attributes.keys() | other_attributes.keys()):
        value, other_value = attributes.get(key), other_attributes.get(key)
        if not _same(value, other_value):
            return f"its {key} is {value!r}, not {other_value!r}"
    return None


def _same(value, other) -> bool:
    if isinstance(value, torch.Tensor) or isinstance(other, torch.Tensor):
        return (
            isinstance(value, torch.Tensor)
            and isinstance(other, torch.Tensor)
            and value.dtype == other.dtype
            and value.shape == other.shape
            and torch.equal(value.detach().cpu(), other.detach().cpu())
        )
    try:
        return bool(value == other)
    except (TypeError, ValueError, RuntimeError):  # an array, say
        return value is other


def _dry_run(module: torch.nn.Module, shape) -> None:
    """Run ``module`` on a batch of zeros of shape ``(2, *shape)``.

    In the module's input dtype (int64 for a module holding an embedding, its
    floating dtype otherwise), on its device, in eval mode and without
    gradients; every submodule's training mode and the CPU random state are
    restored, so the module and the caller see no change.
    """
    dtype = torch.int64 if takes_integers(module) else module_dtype(module)
    tensors = itertools.chain(module.parameters(), module.buffers())
    device = next(tensors, torch.empty(0)).device
    modes = [(submodule, submodule.training) for submodule in module.modules()]
    module.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            module(torch.zeros((2, *shape), dtype=dtype, device=device))
    finally:
        for submodule, training in modes:
            submodule.training = training


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


def _specs(tensors: dict[str, torch.Tensor]) -> dict[str, dict]:
    """The dtype and shape of each tensor, as the sidecar records them."""
    return {
        name: {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
        for name, t in tensors.items()
    }


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


def _read_weights(weights_path: Path, sidecar: Sidecar) -> dict[str, torch.Tensor]:
    where = f"The weights file {str(weights_path)!r}"
    if not weights_path.is_file():
        raise FileNotFoundError(f"{where} does not exist.")
    # Read once: the bytes that are hashed are the bytes that are parsed.
    data = weights_path.read_bytes()
    if len(data) != sidecar.weights_size:
        raise ValueError(
            f"{where} has {len(data)} bytes, but its sidecar records "
            f"{sidecar.weights_size}: the file is truncated or was replaced after "
            "saving."
        )
    digest = hashlib.sha256(data).hexdigest()
    if digest != sidecar.weights_sha256:
        raise ValueError(
            f"The SHA-256 of the weights file {str(weights_path)!r} is {digest}, but "
            f"its sidecar records {sidecar.weights_sha256}: the file was modified "
            "after saving, or the sidecar belongs to another file."
        )
    try:
        return safetensors.torch.load(data)
    except (safetensors.SafetensorError, ValueError, TypeError) as exc:
        raise ValueError(f"{where} is not a valid safetensors file: {exc}.") from exc


def _check_same(
    found: dict, expected: dict, subject: str, holder: str, weights_path: Path
) -> None:
    """Raise if the tensors ``found`` in the weights file differ from ``expected``.

    Both map tensor names to dtype and shape, as :func:`_specs` does.
    ``holder`` is what ``expected`` describes (``"the sidecar"`` or ``"the
    module"``), and ``subject`` names it in full to start the message.
    """
    # Sorted: safetensors does not keep the order in which tensors were saved.
    missing = sorted(expected.keys() - found.keys())
    extra = sorted(found.keys() - expected.keys())
    differences = []
    if missing:
        differences.append(
            f"the weights file is missing tensors {missing} that {holder} has"
        )
    if extra:
        differences.append(
            f"the weights file has extra tensors {extra} that {holder} lacks"
        )
    for name, spec in expected.items():
        if name not in found:
            continue
        # A shape reads as a tuple, (16, 64).
        for key, show in (("shape", tuple), ("dtype", str)):
            if found[name][key] != spec[key]:
                differences.append(
                    f"{name!r} has {key} {show(found[name][key])} in the weights "
                    f"file, but {show(spec[key])} in {holder}"
                )
    if differences:
        raise ValueError(
            f"{subject} does not match the weights file {str(weights_path)!r}: "
            + "; ".join(differences)
            + "."
        )
