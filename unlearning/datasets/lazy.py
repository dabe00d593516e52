"""Datasets read from the user's image files, on demand: nothing is decoded until asked for.

A file dataset is an index (one entry per image: split, key, label, file) plus
``LazyImages``, a stand-in for an (N, C, H, W) float tensor that reads and decodes the files
of the rows it is indexed with. Training, evaluation and the forget set index it by batch or
by id, so only those rows are ever in memory: a dataset larger than RAM works.

Images are decoded as torchvision's ``ToTensor`` does (PIL, uint8 -> float32 / 255, (C, H, W)):
grayscale files as one channel, everything else as RGB, unless ``channels`` says (1 or 3).
Sizes are not changed unless ``image_size`` asks for a square resize (bilinear, as
torchvision's ``Resize`` on PIL images); an image whose size differs from the first
training image's is an error naming the file, as is a file that cannot be decoded.

The instance id of a training image is its position in the training rows sorted by key; its
key never changes meaning (image folders: the path relative to the root, ``train/cat/0001.png``;
index files: the id column). ``index_bytes`` writes the index with a sha256 per file: the
pipeline keeps it under version control instead of the images, and ``index_changes`` names
the files that differ between two such indexes.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .core import DatasetError, ImageDataset

INDEX_FILE = "index.csv"  # the name of the exported index in data/dataset
INDEX_COLUMNS = ("split", "key", "label", "class", "sha256", "path")
SPLITS = ("train", "test")
# torchvision's IMG_EXTENSIONS: the files an ImageFolder picks up
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F", "P;L")
DECODE_BATCH = 512  # images decoded at a time when a whole split is streamed
# Per-image paths stay plain strings (os.path): pathlib interns every path component for the
# life of the process, which would keep every file name of a large dataset in memory.


@dataclass(frozen=True)
class Entry:
    """One image of a file dataset: ``path`` is relative to the dataset's root (or absolute)."""

    split: str
    key: str
    label: int
    path: str


def key_problem(key: str) -> str | None:
    """Why ``key`` cannot name an image inside a dataset root (None when it can)."""
    if not key or key != key.strip():
        return "is empty or has surrounding spaces"
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in key):
        return "holds control characters"
    if key.startswith(("/", "\\")) or (len(key) > 1 and key[1] == ":"):
        return "is an absolute path"
    if ".." in key.replace("\\", "/").split("/"):
        return "leaves the dataset root (..)"
    return None


