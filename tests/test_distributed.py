"""Distributed measurements: split probes, replica noise and Accelerate wrappers.

The two-process tests launch ``tests/distributed_scripts/worker.py`` once with
``python -m torch.distributed.run --standalone`` (gloo on CPU, a free port) and compare
what each process measured with the other process and with a single process measuring
the union (references computed here, with the same builders). Every multi-process run
asserts its world size.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from sgdbreak import BreakEvenMonitor, BreakEvenSGD, Probe, covariance_spectrum, noise_metrics
from sgdbreak.integrations.accelerate import prepare_monitor
from sgdbreak.integrations.collectives import check_world_size, is_main_process
from sgdbreak.integrations.distributed_probe import DistributedProbe
from sgdbreak.integrations.replica_noise import ReplicaNoise
from sgdbreak.optim.wrappers import unwrap_optimizer

SCRIPTS = Path(__file__).resolve().parent / "distributed_scripts"
sys.path.insert(0, str(SCRIPTS))
import dist_common as C  # noqa: E402

RTOL = 1e-6


def _env() -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="true", PYTHONPATH=str(SCRIPTS.parents[1]))
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _launch(command: list[str], out_dir: Path, timeout: int = 300) -> None:
    proc = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=timeout,
                          cwd=SCRIPTS.parents[1])
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(command)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                    f"{proc.stderr[-6000:]}")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Results of both processes of the worker (one launch for the whole module)."""
    out = tmp_path_factory.mktemp("two_processes")
    _launch([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
             str(C.WORLD), str(SCRIPTS / "worker.py"), str(out)], out)
    results = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(C.WORLD)]
    for r, res in enumerate(results):
        assert res["world_size"] == C.WORLD and res["env_world"] == C.WORLD and res["rank"] == r
    return results


def close(a, b, rtol=RTOL, atol=1e-9) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.allclose(a.double(), b.double(), rtol=rtol, atol=atol)
    return math.isclose(a, b, rel_tol=rtol, abs_tol=atol)


def assert_records_close(got: list[dict], want: list[dict]) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for g, w in zip(got, want):
        keys = set(w) - {"measure_seconds"}
        assert set(g) - {"measure_seconds"} == keys, (g["step"], set(g) ^ set(w))
        for key in keys:
            assert close(g[key], w[key]), (g["step"], key, g[key], w[key])


def without_time(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "measure_seconds"} for r in records]


# --------------------------------------------------------------------------- two processes


@pytest.mark.distributed
def test_processes_are_connected_and_only_rank0_is_main(ranks):
    assert [r["main"] for r in ranks] == [True, False]


@pytest.mark.distributed
def test_probe_measurements_identical_on_both_ranks(ranks):
    a, b = ranks[0]["probe"], ranks[1]["probe"]
    assert set(a) == set(b)
    for key in a:
        if key == "uneven_error":  # raised on every process, naming this process's view
            continue
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


@pytest.mark.distributed
def test_split_probe_equals_single_process_on_the_union(ranks):
    got = ranks[0]["probe"]
    model = C.mlp()
    probe = Probe(model, C.CRITERION, C.probe_data())
    gen = lambda: torch.Generator().manual_seed(11)  # noqa: E731
    assert close(got["loss"], probe.loss_value())
    assert close(got["loss_shards"], probe.loss_value())
    assert close(got["loss_subset"], probe.loss_value(torch.tensor([0, 3, 5, 8, 9, 40])))
    gradient = probe.gradient()
    assert close(got["gradient"], gradient)
    eig = probe.hessian_eigenvalues(k=3, tol=1e-10, max_hvps=200, generator=gen())
    assert close(got["eig_H"], eig.eigenvalues)
    assert close(got["eig_H_chunked"], eig.eigenvalues[:1])
    assert close(got["trace_H"], probe.hessian_trace(num_samples=8, generator=gen()).value)
    s2 = probe.curvature_variance(eig.eigenvectors[0], num_groups=6, generator=gen())
    assert close(got["s2"], s2)
    samples = probe.gradient_samples(num_samples=6, batch_size=5, generator=gen())
    assert close(got["samples"], samples)
    want = noise_metrics(samples, gradient, batch_size=5, k=5)
    assert set(got["noise"]) == set(want)
    for key in want:
        assert close(got["noise"][key], want[key]), key
    assert close(got["per_example"], probe.gradient_samples(method="per_example"))
    # The general form (dict batch, loss_fn) splits and measures the same way.
    assert close(got["dict_eig_H"], eig.eigenvalues)
    assert close(got["dict_samples"], samples)
    assert close(got["dict_per_example"], got["per_example"])


