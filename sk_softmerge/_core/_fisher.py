"""Fisher merging: every weight averaged in proportion to its Fisher information.

Fisher merging (Matena and Raffel, 2022) weighs member ``k``'s value of each
weight by the diagonal of its Fisher information there, ``F_k = E[g^2]``,
``g`` the gradient of the log-likelihood of one sample, estimated on data:

    theta = sum_k F_k theta_k / sum_k F_k.

The labels of ``g`` are drawn from the member's own predictive distribution
(the Fisher information proper) or are the data's labels (the "empirical"
Fisher). For a ``Linear`` layer called once on one row per sample, a sample's
gradient of the weight is the outer product ``g x^T`` of the gradient of its
loss with respect to the layer's output and the layer's input, so the sum of
the squares over a batch is one product, ``(g^2)^T (x^2)``, and no per-sample
gradient is formed. Every other parameter's per-sample gradients come from
:func:`torch.func.vmap` of :func:`torch.func.grad`, a chunk of samples at a
time. As in the paper's code,
each member's Fisher is divided by its norm over all weights (so that no
member wins everywhere by the scale of its outputs alone), then floored at
``floor``: a weight where no member has information above the floor (a dead
unit, an input that is always zero, a member whose gradients are all zero)
takes the plain average there.

Memory: one float32 Fisher per member (together, one stack of the members'
weights), one batch's activations, per-sample gradients of the other
parameters for one chunk (at most :data:`CHUNK_ELEMENTS` numbers) and, while
the weights are averaged, a few float64 copies of one parameter.
"""

from collections.abc import Callable

import torch
from torch.func import grad, vmap

from .._inputs import InputDict, call, is_dict
from ._average import member_values, weighted_average
from ._evaluation import state_forward
from ._merger import untied_layers
from ._training import losses_of_batch

CHUNK_ELEMENTS = 2**24
"""Per-sample gradient entries computed at once (64 MiB in float32). With
every parameter through per-sample gradients, at 1M weights, K=5, 500
samples: 8.4 s and a peak of 4.4 stacks of the members' weights; 2**22 took
19.9 s (3.9 stacks), 2**26 5.2 s (14 stacks)."""
FISHER_FLOOR = 1e-6
"""Least Fisher weight of a weight, after each member's normalisation."""


def diagonal_fisher(
    template: torch.nn.Module,
    state: dict[str, torch.Tensor],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    X,
    targets,
    sample_weight: torch.Tensor | None = None,
    batch_size: int = 256,
) -> dict[str, torch.Tensor]:
    """The diagonal of the Fisher information of a member, estimated on ``X``.

    Parameters
    ----------
    template : torch.nn.Module
        A module of the member's architecture, in eval mode.
    state : dict of str to torch.Tensor
        The member's state dict, on the template's device.
    loss_fn : callable
        ``loss_fn(output, y)``, the mean negative log-likelihood of a batch.
    X : torch.Tensor or InputDict
        Inputs, on the template's device.
    targets : torch.Tensor or callable
        The labels of ``X``, or a function drawing a batch's labels from the
        member's output on it.
    sample_weight : torch.Tensor of shape (n_samples,), default=None
        Weights of the samples in the mean; ``None`` weighs them equally.
    batch_size : int, default=256
        Samples per forward pass (and per draw of labels).

    Returns
    -------
    fisher : dict of str to torch.Tensor
        The weighted mean over ``X`` of each parameter's squared per-sample
        gradient, float32.

    Examples
    --------
    >>> import torch
    >>> from sk_softmerge._core._fisher import diagonal_fisher
    >>> layer = torch.nn.Linear(1, 1, bias=False)
    >>> state = {"weight": torch.tensor([[2.0]])}
    >>> loss = lambda out, y: ((out - y) ** 2).mean()
    >>> X, y = torch.tensor([[1.0], [3.0]]), torch.tensor([[1.0], [5.0]])
    >>> diagonal_fisher(layer, state, loss, X, y)["weight"]  # (2*1*1)^2, (2*1*3)^2
    tensor([[20.]])
    """
    names = [name for name, _ in template.named_parameters()]
    parameters = {name: state[name].detach() for name in names}
    buffers = {k: v for k, v in state.items() if k not in parameters}
    layers = {  # a sample's gradient of their weight is an outer product
        name: layer
        for name, layer in untied_layers(template).items()
        if isinstance(layer, torch.nn.Linear)
    }
    n_samples = len(X)
    weights = torch.ones(n_samples) if sample_weight is None else sample_weight
    weights = weights.to(next(iter(parameters.values())).device, torch.float32)
    live = {k: v.detach().requires_grad_() for k, v in parameters.items()}
    forward = state_forward(template, {**live, **buffers})
    fisher = {
        k: torch.zeros_like(v, dtype=torch.float32) for k, v in parameters.items()
    }
    for start in range(0, n_samples, batch_size):
        x, w = X[start : start + batch_size], weights[start : start + batch_size]
        if isinstance(x, InputDict):
            x = dict(x)
        # One forward pass serves the drawn labels and the outer products.
        with torch.set_grad_enabled(bool(layers)):
            output, calls = _traced(forward, layers, x)
        if callable(targets):
            y = targets(output.detach())
        else:
            y = targets[start : start + batch_size]
        done = _outer_product_fisher(layers, calls, loss_fn, output, y, w)
        for name, value in done.items():
            fisher[name] += value
        rest = {k: v for k, v in parameters.items() if k not in done}
        for name, value in _per_sample_fisher(
            template, (rest, parameters, buffers), loss_fn, x, y, w
        ).items():
            fisher[name] += value
    return {name: f.div_(weights.sum()) for name, f in fisher.items()}