class LazyImages:
    """The images of a list of files as an (N, C, H, W) float32 "tensor" read on access.

    Indexing with an int gives one (C, H, W) tensor; with a slice, a list, a numpy array or a
    tensor of ids (or a boolean mask), a stacked (n, C, H, W) tensor of just those rows.
    ``view(ids)`` is a lazy subset (nothing read). ``batches(n)`` streams the rows in order.
    """

    dtype = torch.float32
    ndim = 4

    def __init__(self, root: Path, files: Sequence[str], shape: tuple[int, int, int],
                 resize: int = 0):
        self.root = Path(root)
        self._root = os.fspath(root)
        self.files = tuple(files)
        c, h, w = (int(s) for s in shape)
        self.image_shape = (c, h, w)
        self.resize = int(resize)
        self.mode = "L" if self.image_shape[0] == 1 else "RGB"

    def __len__(self) -> int:
        return len(self.files)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.files), *self.image_shape))

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    def __repr__(self) -> str:
        return f"LazyImages({len(self)} files under {self.root}, shape {tuple(self.shape)})"

    def _ids(self, index: Any) -> list[int] | int:
        n = len(self.files)
        if isinstance(index, slice):
            return list(range(*index.indices(n)))
        if isinstance(index, (int, np.integer)) or (torch.is_tensor(index) and index.ndim == 0):
            i = int(index)
            if not -n <= i < n:
                raise IndexError(f"index {i} is out of range for {n} images")
            return i % n
        if torch.is_tensor(index):
            index = index.numpy() if index.dtype != torch.bool else index.nonzero().squeeze(1).numpy()
        a = np.asarray(index)
        if a.dtype == bool:
            if a.shape != (n,):
                raise IndexError(f"a boolean mask of {a.shape} for {n} images")
            a = np.flatnonzero(a)
        if a.size and not np.issubdtype(a.dtype, np.integer):
            raise IndexError(f"images are indexed by integer ids, got {a.dtype}")
        ids = a.astype(np.int64).reshape(-1)
        bad = ids[(ids < -n) | (ids >= n)]
        if len(bad):
            raise IndexError(f"ids {bad[:5].tolist()} are out of range for {n} images")
        return (ids % n).tolist() if n else []

    def __getitem__(self, index: Any) -> torch.Tensor:
        ids = self._ids(index)
        if isinstance(ids, int):
            return self.read(ids)
        if not ids:
            return torch.empty((0, *self.image_shape))
        return torch.stack([self.read(i) for i in ids])

    def view(self, index: Any) -> LazyImages:
        """The rows ``index`` as another lazy set (no file is read)."""
        ids = self._ids(index)
        ids = [ids] if isinstance(ids, int) else ids
        return LazyImages(self.root, [self.files[i] for i in ids], self.image_shape, self.resize)

    def batches(self, size: int = DECODE_BATCH) -> Iterator[torch.Tensor]:
        for start in range(0, len(self), size):
            yield self[start:start + size]

    def path(self, i: int) -> str:
        return os.path.join(self._root, self.files[i])

    def read(self, i: int) -> torch.Tensor:
        """Row ``i`` decoded: (C, H, W) float32 in [0, 1]."""
        return decode_image(self.path(i), self.image_shape, self.resize)


def decode_image(path: str | Path, shape: tuple[int, ...], resize: int = 0) -> torch.Tensor:
    """One image file as ``ToTensor`` gives it; DatasetError (one line, naming the file) when
    it cannot be decoded or its size is not the dataset's."""
    from PIL import Image

    c, h, w = shape
    try:
        with Image.open(path) as opened:
            img = opened.convert("L" if c == 1 else "RGB")
            if resize:
                img = img.resize((resize, resize), Image.Resampling.BILINEAR)
            array = np.asarray(img, dtype=np.uint8)
    except FileNotFoundError:
        raise DatasetError(f"image {path} is missing") from None
    except Exception as e:  # noqa: BLE001  (PIL raises many kinds for a damaged file)
        reason = str(e).splitlines()[0] if str(e) else e.__class__.__name__
        raise DatasetError(f"cannot read image {path}: {reason}") from None
    if array.shape[:2] != (h, w):
        raise DatasetError(
            f"image {path} is {array.shape[1]}x{array.shape[0]} pixels but the dataset's "
            f"images are {w}x{h} (its first training image's size); resize them, or set "
            "dataset.image_size in params.yaml to resize every image on reading")
    t = torch.from_numpy(array.copy())
    t = t[None] if t.ndim == 2 else t.permute(2, 0, 1)
    return t.to(torch.float32).div(255)


def probe_shape(path: Path, image_size: int = 0, channels: int = 0) -> tuple[int, int, int]:
    """(C, H, W) of a dataset whose first training image is ``path``."""
    from PIL import Image

    if channels not in (0, 1, 3):
        raise DatasetError(f"dataset.channels must be 1, 3 or 0 (from the images), got {channels}")
    try:
        with Image.open(path) as img:
            mode, (w, h) = img.mode, img.size
    except FileNotFoundError:
        raise DatasetError(f"image {path} is missing") from None
    except Exception as e:  # noqa: BLE001
        raise DatasetError(f"cannot read image {path}: {str(e).splitlines()[0]}") from None
    c = channels or (1 if mode in GRAY_MODES else 3)
    if image_size:
        return c, image_size, image_size
    if h != w:
        raise DatasetError(f"image {path} is {w}x{h} pixels: the models take square images; "
                           "set dataset.image_size in params.yaml to resize every image")
    return c, h, w


