"""The inputs of the members: one array, or a dict of arrays.

skorch feeds a module one array, or, when ``X`` is a dict (or a
:class:`skorch.helper.SliceDict`), each value as the keyword argument of its
key. Everything here that splits, batches, moves or runs the fit data goes
through this module, so that both kinds travel the same way:
:class:`InputDict` slices a dict of arrays or tensors sample by sample, as one
array would, and :func:`call` runs a module on either.

Integer inputs (token ids for ``nn.Embedding``) keep an integer dtype when the
members hold an embedding; other inputs are cast to the members' float dtype.
"""

from collections.abc import Callable, Mapping

import numpy as np
import torch
from scipy.sparse import issparse
from skorch.helper import SliceDict

EMBEDDINGS = (torch.nn.Embedding, torch.nn.EmbeddingBag)
"""Modules whose presence makes integer inputs stay integers."""


class InputDict(SliceDict):
    """A dict of arrays or tensors that share their first axis, sliced as one.

    ``inputs[key]`` is a value; ``inputs[index]`` (a slice, an index array or
    tensor, a boolean mask) slices every value along the first axis. Besides
    skorch's :class:`~skorch.helper.SliceDict`, it splits into batches and moves
    to a device, as a tensor does.

    Examples
    --------
    >>> import torch
    >>> from sk_softmerge._inputs import InputDict
    >>> inputs = InputDict(ids=torch.arange(6).reshape(3, 2), mask=torch.ones(3))
    >>> inputs.shape
    (3,)
    >>> inputs[1:]["ids"]
    tensor([[2, 3],
            [4, 5]])
    >>> [len(batch) for batch in inputs.split(2)]
    [2, 1]
    """

    def split(self, size: int) -> list["InputDict"]:
        """Consecutive batches of at most ``size`` samples."""
        return [self[start : start + size] for start in range(0, len(self), size)]

    def to(self, device) -> "InputDict":
        """The values as tensors on ``device``."""
        return type(self)(
            **{k: torch.as_tensor(v, device=device) for k, v in self.items()}
        )

    @property
    def device(self) -> torch.device:
        """Device of the first value (values are moved together)."""
        return torch.as_tensor(next(iter(self.values()))).device


def is_dict(X) -> bool:
    """Whether ``X`` is a dict of inputs (a scipy DOK matrix, a dict too, is not).

    Examples
    --------
    >>> import numpy as np
    >>> from scipy.sparse import dok_array
    >>> from sk_softmerge._inputs import is_dict
    >>> is_dict({"ids": np.zeros(2)}), is_dict(dok_array((2, 2)))
    (True, False)
    """
    return isinstance(X, Mapping) and not issparse(X)


def to_device(X, device):
    """``X`` (an array, a tensor or an :class:`InputDict`) as tensors on ``device``.

    Examples
    --------
    >>> import numpy as np
    >>> from sk_softmerge._inputs import to_device
    >>> to_device(np.ones((2, 1), "float32"), "cpu")
    tensor([[1.],
            [1.]])
    """
    if isinstance(X, InputDict):
        return X.to(device)
    return torch.as_tensor(X, device=device)


def call(function: Callable, X, **kwargs):
    """``function(X, **kwargs)``, or ``function(**X, **kwargs)`` for a dict.

    Examples
    --------
    >>> from sk_softmerge._inputs import call
    >>> call(lambda a, b: a - b, {"a": 3, "b": 1})
    2
    """
    if is_dict(X):
        return function(**X, **kwargs)
    return function(X, **kwargs)


def check_forward(function: Callable, X):
    """``function``'s output on the first two samples of ``X``, without
    gradients; a ValueError naming the inputs' shapes if they do not fit.

    Examples
    --------
    >>> import torch
    >>> from sk_softmerge._inputs import check_forward
    >>> check_forward(torch.nn.Linear(3, 1), torch.zeros(5, 4))
    Traceback (most recent call last):
        ...
    ValueError: X with sample shape (4,) cannot be passed through the members' ...
    """
    try:
        with torch.no_grad():
            return call(function, X[:2])
    except (RuntimeError, TypeError) as exc:
        raise ValueError(
            f"X {_describe(X)} cannot be passed through the members' module: {exc}"
        ) from exc


