"""Shared fixtures: small fitted skorch members, built once per test module."""

import copy
import os
import subprocess
import sys

import joblib
import numpy as np
import pytest
import torch
from sklearn.datasets import load_diabetes, load_digits
from skorch import NeuralNetClassifier, NeuralNetRegressor

N_HIDDEN = 16


def make_module(n_features=64, n_classes=10, softmax=False):
    layers = [
        torch.nn.Linear(n_features, N_HIDDEN),
        torch.nn.ReLU(),
        torch.nn.Linear(N_HIDDEN, n_classes),
    ]
    if softmax:
        layers.append(torch.nn.Softmax(dim=-1))
    return torch.nn.Sequential(*layers)


def batchnorm_module(n_features, n_classes, hidden=N_HIDDEN):
    """A one-hidden-layer net with batch norm before its activation."""
    return torch.nn.Sequential(
        torch.nn.Linear(n_features, hidden),
        torch.nn.BatchNorm1d(hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(hidden, n_classes),
    )


def fork(shared, X, y, n_members, seed, max_epochs):
    """Copies of the fitted net ``shared``, each trained on its own bootstrap."""
    rng = np.random.default_rng(seed)
    members = []
    for _ in range(n_members):
        member = copy.deepcopy(shared).set_params(max_epochs=max_epochs)
        sample = rng.integers(0, len(X), len(X))
        members.append(member.partial_fit(X[sample], y[sample]))
    return members


def forked_members(
    X, y, n_members=3, seed=0, softmax=False, architecture=None, **net_params
):
    """Members forked from one short shared training, each on a bootstrap sample.

    ``architecture(n_features, n_classes)`` builds the module, by default
    :func:`make_module`'s.
    """
    torch.manual_seed(seed)
    params = dict(
        criterion=torch.nn.NLLLoss if softmax else torch.nn.CrossEntropyLoss,
        optimizer=torch.optim.SGD,
        lr=0.2,
        max_epochs=2,
        batch_size=64,
        train_split=None,
        verbose=0,
    )
    params.update(net_params)
    if architecture is None:
        module = make_module(X.shape[1], len(np.unique(y)), softmax=softmax)
    else:
        module = architecture(X.shape[1], len(np.unique(y)))
    shared = NeuralNetClassifier(module, **params).fit(X, y)
    return fork(shared, X, y, n_members, seed, max_epochs=3)


def independent_members(X, y, architecture, n_members=3, max_epochs=5):
    """Members trained from their own random initialisations (seeds 0, 1, ...),
    each module built by ``architecture(n_features, n_classes)``."""
    members = []
    for seed in range(n_members):
        torch.manual_seed(seed)
        members.append(
            NeuralNetClassifier(
                architecture(X.shape[1], len(np.unique(y))),
                criterion=torch.nn.CrossEntropyLoss,
                optimizer=torch.optim.Adam,
                lr=1e-2,
                max_epochs=max_epochs,
                batch_size=256,
                train_split=None,
                verbose=0,
            ).fit(X, y)
        )
    return members


def forked_regressors(X, y, n_members=3, seed=0, **net_params):
    """Regressors forked from one short shared training, each on a bootstrap.

    ``y`` of shape (n_samples, n_outputs) sets the number of outputs.
    """
    torch.manual_seed(seed)
    params = dict(
        optimizer=torch.optim.SGD,
        lr=0.05,
        max_epochs=5,
        batch_size=32,
        train_split=None,
        verbose=0,
    )
    params.update(net_params)
    module = make_module(X.shape[1], y.shape[1])
    shared = NeuralNetRegressor(module, **params).fit(X, y)
    return fork(shared, X, y, n_members, seed, max_epochs=10)


@pytest.fixture(scope="session")
def diabetes():
    """Diabetes with standardised features and target, float32; y of shape (n,)."""
    X, y = load_diabetes(return_X_y=True)
    X = (X - X.mean(0)) / X.std(0)
    y = (y - y.mean()) / y.std()
    return X.astype(np.float32), y.astype(np.float32)


@pytest.fixture(scope="session")
def regressors(diabetes):
    X, y = diabetes
    return forked_regressors(X, y[:, None])


@pytest.fixture(scope="session")
def digits():
    X, y = load_digits(return_X_y=True)
    return (X / 16.0).astype(np.float32), y


@pytest.fixture(scope="session")
def members(digits):
    return forked_members(*digits)


@pytest.fixture(autouse=True)
def seed_everything():
    torch.manual_seed(0)


def parameters_of(net):
    return {k: v.detach().clone() for k, v in net.module_.state_dict().items()}


def check_refused(estimator, X, y, error, match):
    """``fit`` raises ``error`` matching ``match``, fits nothing, and leaves the
    members' weights as they were."""
    given = estimator.estimators
    nets = given if isinstance(given, list) else [given]
    before = [parameters_of(m) for m in nets if hasattr(m, "module_")]
    with pytest.raises(error, match=match):
        estimator.fit(X, y)
    assert not hasattr(estimator, "gates_")
    for member, state in zip(nets, before, strict=False):
        for name, value in member.module_.state_dict().items():
            assert torch.equal(value, state[name])


def predict_without_cuda(model, method, X, tmp_path):
    """``model.<method>(X)`` computed in a fresh Python process that sees no
    GPU, after a joblib round trip through ``tmp_path``."""
    path, inputs, outputs = (tmp_path / name for name in ("m.joblib", "X.npy", "y.npy"))
    joblib.dump(model, path)
    np.save(inputs, X)
    script = (
        "import joblib, numpy as np, torch; assert not torch.cuda.is_available();"
        f"m = joblib.load({str(path)!r});"
        f"np.save({str(outputs)!r}, m.{method}(np.load({str(inputs)!r})))"
    )
    # The same environment (where the packages are found), with no GPU.
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    subprocess.run([sys.executable, "-c", script], check=True, env=env)
    return np.load(outputs)
