"""Datasets with stable instance ids.

Every dataset is held in memory as float tensors in [0, 1] with shape (N, C, H, W); the
instance id of a training example is its integer index in the training split, and that
meaning never changes for a given dataset name. Normalisation is not applied here: it lives
inside the model (see ``models.Normalize``) so attacks work in pixel space.

Nothing here downloads: ``digits`` ships with scikit-learn, ``fashion-mnist`` is read from
IDX files (Debian's ``dataset-fashion-mnist`` by default), CIFAR and image folders are read
from files the user already has.
"""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

FASHION_MNIST_DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "t-shirt", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle-boot",
)


class DatasetError(ValueError):
    """A dataset cannot be loaded; the message says what is missing and how to get it."""


@dataclass(frozen=True)
class ImageDataset:
    """A classification dataset split into train (instance ids = row index) and test."""

    name: str
    train_x: torch.Tensor  # (N, C, H, W) float32 in [0, 1]
    train_y: torch.Tensor  # (N,) int64
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    class_names: tuple[str, ...]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_x.shape[1:])  # type: ignore[return-value]

    @property
    def num_train(self) -> int:
        return int(self.train_x.shape[0])

    def channel_stats(self) -> tuple[list[float], list[float]]:
        """Per-channel mean and std of the training images (for the model's Normalize)."""
        x = self.train_x.transpose(0, 1).reshape(self.train_x.shape[1], -1)
        return x.mean(1).tolist(), x.std(1).clamp_min(1e-3).tolist()

    def check_ids(self, ids: list[int] | torch.Tensor) -> torch.Tensor:
        """Return ids as a tensor, or raise if any is not a training instance id."""
        t = torch.as_tensor(ids, dtype=torch.long)
        bad = t[(t < 0) | (t >= self.num_train)]
        if len(bad):
            raise DatasetError(
                f"instance ids {bad[:5].tolist()} are outside the training split of "
                f"{self.name} (valid: 0..{self.num_train - 1})"
            )
        return t


def _split(x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int):
    """Deterministic stratified split; the permutation depends only on (seed, labels)."""
    rng = np.random.default_rng(seed)
    train_idx, test_idx = [], []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        idx = idx[rng.permutation(len(idx))]
        n_test = round(len(idx) * test_fraction)
        test_idx.append(idx[:n_test])
        train_idx.append(idx[n_test:])
    train = np.sort(np.concatenate(train_idx))
    test = np.sort(np.concatenate(test_idx))
    return x[train], y[train], x[test], y[test]


def _as_dataset(name, xtr, ytr, xte, yte, class_names) -> ImageDataset:
    to_x = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
    to_y = lambda a: torch.from_numpy(np.asarray(a, dtype=np.int64))
    return ImageDataset(
        name=name,
        train_x=to_x(xtr), train_y=to_y(ytr), test_x=to_x(xte), test_y=to_y(yte),
        num_classes=len(class_names), class_names=tuple(class_names),
    )


def load_digits() -> ImageDataset:
    """scikit-learn's bundled 8x8 digits: 1,797 images, a fixed 75/25 stratified split."""
    from sklearn.datasets import load_digits as _load

    bunch = _load()
    x = (bunch.images / 16.0).astype(np.float32)[:, None, :, :]
    xtr, ytr, xte, yte = _split(x, bunch.target, test_fraction=0.25, seed=0)
    return _as_dataset("digits", xtr, ytr, xte, yte, [str(i) for i in range(10)])


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped), checking its header against its size."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DatasetError(f"{path} is not an unsigned-byte IDX file")
    ndim = data[3]
    dims = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    expected = int(np.prod(dims))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != expected:
        raise DatasetError(f"{path}: header says {dims} but holds {body.size} bytes")
    return body.reshape(dims)


def _find(root: Path, stem: str) -> Path:
    for candidate in (root / f"{stem}.gz", root / stem):
        if candidate.exists():
            return candidate
    raise DatasetError(
        f"{stem}(.gz) not found in {root}. Fashion-MNIST is read from IDX files; on Debian "
        "install them with `apt-get install dataset-fashion-mnist`, or pass --data-dir."
    )


def load_fashion_mnist(root: str | os.PathLike | None = None) -> ImageDataset:
    """Fashion-MNIST from its four standard IDX files (60k train / 10k test, 28x28)."""
    root = Path(root or os.environ.get("FASHION_MNIST_DIR", FASHION_MNIST_DEFAULT_DIR))
    xtr = read_idx(_find(root, "train-images-idx3-ubyte"))
    ytr = read_idx(_find(root, "train-labels-idx1-ubyte"))
    xte = read_idx(_find(root, "t10k-images-idx3-ubyte"))
    yte = read_idx(_find(root, "t10k-labels-idx1-ubyte"))
    to_float = lambda a: (a.astype(np.float32) / 255.0)[:, None]
    return _as_dataset("fashion-mnist", to_float(xtr), ytr, to_float(xte), yte,
                       FASHION_MNIST_CLASSES)


