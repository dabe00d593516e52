"""End to end through the CLI, real Prefect flows, a real MLflow registry (sqlite) and the
GX suites: the demo, releases, the consumer's view, promote, rollback and its guard."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from flow_helpers import cli, cli_json, write_manifest

from tasks.paths import Paths

pytestmark = pytest.mark.flow

LINEAGE = {"parent_version", "batch_id", "request_ids", "objective", "method", "data_rev",
           "code_rev", "params_sha256", "weights_sha256"}


@pytest.fixture(scope="module")
def demo(tmp_path_factory, prefect_server, write_params):
    """``unlearn demo --json`` once in a fresh state folder; the module's tests share it."""
    root = tmp_path_factory.mktemp("demo")
    write_params(root)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("UNLEARN_HOME", str(root))
        rc, result = cli_json("demo")
        yield {"paths": Paths(root), "rc": rc, "result": result}


def test_demo_end_to_end(demo):
    result = demo["result"]
    assert demo["rc"] == 0 and result["ok"]
    versions = {v["version"]: v for v in result["versions"]}
    assert len(versions) >= 3
    passing = [v for v, d in versions.items() if d["gates_passed"]]
    assert result["champion"] == max(passing)
    assert versions[result["champion"]]["aliases"] == ["champion"]
    invalid = result["submitted"]["invalid"]
    assert invalid["state"] == "rejected"
    assert {f["rule"] for f in invalid["failures"]} == {
        "instance_in_training_split", "not_already_deleted", "new_label_differs"}
    assert [b["state"] for b in result["processed"]] == ["done", "done"]
    guard = result["rollback_guard"]
    assert guard["status"] == "refused" and "predates committed deletion" in guard["reason"]
    assert [p["version"] for p in result["promotions"]] == [1, 2, 3]


def test_releases_and_requests_listings(demo):
    rc, releases = cli_json("releases")
    assert rc == 0 and releases["champion"] == demo["result"]["champion"]
    for v in releases["versions"]:
        assert LINEAGE <= set(v["lineage"]), v
        assert {"test_acc"} <= set(v["metrics"])
    batch = releases["versions"][1]
    assert batch["lineage"]["parent_version"] == "1"
    assert {"objective_rate", "test_drop", "forget_acc"} <= set(batch["metrics"])
    rc, requests = cli_json("requests")
    assert rc == 0
    assert [b["state"] for b in requests["batches"]] == ["done", "done", "rejected"]
    assert all(r["version"] is not None for r in requests["requests"] if r["state"] == "done")
    rc, table, _ = cli("releases")
    assert rc == 0 and "champion" in table


LISTING = textwrap.dedent("""
    import json, sys
    from flows.cli import main
    rc = main(sys.argv[1:])
    heavy = sorted(m for m in ("torch", "mlflow", "prefect", "great_expectations", "pandas")
                   if m in sys.modules)
    print(json.dumps({"rc": rc, "heavy": heavy}), file=sys.stderr)
""")


def _listing(*args: str) -> tuple[dict, dict]:
    """``unlearn ARGS --json`` in a fresh interpreter: (its JSON, {rc, heavy modules})."""
    done = subprocess.run([sys.executable, "-c", LISTING, *args, "--json"], capture_output=True,
                          text=True, timeout=300, check=False)
    return json.loads(done.stdout), json.loads(done.stderr.strip().splitlines()[-1])


def test_listings_import_no_heavy_stack_and_follow_registry_writes(demo):
    """``releases`` and ``requests`` import neither torch nor the orchestration stack (the
    second listing reads the registry's snapshot), yet a registry write made outside the
    pipeline (an alias moved with a plain MLflow client) shows in the next listing."""
    from mlflow import MlflowClient

    paths = demo["paths"]
    first, how = _listing("releases")
    assert how["rc"] == 0 and "torch" not in how["heavy"], how
    again, how = _listing("releases")
    assert again == first and how == {"rc": 0, "heavy": []}, how
    found, how = _listing("requests")
    assert how == {"rc": 0, "heavy": []} and found["batches"], how
    champion = first["champion"]
    client = MlflowClient(paths.tracking_uri)
    client.set_registered_model_alias("forget-classifier", "candidate", str(champion - 1))
    try:
        moved, how = _listing("releases")
        assert how["rc"] == 0 and "mlflow" in how["heavy"], how  # the snapshot was stale
        aliases = {v["version"]: v["aliases"] for v in moved["versions"]}
        assert aliases[champion - 1] == ["candidate"] and moved["champion"] == champion
    finally:
        client.delete_registered_model_alias("forget-classifier", "candidate")
    after, _ = _listing("releases")
    assert after["versions"] == first["versions"]


