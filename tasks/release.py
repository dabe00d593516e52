"""The model work of a release, file to file: pretrain, unlearn one batch, evaluate.

Each function reads checkpoints and manifests by path, calls the library, writes its output
next to them and returns a small dict: the Prefect tasks (tasks/steps.py), the DVC stages and
`unlearn verify` (tasks/repro.py) all call these same functions.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .faults import fault
from .ledger import Batch
from .params import PipelineParams
from .paths import PACKAGE_ROOT, Paths

MANIFEST_FIELDS = ("request_id", "instance_id", "objective", "new_label")
# a batch named by keys keeps them next to the ids they stood for when it was accepted
KEYED_MANIFEST_FIELDS = ("request_id", "instance_id", "instance_key", "objective", "new_label")


@functools.lru_cache(maxsize=2)
def load_data(name: str, data_dir: str = "", image_size: int = 0, channels: int = 0):
    """The dataset (cached per process: every task of a run reads the same one; a file
    dataset holds only its index, its images are read on access)."""
    from unlearning.datasets import load_dataset

    return load_dataset(name, data_dir or None, image_size=image_size, channels=channels)


def dataset_of(cfg: PipelineParams):
    d = cfg.dataset
    return load_data(d.name, d.data_dir, d.image_size, d.channels)


def batch_seed(base_seed: int, batch_id: str) -> int:
    """The unlearning seed of a batch: same batch and params, same weights."""
    digest = hashlib.sha256(f"{base_seed}:{batch_id}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def write_manifest(path: Path, rows: list[dict[str, Any]]) -> None:
    """The accepted manifest in canonical CSV form (atomic); with an ``instance_key`` column
    when its rows name instances by key."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fields = KEYED_MANIFEST_FIELDS if any(r.get("instance_key") for r in rows) else MANIFEST_FIELDS
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: "" if r.get(k) is None else r[k] for k in fields})
    tmp.replace(path)


def read_rows(path: Path) -> list[dict[str, Any]]:
    """An accepted manifest's rows; ``instance_key`` is None for a batch named by ids."""
    with open(path, newline="") as f:
        return [{"request_id": r["request_id"], "instance_id": int(r["instance_id"]),
                 "instance_key": r.get("instance_key") or None,
                 "objective": r["objective"],
                 "new_label": int(r["new_label"]) if r["new_label"] else None}
                for r in csv.DictReader(f)]


def manifest_problem(paths: Paths, batch: Batch) -> str | None:
    """Why the accepted manifest of a pending (or done) batch cannot be applied (None if it
    can): it is missing, a link out of the state folder, not a file, or not the file that was
    accepted."""
    path = paths.manifest(batch.batch_id)
    rel = path.relative_to(paths.home)
    fix = ("restore data/ with `dvc checkout data` (data.dvc records every accepted manifest) "
           "or run `unlearn repair`")
    head = f"the manifest of {batch.state} batch {batch.batch_id} ({rel})"
    if not path.exists():
        return f"{head} is missing{' (a dangling link)' if path.is_symlink() else ''}: {fix}"
    real = path.resolve()
    if not real.is_relative_to(paths.home.resolve()):
        return f"{head} leads out of {paths.home} (to {real}); refusing to read it: {fix}"
    if not real.is_file():
        return f"{head} is not a regular file: {fix}"
    expected = (batch.report or {}).get("manifest_sha256")
    try:
        if expected:
            found = hashlib.sha256(real.read_bytes()).hexdigest()
            if found != expected:
                return (f"{head} changed since it was accepted (sha256 {found[:12]}, recorded "
                        f"{expected[:12]}): {fix}")
        else:  # accepted before digests were recorded: it must at least still parse
            read_rows(real)
    except OSError as e:
        return f"{head} cannot be read ({e.strerror}): {fix}"
    except (ValueError, KeyError, TypeError, csv.Error):
        return f"{head} is not a manifest any more: {fix}"
    return None


