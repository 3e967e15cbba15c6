"""BreakEvenTrainerCallback in a Hugging Face Trainer run (tiny BERT from a config, CPU, no download)."""

from __future__ import annotations

import os

import pytest
import torch

from sgdbreak import Probe
from sgdbreak.measurement.breakeven import BreakEvenResult

try:
    import transformers  # noqa: F401
except ImportError:
    pytest.skip("the [transformers] extra is not installed (pip install 'sgdbreak[transformers]')",
                allow_module_level=True)

from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from sgdbreak.integrations.transformers import (  # noqa: E402
    STATE_FILE,
    BreakEvenTrainerCallback,
    model_output_loss,
)

VOCAB, CLASSES = 40, 3


def tiny_bert(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=VOCAB, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=16, max_position_embeddings=16, num_labels=CLASSES,
                        hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config)


class TokenData(torch.utils.data.Dataset):
    """Variable-length token sequences whose label depends on the tokens (learnable)."""

    def __init__(self, n: int = 96, seed: int = 1):
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for _ in range(n):
            length = int(torch.randint(4, 12, (1,), generator=g))
            ids = torch.randint(1, VOCAB, (length,), generator=g)
            self.items.append({"input_ids": ids.tolist(), "label": int(ids[0]) % CLASSES})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def pad_collator(features):
    """The Trainer's data collator: pads to the longest sequence of the batch."""
    width = max(len(f["input_ids"]) for f in features)
    ids = torch.zeros(len(features), width, dtype=torch.long)
    mask = torch.zeros(len(features), width, dtype=torch.long)
    for row, f in enumerate(features):
        ids[row, : len(f["input_ids"])] = torch.tensor(f["input_ids"])
        mask[row, : len(f["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([f["label"] for f in features])}


class Recorder(TrainerCallback):
    """Stands in for a report_to integration: keeps every ``logs`` dict it is given."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))


def make_trainer(tmp_path, callback, max_steps=6, seed=0):
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=8, learning_rate=3e-3,
        logging_steps=3, save_steps=3, report_to=[], use_cpu=True, seed=seed, data_seed=seed,
        dataloader_num_workers=0, disable_tqdm=True)
    recorder = Recorder()
    trainer = Trainer(model=tiny_bert(), args=args, train_dataset=TokenData(), data_collator=pad_collator,
                      callbacks=[recorder, callback])
    return trainer, recorder


SETTINGS = dict(probe_size=16, measure_every=3, cheap_every=None, noise_samples=4, noise_batch_size=4,
                max_hvps=12)


class AtFirstMeasurement:
    """A detector that declares break-even at the first full measurement."""

    def __init__(self):
        self.result = BreakEvenResult(False, None, None, None)

    def update(self, record):
        if "lambda1_H" in record and not self.result.reached:
            step = int(record["step"])
            self.result = BreakEvenResult(True, step, step, "test", {})
        return []

    def state_dict(self):
        return {"reached": self.result.reached, "step": self.result.step}

    def load_state_dict(self, state):
        if state["reached"]:
            self.result = BreakEvenResult(True, state["step"], state["step"], "test", {})


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """Six Trainer steps with the callback (measuring and checkpointing at steps 3 and 6)."""
    out = tmp_path_factory.mktemp("hf_run")
    callback = BreakEvenTrainerCallback(detector=AtFirstMeasurement(), **SETTINGS)
    trainer, recorder = make_trainer(out, callback)
    trainer.train()
    return out, trainer, recorder, callback


def test_callback_measures_the_trainers_adamw_and_logs_through_the_trainer(first_run):
    out, trainer, recorder, callback = first_run
    monitor = callback.monitor
    # The Trainer's own AdamW, measured with Adam's preconditioned sharpness.
    assert isinstance(monitor.optimizer, torch.optim.AdamW)
    assert monitor.optimizer is trainer.optimizer.optimizer
    assert [r["step"] for r in monitor.history] == [3, 6]
    for record in monitor.history:
        assert {"lambda1_H", "lambda1_PH", "stability_ratio", "lambda1_K"} <= set(record)
        # Adam's edge: the ratio is λ1_PH over (2 + 2β1)/(1 − β1)/lr, not SGD's.
        assert record["stability_ratio"] == pytest.approx(record["lambda1_PH"] / record["edge_sharpness_PH"])
    # The probe: 16 training examples collated by the Trainer's collator, the model's own loss.
    probe = callback.probe
    assert probe.num_examples == 16 and probe.chunk_size == 8 and probe.batch_loss is model_output_loss
    assert set(probe.data) == {"input_ids", "attention_mask", "labels"}
    # Every record reached the log history (at its step) and the other callbacks' on_log.
    logged = {e["step"]: e for e in trainer.state.log_history if "sgdbreak/lambda1_PH" in e}
    assert sorted(logged) == [3, 6]
    for record in monitor.history:
        entry = logged[record["step"]]
        assert entry["sgdbreak/lambda1_PH"] == record["lambda1_PH"]
        assert entry["sgdbreak/loss"] == record["loss"] and "epoch" in entry
    assert sum("sgdbreak/lambda1_H" in logs for logs in recorder.logs) == 2
    assert any("loss" in e and "sgdbreak/loss" not in e for e in trainer.state.log_history)  # the Trainer's own
    # The monitor state is saved in each checkpoint.
    for step in (3, 6):
        saved = torch.load(os.path.join(out, f"checkpoint-{step}", STATE_FILE), weights_only=True)
        assert saved["step"] == step


def test_break_even_is_logged_as_an_event(first_run):
    _, trainer, recorder, callback = first_run
    events = [e for e in trainer.state.log_history if "sgdbreak/break_even_step" in e]
    assert len(events) == 1 and events[0]["sgdbreak/break_even_step"] == 3.0 and events[0]["step"] == 3
    assert sum("sgdbreak/break_even_step" in logs for logs in recorder.logs) == 1
    assert [e["event"] for e in callback.monitor.events] == ["break_even"]


def test_resumed_trainer_run_continues_the_monitor(first_run, tmp_path):
    out, _, _, first = first_run
    again = BreakEvenTrainerCallback(detector=AtFirstMeasurement(), **SETTINGS)
    resumed, _ = make_trainer(tmp_path, again)  # another output folder: found from train()'s argument
    resumed.train(resume_from_checkpoint=os.path.join(out, "checkpoint-3"))
    history = again.monitor.history
    assert [r["step"] for r in history] == [3, 6]
    assert history[0] == first.monitor.history[0]  # loaded from checkpoint-3
    assert again.monitor.break_even.reached and again.monitor.break_even.step == 3
    # Step 6 measured again after the resume, on the same weights as the first run.
    for ours, theirs in zip(history[1:], first.monitor.history[1:], strict=True):
        assert ours["lambda1_H"] == pytest.approx(theirs["lambda1_H"], rel=1e-4)


def test_a_given_probe_and_bad_arguments():
    model = tiny_bert()
    batch = pad_collator([TokenData(8)[i] for i in range(8)])
    probe = Probe(model, data=batch, loss_fn=model_output_loss)
    assert BreakEvenTrainerCallback(probe).probe is probe
    with pytest.raises(TypeError, match="probe must be a sgdbreak.Probe"):
        BreakEvenTrainerCallback(probe=batch)
    with pytest.raises(TypeError, match="optimizer"):
        BreakEvenTrainerCallback(optimizer=None)
    with pytest.raises(ValueError, match="probe_size"):
        BreakEvenTrainerCallback(probe_size=1)
    unlabelled = {k: v for k, v in batch.items() if k != "labels"}
    with pytest.raises(ValueError, match="needs the labels"):
        Probe(model, data=unlabelled, loss_fn=model_output_loss)
