"""BreakEvenCallback: sgdbreak inside a PyTorch Lightning ``Trainer.fit`` run (CPU)."""

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("lightning", reason="needs the [lightning] extra: pip install -e '.[lightning]'")

from lightning.pytorch import Trainer  # noqa: E402
from lightning.pytorch.loggers import CSVLogger  # noqa: E402

from sgdbreak import BreakEvenDetector, BreakEvenSGD, DistributedProbe, Probe  # noqa: E402
from sgdbreak.integrations.lightning import BreakEvenCallback  # noqa: E402
from sgdbreak.testing import model_hessian  # noqa: E402

SCRIPTS = Path(__file__).parent / "lightning_scripts"
sys.path.insert(0, str(SCRIPTS))
from tiny import TinyClassifier, dataset, loader  # noqa: E402

HESSIAN_ONLY = {"measure_every": 2, "cheap_every": None, "measurements": ("hessian",)}


def fires_at_first_measurement():
    return BreakEvenDetector(rules=("stability",), stability_keys=("stability_ratio",), stability_threshold=1e-9)


def trainer(tmp_path, max_steps=6, callbacks=(), **kwargs):
    kwargs.setdefault("logger", False)
    return Trainer(accelerator="cpu", devices=1, max_steps=max_steps, callbacks=list(callbacks),
                   enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                   default_root_dir=tmp_path, **kwargs)


def without_time(records):
    return [{k: v for k, v in r.items() if k != "measure_seconds"} for r in records]


def test_measures_the_configured_optimizer_and_logs_every_record(tmp_path):
    cb = BreakEvenCallback(probe_size=40, detector=fires_at_first_measurement(), hessian_tol=1e-8,
                           max_hvps=100, seed=5, prog_bar=("lambda1_H",), **HESSIAN_ONLY)
    module = TinyClassifier()
    logger = CSVLogger(tmp_path, name="csv")
    t = trainer(tmp_path, callbacks=[cb], logger=logger, log_every_n_steps=50)
    t.fit(module, loader())

    monitor = cb.monitor
    assert monitor.step == t.global_step == 6
    assert [r["step"] for r in monitor.history] == [2, 4, 6]
    assert monitor.optimizer is t.optimizers[0]
    assert monitor.break_even.reached and monitor.break_even.step == 2
    assert monitor.history[0]["epoch"] == pytest.approx(2 / 6)
    # The probe: 40 distinct examples of the training set, drawn with the seed.
    probe = monitor.probe
    assert type(probe) is Probe and probe.num_examples == 40
    x_all, _ = dataset().tensors
    rows = {tuple(row.tolist()) for row in x_all}
    assert all(tuple(row.tolist()) in rows for row in probe.inputs)
    assert len({tuple(row.tolist()) for row in probe.inputs}) == 40
    assert not torch.equal(probe.inputs, x_all[:40])  # random, not the first examples
    # The last record is the exact λ1^H of the final model on the probe.
    h = model_hessian(module, module.criterion, probe.inputs, probe.targets)
    assert monitor.history[-1]["lambda1_H"] == pytest.approx(float(torch.linalg.eigvalsh(h)[-1]), rel=1e-5)
    # Every record reached the logger at its own step (Lightning alone logs every 50 steps).
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("sgdbreak/lambda1_H")]
    logged = {int(r["step"]): float(r["sgdbreak/lambda1_H"]) for r in rows}
    assert logged == pytest.approx({int(r["step"]): r["lambda1_H"] for r in monitor.history})
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        marks = [r for r in csv.DictReader(f) if r.get("sgdbreak/break_even_step")]
    assert [float(r["sgdbreak/break_even_step"]) for r in marks] == [2.0]
    # The latest values are in callback_metrics (for ModelCheckpoint / EarlyStopping).
    assert float(t.callback_metrics["sgdbreak/lambda1_H"]) == pytest.approx(monitor.history[-1]["lambda1_H"])
    assert float(t.callback_metrics["sgdbreak/break_even_reached"]) == 1.0
    assert float(t.progress_bar_metrics["sgdbreak/lambda1_H"]) == pytest.approx(monitor.history[-1]["lambda1_H"])
    # After fit the optimizer is a plain optimizer again.
    assert not t.optimizers[0]._optimizer_step_post_hooks