def check_keys(dataset, rows: list[dict[str, Any]]) -> None:
    """Refuse rows whose key no longer names the instance id it was accepted as (the
    dataset's files changed since: another image would be deleted in its place)."""
    from unlearning.datasets import DatasetError

    for r in rows:
        key = r.get("instance_key")
        if key is None:
            continue
        found = dataset.key_ids.get(key)
        if found != r["instance_id"]:
            now = "is not in the training split" if found is None else f"is instance id {found}"
            raise DatasetError(
                f"request {r['request_id']}: instance key {key!r} was instance id "
                f"{r['instance_id']} when accepted but {now} now: the dataset changed since "
                "(data/dataset/index.csv records it as it was)")


def build_forget_set(dataset, rows: list[dict[str, Any]], parent=None):
    """The ForgetSet of manifest rows (None for no rows).

    As-if-unseen rows take their levels from ``parent``, the model the release starts from,
    and the test split (the held-out data of the bundled datasets): the same parent
    checkpoint gives the same levels, so ``unlearn verify`` rebuilds the same release, and a
    candidate is judged by its own confidence on held-out rows (``ForgetSet.ceilings_for``).
    """
    from unlearning.methods import ForgetSet

    if not rows:
        return None
    ids = [r["instance_id"] for r in rows]
    idx = dataset.check_ids(ids)
    check_keys(dataset, rows)
    unseen = any(r["objective"] == "as-if-unseen" for r in rows)
    if unseen and parent is None:
        raise ValueError("as-if-unseen rows need the parent model for their ceilings")
    return ForgetSet.build(dataset.train_x[idx], dataset.train_y[idx],
                           [r["objective"] for r in rows], [r["new_label"] for r in rows],
                           num_classes=dataset.num_classes, ids=ids,
                           model=parent if unseen else None,
                           heldout=dataset.heldout() if unseen else None)


def deleted_ids(paths: Paths, batch_ids: Iterable[str]) -> set[int]:
    """The instance ids the accepted manifests of ``batch_ids`` name."""
    return {int(r["instance_id"]) for b in batch_ids for r in read_rows(paths.manifest(b))}


def forget_set(paths: Paths, cfg: PipelineParams, batch_ids: list[str], parent=None):
    """One ForgetSet of the accepted manifests of ``batch_ids`` (None for no batches)."""
    rows = [r for b in batch_ids for r in read_rows(paths.manifest(b))]
    return build_forget_set(dataset_of(cfg), rows, parent)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True))


def pretrain_model(cfg: PipelineParams, out: Path, progress=None) -> dict[str, Any]:
    """Train ``cfg.pretrain.arch`` on the whole training split; save a weights-only checkpoint."""
    from dataclasses import asdict

    from unlearning.devices import describe_device
    from unlearning.models import save_checkpoint
    from unlearning.train import TrainConfig, accuracy, pretrain

    data = dataset_of(cfg)
    p = cfg.pretrain
    config = TrainConfig(epochs=p.epochs, batch_size=p.batch_size, lr=p.lr, momentum=p.momentum,
                         weight_decay=p.weight_decay, seed=p.seed, augment=p.augment)
    device = cfg.runtime.torch_device()
    start = time.perf_counter()
    model, spec = pretrain(data, p.arch, config, progress, device=device)
    seconds = time.perf_counter() - start
    sha = save_checkpoint(out, model, spec)
    return {"path": str(out), "weights_sha256": sha, "seconds": seconds, "spec": asdict(spec),
            "device": describe_device(device),
            "train_acc": accuracy(model, data.train_x, data.train_y),
            "test_acc": accuracy(model, data.test_x, data.test_y),
            # the base model's gate (a diverged pretrain must not become champion)
            "weights_finite": all(bool(t.isfinite().all()) for t in model.state_dict().values()
                                  if t.is_floating_point())}


def _target(paths: Paths, cfg: PipelineParams, model, batch_id: str, earlier: list[str]):
    """The forget set a batch is unlearned with: its rows, after those of ``earlier`` with
    ``unlearn.include_earlier``."""
    from unlearning.methods import ForgetSet

    current = forget_set(paths, cfg, [batch_id], parent=model)
    before = forget_set(paths, cfg, earlier, parent=model) if cfg.unlearn.include_earlier else None
    return ForgetSet.concat([before, current]) if before is not None else current


# set-ups kept in artifacts/prepared/, newest first (each is small next to a checkpoint)
PREPARED_KEEP = 16