def load_cifar(root: str | os.PathLike, num_classes: int = 10) -> ImageDataset:
    """CIFAR-10/100 in the python-pickle layout torchvision extracts (no download)."""
    root = Path(root)
    sub = root / ("cifar-10-batches-py" if num_classes == 10 else "cifar-100-python")
    base = sub if sub.exists() else root

    def unpickle(p: Path) -> dict:
        if not p.exists():
            raise DatasetError(f"{p} not found: extract the CIFAR python archive into {root}")
        with open(p, "rb") as f:
            # CIFAR's own archive format is a pickle; only load files the user put there.
            return pickle.load(f, encoding="latin1")

    key = "labels" if num_classes == 10 else "fine_labels"
    if num_classes == 10:
        parts = [unpickle(base / f"data_batch_{i}") for i in range(1, 6)]
        test = unpickle(base / "test_batch")
        names = unpickle(base / "batches.meta")["label_names"]
    else:
        parts = [unpickle(base / "train")]
        test = unpickle(base / "test")
        names = unpickle(base / "meta")["fine_label_names"]
    to_x = lambda d: (np.asarray(d["data"], np.uint8).reshape(-1, 3, 32, 32) / 255.0)
    xtr = np.concatenate([to_x(p) for p in parts])
    ytr = np.concatenate([np.asarray(p[key]) for p in parts])
    return _as_dataset(f"cifar{num_classes}", xtr, ytr, to_x(test), np.asarray(test[key]), names)


def load_image_folder(root: str | os.PathLike, image_size: int = 32) -> ImageDataset:
    """``root/{train,test}/<class>/<image>``; classes sorted by name, files sorted by path."""
    from PIL import Image

    root = Path(root)
    splits = {}
    for split in ("train", "test"):
        d = root / split
        if not d.is_dir():
            raise DatasetError(f"image folder {root} needs train/ and test/ sub-folders")
        splits[split] = d
    classes = sorted(p.name for p in splits["train"].iterdir() if p.is_dir())
    if not classes:
        raise DatasetError(f"{splits['train']} holds no class folders")

    def read(split_dir: Path):
        xs, ys = [], []
        for label, cls in enumerate(classes):
            for f in sorted((split_dir / cls).glob("*")):
                if f.suffix.lower() not in {".png", ".jpg", ".jpeg", ".bmp", ".gif"}:
                    continue
                with Image.open(f) as opened:
                    rgb = opened.convert("RGB").resize((image_size, image_size))
                    xs.append(np.asarray(rgb, np.float32).transpose(2, 0, 1) / 255.0)
                ys.append(label)
        if not xs:
            raise DatasetError(f"{split_dir} holds no images")
        return np.stack(xs), np.asarray(ys)

    xtr, ytr = read(splits["train"])
    xte, yte = read(splits["test"])
    return _as_dataset(f"folder:{root.name}", xtr, ytr, xte, yte, classes)


DATASETS = ("digits", "fashion-mnist", "cifar10", "cifar100", "image-folder")


def load_dataset(name: str, data_dir: str | os.PathLike | None = None) -> ImageDataset:
    """Load a dataset by name. ``data_dir`` is required for cifar*/image-folder."""
    if name == "digits":
        return load_digits()
    if name == "fashion-mnist":
        return load_fashion_mnist(data_dir)
    if name in ("cifar10", "cifar100"):
        if data_dir is None:
            raise DatasetError(f"{name} needs --data-dir pointing at the extracted archive")
        return load_cifar(data_dir, 10 if name == "cifar10" else 100)
    if name == "image-folder":
        if data_dir is None:
            raise DatasetError("image-folder needs --data-dir with train/ and test/ inside")
        return load_image_folder(data_dir)
    raise DatasetError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")


def sample_forget_ids(num_train: int, k: int, seed: int) -> list[int]:
    """k random training ids for a seed; nested across k (as in the reference code)."""
    if not 0 < k <= num_train:
        raise ValueError(f"k must be in 1..{num_train}, got {k}")
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(num_train, generator=g)[:k].tolist()


def sample_retain_ids(num_train: int, exclude: list[int], fraction: float, seed: int) -> list[int]:
    """A small retain sample (``fraction`` of the training set) disjoint from ``exclude``."""
    if not 0 < fraction <= 0.01 + 1e-9:
        raise ValueError(f"a retain sample is at most 1% of the training set, got {fraction}")
    g = torch.Generator().manual_seed(10_000 + seed)
    excluded = {int(i) for i in exclude}
    n = max(1, round(num_train * fraction))
    ids = [i for i in torch.randperm(num_train, generator=g).tolist() if i not in excluded]
    return ids[:n]
