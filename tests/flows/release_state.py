"""A small release state for report and UI tests: version 1 (pretrain, 4 epochs) and version 2
(one batch of 4 misclassify and 2 relabel requests), made through the CLI in this process."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from flow_helpers import cli

MISCLASSIFY_IDS = (11, 222, 333, 444)
RELABEL_IDS = (555, 666)


def build_release_state(root: Path) -> dict[str, Any]:
    """Pretrain and apply one mixed batch in ``root`` (which holds the test params.yaml).

    Needs the session's Prefect server (the ``prefect_server`` fixture). Returns the manifest
    rows and the CLI results.
    """
    from unlearning.datasets import load_digits

    labels = load_digits().train_y.tolist()
    rows = [{"request_id": f"erase-{i}", "instance_id": i, "objective": "misclassify",
             "new_label": ""} for i in MISCLASSIFY_IDS]
    rows += [{"request_id": f"fix-{i}", "instance_id": i, "objective": "relabel",
              "new_label": (labels[i] + 1) % 10} for i in RELABEL_IDS]
    manifest = root / "batch.csv"
    manifest.write_text("request_id,instance_id,objective,new_label\n" + "".join(
        f"{r['request_id']},{r['instance_id']},{r['objective']},{r['new_label']}\n" for r in rows))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("UNLEARN_HOME", str(root))
        steps = {"pretrain": cli("pretrain", "--epochs", "4"),
                 "submit": cli("submit", str(manifest)),
                 "run": cli("run")}
    for name, (rc, out, err) in steps.items():
        assert rc in (0, 1), f"{name} failed: {out}{err}"  # 1: gates failed, still a release
    assert steps["pretrain"][0] == 0 and steps["submit"][0] == 0
    return {"rows": rows, "steps": steps}