def test_training_is_the_same_with_and_without_the_callback(tmp_path):
    plain, measured = TinyClassifier(), TinyClassifier()
    trainer(tmp_path).fit(plain, loader())
    trainer(tmp_path, callbacks=[BreakEvenCallback(probe_size=32, **HESSIAN_ONLY)]).fit(measured, loader())
    for a, b in zip(plain.parameters(), measured.parameters()):
        assert torch.equal(a, b)


def test_a_measuring_optimizer_keeps_its_own_monitor(tmp_path):
    def make(module):
        probe = Probe(module, nn.CrossEntropyLoss(), dataset(24).tensors)
        return BreakEvenSGD(module.parameters(), lr=0.3, probe=probe, **HESSIAN_ONLY)

    cb = BreakEvenCallback()
    module = TinyClassifier(optimizer=make)
    t = trainer(tmp_path, callbacks=[cb])
    t.fit(module, loader())
    assert cb.monitor is t.optimizers[0].monitor
    assert [r["step"] for r in cb.monitor.history] == [2, 4, 6]  # measured once per step, not twice
    with pytest.raises(ValueError, match="its own monitor"):
        trainer(tmp_path, callbacks=[BreakEvenCallback(measure_every=3)]).fit(TinyClassifier(optimizer=make),
                                                                              loader())


def test_resuming_from_a_lightning_checkpoint_continues_the_measurements_exactly(tmp_path):
    settings = dict(probe_size=32, measure_every=2, cheap_every=3, seed=2)
    full = BreakEvenCallback(**settings)
    trainer(tmp_path, max_steps=-1, max_epochs=2, callbacks=[full]).fit(TinyClassifier(), loader())

    first = BreakEvenCallback(**settings)
    t1 = trainer(tmp_path, max_steps=-1, max_epochs=1, callbacks=[first])
    t1.fit(TinyClassifier(), loader())
    ckpt = tmp_path / "six.ckpt"
    t1.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=False)["callbacks"]
    assert any("monitor" in state for state in saved.values())

    resumed = BreakEvenCallback(**settings)
    # (Lightning resumes training exactly from an epoch boundary, not from max_steps.)
    trainer(tmp_path, max_steps=-1, max_epochs=2, callbacks=[resumed]).fit(TinyClassifier(seed=99), loader(),
                                                                          ckpt_path=ckpt)
    assert resumed.monitor.step == 12
    assert without_time(resumed.monitor.history) == without_time(full.monitor.history)
    assert resumed.monitor.probe.num_examples == 32


def test_drives_break_even_warmup(tmp_path):
    cb = BreakEvenCallback(probe_size=32, warmup={"margin": 0.5}, measure_every=1, cheap_every=None,
                           measurements=("hessian",))
    t = trainer(tmp_path, max_steps=4, callbacks=[cb])
    t.fit(TinyClassifier(lr=50.0), loader())
    events = [e["event"] for e in cb.monitor.events]
    assert events[0] == "warmup_start"
    assert cb.warmup is not None and cb.warmup.monitor is cb.monitor
    # The lr in force is half the edge of the latest measurement, far below the target of 50.
    last = cb.monitor.history[-1]
    edge = last["lr"] / last["stability_ratio"]
    assert t.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.5 * edge, rel=1e-6)
    assert t.optimizers[0].param_groups[0]["lr"] < 50.0
    assert "warmup" in cb.state_dict()


def test_warmup_refuses_a_configured_scheduler(tmp_path):
    cb = BreakEvenCallback(probe_size=32, warmup=True, **HESSIAN_ONLY)
    with pytest.raises(ValueError, match="after"):
        trainer(tmp_path, callbacks=[cb]).fit(TinyClassifier(scheduler=True), loader())
    assert not cb.monitor._attached  # the failed run left the optimizer plain


