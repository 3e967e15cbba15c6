"""Probes over batches of any structure: ``Probe(model, data=..., loss_fn=fn)``.

Models defined here: a tiny Hugging-Face-style classifier (dict batch with ``input_ids``,
``attention_mask`` and ``labels``, the loss computed inside ``forward``) and a two-input
model. Measurements are checked against brute-force oracles (dense Hessian, per-example
gradients by a loop, micro-batch gradients by plain autograd) and against the short
``(inputs, targets)`` form on the same model.
"""

from __future__ import annotations

import copy
import pickle
from collections import UserDict
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from sgdbreak import BreakEvenAdamW, BreakEvenSGD, DistributedProbe, Probe
from sgdbreak.estimators.samples import draw_batches, per_example_loss_gradients
from sgdbreak.measurement import batches as B
from sgdbreak.testing import exact_hessian

DTYPE = torch.float64
VOCAB, CLASSES = 7, 3


class TinyTextClassifier(nn.Module):
    """A Hugging-Face-style model: keyword inputs, an output object with ``.loss`` and ``.logits``."""

    def __init__(self, seed: int = 0, dropout: float = 0.0, batchnorm: bool = False):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(VOCAB, 3)
        self.hidden = nn.Linear(3, 4)
        self.norm = nn.BatchNorm1d(4) if batchnorm else nn.Identity()
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(4, CLASSES)
        self.to(DTYPE)

    def forward(self, input_ids, attention_mask=None, labels=None):
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        emb = self.embed(input_ids) * mask.unsqueeze(-1).to(DTYPE)
        pooled = emb.sum(1) / mask.sum(1, keepdim=True).to(DTYPE)
        logits = self.head(self.drop(self.norm(torch.tanh(self.hidden(pooled)))))
        loss = None if labels is None else F.cross_entropy(logits, labels)
        return SimpleNamespace(loss=loss, logits=logits)


def hf_loss(model, batch):
    """The loss a Hugging Face Trainer takes: the model's own output ``.loss``."""
    return model(**batch).loss


def text_batch(n: int = 20, length: int = 7, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, length), generator=g)
    lengths = torch.randint(2, length + 1, (n,), generator=g)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    labels = torch.randint(0, CLASSES, (n,), generator=g)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def logits_of(model, inputs):
    """The short form's forward for the same model: inputs are ``(input_ids, attention_mask)``."""
    return model(*inputs).logits


def short_form(model, batch, **kwargs) -> Probe:
    data = ((batch["input_ids"], batch["attention_mask"]), batch["labels"])
    return Probe(model, nn.CrossEntropyLoss(), data, forward=logits_of, **kwargs)


class TwoInputNet(nn.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.a, self.b = nn.Linear(3, 5), nn.Linear(2, 5)
        self.head = nn.Linear(5, CLASSES)
        self.to(DTYPE)

    def forward(self, a, b):
        return self.head(torch.tanh(self.a(a) + self.b(b)))


def two_input_data(n: int = 18, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 3, generator=g, dtype=DTYPE), torch.randn(n, 2, generator=g, dtype=DTYPE),
            torch.randint(0, CLASSES, (n,), generator=g))


def nested_loss(model, batch):
    """A nested batch ``{"x": {"a": a, "more": [b]}, "y": y}``."""
    return F.cross_entropy(model(batch["x"]["a"], batch["x"]["more"][0]), batch["y"])


def nested(a, b, y):
    return {"x": {"a": a, "more": [b]}, "y": y}


def params_of(model):
    return [p for p in model.parameters() if p.requires_grad]


def gen(seed: int = 5) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def dense_eigenvalues(model, loss_fn, batch) -> torch.Tensor:
    return torch.linalg.eigvalsh(exact_hessian(lambda: loss_fn(model, batch), params_of(model))).flip(0)


def gradients_by_loop(model, loss_fn, batch) -> torch.Tensor:
    """Per-example gradients: one plain autograd call per example (the oracle)."""
    rows = []
    for i in range(B.num_examples(batch)):
        loss = loss_fn(model, B.select(batch, slice(i, i + 1)))
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params_of(model))]))
    return torch.stack(rows)


# --- the Hugging-Face-style model -------------------------------------------------------


