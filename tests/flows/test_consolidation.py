"""Consolidation (``unlearn.consolidate_every`` / ``consolidate_drop``): after enough
deletions since the last exact model, an exact retrain of the whole history is registered as
a release with no batches of its own and becomes the new base; later batches start from it,
the rollback guard treats it like any release, and `unlearn verify` and `dvc repro` rebuild
it. A run killed during a consolidation (or during an escalated attempt) loses nothing and
registers nothing twice."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from flow_helpers import cli, cli_json, dvc

from tasks import consolidation, escalation, registry
from tasks.consolidation import Drift, due, unlearned_since_exact
from tasks.params import load_params, parse_params
from tasks.paths import Paths

pytestmark = pytest.mark.usefixtures("prefect_server")


def _manifest(root: Path, ids: list[int], tag: str) -> Path:
    path = root / f"{tag}.csv"
    path.write_text("request_id,instance_id,objective,new_label\n"
                    + "".join(f"{tag}-{i},{i},misclassify,\n" for i in ids))
    return path


def _set_unlearn(root: Path, **values) -> None:
    data = yaml.safe_load((root / "params.yaml").read_text())
    data["unlearn"].update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))


def _run_killed(root: Path, point: str, *args: str) -> subprocess.CompletedProcess:
    """``unlearn ARGS`` in its own process, SIGKILLed at ``point`` (tasks/faults.py)."""
    from prefect.settings import PREFECT_API_URL

    exe = shutil.which("unlearn", path=os.path.dirname(sys.executable))
    env = {**os.environ, "UNLEARN_HOME": str(root), "PREFECT_API_URL": PREFECT_API_URL.value(),
           "UNLEARN_FAULT": point, "OMP_NUM_THREADS": "1"}
    return subprocess.run([exe, *args], capture_output=True, text=True, env=env, timeout=600,
                          check=False)


def _versions() -> dict[int, dict]:
    _rc, data = cli_json("releases")
    return {v["version"]: v for v in data["versions"]}


def test_due_counts_rows_and_drop_since_the_last_exact_model():
    cfg = parse_params({"unlearn": {"consolidate_every": 8, "consolidate_drop": 2.0}})
    assert due(cfg, Drift(1, 7, ["a", "b"]), lost=1.9) is None
    assert "8 row(s) deleted since version 1" in due(cfg, Drift(1, 8, ["a"]), lost=0.0)
    assert "2.50 held-out points lost since version 3" in due(cfg, Drift(3, 1, ["c"]), lost=2.5)
    assert due(cfg, Drift(4, 0, []), lost=9.0) is None  # the champion is itself exact
    off = parse_params({"unlearn": {"consolidate_every": 0, "consolidate_drop": 0.0}})
    assert due(off, Drift(1, 10_000, ["a"]), lost=50.0) is None


def test_only_batches_since_the_last_exact_model_are_unlearned_again():
    plan = {1: {"parent": None, "batches": []},
            2: {"parent": 1, "batches": ["a"], "method": "l2ul"},
            3: {"parent": 2, "batches": [], "method": "retrain-exact"},  # a consolidation
            4: {"parent": 3, "batches": ["b"], "method": "l2ul"},
            5: {"parent": 4, "batches": ["c"], "method": "retrain-exact"},  # exact escalation
            6: {"parent": 5, "batches": ["d", "e"], "method": "l2ul"}}  # a replay
    assert unlearned_since_exact(plan.get, 2) == (1, ["a"])
    assert unlearned_since_exact(plan.get, 3) == (3, [])
    assert unlearned_since_exact(plan.get, 4) == (3, ["b"])
    assert unlearned_since_exact(plan.get, 6) == (5, ["d", "e"])
    assert unlearned_since_exact(plan.get, 9) is None  # not recorded
    assert unlearned_since_exact(plan.get, 4, exact=lambda v: v == 4) == (4, [])


def test_consolidation_becomes_the_new_base(tmp_path, monkeypatch, write_params):
    root = tmp_path
    monkeypatch.setenv("UNLEARN_HOME", str(root))
    write_params(root, pretrain={"epochs": 4}, unlearn={"consolidate_every": 6})
    assert cli("pretrain")[0] == 0
    assert cli("submit", str(_manifest(root, [101, 202, 303, 404], "a")))[0] == 0
    rc, first = cli_json("run")
    assert rc == 0 and first["consolidations"] == [], first  # 4 rows < 6
    assert cli("submit", str(_manifest(root, [505, 606, 707], "b")))[0] == 0
    rc, out, err = cli("run")
    assert rc == 0 and "consolidated: version 4, an exact retrain of version 3's history" \
        in out and "7 row(s) deleted since version 1" in out, out + err

    versions = _versions()
    lineage = versions[4]["lineage"]
    assert (lineage["parent_version"], lineage["batch_id"]) == ("3", "")
    assert lineage["exact"] == "true" and lineage["method"] == "retrain-exact"
    assert versions[4]["aliases"] == ["champion"]
    order = json.loads((root / "data" / "releases.json").read_text())["releases"]
    assert order[-1] == {"version": 4, "parent": 3, "batches": [], "passed": True,
                         "method": "retrain-exact", "params": {}}

    # the next batch starts from the consolidated base; its cumulative drop is measured there
    assert cli("submit", str(_manifest(root, [808, 909], "c")))[0] == 0
    rc, third = cli_json("run")
    assert rc == 0, third
    [batch] = third["batches"]
    assert batch["state"] == "done" and batch["parent"] == 4 and batch["version"] == 5
    assert batch["metrics"]["base_version"] == 4
    # the consolidation never trained on a and b: only c is unlearned and gated
    assert (batch["metrics"]["forget_size"], batch["metrics"]["earlier_size"]) == (2, 0)
    assert third["consolidations"] == []  # 2 rows since the new base
    assert cli("submit", str(_manifest(root, [111, 222], "d")))[0] == 0
    rc, fourth = cli_json("run")
    [batch] = fourth["batches"]
    assert rc == 0 and batch["state"] == "done" and batch["version"] == 6, fourth
    assert (batch["metrics"]["forget_size"], batch["metrics"]["earlier_size"]) == (2, 2)
    assert fourth["consolidations"] == []  # 4 rows since the new base
    rc, listing = cli_json("requests")
    assert listing["open"] == [] and {r["status"] for r in listing["requests"]} == {"done"}
    rc, audit = cli_json("audit", "a-101")  # holds in the champion built on the consolidation
    assert rc == 0 and audit["ok"], audit

    # the guard: the consolidation lacks batch c, so it is refused like any older release
    assert cli("promote", "4")[0] == 1
    rc, _, err = cli("rollback", "--to", "4")
    assert rc == 1 and "predates committed deletion" in err, err

    for version in ("4", "6"):  # retrained; unlearned keeping c alone forgotten besides d
        rc, out, err = cli("verify", version)
        assert rc == 0 and "reproduced" in out, out + err
    done = dvc(root, "repro")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rebuilt = json.loads((root / "artifacts/releases/hashes.json").read_text())["releases"]
    assert {int(v): r["weights_sha256"] for v, r in rebuilt.items()} == {
        v: d["lineage"]["weights_sha256"] for v, d in _versions().items()}

    # the pipeline's lookups by tag, which the registry filters, find what a scan finds
    cfg = load_params(root / "params.yaml")
    client, name = registry.connect(Paths(root), cfg), cfg.registry.model_name
    every = client.search_model_versions(f"name = '{name}'")
    exact = escalation.exact_versions(client, name)
    assert 4 in exact and exact == {int(mv.version) for mv in every
                                    if escalation.exact_tags(mv.tags)}
    for batch_id in {mv.tags["batch_id"] for mv in every if mv.tags.get("batch_id")}:
        assert [int(mv.version) for mv in escalation.batch_versions(client, name, batch_id)] \
            == sorted(int(mv.version) for mv in every if mv.tags.get("batch_id") == batch_id)
    assert int(consolidation.find(client, cfg, 3).version) == 4
    with pytest.raises(registry.RegistryError, match="holds a quote"):
        registry.versions_tagged(client, name, batch_id="x' OR name != '")


@pytest.mark.parametrize("point, registered", [
    ("in:consolidate", False),
    ("after:register_version", True),
    pytest.param("after:champion_alias", True, marks=pytest.mark.slow),
])
def test_a_killed_consolidation_finishes_once(tmp_path, monkeypatch, write_params, point,
                                              registered):
    root = tmp_path
    monkeypatch.setenv("UNLEARN_HOME", str(root))
    write_params(root, pretrain={"epochs": 4})
    assert cli("pretrain")[0] == 0
    assert cli("submit", str(_manifest(root, [111, 222, 333], "k")))[0] == 0
    assert cli("run")[0] == 0
    _set_unlearn(root, consolidate_every=3)  # due now, with nothing pending

    killed = _run_killed(root, point, "run")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    versions = _versions()
    assert sorted(versions) == ([1, 2, 3] if registered else [1, 2])
    _rc, releases = cli_json("releases")
    champion_moved = point == "after:champion_alias"
    assert releases["champion"] == (3 if champion_moved else 2)

    rc, result = cli_json("run")  # finishes it: the same version, never a second one
    assert rc == 0, result
    assert sorted(_versions()) == [1, 2, 3]
    if not champion_moved:
        [c] = result["consolidations"]
        assert c["version"] == 3 and c["passed"]
    _rc, releases = cli_json("releases")
    assert releases["champion"] == 3
    assert [p["version"] for p in releases["promotions"]][-1] == 3
    order = json.loads((root / "data" / "releases.json").read_text())["releases"]
    assert [(r["version"], r["parent"], r["batches"]) for r in order][-1] == (3, 2, [])
    rc, again = cli_json("run")  # the champion is exact now: nothing is due
    assert rc == 0 and again["consolidations"] == [] and sorted(_versions()) == [1, 2, 3]


def test_a_run_killed_during_an_escalated_attempt_resumes_it(tmp_path, monkeypatch,
                                                             write_params):
    root = tmp_path
    monkeypatch.setenv("UNLEARN_HOME", str(root))
    write_params(root, pretrain={"epochs": 4}, unlearn={
        "params": {"max_steps": 1}, "fallback": [{"method": "l2ul", "params": {"max_steps": 400}}]})
    assert cli("pretrain")[0] == 0
    assert cli("submit", str(_manifest(root, [121, 232, 343], "x")))[0] == 0

    killed = _run_killed(root, "in:attempt-2", "run")  # attempt 1 failed and was recorded
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert sorted(_versions()) == [1, 2]
    rc, listing = cli_json("requests")
    assert [b["state"] for b in listing["batches"]] == ["pending"]

    rc, result = cli_json("run")
    assert rc == 0, result
    [batch] = result["batches"]
    assert batch["state"] == "done" and batch["version"] == 3
    assert [(a["attempt"], a["version"], a["passed"]) for a in batch["attempts"]] == [
        (1, 2, False), (2, 3, True)]
    assert sorted(_versions()) == [1, 2, 3]  # attempt 1 reused, not registered again
    rc, listing = cli_json("requests")
    assert listing["open"] == [] and {r["status"] for r in listing["requests"]} == {"done"}
