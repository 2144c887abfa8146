"""Building the skorch net that holds a merge's weights, and probing its module."""

import itertools

import torch
from sklearn.base import clone
from skorch import NeuralNet

from ._inputs import takes_integers


def build_merged_net(reference: NeuralNet, state_dict: dict, classes=None) -> NeuralNet:
    """A fitted copy of ``reference`` whose module holds ``state_dict``.

    The copy has the reference's class and parameters (module, criterion,
    predict nonlinearity, device) and a fresh, empty history. Initialising it
    does not consume the caller's random numbers.

    Parameters
    ----------
    reference : skorch.NeuralNet
        A fitted member; it is not modified.
    state_dict : dict of str to torch.Tensor
        Weights and buffers for the copy's module.
    classes : array-like, default=None
        Classes the copy reports as ``classes_``, for a classifier with a
        ``classes`` parameter; ``None`` leaves the parameters as they are.

    Returns
    -------
    net : skorch.NeuralNet
        An initialised net, ready to predict.

    Examples
    --------
    >>> import numpy as np, torch
    >>> from skorch import NeuralNetClassifier
    >>> from sk_softmerge._nets import build_merged_net
    >>> net = NeuralNetClassifier(torch.nn.Linear, module__in_features=2,
    ...     module__out_features=2, criterion=torch.nn.CrossEntropyLoss,
    ...     max_epochs=1, train_split=None, verbose=0)
    >>> net = net.fit(np.zeros((4, 2), "float32"), np.array([0, 1, 0, 1]))
    >>> state = {k: torch.zeros_like(v) for k, v in net.module_.state_dict().items()}
    >>> build_merged_net(net, state, [0, 1]).predict_proba(np.ones((1, 2), "float32"))
    array([[0.5, 0.5]], dtype=float32)
    """
    net = clone(reference)
    if classes is not None and "classes" in net.get_params(deep=False):
        net.set_params(classes=list(classes))
    with torch.random.fork_rng(devices=[]):
        net.initialize()
    net.module_.load_state_dict(state_dict)
    return net


def module_dtype(module: torch.nn.Module) -> torch.dtype:
    """Floating dtype of a module's parameters (float32 for a module without any).

    Examples
    --------
    >>> import torch
    >>> from sk_softmerge._nets import module_dtype
    >>> module_dtype(torch.nn.Linear(2, 2).double())
    torch.float64
    """
    for tensor in module.parameters():
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float32


def dry_run(module: torch.nn.Module, shape) -> None:
    """Run ``module`` on zeros of shape ``(2, *shape)``; raise what it raises.

    The zeros have the module's input dtype (int64 for a module that takes
    integers, else :func:`module_dtype`) and device. It runs in eval mode,
    without gradients; the modes of its submodules and the random state are
    kept.

    Examples
    --------
    >>> import torch
    >>> from sk_softmerge._nets import dry_run
    >>> module = torch.nn.Sequential(torch.nn.Linear(4, 2), torch.nn.Dropout())
    >>> dry_run(module, [4])
    >>> module.training
    True
    >>> dry_run(module, [3])
    Traceback (most recent call last):
    ...
    RuntimeError: mat1 and mat2 shapes cannot be multiplied (2x3 and 4x2)
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
