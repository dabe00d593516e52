"""The served model's fingerprint: a sha256 over every file of a logged MLflow model, recorded
as the ``served_sha256`` tag of its registry version when it is registered, and checked by
``unlearn verify``, ``unlearn audit`` and any service that loads the model.

This module needs only the standard library and ``mlflow`` (imported inside the functions), so
a service can import it without the rest of the pipeline::

    from tasks.served import download_verified
    import mlflow.pytorch

    path = download_verified("models:/forget-classifier@champion")  # raises ServedModelError
    model = mlflow.pytorch.load_model(path)                           # the bytes just checked

The digest: for every file under the model's folder, sorted by its relative POSIX path,
``"<path>\\0<sha256 of the file>\\n"``, hashed with sha256. ``registered_model_meta`` is left
out: MLflow writes it into a download of a ``models:/NAME/...`` URI, it is not stored. The
``served_files`` tag keeps the first 16 hex digits of each file's hash, so a mismatch names
the file that changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

DIGEST_TAG, FILES_TAG = "served_sha256", "served_files"
NOT_STORED = ("registered_model_meta",)
SHORT = 16
MAX_TAG = 5000  # MLflow's limit on a tag value


class ServedModelError(RuntimeError):
    """The served model's files differ from the ones recorded at registration (the message
    names the first file that changed), or the registry records no fingerprint for it."""


def file_hashes(folder: str | Path) -> dict[str, str]:
    """``{relative POSIX path: sha256}`` of every file under ``folder``."""
    root = Path(folder)
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and rel not in NOT_STORED:
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            out[rel] = h.hexdigest()
    return out


def digest(hashes: dict[str, str]) -> str:
    """The one sha256 over sorted relative paths and their files' hashes."""
    h = hashlib.sha256()
    for rel in sorted(hashes):
        h.update(f"{rel}\0{hashes[rel]}\n".encode())
    return h.hexdigest()


def fingerprint_tags(folder: str | Path) -> dict[str, str]:
    """The tags that record the model in ``folder``: its digest, and (if it fits) the short
    hash of each file."""
    hashes = file_hashes(folder)
    files = json.dumps({k: v[:SHORT] for k, v in sorted(hashes.items())},
                       separators=(",", ":"))
    tags = {DIGEST_TAG: digest(hashes)}
    if len(files) <= MAX_TAG:
        tags[FILES_TAG] = files
    return tags


def _download(artifact_uri: str, dst: str, tracking_uri: str | None) -> str:
    import mlflow

    return mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri, dst_path=dst,
                                               tracking_uri=tracking_uri)


def compare(folder: str | Path, tags: dict[str, str], what: str) -> dict[str, Any]:
    """Check the model files in ``folder`` against the tags recorded for them.

    Returns ``{"ok", "served_sha256" (now), "recorded", "files", "changed", "reason"}``;
    ``ok`` is None when nothing was recorded (a version registered before fingerprints)."""
    hashes = file_hashes(folder)
    now = digest(hashes)
    recorded = tags.get(DIGEST_TAG)
    result: dict[str, Any] = {"ok": None, "served_sha256": now, "recorded": recorded,
                              "files": sorted(hashes), "changed": [], "reason": None}
    if not recorded:
        result["reason"] = f"{what}: no {DIGEST_TAG} recorded (registered before fingerprints)"
        return result
    if now == recorded:
        result["ok"] = True
        return result
    try:
        short = json.loads(tags.get(FILES_TAG) or "{}")
    except ValueError:
        short = {}
    changed = sorted({rel for rel in hashes if short.get(rel) != hashes[rel][:SHORT]}
                     | {rel for rel in short if rel not in hashes}) if short else []
    first = changed[0] if changed else "a file of the model"
    how = ("is missing" if changed and first not in hashes else
           f"sha256 now {hashes[first][:12]}, recorded {short[first][:12]}" if first in short
           else "was added" if changed else f"digest now {now[:12]}, recorded {recorded[:12]}")
    more = f" (and {len(changed) - 1} more file(s))" if len(changed) > 1 else ""
    result.update(ok=False, changed=changed,
                  reason=f"{what} changed since it was registered: {first} ({how}){more}")
    return result


def resolve(model_uri: str, tracking_uri: str | None = None):
    """The registry version behind ``models:/NAME/VERSION`` or ``models:/NAME@ALIAS``."""
    from mlflow import MlflowClient

    if not model_uri.startswith("models:/"):
        raise ServedModelError(f"{model_uri!r} is not a registry URI (models:/NAME/VERSION or "
                               "models:/NAME@ALIAS): no fingerprint to check it against")
    ref = model_uri[len("models:/"):].strip("/")
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    if "@" in ref:
        name, alias = ref.split("@", 1)
        return client.get_model_version_by_alias(name, alias)
    name, _, version = ref.rpartition("/")
    return client.get_model_version(name, version)


def check_served_model(model_uri: str, tracking_uri: str | None = None,
                       dst: str | None = None) -> dict[str, Any]:
    """Download the model behind ``model_uri`` (a registry URI) and check every file against
    the fingerprint recorded at registration. Returns ``{"version", "served_sha256", "files",
    "path"}``; raises ServedModelError naming the changed file, or when none is recorded.

    ``dst``: where to keep the download (default: a temporary folder, removed again); load
    the model from ``path`` to use exactly the bytes that were checked.
    """
    mv = resolve(model_uri, tracking_uri)
    what = f"the served model of version {mv.version} ({model_uri})"
    with tempfile.TemporaryDirectory(prefix="served-") as tmp:
        folder = _download(mv.source, dst or tmp, tracking_uri)
        result = compare(folder, dict(mv.tags), what)
    if result["ok"] is not True:
        raise ServedModelError(result["reason"])
    return {"version": int(mv.version), "served_sha256": result["served_sha256"],
            "files": result["files"], "path": folder if dst else None}


def download_verified(model_uri: str, dst: str | None = None,
                      tracking_uri: str | None = None) -> str:
    """Download ``model_uri`` into ``dst`` (default: a new temporary folder), check it, and
    return the local path to pass to ``mlflow.pytorch.load_model``."""
    folder = dst or tempfile.mkdtemp(prefix="served-")
    os.makedirs(folder, exist_ok=True)
    result = check_served_model(model_uri, tracking_uri=tracking_uri, dst=folder)
    return str(result["path"])