def heldout_per_class(image_shape: tuple[int, ...], num_classes: int,
                      budget_bytes: int = 256 * 2**20, most: int = 1000, least: int = 20) -> int:
    """Held-out rows per class kept in memory for as-if-unseen levels and membership checks:
    ``most``, fewer where the images are large (about ``budget_bytes`` in all)."""
    per_image = 4 * int(np.prod(image_shape))
    return int(min(most, max(least, budget_bytes // max(1, per_image * num_classes))))


def file_dataset(name: str, root: Path, entries: list[Entry], class_names: Sequence[str],
                 image_size: int = 0, channels: int = 0) -> ImageDataset:
    """An ImageDataset over ``entries`` (any order) whose images stay on disk until read."""
    by_split: dict[str, list[Entry]] = {s: [] for s in SPLITS}
    for e in entries:
        by_split[e.split].append(e)
    for split in SPLITS:
        if not by_split[split]:
            raise DatasetError(f"{name} {root}: no {split} images")
        by_split[split].sort(key=lambda e: e.key)
    train, test = by_split["train"], by_split["test"]
    if image_size < 0:
        raise DatasetError(f"dataset.image_size must be 0 (no resize) or positive, got {image_size}")
    shape = probe_shape(root / train[0].path, image_size, channels)
    digest = hashlib.sha256(f"{name}|{'x'.join(map(str, shape))}|{image_size}\n".encode())
    digest.update(index_bytes(train + test, class_names, None))
    labels = lambda rows: torch.tensor([e.label for e in rows], dtype=torch.int64)
    return ImageDataset(
        name=name,
        train_x=LazyImages(root, [e.path for e in train], shape, image_size),  # type: ignore[arg-type]
        train_y=labels(train),
        test_x=LazyImages(root, [e.path for e in test], shape, image_size),  # type: ignore[arg-type]
        test_y=labels(test),
        num_classes=len(class_names), class_names=tuple(class_names),
        train_keys=tuple(e.key for e in train), source_digest=digest.hexdigest(),
    )


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except FileNotFoundError:
        raise DatasetError(f"image {path} is missing") from None
    except OSError as e:
        raise DatasetError(f"cannot read image {path}: {e.strerror}") from None
    return h.hexdigest()


def index_bytes(entries: list[Entry], class_names: Sequence[str], root: Path | None) -> bytes:
    """The index as CSV (``INDEX_COLUMNS``): train rows sorted by key (row n = instance id n),
    then test rows; with ``root``, each file's sha256 (every file is read), else no hashes."""
    rows = sorted(entries, key=lambda e: (SPLITS.index(e.split), e.key))
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(INDEX_COLUMNS)
    for e in rows:
        sha = sha256_file(os.path.join(root, e.path)) if root is not None else ""
        writer.writerow([e.split, e.key, e.label, class_names[e.label], sha, e.path])
    return out.getvalue().encode()


def read_index(data: bytes) -> dict[tuple[str, str], dict[str, str]]:
    """An index written by ``index_bytes``: {(split, key): row}."""
    reader = csv.DictReader(io.StringIO(data.decode("utf-8", errors="replace")))
    return {(r.get("split") or "", r.get("key") or ""): r for r in reader}


def index_changes(recorded: bytes, found: bytes) -> list[str]:
    """What differs between two indexes, one line per image: content, label, added, removed."""
    old, new = read_index(recorded), read_index(found)
    changes = []
    for where in sorted(old.keys() | new.keys()):
        split, key = where
        a, b = old.get(where), new.get(where)
        if a is None:
            changes.append(f"{split} image {key} is new (not in the recorded index)")
        elif b is None:
            changes.append(f"{split} image {key} is gone (the recorded index lists it)")
        elif a.get("sha256") != b.get("sha256"):
            changes.append(f"{split} image {key} changed (sha256 now "
                           f"{(b.get('sha256') or '')[:12]}, recorded {(a.get('sha256') or '')[:12]})")
        elif a != b:
            fields = [c for c in INDEX_COLUMNS if a.get(c) != b.get(c)]
            changes.append(f"{split} image {key}: {', '.join(fields)} changed")
    return changes
