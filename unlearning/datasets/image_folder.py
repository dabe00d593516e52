"""Image folders: ``root/{train,test}/<class>/<image>``."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .core import DatasetError, ImageDataset, as_dataset
from .registry import register_dataset


@register_dataset("image-folder", "root/{train,test}/<class>/*.png|jpg (--data-dir)",
                  needs_data_dir=True)
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
    return as_dataset(f"folder:{root.name}", xtr, ytr, xte, yte, classes)
