"""CIFAR-10/100 in the python layout torchvision extracts (no download).

The archive's batches are Python pickles, and unpickling runs whatever code a file names: a
crafted ``data_batch_1`` in ``data_dir`` would run on ``unlearn submit``. So they are read
with ``safe_unpickle``: a ``pickle.Unpickler`` whose ``find_class`` resolves only the numpy
constructors an array needs and refuses every other name, before anything is called.
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from .core import DatasetError, ImageDataset, as_dataset
from .registry import register_dataset


def _numpy_attr(module: str, name: str) -> Any:
    """numpy's own object for ``module.name`` (numpy 2 moved ``core`` to ``_core``)."""
    core = getattr(np, "_core", None) or np.core
    return getattr(getattr(core, module.rsplit(".", 1)[-1]), name)


# What a pickled CIFAR batch may name: the array reconstructor, ndarray and dtype (every
# protocol), numpy's _frombuffer (protocol 5 arrays) and _codecs.encode (bytes written by
# Python 3 at protocol 2): constructors of plain data, none of which runs anything else.
_ALLOWED = {
    **{(f"numpy{core}.multiarray", "_reconstruct"): ("multiarray", "_reconstruct")
       for core in (".core", "._core")},
    **{(f"numpy{core}.numeric", "_frombuffer"): ("numeric", "_frombuffer")
       for core in (".core", "._core")},
    ("numpy", "ndarray"): None, ("numpy", "dtype"): None, ("_codecs", "encode"): None,
}
_PLAIN = (str, bytes, int, float, bool, type(None))


class _DataOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"it names {module}.{name}")
        where = _ALLOWED[(module, name)]
        if where is not None:
            return _numpy_attr(*where)
        import codecs

        return {"ndarray": np.ndarray, "dtype": np.dtype, "encode": codecs.encode}[name]


def _plain(value: Any, depth: int = 0) -> bool:
    """Only dicts, lists, tuples, text, numbers and numpy arrays of numbers."""
    if depth > 20:
        return False
    if isinstance(value, _PLAIN):
        return True
    if isinstance(value, np.ndarray):
        return not value.dtype.hasobject
    if isinstance(value, dict):
        return all(_plain(k, depth + 1) and _plain(v, depth + 1) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(_plain(v, depth + 1) for v in value)
    return False


def safe_unpickle(path: Path) -> dict:
    """One CIFAR batch file as a dict (bytes keys, as Python 2 wrote them, become text),
    read without running pickled code; DatasetError (one line) for anything else."""
    refuse = (f"refusing to read {path}: not a CIFAR batch (a pickle may hold only dicts, "
              "lists, text, numbers and numpy arrays; nothing in it was run)")
    try:
        data = path.read_bytes()
        value = _DataOnly(io.BytesIO(data), encoding="latin1").load()
    except OSError as e:
        raise DatasetError(f"cannot read {path}: {e.strerror}") from None
    except pickle.UnpicklingError as e:
        raise DatasetError(f"{refuse[:-1]}; {e})") from None
    except Exception as e:  # noqa: BLE001  (a malformed pickle fails in many ways)
        raise DatasetError(f"{refuse[:-1]}; {e.__class__.__name__})") from None
    if not isinstance(value, dict) or not _plain(value):
        raise DatasetError(refuse)
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in value.items()}


def load_cifar(root: str | os.PathLike, num_classes: int = 10) -> ImageDataset:
    """CIFAR-10/100 in the python-pickle layout torchvision extracts (no download)."""
    root = Path(root)
    sub = root / ("cifar-10-batches-py" if num_classes == 10 else "cifar-100-python")
    base = sub if sub.exists() else root

    def unpickle(p: Path) -> dict:
        if not p.exists():
            raise DatasetError(f"{p} not found: extract the CIFAR python archive into {root}")
        return safe_unpickle(p)  # a pickle: read as data only, nothing in it runs

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
