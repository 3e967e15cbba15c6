"""The networks of Jastrzebski et al. (ICLR 2020), written in plain PyTorch.

The paper trains a small Keras CNN (with and without BatchNorm), ResNet-32 on CIFAR-10,
an LSTM on IMDB and an MLP on FashionMNIST. These are our PyTorch definitions of them;
the appendix with the exact Keras code is unavailable, so the choices we made are listed
in ``docs/models_and_data.md`` and in each docstring.

Parameter counts (measured, 10 classes): ``SimpleCNN`` 361,898 at 32×32×3 (BN variant
362,538), 271,210 at 28×28×1, 74,602 at 8×8×1; ``resnet32`` 464,154 (option-A
shortcuts); ``LSTMClassifier`` 2,081,002 with a 20,000-word vocabulary.

Example:
    >>> import torch
    >>> model = SimpleCNN()
    >>> model(torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from .. import _validation as V

__all__ = [
    "MLP",
    "LSTMClassifier",
    "ResNetCIFAR",
    "SimpleCNN",
    "glorot_uniform_",
    "num_parameters",
    "resnet32",
]

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def glorot_uniform_(module: nn.Module) -> nn.Module:
    """Re-initialise every Linear and Conv layer in ``module`` the way Keras does by default.

    Weights get Glorot/Xavier-uniform values, U(-a, a) with a = sqrt(6 / (fan_in + fan_out))
    (for a conv, fans include the kernel area), and biases become zero. The paper's models
    were Keras models with this default, and the initial curvature (the early λ1^H plateau)
    depends on it. Other layers (BatchNorm, Embedding, LSTM) are left untouched.

    Args:
        module: the module to initialise in place (its submodules are visited too).

    Returns:
        The same module, for chaining.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"glorot_uniform_ expects an nn.Module, got {type(module).__name__}")
    for layer in module.modules():
        if isinstance(layer, (nn.Linear, *_CONV_TYPES)):
            nn.init.xavier_uniform_(layer.weight)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
    return module


