"""Issue 23, every deletion request ships: a release that fails its gates is escalated by
``unlearn.fallback`` in the same run; what no attempt could release stays an open obligation
(`unlearn requests`, `--overdue`), retried with `unlearn retry`; exact retraining is the
last resort."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from flow_helpers import cli, cli_json, dvc

from tasks.ledger import Ledger
from tasks.params import ParamsError, parse_params

pytestmark = pytest.mark.usefixtures("prefect_server")


def _manifest(root: Path, ids: list[int], objective: str = "misclassify",
              tag: str = "e") -> Path:
    path = root / f"{tag}.csv"
    path.write_text("request_id,instance_id,objective,new_label\n"
                    + "".join(f"{tag}-{i},{i},{objective},\n" for i in ids))
    return path


def _state(monkeypatch, tmp_path: Path, write_params, **unlearn) -> Path:
    monkeypatch.setenv("UNLEARN_HOME", str(tmp_path))
    write_params(tmp_path, pretrain={"epochs": 4},  # in params.yaml: `dvc repro` reads it
                 unlearn={"params": {"max_steps": 1}, **unlearn})
    assert cli("pretrain")[0] == 0
    return tmp_path


def _versions(rc_json) -> dict[int, dict]:
    _rc, data = rc_json
    return {v["version"]: v for v in data["versions"]}


def test_a_failing_release_is_escalated_in_the_same_run(tmp_path, monkeypatch, write_params):
    root = _state(monkeypatch, tmp_path, write_params,
                  fallback=[{"method": "l2ul", "params": {"max_steps": 400}},
                            {"method": "retrain-exact"}])
    assert cli("submit", str(_manifest(root, [101, 202, 303])))[0] == 0
    rc, out, err = cli("run")
    assert rc == 0 and "escalated: l2ul after version(s) 2 failed" in out, out + err
    rc, run = cli_json("run")  # nothing pending now
    assert rc == 0 and run["batches"] == []
    rc, listing = cli_json("requests")
    [batch] = listing["batches"]
    assert batch["status"] == "done" and batch["version"] == 3  # not exact: l2ul released it
    first, second = batch["attempts"]
    assert (first["attempt"], first["version"], first["passed"]) == (1, 2, False)
    assert {f["gate"] for f in first["failures"]} >= {"objective_reached"}
    assert all("value" in f and "limit" in f for f in first["failures"])
    assert (second["attempt"], second["version"], second["passed"]) == (2, 3, True)
    assert second["escalated_from"] == 2 and second["method"] == "l2ul"

    versions = _versions(cli_json("releases"))
    assert versions[2]["lineage"]["status"] == "failed" and not versions[2]["aliases"]
    assert versions[2]["lineage"]["attempt"] == "1"
    assert versions[3]["lineage"]["attempt"] == "2"
    assert versions[3]["lineage"]["escalated_from"] == "2"
    assert versions[3]["lineage"]["parent_version"] == "1"
    assert "champion" in versions[3]["aliases"]

    rc, listing = cli_json("requests")
    assert rc == 0
    assert {r["status"] for r in listing["requests"]} == {"done"}
    assert listing["open"] == []
    [b] = listing["batches"]
    assert b["state"] == "done" and b["version"] == 3
    assert [a["version"] for a in b["attempts"]] == [2, 3]

    rc, audit = cli_json("audit", "e-101")
    assert rc == 0, audit
    [request] = audit["requests"]
    assert [a["version"] for a in request["attempts"]] == [2, 3]
    assert request["attempts"][0]["passed"] is False
    rc, out, _ = cli("audit", "e-101")
    assert rc == 0 and "attempt 1: version 2 (l2ul" in out and "FAILED" in out

    # attempt 2 differs only in its step budget: it reused attempt 1's importance and anchors
    folder = root / "artifacts" / "batches" / batch["batch_id"]
    first_run = json.loads((folder / "unlearn.json").read_text())["setup"]
    [second_run] = [json.loads(p.read_text())["setup"] for p in folder.glob("attempt-*/unlearn.json")]
    assert (first_run["reused"], second_run["reused"]) == (False, True)
    assert len(list((root / "artifacts" / "prepared").glob("*.pt"))) == 1
    rc, out, err = cli("verify", "3")  # rebuilt with the policy's entry it was released by,
    assert rc == 0 and "reproduced" in out, out + err  # its set-up computed afresh
    order = json.loads((root / "data" / "releases.json").read_text())["releases"]
    assert [(r["version"], r.get("method"), r.get("params")) for r in order] == [
        (1, None, None), (2, "l2ul", {"max_steps": 1}), (3, "l2ul", {"max_steps": 400})]
    done = dvc(root, "repro")  # the file-to-file path rebuilds each attempt as it was built
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rebuilt = json.loads((root / "artifacts/releases/hashes.json").read_text())["releases"]
    assert {int(v): r["weights_sha256"] for v, r in rebuilt.items()} == {
        v: d["lineage"]["weights_sha256"] for v, d in versions.items()}

    # the guard still refuses versions without the deletion, the failed attempt included
    assert cli("rollback", "--to", "1")[0] == 1
    assert cli("promote", "2")[0] == 1

    # a lost ledger is rebuilt with the batch's attempts (the failing gates' names; their
    # values stay in each version's run)
    for path in (root / "artifacts").glob("ledger.db*"):
        path.unlink()
    rc, out, err = cli("repair")
    assert rc == 0, out + err
    rc, listing = cli_json("requests")
    [b] = listing["batches"]
    assert [(a["version"], a["method"], a["passed"]) for a in b["attempts"]] == [
        (2, "l2ul", False), (3, "l2ul", True)]
    assert {f["gate"] for f in b["attempts"][0]["failures"]} >= {"objective_reached"}
    assert b["attempts"][1]["escalated_from"] == 2


def test_rollback_reapply_replays_an_escalated_batch_with_the_policy(tmp_path, monkeypatch,
                                                                     write_params):
    """The replay applies each missing batch as a new batch is applied: the primary method,
    then the policy's entries; the version records the attempt of each step, and `unlearn
    verify` and `dvc repro` rebuild it step by step."""
    root = _state(monkeypatch, tmp_path, write_params,
                  fallback=[{"method": "l2ul", "params": {"max_steps": 400}}])
    assert cli("submit", str(_manifest(root, [111, 222, 333], tag="r")))[0] == 0
    rc, run = cli_json("run")
    assert rc == 0 and run["batches"][0]["version"] == 3, run  # v2: the failed primary
    batch_id = run["batches"][0]["batch_id"]

    rc, out, err = cli("rollback", "--to", "1", "--reapply")
    assert rc == 0 and f"replayed {batch_id} onto version 1" in out, out + err
    versions = _versions(cli_json("releases"))
    assert sorted(versions) == [1, 2, 3, 4] and "champion" in versions[4]["aliases"]
    lineage = versions[4]["lineage"]
    assert (lineage["parent_version"], lineage["batch_id"]) == ("1", batch_id)
    assert json.loads(lineage["replay_steps"]) == [{"method": "l2ul",
                                                    "params": {"max_steps": 400}}]
    order = json.loads((root / "data" / "releases.json").read_text())["releases"]
    assert order[-1]["steps"] == [{"method": "l2ul", "params": {"max_steps": 400}}]

    rc, out, err = cli("verify", "4")
    assert rc == 0 and "reproduced" in out, out + err
    for path in (root / "artifacts").glob("ledger.db*"):  # repair restores each step
        path.unlink()
    assert cli("repair")[0] == 0
    with Ledger(root / "artifacts" / "ledger.db") as ledger:
        assert ledger.release(4)["built_with"]["steps"] == [
            {"method": "l2ul", "params": {"max_steps": 400}}]
    done = dvc(root, "repro")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rebuilt = json.loads((root / "artifacts/releases/hashes.json").read_text())["releases"]
    assert {int(v): r["weights_sha256"] for v, r in rebuilt.items()} == {
        v: d["lineage"]["weights_sha256"] for v, d in versions.items()}

    # a broken replay_steps tag: repair says so in one line and still rebuilds the ledger
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'mlruns' / 'mlflow.db'}")
    client.set_model_version_tag("forget-classifier", "4", "replay_steps", "{not json")
    for path in (root / "artifacts").glob("ledger.db*"):
        path.unlink()
    rc, out, err = cli("repair")
    assert rc == 0 and "release 4: its replay_steps tag is unreadable" in out, out + err
    with Ledger(root / "artifacts" / "ledger.db") as ledger:
        built = ledger.release(4)["built_with"]
    assert built["method"] == "l2ul" and "steps" not in built


def test_an_open_obligation_is_listed_and_retried_exactly(tmp_path, monkeypatch, write_params):
    root = _state(monkeypatch, tmp_path, write_params, fallback=[])
    assert cli("submit", str(_manifest(root, [111, 222], tag="m")))[0] == 0
    assert cli("submit", str(_manifest(root, [999999], tag="bad")))[0] == 1  # invalid input
    rc, run = cli_json("run")
    assert rc == 1 and run["batches"][0]["state"] == "rejected"
    batch_id = run["batches"][0]["batch_id"]

    rc, listing = cli_json("requests")
    assert rc == 0
    statuses = {r["request_id"]: r["status"] for r in listing["requests"]}
    assert statuses["m-111"] == statuses["m-222"] == "open"
    assert statuses["bad-999999"] == "invalid"  # rejected at validation: not an obligation
    assert [o["request_id"] for o in listing["open"]] == ["m-111", "m-222"]
    assert all(o["age_days"] >= 0 for o in listing["open"])
    [failed] = [b for b in listing["batches"] if b["batch_id"] == batch_id]
    assert failed["attempts"][0]["failures"][0]["value"] is not None

    rc, overdue = cli_json("requests", "--overdue", "0")
    assert rc == 0 and [o["request_id"] for o in overdue["open"]] == ["m-111", "m-222"]
    rc, overdue = cli_json("requests", "--overdue", "1")
    assert rc == 0 and overdue["open"] == []
    rc, out, _ = cli("requests", "--overdue", "0")
    assert rc == 0 and "m-111" in out
    assert cli("requests", "--overdue", "-1")[0] == 2
    assert cli("retry", "no-such-batch")[0] == 2
    assert cli("retry", batch_id, "--method", "nope")[0] == 2

    rc, out, err = cli("retry", batch_id)  # back in the queue
    assert rc == 0 and "pending again" in out, out + err
    assert cli("retry", batch_id)[0] == 2  # pending already
    rc, run = cli_json("run")  # same champion, same params: the same attempt, reused
    assert rc == 1 and run["batches"][0]["version"] == 2 and run["batches"][0]["resumed"]

    rc, retried = cli_json("retry", batch_id, "--method", "retrain-exact")
    assert rc == 0, retried
    [batch] = retried["batches"]
    assert batch["state"] == "done" and batch["exact"] and batch["version"] == 3
    versions = _versions(cli_json("releases"))
    lineage = versions[3]["lineage"]
    assert lineage["method"] == "retrain-exact" and lineage["exact"] == "true"
    assert lineage["attempt"] == "2" and "champion" in versions[3]["aliases"]
    rc, listing = cli_json("requests")
    statuses = {r["request_id"]: r["status"] for r in listing["requests"]}
    assert statuses["m-111"] == "done (exact)" and listing["open"] == []
    rc, audit = cli_json("audit", "m-111")  # holds: the champion never trained on the row
    assert rc == 0 and audit["requests"][0]["status"] == "done (exact)", audit
    assert [(a["version"], a["method"]) for a in audit["requests"][0]["attempts"]] == \
        [(2, "l2ul"), (3, "retrain-exact")]  # the re-queued run reused version 2
    rc, out, err = cli("verify", "3")  # the exact retrain rebuilds bit for bit
    assert rc == 0 and "reproduced" in out, out + err
    assert cli("rollback", "--to", "1")[0] == 1  # the guard: v1 predates the deletion
    assert cli("retry", batch_id)[0] == 2  # done: nothing to retry

    # a failed batch whose instances are submitted again: the new batch carries them
    assert cli("submit", str(_manifest(root, [333], tag="n")))[0] == 0
    rc, run = cli_json("run")
    assert rc == 1 and run["batches"][0]["state"] == "rejected"
    failed_id = run["batches"][0]["batch_id"]
    rc, out, _ = cli("submit", str(_manifest(root, [333], tag="again")))
    assert rc == 0, out
    rc, listing = cli_json("requests")
    statuses = {r["request_id"]: r["status"] for r in listing["requests"]}
    assert statuses["n-333"].startswith("resubmitted (") and statuses["again-333"] == "open"
    assert [o["request_id"] for o in listing["open"]] == ["again-333"]
    rc, _, err = cli("retry", failed_id)
    assert rc == 2 and "submitted again" in err


@pytest.mark.parametrize("fallback, message", [
    ([{"method": "nope"}], "fallback[0].method: unknown method 'nope'"),
    ([{"method": "l2ul"}, {"method": "l2ul", "params": {"max_stepz": 3}}],
     "fallback[1].params: unknown parameter(s) for l2ul"),
    ([{"method": "l2ul", "params": {"max_steps": 0}}], "fallback[0].params.max_steps"),
    ([{"method": "retrain-exact", "params": {"epochs": 3}}], "fallback[0].params.epochs"),
    ([{"method": "l2ul", "objectives": ["forget"]}], "fallback[0].objectives"),
    ([{"method": "l2ul", "budget": 3}], "unknown key 'unlearn.fallback.0.budget'"),
])
def test_the_policy_is_validated(fallback, message):
    with pytest.raises(ParamsError) as e:
        parse_params({"unlearn": {"fallback": fallback}})
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_bad_policy_is_exit_2(home):
    text = home.params_file.read_text() + "\n"
    home.params_file.write_text(text.replace("fallback: []", "fallback: [{method: nope}]"))
    rc, _, err = cli("run")
    assert rc == 2 and "fallback[0].method" in err and len(err.strip().splitlines()) == 1
    # a listing runs no method: it answers (without loading the methods' registry)
    assert cli("requests")[0] == 0


def test_the_plan_follows_the_policy():
    from tasks.escalation import Attempt, attempt_of, plan

    cfg = parse_params({"unlearn": {"params": {"max_steps": 5}, "fallback": [
        {"method": "l2ul", "params": {"max_steps": 5}},  # the primary again: not twice
        {"method": "l2ul", "params": {"max_steps": 50}, "objectives": ["relabel"]},
        {"method": "retrain-exact"}]}})
    primary = Attempt("l2ul", {"max_steps": 5})
    assert plan(cfg, {"misclassify"}) == [primary, Attempt("retrain-exact")]
    assert plan(cfg, {"relabel"}) == [primary, Attempt("l2ul", {"max_steps": 50}),
                                      Attempt("retrain-exact")]
    assert plan(cfg, {"relabel", "misclassify"}) == [primary, Attempt("retrain-exact")]
    assert plan(cfg, {"misclassify"}, "retrain-exact") == [Attempt("retrain-exact")]
    assert plan(cfg, {"misclassify"}, "neggrad") == [Attempt("neggrad")]
    assert attempt_of(cfg, {"method": "l2ul", "method_params": '{"max_steps": 50}'}) == \
        Attempt("l2ul", {"max_steps": 50})
    assert attempt_of(cfg, {"method": "l2ul"}) == primary  # from before escalation
    assert attempt_of(cfg, {"method": "retrain-exact", "exact": "true"}).exact
