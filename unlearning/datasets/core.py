"""What every dataset is: train and test tensors with stable instance ids, and sampling.

Every dataset is held as float images in [0, 1] with shape (N, C, H, W): tensors for the
bundled datasets, ``lazy.LazyImages`` (decoded from files on access, indexable the same way)
for the user's image folders and index files. The instance id of a training example is its
integer index in the training split, and that meaning never changes for a given dataset;
file datasets also name each training image by a key (``train_keys``). Normalisation is not
applied here: it lives inside the model (see ``models.Normalize``) so attacks work in pixel
space.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch


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
    # file datasets: the key of each training instance (index = instance id), and the sha256
    # of their index (keys, labels, files), which pins them without reading every image
    train_keys: tuple[str, ...] | None = None
    source_digest: str | None = None

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_x.shape[1:])  # type: ignore[return-value]

    @property
    def num_train(self) -> int:
        return int(self.train_x.shape[0])

    @property
    def lazy(self) -> bool:
        """True when the images are read from files on access (not tensors in memory)."""
        return not torch.is_tensor(self.train_x)

    def channel_stats(self) -> tuple[list[float], list[float]]:
        """Per-channel mean and std of the training images (for the model's Normalize)."""
        if self.lazy:  # streamed, a batch of files at a time
            c = self.image_shape[0]
            total, squares, n = torch.zeros(c, dtype=torch.float64), torch.zeros(c, dtype=torch.float64), 0
            for xb in self.train_x.batches():  # type: ignore[attr-defined]
                flat = xb.transpose(0, 1).reshape(c, -1).double()
                total += flat.sum(1)
                squares += (flat * flat).sum(1)
                n += flat.shape[1]
            mean = total / n
            var = (squares - n * mean * mean) / max(n - 1, 1)
            return mean.tolist(), var.clamp_min(0).sqrt().clamp_min(1e-3).tolist()
        x = self.train_x.transpose(0, 1).reshape(self.train_x.shape[1], -1)
        return x.mean(1).tolist(), x.std(1).clamp_min(1e-3).tolist()

    def heldout(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Held-out images and labels in memory, for as-if-unseen levels and membership
        checks: the whole test split, or for a lazy dataset the first rows of each class (at
        most ``lazy.heldout_per_class``, read once per process)."""
        if not self.lazy:
            return self.test_x, self.test_y
        return self._heldout_sample

    @functools.cached_property
    def _heldout_sample(self) -> tuple[torch.Tensor, torch.Tensor]:
        from .lazy import heldout_per_class

        per_class = heldout_per_class(self.image_shape, self.num_classes)
        keep = torch.cat([(self.test_y == c).nonzero().squeeze(1)[:per_class]
                          for c in self.test_y.unique()]).sort().values
        return self.test_x[keep], self.test_y[keep]

    def key_of(self, instance_id: int) -> str | None:
        """The key of a training instance (None for datasets without keys)."""
        return self.train_keys[instance_id] if self.train_keys is not None else None

    @functools.cached_property
    def key_ids(self) -> dict[str, int]:
        """{instance key: instance id} of the training split (empty without keys)."""
        return {k: i for i, k in enumerate(self.train_keys or ())}

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


def take(x, ids):
    """Rows ``ids`` of an image set without reading them yet: ``x[ids]`` for a tensor, a lazy
    view for ``LazyImages`` (so a retain set of the whole split stays on disk)."""
    return x[ids] if torch.is_tensor(x) else x.view(ids)


def stratified_split(x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int):
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


def as_dataset(name, xtr, ytr, xte, yte, class_names) -> ImageDataset:
    to_x = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
    to_y = lambda a: torch.from_numpy(np.asarray(a, dtype=np.int64))
    return ImageDataset(
        name=name,
        train_x=to_x(xtr), train_y=to_y(ytr), test_x=to_x(xte), test_y=to_y(yte),
        num_classes=len(class_names), class_names=tuple(class_names),
    )


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
