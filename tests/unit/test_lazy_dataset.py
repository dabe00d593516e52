"""File datasets read lazily: image folders and index files, their keys, and their index."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from unlearning.datasets import DatasetError, load_dataset
from unlearning.datasets.core import take
from unlearning.datasets.image_folder import folder_index
from unlearning.datasets.index_file import user_index
from unlearning.datasets.lazy import INDEX_FILE, LazyImages, index_changes, key_problem
from unlearning.models import ModelSpec, build_model, weights_sha256
from unlearning.train import TrainConfig, accuracy, train_classifier

CLASSES = ("cat", "dog", "owl")


def make_folder(root: Path, per_class: dict[str, int] | None = None, size: int = 12,
                mode: str = "L", seed: int = 0) -> dict[str, np.ndarray]:
    """ROOT/{train,test}/<class>/NNNN.png of random pixels; returns {key: uint8 array}."""
    rng = np.random.default_rng(seed)
    per_class = per_class or {"train": 5, "test": 3}
    pixels = {}
    for split, n in per_class.items():
        for c, cls in enumerate(CLASSES):
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                shape = (size, size) if mode == "L" else (size, size, 3)
                a = rng.integers(0, 256, shape, dtype=np.uint8)
                a[:2] = 40 * (c + 1)  # the class shows in the top rows
                Image.fromarray(a, mode).save(folder / f"{i:04d}.png")
                pixels[f"{split}/{cls}/{i:04d}.png"] = a
    return pixels


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "images"
    return root, make_folder(root)


def test_image_folder_is_lazy_keys_sorted_and_images_decode_like_to_tensor(folder):
    root, pixels = folder
    ds = load_dataset("image-folder", root)
    assert ds.lazy and isinstance(ds.train_x, LazyImages) and ds.name == "image-folder"
    assert ds.train_x.shape == (15, 1, 12, 12) and ds.test_x.shape == (9, 1, 12, 12)
    assert ds.image_shape == (1, 12, 12) and ds.num_train == 15
    assert ds.class_names == CLASSES and ds.num_classes == 3
    keys = sorted(k for k in pixels if k.startswith("train/"))
    assert list(ds.train_keys) == keys  # instance id = position in the sorted keys
    assert ds.key_ids["train/dog/0000.png"] == 5 and ds.key_of(5) == "train/dog/0000.png"
    assert ds.train_y.tolist() == [0] * 5 + [1] * 5 + [2] * 5
    want = torch.from_numpy(pixels["train/dog/0003.png"]).float().div(255)[None]
    assert torch.equal(ds.train_x[8], want)  # ToTensor's values, bit for bit
    assert torch.equal(ds.train_x[[8]][0], want)


def test_lazy_images_index_like_a_tensor(folder):
    root, _ = folder
    x = load_dataset("image-folder", root).train_x
    full = torch.stack([x[i] for i in range(len(x))])
    assert torch.equal(x[-1], full[-1])
    assert torch.equal(x[2:7:2], full[2:7:2])
    assert torch.equal(x[[4, 1, 4]], full[[4, 1, 4]])
    assert torch.equal(x[np.array([3, 0])], full[[3, 0]])
    assert torch.equal(x[torch.tensor([6, 2])], full[[6, 2]])
    assert torch.equal(x[torch.tensor(9)], full[9])
    mask = torch.zeros(len(x), dtype=torch.bool)
    mask[[1, 13]] = True
    assert torch.equal(x[mask], full[mask])
    assert x[[]].shape == (0, 1, 12, 12)
    with pytest.raises(IndexError, match="out of range"):
        x[[0, 15]]
    with pytest.raises(IndexError):
        x[15]
    view = x.view(torch.tensor([10, 11, 12]))  # lazy: nothing read
    assert isinstance(view, LazyImages) and len(view) == 3
    assert torch.equal(view[1:], full[11:13])
    assert torch.equal(take(x, [0, 2])[1], full[2]) and isinstance(take(x, [0]), LazyImages)
    assert torch.equal(take(full, [0, 2]), full[[0, 2]])
    assert torch.equal(torch.cat(list(x.batches(4))), full)


def test_channel_stats_and_heldout_without_materialising(folder):
    root, _ = folder
    ds = load_dataset("image-folder", root)
    full = torch.stack([ds.train_x[i] for i in range(ds.num_train)])
    flat = full.transpose(0, 1).reshape(1, -1)
    mean, std = ds.channel_stats()
    assert mean == pytest.approx(flat.mean(1).tolist(), abs=1e-6)
    assert std == pytest.approx(flat.std(1).tolist(), abs=1e-6)
    hx, hy = ds.heldout()
    assert torch.is_tensor(hx) and hx.shape == (9, 1, 12, 12) and hy.tolist() == ds.test_y.tolist()
    assert ds.heldout() is ds.heldout()  # read once


def test_training_on_lazy_images_equals_training_on_the_tensors(folder):
    root, _ = folder
    ds = load_dataset("image-folder", root)
    full = torch.stack([ds.train_x[i] for i in range(ds.num_train)])
    torch.manual_seed(0)
    model = build_model(ModelSpec("small-cnn", 1, 3, 12))
    twin = copy.deepcopy(model)
    config = TrainConfig(epochs=2, batch_size=4, seed=0)
    train_classifier(model, ds.train_x, ds.train_y, config)
    train_classifier(twin, full, ds.train_y, config)
    assert weights_sha256(model) == weights_sha256(twin)
    assert accuracy(model, ds.test_x, ds.test_y) == accuracy(twin, ds.test_x[:], ds.test_y)


def test_rgb_resize_and_channel_options(tmp_path):
    root = tmp_path / "rgb"
    make_folder(root, {"train": 2, "test": 1}, size=10, mode="RGB")
    assert load_dataset("image-folder", root).image_shape == (3, 10, 10)
    small = load_dataset("image-folder", root, image_size=6, channels=1)
    assert small.train_x[0].shape == (1, 6, 6) and small.image_shape == (1, 6, 6)
    with pytest.raises(DatasetError, match="dataset.image_size does not apply to digits"):
        load_dataset("digits", image_size=6)
    with pytest.raises(DatasetError, match="needs a data directory"):
        load_dataset("image-folder")


def test_unreadable_or_odd_sized_image_is_one_line_naming_the_file(folder):
    root, _ = folder
    bad = root / "train" / "cat" / "0002.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    ds = load_dataset("image-folder", root)  # nothing decoded yet
    with pytest.raises(DatasetError) as err:
        ds.train_x[[0, 2]]
    assert str(bad) in str(err.value) and "\n" not in str(err.value)
    Image.fromarray(np.zeros((12, 14), np.uint8)).save(bad)
    with pytest.raises(DatasetError, match=r"0002.png is 14x12 pixels .* dataset.image_size"):
        ds.train_x[2]
    assert load_dataset("image-folder", root, image_size=12).train_x[2].shape == (1, 12, 12)
    first = root / "train" / "cat" / "0000.png"
    Image.fromarray(np.zeros((12, 14), np.uint8)).save(first)
    with pytest.raises(DatasetError, match="square"):
        load_dataset("image-folder", root)


def test_folder_layout_errors(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset("image-folder", tmp_path / "nowhere")
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(DatasetError, match="train/ and test/"):
        load_dataset("image-folder", tmp_path)
    (tmp_path / "test" / "zebra").mkdir(parents=True)
    with pytest.raises(DatasetError, match="'zebra' has no folder under train/"):
        load_dataset("image-folder", tmp_path)


def test_index_records_hashes_and_names_a_changed_image(folder):
    root, _ = folder
    before = folder_index(root)[INDEX_FILE]
    lines = before.decode().splitlines()
    assert lines[0] == "split,key,label,class,sha256,path"
    assert lines[1].startswith("train,train/cat/0000.png,0,cat,") and len(lines) == 1 + 24
    assert index_changes(before, folder_index(root)[INDEX_FILE]) == []
    Image.fromarray(np.full((12, 12), 7, np.uint8)).save(root / "train" / "owl" / "0001.png")
    (root / "test" / "dog" / "0002.png").unlink()
    changes = index_changes(before, folder_index(root)[INDEX_FILE])
    assert changes[0] == "test image test/dog/0002.png is gone (the recorded index lists it)"
    assert changes[1].startswith("train image train/owl/0001.png changed (sha256 now")
    # the fingerprint (no image read) sees the listing, not the content
    assert load_dataset("image-folder", root).source_digest


def write_index(folder: Path, rows: list[str], header: str = "path,label,split,id") -> Path:
    path = folder / "index.csv"
    path.write_text(header + "\n" + "".join(r + "\n" for r in rows))
    return path


def test_index_file_keys_are_its_ids_and_integer_labels_are_class_indexes(folder):
    root, _ = folder
    rows = [f"{split}/{cls}/{i:04d}.png,{c},{split},{split[:2]}-{cls}-{i}"
            for split, n in (("train", 5), ("test", 3)) for c, cls in enumerate(CLASSES)
            for i in range(n)]
    path = write_index(root, rows)
    for where in (path, root):  # the CSV, or its folder holding index.csv
        ds = load_dataset("index-file", where)
        assert ds.lazy and ds.name == "index-file" and ds.class_names == ("0", "1", "2")
        assert ds.train_keys[0] == "tr-cat-0" and ds.num_train == 15
        i = ds.key_ids["tr-dog-3"]
        assert ds.train_y[i] == 1
        assert torch.equal(ds.train_x[i], load_dataset("image-folder", root).train_x[8])
    index = user_index(root)[INDEX_FILE].decode().splitlines()
    assert index[1].startswith("train,tr-cat-0,0,0,") and index[1].endswith(",train/cat/0000.png")


def test_index_file_without_ids_keys_by_path_and_names_bad_lines(folder):
    root, _ = folder
    write_index(root, ["./train/cat/0000.png,cat,train", "train/dog/0000.png,dog,train",
                       "test/cat/0000.png,cat,test"], header="path,label,split,note")
    ds = load_dataset("index-file", root)
    assert ds.train_keys == ("train/cat/0000.png", "train/dog/0000.png")
    assert ds.class_names == ("cat", "dog")
    cases = {
        "no path column": (["a,b"], "path2,label,split", "no path column"),
        "bad split": (["train/cat/0000.png,cat,val"], None, "line 2: split 'val'"),
        "duplicate": (["train/cat/0000.png,cat,train,k", "train/cat/0001.png,cat,train,k"],
                      None, "line 3: id 'k' is also on line 2"),
        "absolute": (["/etc/passwd,cat,train"], "path,label,split",
                     "is an absolute path"),
        "outside": (["x.png,cat,train,../x"], None, r"leaves the dataset root"),
        "unknown class": (["train/cat/0000.png,cat,train,a", "test/dog/0000.png,dog,test,b"],
                          None, "line 3: label 'dog' has no training image"),
    }
    for rows, header, message in cases.values():
        write_index(root, rows, header or "path,label,split,id")
        with pytest.raises(DatasetError, match=message):
            load_dataset("index-file", root)
    with pytest.raises(DatasetError, match="not found"):
        load_dataset("index-file", root / "other.csv")


def test_key_problem():
    assert key_problem("train/cat/0001.png") is None and key_problem("a..b/c") is None
    for bad in ("../x", "a/../../b", "/abs", "C:/x", "\\\\server\\x", "a\nb", "", " a"):
        assert key_problem(bad), bad
