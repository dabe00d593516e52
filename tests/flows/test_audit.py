"""``unlearn audit``: a request traced to its batch, release and metrics, with a live check
of the current champion. Reuses the small release state (version 2 applies one mixed batch),
then adds a rejected batch and a pending one through ``unlearn submit``."""

from __future__ import annotations

import pytest
from flow_helpers import cli, cli_json
from release_state import MISCLASSIFY_IDS, RELABEL_IDS, build_release_state

from tasks.ledger import Ledger
from tasks.paths import Paths

pytestmark = pytest.mark.flow


@pytest.fixture(scope="module")
def state(tmp_path_factory, prefect_server, write_params):
    root = tmp_path_factory.mktemp("audit-state")
    write_params(root)
    built = build_release_state(root)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("UNLEARN_HOME", str(root))
        bad = root / "bad.csv"  # instance id outside the training split: rejected on submit
        bad.write_text("request_id,instance_id,objective,new_label\nbad-1,999999,misclassify,\n")
        assert cli("submit", str(bad))[0] == 1
        later = root / "later.csv"  # accepted, never run: pending
        later.write_text("request_id,instance_id,objective,new_label\nlater-7,7,misclassify,\n")
        assert cli("submit", str(later))[0] == 0
        with Ledger(Paths(root).ledger) as ledger:
            done = [b for b in ledger.batches() if b.state == "done"]
        assert len(done) == 1, "the shared state's batch did not pass its gates"
        yield {"paths": Paths(root), "done": done[0], **built}


def test_done_request_names_its_release_and_holds_live(state):
    rc, result = cli_json("audit", f"erase-{MISCLASSIFY_IDS[0]}")
    assert rc == 0 and result["ok"]
    assert result["champion"] == 2 and result["champion_weights_sha256"]
    [r] = result["requests"]
    assert r["batch_state"] == "done" and r["batch_id"] == state["done"].batch_id
    assert r["requested"] and r["release"]["version"] == 2 and r["release"]["gates_passed"]
    assert {"objective_rate", "test_acc", "test_drop"} <= set(r["release"]["metrics"])
    assert r["in_champion_lineage"] is True
    live = r["live"]
    assert live["holds"] and live["prediction"] != live["original_label"]

    rc, out, err = cli("audit", f"fix-{RELABEL_IDS[0]}")
    assert rc == 0, err
    assert "removed by version 2" in out and "live check HOLDS" in out
    assert "champion descends from version 2" in out and out.strip().endswith("result: ok")


def test_audit_by_instance_id(state):
    rc, result = cli_json("audit", str(RELABEL_IDS[1]))
    assert rc == 0 and result["ok"]
    [r] = result["requests"]
    assert r["request_id"] == f"fix-{RELABEL_IDS[1]}" and r["objective"] == "relabel"
    assert r["live"]["holds"] and r["live"]["prediction"] == r["new_label"]


def test_rejected_and_pending_requests_show_state_and_no_release(state):
    rc, result = cli_json("audit", "bad-1")
    [r] = result["requests"]
    assert rc == 0 and r["batch_state"] == "rejected" and r["reason"]
    assert r["release"] is None and r["live"] is None
    rc, out, _ = cli("audit", "later-7")
    assert rc == 0 and "state      pending" in out and "removed by -" in out
    assert "live check" not in out


def test_unknown_id_is_a_one_line_usage_error_and_changes_nothing(state):
    ledger = state["paths"].ledger
    before = (ledger.stat().st_mtime_ns, ledger.stat().st_size)
    for ident in ("no-such-request", "424242"):
        rc, out, err = cli("audit", ident)
        assert rc == 2 and out == ""
        assert err.strip().splitlines() == [
            f"unlearn audit: error: no request or instance with id '{ident}' in the ledger"]
    assert (ledger.stat().st_mtime_ns, ledger.stat().st_size) == before


def test_unknown_id_without_state_creates_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("UNLEARN_HOME", str(tmp_path))
    rc, _, err = cli("audit", "erase-1")
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_a_deletion_that_no_longer_holds_exits_1(state, monkeypatch):
    import tasks.audit

    def broken(model, dataset, request):
        return {"prediction": 0, "original_label": 0, "rule": "test", "holds": False}

    monkeypatch.setattr(tasks.audit, "live_check", broken)
    rc, out, err = cli("audit", f"erase-{MISCLASSIFY_IDS[1]}")
    assert rc == 1 and "DOES NOT HOLD" in out and "result: FAILED" in out
    assert err.strip().splitlines() == [
        "unlearn audit: failed: a deletion does not hold in the current champion (version 2)"]
    rc, result = cli_json("audit", f"erase-{MISCLASSIFY_IDS[1]}")
    assert rc == 1 and result["ok"] is False
