"""The task a member was trained on: its loss and its output nonlinearity.

The merge trains on the loss its members were trained with, so the gates
optimise what the members optimised, and predicts through their own predict
nonlinearity instead of assuming logits.
"""

import copy
from collections.abc import Callable

import torch
from skorch import NeuralNet, NeuralNetBinaryClassifier


def classification_loss(
    net: NeuralNet, device: torch.device
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Loss of a skorch classifier, as a function of module output and labels.

    The net's own criterion is copied to ``device`` and used as skorch uses it:
    directly on the output for ``CrossEntropyLoss``, on the log of the output
    for ``NLLLoss`` (the module returns probabilities), on float targets for
    ``BCEWithLogitsLoss``. Any other criterion is replaced by the negative log
    likelihood of the probabilities that the net's predict nonlinearity gives.

    Parameters
    ----------
    net : skorch.NeuralNet
        A fitted skorch classifier.
    device : torch.device
        Where the loss will be evaluated.

    Returns
    -------
    loss : callable
        ``loss(output, y)`` with ``y`` the class indices, returning a scalar.

    Examples
    --------
    >>> import numpy as np, torch
    >>> from skorch import NeuralNetClassifier
    >>> from sk_softmerge._tasks import classification_loss
    >>> net = NeuralNetClassifier(torch.nn.Linear, module__in_features=2,
    ...     module__out_features=2, criterion=torch.nn.CrossEntropyLoss,
    ...     max_epochs=1, train_split=None, verbose=0)
    >>> _ = net.fit(np.zeros((4, 2), "float32"), np.array([0, 1, 0, 1]))
    >>> loss = classification_loss(net, torch.device("cpu"))
    >>> float(loss(torch.zeros(2, 2), torch.tensor([0, 1])))
    0.693...
    """
    criterion = copy.deepcopy(net.criterion_).to(device)
    criterion = getattr(criterion, "_orig_mod", criterion)
    if isinstance(criterion, torch.nn.CrossEntropyLoss):
        return criterion
    if isinstance(criterion, torch.nn.NLLLoss):

        def nll_on_probabilities(output, y):
            return criterion(torch.log(output + torch.finfo(output.dtype).eps), y)

        return nll_on_probabilities
    if isinstance(criterion, torch.nn.BCEWithLogitsLoss):

        def binary_cross_entropy(output, y):
            return criterion(output.reshape(y.shape), y.to(output.dtype))

        return binary_cross_entropy

    nonlinearity = net._get_predict_nonlinearity()

    def nll_of_predicted_probabilities(output, y):
        proba = nonlinearity(output)
        log_proba = torch.log(proba + torch.finfo(proba.dtype).eps)
        return torch.nn.functional.nll_loss(log_proba, y)

    return nll_of_predicted_probabilities


def regression_loss(
    net: NeuralNet, device: torch.device
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Loss of a skorch regressor, as a function of module output and targets.

    The net's own criterion (``MSELoss`` by default, or any loss that compares
    an output with a target of the same shape) is copied to ``device`` and
    called as skorch calls it, with the targets shaped like the output.

    Parameters
    ----------
    net : skorch.NeuralNet
        A fitted skorch regressor.
    device : torch.device
        Where the loss will be evaluated.

    Returns
    -------
    loss : callable
        ``loss(output, y)`` with ``y`` holding as many values per sample as the
        output, returning a scalar.

    Examples
    --------
    >>> import numpy as np, torch
    >>> from skorch import NeuralNetRegressor
    >>> from sk_softmerge._tasks import regression_loss
    >>> net = NeuralNetRegressor(torch.nn.Linear, module__in_features=2,
    ...     module__out_features=1, max_epochs=1, train_split=None, verbose=0)
    >>> _ = net.fit(np.zeros((4, 2), "float32"), np.zeros((4, 1), "float32"))
    >>> loss = regression_loss(net, torch.device("cpu"))
    >>> float(loss(torch.zeros(2, 1), torch.tensor([1.0, 3.0])))
    5.0
    """
    criterion = copy.deepcopy(net.criterion_).to(device)
    criterion = getattr(criterion, "_orig_mod", criterion)

    def loss_on_output_shape(output, y):
        return criterion(output, y.reshape(output.shape).to(output.dtype))

    return loss_on_output_shape


def prediction_function(net: NeuralNet) -> Callable[[torch.Tensor], torch.Tensor]:
    """What the net's ``predict_proba`` makes of a module output, as a function.

    skorch applies the predict nonlinearity to the module's output, after
    flattening it for a :class:`skorch.NeuralNetBinaryClassifier` (whose module
    may return shape ``(n, 1)``). Evaluating a merge through this function
    scores it exactly as its net will predict.

    Parameters
    ----------
    net : skorch.NeuralNet
        A fitted skorch net.

    Returns
    -------
    predict : callable
        Maps a module output to class probabilities (classifiers) or
        predictions (regressors).

    Examples
    --------
    >>> import numpy as np, torch
    >>> from skorch import NeuralNetBinaryClassifier
    >>> from sk_softmerge._tasks import prediction_function
    >>> net = NeuralNetBinaryClassifier(torch.nn.Linear, module__in_features=2,
    ...     module__out_features=1, max_epochs=1, train_split=None, verbose=0)
    >>> _ = net.fit(np.zeros((4, 2), "float32"), np.array([0.0, 1, 0, 1], "float32"))
    >>> prediction_function(net)(torch.zeros(3, 1)).shape
    torch.Size([3, 2])
    """
    nonlinearity = net._get_predict_nonlinearity()
    if not isinstance(net, NeuralNetBinaryClassifier):
        return nonlinearity

    def flatten_then_nonlinearity(output):
        return nonlinearity(output.reshape(-1))

    return flatten_then_nonlinearity