@pytest.fixture(scope="module")
def text_problem():
    """The HF-style model, its dict batch and the dense Hessian of its loss (the oracle)."""
    model, batch = TinyTextClassifier(), text_batch()
    return model, batch, exact_hessian(lambda: hf_loss(model, batch), params_of(model))


def test_dict_batch_sharpness_matches_the_dense_hessian_and_the_short_form(text_problem):
    model, batch, dense = text_problem
    probe = Probe(model, data=batch, loss_fn=hf_loss, chunk_size=6)
    assert probe.num_examples == 20 and probe.criterion is None and probe.inputs is None
    got = probe.hessian_eigenvalues(k=2, tol=1e-10, max_hvps=100, generator=gen())
    exact = torch.linalg.eigvalsh(dense).flip(0)
    torch.testing.assert_close(got.eigenvalues.double(), exact[:2], rtol=1e-7, atol=1e-9)
    assert probe.loss_value() == pytest.approx(float(hf_loss(model, batch).detach()), rel=1e-12)
    # The short form on the same model: the same loss and Hessian-vector products.
    short = short_form(model, batch, chunk_size=6)
    assert short.loss_value() == pytest.approx(probe.loss_value(), rel=1e-12)
    v = torch.randn(probe.dim, generator=gen(), dtype=DTYPE)
    with probe.measuring():
        hv = probe.hessian_operator()(v)
    with short.measuring():
        torch.testing.assert_close(short.hessian_operator()(v), hv, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(hv.double(), dense @ v, rtol=1e-8, atol=1e-10)


def test_dict_batch_gradient_samples_match_autograd_oracles():
    model, batch = TinyTextClassifier(), text_batch()
    probe = Probe(model, data=batch, loss_fn=hf_loss, chunk_size=7)
    # Per-example: the gradient of each example's own loss.
    per_example = probe.gradient_samples(method="per_example")
    torch.testing.assert_close(per_example, gradients_by_loop(model, hf_loss, batch), rtol=1e-9, atol=1e-11)
    # Micro-batches: the gradient of the mean loss over the batches the generator draws.
    samples = probe.gradient_samples(num_samples=4, batch_size=5, generator=gen(3))
    drawn = draw_batches(20, 5, 4, gen(3))
    for row, idx in zip(samples, drawn, strict=True):
        loss = hf_loss(model, B.select(batch, idx))
        expected = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params_of(model))])
        torch.testing.assert_close(row, expected, rtol=1e-10, atol=1e-12)
    short = short_form(model, batch, chunk_size=7)
    torch.testing.assert_close(samples, short.gradient_samples(num_samples=4, batch_size=5, generator=gen(3)))
    torch.testing.assert_close(per_example, short.gradient_samples(method="per_example"))
    # The mean gradient is the mean of the per-example rows.
    torch.testing.assert_close(probe.gradient(), per_example.mean(0), rtol=1e-9, atol=1e-12)


def test_dict_batch_trace_and_curvature_variance_equal_the_short_form(text_problem):
    model, batch, dense = text_problem
    probe, short = Probe(model, data=batch, loss_fn=hf_loss), short_form(model, batch)
    trace = probe.hessian_trace(num_samples=6, generator=gen())
    assert trace.value == pytest.approx(short.hessian_trace(num_samples=6, generator=gen()).value, rel=1e-10)
    assert abs(trace.value - float(torch.trace(dense))) < 4 * trace.stderr + 1e-9
    v = torch.randn(probe.dim, generator=gen(), dtype=DTYPE)
    assert probe.curvature_variance(v, num_groups=4, generator=gen()) == pytest.approx(
        short.curvature_variance(v, num_groups=4, generator=gen()), rel=1e-10)


