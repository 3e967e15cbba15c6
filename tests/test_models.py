"""Tests for sgdbreak.workloads.models: shapes, parameter counts, BN placement, initialisation, errors."""

import math

import pytest
import torch
from torch import nn

from sgdbreak.workloads.models import (
    MLP,
    LSTMClassifier,
    SimpleCNN,
    glorot_uniform_,
    num_parameters,
    resnet32,
)


def _glorot_bound(layer: nn.Module) -> float:
    receptive = layer.weight[0, 0].numel() if layer.weight.dim() > 2 else 1
    fan_in = layer.weight.shape[1] * receptive
    fan_out = layer.weight.shape[0] * receptive
    return math.sqrt(6.0 / (fan_in + fan_out))


def _weighted_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


# --------------------------------------------------------------------------- SimpleCNN


@pytest.mark.parametrize(
    ("in_channels", "size", "expected"),
    [(3, 32, 361_898), (1, 28, 271_210), (1, 8, 74_602)],
)
def test_simple_cnn_parameter_counts(in_channels, size, expected):
    model = SimpleCNN(in_channels, 10, size)
    assert num_parameters(model) == expected


def test_simple_cnn_matches_paper_size():
    # The paper quotes "≈ 0.36 M" parameters for CIFAR-10 inputs.
    assert num_parameters(SimpleCNN()) == pytest.approx(0.36e6, rel=0.03)


@pytest.mark.parametrize(
    ("in_channels", "size", "flat"),
    [(3, 32, 64 * 6 * 6), (1, 28, 64 * 5 * 5), (1, 8, 64), (1, (28, 32), 64 * 5 * 6)],
)
@pytest.mark.parametrize("batchnorm", [False, True])
def test_simple_cnn_forward_on_each_input_size(in_channels, size, flat, batchnorm):
    torch.manual_seed(0)
    model = SimpleCNN(in_channels, 7, size, batchnorm=batchnorm)
    assert model.flat_features == flat
    h, w = (size, size) if isinstance(size, int) else size
    out = model(torch.randn(4, in_channels, h, w))
    assert out.shape == (4, 7)
    assert torch.isfinite(out).all()


def test_simple_cnn_layer_order():
    model = SimpleCNN()
    kinds = [type(m).__name__ for m in model.features]
    assert kinds == [
        "Conv2d", "ReLU", "Conv2d", "ReLU", "MaxPool2d",
        "Conv2d", "ReLU", "Conv2d", "ReLU", "MaxPool2d",
    ]  # fmt: skip
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 32, 64, 64]
    assert [c.padding for c in convs] == [(1, 1), (0, 0), (1, 1), (0, 0)]
    linears = [m for m in model.classifier if isinstance(m, nn.Linear)]
    assert [lin.out_features for lin in linears] == [128, 10]


def test_simple_cnn_8x8_skips_the_pool_on_a_1x1_map():
    model = SimpleCNN(1, 10, 8)
    assert isinstance(model.features[-1], nn.Identity)
    assert model.features(torch.zeros(2, 1, 8, 8)).shape == (2, 64, 1, 1)


def test_simple_cnn_batchnorm_follows_every_conv_and_the_dense_layer():
    model = SimpleCNN(batchnorm=True)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 4
    assert sum(isinstance(m, nn.BatchNorm1d) for m in model.modules()) == 1
    layers = list(model.features) + list(model.classifier)
    for index, layer in enumerate(layers):
        if isinstance(layer, nn.Conv2d):
            assert isinstance(layers[index + 1], nn.BatchNorm2d)
            assert isinstance(layers[index + 2], nn.ReLU)
    hidden = model.classifier[1]
    assert isinstance(hidden, nn.Linear) and hidden.out_features == 128
    assert isinstance(model.classifier[2], nn.BatchNorm1d)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in SimpleCNN().modules())
    assert num_parameters(model) == 361_898 + 2 * (32 + 32 + 64 + 64 + 128)


def test_simple_cnn_glorot_init_zero_bias_bounded_weights():
    torch.manual_seed(0)
    model = SimpleCNN()
    for layer in _weighted_layers(model):
        bound = _glorot_bound(layer)
        assert torch.count_nonzero(layer.bias) == 0
        assert layer.weight.abs().max() <= bound
        # Uniform on [-bound, bound]: the largest draw comes close to the bound.
        assert layer.weight.abs().max() > 0.9 * bound
        assert layer.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.15)