@pytest.mark.distributed
def test_batchnorm_probe_uses_whole_microbatches_and_shard_statistics(ranks):
    got = ranks[0]["probe"]
    x, y = C.probe_data()
    # Train-mode BN: each shard is one chunk (the per-replica statistics DDP training sees).
    ordered = (torch.cat([x[0::2], x[1::2]]), torch.cat([y[0::2], y[1::2]]))
    net = C.bn_net()
    shards = Probe(net, C.CRITERION, ordered, chunk_size=C.PROBE_SIZE // 2)
    eig = shards.hessian_eigenvalues(k=1, tol=1e-10, max_hvps=200, generator=torch.Generator().manual_seed(11))
    assert close(got["bn_eig_H"], eig.eigenvalues)
    union = Probe(net, C.CRITERION, (x, y))
    batches = got["bn_batches"]
    for j, rows in enumerate(batches):
        assert len({int(i) % 2 for i in rows}) == 1  # each micro-batch lies in one shard
        assert int(rows[0]) % 2 == j % 2  # row j computed by process j % P
        with union.measuring():
            loss = union.loss_of_indices(rows)
            want = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, union.params)])
        assert close(got["bn_samples"][j], want)
    assert torch.equal(got["bn_running_mean"], torch.zeros(12, dtype=torch.float64))


@pytest.mark.distributed
def test_unequal_shards_are_refused_or_trimmed(ranks):
    for res in ranks:
        got = res["probe"]
        assert "differ in size" in got["uneven_error"] and "uneven='trim'" in got["uneven_error"]
        assert got["trimmed_sizes"] == (23, 46)
        assert "do not split evenly" in got["split_error"]


@pytest.mark.distributed
def test_communication_volume_of_a_lanczos_measurement(ranks):
    comm = ranks[0]["probe"]["eig_comm"]
    dim = ranks[0]["probe"]["gradient"].numel()
    # Before it: loss, subset loss (scalars) and the probe gradient; then the operator's
    # loss check, loss and gradient, and one vector per Hessian-vector product.
    assert comm["all_reduce_bytes"] == 8 * (dim * (comm["num_hvps"] + 2) + 4)
    assert comm["calls"] == comm["num_hvps"] + 6
    assert comm["all_gather_bytes"] == 0


@pytest.mark.distributed
def test_ddp_training_matches_single_process_with_the_global_batch(ranks):
    a, b = ranks[0]["train"], ranks[1]["train"]
    assert without_time(a["history"]) == without_time(b["history"])
    assert a["noise"] == b["noise"]
    assert a["break_even_step"] == b["break_even_step"] is not None
    model, opt, noise = C.reference_run(C.STEPS, 1)
    assert a["break_even_step"] == opt.break_even.step
    assert a["monitor_step"] == C.STEPS
    assert_records_close(a["history"], opt.history)
    assert_records_close(a["noise"], noise.history)
    for got, want in zip(a["params"], model.parameters()):
        assert close(got, want.detach())


@pytest.mark.distributed
def test_replica_noise_from_two_replicas(ranks):
    records = ranks[0]["train"]["noise"]
    assert len(records) == C.STEPS
    for r in records:
        assert r["replica_num_samples"] == 2 and r["replica_batch_size"] == C.LOCAL_BATCH
        # Two samples: one eigenvalue, which is the whole (two-batch) trace.
        assert close(r["lambda1_K_replica"], r["trace_K_replica"])
    comm = ranks[0]["train"]["noise_comm"]
    dim = ranks[0]["probe"]["gradient"].numel()
    assert comm["all_reduce_bytes"] == 8 * C.STEPS  # one float64 per step
    assert comm["all_gather_bytes"] == 8 * 2 * dim * C.STEPS


