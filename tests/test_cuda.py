"""On a GPU: the same gates as on the CPU, and merges of GPU members that load
without CUDA. Skipped without CUDA (CI has none); run where a GPU is lent."""

import copy

import numpy as np
import pytest
import torch
from skorch import NeuralNetClassifier

from sk_softmerge import SoftMerge, SoftMergeClassifier
from sk_softmerge._core import _fastpath
from sk_softmerge._core._adam import Adam
from sk_softmerge._core._gates import logistic_noise
from sk_softmerge.baselines import (
    FisherMergeClassifier,
    LearnedSoupClassifier,
    RegMeanClassifier,
)

from conftest import predict_without_cuda

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

STEPS, TOLERANCE = 20, dict(rtol=1e-3, atol=1e-4)
"""Gate steps compared, and how close the log-alphas must be: float32 sums in
another order on another device, over a few dozen Adam steps."""


def mlp(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10)
    )


def gpu_members(X, y):
    """Three MLP classifiers trained on the GPU."""
    return [
        NeuralNetClassifier(
            mlp(seed),
            criterion=torch.nn.CrossEntropyLoss,
            max_epochs=2,
            train_split=None,
            device="cuda",
            verbose=0,
        ).fit(X, y)
        for seed in range(3)
    ]


@pytest.mark.parametrize("path", ["small", "large"])
def test_same_gates_on_cpu_and_gpu(digits, path, monkeypatch):
    """Also along a large stack's path: the reduction in chunks with compact
    indices, and the linear layers letting go of their merged weights."""
    if path == "large":
        monkeypatch.setattr(_fastpath, "CHUNK_ELEMENTS", 1)
        monkeypatch.setattr(_fastpath, "LET_GO_ELEMENTS", 1)
    X, y = (torch.as_tensor(a) for a in digits)
    members = [mlp(seed) for seed in range(3)]
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(len(y), generator=generator)[: STEPS * 64].view(STEPS, 64)
    log_alphas = {}
    for device in ("cpu", "cuda"):
        merger = SoftMerge(members, granularity="neuron", device=device)
        assert bool(merger._binding.linears) == (path == "large")
        noise = logistic_noise(
            (STEPS, *merger.log_alpha.shape), torch.Generator().manual_seed(1)
        ).to(device)
        optimizer = Adam(merger.log_alpha, lr=5e-2)
        for step in range(STEPS):
            batch = order[step]
            output = merger(X[batch].to(device), gate_noise=noise[step])
            loss = torch.nn.functional.cross_entropy(output, y[batch].to(device))
            (grad,) = torch.autograd.grad(loss, merger.log_alpha)
            optimizer.step(grad)
        log_alphas[device] = merger.log_alpha.detach().cpu()
    assert not torch.equal(log_alphas["cpu"], torch.full_like(log_alphas["cpu"], 3.0))
    torch.testing.assert_close(log_alphas["cuda"], log_alphas["cpu"], **TOLERANCE)


def test_merge_of_gpu_members_loads_without_cuda(digits, tmp_path):
    X, y = digits
    members = gpu_members(X, y)
    assert next(members[0].module_.parameters()).is_cuda
    merge = SoftMergeClassifier(members, max_epochs=2, random_state=0).fit(X, y)
    assert next(merge.merged_net_.module_.parameters()).is_cuda
    np.testing.assert_allclose(
        predict_without_cuda(merge, "predict_proba", X[:50], tmp_path),
        merge.predict_proba(X[:50]),
        rtol=1e-4,
        atol=1e-5,
    )


@pytest.mark.parametrize(
    "Baseline", [RegMeanClassifier, FisherMergeClassifier, LearnedSoupClassifier]
)
def test_data_aware_baselines_on_gpu_members(Baseline, digits):
    """The same merge from GPU members as from their CPU copies."""
    X, y = digits
    members = gpu_members(X, y)
    on_cpu = [copy.deepcopy(m) for m in members]
    for member in on_cpu:  # not set_params, which would initialise a new module
        member.device = "cpu"
        member.module_.to("cpu")
    # Labels drawn on another device differ: the empirical Fisher is compared.
    seeded = {
        RegMeanClassifier: {},
        FisherMergeClassifier: {"fisher": "empirical"},
        LearnedSoupClassifier: {"random_state": 0},
    }[Baseline]
    gpu = Baseline(members, **seeded).fit(X[:500], y[:500])
    cpu = Baseline(on_cpu, **seeded).fit(X[:500], y[:500])
    assert next(gpu.merged_net_.module_.parameters()).is_cuda
    np.testing.assert_allclose(
        gpu.predict_proba(X[:50]), cpu.predict_proba(X[:50]), rtol=1e-3, atol=1e-4
    )
