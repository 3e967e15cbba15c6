"""The recipes' --dataset/--data-dir on small files written in the official formats."""

from __future__ import annotations

import gzip
import importlib.util
import json
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def load_recipe(name: str):
    spec = importlib.util.spec_from_file_location(f"recipe_data_{name}", RECIPES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_idx(path: Path, array: np.ndarray) -> None:
    """An IDX file as published (magic 0 0 0x08 ndim, big-endian sizes, uint8 data), gzipped."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def fake_fashion(root: Path, n: int = 96) -> None:
    rng = np.random.default_rng(0)
    raw = root / "FashionMNIST" / "raw"
    write_idx(raw / "train-images-idx3-ubyte.gz", rng.integers(0, 256, size=(n, 28, 28)))
    write_idx(raw / "train-labels-idx1-ubyte.gz", np.arange(n) % 10)


def fake_cifar(root: Path, per_batch: int = 8) -> None:
    """The "python version" batches: pickled dicts with bytes keys, (n, 3072) uint8 rows."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"batch_label": name.encode(), b"labels": [int(v) for v in rng.integers(0, 10, per_batch)],
                 b"data": rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))


def fake_imdb(root: Path) -> None:
    texts = {"pos": ["a great movie", "great fun and great acting", "loved it"],
             "neg": ["a bad movie", "boring and bad", "awful acting"]}
    for split in ("train", "test"):
        for sentiment, reviews in texts.items():
            folder = root / "aclImdb" / split / sentiment
            folder.mkdir(parents=True)
            for i, text in enumerate(reviews):
                (folder / f"{i}_{7 if sentiment == 'pos' else 2}.txt").write_text(text)


def test_fashion_mnist_idx_files_feed_an_mlp_recipe(tmp_path, capsys):
    fake_fashion(tmp_path / "data")
    recipe = load_recipe("other_models")
    argv = ["--dataset", "fashion-mnist", "--data-dir", str(tmp_path / "data"), "--models", "mlp",
            "--lrs", "0.01,0.1", "--batch-sizes", "16", "--max-steps", "4", "--measure-every", "2",
            "--cheap-every", "2", "--probe-fraction", "0.25", "--noise-samples", "4", "--no-progress",
            "--no-figures", "--output-dir", str(tmp_path / "out")]
    assert recipe.main(argv) == 0
    config = json.loads((tmp_path / "out" / "lr_0.01" / "config.json").read_text())
    assert config["dataset"] == "fashion-mnist" and config["num_examples"] == 96
    assert "mlp on fashion-mnist (96 examples" in capsys.readouterr().out


def test_missing_files_are_a_usage_error_naming_them(tmp_path, capsys):
    recipe = load_recipe("eta_batch_grid")
    for argv, expected in (
        (["--dataset", "cifar10"], "--dataset cifar10 reads its official files: pass --data-dir DIR holding "
                                   "cifar-10-batches-py/data_batch_1"),
        (["--dataset", "fashion-mnist", "--data-dir", str(tmp_path)], "train-images-idx3-ubyte.gz"),
        (["--dataset", "imdb", "--data-dir", str(tmp_path)], "aclImdb/train/pos"),
    ):
        with pytest.raises(SystemExit) as exc:
            recipe.main([*argv, "--output-dir", str(tmp_path / "out")])
        assert exc.value.code == 2
        assert expected in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cifar10_pickles_and_imdb_folders_load_with_the_right_models(tmp_path):
    load_recipe("eta_batch_grid")  # puts recipekit on sys.path
    from recipekit.data import build_model, load_dataset

    fake_cifar(tmp_path / "c")
    cifar = load_dataset("cifar10", data_dir=str(tmp_path / "c"))
    assert cifar.x.shape == (40, 3, 32, 32) and cifar.num_classes == 10
    for name in ("simplecnn", "simplecnn-bn", "resnet32", "mlp"):
        assert build_model(name, cifar)(cifar.x[:2]).shape == (2, 10)
    with pytest.raises(ValueError, match="one-channel images"):
        build_model("lstm", cifar)
    fake_imdb(tmp_path / "i")
    imdb = load_dataset("imdb", data_dir=str(tmp_path / "i"))
    assert imdb.is_text and imdb.x.dtype == torch.int64 and sorted(imdb.y.tolist()) == [0, 0, 0, 1, 1, 1]
    assert build_model("lstm", imdb)(imdb.x[:2]).shape == (2, 2)
    with pytest.raises(ValueError, match="cannot read token ids"):
        build_model("simplecnn", imdb)


def test_row_lstm_reads_rows_and_mnist14_halves_the_image(tmp_path):
    load_recipe("other_models")
    from recipekit.data import RowLSTM, load_dataset

    model = RowLSTM(28)
    x = torch.randn(3, 1, 28, 28)
    assert model(x).shape == (3, 10)
    # the last row changes the output (it is the last time step read)
    y = x.clone()
    y[:, :, -1] += 1.0
    assert not torch.allclose(model(x), model(y))
    with pytest.raises(ValueError, match=r"\(N, 1, H, W\)"):
        model(torch.randn(3, 28, 28))
    full, small = load_dataset("mnist"), load_dataset("mnist14")
    assert small.x.shape == (5000, 1, 14, 14)
    assert torch.allclose(small.x[0, 0, 0, 0], full.x[0, 0, :2, :2].mean())
