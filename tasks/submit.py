"""Accepting deletion requests: validate a manifest against the dataset, the ledger and the
champion, then record it as a pending batch (or a rejected one, with the failed rules).

An accepted manifest is written to ``data/deletions/<batch_id>.csv`` (a pipeline input that
DVC tracks: ``dvc add data`` follows, so ``data.dvc`` records it from acceptance on); a
rejected one is kept under ``artifacts/rejected/`` for the audit trail and nothing of it is
ever applied.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .datastore import DataTrackingError, track
from .ledger import Ledger
from .params import PipelineParams
from .paths import Paths
from .release import dataset_of, read_rows, write_manifest
from .validation import (
    ValidationContext,
    describe_failures,
    read_manifest,
    typed_rows,
    validate_manifest,
)


@contextmanager
def file_lock(path: Path, wait: bool = True) -> Iterator[bool]:
    """An advisory lock on ``path``; yields False if ``wait`` is off and someone holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def validation_context(cfg: PipelineParams, ledger: Ledger, image_shape: tuple[int, int, int],
                       exclude_batch: str | None = None) -> ValidationContext:
    data = dataset_of(cfg)
    return ValidationContext(
        num_train=data.num_train,
        num_classes=data.num_classes,
        train_labels=data.train_y.tolist(),
        image_shape=image_shape,
        max_batch_size=cfg.validation.max_batch_size,
        claimed_instances=frozenset(ledger.claimed_instances(exclude_batch)),
        claimed_request_ids=frozenset(ledger.claimed_request_ids(exclude_batch)),
    )


def images_of(cfg: PipelineParams):
    data = dataset_of(cfg)
    return lambda ids: data.train_x[ids]


def _save_report(path: Path, batch_id: str, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"batch_id": batch_id, **report}, indent=2, default=str))


def submit_manifest(paths: Paths, cfg: PipelineParams, manifest: Path,
                    image_shape: tuple[int, int, int]) -> dict[str, Any]:
    """Validate ``manifest`` and record it; returns the batch id, state and failures.

    Raises ManifestError (nothing recorded) when the file cannot be read at all.
    """
    raw = read_manifest(manifest)
    digest = hashlib.sha256(manifest.read_bytes()).hexdigest()
    with file_lock(paths.artifacts / "submit.lock"), Ledger(paths.ledger) as ledger:
        seq = ledger.next_seq()
        batch_id = f"b{seq:04d}-{digest[:8]}"
        ctx = validation_context(cfg, ledger, image_shape)
        report = validate_manifest(raw, ctx, images_of(cfg))
        report_path = paths.artifacts / "validation" / f"{batch_id}.json"
        _save_report(report_path, batch_id, report)
        rows = typed_rows(raw)
        summary = {"success": report["success"], "failures": report["failures"],
                   "report": str(report_path)}
        if report["success"]:
            kept = paths.manifest(batch_id)
            write_manifest(kept, rows)
            try:
                ledger.add_batch(batch_id, seq, "pending", str(manifest), rows, report=summary)
            except BaseException:
                kept.unlink(missing_ok=True)  # never leave an input the ledger does not know
                raise
            reason = None
        else:
            kept = paths.artifacts / "rejected" / f"{batch_id}{manifest.suffix.lower()}"
            kept.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(manifest, kept)
            reason = "validation: " + describe_failures(report["failures"])
            ledger.add_batch(batch_id, seq, "rejected", str(manifest), rows, reason=reason,
                             report=summary)
    rev, warning = None, None
    if report["success"]:  # the batch is accepted either way; the next release re-adds data/
        try:
            rev = track(paths, cfg)
        except DataTrackingError as e:
            warning = f"data.dvc not updated: {e}"
    return {"batch_id": batch_id, "state": "pending" if report["success"] else "rejected",
            "rows": len(raw), "reason": reason, "failures": report["failures"],
            "report": str(report_path), "manifest": str(kept), "data_rev": rev,
            "warning": warning}


def revalidate(paths: Paths, cfg: PipelineParams, batch_id: str,
               image_shape: tuple[int, int, int]) -> dict[str, Any]:
    """Validate an accepted batch again, against the state it is about to be applied to."""
    import pandas as pd

    rows = read_rows(paths.manifest(batch_id))
    raw = pd.DataFrame(
        [{k: None if v is None else str(v) for k, v in r.items()} for r in rows]
    ).astype(object)
    with Ledger(paths.ledger) as ledger:
        ctx = validation_context(cfg, ledger, image_shape, exclude_batch=batch_id)
    report = validate_manifest(raw, ctx, images_of(cfg))
    report_path = paths.batch_dir(batch_id) / "validation.json"
    _save_report(report_path, batch_id, report)
    return {"success": report["success"], "failures": report["failures"],
            "summary": describe_failures(report["failures"]), "report": str(report_path)}
