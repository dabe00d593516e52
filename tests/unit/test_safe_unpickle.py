"""CIFAR's python archives are pickles: they are read without running pickled code."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

from unlearning.datasets import DatasetError
from unlearning.datasets.cifar import load_cifar, safe_unpickle


class _Boom:
    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def _batch(n: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {"batch_label": "training batch", "labels": rng.integers(0, 10, n).tolist(),
            "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            "filenames": [f"img_{i}.png" for i in range(n)]}


def _write_cifar(root, crafted: dict[str, object] | None = None, protocol: int = 2) -> None:
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    files = {f"data_batch_{i}": _batch(4, i) for i in range(1, 6)}
    files["test_batch"] = _batch(3, 9)
    files["batches.meta"] = {"label_names": [f"c{i}" for i in range(10)], "num_vis": 3072}
    files.update(crafted or {})
    for name, obj in files.items():
        (base / name).write_bytes(pickle.dumps(obj, protocol=protocol))


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_a_genuine_layout_loads(tmp_path, protocol):
    _write_cifar(tmp_path, protocol=protocol)
    ds = load_cifar(tmp_path, 10)
    assert ds.num_train == 20 and tuple(ds.train_x.shape[1:]) == (3, 32, 32)
    assert float(ds.train_x.max()) <= 1.0 and ds.num_classes == 10


def test_python2_style_bytes_keys_load(tmp_path):
    """The published archive was written by Python 2: latin1 strings, bytes keys."""
    raw = _batch(2, 0)
    legacy = {b"labels": raw["labels"], b"data": raw["data"], b"batch_label": b"x"}
    path = tmp_path / "b"
    path.write_bytes(pickle.dumps(legacy, protocol=2))
    loaded = safe_unpickle(path)
    assert loaded["labels"] == raw["labels"] and (loaded["data"] == raw["data"]).all()


@pytest.mark.parametrize("payload", [
    lambda t: {"data": _Boom(t)},
    lambda t: _Boom(t),
    lambda t: {"labels": [1], "data": np.zeros((1, 3072), np.uint8), "x": _Boom(t)},
])
def test_a_crafted_batch_is_refused_and_runs_nothing(tmp_path, payload):
    target = tmp_path / "pwned"
    _write_cifar(tmp_path, crafted={"data_batch_3": payload(str(target))})
    with pytest.raises(DatasetError) as err:
        load_cifar(tmp_path, 10)
    assert "data_batch_3" in str(err.value) and "\n" not in str(err.value)
    assert not target.exists()


def test_object_arrays_are_refused(tmp_path):
    """An ndarray of dtype object would unpickle its items: refused too."""
    arr = np.array([1, "x", None], dtype=object)
    path = tmp_path / "b"
    path.write_bytes(pickle.dumps({"data": arr}, protocol=2))
    with pytest.raises(DatasetError):
        safe_unpickle(path)


def test_garbage_is_refused(tmp_path):
    path = tmp_path / "b"
    path.write_bytes(os.urandom(512))
    with pytest.raises(DatasetError):
        safe_unpickle(path)
