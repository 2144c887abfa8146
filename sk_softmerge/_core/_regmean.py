"""RegMean: each linear map merged by least squares on its members' inputs.

For a linear layer, RegMean (Jin et al., 2023) takes the weight ``W`` that
maps every member's inputs to closest to that member's own outputs: with
``X_k`` the inputs of the layer in member ``k`` (a column of ones for the
bias) and ``G_k = X_k^T X_k`` their Gram matrix,

    W^T = (sum_k G_k)^-1 sum_k G_k W_k^T,

the least-squares solution of ``sum_k ||X_k W^T - X_k W_k^T||^2``. The
off-diagonal entries of every ``G_k`` are scaled by ``alpha`` first (the
paper's regularisation toward the plain average: ``alpha=0`` weighs each input
feature's column by its members' squared inputs alone). A convolution is the
linear map of its unfolded input patches. Each member's inputs are measured
through that member, not through the merge.

Memory: the Gram matrix of ``(in_features + 1)^2`` float64 entries of every
layer (``(in_channels * kernel_size + 1)^2`` for a convolution) of one member
at a time, and, per layer, their sum and the sum of their products with the
members' weights; never a stack of every member's weights or Gram matrices.
"""

import copy

import torch
import torch.nn.functional as F

from .._inputs import call
from ._average import member_values, weighted_average
from ._evaluation import state_forward
from ._merger import untied_layers

GRAM_BATCH = 256
"""Samples per forward pass while the Gram matrices are accumulated."""
GRAM_ELEMENTS = 2**20
"""Entries of a layer's input rows (patches, for a convolution) turned into
float64 at once (8 MiB)."""