@pytest.mark.distributed
def test_save_state_load_state_continue_equals_uninterrupted(ranks):
    for res in ranks:
        full, resumed = res["train"], res["resumed"]
        assert without_time(resumed["history"]) == without_time(full["history"])
        assert resumed["events"] == full["events"]
        assert resumed["noise"] == full["noise"]
        assert resumed["break_even_step"] == full["break_even_step"] > C.SAVE_AT
        for got, want in zip(resumed["params"], full["params"]):
            assert torch.equal(got, want)


@pytest.mark.distributed
def test_gradient_accumulation_measures_on_synchronising_steps_only(ranks):
    a, b = ranks[0]["accumulate"], ranks[1]["accumulate"]
    assert without_time(a["history"]) == without_time(b["history"])
    assert a["monitor_step"] == C.ACCUM_STEPS  # 2 × ACCUM_STEPS micro-steps
    model, opt, noise = C.reference_run(C.ACCUM_STEPS, 2)
    assert_records_close(a["history"], opt.history)
    assert_records_close(a["noise"], noise.history)
    for r in a["noise"]:
        assert r["replica_num_samples"] == 4
        eigs = sum(r[f"eig_K_replica_{i}"] for i in (1, 2, 3))
        assert close(eigs, r["trace_K_replica"])
    for got, want in zip(a["params"], model.parameters()):
        assert close(got, want.detach())


@pytest.mark.distributed
def test_skipped_steps_are_not_measured(ranks):
    for res in ranks:
        got = res["skip"]
        assert got["skipped"] == [step == C.SKIP_AT for step in range(C.SKIP_STEPS)]
        assert got["monitor_step"] == C.SKIP_STEPS - 1
        assert got["noise_skipped"] == 1 and got["noise_step"] == C.SKIP_STEPS - 1
    model, opt, noise = C.reference_run(C.SKIP_STEPS, 1, skip_at=C.SKIP_AT)
    assert_records_close(ranks[0]["skip"]["history"], opt.history)
    assert_records_close(ranks[0]["skip"]["noise"], noise.history)


@pytest.mark.distributed
def test_monitored_lr_steps_once_per_optimizer_step_on_every_process(ranks):
    a, b = ranks[0]["scheduler"], ranks[1]["scheduler"]
    assert a == b
    # AcceleratedScheduler called step() twice per training step (two processes).
    assert a["last_epoch"] == C.SKIP_STEPS
    assert a["detected_at"] == 2  # the first full measurement
    assert a["lrs"] == [0.5 * C.LR] + [C.LR] * (C.SKIP_STEPS - 1)


@pytest.mark.distributed
def test_plain_probe_on_two_processes_is_refused_and_ddp_is_unwrapped(ranks):
    assert all(res["plain_probe_refused"] for res in ranks)
    assert all(res["unwraps_ddp"] for res in ranks)


