"""scikit-learn's bundled 8x8 digits: the embedded default, installed with scikit-learn."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .core import ImageDataset, as_dataset, stratified_split
from .idx import idx_bytes
from .registry import register_dataset

SOURCE_FILES = ("digits-images-idx3-ubyte", "digits-labels-idx1-ubyte")


def digits_files(_data_dir: Path | None = None) -> dict[str, bytes | Path]:
    """The bundled digits exported as two IDX files (pixel values 0..16), for version control."""
    from sklearn.datasets import load_digits as _load

    bunch = _load()
    return {SOURCE_FILES[0]: idx_bytes(bunch.images), SOURCE_FILES[1]: idx_bytes(bunch.target)}


@register_dataset("digits", "scikit-learn's bundled 8x8 digits (1,797 images; 75/25 split)",
                  source_files=digits_files)
def load_digits(_data_dir: Path | None = None) -> ImageDataset:
    """1,797 images, a fixed 75/25 stratified split."""
    from sklearn.datasets import load_digits as _load

    bunch = _load()
    x = (bunch.images / 16.0).astype(np.float32)[:, None, :, :]
    xtr, ytr, xte, yte = stratified_split(x, bunch.target, test_fraction=0.25, seed=0)
    return as_dataset("digits", xtr, ytr, xte, yte, [str(i) for i in range(10)])