def test_criterion_argument_and_a_missing_loss(tmp_path):
    calls = []

    def criterion(out, y):
        calls.append(len(y))
        return nn.functional.cross_entropy(out, y)

    cb = BreakEvenCallback(probe_size=32, criterion=criterion, probe_kwargs={"chunk_size": 16}, **HESSIAN_ONLY)
    trainer(tmp_path, max_steps=2, callbacks=[cb]).fit(TinyClassifier(), loader())
    assert 16 in calls and max(calls) == 16  # the probe evaluates in chunks of chunk_size

    module = TinyClassifier()
    del module.criterion
    module.training_step = lambda batch, i: nn.functional.cross_entropy(module(batch[0]), batch[1])
    with pytest.raises(ValueError, match="criterion="):
        trainer(tmp_path, max_steps=2, callbacks=[BreakEvenCallback(**HESSIAN_ONLY)]).fit(module, loader())


@pytest.mark.parametrize("kwargs, error", [
    ({"probe_size": 1}, ValueError), ({"optimizer_index": -1}, ValueError), ({"warmup": "yes"}, TypeError),
    ({"criterion": 3}, TypeError), ({"criterion": nn.MSELoss(), "loss_fn": lambda m, b: 0}, TypeError),
    ({"measure_evry": 2}, TypeError), ({"probe": "data"}, TypeError), ({"log_prefix": 1}, TypeError),
])
def test_bad_arguments_are_refused_when_built(kwargs, error):
    with pytest.raises(error):
        BreakEvenCallback(**kwargs)


def test_probe_with_probe_building_arguments_is_refused():
    probe = Probe(nn.Linear(6, 3), nn.CrossEntropyLoss(), dataset(8).tensors)
    with pytest.raises(TypeError, match="not together"):
        BreakEvenCallback(probe, criterion=nn.CrossEntropyLoss())


def test_loss_fn_builds_a_general_probe(tmp_path):

    cb = BreakEvenCallback(probe_size=32, loss_fn=lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]),
                           hessian_tol=1e-8, max_hvps=100, **HESSIAN_ONLY)
    module = TinyClassifier()
    trainer(tmp_path, max_steps=2, callbacks=[cb]).fit(module, loader())
    x, y = torch.utils.data.default_collate([dataset()[i] for i in
                                             torch.randperm(96, generator=torch.Generator().manual_seed(0))[:32]])
    h = model_hessian(module, module.criterion, x, y)
    assert cb.monitor.history[-1]["lambda1_H"] == pytest.approx(float(torch.linalg.eigvalsh(h)[-1]), rel=1e-5)


@pytest.mark.slow
@pytest.mark.distributed
def test_ddp_strategy_on_two_cpu_processes_measures_the_global_probe(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SCRIPTS), str(Path(__file__).parents[1])]),
           "OMP_NUM_THREADS": "1"}
    env.pop("MASTER_PORT", None)
    proc = subprocess.run([sys.executable, str(SCRIPTS / "ddp_fit.py"), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r in ranks:
        assert r["world_size"] == r["dist_world_size"] == 2
        assert r["probe"] == DistributedProbe.__name__
        assert r["probe_examples"] == 48 and r["local_examples"] == 24
        assert r["step"] == r["global_step"] == 6
    assert ranks[0]["history"] == ranks[1]["history"]  # every process records the same numbers
    assert [rec["step"] for rec in ranks[0]["history"]] == [2, 4, 6]
    # A logger given with loggers= runs on rank 0 only.
    assert (tmp_path / "logged_rank0.txt").read_text().split() == ["2", "4", "6"]
    assert not (tmp_path / "logged_rank1.txt").exists()
    exact = ranks[0]["exact_lambda1_H"]
    assert math.isclose(ranks[0]["history"][-1]["lambda1_H"], exact, rel_tol=1e-5)
