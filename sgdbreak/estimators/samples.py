"""Gradient samples for the noise covariance K: micro-batch and exact per-example gradients.

Two ways to get the ``(L, D)`` sample matrix that :func:`sgdbreak.estimators.noise.covariance_spectrum`
consumes:

* :func:`microbatch_gradients`: ``L`` gradients of mean losses over ``M`` examples each
  (the paper's choice: ``L ~ 20``, ``M = 128``). Works with every model, BatchNorm in
  train mode included; the covariance of the samples is ``K / M`` (pass ``scale=M``).
* :func:`per_example_gradients`: exact per-example gradients with ``torch.func`` (``vmap``
  of ``grad``), which give ``K`` itself; undefined for train-mode BatchNorm.
  :func:`per_example_loss_gradients` does the same for a ``loss_fn(model, batch)`` on a
  batch of any structure of tensors.

Neither touches ``p.grad``, the model's mode or its buffers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils import _pytree as pytree

from .. import _validation as V
from ..errors import NonFiniteMeasurement

__all__ = [
    "draw_batches",
    "full_gradient",
    "microbatch_gradients",
    "per_example_gradients",
    "per_example_loss_gradients",
]


def _param_list(params: Iterable[Tensor]) -> list[Tensor]:
    if isinstance(params, Tensor):
        params = [params]
    params = list(params)
    if not params:
        raise ValueError("params is empty: pass the parameters to differentiate with respect to")
    for i, p in enumerate(params):
        if not isinstance(p, Tensor):
            raise TypeError(f"params[{i}] must be a tensor, got {type(p).__name__}")
        if not p.requires_grad:
            raise ValueError(
                f"params[{i}] (shape {tuple(p.shape)}) does not require grad; pass only "
                f"trainable parameters"
            )
    return params


def _flat_grad(loss: Tensor, params: Sequence[Tensor], out: Tensor | None = None) -> Tensor:
    """Flat gradient in params order via ``autograd.grad``; unreached params give zeros.

    ``out``: a (D,) tensor to write into (a row of the sample matrix: no extra copy).
    """
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    pieces = []
    for p, g in zip(params, grads, strict=True):
        if g is None:
            pieces.append(torch.zeros(p.numel(), dtype=p.dtype, device=p.device))
        else:
            pieces.append((g.to_dense() if g.is_sparse else g).reshape(-1))
    return torch.cat(pieces) if out is None else torch.cat(pieces, out=out)


def _check_loss(loss: object, where: str) -> Tensor:
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise TypeError(f"{where} must return a scalar tensor, got {shape}")
    if not loss.requires_grad:
        raise ValueError(
            f"{where} returned a tensor that does not require grad; build it with autograd "
            f"enabled from the parameters"
        )
    return loss.reshape(())


def full_gradient(loss_fn: Callable[[], Tensor], params: Iterable[Tensor]) -> Tensor:
    """Flat gradient of ``loss_fn()`` with respect to ``params`` (``p.grad`` untouched).

    Args:
        loss_fn: Zero-argument callable returning a scalar loss built with autograd.
        params: Parameters, concatenated in this order; unused ones get zeros.

    Returns:
        A 1-D tensor of ``sum(p.numel())`` entries.

    Example:
        >>> import torch
        >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> full_gradient(lambda: (w**2).sum(), [w])
        tensor([2., 4.])
    """
    params = _param_list(params)
    return _flat_grad(_check_loss(loss_fn(), "loss_fn"), params)


def batch_mean_covariance_scale(num_examples: int, batch_size: int, num_samples: int) -> float:
    """Factor turning the sample covariance of micro-batch means into per-example K.

    With K the population covariance (1/N) of the N examples' gradients and batches of M
    drawn without replacement: independent batches have Cov(mean) = K (N − M)/(M (N − 1)),
    so the factor is M (N − 1)/(N − M); disjoint batches (one permutation, as
    :func:`draw_batches` uses when L·M ≤ N) are negatively correlated and the expected
    sample covariance is K N/(M (N − 1)), so the factor is M (N − 1)/N. Both tend to M
    for N ≫ M; for M = N/2 the naive M is off by 2×.
    """
    num_examples = V.integer("num_examples", num_examples, 2)
    batch_size = V.integer("batch_size", batch_size, 1)
    num_samples = V.integer("num_samples", num_samples, 2)
    if num_samples * batch_size <= num_examples:
        return batch_size * (num_examples - 1) / num_examples
    if batch_size >= num_examples:
        raise ValueError(
            f"batch_size={batch_size} must be smaller than num_examples={num_examples}: "
            "batches of the whole probe have no spread"
        )
    return batch_size * (num_examples - 1) / (num_examples - batch_size)


def draw_batches(
    num_examples: int,
    batch_size: int,
    num_samples: int,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Indices of ``num_samples`` batches of ``batch_size`` examples from ``range(num_examples)``.

    Batches are disjoint (consecutive slices of one random permutation) when
    ``num_samples * batch_size <= num_examples``; otherwise each batch is drawn
    independently without replacement. Either way each batch is a uniform random subset.

    Returns:
        A ``(num_samples, batch_size)`` int64 CPU tensor.
    """
    num_examples = V.integer("num_examples", num_examples, 1)
    batch_size = V.integer("batch_size", batch_size, 1)
    num_samples = V.integer("num_samples", num_samples, 1)
    if batch_size > num_examples:
        raise ValueError(
            f"batch_size={batch_size} exceeds num_examples={num_examples}: a batch draws "
            f"examples without replacement"
        )
    device = generator.device if generator is not None else torch.device("cpu")

    def perm() -> Tensor:
        return torch.randperm(num_examples, generator=generator, device=device).cpu()

    if num_samples * batch_size <= num_examples:
        return perm()[: num_samples * batch_size].reshape(num_samples, batch_size)
    return torch.stack([perm()[:batch_size] for _ in range(num_samples)])


