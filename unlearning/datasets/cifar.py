"""CIFAR-10/100 in the python layout torchvision extracts (no download)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np

from .core import DatasetError, ImageDataset, as_dataset
from .registry import register_dataset


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
    return as_dataset(f"cifar{num_classes}", xtr, ytr, to_x(test), np.asarray(test[key]), names)


@register_dataset("cifar10", "CIFAR-10 from the extracted python archive (--data-dir)",
                  needs_data_dir=True)
def load_cifar10(root: Path | None) -> ImageDataset:
    return load_cifar(root, 10)  # type: ignore[arg-type]


@register_dataset("cifar100", "CIFAR-100 from the extracted python archive (--data-dir)",
                  needs_data_dir=True)
def load_cifar100(root: Path | None) -> ImageDataset:
    return load_cifar(root, 100)  # type: ignore[arg-type]
