"""The forget-set GX suites: a good manifest passes; each broken one fails its named rule."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tasks.release import load_data
from tasks.validation import (
    ManifestError,
    ValidationContext,
    describe_failures,
    read_manifest,
    validate_manifest,
)

HEADER = "request_id,instance_id,objective,new_label\n"


@pytest.fixture(scope="module")
def digits():
    return load_data("digits")


@pytest.fixture(scope="module")
def ctx(digits) -> ValidationContext:
    return ValidationContext(
        num_train=digits.num_train, num_classes=digits.num_classes,
        train_labels=digits.train_y.tolist(), image_shape=(1, 8, 8), max_batch_size=4,
        claimed_instances=frozenset({7}), claimed_request_ids=frozenset({"old-1"}),
    )


def images(digits):
    return lambda ids: digits.train_x[ids]


def manifest(tmp_path: Path, body: str, name: str = "m.csv") -> Path:
    path = tmp_path / name
    path.write_text(body)
    return path


def other_label(digits, i: int) -> int:
    return (int(digits.train_y[i]) + 1) % digits.num_classes


def test_good_csv_and_jsonl_pass(tmp_path, digits, ctx):
    csv_path = manifest(tmp_path, HEADER + f"r1,1,misclassify,\nr2,2,relabel,{other_label(digits, 2)}\n")
    lines = [{"request_id": "r1", "instance_id": 1, "objective": "misclassify"},
             {"request_id": "r2", "instance_id": 2, "objective": "relabel",
              "new_label": other_label(digits, 2)}]
    jsonl = manifest(tmp_path, "".join(json.dumps(x) + "\n" for x in lines), "m.jsonl")
    for path in (csv_path, jsonl):
        report = validate_manifest(read_manifest(path), ctx, images(digits))
        assert report["success"], describe_failures(report["failures"])
        assert set(report["suites"]) == {"manifest_columns", "manifest_schema",
                                         "manifest_rules", "forget_images"}


# (manifest body after the header, rule that must fail, 1-based rows it names)
BROKEN = {
    "non_empty": ("", "non_empty", []),
    "request_id_present": (",1,misclassify,\n", "request_id_present", [1]),
    "instance_id_integer": ("r1,abc,misclassify,\nr2,1.5,misclassify,\n",
                            "instance_id_integer", [1, 2]),
    "new_label_integer": ("r1,1,relabel,two\n", "new_label_integer", [1]),
    "batch_size_limit": ("".join(f"r{i},{i},misclassify,\n" for i in range(1, 6)),
                         "batch_size_limit", []),
    "unique_request_id": ("r1,1,misclassify,\nr1,2,misclassify,\n", "unique_request_id", [1, 2]),
    "request_id_not_reused": ("old-1,1,misclassify,\n", "request_id_not_reused", [1]),
    "unique_instance_id": ("r1,3,misclassify,\nr2,3,misclassify,\n", "unique_instance_id", [1, 2]),
    "instance_in_training_split": ("r1,1,misclassify,\nr2,99999,misclassify,\nr3,-1,misclassify,\n",
                                   "instance_in_training_split", [2, 3]),
    "not_already_deleted": ("r1,7,misclassify,\n", "not_already_deleted", [1]),
    "objective_allowed": ("r1,1,forget-me,\n", "objective_allowed", [1]),
    "relabel_needs_new_label": ("r1,1,relabel,\n", "relabel_needs_new_label", [1]),
    "new_label_only_for_relabel": ("r1,1,misclassify,3\n", "new_label_only_for_relabel", [1]),
    "new_label_in_range": ("r1,1,relabel,10\n", "new_label_in_range", [1]),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_manifest_fails_its_rule(case, tmp_path, digits, ctx):
    body, rule, rows = BROKEN[case]
    report = validate_manifest(read_manifest(manifest(tmp_path, HEADER + body)), ctx,
                               images(digits))
    assert not report["success"]
    failed = {f["rule"]: f for f in report["failures"]}
    assert rule in failed, describe_failures(report["failures"])
    assert failed[rule]["rows"] == rows
    assert rule in describe_failures(report["failures"])


def test_new_label_must_differ_from_current(tmp_path, digits, ctx):
    same = int(digits.train_y[4])
    report = validate_manifest(read_manifest(manifest(tmp_path, HEADER + f"r1,4,relabel,{same}\n")),
                               ctx, images(digits))
    assert [f["rule"] for f in report["failures"]] == ["new_label_differs"]
    assert report["failures"][0]["values"] == [same]


def test_objective_must_be_one_the_configured_method_supports(tmp_path, digits, ctx):
    import dataclasses

    body = HEADER + "r1,1,misclassify,\nr2,2,as-if-unseen,\nr3,3,as-if-unseen,\n"
    path = manifest(tmp_path, body)
    assert validate_manifest(read_manifest(path), ctx, images(digits))["success"]
    narrow = dataclasses.replace(ctx, supported_objectives=("misclassify", "relabel"))
    report = validate_manifest(read_manifest(path), narrow, images(digits))
    assert [(f["rule"], f["rows"]) for f in report["failures"]] == [
        ("objective_supported_by_method", [2, 3])]
    # an unknown objective is named once, by objective_allowed
    report = validate_manifest(read_manifest(manifest(tmp_path, HEADER + "r1,1,forget-me,\n")),
                               narrow, images(digits))
    assert [f["rule"] for f in report["failures"]] == ["objective_allowed"]


@pytest.mark.parametrize("header", ["request_id,instance_id,objective\n",
                                    "request_id,instance_id,objective,new_label,extra\n"])
def test_columns_must_match(header, tmp_path, digits, ctx):
    body = "r1,1,misclassify" + ("\n" if header.count(",") == 2 else ",,x\n")
    report = validate_manifest(read_manifest(manifest(tmp_path, header + body)), ctx,
                               images(digits))
    assert [f["rule"] for f in report["failures"]] == ["columns"]
    assert list(report["suites"]) == ["manifest_columns"]  # later stages never ran


@pytest.mark.parametrize("corrupt, rule", [
    (lambda x: x.index_fill(0, torch.tensor([0]), float("nan")), "images_finite"),
    (lambda x: x * 3.0, "images_in_unit_range"),
    (lambda x: x - 2.0, "images_in_unit_range"),
    (lambda x: x[:, :, :4, :4], "image_shape"),
])
def test_forget_images_suite(corrupt, rule, tmp_path, digits, ctx):
    path = manifest(tmp_path, HEADER + "r1,1,misclassify,\nr2,2,misclassify,\n")
    report = validate_manifest(read_manifest(path), ctx,
                               lambda ids: corrupt(digits.train_x[ids].clone()))
    assert rule in {f["rule"] for f in report["failures"]}
    assert all(f["suite"] == "forget_images" for f in report["failures"])


def test_unreadable_manifests_raise(tmp_path):
    with pytest.raises(ManifestError, match="does not exist"):
        read_manifest(tmp_path / "missing.csv")
    with pytest.raises(ManifestError, match="unknown manifest format"):
        read_manifest(manifest(tmp_path, "x", "m.parquet"))
    with pytest.raises(ManifestError, match="line 2: not valid JSON"):
        read_manifest(manifest(tmp_path, '{"request_id": "a"}\n{oops\n', "m.jsonl"))