def test_simple_cnn_default_init_is_pytorchs():
    torch.manual_seed(0)
    model = SimpleCNN(init="default")
    assert all(torch.count_nonzero(layer.bias) > 0 for layer in _weighted_layers(model))


def test_simple_cnn_supports_double_backward():
    torch.manual_seed(0)
    model = SimpleCNN(1, 10, 8)
    x, y = torch.randn(5, 1, 8, 8), torch.randint(0, 10, (5,))
    params = list(model.parameters())
    loss = nn.functional.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    vector = [torch.randn_like(p) for p in params]
    dot = sum((g * v).sum() for g, v in zip(grads, vector, strict=True))
    hvp = torch.autograd.grad(dot, params)
    assert all(torch.isfinite(h).all() for h in hvp)
    assert any(h.abs().sum() > 0 for h in hvp)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"image_size": 7}, ValueError, "image_size"),
        ({"image_size": (32, 6)}, ValueError, "image_size"),
        ({"image_size": "32"}, TypeError, "image_size"),
        ({"image_size": 32.0}, TypeError, "image_size"),
        ({"num_classes": 0}, ValueError, "num_classes"),
        ({"in_channels": 0}, ValueError, "in_channels"),
        ({"in_channels": 3.0}, TypeError, "in_channels"),
        ({"init": "he"}, ValueError, "'he'"),
    ],
)
def test_simple_cnn_rejects_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        SimpleCNN(**kwargs)


# --------------------------------------------------------------------------- MLP


def test_mlp_structure_and_flattening():
    model = MLP(784, (200, 100), 10, activation="relu")
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(784, 200), (200, 100), (100, 10)]
    assert sum(isinstance(m, nn.ReLU) for m in model.modules()) == 2
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    assert num_parameters(MLP(784)) == 784 * 200 + 200 + 200 * 200 + 200 + 200 * 10 + 10


def test_mlp_tanh_default_and_linear_model():
    model = MLP(10)
    assert sum(isinstance(m, nn.Tanh) for m in model.modules()) == 2
    linear = MLP(10, (), 3)
    assert sum(isinstance(m, nn.Linear) for m in linear.modules()) == 1
    assert linear(torch.randn(2, 10)).shape == (2, 3)


def test_mlp_glorot_init():
    torch.manual_seed(0)
    model = MLP(64, (50,), 10, init="glorot")
    for layer in _weighted_layers(model):
        assert torch.count_nonzero(layer.bias) == 0
        assert layer.weight.abs().max() <= _glorot_bound(layer)
    assert all(torch.count_nonzero(layer.bias) > 0 for layer in _weighted_layers(MLP(64, (50,))))


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        ((0,), {}, ValueError, "in_features"),
        ((10, 200), {}, TypeError, "hidden"),
        ((10, (20, 0)), {}, ValueError, "hidden"),
        ((10,), {"activation": "gelu"}, ValueError, "'gelu'"),
        ((10,), {"init": "orthogonal"}, ValueError, "'orthogonal'"),
    ],
)
def test_mlp_rejects_bad_arguments(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        MLP(*args, **kwargs)


# --------------------------------------------------------------------------- ResNet-32


def test_resnet32_parameter_count_and_depth():
    model = resnet32()
    assert num_parameters(model) == 464_154
    assert num_parameters(model) == pytest.approx(0.46e6, rel=0.02)
    convs3 = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(convs3) + len(linears) == 32
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 31
    assert sorted({c.out_channels for c in convs3}) == [16, 32, 64]
    assert not any(isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) for m in model.modules())


def test_resnet32_forward_and_stage_resolutions():
    torch.manual_seed(0)
    model = resnet32()
    shapes = []
    hooks = [
        b.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape))) for b in model.blocks
    ]
    out = model(torch.randn(2, 3, 32, 32))
    for hook in hooks:
        hook.remove()
    assert out.shape == (2, 10)
    assert shapes[0] == (2, 16, 32, 32)
    assert shapes[5] == (2, 32, 16, 16)
    assert shapes[10] == (2, 64, 8, 8)
    assert len(shapes) == 15


