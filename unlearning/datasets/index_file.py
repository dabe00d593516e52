"""Index files: a CSV listing the images, one row each: ``path,label,split[,id]``.

``dataset.data_dir`` names the CSV itself, or a folder holding ``index.csv``. ``path`` is an
image file relative to the CSV's folder (or absolute, when there is an ``id`` column);
``split`` is ``train`` or ``test``; ``label`` is a class name, or a class index when every
label is an integer (then the classes are 0..max, in that order). Other columns are ignored.
An image's key is its ``id``, or without that column its path as written (``./`` dropped);
instance ids are positions in the sorted training keys. Images are read on access.
"""

from __future__ import annotations

import csv
import io
import os
import re
from pathlib import Path

from .core import DatasetError, ImageDataset
from .lazy import INDEX_FILE, SPLITS, Entry, file_dataset, index_bytes, key_problem
from .registry import register_dataset

REQUIRED = ("path", "label", "split")


def index_path(data_dir: str | os.PathLike) -> Path:
    path = Path(data_dir)
    if path.is_dir():
        path = path / INDEX_FILE
    if not path.is_file():
        raise DatasetError(f"index file {path} not found (dataset.data_dir: the CSV, or a "
                           f"folder holding {INDEX_FILE})")
    return path


def read_user_index(data_dir: str | os.PathLike) -> tuple[Path, list[str], list[Entry]]:
    """(root: the CSV's folder, class names, entries) of an index file; DatasetError naming
    the line for a row that cannot be an image of the dataset."""
    path = index_path(data_dir)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"cannot read index file {path}: {e}") from None
    reader = csv.DictReader(io.StringIO(text, newline=""), skipinitialspace=True)
    fields = [f.strip() for f in reader.fieldnames or []]
    missing = [c for c in REQUIRED if c not in fields]
    if missing:
        raise DatasetError(f"index file {path}: no {', '.join(missing)} column (needs "
                           "path,label,split and optionally id)")
    reader.fieldnames = fields
    has_id = "id" in fields
    rows: list[tuple[int, str, str, str, str]] = []  # line, split, key, label, path
    seen: dict[str, int] = {}
    try:
        for r in reader:
            line = reader.line_num
            values = {k: (r.get(k) or "").strip() for k in ("path", "label", "split", "id")}
            if not any(values.values()):
                continue
            where = f"index file {path} line {line}"
            if not values["path"] or not values["label"]:
                raise DatasetError(f"{where}: path and label are required")
            split = values["split"].lower()
            if split not in SPLITS:
                raise DatasetError(f"{where}: split {values['split']!r} is not train or test")
            file = values["path"]
            if has_id:
                key = values["id"]
            else:
                key = "/".join(p for p in file.replace("\\", "/").split("/") if p not in ("", "."))
                key = ("/" + key) if file.startswith(("/", "\\")) else key  # (refused below)
            problem = key_problem(key)
            if problem:
                what = "id" if has_id else "path (the key without an id column)"
                raise DatasetError(f"{where}: the {what} {key!r} {problem}")
            if key in seen:
                raise DatasetError(f"{where}: {'id' if has_id else 'path'} {key!r} is also on "
                                   f"line {seen[key]} (keys are unique)")
            seen[key] = line
            rows.append((line, split, key, values["label"], file))
    except csv.Error as e:
        raise DatasetError(f"index file {path} line {reader.line_num}: not valid CSV ({e})") from None
    if not rows:
        raise DatasetError(f"index file {path} lists no images")
    if all(re.fullmatch(r"[0-9]{1,9}", r[3]) for r in rows):
        classes = [str(i) for i in range(max(int(r[3]) for r in rows) + 1)]
    else:
        classes = sorted({r[3] for r in rows if r[1] == "train"})
    label = {c: i for i, c in enumerate(classes)}
    entries = []
    for line, split, key, name, file in rows:
        if name not in label:
            raise DatasetError(f"index file {path} line {line}: label {name!r} has no training "
                               "image (the classes are the training split's labels)")
        entries.append(Entry(split, key, label[name], file))
    return path.parent, classes, entries


def user_index(data_dir: Path | None) -> dict[str, bytes | Path]:
    """The index with a sha256 per image (every image is read), for data/dataset."""
    if data_dir is None:
        return {}
    root, classes, entries = read_user_index(data_dir)
    return {INDEX_FILE: index_bytes(entries, classes, root)}


@register_dataset("index-file", "your images listed in a CSV: path,label,split[,id] "
                  "(dataset.data_dir: the CSV, or its folder holding index.csv), read lazily",
                  needs_data_dir=True, source_files=user_index,
                  options=("image_size", "channels"))
def load_index_file(data_dir: str | os.PathLike, image_size: int = 0,
                    channels: int = 0) -> ImageDataset:
    """The listed images as a lazy ImageDataset (decoded on access)."""
    root, classes, entries = read_user_index(data_dir)
    return file_dataset("index-file", root, entries, classes, image_size, channels)
