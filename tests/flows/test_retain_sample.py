"""A retain sample in the pipeline (`unlearn.retain_fraction`): each batch draws its own share
of the training rows, never a row of a deleted batch, records the rows it read with the
release, and `unlearn verify` and `dvc repro` rebuild the weights bit for bit."""

from __future__ import annotations

import json

import pytest
from flow_helpers import cli, cli_json, dvc, erase_and_fix

from tasks.params import load_params
from tasks.paths import Paths

pytestmark = pytest.mark.flow

FRACTION = 0.01


@pytest.fixture(scope="module")
def retained(tmp_path_factory, prefect_server, write_params):
    """Version 1 (4 epochs) and two batches released with a 1% retain sample."""
    root = tmp_path_factory.mktemp("retain")
    write_params(root, pretrain={"epochs": 4}, unlearn={"retain_fraction": FRACTION})
    erase, fix = erase_and_fix(root)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("UNLEARN_HOME", str(root))
        assert cli("pretrain")[0] == 0
        batches = []
        for manifest in (erase, fix):
            rc, result = cli_json("submit", str(manifest))
            assert rc == 0, result
            batches.append(result["batch_id"])
        rc, run = cli_json("run")
        assert run["status"] == "ok", run
        _, releases = cli_json("releases")
        yield {"paths": Paths(root), "batches": batches, "versions": releases["versions"]}


def test_each_release_reads_its_own_retain_sample_outside_every_deleted_row(retained):
    from unlearning.datasets import load_digits

    paths, (first, second) = retained["paths"], retained["batches"]
    assert [v["version"] for v in retained["versions"]] == [1, 2, 3]
    num_train = len(load_digits().train_y)
    read = {b: json.loads((paths.batch_dir(b) / "unlearn.json").read_text())["retain_ids"]
            for b in (first, second)}
    for ids in read.values():
        assert len(ids) == round(num_train * FRACTION) and ids == sorted(set(ids))
        assert all(0 <= i < num_train for i in ids)
    assert read[first] != read[second]  # each batch draws with its own seed
    assert not {11, 222, 333, 444} & set(read[first])
    assert not {11, 222, 333, 444, 555, 666} & set(read[second])


def test_the_sample_leaves_out_the_rows_of_every_batch_the_parent_holds(retained):
    """Against the draw that excludes nothing: a seed whose plain draw holds a deleted row
    draws a sample without it, and every other row of the plain draw stays."""
    from tasks.release import retain_sample
    from unlearning.datasets import load_digits, sample_retain_ids

    paths, first = retained["paths"], retained["batches"][0]
    cfg = load_params(paths.params_file)
    labels = load_digits().train_y
    num_train = len(labels)
    held = {11, 222, 333, 444}  # the first batch's rows
    seed = next(s for s in range(10_000)
                if held & set(sample_retain_ids(num_train, [], FRACTION, s)))
    plain = set(sample_retain_ids(num_train, [], FRACTION, seed))
    sample, ids = retain_sample(paths, cfg, [first], [555, 666], seed)
    assert not (held | {555, 666}) & set(ids)
    assert plain - held - {555, 666} <= set(ids) and len(ids) == len(plain)
    assert sample.x.shape[0] == len(ids) and sample.y.tolist() == [int(labels[i]) for i in ids]


def test_verify_and_dvc_repro_rebuild_the_retain_releases_bit_for_bit(retained):
    rc, result = cli_json("verify", "--all")
    assert rc == 0, result.get("diverged")
    assert result["verified"] == [1, 2, 3]
    home = retained["paths"].home
    done = dvc(home, "repro")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rebuilt = json.loads((home / "artifacts/releases/hashes.json").read_text())["releases"]
    assert {v: r["weights_sha256"] for v, r in rebuilt.items()} == {
        str(v["version"]): v["lineage"]["weights_sha256"] for v in retained["versions"]}
