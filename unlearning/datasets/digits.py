"""scikit-learn's bundled 8x8 digits: the embedded default, installed with scikit-learn."""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np

from .core import ImageDataset, as_dataset, stratified_split
from .idx import idx_bytes
from .registry import register_dataset

SOURCE_FILES = ("digits-images-idx3-ubyte", "digits-labels-idx1-ubyte")


def _bundled() -> tuple[np.ndarray, np.ndarray]:
    """(images 8x8, labels) as scikit-learn's ``load_digits`` reads them, from the file it
    ships (``sklearn/datasets/data/digits.csv.gz``) without importing scikit-learn, whose
    import costs more than the read."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the digits dataset ships with scikit-learn, which is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / "digits.csv.gz"
    with gzip.open(path, mode="rt", encoding="utf-8") as f:
        data = np.loadtxt(f, delimiter=",")
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int, copy=False)


def digits_files(_data_dir: Path | None = None) -> dict[str, bytes | Path]:
    """The bundled digits exported as two IDX files (pixel values 0..16), for version control."""
    images, target = _bundled()
    return {SOURCE_FILES[0]: idx_bytes(images), SOURCE_FILES[1]: idx_bytes(target)}


@register_dataset("digits", "scikit-learn's bundled 8x8 digits (1,797 images; 75/25 split)",
                  source_files=digits_files)
def load_digits(_data_dir: Path | None = None) -> ImageDataset:
    """1,797 images, a fixed 75/25 stratified split."""
    images, target = _bundled()
    x = (images / 16.0).astype(np.float32)[:, None, :, :]
    xtr, ytr, xte, yte = stratified_split(x, target, test_fraction=0.25, seed=0)
    return as_dataset("digits", xtr, ytr, xte, yte, [str(i) for i in range(10)])
