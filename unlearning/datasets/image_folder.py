"""Image folders, torchvision's ``ImageFolder`` layout: ``ROOT/{train,test}/<class>/<image>``.

Classes are the folder names under ``train/``, sorted (as ``ImageFolder`` numbers them, so a
model trained with it keeps its class order); images are the files with torchvision's image
extensions anywhere below a class folder. Nothing is decoded at load: the images are read on
access (``lazy.LazyImages``). An image's key is its path relative to ``ROOT``
(``train/cat/0001.png``); instance ids are positions in the sorted training keys.
"""

from __future__ import annotations

import os
from pathlib import Path

from .core import DatasetError, ImageDataset
from .lazy import (
    IMAGE_EXTENSIONS,
    INDEX_FILE,
    SPLITS,
    Entry,
    file_dataset,
    index_bytes,
    key_problem,
)
from .registry import register_dataset


def scan_folder(root: str | os.PathLike) -> tuple[list[str], list[Entry]]:
    """(class names, entries) of an image folder, without opening any image."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"image folder {root} does not exist (dataset.data_dir in params.yaml)")
    for split in SPLITS:
        if not (root / split).is_dir():
            raise DatasetError(f"image folder {root} needs train/ and test/ sub-folders "
                               "(ROOT/train/<class>/<image>, ROOT/test/<class>/<image>)")
    with os.scandir(root / "train") as it:
        classes = sorted(e.name for e in it if e.is_dir())  # torchvision's find_classes
    if not classes:
        raise DatasetError(f"{root / 'train'} holds no class folders")
    label = {c: i for i, c in enumerate(classes)}
    entries: list[Entry] = []
    for split in SPLITS:
        with os.scandir(root / split) as it:
            found = sorted(e.name for e in it if e.is_dir())
        unknown = [c for c in found if c not in label]
        if unknown:
            raise DatasetError(f"{root / split / unknown[0]}: class {unknown[0]!r} has no "
                               "folder under train/ (the classes are train/'s folders)")
        for cls in found:
            top = os.path.join(root, split, cls)  # strings, not Paths: see lazy.py
            for folder, _, names in sorted(os.walk(top, followlinks=True)):
                rel = os.path.relpath(folder, root).replace(os.sep, "/")
                for fname in sorted(names):
                    if not fname.lower().endswith(IMAGE_EXTENSIONS):
                        continue
                    key = f"{rel}/{fname}"
                    problem = key_problem(key)
                    if problem:
                        raise DatasetError(f"image {os.path.join(root, key)}: its key {key!r} "
                                           f"{problem}")
                    entries.append(Entry(split, key, label[cls], key))
    return classes, entries


def folder_index(data_dir: Path | None) -> dict[str, bytes | Path]:
    """The folder's index with a sha256 per image (every image is read): what data/dataset
    keeps under version control in place of the images."""
    if data_dir is None:
        return {}
    classes, entries = scan_folder(data_dir)
    return {INDEX_FILE: index_bytes(entries, classes, Path(data_dir))}


@register_dataset("image-folder", "your images in ROOT/{train,test}/<class>/* (torchvision "
                  "ImageFolder layout; dataset.data_dir: ROOT), read lazily",
                  needs_data_dir=True, source_files=folder_index,
                  options=("image_size", "channels"))
def load_image_folder(root: str | os.PathLike, image_size: int = 0,
                      channels: int = 0) -> ImageDataset:
    """The folder as a lazy ImageDataset (images decoded on access)."""
    classes, entries = scan_folder(root)
    return file_dataset("image-folder", Path(root), entries, classes, image_size, channels)
