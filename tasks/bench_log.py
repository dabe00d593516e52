"""A benchmark sweep as one MLflow run in the experiment ``bench``: parameters, the aggregated
metrics, and the JSON, Markdown and PNG files the sweep wrote."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

EXPERIMENT = "bench"


def log_to_mlflow(tracking_uri: str, artifact_root: str, params: dict[str, Any],
                  metrics: dict[str, float], files: list[Path]) -> str:
    """One run in the experiment ``bench``; returns its id."""
    import mlflow

    user_uri = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(tracking_uri)
    if user_uri is None:  # set_tracking_uri exports it; leave the environment as it was
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    if mlflow.get_experiment_by_name(EXPERIMENT) is None:
        mlflow.create_experiment(EXPERIMENT, artifact_location=artifact_root)
    mlflow.set_experiment(EXPERIMENT)
    with mlflow.start_run(run_name=f"bench-{params.get('dataset')}") as run:
        mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
        mlflow.log_metrics(metrics)
        for f in files:
            mlflow.log_artifact(str(f))
        return run.info.run_id