def test_hugging_face_batch_encoding_and_dataloader_of_dicts():
    """A ``UserDict`` batch (what HF tokenizers return) and a DataLoader of dict examples."""

    class BatchEncoding(UserDict):
        pass

    model, batch = TinyTextClassifier(), text_batch()
    encoded = Probe(model, data=BatchEncoding(batch), loss_fn=hf_loss)
    assert isinstance(encoded.data, dict) and set(encoded.data) == set(batch)
    examples = [{k: v[i] for k, v in batch.items()} for i in range(20)]
    loader = torch.utils.data.DataLoader(examples, batch_size=6)  # default collate: dicts
    loaded = Probe(model, data=loader, loss_fn=hf_loss)
    assert loaded.num_examples == 20
    for key in batch:
        assert torch.equal(loaded.data[key], batch[key])
    assert loaded.loss_value() == pytest.approx(encoded.loss_value(), rel=1e-12)


# --- two inputs, nested structures, lists of batches ----------------------------------


def test_two_input_model_in_a_nested_batch_list_matches_oracles():
    model = TwoInputNet()
    a, b, y = two_input_data()
    parts = [nested(a[:7], b[:7], y[:7]), nested(a[7:], b[7:], y[7:])]  # batches of 7 and 11
    whole = nested(a, b, y)
    exact = dense_eigenvalues(model, nested_loss, whole)
    for keep_graph in (True, False):
        probe = Probe(model, data=parts, loss_fn=nested_loss, chunk_size=4, keep_graph=keep_graph)
        assert probe.num_examples == 18 and torch.equal(probe.data["x"]["more"][0], b)
        got = probe.hessian_eigenvalues(k=2, tol=1e-10, max_hvps=100, generator=gen())
        torch.testing.assert_close(got.eigenvalues.double(), exact[:2], rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(probe.gradient_samples(method="per_example"),
                               gradients_by_loop(model, nested_loss, whole), rtol=1e-9, atol=1e-11)
    # The short form with a tuple of inputs is the same measurement.
    short = Probe(model, nn.CrossEntropyLoss(), [((a[:7], b[:7]), y[:7]), ((a[7:], b[7:]), y[7:])],
                  forward=lambda m, x: m(*x), chunk_size=4)
    assert short.loss_value() == pytest.approx(probe.loss_value(), rel=1e-12)
    torch.testing.assert_close(short.gradient_samples(method="per_example"),
                               probe.gradient_samples(method="per_example"), rtol=1e-12, atol=1e-14)


def test_per_example_loss_gradients_of_a_tuple_batch_match_the_loop():
    model = TwoInputNet()
    a, b, y = two_input_data(9)

    def loss(m, batch):
        (x1, x2), t = batch
        return F.cross_entropy(m(x1, x2), t)

    got = per_example_loss_gradients(model, loss, ((a, b), y), chunk_size=4)
    torch.testing.assert_close(got, gradients_by_loop(model, loss, ((a, b), y)), rtol=1e-9, atol=1e-11)


def test_list_of_tensors_is_one_batch_and_a_tuple_is_one_batch():
    model = TwoInputNet()
    a, b, y = two_input_data(6)
    loss = lambda m, batch: F.cross_entropy(m(batch[0], batch[1]), batch[2])  # noqa: E731
    assert Probe(model, data=[a, b, y], loss_fn=loss).num_examples == 6  # a collated DataLoader batch
    assert Probe(model, data=(a, b, y), loss_fn=loss).num_examples == 6
    assert Probe(model, data=iter([(a, b, y), (a, b, y)]), loss_fn=loss).num_examples == 12


# --- BatchNorm, dropout, the model left as it was ------------------------------------


def test_batchnorm_and_dropout_are_restored_and_microbatches_use_batch_statistics():
    model = TinyTextClassifier(dropout=0.3, batchnorm=True)
    batch = text_batch(24)
    model.train()
    model(**batch)  # running statistics that differ from the initial ones
    model.embed.eval()  # a mixed mode that must come back as it was
    modes = {name: m.training for name, m in model.named_modules()}
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    rng = torch.get_rng_state()
    probe = Probe(model, data=batch, loss_fn=hf_loss, chunk_size=8)
    probe.hessian_eigenvalues(k=1, max_hvps=20, generator=gen())
    samples = probe.gradient_samples(num_samples=3, batch_size=8, generator=gen(4))
    with pytest.raises(ValueError, match="per-example gradients are undefined"):
        probe.gradient_samples(method="per_example")
    assert {name: m.training for name, m in model.named_modules()} == modes
    for name, b in model.named_buffers():
        assert torch.equal(b, buffers[name]), name
    assert torch.equal(torch.get_rng_state(), rng)
    # Each micro-batch sample: train-mode BatchNorm over that batch, dropout off.
    with probe.measuring():
        for row, idx in zip(samples, draw_batches(24, 8, 3, gen(4)), strict=True):
            loss = hf_loss(model, B.select(batch, idx))
            expected = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params_of(model))])
            torch.testing.assert_close(row, expected, rtol=1e-10, atol=1e-12)
        assert model.norm.training and not model.drop.training
    assert model.drop.training


