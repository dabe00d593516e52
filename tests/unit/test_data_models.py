"""Data loading, ids and checkpoints."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch

from unlearning.datasets import DatasetError, load_dataset, sample_forget_ids, sample_retain_ids
from unlearning.datasets.fashion_mnist import load_fashion_mnist
from unlearning.datasets.idx import read_idx
from unlearning.models import (
    CheckpointError,
    ModelSpec,
    build_model,
    load_checkpoint,
    save_checkpoint,
    weights_sha256,
)


def test_digits_split_is_deterministic_and_in_unit_range():
    a, b = load_dataset("digits"), load_dataset("digits")
    assert a.train_x.shape == (1347, 1, 8, 8) and a.test_x.shape == (450, 1, 8, 8)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.train_y, b.train_y)
    assert 0.0 <= float(a.train_x.min()) and float(a.train_x.max()) <= 1.0
    assert set(a.train_y.tolist()) == set(range(10))


def test_unknown_dataset_and_bad_ids_are_refused():
    with pytest.raises(DatasetError, match="unknown dataset"):
        load_dataset("imagenet-22k")
    ds = load_dataset("digits")
    with pytest.raises(DatasetError, match="outside the training split"):
        ds.check_ids([0, ds.num_train])
    with pytest.raises(DatasetError, match="outside"):
        ds.check_ids([-1])


def test_forget_ids_are_nested_across_k_and_retain_sample_is_disjoint():
    small, large = sample_forget_ids(1000, 8, seed=3), sample_forget_ids(1000, 32, seed=3)
    assert large[:8] == small and len(set(large)) == 32
    retain = sample_retain_ids(1000, large, 0.01, seed=3)
    assert len(retain) == 10 and not set(retain) & set(large)
    with pytest.raises(ValueError, match="at most 1%"):
        sample_retain_ids(1000, large, 0.05, seed=3)


def _write_idx(path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + struct.pack(">" + "I" * array.ndim, *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_reader_on_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 20), ("t10k", 10)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, n))
    ds = load_fashion_mnist(tmp_path)
    assert ds.train_x.shape == (20, 1, 28, 28) and ds.test_y.shape == (10,)
    assert float(ds.train_x.max()) <= 1.0 and ds.num_classes == 10


def test_fashion_mnist_missing_names_the_debian_package(tmp_path):
    with pytest.raises(DatasetError, match="dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path)


def test_truncated_idx_file_is_refused(tmp_path):
    p = tmp_path / "x.gz"
    with gzip.open(p, "wb") as f:
        f.write(bytes([0, 0, 8, 1]) + struct.pack(">I", 100) + b"\x00" * 10)
    with pytest.raises(DatasetError, match="header says"):
        read_idx(p)


@pytest.mark.parametrize("arch,size,channels", [("small-cnn", 8, 1), ("small-cnn", 28, 1),
                                                ("resnet18", 32, 3)])
def test_models_build_by_name_for_any_size_and_channels(arch, size, channels):
    model = build_model(ModelSpec(arch, channels, 10, size, [0.5] * channels, [0.25] * channels))
    assert model.eval()(torch.rand(2, channels, size, size)).shape == (2, 10)


def test_unknown_model_is_refused():
    with pytest.raises(ValueError, match="unknown model"):
        ModelSpec("vgg", 1, 10, 8)


def test_checkpoint_roundtrip_hash_and_tamper_detection(tmp_path):
    spec = ModelSpec("small-cnn", 1, 10, 8, [0.3], [0.4])
    model = build_model(spec)
    sha = save_checkpoint(tmp_path / "m.pt", model, spec)
    loaded, loaded_spec = load_checkpoint(tmp_path / "m.pt", expected_sha256=sha)
    assert loaded_spec == spec and weights_sha256(loaded) == sha == weights_sha256(model)
    with torch.no_grad():
        next(model.parameters()).add_(1e-3)
    save_checkpoint(tmp_path / "m.pt", model, spec)
    with pytest.raises(CheckpointError, match="sha256 differs"):
        load_checkpoint(tmp_path / "m.pt", expected_sha256=sha)


class _Payload:
    def __reduce__(self):
        return (print, ("code ran",))


def test_pickled_code_in_a_checkpoint_is_refused(tmp_path):
    torch.save({"spec": {}, "state_dict": _Payload()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="not a weights-only checkpoint"):
        load_checkpoint(tmp_path / "evil.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "junk.pt")


@pytest.mark.parametrize("n, expected", [(130, [130]), (256, [128, 128]), (260, [128, 132]),
                                         (290, [128, 128, 34])])
def test_training_never_makes_a_batch_of_a_few_rows(n, expected):
    """A tail under MIN_TAIL rows joins the last batch (BatchNorm on 1-2 images is noise)."""
    from torch import nn

    from unlearning.train import TrainConfig, train_classifier

    sizes: list[int] = []

    class Probe(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            if self.training:
                sizes.append(len(x))
            return self.fc(x)

    x, y = torch.randn(n, 4), torch.randint(0, 2, (n,))
    train_classifier(Probe(), x, y, TrainConfig(epochs=1, batch_size=128))
    assert sizes == expected
