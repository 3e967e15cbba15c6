"""Hugging Face ``Trainer``: ``BreakEvenTrainerCallback`` measures the Trainer's own optimizer.

Add the callback and nothing else changes::

    trainer = Trainer(model, args, train_dataset=train, data_collator=collator,
                      callbacks=[BreakEvenTrainerCallback()])

At ``on_train_begin`` it builds a :class:`~sgdbreak.Probe` from a fixed random subset of the
training set, collated by the Trainer's data collator, whose loss is the model's own output
``.loss`` (what the Trainer minimises); attaches a :class:`~sgdbreak.BreakEvenMonitor` to the
Trainer's torch optimizer (AdamW by default, so the monitor measures the preconditioned
sharpness ``lambda1_PH`` and Adam's stability ratio as well as ``lambda1_H``); hands every
record to ``Trainer.log`` (so it lands in ``trainer.state.log_history`` and every
``report_to`` integration, with keys prefixed ``sgdbreak/``); logs break-even as an event;
and saves the monitor's state in each checkpoint folder (``sgdbreak_monitor.pt``), from which
a resumed run continues. Needs ``pip install 'sgdbreak[transformers]'`` (without it the
module imports, and building the callback raises an ``ImportError`` naming the extra).
"""

from __future__ import annotations

import inspect
import logging
import os
import warnings
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .. import _validation as V
from ..measurement.monitor import BreakEvenMonitor
from ..measurement.probe import Probe
from ..optim.wrappers import unwrap_optimizer

_MISSING: ImportError | None = None
if TYPE_CHECKING:
    from transformers import TrainerCallback
else:
    try:
        from transformers import TrainerCallback
    except ImportError as err:  # the module still imports (docs, doctests); the callback refuses
        TrainerCallback, _MISSING = object, err

__all__ = ["STATE_FILE", "BreakEvenTrainerCallback", "model_output_loss"]

STATE_FILE = "sgdbreak_monitor.pt"
"""The monitor's state in each Trainer checkpoint folder (``torch.save`` of ``state_dict()``)."""

logger = logging.getLogger(__name__)


def model_output_loss(model: nn.Module, batch: Mapping[str, Any]) -> Tensor:
    """The loss a Hugging Face model computes itself: ``model(**batch).loss``.

    The probe's default ``loss_fn`` (the batch must hold the labels). A dict output gives
    ``["loss"]``, a tuple output its first element, as the Trainer reads them.
    """
    outputs = model(**batch)
    if isinstance(outputs, Mapping):
        loss = outputs.get("loss")
    elif isinstance(outputs, tuple):
        loss = outputs[0] if outputs else None
    else:
        loss = getattr(outputs, "loss", None)
    if loss is None:
        raise ValueError(
            f"the model returned no loss for a probe batch with keys {sorted(batch)}: the probe "
            "needs the labels in the batch (or pass loss_fn= to BreakEvenTrainerCallback)")
    return loss


def _find_trainer() -> tuple[Any | None, str | None]:
    """The ``transformers.Trainer`` calling this callback, and the checkpoint it resumes from.

    A callback is not given its Trainer, but only ``Trainer.log`` reaches both the log
    history and the ``report_to`` integrations; the checkpoint is the resolved
    ``resume_from_checkpoint`` of the Trainer's training loop (a folder), if any.
    """
    from transformers import Trainer

    frame = inspect.currentframe()
    trainer, checkpoint = None, None
    try:
        depth = 0
        while frame is not None and depth < 30:
            owner = frame.f_locals.get("self")
            if isinstance(owner, Trainer):
                trainer = trainer or owner
                resume = frame.f_locals.get("resume_from_checkpoint")
                if checkpoint is None and isinstance(resume, (str, os.PathLike)):
                    checkpoint = os.fspath(resume)
            frame, depth = frame.f_back, depth + 1
        return trainer, checkpoint
    finally:
        del frame