def test_plain_mlflow_client_loads_champion_and_predicts(demo):
    """A consumer with none of this project's code (its packages are blocked)."""
    script = textwrap.dedent(f"""
        import sys
        for m in ("unlearning", "tasks", "flows"):
            sys.modules[m] = None
        import mlflow, mlflow.pytorch, torch
        mlflow.set_tracking_uri({demo["paths"].tracking_uri!r})
        model = mlflow.pytorch.load_model("models:/forget-classifier@champion")
        print(tuple(model(torch.rand(5, 1, 8, 8)).shape))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, check=False,
                          env={"MLFLOW_DISABLE_TELEMETRY": "true", "PATH": "/usr/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "(5, 10)"


def test_promote_and_rollback_guards(demo):
    weights = {v["version"]: v["lineage"]["weights_sha256"] for v in demo["result"]["versions"]}
    rc, _, err = cli("promote", "2")
    assert rc == 1 and "predates committed deletion" in err and len(err.splitlines()) == 1
    assert cli("promote", "99")[0] == 2
    rc, result = cli_json("rollback")  # previous champion is 2: lacks the second batch
    assert rc == 1 and result["status"] == "refused" and result["target"] == 2

    rc, result = cli_json("rollback", "--to", "1", "--reapply")
    assert rc == 0, result
    new = result["champion"]
    assert result["replayed"] == [b["batch_id"] for b in demo["result"]["processed"]]
    _, releases = cli_json("releases")
    replayed = releases["versions"][-1]
    assert replayed["version"] == new and replayed["lineage"]["parent_version"] == "1"
    # same batches, same parameters, same seeds: the replay rebuilds version 3 bit for bit
    assert replayed["lineage"]["weights_sha256"] == weights[3]

    rc, result = cli_json("promote", "3")  # holds every deletion: allowed
    assert rc == 0 and result["champion"] == 3 and result["previous"] == new
    rc, result = cli_json("rollback")  # back to the replayed version, which holds them too
    assert rc == 0 and result["champion"] == new
    _, releases = cli_json("releases")
    assert [p["action"] for p in releases["promotions"]][-3:] == [
        "rollback-reapply", "promote", "rollback"]


def test_demo_refuses_foreign_state(home):
    home.artifacts.mkdir(parents=True)
    (home.artifacts / "ledger.db").write_bytes(b"not the demo's")
    rc, _, err = cli("demo")
    assert rc == 2 and "did not create" in err
    assert (home.artifacts / "ledger.db").read_bytes() == b"not the demo's"


def test_submit_accepts_rejects_and_leaves_no_trace_of_bad_input(home):
    good = home.home / "good.csv"
    good.write_text("request_id,instance_id,objective,new_label\nr1,5,misclassify,\n")
    rc, out, err = cli("submit", str(good))
    assert rc == 0, err
    batch_id = out.split(":")[0]
    assert home.manifest(batch_id).is_file()

    again = home.home / "again.csv"
    again.write_text("request_id,instance_id,objective,new_label\nr2,5,misclassify,\n")
    rc, out, err = cli("submit", str(again))
    assert rc == 1 and "not_already_deleted" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in home.deletions.iterdir()) == [f"{batch_id}.csv"]

    assert cli("submit", str(home.home / "missing.csv"))[0] == 2
    rc, requests = cli_json("requests")
    assert [b["state"] for b in requests["batches"]] == ["pending", "rejected"]


def submit_and_run(home: Paths, objective: str, ids: range) -> tuple[int, dict]:
    """Submit one batch of ``ids`` with ``objective`` (request ids ``<objective>-<id>``),
    then ``unlearn run --json``."""
    manifest = home.home / f"{objective}-{ids[0]}.csv"
    manifest.write_text("request_id,instance_id,objective,new_label\n"
                        + "".join(f"{objective}-{i},{i},{objective},\n" for i in ids))
    assert cli("submit", str(manifest))[0] == 0
    return cli_json("run")


def test_run_validates_again_only_what_changed_since_the_submit(home, prefect_server,
                                                                write_params):
    """The run's validation reuses the submit's answer only when nothing it depends on
    changed (two batches queued together: each one's rules answer the same); a smaller
    batch size limit since the submit makes the suites run and reject."""
    assert cli("pretrain", "--epochs", "4")[0] == 0
    earlier = write_manifest(home.home / "earlier.csv",
                             [(f"earlier-{i}", i, "misclassify", None) for i in (28, 29)])
    assert cli("submit", str(earlier))[0] == 0
    rc, result = submit_and_run(home, "misclassify", range(30, 32))
    assert rc == 0 and [b["state"] for b in result["batches"]] == ["done", "done"], result
    reports = [json.loads((home.batch_dir(b["batch_id"]) / "validation.json").read_text())
               for b in result["batches"]]
    assert all(r["success"] and r["suites"] == {} for r in reports)
    first = reports[-1]
    assert first["unchanged_since_submit"]["inputs_sha256"]

    later = write_manifest(home.home / "later.csv",
                           [(f"later-{i}", i, "misclassify", None) for i in (40, 41)])
    rc, out, err = cli("submit", str(later))
    assert rc == 0, err
    batch_id = out.split(":")[0]
    write_params(home.home, validation={"max_batch_size": 1})
    rc, result = cli_json("run")
    (batch,) = result["batches"]
    assert rc == 1 and batch["state"] == "rejected", result
    assert batch["reason"].startswith("validation: rule batch_size_limit failed"), batch
    again = json.loads((home.batch_dir(batch_id) / "validation.json").read_text())
    assert "unchanged_since_submit" not in again and again["suites"]
    assert again["inputs_sha256"] != first["unchanged_since_submit"]["inputs_sha256"]


def test_gate_failure_keeps_the_candidate_for_audit(home, prefect_server, write_params):
    write_params(home.home, unlearn={"params": {"max_steps": 1}})
    assert cli("pretrain", "--epochs", "4")[0] == 0
    rc, result = submit_and_run(home, "misclassify", range(10, 16))
    assert rc == 1 and result["status"] == "ok"
    (batch,) = result["batches"]
    assert batch["state"] == "rejected" and batch["reason"].startswith("gates: ")
    assert "objective_reached" in batch["gates"]["failures"]
    _, releases = cli_json("releases")
    failed = releases["versions"][-1]
    assert failed["version"] == 2 and failed["aliases"] == []
    assert not failed["gates_passed"] and failed["lineage"]["status"] == "failed"
    assert releases["champion"] == 1
    _, requests = cli_json("requests")
    assert requests["batches"][0]["state"] == "rejected"
    assert requests["batches"][0]["version"] == 2


def test_a_crash_leaves_the_batch_pending(home, prefect_server):
    assert cli("pretrain", "--epochs", "4")[0] == 0
    manifest = home.home / "erase.csv"
    manifest.write_text("request_id,instance_id,objective,new_label\nr1,3,misclassify,\n")
    assert cli("submit", str(manifest))[0] == 0
    stored = next(home.mlruns.glob("artifacts/*/artifacts/checkpoint/model.pt"))
    original = stored.read_bytes()
    stored.write_bytes(original[:-64] + bytes(64))  # corrupt the champion's weights
    home.model_file(1).unlink(missing_ok=True)  # no verified local copy to fall back on

    rc, _, err = cli("run")
    assert rc == 1 and "stay pending" in err
    _, requests = cli_json("requests")
    assert requests["batches"][0]["state"] == "pending"
    _, releases = cli_json("releases")
    assert [v["version"] for v in releases["versions"]] == [1]

    stored.write_bytes(original)
    rc, _, err = cli("run")
    assert rc == 0, err
    _, requests = cli_json("requests")
    assert requests["batches"][0]["state"] == "done" and requests["batches"][0]["version"] == 2


def test_demo_reruns_from_the_console_script_with_the_same_weights(demo):
    """Runs last in this module (it resets the shared state folder): a second ``unlearn demo``
    in a fresh process starts clean and rebuilds every version bit for bit."""
    import json
    import os
    import shutil

    unlearn = shutil.which("unlearn", path=os.path.dirname(sys.executable))
    env = {**os.environ, "UNLEARN_HOME": str(demo["paths"].home)}
    env.pop("PREFECT_API_URL", None)  # its own temporary server, as a user's would be
    done = subprocess.run([unlearn, "demo", "--json"], capture_output=True, text=True,
                          env=env, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    again = json.loads(done.stdout)
    assert again["ok"] and len(again["versions"]) == 3  # the earlier replay is gone
    first = {v["version"]: v["lineage"]["weights_sha256"] for v in demo["result"]["versions"]}
    second = {v["version"]: v["lineage"]["weights_sha256"] for v in again["versions"]}
    assert second == first


def test_as_if_unseen_release_is_gated_by_membership(home, prefect_server, write_params):
    """A privacy erasure: the rows end up as confident as held-out data, the release carries
    the class-matched membership AUC and its gate; a later batch keeps them unseen."""
    assert cli("pretrain", "--epochs", "4")[0] == 0
    rc, result = submit_and_run(home, "as-if-unseen", range(40, 56))
    assert rc == 0, result
    (batch,) = result["batches"]
    assert batch["state"] == "done"
    checks = {c["name"]: c for c in batch["gates"]["checks"]}
    assert checks["unseen_membership"]["passed"]
    metrics = batch["metrics"]
    assert metrics["unseen_count"] == 16 and metrics["objective_rate"] == 100.0
    assert abs(metrics["unseen_membership_z"]) <= 3.0
    assert 0.0 <= metrics["unseen_membership_auc"] <= 1.0

    rc, result = submit_and_run(home, "misclassify", range(60, 61))
    assert rc == 0, result
    (batch,) = result["batches"]
    assert batch["metrics"]["earlier_objective_rate"] == 100.0
    assert batch["metrics"]["unseen_membership_z"] is None  # no such rows in this batch
    assert "unseen_membership" not in {c["name"] for c in batch["gates"]["checks"]}


def test_as_if_unseen_is_refused_when_the_method_cannot_do_it(home, write_params):
    write_params(home.home, unlearn={"method": "neggrad"})
    manifest = home.home / "erase.csv"
    manifest.write_text("request_id,instance_id,objective,new_label\np1,5,as-if-unseen,\n"
                        "m1,6,misclassify,\n")
    rc, _, err = cli("submit", str(manifest))
    assert rc == 1 and "objective_supported_by_method" in err and "row 1" in err
    assert "row 2" not in err