def num_parameters(module: nn.Module, *, trainable_only: bool = True) -> int:
    """Count the scalar parameters of ``module`` (only those with ``requires_grad`` by default)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


class SimpleCNN(nn.Module):
    """The paper's "SimpleCNN": four 3×3 convolutions, two max-pools and two dense layers.

    Architecture: conv32(same) → ReLU → conv32(valid) → ReLU → maxpool2 → conv64(same) →
    ReLU → conv64(valid) → ReLU → maxpool2 → flatten → dense128 → ReLU → dense(num_classes).
    At 32×32×3 it has 361,898 parameters (the paper's "≈ 0.36 M"). The flattened size is
    computed from ``image_size``, so it also runs on 28×28 MNIST (271,210 parameters) and
    8×8 digits (74,602). A pool that would meet a 1×1 map (the second pool at 8×8) is
    replaced by the identity, since pooling 1×1 with floor rounding would give 0×0.

    With ``batchnorm=True`` a BatchNorm layer follows every conv and the dense128 layer
    (before the ReLU), as in the paper's BN variant. The layers keep their biases, as a
    Keras model with inserted BatchNormalization layers would (they are redundant there).

    Args:
        in_channels: input channels (3 for CIFAR-10, 1 for MNIST).
        num_classes: number of outputs (logits).
        image_size: input height and width, an int or an (H, W) pair; at least 8.
        batchnorm: insert BatchNorm after each conv and the hidden dense layer.
        init: ``"glorot"`` (Keras default, zero biases; the paper) or ``"default"``
            (PyTorch's default initialisation).

    Example:
        >>> SimpleCNN(1, 10, 28)(torch.zeros(4, 1, 28, 28)).shape
        torch.Size([4, 10])
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 10,
        image_size: int | tuple[int, int] = 32,
        *,
        batchnorm: bool = False,
        init: str = "glorot",
    ) -> None:
        super().__init__()
        V.integer("in_channels", in_channels, 1)
        V.integer("num_classes", num_classes, 1)
        V.choice("init", init, ("glorot", "default"))
        height, width = self._parse_image_size(image_size)
        self.image_size = (height, width)
        self.batchnorm = bool(batchnorm)

        layers: list[nn.Module] = []
        channels = in_channels
        for out_channels in (32, 64):
            # "same" then "valid" 3×3 convolutions, then a 2×2 max-pool.
            for padding in (1, 0):
                layers.append(nn.Conv2d(channels, out_channels, 3, padding=padding))
                if batchnorm:
                    layers.append(nn.BatchNorm2d(out_channels))
                layers.append(nn.ReLU())
                channels = out_channels
                height, width = height - 2 + 2 * padding, width - 2 + 2 * padding
            if min(height, width) >= 2:
                layers.append(nn.MaxPool2d(2))
                height, width = height // 2, width // 2
            else:
                layers.append(nn.Identity())
        self.features = nn.Sequential(*layers)
        self.flat_features = channels * height * width

        head: list[nn.Module] = [nn.Flatten(), nn.Linear(self.flat_features, 128)]
        if batchnorm:
            head.append(nn.BatchNorm1d(128))
        head += [nn.ReLU(), nn.Linear(128, num_classes)]
        self.classifier = nn.Sequential(*head)

        if init == "glorot":
            glorot_uniform_(self)

    @staticmethod
    def _parse_image_size(image_size: int | tuple[int, int]) -> tuple[int, int]:
        if isinstance(image_size, int) and not isinstance(image_size, bool):
            sizes = (image_size, image_size)
        elif (
            isinstance(image_size, (tuple, list))
            and len(image_size) == 2
            and all(isinstance(s, int) and not isinstance(s, bool) for s in image_size)
        ):
            sizes = (int(image_size[0]), int(image_size[1]))
        else:
            raise TypeError(
                f"image_size must be an int or an (H, W) pair of ints, got {image_size!r}"
            )
        if min(sizes) < 8:
            # Two valid convs and a pool need at least 8 pixels: 8 → 6 → 3 → 1.
            raise ValueError(f"image_size must be at least 8 in each dimension, got {image_size!r}")
        return sizes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map images (N, C, H, W) to logits (N, num_classes)."""
        return self.classifier(self.features(x))


class MLP(nn.Module):
    """A fully connected classifier that flattens its input (the paper's FashionMNIST MLP).

    Args:
        in_features: size of one flattened input (784 for 28×28 images).
        hidden: widths of the hidden layers; ``()`` gives a linear (softmax-regression) model.
        num_classes: number of outputs (logits).
        activation: ``"tanh"`` (smooth, so Hessians have no kinks) or ``"relu"``.
        init: ``"default"`` (PyTorch) or ``"glorot"`` (Keras default, zero biases).

    Example:
        >>> MLP(784)(torch.zeros(3, 1, 28, 28)).shape
        torch.Size([3, 10])
    """

    def __init__(
        self,
        in_features: int,
        hidden: Sequence[int] = (200, 200),
        num_classes: int = 10,
        *,
        activation: str = "tanh",
        init: str = "default",
    ) -> None:
        super().__init__()
        V.integer("in_features", in_features, 1)
        V.integer("num_classes", num_classes, 1)
        V.choice("activation", activation, ("tanh", "relu"))
        V.choice("init", init, ("default", "glorot"))
        if isinstance(hidden, int) or not isinstance(hidden, Sequence):
            raise TypeError(f"hidden must be a sequence of ints such as (200, 200), got {hidden!r}")
        for width in hidden:
            V.integer("each hidden width", width, 1)
        self.in_features = in_features
        act = nn.Tanh if activation == "tanh" else nn.ReLU
        layers: list[nn.Module] = [nn.Flatten()]
        width_in = in_features
        for width in hidden:
            layers += [nn.Linear(width_in, width), act()]
            width_in = width
        layers.append(nn.Linear(width_in, num_classes))
        self.net = nn.Sequential(*layers)
        if init == "glorot":
            glorot_uniform_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map inputs (N, ...) with ``in_features`` values per example to logits (N, num_classes)."""
        return self.net(x)


class _ShortcutA(nn.Module):
    """Parameter-free "option A" shortcut: subsample by 2 and zero-pad the new channels."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        extra = out_channels - in_channels
        self.pad = (extra // 2, extra - extra // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, *self.pad))


class _BasicBlock(nn.Module):
    """Two 3×3 convs with a residual connection (He et al. 2016, CIFAR variant)."""

    def __init__(
        self, in_channels: int, out_channels: int, stride: int, batchnorm: bool, shortcut: str
    ) -> None:
        super().__init__()

        def norm(channels: int) -> nn.Module:
            return nn.BatchNorm2d(channels) if batchnorm else nn.Identity()

        # Without BN the conv needs its own bias; with BN the BN shift replaces it.
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=not batchnorm)
        self.bn1 = norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=not batchnorm)
        self.bn2 = norm(out_channels)
        if stride == 1 and in_channels == out_channels:
            self.shortcut: nn.Module = nn.Identity()
        elif shortcut == "A":
            self.shortcut = _ShortcutA(in_channels, out_channels)
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=not batchnorm),
                norm(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetCIFAR(nn.Module):
    """The CIFAR ResNet of He et al. (2016): a 3×3 stem, three stages of basic blocks, global pool.

    Depth is 6 × ``blocks_per_stage`` + 2 (5 blocks per stage gives ResNet-32). Stages have
    16, 32 and 64 channels; the first block of stages 2 and 3 halves the resolution.

    Args:
        blocks_per_stage: basic blocks in each of the three stages.
        num_classes: number of outputs (logits).
        in_channels: input channels.
        batchnorm: BatchNorm after every conv (the standard model). Without it convs get
            biases, and the last conv of every residual branch starts at zero so that the
            un-normalised residual sum does not blow up at initialisation (our choice).
        shortcut: ``"A"`` (parameter-free subsample + zero-pad, as in He et al. for CIFAR)
            or ``"B"`` (1×1 conv, with BN if ``batchnorm``) where the shape changes.
        init: ``"kaiming"`` (He-normal convs and dense layer, zero biases, as He et al.),
            ``"glorot"`` (Keras default) or ``"default"`` (PyTorch's default).
    """

    def __init__(
        self,
        blocks_per_stage: int = 5,
        num_classes: int = 10,
        in_channels: int = 3,
        *,
        batchnorm: bool = True,
        shortcut: str = "A",
        init: str = "kaiming",
    ) -> None:
        super().__init__()
        V.integer("blocks_per_stage", blocks_per_stage, 1)
        V.integer("num_classes", num_classes, 1)
        V.integer("in_channels", in_channels, 1)
        V.choice("shortcut", shortcut, ("A", "B"))
        V.choice("init", init, ("kaiming", "glorot", "default"))
        self.batchnorm = bool(batchnorm)
        self.conv = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=not batchnorm)
        self.bn = nn.BatchNorm2d(16) if batchnorm else nn.Identity()
        blocks: list[nn.Module] = []
        channels = 16
        for stage, width in enumerate((16, 32, 64)):
            for index in range(blocks_per_stage):
                stride = 2 if stage > 0 and index == 0 else 1
                blocks.append(_BasicBlock(channels, width, stride, batchnorm, shortcut))
                channels = width
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(channels, num_classes)

        if init == "kaiming":
            for layer in self.modules():
                if isinstance(layer, (nn.Conv2d, nn.Linear)):
                    nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
                    if layer.bias is not None:
                        nn.init.zeros_(layer.bias)
        elif init == "glorot":
            glorot_uniform_(self)
        if not batchnorm:
            for block in self.blocks:
                nn.init.zeros_(block.conv2.weight)  # type: ignore[union-attr, arg-type]  # a BasicBlock's conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map images (N, C, H, W) to logits (N, num_classes); any H, W ≥ 4 works."""
        out = F.relu(self.bn(self.conv(x)))
        out = self.blocks(out)
        return self.fc(out.mean(dim=(2, 3)))


def resnet32(
    num_classes: int = 10,
    *,
    batchnorm: bool = True,
    shortcut: str = "A",
    in_channels: int = 3,
    init: str = "kaiming",
) -> ResNetCIFAR:
    """ResNet-32 for CIFAR-10: 3 stages × 5 basic blocks, 16/32/64 channels.

    With the default option-A (parameter-free) shortcuts it has 464,154 parameters at
    10 classes (the "0.46 M" of He et al.); option B (1×1 convs) adds 2,752 more.
    See :class:`ResNetCIFAR` for the arguments.

    Example:
        >>> resnet32()(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """
    return ResNetCIFAR(
        5, num_classes, in_channels, batchnorm=batchnorm, shortcut=shortcut, init=init
    )


class LSTMClassifier(nn.Module):
    """Embedding → one-layer LSTM → linear classifier, for padded token sequences (IMDB).

    Sequences are right-padded with ``padding_idx`` (as :func:`sgdbreak.workloads.datasets.load_imdb`
    returns them). With ``pooling="last"`` (default) the classifier reads the LSTM hidden
    state at each sequence's last non-pad token, so trailing padding has no effect on the
    output; ``"mean"`` averages the hidden states over the non-pad tokens. An all-pad
    sequence reads the first position (``"last"``) or zeros (``"mean"``). Gathering by index
    instead of packing keeps the model usable with double backward and ``torch.func``.

    Args:
        vocab_size: number of token ids (including pad and unknown).
        embed_dim: embedding width.
        hidden_size: LSTM hidden width.
        num_classes: number of outputs (logits).
        padding_idx: the pad token id; its embedding is zero and receives no gradient.
        pooling: ``"last"`` or ``"mean"`` (see above).

    Example:
        >>> model = LSTMClassifier(50)
        >>> model(torch.tensor([[5, 7, 9, 0], [3, 0, 0, 0]])).shape
        torch.Size([2, 2])
    """

    def __init__(
        self,
        vocab_size: int,
        embed_dim: int = 100,
        hidden_size: int = 100,
        num_classes: int = 2,
        padding_idx: int | None = 0,
        *,
        pooling: str = "last",
    ) -> None:
        super().__init__()
        V.integer("vocab_size", vocab_size, minimum=2)
        V.integer("embed_dim", embed_dim, 1)
        V.integer("hidden_size", hidden_size, 1)
        V.integer("num_classes", num_classes, 1)
        V.choice("pooling", pooling, ("last", "mean"))
        if padding_idx is not None:
            V.integer("padding_idx", padding_idx, minimum=0)
            if padding_idx >= vocab_size:
                raise ValueError(
                    f"padding_idx must be < vocab_size={vocab_size}, got {padding_idx}"
                )
        self.padding_idx = padding_idx
        self.pooling = pooling
        self.embedding = nn.Embedding(vocab_size, embed_dim, padding_idx=padding_idx)
        self.lstm = nn.LSTM(embed_dim, hidden_size, batch_first=True)
        self.fc = nn.Linear(hidden_size, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Map token ids (N, T) of an integer dtype to logits (N, num_classes)."""
        if tokens.dim() != 2 or tokens.is_floating_point() or tokens.is_complex():
            raise ValueError(
                f"tokens must be an integer tensor of shape (N, T), got dtype {tokens.dtype} "
                f"and shape {tuple(tokens.shape)}"
            )
        states, _ = self.lstm(self.embedding(tokens))  # (N, T, H)
        if self.padding_idx is None:
            valid = torch.ones_like(tokens, dtype=torch.bool)
        else:
            valid = tokens != self.padding_idx
        if self.pooling == "mean":
            weights = valid.to(states.dtype).unsqueeze(-1)
            pooled = (states * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        else:
            # Position of the last non-pad token (robust to any padding layout).
            positions = torch.arange(tokens.shape[1], device=tokens.device)
            last = torch.where(valid, positions, -1).amax(1).clamp_min(0)
            index = last.view(-1, 1, 1).expand(-1, 1, states.shape[-1])
            pooled = states.gather(1, index).squeeze(1)
        return self.fc(pooled)
