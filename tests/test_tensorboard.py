"""TensorBoardLogger: records, spectra and events written to event files and read back."""

import builtins
import sys

import pytest
import torch
from torch import nn

pytest.importorskip("tensorboard", reason="needs the [tensorboard] extra: pip install -e '.[tensorboard]'")

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from sgdbreak import BreakEvenDetector, BreakEvenSGD, Probe  # noqa: E402
from sgdbreak.integrations.tensorboard import TensorBoardLogger  # noqa: E402
from sgdbreak.measurement.protocols import Logger  # noqa: E402


def read(log_dir):
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    acc.Reload()
    return acc


def scalars(acc, tag):
    return {e.step: e.value for e in acc.Scalars(tag)}


def text(acc, tag):
    return {e.step: e.tensor_proto.string_val[0].decode() for e in acc.Tensors(f"{tag}/text_summary")}


def test_a_training_run_is_read_back_from_the_event_files(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 6, generator=g), torch.randint(0, 3, (64,), generator=g)
    logger = TensorBoardLogger(tmp_path, config={"lr": 0.5, "model": "mlp"})
    assert isinstance(logger, Logger)
    detector = BreakEvenDetector(rules=("stability",), stability_keys=("stability_ratio",), stability_threshold=1e-9)
    opt = BreakEvenSGD(model.parameters(), lr=0.5, probe=Probe(model, nn.CrossEntropyLoss(), (x[:32], y[:32])),
                       measure_every=2, cheap_every=3, loggers=[logger], detector=detector, noise_k=3)
    for _ in range(6):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    opt.monitor.log_event({"event": "warmup_start", "step": 6, "lr": 0.25})
    opt.monitor.close()
    acc = read(tmp_path)

    full = [r for r in opt.history if "lambda1_H" in r]
    assert scalars(acc, "lambda1_H") == pytest.approx({r["step"]: r["lambda1_H"] for r in full})
    cheap = [r for r in opt.history if "update_sharpness" in r]
    assert scalars(acc, "update_sharpness") == pytest.approx({r["step"]: r["update_sharpness"] for r in cheap})
    assert sorted(scalars(acc, "spectrum/K_2")) == [r["step"] for r in full]
    # The spectra as histograms: one per full record, holding its k eigenvalues.
    hists = acc.Histograms("spectrum/K")
    assert [h.step for h in hists] == [r["step"] for r in full]
    for h, r in zip(hists, full):
        assert h.histogram_value.num == 3
        assert h.histogram_value.max == pytest.approx(r["eig_K_1"], rel=1e-6)
        assert h.histogram_value.min == pytest.approx(r["eig_K_3"], rel=1e-6)
        assert h.histogram_value.sum == pytest.approx(r["eig_K_1"] + r["eig_K_2"] + r["eig_K_3"], rel=1e-6)
    assert [h.step for h in acc.Histograms("spectrum/H")] == [r["step"] for r in full]
    # Break-even: a scalar at its step and a text with the rule; other events as text.
    assert scalars(acc, "break_even") == {2: 2.0}
    assert "stability" in text(acc, "break_even")[2]
    assert "0.25" in text(acc, "events/warmup_start")[6]
    assert "model" in text(acc, "config")[0]
    assert "max_lambda1_H" in text(acc, "summary")[6]


def test_an_existing_writer_is_flushed_not_closed_and_the_prefix_applies(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(tmp_path)
    logger = TensorBoardLogger(writer=writer, prefix="sgdbreak/", spectra=False)
    logger.log_measurement({"step": 3, "lambda1_H": 1.5, "eig_H_1": 1.5, "rule": "text", "bad": float("nan")})
    logger.log_event({"event": "break_even", "step": 3, "rule": "stability"})
    logger.log_event({"event": "break_even", "step": 5, "rule": "stability"})  # only the first is marked
    logger.close()
    writer.add_scalar("after_close", 1.0, 0)  # still open
    writer.close()
    acc = read(tmp_path)
    tags = set(acc.Tags()["scalars"])
    assert {"sgdbreak/lambda1_H", "sgdbreak/eig_H_1", "sgdbreak/break_even", "after_close"} <= tags
    assert "sgdbreak/bad" not in tags and "sgdbreak/rule" not in tags
    assert scalars(acc, "sgdbreak/break_even") == {3: 3.0}
    assert acc.Tags()["histograms"] == []


def test_non_main_process_writes_nothing(tmp_path):
    logger = TensorBoardLogger(tmp_path / "tb", main_process=False)
    logger.log_measurement({"step": 1, "lambda1_H": 1.0})
    logger.log_event({"event": "break_even", "step": 1})
    logger.close()
    assert logger.log_dir is None and not (tmp_path / "tb").exists()


def test_bad_input_is_refused(tmp_path):
    with pytest.raises(TypeError, match="writer"):
        TensorBoardLogger(writer=object())
    with pytest.raises(TypeError, match="config"):
        TensorBoardLogger(tmp_path, config=[1])
    logger = TensorBoardLogger(tmp_path)
    with pytest.raises(TypeError, match="record"):
        logger.log_measurement([1, 2])
    with pytest.raises(ValueError, match="event"):
        logger.log_event({"step": 1})
    logger.close()


def test_missing_tensorboard_names_the_extra(monkeypatch, tmp_path):
    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "torch.utils.tensorboard", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with pytest.raises(ImportError, match=r"sgdbreak\[tensorboard\]"):
        TensorBoardLogger(tmp_path)


def test_recipe_report_to_tensorboard_writes_event_files_per_run(tmp_path):
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "recipes" / "break_even.py"
    spec = importlib.util.spec_from_file_location("recipe_break_even_tb", path)
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    args = ["--dataset", "digits", "--num-examples", "128", "--batch-size", "32", "--max-steps", "4",
            "--lr", "0.1", "--measure-every", "2", "--cheap-every", "2", "--probe-fraction", "0.25",
            "--measure", "hessian", "--no-progress", "--output-dir", str(tmp_path), "--report-to", "tensorboard"]
    assert recipe.main(args) == 0
    run_dir = tmp_path / "lr_0.1"
    records = [json.loads(line) for line in (run_dir / "measurements.jsonl").read_text().splitlines()]
    full = [r for r in records if "lambda1_H" in r]
    acc = read(run_dir / "tensorboard")
    assert scalars(acc, "lambda1_H") == pytest.approx({r["step"]: r["lambda1_H"] for r in full})
    assert [h.step for h in acc.Histograms("spectrum/H")] == [r["step"] for r in full] == [2, 4]
    assert "probe_size" in text(acc, "config")[0]