def _describe(X) -> str:
    if is_dict(X):
        shapes = {key: tuple(value.shape[1:]) for key, value in X.items()}
        return f"with keys and sample shapes {shapes}"
    return f"with sample shape {tuple(X.shape[1:])}"


def check_one_input(X, what: str) -> None:
    """Refuse a dict ``X`` for ``what``, which traces the members with one input.

    Examples
    --------
    >>> from sk_softmerge._inputs import check_one_input
    >>> check_one_input({"a": [0]}, "Alignment")
    Traceback (most recent call last):
        ...
    ValueError: Alignment traces the members with one input array; X is a dict of \
arrays (keys ['a']). Merge such members without align and repair.
    """
    if is_dict(X):
        raise ValueError(
            f"{what} traces the members with one input array; X is a dict of "
            f"arrays (keys {list(X)}). Merge such members without align and repair."
        )


def takes_integers(module: torch.nn.Module) -> bool:
    """Whether ``module`` holds an embedding, so that integer inputs stay integers.

    Examples
    --------
    >>> import torch
    >>> from sk_softmerge._inputs import takes_integers
    >>> takes_integers(torch.nn.Sequential(torch.nn.Embedding(10, 4)))
    True
    """
    return any(isinstance(layer, EMBEDDINGS) for layer in module.modules())


def cast(array: np.ndarray, dtype: np.dtype, integers: bool) -> np.ndarray:
    """``array`` in ``dtype``, unless it holds integers that the members take
    as such (then int64, as ``nn.Embedding`` wants)."""
    if integers and (
        np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.bool_)
    ):
        return np.require(array, dtype=np.int64, requirements="W")
    return np.require(array, dtype=dtype, requirements="W")


def check_dict(X: Mapping, keys: list | None = None) -> InputDict:
    """Check a dict input: string keys, arrays of one length, the keys seen in fit.

    Parameters
    ----------
    X : mapping of str to array-like
        The inputs.
    keys : list of str, default=None
        The keys seen during ``fit``; ``None`` at fit.

    Returns
    -------
    X : InputDict
        Each value as a NumPy array, in the mapping's key order.

    Raises
    ------
    ValueError
        If ``X`` is empty, its values differ in length or are not arrays, or its
        keys are not those seen during ``fit``.

    Examples
    --------
    >>> import numpy as np
    >>> from sk_softmerge._inputs import check_dict
    >>> check_dict({"a": np.zeros(3), "b": np.zeros(2)})
    Traceback (most recent call last):
        ...
    ValueError: The arrays of X must hold one row per sample; got lengths ...
    """
    if not X:
        raise ValueError(
            "X is an empty dict; expected one array per input of the members."
        )
    bad = [key for key in X if not isinstance(key, str)]
    if bad:
        raise ValueError(
            f"The keys of a dict X must be strings (the names of the members' "
            f"forward arguments); got {bad!r}."
        )
    if keys is not None and list(X) != list(keys) and set(X) != set(keys):
        raise ValueError(
            f"X has keys {sorted(X)}, but the estimator was fitted with keys "
            f"{sorted(keys)}."
        )
    arrays = {}
    for key, value in X.items():
        array = (
            value.detach().cpu().numpy()
            if torch.is_tensor(value)
            else np.asarray(value)
        )
        if array.ndim == 0 or array.dtype == object:
            raise ValueError(
                f"X[{key!r}] must be an array with one row per sample; got "
                f"{type(value).__name__} of shape {array.shape}."
            )
        arrays[key] = array
    lengths = {key: len(array) for key, array in arrays.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(
            f"The arrays of X must hold one row per sample; got lengths {lengths}."
        )
    order = keys if keys is not None else list(arrays)
    return InputDict(**{key: arrays[key] for key in order})