def test_resnet32_option_a_shortcut_is_subsample_and_zero_pad():
    block = resnet32().blocks[5]  # first block of stage 2: 16 → 32 channels, stride 2
    x = torch.randn(2, 16, 8, 8)
    out = block.shortcut(x)
    assert out.shape == (2, 32, 4, 4)
    assert torch.equal(out[:, 8:24], x[:, :, ::2, ::2])
    assert torch.count_nonzero(out[:, :8]) == 0 and torch.count_nonzero(out[:, 24:]) == 0


def test_resnet32_option_b_and_no_batchnorm():
    model_b = resnet32(shortcut="B")
    assert num_parameters(model_b) == 466_906
    assert sum(isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) for m in model_b.modules()) == 2
    plain = resnet32(batchnorm=False)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in plain.modules())
    out = plain(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in plain.parameters())


def test_resnet32_rejects_bad_arguments():
    with pytest.raises(ValueError, match="'C'"):
        resnet32(shortcut="C")
    with pytest.raises(ValueError, match="num_classes"):
        resnet32(num_classes=0)
    with pytest.raises(ValueError, match="'xavier'"):
        resnet32(init="xavier")


# --------------------------------------------------------------------------- LSTM


def test_lstm_parameter_count_and_shapes():
    model = LSTMClassifier(20_000)
    assert num_parameters(model) == 20_000 * 100 + 4 * (100 * 100 + 100 * 100 + 200) + 202
    assert num_parameters(model) == 2_081_002
    tokens = torch.randint(2, 100, (3, 12))
    assert model(tokens).shape == (3, 2)


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_lstm_ignores_trailing_padding(pooling):
    torch.manual_seed(0)
    model = LSTMClassifier(50, 8, 6, pooling=pooling)
    short = torch.tensor([[5, 7, 9]])
    padded = torch.tensor([[5, 7, 9, 0, 0, 0]])
    torch.testing.assert_close(model(short), model(padded))
    batch = torch.tensor([[5, 7, 9, 0, 0], [4, 4, 4, 4, 4]])
    torch.testing.assert_close(model(batch)[0], model(short)[0])
    assert not torch.allclose(model(torch.tensor([[5, 7, 8]])), model(short))


def test_lstm_last_pooling_reads_the_last_valid_state():
    torch.manual_seed(0)
    model = LSTMClassifier(30, 4, 5)
    tokens = torch.tensor([[3, 4, 5, 0], [6, 0, 0, 0]])
    states, _ = model.lstm(model.embedding(tokens))
    expected = model.fc(torch.stack([states[0, 2], states[1, 0]]))
    torch.testing.assert_close(model(tokens), expected)
    assert torch.isfinite(model(torch.zeros(2, 4, dtype=torch.long))).all()


def test_lstm_padding_embedding_is_zero_and_double_backward_works():
    torch.manual_seed(0)
    model = LSTMClassifier(30, 4, 5)
    assert torch.count_nonzero(model.embedding.weight[0]) == 0
    tokens, labels = torch.randint(1, 30, (4, 6)), torch.tensor([0, 1, 1, 0])
    params = [p for p in model.parameters() if p.requires_grad]
    loss = nn.functional.cross_entropy(model(tokens), labels)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    dot = sum((g * g.detach()).sum() for g in grads)
    hvp = torch.autograd.grad(dot, params)
    assert all(torch.isfinite(h).all() for h in hvp)


def test_lstm_rejects_bad_arguments_and_inputs():
    with pytest.raises(ValueError, match="padding_idx"):
        LSTMClassifier(10, padding_idx=10)
    with pytest.raises(ValueError, match="'max'"):
        LSTMClassifier(10, pooling="max")
    with pytest.raises(ValueError, match="vocab_size"):
        LSTMClassifier(1)
    model = LSTMClassifier(10, 4, 4)
    with pytest.raises(ValueError, match="integer tensor"):
        model(torch.zeros(2, 5))
    with pytest.raises(ValueError, match="shape"):
        model(torch.zeros(5, dtype=torch.long))


# --------------------------------------------------------------------------- helper


def test_glorot_uniform_helper_returns_module_and_skips_other_layers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 3))
    model[1].weight.data.fill_(2.0)
    assert glorot_uniform_(model) is model
    assert torch.count_nonzero(model[0].bias) == 0 and torch.count_nonzero(model[3].bias) == 0
    assert model[0].weight.abs().max() <= _glorot_bound(model[0])
    assert torch.all(model[1].weight == 2.0)
    with pytest.raises(TypeError, match="nn.Module"):
        glorot_uniform_(torch.zeros(3))