class BreakEvenTrainerCallback(TrainerCallback):
    """Tracks λ1^H (and λ1_PH under Adam), the gradient noise and break-even in a ``Trainer`` run.

    Args:
        probe: a :class:`~sgdbreak.Probe` (or :class:`~sgdbreak.DistributedProbe`) to
            measure on; default: built at ``on_train_begin`` from ``probe_size`` random
            training examples (fixed by ``seed``), collated by the Trainer's data collator
            in one batch (so padding is common), with ``loss_fn``.
        probe_size: examples in the default probe (at most the training set).
        chunk_size: probe examples per forward pass (default the Trainer's
            ``per_device_train_batch_size``: the memory training needs).
        loss_fn: ``loss_fn(model, batch) -> scalar`` mean loss of the default probe
            (default :func:`model_output_loss`: the model's own ``.loss``). A Trainer with a
            custom ``compute_loss`` should pass the same loss here.
        prefix: prepended to every logged key (``sgdbreak/lambda1_H``), so the probe's
            ``loss`` does not collide with the Trainer's.
        seed: picks the probe subset and seeds the monitor's generator.
        **monitor_settings: any :class:`~sgdbreak.BreakEvenMonitor` argument
            (``measure_every``, ``cheap_every``, ``quantities``, ``loggers``, the flat
            settings such as ``noise_samples``, …).

    Attributes:
        monitor: the :class:`~sgdbreak.BreakEvenMonitor`, once training has started.
        probe: the probe it measures on.

    Records reach ``trainer.state.log_history`` and the Trainer's ``report_to``
    integrations through ``Trainer.log`` at the end of the step they were measured in.
    With several processes (DDP) the default probe is a
    :class:`~sgdbreak.DistributedProbe` split over them.
    """

    def __init__(
        self,
        probe: Probe | None = None,
        *,
        probe_size: int = 256,
        chunk_size: int | None = None,
        loss_fn: Callable[[nn.Module, Any], Tensor] = model_output_loss,
        prefix: str = "sgdbreak/",
        seed: int = 0,
        **monitor_settings: Any,
    ):
        if _MISSING is not None:
            raise ImportError(
                "BreakEvenTrainerCallback needs Hugging Face transformers: "
                "pip install 'sgdbreak[transformers]'") from _MISSING
        if probe is not None and not isinstance(probe, Probe):
            raise TypeError(f"probe must be a sgdbreak.Probe or None, got {type(probe).__name__}")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable as loss_fn(model, batch), got {type(loss_fn).__name__}")
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a str, got {type(prefix).__name__}")
        if "optimizer" in monitor_settings:
            raise TypeError("the callback measures the Trainer's optimizer: do not pass optimizer=")
        self.probe = probe
        self.probe_size = V.integer("probe_size", probe_size, 2)
        self.chunk_size = V.optional_integer("chunk_size", chunk_size, 1)
        self.loss_fn = loss_fn
        self.prefix = prefix
        self.seed = V.integer("seed", seed, 0)
        self.monitor_settings = dict(monitor_settings)
        self.monitor: BreakEvenMonitor | None = None
        self._trainer: Any | None = None
        self._pending: list[dict[str, float]] = []
        self._warned: set[str] = set()

    # ------------------------------------------------------------------ set-up
    def on_init_end(self, args, state, control, **kwargs):
        self._trainer = self._trainer or _find_trainer()[0]

    def on_train_begin(self, args, state, control, model=None, optimizer=None, train_dataloader=None,
                       **kwargs):
        trainer, checkpoint = _find_trainer()
        self._trainer = trainer or self._trainer
        if model is None or optimizer is None:
            raise RuntimeError("BreakEvenTrainerCallback needs the Trainer's model and optimizer at "
                               "on_train_begin (transformers >= 4.40)")
        inner = unwrap_optimizer(optimizer)
        if self.monitor is not None:  # a second train() call: follow the Trainer's optimizer
            self.monitor.detach()
            self.monitor.attach(inner)
            return
        if self.probe is None:
            self.probe = self._build_probe(args, model, train_dataloader)
        monitor = self.monitor = BreakEvenMonitor(self.probe, seed=self.seed, **self.monitor_settings)
        monitor.attach(inner)
        monitor.register_measurement_hook(self._pending.append)
        monitor.register_break_even_hook(self._on_break_even)
        if state.global_step > 0:
            self._resume(monitor, args, state, checkpoint)

    def _build_probe(self, args, model: nn.Module, loader) -> Probe:
        """A fixed random subset of the training set, collated once by the Trainer's collator."""
        dataset = getattr(loader, "dataset", None)
        collate = getattr(loader, "collate_fn", None)
        if dataset is None or collate is None or not hasattr(dataset, "__len__") or \
                isinstance(dataset, torch.utils.data.IterableDataset):
            raise ValueError(
                "BreakEvenTrainerCallback builds its probe from a map-style train dataset with a "
                "length; for an iterable dataset pass probe=sgdbreak.Probe(model, data=batch, "
                "loss_fn=...)")
        size = min(self.probe_size, len(dataset))
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(self.seed))
        batch = collate([dataset[int(i)] for i in order[:size].sort().values])
        if isinstance(batch, Mapping):
            batch = {k: v for k, v in batch.items()}
        chunk = self.chunk_size or args.per_device_train_batch_size
        world = torch.distributed.get_world_size() if (
            torch.distributed.is_available() and torch.distributed.is_initialized()) else 1
        if world > 1:
            from .distributed_probe import DistributedProbe

            return DistributedProbe(model, data=batch, loss_fn=self.loss_fn, split=True, uneven="trim",
                                    chunk_size=chunk)
        return Probe(model, data=batch, loss_fn=self.loss_fn, chunk_size=chunk)

    # ------------------------------------------------------------------ logging
    def _on_break_even(self, result) -> None:
        logger.info("sgdbreak: break-even at step %s (%s rule)", result.step, result.rule)
        self._pending.append({"break_even": 1.0, "break_even_step": float(result.step)})

    def on_step_end(self, args, state, control, **kwargs):
        self._flush(state, control)

    def on_train_end(self, args, state, control, **kwargs):
        self._flush(state, control)

    def _flush(self, state, control) -> None:
        """Hand the step's records to ``Trainer.log`` (which clears ``should_log``: kept as it was,
        so the Trainer's own logging at this step still happens)."""
        pending, self._pending[:] = list(self._pending), []
        should_log = control.should_log
        for record in pending:
            logs = {self.prefix + k: float(v) for k, v in record.items() if k != "step"}
            if self._trainer is not None:
                self._trainer.log(logs)
            else:
                self._warn_once("no-trainer", (
                    "BreakEvenTrainerCallback is not called by a transformers.Trainer: records go "
                    "to state.log_history only, not to report_to integrations"))
                state.log_history.append({**logs, "step": state.global_step})
        control.should_log = should_log
        if self._trainer is not None:
            self._trainer.control.should_log = should_log

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(f"sgdbreak: {message}", RuntimeWarning, stacklevel=3)

    # ------------------------------------------------------------------ checkpoints
    def on_save(self, args, state, control, **kwargs):
        if self.monitor is None or not state.is_world_process_zero:
            return
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if os.path.isdir(folder):
            torch.save(self.monitor.state_dict(), os.path.join(folder, STATE_FILE))

    def _resume(self, monitor: BreakEvenMonitor, args, state, checkpoint: str | None) -> None:
        """Load the monitor state saved with the checkpoint the Trainer resumed from."""
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        found = [checkpoint, getattr(args, "resume_from_checkpoint", None),
                 os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")]
        candidates: list[str] = [c for c in dict.fromkeys(found) if isinstance(c, str)]
        for folder in candidates:
            path = os.path.join(folder, STATE_FILE)
            if os.path.isfile(path):
                saved = torch.load(path, map_location="cpu", weights_only=True)
                if int(saved["step"]) == state.global_step:
                    monitor.load_state_dict(saved)
                    return
        self._warn_once("no-state", (
            f"resuming at step {state.global_step} without a saved monitor state (looked for "
            f"{STATE_FILE} in {candidates}): measurements restart from an empty history"))
        monitor.step = state.global_step
