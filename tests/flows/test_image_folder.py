"""Your data, by your ids: an image folder (torchvision's ImageFolder layout) read lazily,
deletions named by ``instance_key`` (the file's path in the folder), DVC tracking the
folder's index instead of the images, and ``unlearn verify`` naming a changed image.

One small folder (4 classes of 16x16 grayscale PNGs, 50 train and 15 test each) goes through
pretrain, submit, run, releases, audit and verify in a fresh state folder.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from flow_helpers import cli, cli_json, last_line
from PIL import Image

from tasks.paths import Paths

pytestmark = pytest.mark.flow

CLASSES = ("bars", "blob", "cross", "dots")
SIZE = 16


def class_image(c: int, rng: np.random.Generator) -> np.ndarray:
    """A noisy 16x16 picture of class ``c`` (each class has its own pattern)."""
    a = np.zeros((SIZE, SIZE))
    if c == 0:
        a[:, ::4] = 1.0
    elif c == 1:
        a[5:11, 5:11] = 1.0
    elif c == 2:
        a[7:9, :] = a[:, 7:9] = 1.0
    else:
        a[2::5, 2::5] = 1.0
    shift = rng.integers(-1, 2, 2)
    a = np.roll(a, tuple(shift), axis=(0, 1)) * 0.7 + rng.random((SIZE, SIZE)) * 0.3
    return (a * 255).astype(np.uint8)


def make_image_folder(root: Path, train: int = 50, test: int = 15, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for split, n in (("train", train), ("test", test)):
        for c, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(class_image(c, rng)).save(root / split / name / f"{i:04d}.png")


FORGET = ("train/blob/0003.png", "train/dots/0010.png")
RELABEL = "train/cross/0007.png"


@pytest.fixture(scope="module")
def state(tmp_path_factory, prefect_server, write_params):
    images = tmp_path_factory.mktemp("images")
    make_image_folder(images)
    root = tmp_path_factory.mktemp("image-folder-state")
    write_params(root, dataset={"name": "image-folder", "data_dir": str(images)},
                 pretrain={"epochs": 6, "batch_size": 32},
                 gates={"max_test_drop": 20.0},
                 evaluate={"mia_max_per_side": 50})
    manifest = root / "erase.csv"
    manifest.write_text("request_id,instance_key,objective,new_label\n"
                        + "".join(f"erase-{i},{k},misclassify,\n" for i, k in enumerate(FORGET))
                        + f"fix-0,{RELABEL},relabel,0\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("UNLEARN_HOME", str(root))
        rc, out, err = cli("pretrain")
        assert rc == 0, out + err
        rc, submitted = cli_json("submit", str(manifest))
        assert rc == 0, submitted
        rc, run = cli_json("run")
        assert rc == 0 and run["status"] == "ok", run
        yield {"paths": Paths(root), "images": images, "submitted": submitted, "run": run}


def test_release_of_a_keyed_batch(state):
    [batch] = state["run"]["batches"]
    assert batch["state"] == "done" and batch["version"] == 2, batch
    assert batch["metrics"]["objective_rate"] == 100.0
    _, releases = cli_json("releases")
    v2 = next(v for v in releases["versions"] if v["version"] == 2)
    assert v2["lineage"]["dataset"] == "image-folder"
    assert v2["lineage"]["request_ids"] == "erase-0,erase-1,fix-0"
    assert v2["lineage"]["input_shape"] == "1x16x16"
    # the accepted manifest keeps each key next to the id it stood for
    paths = state["paths"]
    with open(paths.manifest(batch["batch_id"]), newline="") as f:
        kept = list(csv.DictReader(f))
    assert [r["instance_key"] for r in kept] == [*FORGET, RELABEL]
    ids = sorted(str(p.relative_to(state["images"])) for p in
                 (state["images"] / "train").rglob("*.png"))
    assert [int(r["instance_id"]) for r in kept] == [ids.index(k) for k in (*FORGET, RELABEL)]
    _, requests = cli_json("requests")
    rows = [r for r in requests["requests"] if r["batch_id"] == batch["batch_id"]]
    assert [r["instance_key"] for r in rows] == [*FORGET, RELABEL]
    rc, out, _ = cli("requests")
    assert rc == 0 and "instance_key" in out and RELABEL in out


def test_dvc_tracks_the_index_not_the_images(state):
    data = state["paths"].data
    assert not list(data.rglob("*.png"))
    with open(data / "dataset" / "index.csv", newline="") as f:
        index = list(csv.DictReader(f))
    assert len(index) == 4 * 50 + 4 * 15
    assert index[0]["key"] == "train/bars/0000.png" and len(index[0]["sha256"]) == 64
    assert (state["paths"].home / "data.dvc").is_file()


def test_audit_by_key(state):
    rc, result = cli_json("audit", FORGET[1])
    assert rc == 0 and result["ok"], result
    [r] = result["requests"]
    assert r["request_id"] == "erase-1" and r["instance_key"] == FORGET[1]
    assert r["release"]["version"] == 2 and r["live"]["holds"]
    rc, out, err = cli("audit", RELABEL)
    assert rc == 0, err
    assert f"({RELABEL})" in out and "live check HOLDS" in out


def test_keys_leaving_the_folder_or_unknown_are_refused_naming_row_and_rule(state, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("request_id,instance_key,objective,new_label\n"
                   "x-1,train/bars/0001.png,misclassify,\nx-2,../../etc/passwd,misclassify,\n")
    rc, _, err = cli("submit", str(bad))
    assert rc == 1
    assert "rule instance_key_inside_dataset failed at row 2" in last_line(err)
    bad.write_text("request_id,instance_key,objective,new_label\n"
                   f"y-1,{FORGET[0]},misclassify,\ny-2,test/bars/0001.png,misclassify,\n")
    rc, result = cli_json("submit", str(bad))
    assert rc == 1
    assert {(f["rule"], tuple(f["rows"])) for f in result["failures"]} == {
        ("not_already_deleted", (1,)), ("instance_key_in_training_split", (2,))}


def test_verify_reproduces_then_names_a_changed_image(state):
    rc, result = cli_json("verify", "--all")
    assert rc == 0, result["diverged"]
    assert result["verified"] == [1, 2]
    image = state["images"] / "train" / "dots" / "0020.png"
    original = image.read_bytes()
    Image.fromarray(np.zeros((SIZE, SIZE), np.uint8)).save(image)
    try:
        rc, result = cli_json("verify", "2")
        assert rc == 1 and result["status"] == "mismatch"
        assert "train image train/dots/0020.png changed" in result["diverged"]["reason"]
        rc, _, err = cli("verify", "2")
        assert rc == 1 and "train/dots/0020.png changed" in last_line(err)
    finally:
        image.write_bytes(original)


def test_a_ledger_from_before_keys_gains_the_column(tmp_path):
    import sqlite3

    from tasks.ledger import SCHEMA, Ledger

    path = tmp_path / "ledger.db"
    with sqlite3.connect(path) as db:  # the schema as it was: requests without instance_key
        db.executescript(SCHEMA.replace("    instance_key TEXT,\n", ""))
        assert "instance_key" not in {r[1] for r in db.execute("PRAGMA table_info(requests)")}
    with Ledger(path) as ledger:
        ledger.add_batch("b0001-x", 1, "pending", "m.csv", [
            {"request_id": "r1", "instance_id": 3, "instance_key": "train/a/1.png",
             "objective": "misclassify", "new_label": None},
            {"request_id": "r2", "instance_id": 4, "objective": "misclassify",
             "new_label": None}])
        assert [r["instance_key"] for r in ledger.requests()] == ["train/a/1.png", None]
