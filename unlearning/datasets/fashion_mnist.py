"""Fashion-MNIST from its four standard IDX files (Debian's ``dataset-fashion-mnist``)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .core import DatasetError, ImageDataset, as_dataset
from .idx import read_idx
from .registry import register_dataset

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
CLASSES = (
    "t-shirt", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle-boot",
)
STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
         "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _root(data_dir: str | os.PathLike | None) -> Path:
    return Path(data_dir or os.environ.get("FASHION_MNIST_DIR") or DEFAULT_DIR)


def _find(root: Path, stem: str) -> Path:
    for candidate in (root / f"{stem}.gz", root / stem):
        if candidate.exists():
            return candidate
    raise DatasetError(
        f"{stem}(.gz) not found in {root}. Fashion-MNIST is read from IDX files; on Debian "
        "install them with `apt-get install dataset-fashion-mnist`, or pass --data-dir."
    )


def source_files(data_dir: Path | None) -> dict[str, bytes | Path]:
    """The four IDX files as found (gzipped or not); the pipeline keeps a copy of them."""
    root, found = _root(data_dir), dict[str, bytes | Path]()
    for stem in STEMS:
        for candidate in (root / f"{stem}.gz", root / stem):
            if candidate.is_file():
                found[candidate.name] = candidate
                break
    return found


@register_dataset("fashion-mnist", "Fashion-MNIST, 60k/10k 28x28 (IDX files; "
                  "`apt-get install dataset-fashion-mnist`)", source_files=source_files)
def load_fashion_mnist(root: str | os.PathLike | None = None) -> ImageDataset:
    """Fashion-MNIST from its four standard IDX files (60k train / 10k test, 28x28)."""
    root = _root(root)
    xtr = read_idx(_find(root, "train-images-idx3-ubyte"))
    ytr = read_idx(_find(root, "train-labels-idx1-ubyte"))
    xte = read_idx(_find(root, "t10k-images-idx3-ubyte"))
    yte = read_idx(_find(root, "t10k-labels-idx1-ubyte"))
    to_float = lambda a: (a.astype(np.float32) / 255.0)[:, None]
    return as_dataset("fashion-mnist", to_float(xtr), ytr, to_float(xte), yte,
                       CLASSES)