def microbatch_gradients(
    loss_of_indices: Callable[[Tensor], Tensor],
    params: Iterable[Tensor],
    num_examples: int,
    *,
    batch_size: int,
    num_samples: int,
    generator: torch.Generator | None = None,
    sketch: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """``L`` mini-batch gradients of ``M`` examples each, one per row.

    The sample covariance of these rows estimates ``K / M`` (``K`` the per-example gradient
    covariance): use ``covariance_spectrum(samples, scale=M)`` for per-example units (exactly,
    ``K (N - M) / (M (N - 1))`` since examples are drawn without replacement: use
    ``scale=M (N - 1) / (N - M)`` when ``M`` is not small against ``N``). Batches come from
    :func:`draw_batches` (disjoint when ``L * M <= N``).

    Args:
        loss_of_indices: ``loss_of_indices(idx)`` returns the mean loss over the examples
            ``idx`` (an int64 CPU tensor), built with autograd from ``params``. It is
            responsible for the model's mode (e.g. restoring BatchNorm buffers).
        params: Parameters; gradients are flattened and concatenated in this order, and
            parameters the loss does not reach contribute zeros.
        num_examples: ``N``, the number of examples indices are drawn from.
        batch_size: ``M``, examples per sample, ``1 <= M <= N``.
        num_samples: ``L``, number of samples (at least 2 for a covariance).
        generator: ``torch.Generator`` for the index draws (reproducibility).
        sketch: Optional linear map applied to each flat gradient as soon as it is
            computed (e.g. :class:`sgdbreak.estimators.noise.CountSketch`), so only ``(L, m)`` is kept.

    Returns:
        ``(L, D)`` tensor (``(L, m)`` with a sketch) in the gradients' dtype and device.

    Raises:
        ValueError: bad sizes, a loss that does not require grad, or non-finite gradients
            (the offending samples are named).

    Example:
        >>> import torch
        >>> x, w = torch.randn(100, 3), torch.zeros(3, requires_grad=True)
        >>> loss = lambda idx: ((x[idx] @ w - 1.0) ** 2).mean()
        >>> microbatch_gradients(loss, [w], 100, batch_size=10, num_samples=5).shape
        torch.Size([5, 3])
    """
    params = _param_list(params)
    batches = draw_batches(num_examples, batch_size, num_samples, generator)
    out: Tensor | None = None
    for i, idx in enumerate(batches):
        loss = _check_loss(loss_of_indices(idx), "loss_of_indices")
        if out is not None and sketch is None:
            _flat_grad(loss, params, out=out[i])  # straight into its row
            continue
        flat = _flat_grad(loss, params)
        if sketch is not None:
            flat = sketch(flat)
        if out is None:
            out = flat.new_empty((num_samples, flat.numel()))
        out[i] = flat.reshape(-1)
    assert out is not None  # num_samples >= 1
    # Row sums carry any nan or inf (isfinite over (L, D) costs more than the Gram product).
    bad: list[int] = []
    if not bool(torch.isfinite(out.sum(dim=1)).all()):
        bad = torch.nonzero(~torch.isfinite(out).all(dim=1)).flatten().tolist()
    if bad:  # (a finite row whose sum overflows is not one)
        raise NonFiniteMeasurement(
            f"gradient samples {bad} are not finite (nan or inf loss or gradient on those "
            f"batches of {batch_size} examples)"
        )
    return out


class _LossModule(nn.Module):
    """Lets ``functional_call`` run a user-supplied ``loss_fn(model, batch)`` with swapped parameters."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[nn.Module, Any], Tensor]):
        super().__init__()
        self.model = model
        self._loss_fn = loss_fn

    def forward(self, batch: Any) -> Tensor:
        return self._loss_fn(self.model, batch)


def _default_forward(model: nn.Module, inputs: object) -> Tensor:
    if isinstance(inputs, tuple | list):
        return model(*inputs)
    return model(inputs)


class _CriterionOfForward:
    """``criterion(forward(model, inputs), targets)`` on a batch ``(inputs, targets)``."""

    def __init__(self, criterion: Callable[[Tensor, Tensor], Tensor],
                 forward: Callable[[nn.Module, object], Tensor]):
        self.criterion, self.forward = criterion, forward

    def __call__(self, model: nn.Module, batch: tuple[Any, Tensor]) -> Tensor:
        inputs, targets = batch
        return self.criterion(self.forward(model, inputs), targets)


def per_example_gradients(
    model: nn.Module,
    criterion: Callable[[Tensor, Tensor], Tensor],
    inputs: Tensor | Sequence[Tensor],
    targets: Tensor,
    *,
    params: Iterable[Tensor] | None = None,
    chunk_size: int = 64,
    forward: Callable[[nn.Module, object], Tensor] | None = None,
    sketch: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Exact per-example gradients, one row per example, with ``torch.func``.

    Each row is the gradient of ``criterion(forward(model, x_i[None]), y_i[None])``: the loss
    on a batch of one, so a mean-reduction criterion gives the example's own loss. Computed
    as ``vmap(grad(...))`` over chunks of ``chunk_size`` examples via ``functional_call``;
    buffers are passed through unchanged and the model's mode is not changed. Dropout in
    train mode draws an independent mask per example (``randomness="different"``). For
    batches of another structure see :func:`per_example_loss_gradients`.

    Args:
        model: The module.
        criterion: Mean-reduction loss such as ``nn.CrossEntropyLoss()``.
        inputs: ``(N, ...)`` tensor, or a tuple of such tensors (passed as separate
            arguments to the model), batch dimension first.
        targets: ``(N, ...)`` targets.
        params: Parameters of ``model`` to differentiate (order of the columns); default all
            parameters that require grad, in ``named_parameters()`` order.
        chunk_size: Examples per ``vmap`` call (bounds memory).
        forward: Optional ``forward(model, inputs) -> outputs`` replacing ``model(inputs)``,
            called with a batch of one.
        sketch: Optional linear map ``(n, D) -> (n, m)`` (e.g.
            :class:`~sgdbreak.estimators.noise.CountSketch`) applied to each chunk as soon as it is
            computed, so memory is ``chunk_size·D + N·m`` instead of ``N·D``.

    Returns:
        ``(N, D)`` tensor (``(N, m)`` with a sketch).

    Raises:
        ValueError: BatchNorm in train mode (per-example gradients are undefined with batch
            statistics), mismatched sizes, or params that are not the model's.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Linear(3, 2)
        >>> g = per_example_gradients(net, nn.CrossEntropyLoss(), torch.randn(5, 3),
        ...                           torch.tensor([0, 1, 0, 1, 1]))
        >>> g.shape
        torch.Size([5, 8])
    """
    batched = tuple(inputs) if isinstance(inputs, tuple | list) else (inputs,)
    if not batched or not all(isinstance(t, Tensor) for t in batched):
        raise TypeError("inputs must be a tensor or a tuple of tensors (batch dimension first)")
    if not isinstance(targets, Tensor):
        raise TypeError(f"targets must be a tensor, got {type(targets).__name__}")
    sizes = [t.shape[0] if t.dim() > 0 else -1 for t in (*batched, targets)]
    if sizes[0] < 1 or any(s != sizes[0] for s in sizes):
        raise ValueError(
            f"inputs and targets must share a non-empty batch dimension, got sizes {sizes}"
        )
    loss_fn = _CriterionOfForward(criterion, forward if forward is not None else _default_forward)
    return per_example_loss_gradients(
        model, loss_fn, (batched if len(batched) > 1 else batched[0], targets),
        params=params, chunk_size=chunk_size, sketch=sketch)


def per_example_loss_gradients(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], Tensor],
    batch: Any,
    *,
    params: Iterable[Tensor] | None = None,
    chunk_size: int = 64,
    sketch: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Exact per-example gradients of ``loss_fn(model, batch)`` for a batch of any structure.

    ``batch`` is tensors in tuples, lists and dicts (nested), every tensor holding the
    examples along dim 0. Row ``i`` is the gradient of ``loss_fn(model, batch_i)`` with
    ``batch_i`` the batch of the one example ``i`` (each tensor sliced to ``[i:i+1]``), so a
    loss that is the mean over the batch gives example ``i``'s own loss. Computed as
    ``vmap(grad(...))`` over chunks of ``chunk_size`` examples with ``functional_call``;
    buffers pass through unchanged, the model's mode is not changed, and dropout draws an
    independent mask per example.

    Args:
        model: The module ``loss_fn`` calls.
        loss_fn: ``loss_fn(model, batch) -> scalar`` mean loss, built from ``model``'s
            parameters (called with the parameters swapped in by ``functional_call``).
        batch: The examples (see above).
        params: Parameters of ``model`` to differentiate (order of the columns); default all
            parameters that require grad, in ``named_parameters()`` order.
        chunk_size: Examples per ``vmap`` call (bounds memory).
        sketch: Optional linear map ``(n, D) -> (n, m)`` applied to each chunk as soon as
            it is computed.

    Returns:
        ``(N, D)`` tensor (``(N, m)`` with a sketch).

    Raises:
        ValueError: BatchNorm in train mode, tensors with different numbers of examples, or
            params that are not the model's.
        TypeError: a part of ``batch`` that is not a tensor.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Linear(3, 2)
        >>> batch = {"x": torch.randn(5, 3), "y": torch.tensor([0, 1, 0, 1, 1])}
        >>> loss = lambda m, b: nn.functional.cross_entropy(m(b["x"]), b["y"])
        >>> per_example_loss_gradients(net, loss, batch).shape
        torch.Size([5, 8])
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable as loss_fn(model, batch), got {type(loss_fn).__name__}")
    chunk_size = V.integer("chunk_size", chunk_size, 1)
    for name, module in model.named_modules():
        if isinstance(module, _BatchNorm) and module.training:
            raise ValueError(
                f"per-example gradients are undefined for BatchNorm in train mode (module "
                f"'{name or type(module).__name__}' normalises with batch statistics, which "
                f"mix examples); use microbatch_gradients, or put BatchNorm in eval mode"
            )
    leaves = pytree.tree_leaves(batch)
    if not leaves:
        raise TypeError(f"batch holds no tensors, got {type(batch).__name__}")
    for leaf in leaves:
        if not isinstance(leaf, Tensor):
            raise TypeError(f"every part of batch must be a tensor (examples along dim 0), got "
                            f"{type(leaf).__name__}")
    sizes = [t.shape[0] if t.dim() > 0 else -1 for t in leaves]
    num = sizes[0]
    if num < 1 or any(s != num for s in sizes):
        raise ValueError(
            f"every tensor of batch must hold the same non-empty number of examples along "
            f"dim 0, got sizes {sizes}"
        )

    names_by_id = {id(p): n for n, p in model.named_parameters()}
    chosen: list[tuple[str, Tensor]]
    if params is None:
        chosen = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not chosen:
            raise ValueError("model has no parameter that requires grad")
    else:
        chosen = []
        for i, p in enumerate(_param_list(params)):
            if id(p) not in names_by_id:
                raise ValueError(
                    f"params[{i}] (shape {tuple(p.shape)}) is not a parameter of the model"
                )
            chosen.append((names_by_id[id(p)], p))

    module = _LossModule(model, loss_fn)
    diff = {"model." + n: p.detach() for n, p in chosen}
    fixed = {"model." + n: b for n, b in model.named_buffers()}

    def loss_one(diff_params: dict[str, Tensor], example: Any) -> Tensor:
        # One example, restored to a batch of one so a mean loss is its own loss.
        one = pytree.tree_map(lambda t: t.unsqueeze(0), example)
        loss = torch.func.functional_call(module, {**fixed, **diff_params}, (one,))
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            what = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
            raise TypeError(f"loss_fn must return a scalar loss, got {what}")
        return loss.reshape(())

    per_example = torch.func.vmap(
        torch.func.grad(loss_one), in_dims=(None, 0), randomness="different"
    )
    keys = list(diff)
    result: Tensor | None = None
    for start in range(0, num, chunk_size):
        stop = min(num, start + chunk_size)
        part = slice(start, stop)
        try:
            grads = per_example(diff, pytree.tree_map(lambda t, part=part: t[part], batch))
        except RuntimeError as err:
            if "vmap" not in str(err):
                raise
            raise ValueError(
                "per-example gradients need a loss that torch.func.vmap can batch, and this "
                f"model's cannot ({str(err).splitlines()[0][:160]}…): use micro-batch gradient "
                "samples (method='microbatch', the default)") from err
        rows = torch.cat([grads[k].reshape(stop - start, -1) for k in keys], dim=1)
        del grads
        if sketch is not None:
            rows = sketch(rows)
            if rows.dim() != 2 or rows.shape[0] != stop - start:
                raise ValueError(f"sketch must map (n, D) to (n, m), got shape {tuple(rows.shape)}")
        if result is None:
            result = torch.empty(num, rows.shape[1], dtype=rows.dtype, device=rows.device)
        result[start:stop] = rows
    assert result is not None  # num >= 1
    return result