@pytest.mark.distributed
def test_documented_accelerate_launch_command(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _launch([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
             "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
             "--main_process_port", str(port), str(SCRIPTS / "launch_check.py"), str(tmp_path)], tmp_path)
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [g["world_size"] for g in got] == [2, 2] and [g["num_processes"] for g in got] == [2, 2]
    assert [g["main"] for g in got] == [True, False]
    assert got[0]["lambda1_H"] == got[1]["lambda1_H"]
    probe = Probe(C.mlp(), C.CRITERION, C.probe_data())
    want = probe.hessian_eigenvalues(k=1, tol=1e-10, max_hvps=200, generator=torch.Generator().manual_seed(11))
    assert close(got[0]["lambda1_H"], float(want.eigenvalues[0]))


# --------------------------------------------------------------------------- one process


def test_world_size_checks_catch_unconnected_processes(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert check_world_size() == 1
    assert check_world_size(1) == 1
    with pytest.raises(RuntimeError, match="--cpu"):
        check_world_size(2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="unconnected"):
        check_world_size()
    with pytest.raises(RuntimeError, match="unconnected"):
        DistributedProbe(C.mlp(), C.CRITERION, C.probe_data())


def test_is_main_process_without_distributed(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    assert is_main_process()
    monkeypatch.setenv("RANK", "1")
    assert not is_main_process()

    class Fake:
        is_main_process = False

    assert not is_main_process(Fake())


def test_on_one_process_a_distributed_probe_is_a_probe():
    model = C.mlp()
    data = C.probe_data()
    dist_probe = DistributedProbe(model, C.CRITERION, data, split=True)
    probe = Probe(model, C.CRITERION, data)
    assert dist_probe.world_size == 1 and dist_probe.num_examples == C.PROBE_SIZE
    assert dist_probe.reduce_mean is None
    gen = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    assert dist_probe.loss_value() == probe.loss_value()
    assert torch.equal(dist_probe.gradient(), probe.gradient())
    a = dist_probe.hessian_eigenvalues(k=2, tol=1e-10, max_hvps=200, generator=gen())
    b = probe.hessian_eigenvalues(k=2, tol=1e-10, max_hvps=200, generator=gen())
    assert torch.equal(a.eigenvalues, b.eigenvalues)
    assert torch.equal(dist_probe.gradient_samples(num_samples=4, batch_size=6, generator=gen()),
                       probe.gradient_samples(num_samples=4, batch_size=6, generator=gen()))
    idx = torch.tensor([1, 4, 7])
    assert dist_probe.loss_value(idx) == pytest.approx(probe.loss_value(idx), rel=1e-12)
    with pytest.raises(ValueError, match=r"\[0, 48\)"):
        dist_probe.loss_value(torch.tensor([48]))
    assert dist_probe.communication.as_dict() == {"all_reduce_bytes": 0, "all_gather_bytes": 0, "calls": 0}


def test_distributed_probe_rejects_bad_options():
    with pytest.raises(ValueError, match="uneven"):
        DistributedProbe(C.mlp(), C.CRITERION, C.probe_data(), uneven="pad")
    with pytest.raises(ValueError, match="microbatches"):
        DistributedProbe(C.mlp(), C.CRITERION, C.probe_data(), microbatches="some")
    with pytest.raises(TypeError, match="Module"):
        DistributedProbe("model", C.CRITERION, C.probe_data())


def test_a_monitor_runs_on_a_distributed_probe_like_on_a_probe():
    def run(probe_cls):
        model = C.mlp()
        opt = BreakEvenSGD(model.parameters(), lr=C.LR, probe=probe_cls(model, C.CRITERION, C.probe_data()),
                           **C.monitor_kwargs())
        x, y = C.train_data()
        for step in range(4):
            idx = torch.arange(step * 16, step * 16 + 16)
            opt.zero_grad()
            C.CRITERION(model(x[idx]), y[idx]).backward()
            opt.step()
        return opt.history

    assert_records_close(run(DistributedProbe), run(Probe))


def _micro_gradients(model, x, y, parts):
    rows = []
    for idx in parts:
        loss = C.CRITERION(model(x[idx]), y[idx])
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(model.parameters()))]))
    return torch.stack(rows)


def test_replica_noise_on_one_process_with_microbatches():
    model = C.mlp()
    x, y = C.train_data()
    parts = [torch.arange(i * 8, i * 8 + 8) for i in range(4)]
    oracle = _micro_gradients(model, x, y, parts)
    noise = ReplicaNoise(model, batch_size=8, accumulation_steps=4, k=3)
    for idx in parts:
        assert noise.latest is None
        (C.CRITERION(model(x[idx]), y[idx]) / 4).backward()
        record = noise.after_backward()
    assert record is noise.latest and noise.step == 1
    spec = covariance_spectrum(oracle, k=3, scale=8)
    assert close(record["lambda1_K_replica"], spec.lambda1)
    assert close(record["trace_K_replica"], spec.trace)
    small = float(oracle.pow(2).sum(1).mean())
    big = float(oracle.mean(0).pow(2).sum())
    assert close(record["grad_norm_sq_replica"], (32 * big - 8 * small) / (32 - 8))
    assert close(record["gns_replica"], record["trace_K_replica"] / record["grad_norm_sq_replica"])
    assert record["replica_num_samples"] == 4 and record["replica_batch_size"] == 8


