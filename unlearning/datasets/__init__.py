"""Datasets behind one registry; importing this package registers them all.

Nothing here downloads: ``digits`` ships with scikit-learn, ``fashion-mnist`` is read from
IDX files (Debian's ``dataset-fashion-mnist`` by default), CIFAR, image folders and index
files are read from files the user already has (the last two lazily: ``lazy.py``).
"""

from . import cifar, digits, fashion_mnist, image_folder, index_file  # noqa: F401  (registration)
from .core import (
    DatasetError,
    ImageDataset,
    sample_forget_ids,
    sample_retain_ids,
)
from .digits import load_digits
from .registry import DatasetInfo, get_dataset, list_datasets, load_dataset, register_dataset

__all__ = [
    "DatasetError", "DatasetInfo", "ImageDataset", "get_dataset", "list_datasets",
    "load_dataset", "load_digits", "register_dataset", "sample_forget_ids", "sample_retain_ids",
]