def regmean_layers(module: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The layers RegMean solves for, by name: ``Linear``, and ``Conv1d`` and
    ``Conv2d`` with zero padding of fixed size and one group, whose weight is
    no other layer's.

    Examples
    --------
    >>> import torch
    >>> from sk_softmerge._core._regmean import regmean_layers
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    >>> list(regmean_layers(net))
    ['0']
    """
    return {
        name: layer
        for name, layer in untied_layers(module).items()
        if isinstance(layer, torch.nn.Linear)
        or (
            isinstance(layer, torch.nn.Conv1d | torch.nn.Conv2d)
            and layer.groups == 1
            and layer.padding_mode == "zeros"
            and not isinstance(layer.padding, str)
        )
    }


def _rows(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input ``x`` as rows of shape ``(n, n_rows_per_sample, d)``
    of the linear map its weight applies (with a column of ones for a bias)."""
    if isinstance(layer, torch.nn.Linear):
        rows = x.reshape(x.shape[0], -1, x.shape[-1])
    else:
        two_d = isinstance(layer, torch.nn.Conv2d)
        pair = (lambda v: tuple(v)) if two_d else (lambda v: (1, v[0]))
        x = x if two_d else x.unsqueeze(2)
        rows = F.unfold(
            x,
            pair(layer.kernel_size),
            dilation=pair(layer.dilation),
            padding=pair(layer.padding) if two_d else (0, layer.padding[0]),
            stride=pair(layer.stride),
        ).transpose(1, 2)
    if layer.bias is not None:
        rows = torch.cat([rows, torch.ones_like(rows[..., :1])], dim=-1)
    return rows


def _matrix(layer: torch.nn.Module, parameters, prefix: str) -> torch.Tensor:
    """The weight of ``layer`` as a matrix ``(out, d)``, the bias as a last
    column, as :func:`_rows` lays the inputs out; ``parameters(name)`` gives
    a parameter's value."""
    weight = parameters(prefix + "weight")
    matrix = weight.reshape(weight.shape[0], -1)
    if layer.bias is not None:
        matrix = torch.cat([matrix, parameters(prefix + "bias")[:, None]], dim=-1)
    return matrix


class _NormalEquations:
    """The sums over members that RegMean solves for one linear map, added one
    member at a time: ``sum_k G_k`` and ``sum_k G_k (W_k - mean)^T``."""

    def __init__(self, mean: torch.Tensor, alpha: float):
        self.mean, self.alpha = mean, alpha
        self.total = self.right = 0

    def add(self, gram: torch.Tensor, weight: torch.Tensor) -> None:
        """Add a member's Gram matrix (scaled in place) and weight matrix."""
        diagonal = gram.diagonal().clone()
        gram.mul_(self.alpha).diagonal().copy_(diagonal)
        right = gram @ (weight.to(self.mean) - self.mean).T
        if isinstance(self.total, int):  # the first member's
            self.total, self.right = gram, right
        else:
            self.total += gram
            self.right += right

    def solve(self) -> torch.Tensor:
        total, scale = self.total, float(self.total.diagonal().mean()) or 1.0
        ridge, identity = (
            0.0,
            torch.eye(len(total), dtype=total.dtype, device=total.device),
        )
        for _ in range(12):
            factor, info = torch.linalg.cholesky_ex(
                total + ridge * identity if ridge else total
            )
            if int(info) == 0:
                return self.mean + torch.cholesky_solve(self.right, factor).T
            ridge = 1e-6 * scale if ridge == 0 else 10 * ridge
        return self.mean  # no ridge made it factorise: non-finite inputs


@torch.no_grad()
def gram_matrices(
    template: torch.nn.Module,
    state: dict[str, torch.Tensor],
    layers: dict[str, torch.nn.Module],
    X,
    sample_weight: torch.Tensor | None = None,
) -> dict[str, torch.Tensor | None]:
    """Gram matrices of the inputs of ``layers`` (submodules of ``template``)
    when ``template`` runs with ``state`` on ``X``.

    Parameters
    ----------
    template : torch.nn.Module
        A module of the members' architecture, in eval mode.
    state : dict of str to torch.Tensor
        The member's state dict, on the template's device.
    layers : dict of str to torch.nn.Module
        Submodules of ``template``, by name (:func:`regmean_layers`).
    X : torch.Tensor or InputDict
        Inputs, on the template's device.
    sample_weight : torch.Tensor of shape (n_samples,), default=None
        Weight of every sample's rows; ``None`` weighs them equally.

    Returns
    -------
    grams : dict of str to torch.Tensor or None
        ``sum_n w_n X_n^T X_n`` in float64 for each layer; ``None`` for a
        layer that was not called, or was called on inputs without one row
        block per sample.

    Examples
    --------
    >>> import torch
    >>> from sk_softmerge._core._regmean import gram_matrices
    >>> layer = torch.nn.Linear(2, 1)
    >>> X = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    >>> gram_matrices(layer, layer.state_dict(), {"": layer}, X)[""]
    tensor([[1., 0., 1.],
            [0., 4., 2.],
            [1., 2., 2.]], dtype=torch.float64)
    """
    grams: dict[str, torch.Tensor | None] = {}
    spoilt: set[str] = set()
    batch_weights: list[torch.Tensor | None] = [None]

    def hook_of(name):
        def hook(layer, inputs):
            x, w = inputs[0], batch_weights[0]
            if not isinstance(x, torch.Tensor) or x.shape[0] != len(w):
                spoilt.add(name)
                return
            rows = _rows(layer, x.detach())
            rows = (rows * w.to(rows).sqrt()[:, None, None]).reshape(-1, rows.shape[-1])
            gram = grams.get(name, 0)
            for block in rows.split(max(1, GRAM_ELEMENTS // rows.shape[-1])):
                block = block.to(torch.float64)
                gram = gram + block.T @ block
            grams[name] = gram

        return hook

    handles = [
        layer.register_forward_pre_hook(hook_of(name)) for name, layer in layers.items()
    ]
    forward = state_forward(template, state)
    n_samples = len(X)
    weights = torch.ones(n_samples) if sample_weight is None else sample_weight
    try:
        for start in range(0, n_samples, GRAM_BATCH):
            batch = slice(start, start + GRAM_BATCH)
            batch_weights[0] = weights[batch].to(X.device)
            call(forward, X[batch])
    finally:
        for handle in handles:
            handle.remove()
    return {name: None if name in spoilt else grams.get(name) for name in layers}


def regmean_weight(weights, grams, alpha: float) -> torch.Tensor:
    """RegMean's merge of one linear map.

    Parameters
    ----------
    weights : sequence of torch.Tensor of shape (out, d)
        The members' weight matrices (bias as a last column).
    grams : sequence of torch.Tensor of shape (d, d)
        The members' Gram matrices of the map's inputs; not changed.
    alpha : float
        Scale of the off-diagonal entries of every Gram matrix, in [0, 1].

    Returns
    -------
    weight : torch.Tensor of shape (out, d)
        ``W`` with ``W^T = (sum_k G_k)^-1 sum_k G_k W_k^T``, computed as the
        average plus the solution for the members' differences from it, so
        that members that agree give their weight exactly. Where the sum is
        singular (inputs that are always zero: dead units), a ridge of
        ``1e-6`` times the mean diagonal entry, ten times larger until the
        matrix factorises, keeps the average in the directions no input
        reaches.

    Examples
    --------
    >>> import torch
    >>> from sk_softmerge._core._regmean import regmean_weight
    >>> w = [torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])]
    >>> g = [torch.diag(torch.tensor([3.0, 1.0])), torch.eye(2)]
    >>> regmean_weight(w, g, alpha=1.0)
    tensor([[0.7500, 0.5000]], dtype=torch.float64)
    """
    equations = _NormalEquations(weighted_average(list(weights)), alpha)
    for weight, gram in zip(weights, grams, strict=True):
        equations.add(gram.to(torch.float64, copy=True), weight)
    return equations.solve()


def regmean_parameters(
    modules,
    X,
    *,
    alpha: float,
    sample_weight: torch.Tensor | None = None,
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """RegMean's merge of every parameter of ``modules`` (float64).

    Parameters
    ----------
    modules : sequence of torch.nn.Module
        Members of one architecture; they are not run or changed (a copy of
        the first runs each member's state).
    X : torch.Tensor or InputDict
        Inputs the Gram matrices are measured on, on the members' device.
    alpha : float
        Scale of the Gram matrices' off-diagonal entries, in [0, 1].
    sample_weight : torch.Tensor of shape (n_samples,), default=None
        Weight of every sample in the Gram matrices.

    Returns
    -------
    parameters : dict of str to torch.Tensor
        Every parameter: solved by :func:`regmean_weight` for the layers of
        :func:`regmean_layers` that every member called on one row block per
        sample, the plain average for the others.
    solved : list of str
        The names of the layers solved for.

    Examples
    --------
    >>> import torch
    >>> from sk_softmerge._core._regmean import regmean_parameters
    >>> members = [torch.nn.Linear(3, 2) for _ in range(2)]
    >>> parameters, solved = regmean_parameters(members, torch.randn(50, 3), alpha=1.0)
    >>> solved, parameters["weight"].shape
    ([''], torch.Size([2, 3]))
    """
    template = copy.deepcopy(modules[0]).eval()
    layers = regmean_layers(template)
    names = [name for name, _ in modules[0].named_parameters()]
    parameters = {
        name: weighted_average(member_values(modules, name)) for name in names
    }
    prefixes = {name: f"{name}." if name else "" for name in layers}
    equations = {
        name: _NormalEquations(_matrix(layer, parameters.get, prefixes[name]), alpha)
        for name, layer in layers.items()
    }
    for member in modules:
        state = {k: v.detach().to(X.device) for k, v in member.state_dict().items()}
        grams = gram_matrices(template, state, layers, X, sample_weight)
        for name in list(equations):
            if grams[name] is None:  # not called on one row block per sample
                del equations[name]
            else:
                weight = _matrix(layers[name], member.get_parameter, prefixes[name])
                equations[name].add(grams[name], weight.detach())
        del grams  # before the next member's are measured
    for name, system in equations.items():
        merged, weight = system.solve(), parameters[prefixes[name] + "weight"]
        parameters[prefixes[name] + "weight"] = merged[:, : weight[0].numel()].reshape(
            weight.shape
        )
        if layers[name].bias is not None:
            parameters[prefixes[name] + "bias"] = merged[:, -1]
    return parameters, list(equations)
