"""Batches of any structure: tensors in tuples, lists and dicts (nested), split along dim 0.

A probe holds its examples as one batch whose every tensor ("leaf") has the examples along
its first dimension: ``(inputs, targets)``, ``{"input_ids": ..., "attention_mask": ...,
"labels": ...}``, ``((image, text), label)``. These helpers turn what a user passes (one
batch, a list of batches, a DataLoader) into that one batch and take examples out of it,
with ``torch.utils._pytree`` doing the walking. Other mappings (Hugging Face's
``BatchEncoding``) are read as plain dicts.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

__all__ = ["as_batches", "concat_batches", "describe", "num_examples", "select", "to_device"]


def _is_foreign_mapping(obj: object) -> bool:
    """A mapping pytree does not walk (e.g. ``UserDict`` subclasses such as ``BatchEncoding``)."""
    return isinstance(obj, Mapping) and not isinstance(obj, dict)


def _plain(batch: Any) -> Any:
    """``batch`` with every mapping pytree cannot walk turned into a dict (recursively)."""
    return pytree.tree_map(
        lambda x: {k: _plain(v) for k, v in x.items()} if _is_foreign_mapping(x) else x,
        batch, is_leaf=_is_foreign_mapping)


def as_batches(data: Any) -> list[Any]:
    """The batches in ``data``: one batch, or a list / DataLoader / iterable of batches.

    One batch: a tensor, a tuple, a mapping, or a list of tensors (what a DataLoader
    collates a tuple dataset into). Several: any other list or iterable (a DataLoader, a
    generator). To pass several single-tensor batches, concatenate them or pass
    ``iter([x1, x2])``.

    Raises:
        TypeError: ``data`` is neither.
        ValueError: it holds no batch.
    """
    if isinstance(data, (Tensor, tuple, Mapping)):
        return [_plain(data)]
    if isinstance(data, list) and data and all(isinstance(t, Tensor) for t in data):
        return [data]
    if isinstance(data, (str, bytes)) or not isinstance(data, Iterable):
        raise TypeError(
            "data must be a batch (tensors in a tuple, list or dict, nested as you like) or a "
            f"list / DataLoader of such batches, got {type(data).__name__}")
    batches = [_plain(b) for b in data]
    if not batches:
        raise ValueError("data holds no batches")
    return batches


def _leaves(batch: Any, where: str) -> tuple[list[tuple[str, Tensor]], Any]:
    """The named tensors of ``batch`` and its structure; refuses anything that is not one."""
    with_paths, spec = pytree.tree_flatten_with_path(batch)
    if not with_paths:
        raise ValueError(f"{where} holds no tensors")
    named = []
    for path, leaf in with_paths:
        name = pytree.keystr(path) or "the batch"
        if not isinstance(leaf, Tensor):
            raise TypeError(
                f"{where}: {name} is of type {type(leaf).__name__}, not a tensor; a probe batch holds "
                "tensors only (examples along dim 0): convert it with torch.as_tensor or drop it")
        if leaf.dim() == 0:
            raise ValueError(
                f"{where}: {name} is a 0-dimensional tensor; every tensor of a batch needs the "
                "examples along dim 0")
        named.append((name, leaf))
    return named, spec


def num_examples(batch: Any, where: str = "the batch") -> int:
    """Examples in ``batch``: the shared dim-0 size of its tensors (checked)."""
    named, _ = _leaves(batch, where)
    first_name, first = named[0]
    for name, leaf in named[1:]:
        if leaf.shape[0] != first.shape[0]:
            raise ValueError(
                f"{where}: {name} has {leaf.shape[0]} examples (dim 0) but {first_name} has "
                f"{first.shape[0]}; every tensor of a batch holds the same examples along dim 0")
    return first.shape[0]


def concat_batches(batches: list[Any]) -> tuple[Any, int]:
    """One batch of all ``batches`` (same structure each), concatenated along dim 0 (a copy), and its size."""
    specs = []
    for i, b in enumerate(batches):
        num_examples(b, f"batch {i}")
        specs.append(pytree.tree_structure(b))
    for i, spec in enumerate(specs[1:], start=1):
        if spec != specs[0]:
            raise ValueError(
                f"batch {i} is structured as {describe(batches[i])} but batch 0 as "
                f"{describe(batches[0])}: every batch needs the same keys and nesting")
    # Concatenating copies even a single batch: the probe is fixed, whatever happens to the
    # caller's tensors afterwards.
    columns = zip(*(pytree.tree_leaves(b) for b in batches))
    try:
        leaves = [torch.cat(list(column)) for column in columns]
    except RuntimeError as err:
        raise ValueError(f"the batches cannot be concatenated along dim 0: {err}") from err
    batch = pytree.tree_unflatten(leaves, specs[0])
    size = num_examples(batch)
    if size == 0:
        raise ValueError("data holds no examples")
    return batch, size


def select(batch: Any, index: Tensor | slice) -> Any:
    """The examples ``index`` (indices or a slice along dim 0) of every tensor of ``batch``."""
    return pytree.tree_map(lambda t: t[index], batch)


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor on ``device`` (tensors already there are not copied)."""
    return pytree.tree_map(lambda t: t.to(device), batch)


def describe(batch: Any) -> str:
    """A short description of a batch for messages: each tensor's path, dtype and shape."""
    try:
        with_paths, _ = pytree.tree_flatten_with_path(batch)
    except Exception:  # a description must never raise
        return type(batch).__name__
    parts = []
    for path, leaf in with_paths[:8]:
        name = pytree.keystr(path) or "tensor"
        what = (f"{str(leaf.dtype).removeprefix('torch.')} {tuple(leaf.shape)}"
                if isinstance(leaf, Tensor) else type(leaf).__name__)
        parts.append(f"{name}: {what}")
    more = f", … {len(with_paths) - 8} more" if len(with_paths) > 8 else ""
    return "{" + ", ".join(parts) + more + "}"
