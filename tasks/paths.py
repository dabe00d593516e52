"""Where the pipeline keeps its state, and the environment it needs before Prefect loads.

The state folder ("home") is ``$UNLEARN_HOME`` if set, else the nearest folder at or above
the working directory that holds a ``params.yaml``, else the working directory. Inside it:

- ``data/``             inputs, tracked by DVC as one directory (``data.dvc``):
  ``dataset/`` (the dataset's source files), ``deletions/`` (accepted deletion manifests),
  ``releases.json`` (every registered release in order: the plan ``dvc repro`` rebuilds)
- ``artifacts/``        working files: checkpoints, reports, the request ledger
- ``mlruns/``           MLflow: ``mlflow.db`` (tracking + registry) and ``artifacts/``
- ``.prefect/``         Prefect's home (its sqlite database and result storage)

Nothing here creates folders or touches the environment at import time.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

# The checkout this package lives in: its params.yaml is the fallback parameter file.
PACKAGE_ROOT = Path(__file__).resolve().parents[1]

# Offline hygiene; set (unless already set) before prefect / mlflow / dvc are imported.
OFFLINE_ENV = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # no tqdm bars on stderr
    # no "View run ... at: URL" lines on stdout (a tracking server's runs): stdout is the
    # command's answer (--json)
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
}


@dataclass(frozen=True)
class Paths:
    """Every file location of one state folder."""

    home: Path

    @property
    def data(self) -> Path:
        return self.home / "data"

    @property
    def deletions(self) -> Path:
        return self.data / "deletions"

    @property
    def dataset_dir(self) -> Path:
        return self.data / "dataset"

    @property
    def releases_file(self) -> Path:
        return self.data / "releases.json"

    @property
    def data_dvc(self) -> Path:
        return self.home / "data.dvc"

    @property
    def artifacts(self) -> Path:
        return self.home / "artifacts"

    @property
    def incoming(self) -> Path:
        """Accepted manifests waiting for the ledger's record (``tasks.submit``)."""
        return self.artifacts / "incoming"

    @property
    def ledger(self) -> Path:
        return self.artifacts / "ledger.db"

    @property
    def lock(self) -> Path:
        return self.artifacts / "pipeline.lock"

    @property
    def mlruns(self) -> Path:
        return self.home / "mlruns"

    @property
    def prefect_home(self) -> Path:
        return self.home / ".prefect"

    @property
    def default_tracking_uri(self) -> str:
        return f"sqlite:///{self.mlruns / 'mlflow.db'}"

    @property
    def registry_db(self) -> Path | None:
        """The local registry database, when the project's default store is used."""
        return self.mlruns / "mlflow.db" if self.tracking_uri == self.default_tracking_uri \
            else None

    @property
    def tracking_uri(self) -> str:
        return os.environ.get("MLFLOW_TRACKING_URI") or self.default_tracking_uri

    @property
    def artifact_root(self) -> str:
        return (self.mlruns / "artifacts").as_uri()

    @property
    def params_file(self) -> Path:
        explicit = os.environ.get("UNLEARN_PARAMS")
        if explicit:
            return Path(explicit)
        local = self.home / "params.yaml"
        return local if local.is_file() else PACKAGE_ROOT / "params.yaml"

    def batch_dir(self, batch_id: str) -> Path:
        return self.artifacts / "batches" / batch_id

    def manifest(self, batch_id: str) -> Path:
        return self.deletions / f"{batch_id}.csv"

    def model_file(self, version: int) -> Path:
        return self.artifacts / "models" / f"v{version}.pt"


def find_home(start: Path | None = None) -> Path:
    """``$UNLEARN_HOME``, else the nearest folder holding params.yaml, else the cwd."""
    env = os.environ.get("UNLEARN_HOME")
    if env:
        return Path(env).expanduser().resolve()
    cwd = (start or Path.cwd()).resolve()
    for folder in (cwd, *cwd.parents):
        if (folder / "params.yaml").is_file():
            return folder
    return cwd


def configure_environment(paths: Paths) -> None:
    """Point Prefect at the project's home and switch off telemetry (before importing prefect).

    Values already in the environment win, so a CI job or a test can override any of them.
    """
    os.environ.setdefault("PREFECT_HOME", str(paths.prefect_home))
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
