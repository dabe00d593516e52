"""Manifests that name instances by key (``instance_key``): the GX rules on keys, each failing
with its name and the rows (1-based) and keys that broke it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tasks.validation import (
    ValidationContext,
    describe_failures,
    read_manifest,
    typed_rows,
    validate_manifest,
)

HEADER = "request_id,instance_key,objective,new_label\n"
KEYS = [f"train/{c}/{i:04d}.png" for c in ("cat", "dog") for i in range(4)]  # ids 0..7


@pytest.fixture(scope="module")
def ctx() -> ValidationContext:
    return ValidationContext(
        num_train=len(KEYS), num_classes=2, train_labels=[0] * 4 + [1] * 4,
        image_shape=(1, 4, 4), max_batch_size=4,
        claimed_instances=frozenset({6}), claimed_request_ids=frozenset({"old-1"}),
        train_keys={k: i for i, k in enumerate(KEYS)},
    )


def images(ids):
    return torch.full((len(ids), 1, 4, 4), 0.5)


def manifest(tmp_path: Path, body: str, name: str = "m.csv") -> Path:
    path = tmp_path / name
    path.write_text(body)
    return path


def test_keyed_manifest_passes_and_maps_keys_to_ids(tmp_path, ctx):
    path = manifest(tmp_path, HEADER + "r1,train/dog/0001.png,misclassify,\n"
                                       "r2,train/cat/0002.png,relabel,1\n")
    raw = read_manifest(path)
    seen = []
    report = validate_manifest(raw, ctx, lambda ids: seen.extend(ids) or images(ids))
    assert report["success"], describe_failures(report["failures"])
    assert list(report["suites"]) == ["manifest_columns", "manifest_schema",
                                      "manifest_rules", "forget_images"]
    assert seen == [5, 2]  # the forget images are read by the keys' ids
    rows = typed_rows(raw, ctx.train_keys)
    assert [(r["instance_id"], r["instance_key"]) for r in rows] == [
        (5, "train/dog/0001.png"), (2, "train/cat/0002.png")]
    lines = [{"request_id": "r1", "instance_key": "train/cat/0000.png", "objective": "misclassify"}]
    jsonl = manifest(tmp_path, "".join(json.dumps(x) + "\n" for x in lines), "m.jsonl")
    assert validate_manifest(read_manifest(jsonl), ctx, images)["success"]


# (manifest body after the header, rule that must fail, 1-based rows, values it names)
BROKEN = {
    "present": ("r1,,misclassify,\n", "instance_key_present", [1], None),
    "format": ('r1,"train/cat/00\t01.png",misclassify,\n', "instance_key_format", [1], None),
    "parent": (("r1,train/cat/0000.png,misclassify,\nr2,../secret.png,misclassify,\n"
                "r3,train/../../etc/passwd,misclassify,\n"),
               "instance_key_inside_dataset", [2, 3], ["../secret.png", "train/../../etc/passwd"]),
    "absolute": ("r1,/etc/passwd,misclassify,\nr2,C:\\x.png,misclassify,\n",
                 "instance_key_inside_dataset", [1, 2], None),
    "duplicate": ("r1,train/cat/0001.png,misclassify,\nr2,train/cat/0001.png,misclassify,\n",
                  "unique_instance_key", [1, 2], None),
    "unknown": (("r1,train/cat/0001.png,misclassify,\nr2,train/cat/9999.png,misclassify,\n"
                 "r3,test/cat/0000.png,misclassify,\n"),
                "instance_key_in_training_split", [2, 3],
                ["train/cat/9999.png", "test/cat/0000.png"]),
    "deleted": ("r1,train/dog/0002.png,misclassify,\n", "not_already_deleted", [1],
                ["train/dog/0002.png"]),
    "reused request id": ("old-1,train/cat/0001.png,misclassify,\n", "request_id_not_reused",
                          [1], None),
    "relabel range": ("r1,train/cat/0001.png,relabel,5\n", "new_label_in_range", [1], None),
    "same label": ("r1,train/cat/0001.png,relabel,0\n", "new_label_differs", [1], None),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_keyed_manifest_fails_its_rule(case, tmp_path, ctx):
    body, rule, rows, values = BROKEN[case]
    report = validate_manifest(read_manifest(manifest(tmp_path, HEADER + body)), ctx, images)
    assert not report["success"]
    failed = {f["rule"]: f for f in report["failures"]}
    assert rule in failed, describe_failures(report["failures"])
    assert failed[rule]["rows"] == rows
    if values is not None:
        assert failed[rule]["values"] == values
    line = describe_failures(report["failures"])
    assert f"rule {rule} failed at row" in line and "\n" not in line


def test_ids_and_keys_together_fail_the_columns_rule(tmp_path, ctx):
    body = ("request_id,instance_id,instance_key,objective,new_label\n"
            "r1,1,train/cat/0001.png,misclassify,\n")
    report = validate_manifest(read_manifest(manifest(tmp_path, body)), ctx, images)
    assert [f["rule"] for f in report["failures"]] == ["columns"]


def test_a_dataset_without_keys_refuses_every_key(tmp_path, ctx):
    import dataclasses

    plain = dataclasses.replace(ctx, train_keys={})
    path = manifest(tmp_path, HEADER + "r1,train/cat/0001.png,misclassify,\n")
    report = validate_manifest(read_manifest(path), plain, images)
    assert [f["rule"] for f in report["failures"]] == ["instance_key_in_training_split"]


def test_revalidation_refuses_a_key_that_names_another_instance_now(tmp_path, ctx):
    path = manifest(tmp_path, HEADER + "r1,train/cat/0001.png,misclassify,\n"
                                       "r2,train/dog/0001.png,misclassify,\n")
    raw = read_manifest(path)
    assert validate_manifest(raw, ctx, images, accepted_ids=[1, 5])["success"]
    report = validate_manifest(raw, ctx, images, accepted_ids=[1, 4])  # the files moved
    assert [(f["rule"], f["rows"], f["values"]) for f in report["failures"]] == [
        ("instance_key_unchanged", [2], ["train/dog/0001.png"])]
