"""PyTorch Lightning callback: break-even measurements for a ``Trainer.fit`` run.

Add :class:`BreakEvenCallback` to the trainer's callbacks and nothing else changes: when
training starts it builds a probe from a fixed random subset of the train dataloader's
dataset, attaches a :class:`~sgdbreak.BreakEvenMonitor` to the optimizer returned by
``configure_optimizers`` (or uses the monitor of a ``BreakEvenSGD``/``BreakEvenAdam(W)``),
logs every record and the break-even event to the trainer's loggers, checkpoints the
measurements in Lightning checkpoints, measures the global probe under the DDP strategy
(:class:`~sgdbreak.DistributedProbe`) and can drive :class:`~sgdbreak.BreakEvenWarmup`.

Needs ``lightning`` (or the older ``pytorch_lightning``): ``pip install 'sgdbreak[lightning]'``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset, default_collate

from ..measurement.monitor import _SETTINGS, BreakEvenMonitor
from ..measurement.probe import Probe
from ..optim.warmup import BreakEvenWarmup
from .distributed_probe import DistributedProbe
from .loggers import _split_record
from .summaries import _number

try:
    import lightning.pytorch as pl
except ImportError:
    try:
        import pytorch_lightning as pl  # type: ignore[no-redef]  # the pre-2.0 package name
    except ImportError as err:
        raise ImportError(
            "sgdbreak.integrations.lightning needs PyTorch Lightning: pip install 'sgdbreak[lightning]'"
        ) from err

__all__ = ["BreakEvenCallback"]

_MONITOR_ARGS = frozenset(
    name for name in inspect.signature(BreakEvenMonitor).parameters if name not in ("probe", "optimizer", "settings")
) | frozenset(_SETTINGS)


class BreakEvenCallback(pl.Callback):
    """Measure λ1^H, the gradient noise and break-even in a Lightning ``Trainer.fit`` run.

    At ``on_train_start`` (after ``configure_optimizers``, the DDP set-up and any checkpoint
    restore) the callback

    * builds the probe, unless one is given: ``probe_size`` examples drawn once, with
      ``seed``, from the train dataloader's dataset and collated by its ``collate_fn``,
      measured with ``criterion(module(inputs), targets)`` (``criterion=``, or the
      LightningModule's ``criterion`` attribute). Under a strategy with several processes
      it is a :class:`~sgdbreak.DistributedProbe` over the same subset on every process
      (``split=True``), so every process records the same numbers;
    * attaches a :class:`~sgdbreak.BreakEvenMonitor` built with ``monitor_settings`` to the
      optimizer ``optimizer_index`` of ``configure_optimizers`` (a measuring optimizer, e.g.
      ``BreakEvenSGD`` with a probe, keeps its own monitor), exposed as :attr:`monitor`;
    * with ``warmup``, builds a :class:`~sgdbreak.BreakEvenWarmup` on that optimizer and
      steps it after every optimizer step (exposed as :attr:`warmup`).

    Every record goes to each of ``trainer.loggers`` (``log_metrics`` at step
    ``record["step"]``, the optimizer step, i.e. ``trainer.global_step``; keys prefixed with
    ``log_prefix``; spectra as ``spectrum/H_i``), on global rank 0. The break-even event
    logs ``break_even_step`` (value: the break-even step). After each training batch with a
    new record the latest values of every key are also logged with ``self.log`` (not to the
    loggers, which already have every record), so they are in ``trainer.callback_metrics``
    for ``ModelCheckpoint``/``EarlyStopping``, and ``prog_bar`` keys in the progress bar.
    The monitor and warmup state travel in Lightning checkpoints (the callback's
    ``state_dict``), so ``trainer.fit(ckpt_path=...)`` resumes the measurements exactly.

    Args:
        probe: a :class:`~sgdbreak.Probe` to measure on (default: built as above).
        probe_size: examples in the probe built from the train dataloader (the paper uses
            5 % of the training set); all of them if the dataset is smaller.
        criterion: ``criterion(outputs, targets) -> mean loss`` for batches ``(inputs, targets)``
            (default: ``pl_module.criterion``).
        loss_fn: ``loss_fn(module, batch) -> mean loss`` for batches of any structure
            (needs a Probe that takes ``loss_fn=``); not together with ``criterion``.
        probe_kwargs: more keywords for the probe (``chunk_size``, ``batchnorm``, ``forward``, …).
        optimizer_index: which optimizer of ``configure_optimizers`` to measure.
        warmup: False, True, or the keywords of :class:`~sgdbreak.BreakEvenWarmup`
            (``margin``, ``backoff``, …, and ``after``: a function ``optimizer -> scheduler``
            building the scheduler to hand over to). A scheduler returned by
            ``configure_optimizers`` for the same optimizer is refused: move it to ``after``.
        log_prefix: prepended to every logged key.
        prog_bar: record keys shown in the progress bar.
        **monitor_settings: keywords of :class:`~sgdbreak.BreakEvenMonitor` (``quantities``,
            ``measure_every``, ``cheap_every``, ``loggers``, ``seed``, ``steps_per_epoch``,
            ``measurements``, …). ``seed`` also draws the probe subset. ``steps_per_epoch``
            defaults to the trainer's optimizer steps per epoch. ``loggers`` are used on
            global rank 0 only.
    """

    def __init__(
        self,
        probe: Probe | None = None,
        *,
        probe_size: int = 512,
        criterion: Callable[[Tensor, Tensor], Tensor] | None = None,
        loss_fn: Callable[[nn.Module, Any], Tensor] | None = None,
        probe_kwargs: Mapping[str, Any] | None = None,
        optimizer_index: int = 0,
        warmup: bool | Mapping[str, Any] = False,
        log_prefix: str = "sgdbreak/",
        prog_bar: Iterable[str] = (),
        **monitor_settings: Any,
    ) -> None:
        super().__init__()
        if probe is not None and not isinstance(probe, Probe):
            raise TypeError(f"probe must be a sgdbreak.Probe or None, got {type(probe).__name__}")
        if probe is not None and (criterion is not None or loss_fn is not None or probe_kwargs):
            raise TypeError("criterion, loss_fn and probe_kwargs build a probe: not together with probe=")
        if criterion is not None and loss_fn is not None:
            raise TypeError("pass criterion= (batches (inputs, targets)) or loss_fn= (any batch), not both")
        for name, fn in (("criterion", criterion), ("loss_fn", loss_fn)):
            if fn is not None and not callable(fn):
                raise TypeError(f"{name} must be callable, got {type(fn).__name__}")
        if isinstance(probe_size, bool) or not isinstance(probe_size, int) or probe_size < 2:
            raise ValueError(f"probe_size must be an int >= 2, got {probe_size!r}")
        if isinstance(optimizer_index, bool) or not isinstance(optimizer_index, int) or optimizer_index < 0:
            raise ValueError(f"optimizer_index must be an int >= 0, got {optimizer_index!r}")
        if not isinstance(warmup, (bool, Mapping)):
            raise TypeError(f"warmup must be a bool or a mapping of BreakEvenWarmup keywords, got {warmup!r}")
        if not isinstance(log_prefix, str):
            raise TypeError(f"log_prefix must be a str, got {type(log_prefix).__name__}")
        unknown = sorted(set(monitor_settings) - _MONITOR_ARGS)
        if unknown:
            raise TypeError(f"BreakEvenCallback got unexpected keyword arguments {unknown} "
                            f"(monitor settings are {sorted(_MONITOR_ARGS)})")
        self.probe = probe
        self.probe_size = probe_size
        self.criterion = criterion
        self.loss_fn = loss_fn
        self.probe_kwargs = dict(probe_kwargs or {})
        self.optimizer_index = optimizer_index
        self.warmup_settings: dict[str, Any] | None = (
            None if warmup is False else ({} if warmup is True else dict(warmup)))
        self.log_prefix = log_prefix
        self.prog_bar = frozenset(prog_bar)
        self.monitor_settings = monitor_settings
        self.monitor: BreakEvenMonitor | None = None
        """The run's monitor (None until training starts)."""
        self.warmup: BreakEvenWarmup | None = None
        """The warmup scheduler when ``warmup`` is on (None until training starts)."""
        self._bridge: _LightningLoggers | None = None
        self._owns_attachment = False
        self._pending_state: dict[str, Any] | None = None
        self._logged_records = 0

    # ------------------------------------------------------------------ set-up
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        """Build the probe and the monitor, attach it, restore a checkpointed state."""
        optimizers = trainer.optimizers
        if not 0 <= self.optimizer_index < len(optimizers):
            raise ValueError(f"optimizer_index={self.optimizer_index}, but configure_optimizers returned "
                             f"{len(optimizers)} optimizer(s)")
        optimizer = optimizers[self.optimizer_index]
        self._bridge = _LightningLoggers(trainer, self.log_prefix)
        own = getattr(optimizer, "monitor", None)
        if isinstance(own, BreakEvenMonitor):
            if self.probe is not None or self.monitor_settings:
                raise ValueError(f"{type(optimizer).__name__} measures with its own monitor: give the probe "
                                 "and monitor settings to it, or configure a plain torch optimizer")
            monitor = own
            self._owns_attachment = False
        else:
            if self.monitor is None:
                probe = self.probe if self.probe is not None else self._build_probe(trainer, pl_module)
                settings = dict(self.monitor_settings)
                settings.setdefault("steps_per_epoch", _steps_per_epoch(trainer))
                if not trainer.is_global_zero:  # files and tracker runs are written once, by rank 0
                    settings["loggers"] = []
                monitor = BreakEvenMonitor(probe, **settings)
            else:  # a second fit() with the same callback continues the measurements
                monitor = self.monitor
            monitor.attach(optimizer)
            self._owns_attachment = True
        if self._bridge not in monitor.loggers:
            monitor.loggers.append(self._bridge)
        self.monitor = monitor
        if self.warmup_settings is not None and self.warmup is None:
            self.warmup = self._build_warmup(trainer, optimizer, monitor)
        if self._pending_state is not None:
            self._load(self._pending_state)
            self._pending_state = None
        self._logged_records = len(monitor.history)

    def _build_probe(self, trainer: Any, pl_module: Any) -> Probe:
        """A probe over a fixed random subset of the train dataloader's dataset."""
        world = int(getattr(trainer, "world_size", 1) or 1)
        seed = int(self.monitor_settings.get("seed", 0))
        batch = _probe_batch(_train_loader(trainer), self.probe_size, seed, multiple_of=world)
        kwargs = dict(self.probe_kwargs)
        cls: type[Probe] = Probe
        if world > 1:
            cls, kwargs = DistributedProbe, {"split": True, **kwargs}
        if self.loss_fn is not None:
            return cls(pl_module, data=batch, loss_fn=self.loss_fn, **kwargs)
        criterion = self.criterion if self.criterion is not None else getattr(pl_module, "criterion", None)
        if not callable(criterion):
            raise ValueError(
                "BreakEvenCallback needs the loss to measure: pass criterion= (e.g. nn.CrossEntropyLoss()) "
                "or loss_fn=, give the LightningModule a `criterion` attribute, or pass probe=")
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2
                and all(isinstance(t, Tensor) for t in batch)):
            raise TypeError("with criterion=, the train dataloader must yield (inputs, targets) tensor pairs; "
                            f"got a batch of type {type(batch).__name__}: pass loss_fn= or probe=")
        return cls(pl_module, criterion, tuple(batch), **kwargs)

    def _build_warmup(self, trainer: Any, optimizer: torch.optim.Optimizer,
                      monitor: BreakEvenMonitor) -> BreakEvenWarmup:
        settings = dict(self.warmup_settings or {})
        configured = [c for c in getattr(trainer, "lr_scheduler_configs", [])
                      if getattr(c.scheduler, "optimizer", None) is optimizer]
        if configured:
            raise ValueError(
                "warmup= and a learning-rate scheduler from configure_optimizers both set the lr: "
                "return no scheduler and pass warmup={'after': lambda optimizer: YourScheduler(optimizer, ...)}")
        after = settings.pop("after", None)
        if after is not None:
            if not callable(after):
                raise TypeError(f"warmup['after'] must be a function optimizer -> scheduler, got {after!r}")
            after = after(optimizer)
        return BreakEvenWarmup(optimizer, after=after, monitor=monitor, **settings)

    # ------------------------------------------------------------------ each batch
    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Step the warmup; put the latest measured values into ``callback_metrics``."""
        monitor = self.monitor
        if monitor is None:
            return
        if self.warmup is not None:
            self.warmup.step()  # once per optimizer step: repeated calls in a step do nothing
        if len(monitor.history) == self._logged_records:
            return
        self._logged_records = len(monitor.history)
        values = {k: v for k, v in monitor.as_dict().items() if math.isfinite(v)}
        for key, value in values.items():
            pl_module.log(f"{self.log_prefix}{key}", value, on_step=True, on_epoch=False, logger=False,
                          prog_bar=key in self.prog_bar, batch_size=1)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        """Remove the step hooks and the logger bridge; close the user's loggers."""
        self._release(close=True)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        """Remove the step hooks so a failed run leaves the optimizer as it was."""
        self._release(close=False)

    def _release(self, *, close: bool) -> None:
        monitor = self.monitor
        if monitor is None:
            return
        if self._owns_attachment:
            monitor.detach()
            self._owns_attachment = False
        if self._bridge in monitor.loggers:
            monitor.loggers.remove(self._bridge)
        if close:
            monitor.close()

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The monitor's and the warmup's state (stored by Lightning under this callback's key)."""
        if self.monitor is None:
            return dict(self._pending_state or {})
        state: dict[str, Any] = {"monitor": self.monitor.state_dict()}
        if self.warmup is not None:
            state["warmup"] = self.warmup.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; before training starts it is kept until the monitor exists."""
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"BreakEvenCallback state must be a mapping, got {type(state_dict).__name__}")
        if self.monitor is None:
            self._pending_state = dict(state_dict)
        else:
            self._load(state_dict)

    def _load(self, state: Mapping[str, Any]) -> None:
        assert self.monitor is not None
        if "monitor" in state:
            self.monitor.load_state_dict(state["monitor"])
        if "warmup" in state:
            if self.warmup is None:
                raise ValueError("the checkpoint holds a BreakEvenWarmup state but this callback has warmup=False")
            self.warmup.load_state_dict(state["warmup"])
            # The lr in force when the checkpoint was written (building the warmup reset it).
            for group, lr in zip(self.warmup.optimizer.param_groups, self.warmup.get_last_lr()):
                group["lr"] = lr


class _LightningLoggers:
    """A sgdbreak logger that forwards records and the break-even event to ``trainer.loggers``."""

    def __init__(self, trainer: Any, prefix: str) -> None:
        self.trainer = trainer
        self.prefix = prefix
        self._last_step = 0
        self._break_even_logged = False

    def _log(self, metrics: dict[str, float], step: int) -> None:
        if not self.trainer.is_global_zero or not metrics:
            return
        for logger in self.trainer.loggers:
            logger.log_metrics(metrics, step=step)

    def log_measurement(self, record: Mapping[str, Any]) -> None:
        scalars, _ = _split_record(record, spectra=True)
        step = _number(record.get("step"))
        step = self._last_step if step is None else int(step)
        self._last_step = max(self._last_step, step)
        metrics = {f"{self.prefix}{k}": float(v) for k, v in scalars.items() if not isinstance(v, str)}
        self._log(metrics, step)

    def log_event(self, event: Mapping[str, Any]) -> None:
        if event.get("event") != "break_even" or self._break_even_logged:
            return
        self._break_even_logged = True
        step = _number(event.get("step"))
        if step is not None:
            self._log({f"{self.prefix}break_even_step": step}, max(int(step), self._last_step))

    def close(self) -> None:
        for logger in self.trainer.loggers if self.trainer.is_global_zero else []:
            logger.save()


def _steps_per_epoch(trainer: Any) -> int | None:
    """Optimizer steps per epoch of ``trainer`` (None for an unsized dataloader)."""
    batches = getattr(trainer, "num_training_batches", math.inf)
    if not isinstance(batches, int) or batches < 1:
        return None
    return max(1, math.ceil(batches / max(1, int(getattr(trainer, "accumulate_grad_batches", 1)))))


def _train_loader(trainer: Any) -> DataLoader:
    """The train DataLoader of a running fit (Lightning 2 wraps it in a CombinedLoader)."""
    loader = trainer.train_dataloader
    loader = getattr(loader, "iterables", loader)
    if isinstance(loader, Mapping) and len(loader) == 1:
        loader = next(iter(loader.values()))
    if isinstance(loader, (list, tuple)) and len(loader) == 1:
        loader = loader[0]
    if not isinstance(loader, DataLoader):
        raise TypeError("BreakEvenCallback builds its probe from one train DataLoader, got "
                        f"{type(loader).__name__}: pass probe=")
    return loader


def _probe_batch(loader: DataLoader, size: int, seed: int, *, multiple_of: int = 1) -> Any:
    """``size`` examples of the loader's dataset, drawn once with ``seed``, as one collated batch.

    An iterable dataset gives its first ``size`` examples instead. The count is rounded
    down to a multiple of ``multiple_of`` (the processes sharing a distributed probe).
    """
    dataset = loader.dataset
    collate = loader.collate_fn if loader.batch_size is not None else default_collate
    if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
        examples = []
        for example in cast(Iterable[Any], dataset):
            examples.append(example)
            if len(examples) == size:
                break
    else:
        n = len(dataset)
        chosen = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:min(size, n)]
        examples = [dataset[i] for i in chosen.tolist()]
    count = len(examples) - len(examples) % multiple_of
    if count < 2:
        raise ValueError(f"the train dataset gave {len(examples)} examples for the probe: need at least "
                         f"2 (and {multiple_of} per process)")
    return collate(examples[:count])