# --- monitors and optimizers ---------------------------------------------------------


def _train(probe_of, optimizer_cls, steps=4, **kwargs):
    model, batch = TinyTextClassifier(seed=3), text_batch(32, seed=4)
    opt = optimizer_cls(model.parameters(), probe=probe_of(model, batch),
                        measure_every=2, cheap_every=1, seed=1, **kwargs)
    train = text_batch(16, seed=9)
    for _ in range(steps):
        opt.zero_grad()
        hf_loss(model, train).backward()
        opt.step()
    return opt.monitor


@pytest.mark.parametrize("optimizer_cls,key", [(BreakEvenSGD, "lambda1_H"), (BreakEvenAdamW, "lambda1_PH")])
def test_monitor_on_a_dict_probe_records_what_the_short_form_records(optimizer_cls, key):
    settings = dict(lr=0.05, measurements=("hessian", "noise", "trace", "alpha_star", "curvature_variance"),
                    noise_samples=4, noise_batch_size=6, dataset_size=1000, batch_size=16, cheap_examples=12)
    general = _train(lambda m, b: Probe(m, data=b, loss_fn=hf_loss, chunk_size=10), optimizer_cls, **settings)
    short = _train(lambda m, b: short_form(m, b, chunk_size=10), optimizer_cls, **settings)
    assert len(general.history) == len(short.history) == 4
    full = [r for r in general.history if key in r]
    assert len(full) == 2
    for ours, theirs in zip(general.history, short.history, strict=True):
        assert set(ours) == set(theirs)
        for name, value in ours.items():
            if name != "measure_seconds":
                assert value == pytest.approx(theirs[name], rel=1e-6, abs=1e-9), name
    for name in ("lambda1_K", "trace_H", "alpha_star", "update_sharpness"):
        assert any(name in r for r in general.history), name


def test_dict_probe_pickles_and_copies_with_a_module_level_loss():
    model, batch = TinyTextClassifier(), text_batch(8)
    probe = Probe(model, data=batch, loss_fn=hf_loss)
    again = pickle.loads(pickle.dumps(probe))
    assert again.loss_value() == pytest.approx(probe.loss_value(), rel=1e-12)
    assert copy.deepcopy(probe).num_examples == 8


def test_distributed_probe_on_one_process_takes_dict_batches():
    model, batch = TinyTextClassifier(), text_batch()
    dist = DistributedProbe(model, data=batch, loss_fn=hf_loss, split=True)
    plain = Probe(model, data=batch, loss_fn=hf_loss)
    assert dist.num_examples == 20 and dist.world_size == 1
    torch.testing.assert_close(dist.gradient(), plain.gradient())
    torch.testing.assert_close(dist.gradient_samples(num_samples=3, batch_size=4, generator=gen()),
                               plain.gradient_samples(num_samples=3, batch_size=4, generator=gen()))


# --- bad input ---------------------------------------------------------------------------