def uses_retain(cfg: PipelineParams) -> bool:
    """Whether the attempt's method gets a retain sample (``unlearn.retain_fraction``)."""
    from unlearning.methods import get_method

    return cfg.unlearn.retain_fraction > 0 and get_method(cfg.unlearn.method).accepts_retain


def _setup_key(paths: Paths, cfg: PipelineParams, parent: dict[str, Any], batch_id: str,
               earlier: list[str]) -> str:
    """What a method's set-up depends on: the parent's weights, the forget set's rows, the
    dataset, the seed, the set-up settings (every param but the step budget), whether a
    retain sample follows, the device and the torch build."""
    import torch

    from unlearning.methods import setup_settings

    dataset = paths.dataset_dir / "dataset.json"
    rows = [[r["instance_id"], r["objective"], r["new_label"]]
            for b in ([*earlier, batch_id] if cfg.unlearn.include_earlier else [batch_id])
            for r in read_rows(paths.manifest(b))]
    blob = json.dumps({
        "parent": parent["weights_sha256"], "method": cfg.unlearn.method,
        "settings": setup_settings(cfg.unlearn.method, dict(cfg.unlearn.params)),
        "seed": batch_seed(cfg.unlearn.seed, batch_id), "rows": rows,
        "with_retain": uses_retain(cfg),
        "dataset": hashlib.sha256(dataset.read_bytes()).hexdigest() if dataset.is_file()
        else cfg.dataset.name, "device": str(cfg.runtime.torch_device()),
        "torch": torch.__version__}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def prepare_batch(paths: Paths, cfg: PipelineParams, parent: dict[str, Any], batch_id: str,
                  earlier: list[str]) -> dict[str, Any] | None:
    """The method's set-up for a batch on ``parent`` (``unlearning.methods.prepare``; for
    ``l2ul`` the inverted importance and the anchors), kept in artifacts/prepared/<key>.pt
    under ``_setup_key``: every attempt that differs only in its step budget (the
    escalation's larger-budget entry), a retry on the same champion and a resumed run reuse
    it. Returns {path, key, reused, seconds}; None when the method has no set-up or the
    objective already holds. An unreadable or foreign file is computed again."""
    import torch

    from unlearning.methods import get_method, prepare
    from unlearning.models import load_checkpoint

    if get_method(cfg.unlearn.method).prepare is None:
        return None
    key = _setup_key(paths, cfg, parent, batch_id, earlier)
    path = paths.artifacts / "prepared" / f"{key[:32]}.pt"
    start = time.perf_counter()
    if _read_setup(path, key) is not None:
        path.touch()  # recently used: kept longest
        return {"path": str(path), "key": key, "reused": True,
                "seconds": time.perf_counter() - start}
    device = cfg.runtime.torch_device()
    model, _ = load_checkpoint(parent["path"], parent["weights_sha256"], device=device)
    target = _target(paths, cfg, model, batch_id, earlier)
    setup = prepare(cfg.unlearn.method, model, target, dict(cfg.unlearn.params),
                    seed=batch_seed(cfg.unlearn.seed, batch_id), with_retain=uses_retain(cfg))
    if setup is None:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    torch.save({"key": key, "setup": setup}, partial)
    partial.replace(path)  # whole or absent
    kept = sorted(path.parent.glob("*.pt"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in kept[PREPARED_KEEP:]:
        old.unlink(missing_ok=True)
    return {"path": str(path), "key": key, "reused": False,
            "seconds": time.perf_counter() - start}


def _read_setup(path: Path, key: str) -> dict[str, Any] | None:
    """The set-up stored at ``path`` for ``key``; None if absent, unreadable or another's."""
    import pickle

    import torch

    try:
        # each tensor back on the device it was made on (the key names the device): the
        # importance lives beside the model's parameters, the anchors beside the data
        stored = torch.load(path, weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError):
        return None
    if not isinstance(stored, dict) or stored.get("key") != key:
        return None
    setup = stored.get("setup")
    return setup if isinstance(setup, dict) else None


def retain_sample(paths: Paths, cfg: PipelineParams, held: list[str], forget_ids: Iterable[int],
                  seed: int) -> tuple[Any, list[int]]:
    """The batch's retain sample (``unlearn.retain_fraction`` of the training rows) and its
    ids: drawn with the batch's seed, never a row of a batch the parent holds (``held``: every
    batch deleted before, whatever model deleted it) or of the forget set. The same
    arguments draw the same rows, so ``unlearn verify`` and ``dvc repro`` rebuild the same
    weights."""
    from unlearning.datasets import sample_retain_ids
    from unlearning.methods import RetainSample

    data = dataset_of(cfg)
    gone = {int(i) for i in forget_ids} | deleted_ids(paths, held)
    ids = sorted(sample_retain_ids(data.num_train, sorted(gone), cfg.unlearn.retain_fraction,
                                   seed))
    return RetainSample(data.train_x[ids], data.train_y[ids]), ids


def unlearn_batch(paths: Paths, cfg: PipelineParams, parent: dict[str, Any], batch_id: str,
                  earlier: list[str], out: Path, progress=None,
                  prepared: dict[str, Any] | None = None, *,
                  held: list[str]) -> dict[str, Any]:
    """Unlearn one batch from the parent checkpoint; save the candidate next to ``out``.

    With ``unlearn.include_earlier`` the instances of ``earlier`` batches (the pipeline passes
    those unlearned since the last exact model) join the forget set, so the early stop also
    waits for them: every earlier deletion must stay deleted. ``prepared``: what
    ``prepare_batch`` returned for the same arguments; the set-up it names is used instead
    of computing it again (the same weights either way). ``held``: every batch the parent
    holds, kept out of the retain sample (``unlearn.retain_fraction``).
    """
    from unlearning.devices import describe_device
    from unlearning.methods import unlearn
    from unlearning.models import load_checkpoint, save_checkpoint

    device = cfg.runtime.torch_device()
    model, spec = load_checkpoint(parent["path"], parent["weights_sha256"], device=device)
    target = _target(paths, cfg, model, batch_id, earlier)
    seed = batch_seed(cfg.unlearn.seed, batch_id)
    retain, retain_ids = None, None
    if uses_retain(cfg):
        retain, retain_ids = retain_sample(paths, cfg, held, target.ids, seed)
    setup = None  # prepared for other arguments, or gone: computed here instead
    if prepared is not None and prepared["key"] == _setup_key(paths, cfg, parent, batch_id,
                                                              earlier):
        setup = _read_setup(Path(prepared["path"]), prepared["key"])
    result = unlearn(cfg.unlearn.method, model, target, dict(cfg.unlearn.params),
                     retain=retain, seed=seed, progress=progress, prepared=setup)
    fault("in:unlearn")
    sha = save_checkpoint(out, result.model, spec)
    setup_s = prepared["seconds"] if prepared is not None and not prepared["reused"] else 0.0
    summary = {"path": str(out), "weights_sha256": sha, "seed": seed, "steps": result.steps,
               "device": describe_device(device),
               "setup": {"reused": bool(prepared and prepared["reused"] and setup is not None),
                         "seconds": round(prepared["seconds"], 3) if prepared else None},
               # the set-up counts as unlearning where this attempt computed it
               "seconds": result.seconds + setup_s, "reached": result.reached,
               "satisfied": result.satisfied, "total": result.total,
               # the training rows read besides the forget set (None: forget set only)
               "retain_ids": retain_ids,
               "info": {k: v for k, v in result.info.items()
                        if isinstance(v, (int, float, str, bool))}}
    _write_json(out.with_name("unlearn.json"), summary)
    return summary


def rebuild_release(paths: Paths, cfg: PipelineParams, parent: dict[str, Any], batches: list[str],
                    earlier: list[str], folder: Path, progress=None, *,
                    held: list[str]) -> dict[str, Any]:
    """One release from its parent checkpoint, file to file: ``unlearn_batch`` for each of
    ``batches`` in order, each step seeing the batches before it as earlier deletions, as the
    flows apply them (one batch per release; several when replaying onto an older version).
    ``held``: every batch the parent holds (``unlearn_batch``).

    Steps go to ``folder/<batch_id>/model.pt``; returns the last step's summary, with
    ``steps`` (every step's summary) and ``parent_of_last`` (the checkpoint it started from).
    """
    if not batches:
        raise ValueError("a release applies at least one batch")
    current, steps, parent_of_last = parent, [], parent
    for i, batch_id in enumerate(batches):
        parent_of_last = current
        current = unlearn_batch(paths, cfg, current, batch_id, earlier + batches[:i],
                                folder / batch_id / "model.pt", progress,
                                held=held + batches[:i])
        steps.append(current)
    return {**current, "steps": steps, "parent_of_last": parent_of_last}


def evaluate_candidate(paths: Paths, cfg: PipelineParams, parent: dict[str, Any],
                       candidate: dict[str, Any], batch_id: str, earlier: list[str],
                       deleted_before: list[str] | None = None,
                       metrics_path: Path | None = None) -> dict[str, Any]:
    """Release metrics of a candidate (defined in ``unlearning.metrics``); written to
    ``metrics_path`` (default: metrics.json beside the candidate). ``earlier``: the batches
    whose objective rate is measured besides ``batch_id`` (those unlearned since the last
    exact model); ``deleted_before``: every batch deleted before it (default ``earlier``),
    kept out of the membership test's retain sample."""
    import torch

    from unlearning.datasets.core import take
    from unlearning.metrics import evaluate_unlearning, loss_mia_auc, membership_auc, mia_efficacy
    from unlearning.models import load_checkpoint

    data = dataset_of(cfg)
    device = cfg.runtime.torch_device()
    parent_model, _ = load_checkpoint(parent["path"], parent["weights_sha256"], device=device)
    model, _ = load_checkpoint(candidate["path"], candidate["weights_sha256"], device=device)
    current = forget_set(paths, cfg, [batch_id], parent=parent_model)
    before = forget_set(paths, cfg, earlier, parent=parent_model)
    metrics = evaluate_unlearning(model, parent_model, current, (data.test_x, data.test_y),
                                  earlier=before)
    unseen = current.is_unseen
    metrics["unseen_count"] = int(unseen.sum())
    metrics["unseen_membership_auc"] = metrics["unseen_membership_z"] = None
    if bool(unseen.any()):  # the as-if-unseen gate's evidence, whatever evaluate.mia says
        auc, z = membership_auc(model, (current.x[unseen], current.y[unseen]),
                                data.heldout())
        metrics.update(unseen_membership_auc=auc, unseen_membership_z=z)
    if cfg.evaluate.mia:
        gone = deleted_before if deleted_before is not None else earlier
        deleted = set(current.ids) | deleted_ids(paths, gone)
        keep = torch.tensor([i for i in range(data.num_train) if i not in deleted])
        retain = (take(data.train_x, keep), data.train_y[keep])  # lazy: only a sample is read
        n = cfg.evaluate.mia_max_per_side
        metrics["mia_efficacy"] = mia_efficacy(model, retain, (data.test_x, data.test_y),
                                               (current.x, current.y), max_per_side=n)
        metrics["loss_mia_auc"] = loss_mia_auc(model, (current.x, current.y),
                                               (data.test_x[:n], data.test_y[:n]))
    metrics.update(steps=candidate["steps"], unlearn_seconds=candidate["seconds"],
                   forget_size=len(current), earlier_size=len(before) if before else 0)
    _write_json(metrics_path or Path(candidate["path"]).with_name("metrics.json"), metrics)
    return metrics


def data_rev(home: Path) -> str:
    """The md5 recorded in ``data.dvc`` (what DVC calls the data version), or "none"."""
    import yaml

    dvc_file = home / "data.dvc"
    try:
        outs = (yaml.safe_load(dvc_file.read_text()) or {}).get("outs") or []
        return str(outs[0].get("md5") or "none")
    except (OSError, yaml.YAMLError, AttributeError, IndexError, TypeError):
        return "none"


# written by the pipeline and DVC as they run, so they do not make the code "dirty"
NOT_CODE = ("data.dvc", "dvc.lock")


def code_rev() -> str:
    """Git HEAD of the code's checkout (``-dirty`` when tracked files changed), or "unknown"."""
    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(PACKAGE_ROOT), *args], capture_output=True,
                              text=True, timeout=10, check=False)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return "unknown"
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".",
                    *(f":(exclude){p}" for p in NOT_CODE)).stdout.strip()
        return head.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
