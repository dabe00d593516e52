"""Accepting deletion requests: validate a manifest against the dataset, the ledger and the
champion, then record it as a pending batch (or a rejected one, with the failed rules).

An accepted manifest is written to ``data/deletions/<batch_id>.csv`` (a pipeline input that
DVC tracks: ``dvc add data`` follows, so ``data.dvc`` records it from acceptance on); a
rejected one is kept under ``artifacts/rejected/`` for the audit trail and nothing of it is
ever applied.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from .datastore import DataTrackingError, track
from .faults import fault
from .ledger import Ledger
from .locks import submit_lock
from .params import PipelineParams
from .paths import Paths
from .release import dataset_of, read_rows, write_manifest
from .validation import (
    ValidationContext,
    describe_failures,
    manifest_bytes,
    parse_manifest,
    typed_rows,
    validate_manifest,
)


def validation_context(cfg: PipelineParams, ledger: Ledger, image_shape: tuple[int, int, int],
                       exclude_batch: str | None = None) -> ValidationContext:
    from unlearning.methods import get_method

    data = dataset_of(cfg)
    return ValidationContext(
        num_train=data.num_train,
        num_classes=data.num_classes,
        train_labels=data.train_y.tolist(),
        image_shape=image_shape,
        max_batch_size=cfg.validation.max_batch_size,
        supported_objectives=tuple(get_method(cfg.unlearn.method).objectives),
        claimed_instances=frozenset(ledger.claimed_instances(exclude_batch)),
        claimed_request_ids=frozenset(ledger.claimed_request_ids(exclude_batch)),
        train_keys=data.key_ids,
    )


def images_of(cfg: PipelineParams):
    data = dataset_of(cfg)
    return lambda ids: data.train_x[ids]


def _save_report(path: Path, batch_id: str, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"batch_id": batch_id, **report}, indent=2, default=str))


def staging_file(paths: Paths, batch_id: str) -> Path:
    """Where an accepted manifest waits (outside DVC's data/) until the ledger records it."""
    return paths.incoming / f"{batch_id}.csv"


def next_free_seq(paths: Paths) -> int:
    """One past every sequence number an accepted or rejected batch file carries, so a
    number is never given twice even if the ledger lost the batch that had it."""
    from .state_check import seq_of

    names = [p.stem for folder in (paths.deletions, paths.artifacts / "rejected")
             if folder.is_dir() for p in folder.iterdir()]
    return max((s for n in names if (s := seq_of(n)) is not None), default=0) + 1


def _finish_staged(paths: Paths, ledger: Ledger) -> list[str]:
    """Complete or drop what a killed submit left in the staging folder (under the submit
    lock): a batch the ledger accepted gets its manifest moved into data/deletions/; a file
    the ledger never recorded (killed before the ledger write) is removed. Returns the
    batches it completed."""
    folder = paths.incoming
    done = []
    for staged in sorted(folder.glob("*.csv")) if folder.is_dir() else []:
        batch = ledger.batch(staged.stem)
        kept = paths.manifest(staged.stem)
        expected = ((batch.report or {}).get("manifest_sha256") if batch else None)
        if (batch is not None and batch.state == "pending" and not kept.exists()
                and hashlib.sha256(staged.read_bytes()).hexdigest() == expected):
            kept.parent.mkdir(parents=True, exist_ok=True)
            staged.replace(kept)
            done.append(staged.stem)
        else:
            staged.unlink(missing_ok=True)
    return done


def finish_interrupted_submits(paths: Paths, cfg: PipelineParams | None = None) -> list[str]:
    """``_finish_staged`` for any command (a cheap listing when nothing is staged); with
    ``cfg``, a completed batch's manifest is also added to data.dvc."""
    folder = paths.incoming
    if not folder.is_dir() or not any(folder.glob("*.csv")):
        return []
    with submit_lock(paths), Ledger(paths.ledger) as ledger:
        done = _finish_staged(paths, ledger)
    if done and cfg is not None:
        try:
            track(paths, cfg)
        except DataTrackingError:
            pass  # the next release adds data/ again
    return done


def submit_manifest(paths: Paths, cfg: PipelineParams, manifest: Path,
                    image_shape: tuple[int, int, int]) -> dict[str, Any]:
    """Validate ``manifest`` and record it; returns the batch id, state and failures.

    Raises ManifestError (nothing recorded) when the file cannot be read at all. The same
    requests as a batch already pending or done are not recorded again: the result names that
    batch, with ``duplicate`` set (a client that retries a submission gets the same answer).
    """
    blob = manifest_bytes(manifest)  # read once: what is hashed is what is validated
    raw = parse_manifest(blob, manifest)
    digest = hashlib.sha256(blob).hexdigest()
    keys = dataset_of(cfg).key_ids  # a keyed manifest's ids: its keys' positions
    with submit_lock(paths), Ledger(paths.ledger) as ledger:
        _finish_staged(paths, ledger)
        same = ledger.same_batch(typed_rows(raw, keys))
        if same is not None:
            return {"batch_id": same.batch_id, "state": same.state, "rows": same.rows,
                    "duplicate": True, "reason": None, "failures": [], "report": None,
                    "manifest": str(paths.manifest(same.batch_id)), "data_rev": None,
                    "warning": None}
        seq = max(ledger.next_seq(), next_free_seq(paths))
        batch_id = f"b{seq:04d}-{digest[:8]}"
        ctx = validation_context(cfg, ledger, image_shape)
        report = validate_manifest(raw, ctx, images_of(cfg))
        report_path = paths.artifacts / "validation" / f"{batch_id}.json"
        _save_report(report_path, batch_id, report)
        rows = typed_rows(raw, keys)
        summary = {"success": report["success"], "failures": report["failures"],
                   "report": str(report_path)}
        if report["success"]:
            # staged outside data/ until the ledger has it: a kill never leaves an orphan
            # manifest where DVC would track it (``_finish_staged`` completes or drops it)
            kept, staged = paths.manifest(batch_id), staging_file(paths, batch_id)
            write_manifest(staged, rows)
            summary["manifest_sha256"] = hashlib.sha256(staged.read_bytes()).hexdigest()
            # what the run's validation will depend on: unchanged, it need not run the suites
            summary["inputs_sha256"] = revalidation_digest(read_rows(staged), ctx, cfg)
            fault("after:write_manifest")
            try:
                ledger.add_batch(batch_id, seq, "pending", str(manifest), rows, report=summary)
            except BaseException:
                staged.unlink(missing_ok=True)  # never leave an input the ledger does not know
                raise
            fault("after:record_submit")
            kept.parent.mkdir(parents=True, exist_ok=True)
            staged.replace(kept)
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
            "warning": warning, "duplicate": False}


