"""``unlearn bench``: serial and Dask runs agree, continual rounds, plots, MLflow, bad arguments.

Tiny settings on digits (k=4, l2ul capped at 30 steps); the pre-trained model is the session's
``digits_model`` written once to a checkpoint, as the CLI's cache would hold it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flows.cli import main
from unlearning.benchmark import TIMING_KEYS

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY = ["--methods", "neggrad,l2ul", "--set", "l2ul.max_steps=30", "--k", "4",
        "--threads", "1", "--quiet"]


@pytest.fixture(scope="module")
def checkpoint(digits_model, tmp_path_factory) -> Path:
    from unlearning.models import save_checkpoint, spec_for

    model, ds = digits_model
    path = tmp_path_factory.mktemp("bench") / "digits-small-cnn.pt"
    save_checkpoint(path, model, spec_for("small-cnn", ds))
    return path


def _bench(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(["bench", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def _content(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


@pytest.mark.parametrize("args, message", [
    (["--workers", "0"], "--workers must be >= 1"),
    (["--rounds", "-1"], "--rounds must be >= 1"),
    (["--rounds", "0"], "--rounds must be >= 1"),
    (["--serial", "--dask-address", "tcp://127.0.0.1:9"], "exclude each other"),
    (["--rounds", "2", "--retrain"], "does not combine"),
    (["--dask-address", "tcp://127.0.0.1:9"], "cannot reach the Dask scheduler"),
    (["--k", "900", "--rounds", "2", "--serial"], "exceed the"),
    (["--include-earlier", "--serial"], "needs --rounds"),
    (["--serial", "--methods", "neggrad", "--objective", "as-if-unseen"],
     "does not support objective as-if-unseen"),
    (["--serial", "--methods", "finetune"], "needs a retain sample"),
    (["--serial", "--objective", "forget"], "--objective must be"),
    (["--serial", "--methods", "nope"], "unknown method 'nope'; choose one of"),
    (["--serial", "--set", "l2ul.optimizer=foo"],
     "invalid l2ul config: optimizer: must be one of adam, sgd, got 'foo'"),
    (["--serial", "--vary", "l2ul.anchor_batch=64"], "two or more different values, got [64]"),
    (["--serial", "--vary", "l2ul.anchor_batch=64,64"], "two or more different values"),
    (["--serial", "--methods", "l2ul", "--vary", "neggrad.lr=1,2"],
     "the swept method neggrad is not among the methods (l2ul)"),
    (["--serial", "--vary", "l2ul.anchor_batch=0,2"], "anchor_batch: must be an integer >= 1"),
    (["--serial", "--ablation", "--vary", "l2ul.lr=1,2"], "does not combine with its ablation"),
    (["--serial", "--set", "l2ul.lr=1", "--vary", "l2ul.lr=1,2"], "both swept and set"),
    (["--serial", "--vary", "lr=1,2"], "expected METHOD.KEY=VALUE"),
])
def test_bad_arguments_are_one_line_usage_errors(args, message, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("UNLEARN_HOME", str(tmp_path))
    code, _, err = _bench(args, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("unlearn bench: error:")
    assert message in lines[0]


def test_serial_sweep_writes_json_markdown_plots_and_mlflow(checkpoint, tmp_path, monkeypatch,
                                                            capsys):
    monkeypatch.setenv("UNLEARN_HOME", str(tmp_path))
    rows_file, md_file, plots = tmp_path / "rows.json", tmp_path / "summary.md", tmp_path / "png"
    code, out, _ = _bench([*TINY, "--serial", "--checkpoint", str(checkpoint), "--seeds", "0,1",
                           "--objective", "misclassify,relabel", "--json", str(rows_file),
                           "--markdown", str(md_file), "--plots", str(plots), "--mlflow"], capsys)
    assert code == 0
    rows = json.loads(rows_file.read_text())
    assert {(r["method"], r["objective"], r["seed"]) for r in rows} == {
        (m, o, s) for m in ("neggrad", "l2ul") for o in ("misclassify", "relabel") for s in (0, 1)}
    assert "± " in md_file.read_text() and md_file.read_text() in out
    for name in ("test_drop_vs_k.png", "tradeoff.png"):
        data = (plots / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5_000

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("bench").experiment_id])
    assert run.data.params["dataset"] == "digits" and run.data.params["runner"] == "serial"
    assert "neggrad/relabel/k4/test_drop" in run.data.metrics
    logged = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"rows.json", "summary.md", "test_drop_vs_k.png", "tradeoff.png"} <= logged


def test_continual_reports_every_round_and_earlier_batches(checkpoint, tmp_path, capsys):
    rows_file, plots = tmp_path / "rows.json", tmp_path / "png"
    code, out, _ = _bench([*TINY, "--serial", "--checkpoint", str(checkpoint), "--seeds", "0",
                           "--rounds", "3", "--json", str(rows_file), "--plots", str(plots)],
                          capsys)
    assert code == 0
    rows = json.loads(rows_file.read_text())
    assert [(r["method"], r["round"]) for r in rows] == [
        (m, r) for m in ("neggrad", "l2ul") for r in (1, 2, 3)]
    for r in rows:
        if r["round"] == 1:
            assert r["earlier_objective_rate"] is None and r["earlier_held"] is None
        else:
            assert 0 <= r["earlier_objective_rate"] <= 100
            assert r["earlier_held"] == (r["earlier_broken"] == 0)
        assert r["cumulative_test_drop"] == pytest.approx(r["test_acc_before"] - r["test_acc_after"])
    neggrad = [r for r in rows if r["method"] == "neggrad"]
    assert sum(r["round_test_drop"] for r in neggrad) == pytest.approx(
        neggrad[-1]["cumulative_test_drop"])
    assert "earlier_objective_rate" in out and "| 3 |" in out
    assert (plots / "continual.png").read_bytes().startswith(PNG_MAGIC)


def test_continual_batches_are_disjoint(digits_model):
    from unlearning.benchmark import continual_batches

    _, ds = digits_model
    batches = continual_batches(ds, "relabel", 8, 4, seed=3)
    ids = [i for b in batches for i in b.ids]
    assert len(ids) == len(set(ids)) == 32
    assert all(bool(b.is_relabel.all()) for b in batches)


@pytest.mark.slow  # ~20 s of Prefect server and Dask worker start on 2 cores, 50+ s when busy
@pytest.mark.flow
def test_dask_gives_the_serial_rows(checkpoint, tmp_path, prefect_server):
    """Two local Dask workers (own processes, own checkpoint load) vs this process."""
    from unlearning.benchmark import variants_for

    variants = variants_for(["neggrad", "l2ul"], overrides={"l2ul": {"max_steps": 30}})
    spec = {
        "dataset": "digits", "data_dir": None, "checkpoint": str(checkpoint),
        "variants": [{"label": v.label, "method": v.method, "params": v.params} for v in variants],
        "objectives": ["misclassify", "relabel"], "ks": [4], "seeds": [0, 1], "retrain": False,
        "retain_fraction": 0.0, "rounds": None, "threads": 1,
        "train": {"epochs": 30, "seed": 0},
    }
    from flows.bench import run_bench

    serial, _ = run_bench(spec, serial=True, quiet=True)
    dask, _ = run_bench(spec, serial=False, workers=2, quiet=True)
    assert len(serial) == 8
    assert _content(dask) == _content(serial)


def test_a_sweep_runs_each_value_on_the_same_forget_sets(checkpoint, tmp_path, capsys):
    """--vary: one row per value, labelled with it, sharing the group's forget set; the value
    reaches the method (a step cap of 5 and of 12 stop at different steps)."""
    out = tmp_path / "rows.json"
    code, stdout, err = _bench(["--serial", "--checkpoint", str(checkpoint), "--dataset",
                                "digits", "--methods", "neggrad,l2ul", "--k", "4",
                                "--threads", "1", "--quiet", "--vary", "l2ul.max_steps=5,12",
                                "--json", str(out)], capsys)
    assert code == 0, err
    rows = json.loads(out.read_text())
    assert [r["method"] for r in rows] == ["neggrad", "l2ul max_steps=5", "l2ul max_steps=12"]
    assert {r["base_method"] for r in rows[1:]} == {"l2ul"}
    assert rows[1]["steps"] == 5 and 5 < rows[2]["steps"] <= 12
    assert "| l2ul max_steps=12 |" in stdout


@pytest.mark.flow
def test_the_bench_workers_keep_glibc_s_default_heap_trimming():
    """Dask's default MALLOC_TRIM_THRESHOLD_=65536 makes torch about 2.7x slower; the bench's
    own cluster starts its workers without it (and leaves this process's environment)."""
    import os

    import distributed

    from flows.bench import local_cluster_kwargs, untrimmed_workers

    def worker_env(cluster: distributed.LocalCluster) -> set:
        with distributed.Client(cluster) as client:
            return set(client.run(os.environ.get, "MALLOC_TRIM_THRESHOLD_").values())

    assert "MALLOC_TRIM_THRESHOLD_" not in os.environ
    with untrimmed_workers(), distributed.LocalCluster(**local_cluster_kwargs(2)) as cluster:
        assert worker_env(cluster) == {None}
    assert "MALLOC_TRIM_THRESHOLD_" not in os.environ
    try:
        with distributed.LocalCluster(**local_cluster_kwargs(1)) as cluster:  # Dask's default
            assert worker_env(cluster) == {"65536"}
    finally:  # Dask's nanny also sets it here, for every later subprocess of the tests
        os.environ.pop("MALLOC_TRIM_THRESHOLD_", None)


def test_include_earlier_keeps_earlier_batches_when_reached(digits_model):
    """Earlier batches in the forget set (the pipeline's include_earlier): a round that reaches
    its objective has, by construction, every earlier deletion still holding."""
    from unlearning.benchmark import Variant, run_continual

    model, ds = digits_model
    rows = run_continual(ds, model, Variant("neggrad", "neggrad", {"max_steps": 200}),
                         "misclassify", 4, 3, seed=0, include_earlier=True)
    assert [r["round"] for r in rows] == [1, 2, 3] and all(r["include_earlier"] for r in rows)
    for r in rows[1:]:
        if r["reached"]:
            assert r["earlier_held"] and r["earlier_objective_rate"] == 100.0


def test_as_if_unseen_rows(checkpoint, tmp_path, capsys):
    out = tmp_path / "rows.json"
    code, _, err = _bench(["--serial", "--checkpoint", str(checkpoint), "--dataset", "digits",
                           "--methods", "l2ul", "--k", "4", "--threads", "1",
                           "--objective", "as-if-unseen", "--json", str(out), "--quiet"], capsys)
    assert code == 0, err
    rows = json.loads(out.read_text())
    assert [r["objective"] for r in rows] == ["as-if-unseen"]
    assert rows[0]["reached"] and rows[0]["test_drop"] <= 3.0


def test_retrain_rows_are_exact_and_every_row_has_its_gap_to_retrain(checkpoint, tmp_path,
                                                                      capsys):
    """Without a retain sample the bench retrains `retrain` on the whole training split minus
    the forget set; with --retrain that is the reference itself, so its gap is 0."""
    out = tmp_path / "rows.json"
    code, stdout, err = _bench(["--serial", "--checkpoint", str(checkpoint), "--dataset",
                                "digits", "--methods", "l2ul,retrain", "--k", "8", "--threads",
                                "1", "--set", "l2ul.max_steps=200", "--epochs", "30",
                                "--objective", "misclassify,as-if-unseen", "--retrain",
                                "--json", str(out), "--quiet"], capsys)
    assert code == 0, err
    rows = {(r["method"], r["objective"]): r for r in json.loads(out.read_text())}
    for objective in ("misclassify", "as-if-unseen"):
        exact = rows[("retrain", objective)]
        assert exact["gap_to_retrain"] == 0.0
        assert exact["unlearn_seconds"] == exact["retrain_seconds"]
        ours = rows[("l2ul", objective)]
        assert {"retain_acc", "mia_efficacy", "membership_auc"} <= set(ours)
        assert ours["gap_to_retrain"] > 0.0
    # misclassify gets the rows wrong where the retrained model still knows them
    assert rows[("l2ul", "misclassify")]["gap_to_retrain"] > \
        rows[("l2ul", "as-if-unseen")]["gap_to_retrain"]
    assert "gap_to_retrain_pp" in stdout