def test_bad_batches_are_refused_naming_what_is_wrong():
    model, batch = TinyTextClassifier(), text_batch(6)
    with pytest.raises(ValueError, match=r"\['attention_mask'\] has 5 examples .* \['input_ids'\] has 6"):
        Probe(model, data={**batch, "attention_mask": batch["attention_mask"][:5]}, loss_fn=hf_loss)
    with pytest.raises(TypeError, match=r"\['labels'\]\[0\] is of type int, not a tensor"):
        Probe(model, data={**batch, "labels": [0] * 6}, loss_fn=hf_loss)
    with pytest.raises(ValueError, match="0-dimensional"):
        Probe(model, data={**batch, "scale": torch.tensor(2.0)}, loss_fn=hf_loss)
    with pytest.raises(ValueError, match="batch 1 is structured as .*same keys"):
        Probe(model, data=[batch, {"input_ids": batch["input_ids"], "labels": batch["labels"]}], loss_fn=hf_loss)
    with pytest.raises(ValueError, match="no batches"):
        Probe(model, data=[], loss_fn=hf_loss)
    with pytest.raises(ValueError, match="no examples"):
        Probe(model, data=B.select(batch, slice(0, 0)), loss_fn=hf_loss)
    with pytest.raises(TypeError, match="data must be a batch"):
        Probe(model, data="input_ids", loss_fn=hf_loss)
    with pytest.raises(ValueError, match="holds no tensors"):
        Probe(model, data={}, loss_fn=hf_loss)


def test_bad_loss_functions_are_refused_at_construction():
    model, batch = TinyTextClassifier(), text_batch(6)
    with pytest.raises(ValueError, match="not a mean over examples .*looks like a sum"):
        Probe(model, data=batch, loss_fn=lambda m, b: F.cross_entropy(m(**b).logits, b["labels"], reduction="sum"))
    with pytest.raises(ValueError, match=r"loss_fn must return a scalar mean loss tensor, got .*return its \.loss"):
        Probe(model, data=batch, loss_fn=lambda m, b: m(**b))
    with pytest.raises(ValueError, match=r"got \(2,\)"):
        Probe(model, data=batch, loss_fn=lambda m, b: F.cross_entropy(m(**b).logits, b["labels"], reduction="none"))
    with pytest.raises(ValueError, match=r"cannot evaluate the loss .*KeyError.*\['input_ids'\]: int64"):
        Probe(model, data=batch, loss_fn=lambda m, b: m(b["tokens"]).loss)
    with pytest.raises(ValueError, match="does not depend on params"):
        Probe(model, data=batch, loss_fn=lambda m, b: b["labels"].double().mean())
    other = TinyTextClassifier(seed=1)
    with pytest.raises(ValueError, match="none of the probe's params reach the loss"):
        Probe(model, data=batch, loss_fn=lambda m, b: hf_loss(other, b) + 0 * m.head.bias.sum().detach(),
              params=model.parameters())


def test_the_two_forms_cannot_be_mixed():
    model, batch = TinyTextClassifier(), text_batch(6)
    with pytest.raises(TypeError, match="not both"):
        Probe(model, nn.CrossEntropyLoss(), batch, loss_fn=hf_loss)
    with pytest.raises(TypeError, match="got neither"):
        Probe(model, data=batch)
    with pytest.raises(TypeError, match="forward= belongs to the short form"):
        Probe(model, data=batch, loss_fn=hf_loss, forward=logits_of)
    with pytest.raises(TypeError, match="data is required"):
        Probe(model, loss_fn=hf_loss)
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        Probe(model, data=batch, loss_fn="loss")
    with pytest.raises(TypeError, match="pair .*loss_fn=fn"):
        Probe(model, nn.CrossEntropyLoss(), batch)  # a dict batch needs loss_fn


def test_the_probe_keeps_its_own_copy_of_the_data():
    model, batch = TinyTextClassifier(), text_batch(6)
    probe = Probe(model, data=batch, loss_fn=hf_loss)
    before = probe.loss_value()
    batch["labels"].add_(1).remainder_(CLASSES)  # the caller's tensors change; the probe does not
    assert probe.loss_value() == before and probe.data["labels"] is not batch["labels"]


def test_per_example_gradients_of_a_loss_vmap_cannot_batch_are_refused_clearly():
    model = TwoInputNet()
    a, b, y = two_input_data(6)

    def loss(m, batch):  # .item(): data-dependent Python, as Hugging Face models have
        weight = 1.0 if batch[2].max().item() >= 0 else 0.0
        return weight * F.cross_entropy(m(batch[0], batch[1]), batch[2])

    probe = Probe(model, data=(a, b, y), loss_fn=loss)
    assert probe.gradient_samples(num_samples=2, batch_size=3).shape == (2, probe.dim)
    with pytest.raises(ValueError, match="vmap can batch.*method='microbatch'"):
        probe.gradient_samples(method="per_example")