def _traced(forward, layers: dict, x) -> tuple[torch.Tensor, dict]:
    """``forward``'s output on ``x``, and the input and output of every call
    of each of ``layers`` during it, by layer name."""
    calls: dict[str, list] = {name: [] for name in layers}
    handles = [
        layer.register_forward_hook(
            lambda _, inputs, output, name=name: calls[name].append((inputs[0], output))
        )
        for name, layer in layers.items()
    ]
    try:
        return call(forward, x), calls
    finally:
        for handle in handles:
            handle.remove()


def _outer_product_fisher(layers, calls, loss_fn, output, y, w) -> dict:
    """The weighted sums of squared per-sample gradients of the ``layers``
    called once on one row per sample (``calls`` as :func:`_traced` gives
    them, ``output`` the module's): for a layer ``y = x W^T + b``, a sample's
    gradient of ``W`` is ``g x^T``, ``g`` the gradient of its loss with
    respect to the layer's output, so its square is ``g^2 (x^2)^T`` and the
    sum over samples one product, without a per-sample gradient. The other
    layers' parameters are left out of the result."""
    usable = [
        name
        for name, seen in calls.items()
        if len(seen) == 1 and seen[0][0].dim() == 2 and len(seen[0][0]) == len(w)
    ]
    if not usable:
        return {}
    total = losses_of_batch(loss_fn, output, y).sum()
    outputs = [calls[name][0][1] for name in usable]
    gradients = torch.autograd.grad(total, outputs, allow_unused=True)
    found = {}
    for name, gradient in zip(usable, gradients, strict=True):
        inputs, layer_output = calls[name][0]
        if gradient is None:  # the loss does not depend on this layer
            gradient = torch.zeros_like(layer_output)
        g2 = gradient.detach().to(torch.float32).square_() * w[:, None]
        prefix = f"{name}." if name else ""
        found[prefix + "weight"] = g2.T @ inputs.detach().to(torch.float32).square()
        if layers[name].bias is not None:
            found[prefix + "bias"] = g2.sum(0)
    return found


def _per_sample_fisher(template, state, loss_fn, x, y, w) -> dict:
    """The weighted sums of squared per-sample gradients of the parameters
    ``rest`` of ``state = (rest, parameters, buffers)``, from
    :func:`torch.func.vmap` of :func:`torch.func.grad`, at most
    :data:`CHUNK_ELEMENTS` gradient entries at a time."""
    rest, parameters, buffers = state
    if not rest:
        return {}
    fixed = {k: v for k, v in parameters.items() if k not in rest}

    def sample_loss(rest, x, y):
        forward = state_forward(template, {**rest, **fixed, **buffers})
        return loss_fn(call(forward, _each(x, lambda v: v[None])), y[None])

    batched = vmap(grad(sample_loss), in_dims=(None, 0, 0))

    def gradients(rest, xs, ys):
        try:
            return batched(rest, xs, ys)
        except Exception:
            # A module or loss that vmap cannot trace (data-dependent Python
            # control flow, .item()): the same gradients, one sample at a time.
            one = [
                grad(sample_loss)(rest, _each(xs, lambda v, i=i: v[i]), ys[i])
                for i in range(len(ys))
            ]
            return {k: torch.stack([g[k] for g in one]) for k in rest}

    n_weights = sum(p.numel() for p in rest.values())
    chunk = max(1, CHUNK_ELEMENTS // n_weights)
    found = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in rest.items()}
    for start in range(0, len(w), chunk):
        part = slice(start, start + chunk)
        xs = _each(x, lambda v, part=part: v[part])
        for name, g in gradients(rest, xs, y[part]).items():
            g = g.to(torch.float32)
            found[name] += torch.einsum("n,n...->...", w[part], g.mul_(g))  # in place
    return found


def _each(x, index):
    """``index`` applied to ``x``, or to each value of a dict ``x``."""
    return {k: index(v) for k, v in x.items()} if is_dict(x) else index(x)


def fisher_parameters(
    modules, fishers: list[dict[str, torch.Tensor]], floor: float = FISHER_FLOOR
) -> dict[str, torch.Tensor]:
    """Fisher merging of every parameter of ``modules`` (float64).

    Parameters
    ----------
    modules : sequence of torch.nn.Module
        Members of one architecture; not changed.
    fishers : list of dict of str to torch.Tensor
        Each member's diagonal Fisher (:func:`diagonal_fisher`).
    floor : float, default=FISHER_FLOOR
        Least weight of a member's value, after its Fisher is divided by its
        norm over all parameters (a zero Fisher stays zero, then the floor).

    Returns
    -------
    parameters : dict of str to torch.Tensor

    Examples
    --------
    >>> import torch
    >>> from sk_softmerge._core._fisher import fisher_parameters
    >>> a, b = torch.nn.Linear(1, 1, bias=False), torch.nn.Linear(1, 1, bias=False)
    >>> with torch.no_grad():
    ...     _ = a.weight.fill_(1.0), b.weight.fill_(3.0)
    >>> fishers = [{"weight": torch.tensor([[3.0]])}, {"weight": torch.tensor([[0.0]])}]
    >>> fisher_parameters([a, b], fishers)["weight"]  # b has no information
    tensor([[1.0000]], dtype=torch.float64)
    """
    names = [name for name, _ in modules[0].named_parameters()]
    norms = []
    for fisher in fishers:
        norm = torch.sqrt(sum((f.double() ** 2).sum() for f in fisher.values()))
        norms.append(torch.where(norm > 0, norm, 1.0))

    def weights(name):  # one member's at a time
        for fisher, norm in zip(fishers, norms, strict=True):
            weight = (fisher[name] / norm).nan_to_num(nan=0.0, posinf=0.0)
            yield weight.clamp_min(floor)

    return {
        name: weighted_average(member_values(modules, name), weights(name))
        for name in names
    }