def _stored_frame(rows: list[dict[str, Any]]):
    """An accepted manifest's rows as the run-time validation reads them: the frame (named
    by key when it was submitted by key) and the ids its keys stood for (None by ids)."""
    import pandas as pd

    from .validation import COLUMNS, KEY_COLUMNS

    by_key = any(r["instance_key"] for r in rows)  # validated by key, as it was submitted
    columns = KEY_COLUMNS if by_key else COLUMNS
    raw = pd.DataFrame(
        [{k: None if r[k] is None else str(r[k]) for k in columns} for r in rows],
        columns=list(columns)).astype(object)
    return raw, ([r["instance_id"] for r in rows] if by_key else None)


def revalidation_digest(rows: list[dict[str, Any]], ctx: ValidationContext,
                        cfg: PipelineParams) -> str:
    """SHA-256 of everything the run-time validation of ``rows`` depends on: the rows, the
    context they are checked against (dataset, champion input, params, and of the other
    batches' claims those on this batch's instances and request ids: the rules ask only
    whether these are claimed, so a later submit of other instances leaves it unchanged),
    their images, and the suites' code and Great Expectations' version. Two validations
    with the same digest give the same answer."""
    from importlib.metadata import version

    from . import validation

    ids = {r["instance_id"] for r in rows}
    ids |= {ctx.train_keys.get(r["instance_key"]) for r in rows if r["instance_key"]}
    context = {f.name: getattr(ctx, f.name) for f in dataclasses.fields(ctx)
               if f.name != "train_keys"}
    context["claimed_instances"] = sorted(ctx.claimed_instances & ids)
    context["claimed_request_ids"] = sorted(
        ctx.claimed_request_ids & {r["request_id"] for r in rows})
    h = hashlib.sha256()
    h.update(json.dumps({"rows": rows, "context": context,
                         "keys": sorted(ctx.train_keys.items()),
                         "great_expectations": version("great_expectations")},
                        sort_keys=True, default=str).encode())
    h.update(Path(validation.__file__).read_bytes())
    images = images_of(cfg)([r["instance_id"] for r in rows])
    h.update(images.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def revalidate(paths: Paths, cfg: PipelineParams, batch_id: str,
               image_shape: tuple[int, int, int]) -> dict[str, Any]:
    """Validate an accepted batch again, against the state it is about to be applied to.

    The suites run again unless nothing they depend on changed since the submit:
    ``revalidation_digest`` equal to the one the submit recorded (its manifest is checked
    against its recorded hash before any run), then the answer is the submit's."""
    rows = read_rows(paths.manifest(batch_id))
    raw, accepted_ids = _stored_frame(rows)
    with Ledger(paths.ledger) as ledger:
        ctx = validation_context(cfg, ledger, image_shape, exclude_batch=batch_id)
        batch = ledger.batch(batch_id)
    at_submit = ((batch.report or {}) if batch else {}).get("inputs_sha256")
    digest = revalidation_digest(rows, ctx, cfg)
    if digest == at_submit:
        report = {"success": True, "failures": [], "suites": {}, "rows": len(rows),
                  "unchanged_since_submit": {"inputs_sha256": digest,
                                             "report": batch.report.get("report")}}
    else:
        report = validate_manifest(raw, ctx, images_of(cfg), accepted_ids=accepted_ids)
        report["inputs_sha256"] = digest
    report_path = paths.batch_dir(batch_id) / "validation.json"
    _save_report(report_path, batch_id, report)
    return {"success": report["success"], "failures": report["failures"],
            "summary": describe_failures(report["failures"]), "report": str(report_path)}
