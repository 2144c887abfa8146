"""The task a merge's members were trained on, as one object.

Everything a fit does differently for classifiers and regressors is a method
of :class:`Task`: how the data are split, the loss the gates train on, how a
candidate model is scored on held-out data, and the net that holds the result.
The estimators build one task from the members and the targets and pass it to
the fit they share (and to the baselines); nothing else depends on the task.

The merge trains on the loss its members were trained with, so the gates
optimise what the members optimised, and predicts through their own predict
nonlinearity instead of assuming logits.
"""

import copy
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch
from sklearn.model_selection import train_test_split
from skorch import NeuralNet, NeuralNetBinaryClassifier

from ._core._evaluation import correct_predictions, scaled_squared_errors
from ._nets import build_merged_net

Forward = Callable[[torch.Tensor], torch.Tensor]


class Task(ABC):
    """What a merge needs to know about its members' task.

    Examples
    --------
    >>> import numpy as np
    >>> from sk_softmerge._tasks import ClassificationTask
    >>> task = ClassificationTask(classes=np.array(["a", "b"]))
    >>> task.score(np.array([False, True, False, False]))   # 1 error in 4
    0.75
    """

    @abstractmethod
    def split(self, X, y, fraction: float, seed: int, *weights) -> list:
        """``X_train, X_held_out, y_train, y_held_out`` (then the training and
        held-out parts of each array of ``weights``)."""

    @abstractmethod
    def check_output(self, output: torch.Tensor, y) -> None:
        """Raise a ValueError if ``y`` does not fit the members' ``output``."""

    @abstractmethod
    def loss_function(
        self, net: NeuralNet, device: torch.device
    ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """``loss(output, y)``: the mean loss that ``net`` was trained on."""

    @abstractmethod
    def errors(
        self,
        forward: Forward,
        X: torch.Tensor,
        y: torch.Tensor,
        predict: Forward,
        batch_size: int = 1024,
    ) -> np.ndarray | None:
        """Per-sample errors of a model on held-out data (lower is better);
        ``None`` when the model does not predict (non-finite outputs).
        ``predict`` maps the module's output to what the net predicts; the
        model runs on ``batch_size`` samples at a time."""

    @abstractmethod
    def draw_targets(
        self, output: torch.Tensor, predict: Forward, generator: torch.Generator
    ) -> torch.Tensor:
        """Targets drawn from the predictive distribution of a model whose
        module gave ``output`` (``predict`` maps it to what the net predicts):
        a class for classifiers, a Gaussian of unit variance around the
        prediction for regressors (Fisher merging's labels)."""

    def pooled(self, y) -> "Task":
        """The task whose per-sample errors on any part of the samples of
        ``y`` add up to errors on all of them (for cross-fitting)."""
        return self

    @abstractmethod
    def score(self, errors: np.ndarray | None) -> float:
        """The estimator's ``score`` that ``errors`` amount to (errors weighted
        by samples' weights of mean 1 give the weighted score)."""

    @abstractmethod
    def build_net(self, reference: NeuralNet, state_dict: dict) -> NeuralNet:
        """A fitted net of ``reference``'s class holding ``state_dict``."""


@dataclass(frozen=True)
class ClassificationTask(Task):
    """Classification: labels as indices into ``classes``; accuracy.

    Parameters
    ----------
    classes : ndarray of shape (n_classes,)
        The members' classes.
    threshold : float, default=None
        The members' threshold, for :class:`skorch.NeuralNetBinaryClassifier`
        members: a model is scored as they predict, class 1 where its
        probability is above ``threshold``. ``None`` scores the class of
        highest probability.

    Examples
    --------
    >>> import numpy as np, torch
    >>> from sk_softmerge._tasks import ClassificationTask
    >>> proba = torch.tensor([[0.4, 0.6], [0.2, 0.8]])
    >>> y = torch.tensor([1, 0])
    >>> ClassificationTask(np.array([0, 1])).errors(
    ...     lambda x: x, proba, y, predict=lambda out: out)
    array([False,  True])
    >>> ClassificationTask(np.array([0, 1]), threshold=0.9).errors(
    ...     lambda x: x, proba, y, predict=lambda out: out)
    array([ True, False])
    """

    classes: np.ndarray
    threshold: float | None = None

    def split(self, X, y, fraction, seed, *weights):
        """Stratified split (plain when a class is too rare to stratify)."""
        try:
            return train_test_split(
                X, y, *weights, test_size=fraction, stratify=y, random_state=seed
            )
        except ValueError:
            return train_test_split(
                X, y, *weights, test_size=fraction, random_state=seed
            )

    def check_output(self, output, y):
        """Nothing to check: labels were checked against ``classes``."""

    def loss_function(self, net, device):
        return classification_loss(net, device)

    def errors(self, forward, X, y, predict, batch_size=1024):
        """Misclassifications (bool), of predictions by ``threshold`` if any."""
        correct = correct_predictions(
            forward, X, y, predict, batch_size, threshold=self.threshold
        )
        return None if correct is None else ~correct

    def draw_targets(self, output, predict, generator):
        proba = predict(output)
        # A model whose probabilities are not finite draws uniformly.
        usable = torch.isfinite(proba).all(-1, keepdim=True)
        usable &= (proba >= 0).all(-1, keepdim=True) & (proba.sum(-1, keepdim=True) > 0)
        proba = torch.where(usable, proba, torch.ones_like(proba))
        return torch.multinomial(proba, 1, generator=generator).squeeze(1)

    def score(self, errors):
        """Accuracy; -1 for a model that does not predict."""
        return -1.0 if errors is None else float(1 - errors.mean())

    def build_net(self, reference, state_dict):
        return build_merged_net(reference, state_dict, self.classes)


@dataclass(frozen=True)
class RegressionTask(Task):
    """Regression: targets of shape (n_samples, n_outputs); R^2.

    Parameters
    ----------
    n_outputs : int
        Targets per sample.
    variance : torch.Tensor of shape (n_outputs,), default=None
        Variance of every output's targets that squared errors are divided
        by; ``None`` takes it from the targets being scored.
    """

    n_outputs: int
    variance: torch.Tensor | None = None

    def split(self, X, y, fraction, seed, *weights):
        return train_test_split(X, y, *weights, test_size=fraction, random_state=seed)

    def check_output(self, output, y):
        n_values = output[0].numel()
        if n_values != self.n_outputs:
            raise ValueError(
                f"y has {self.n_outputs} target(s) per sample, but the members' "
                f"module outputs {n_values} value(s) per sample (output shape "
                f"{tuple(output.shape[1:])}); y must have one target per output."
            )

    def loss_function(self, net, device):
        return regression_loss(net, device)

    def errors(self, forward, X, y, predict, batch_size=1024):
        """Squared errors scaled so that R^2 is one minus their mean."""
        return scaled_squared_errors(
            forward, X, y, predict, batch_size, variance=self.variance
        )

    def pooled(self, y):
        """The task scaling every part's errors by the variance of all ``y``."""
        variance = torch.as_tensor(y).to(torch.float64).var(dim=0, unbiased=False)
        return replace(self, variance=variance)

    def draw_targets(self, output, predict, generator):
        prediction = predict(output)
        noise = torch.randn(
            prediction.shape,
            generator=generator,
            device=prediction.device,
            dtype=prediction.dtype,
        )
        return prediction + noise

    def score(self, errors):
        """R^2; minus infinity for a model whose predictions are not finite."""
        return -np.inf if errors is None else float(1 - errors.mean())

    def build_net(self, reference, state_dict):
        return build_merged_net(reference, state_dict)


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