def test_replica_noise_spectrum_every_and_state_dict():
    model = C.mlp()
    x, y = C.train_data()
    noise = ReplicaNoise(model, batch_size=8, accumulation_steps=2, spectrum_every=2, beta=0.5)
    for step in range(4):
        model.zero_grad()
        for a in range(2):
            idx = torch.arange((2 * step + a) * 8, (2 * step + a + 1) * 8)
            (C.CRITERION(model(x[idx]), y[idx]) / 2).backward()
            noise.after_backward()
    assert ["lambda1_K_replica" in r for r in noise.history] == [False, True, False, True]
    assert noise.communication.calls == 0
    copy = ReplicaNoise(C.mlp(), batch_size=8, accumulation_steps=2, spectrum_every=2, beta=0.5)
    copy.load_state_dict(torch.load(_roundtrip(noise.state_dict()), weights_only=True))
    assert copy.history == noise.history and copy.step == noise.step
    assert copy.tracker.noise_scale == noise.tracker.noise_scale


def _roundtrip(state):
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


def test_replica_noise_skips_non_finite_gradients():
    model = C.mlp()
    x, y = C.train_data()
    noise = ReplicaNoise(model, batch_size=8, accumulation_steps=2)
    for a in range(2):
        idx = torch.arange(a * 8, a * 8 + 8)
        loss = C.CRITERION(model(x[idx]), y[idx]) * (float("inf") if a else 0.5)
        loss.backward()
        out = noise.after_backward()
    assert out is None and noise.num_skipped == 1 and noise.step == 0


def test_replica_noise_needs_two_samples_and_valid_arguments():
    with pytest.raises(ValueError, match="at least two gradient samples"):
        ReplicaNoise(C.mlp(), batch_size=8)
    with pytest.raises(ValueError, match="batch_size"):
        ReplicaNoise(C.mlp(), batch_size=0, accumulation_steps=2)
    with pytest.raises(ValueError, match="spectrum_every"):
        ReplicaNoise(C.mlp(), batch_size=8, accumulation_steps=2, spectrum_every=0)


class FakeAccelerator:
    """Duck-typed Accelerator for the single-process glue (no global Accelerate state)."""

    num_processes = 1
    is_main_process = True

    def __init__(self):
        self.registered = []

    def register_for_checkpointing(self, *objects):
        self.registered.extend(objects)


def test_prepare_monitor_registers_only_monitors_the_optimizer_does_not_carry():
    model = C.mlp()
    probe = Probe(model, C.CRITERION, C.probe_data())
    opt = BreakEvenSGD(model.parameters(), lr=0.1, probe=probe, measure_every=1)
    acc = FakeAccelerator()
    assert prepare_monitor(acc, opt) is opt.monitor
    assert acc.registered == []  # saved under the optimizer's "sgdbreak" key
    assert "sgdbreak" in opt.state_dict()

    plain = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = BreakEvenMonitor(probe, measure_every=1).attach(plain)
    assert prepare_monitor(acc, plain, monitor=monitor) is monitor
    assert acc.registered == [monitor]
    with pytest.raises(ValueError, match="no monitor"):
        prepare_monitor(acc, plain)


def test_unwrap_optimizer_follows_accelerated_wrappers():
    inner = torch.optim.SGD(nn.Linear(2, 1).parameters(), lr=0.1)

    class AcceleratedOptimizer:  # same name as Accelerate's wrapper
        def __init__(self, optimizer):
            self.optimizer = optimizer

    assert unwrap_optimizer(AcceleratedOptimizer(AcceleratedOptimizer(inner))) is inner
    assert unwrap_optimizer(inner) is inner


def test_monitor_state_survives_accelerate_device_placement():
    model = C.mlp()
    opt = BreakEvenSGD(model.parameters(), lr=0.1, probe=Probe(model, C.CRITERION, C.probe_data()))
    state = opt.state_dict()
    # AcceleratedOptimizer(device_placement=True) moves the state to the GPU; no GPU here, so
    # stand in a tensor-like that only gives its bytes back through .cpu() (set_state
    # rejects anything but a CPU ByteTensor).
    class OnDevice:
        def __init__(self, tensor):
            self.tensor = tensor

        def cpu(self):
            return self.tensor

    original = state["sgdbreak"]["generator"].clone()
    state["sgdbreak"]["generator"] = OnDevice(original)
    opt.load_state_dict(state)
    assert torch.equal(opt.monitor.generator.get_state(), original)
