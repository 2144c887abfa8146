"""Choosing the device that gate learning runs on."""

import torch


def resolve_device(device: str) -> torch.device:
    """Turn a ``device`` parameter into a usable :class:`torch.device`.

    Parameters
    ----------
    device : {"auto", "cpu", "cuda"} or str of the form "cuda:N"
        ``"auto"`` takes CUDA when it is available, the CPU otherwise.

    Returns
    -------
    device : torch.device

    Raises
    ------
    ValueError
        If the string names no CPU or CUDA device, or names a CUDA device that
        this machine does not have.

    Examples
    --------
    >>> from sk_softmerge._devices import resolve_device
    >>> resolve_device("cpu")
    device(type='cpu')
    """
    expected = "expected 'auto', 'cpu', 'cuda' or 'cuda:N'"
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device={device!r} is not a device; {expected}.") from exc
    if resolved.type == "cpu":
        return resolved
    if resolved.type != "cuda":
        raise ValueError(f"device={device!r} is not supported; {expected}.")
    if not torch.cuda.is_available():
        raise ValueError(
            f"device={device!r} was requested, but CUDA is not available on this "
            "machine; use device='cpu' or device='auto'."
        )
    count = torch.cuda.device_count()
    if resolved.index is not None and resolved.index >= count:
        raise ValueError(
            f"device={device!r} was requested, but this machine has {count} CUDA "
            f"device(s) (cuda:0 to cuda:{count - 1})."
        )
    return resolved
