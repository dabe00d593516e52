"""Hostile input, table-driven: every entry point (``submit``, ``run``, ``promote``,
``rollback``, ``verify``, ``bench``, ``audit``, params.yaml) fed malformed, wrong-typed, empty,
oversized, out-of-range, duplicate, control-character and path-escaping input.

Each row must end with its documented exit code and ONE error line on stderr (no traceback),
and leave the ledger, every file under data/ and the MLflow registry (versions, tags,
aliases, registered models) exactly as they were. The one designed exception: a manifest
that parses but breaks a validation rule is recorded as a *rejected* batch (visible in
``unlearn requests`` with the failed rule, see tasks/validation.py), so those rows allow exactly one new
rejected batch in the ledger and nothing else.

All rows share one prepared state folder: version 1 (pretrain), version 2 (one applied
batch, champion) and one pending batch. The CLI runs in this process (``flows.cli.main``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from flow_helpers import cli

from flows.cli import main
from tasks.paths import Paths

pytestmark = pytest.mark.flow

HEADER = "request_id,instance_id,objective,new_label\n"
DONE_IDS = (10, 11)       # applied in version 2
PENDING_IDS = (20, 21)    # the pending batch
ERROR_LINE = re.compile(r"^unlearn( [a-z-]+)?: (error|failed): ")


# -- the prepared project ---------------------------------------------------------------------


@dataclass
class Project:
    paths: Paths
    inputs: Path                # hostile files live here, outside the state folder
    pending: str                # the pending batch id
    pending_manifest: str       # the text submitted for it
    labels: list[int]
    counter: list[int] = field(default_factory=lambda: [0])

    def file(self, name: str, content: str | bytes) -> str:
        """A fresh input file (unique name, so no row sees another row's file)."""
        self.counter[0] += 1
        path = self.inputs / f"{self.counter[0]:03d}-{name}"
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
        return str(path)


@pytest.fixture(scope="module")
def project(tmp_path_factory, prefect_server, write_params):
    root = tmp_path_factory.mktemp("hostile-home")
    inputs = tmp_path_factory.mktemp("hostile-inputs")
    write_params(root)
    from unlearning.datasets import load_digits

    labels = load_digits().train_y.tolist()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("UNLEARN_HOME", str(root))
        mp.delenv("UNLEARN_PARAMS", raising=False)
        assert cli("pretrain", "--epochs", "4")[0] == 0
        done = inputs / "done.csv"
        done.write_text(HEADER + "".join(f"d-{i},{i},misclassify,\n" for i in DONE_IDS))
        rc, out, err = cli("submit", str(done))
        assert rc == 0, err
        rc, out, err = cli("run")
        assert rc == 0 and "-> version 2" in out, out + err
        text = HEADER + "".join(f"p-{i},{i},misclassify,\n" for i in PENDING_IDS)
        pending = inputs / "pending.csv"
        pending.write_text(text)
        rc, out, err = cli("submit", str(pending))
        assert rc == 0, err
        yield Project(Paths(root), inputs, out.split(":")[0], text, labels)


# -- snapshots --------------------------------------------------------------------------------


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def ledger_state(path: Path) -> dict[str, Any]:
    """Every row of every ledger table; the file's hash if it is not a readable database."""
    if not path.exists():
        return {"missing": True}
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            tables = [r[0] for r in db.execute(
                "SELECT name FROM sqlite_master WHERE type='table' ORDER BY name")]
            return {t: sorted(db.execute(f"SELECT * FROM {t}").fetchall(), key=repr)
                    for t in tables}
        finally:
            db.close()
    except sqlite3.DatabaseError:
        return {"bytes": _sha(path)}


def data_state(folder: Path) -> dict[str, str]:
    """sha256 of every file under data/ (a link is recorded as its target, not followed)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in filenames + [d for d in dirnames if Path(dirpath, d).is_symlink()]:
            path = Path(dirpath, name)
            rel = str(path.relative_to(folder))
            out[rel] = f"link:{os.readlink(path)}" if path.is_symlink() else _sha(path)
    return out


def registry_state(paths: Paths) -> dict[str, Any]:
    """Registered models, their aliases, and every version with its status and tags."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=paths.default_tracking_uri,
                          registry_uri=paths.default_tracking_uri)
    state: dict[str, Any] = {}
    for model in client.search_registered_models():
        versions = client.search_model_versions(f"name = '{model.name}'")
        state[model.name] = {
            "aliases": dict(model.aliases),
            "versions": sorted((int(v.version), v.status, sorted(v.tags.items()))
                               for v in versions),
        }
    return state


def snapshot(project: Project) -> dict[str, Any]:
    paths = project.paths
    return {"ledger": ledger_state(paths.ledger), "data": data_state(paths.data),
            "registry": registry_state(paths), "params": _sha(paths.home / "params.yaml")}


def new_batches(before: dict[str, Any], after: dict[str, Any]) -> list[tuple]:
    """Batches that appeared in the ledger; fails if any existing row changed or vanished."""
    for table in ("batches", "requests", "releases", "promotions"):
        gone = set(before[table]) - set(after[table])
        assert not gone, f"ledger {table} rows changed or vanished: {gone}"
    assert after["releases"] == before["releases"]
    assert after["promotions"] == before["promotions"]
    return [row for row in after["batches"] if row not in before["batches"]]


# -- the table --------------------------------------------------------------------------------

Setup = Callable[[Project], Callable[[], None] | None]


@dataclass
class Row:
    id: str
    argv: Callable[[Project], list[str]]
    rc: int
    message: str                       # regex searched in the error line (stdout when rc 0)
    rejected: bool = False             # a validation rejection: one rejected batch recorded
    setup: Setup | None = None         # changes the state before the snapshot; returns undo
    env: dict[str, str] = field(default_factory=dict)
    params: str | bytes | None = None  # UNLEARN_PARAMS gets a file with this content


def csv_rows(*lines: str) -> str:
    return HEADER + "".join(line + "\n" for line in lines)


def submit(name: str, content: str | bytes) -> Callable[[Project], list[str]]:
    return lambda p: ["submit", p.file(name, content)]


def submit_with(make: Callable[[Project], str | bytes], name: str = "m.csv"):
    return lambda p: ["submit", p.file(name, make(p))]


def jsonl(*records: dict | str) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)


def rule(name: str) -> str:
    return rf"rejected: validation: rule {name} failed"


def other_label(p: Project, i: int) -> int:
    return (p.labels[i] + 1) % 10


# state tampering for `run` (and the ledger for every command); each returns its undo


def _swap(path: Path, write: Callable[[Path], None]) -> Callable[[], None]:
    saved = path.with_name(path.name + ".saved")
    os.replace(path, saved)
    write(path)

    def undo() -> None:
        if path.is_symlink() or path.exists():
            path.unlink()
        os.replace(saved, path)
    return undo


def tamper_content(p: Project):
    path = p.paths.manifest(p.pending)
    return _swap(path, lambda t: t.write_text(p.pending_manifest.replace("p-21,21", "p-21,22")))


def tamper_garbage(p: Project):
    return _swap(p.paths.manifest(p.pending), lambda t: t.write_bytes(os.urandom(512)))


def tamper_missing(p: Project):
    return _swap(p.paths.manifest(p.pending), lambda t: None)


def tamper_symlink_outside(p: Project):
    """The manifest replaced by a link to an identical copy outside the state folder."""
    path = p.paths.manifest(p.pending)
    outside = p.inputs / "outside-copy.csv"
    shutil.copyfile(path, outside)
    return _swap(path, lambda t: t.symlink_to(outside))


def tamper_symlink_passwd(p: Project):
    return _swap(p.paths.manifest(p.pending), lambda t: t.symlink_to("/etc/passwd"))


def corrupt_ledger(p: Project):
    """ledger.db overwritten with garbage behind a valid SQLite header (its WAL set aside)."""
    path = p.paths.ledger
    undo_side = [_swap(side, lambda t: None) for side in
                 (Path(f"{path}-wal"), Path(f"{path}-shm")) if side.exists()]
    undo_main = _swap(path, lambda t: t.write_bytes(b"SQLite format 3\x00" + os.urandom(4096)))

    def undo() -> None:
        for side in (Path(f"{path}-wal"), Path(f"{path}-shm")):
            side.unlink(missing_ok=True)  # anything a failed open may have left
        undo_main()
        for u in undo_side:
            u()
    return undo


def symlink_to(target: str, name: str = "link.csv") -> Callable[[Project], list[str]]:
    def argv(p: Project) -> list[str]:
        p.counter[0] += 1
        link = p.inputs / f"{p.counter[0]:03d}-{name}"
        link.symlink_to(target)
        return ["submit", str(link)]
    return argv


def huge_sparse(p: Project) -> list[str]:
    """A manifest over the size cap: a sparse 11 MiB file (no disk, no time)."""
    path = Path(p.file("huge.csv", HEADER))
    with open(path, "r+b") as f:
        f.truncate(11 * 2**20)
    return ["submit", str(path)]


def good_manifest(p: Project) -> list[str]:
    return ["submit", p.file("fresh.csv", csv_rows("fresh-1,40,misclassify,"))]


GOOD_PARAMS_CMDS = {
    "run": lambda p: ["run"],
    "submit": good_manifest,
    "promote": lambda p: ["promote", "2"],
    "audit": lambda p: ["audit", "d-10"],
}

ROWS: list[Row] = [
    # -- submit: files that are not manifests (exit 2, nothing recorded) ------------------
    Row("submit-missing-file", lambda p: ["submit", str(p.inputs / "nope.csv")], 2,
        "does not exist"),
    Row("submit-directory", lambda p: ["submit", str(p.inputs)], 2, "not a regular file"),
    Row("submit-empty-csv", submit("empty.csv", ""), 2, "is empty"),
    Row("submit-empty-jsonl", submit("empty.jsonl", ""), 2, "is empty"),
    Row("submit-blank-lines-jsonl", submit("blank.jsonl", "\n  \n\n"), 2, "is empty"),
    Row("submit-binary-garbage", submit("garbage.csv", bytes(range(256)) * 64), 2,
        "not UTF-8"),
    Row("submit-latin1-text", submit("latin.csv", csv_rows("é-1,5,misclassify,").encode(
        "latin-1")), 2, "not UTF-8"),
    Row("submit-unterminated-quote", submit("quote.csv", HEADER + '"r1,5,misclassify,\n'), 2,
        "not valid CSV"),
    Row("submit-ragged-row", submit("ragged.csv", csv_rows("r1,5,misclassify,,,,")), 2,
        "line 2: expected 4 fields"),
    Row("submit-duplicate-column", submit(
        "dupcol.csv", "request_id,request_id,instance_id,objective,new_label\nr,r,5,misclassify,\n"),
        2, "duplicate column"),
    Row("submit-unknown-format", submit("m.xlsx", "PK\x03\x04"), 2, "unknown manifest format"),
    Row("submit-path-escape", lambda p: ["submit", "../" * 12 + "etc/passwd"], 2,
        "unknown manifest format"),
    Row("submit-symlink-to-device", symlink_to("/dev/zero"), 2, "not a regular file"),
    Row("submit-over-size-cap", huge_sparse, 2, r"over the 10 MiB limit"),
    Row("submit-over-row-cap", submit("rows.csv", HEADER + "r,1,misclassify,\n" * 100_001), 2,
        "more than 100000 rows"),
    Row("submit-broken-json-line", submit("broken.jsonl", '{"request_id": "a"}\n{oops\n'), 2,
        "line 2: not valid JSON"),
    Row("submit-json-array", submit("array.json", '[{"request_id": "a"}]\n'), 2,
        "expected a JSON object"),
    Row("submit-json-nested-bomb", submit("deep.jsonl", "[" * 100_000 + "]" * 100_000 + "\n"),
        2, "nested too deeply"),
    # -- submit: manifests that break a rule (exit 1, recorded as rejected) ----------------
    Row("submit-wrong-columns", submit("cols.csv", "id,instance\n1,2\n"), 1, rule("columns"),
        rejected=True),
    Row("submit-header-only", submit("header.csv", HEADER), 1, rule("non_empty"),
        rejected=True),
    Row("submit-symlink-outside", lambda p: symlink_to(p.file("outside.csv", "id,x\n1,2\n"))(p),
        1, rule("columns"), rejected=True),
    Row("submit-over-batch-size", submit("batch.csv", HEADER + "".join(
        f"big-{i},{i + 100},misclassify,\n" for i in range(300))), 1, rule("batch_size_limit"),
        rejected=True),
    Row("submit-id-not-integer", submit("text.csv", csv_rows("r1,five,misclassify,")), 1,
        rule("instance_id_integer"), rejected=True),
    Row("submit-id-float", submit("float.csv", csv_rows("r1,3.0,misclassify,")), 1,
        rule("instance_id_integer"), rejected=True),
    Row("submit-id-path", submit("path.csv", csv_rows("r1,../../etc/passwd,misclassify,")), 1,
        rule("instance_id_integer"), rejected=True),
    Row("submit-json-id-float", submit("f.jsonl", jsonl(
        {"request_id": "r1", "instance_id": 1.5, "objective": "misclassify"})), 1,
        rule("instance_id_integer"), rejected=True),
    Row("submit-json-id-bool", submit("b.jsonl", jsonl(
        {"request_id": "r1", "instance_id": True, "objective": "misclassify"})), 1,
        rule("instance_id_integer"), rejected=True),
    Row("submit-json-id-object", submit("o.jsonl", jsonl(
        {"request_id": "r1", "instance_id": {"$gt": 0}, "objective": "misclassify"})), 1,
        rule("instance_id_integer"), rejected=True),
    Row("submit-json-id-huge", submit("h.jsonl", jsonl(
        '{"request_id": "r1", "instance_id": 99999999999999999999999, '
        '"objective": "misclassify"}')), 1, rule("instance_id_integer"), rejected=True),
    Row("submit-json-id-null", submit("n.jsonl", jsonl(
        {"request_id": "r1", "instance_id": None, "objective": "misclassify"})), 1,
        rule("instance_id_present"), rejected=True),
    Row("submit-id-negative", submit("neg.csv", csv_rows("r1,-1,misclassify,")), 1,
        rule("instance_in_training_split"), rejected=True),
    Row("submit-id-out-of-range", submit("oor.csv", csv_rows("r1,1000000,misclassify,")), 1,
        rule("instance_in_training_split"), rejected=True),
    Row("submit-duplicate-instance-in-batch", submit(
        "dupi.csv", csv_rows("r1,30,misclassify,", "r2,30,misclassify,")), 1,
        rule("unique_instance_id"), rejected=True),
    Row("submit-duplicate-request-in-batch", submit(
        "dupr.csv", csv_rows("r1,30,misclassify,", "r1,31,misclassify,")), 1,
        rule("unique_request_id"), rejected=True),
    Row("submit-instance-pending-elsewhere", submit(
        "cross.csv", csv_rows("x-1,31,misclassify,", f"x-2,{PENDING_IDS[0]},misclassify,")), 1,
        rule("not_already_deleted"), rejected=True),
    Row("submit-instance-already-deleted", submit(
        "deleted.csv", csv_rows(f"x-3,{DONE_IDS[0]},misclassify,")), 1,
        rule("not_already_deleted"), rejected=True),
    Row("submit-request-id-reused", submit("reuse.csv", csv_rows("d-10,32,misclassify,")), 1,
        rule("request_id_not_reused"), rejected=True),
    Row("submit-unknown-objective", submit("obj.csv", csv_rows("r1,33,forget,")), 1,
        rule("objective_allowed"), rejected=True),
    Row("submit-objective-wrong-case", submit("case.csv", csv_rows("r1,33,MISCLASSIFY,")), 1,
        rule("objective_allowed"), rejected=True),
    Row("submit-label-out-of-range", submit("lbl.csv", csv_rows("r1,34,relabel,10")), 1,
        rule("new_label_in_range"), rejected=True),
    Row("submit-label-negative", submit("lneg.csv", csv_rows("r1,34,relabel,-1")), 1,
        rule("new_label_in_range"), rejected=True),
    Row("submit-label-not-integer", submit("lstr.csv", csv_rows("r1,34,relabel,seven")), 1,
        rule("new_label_integer"), rejected=True),
    Row("submit-label-equals-current", submit_with(
        lambda p: csv_rows(f"r1,34,relabel,{p.labels[34]}")), 1, rule("new_label_differs"),
        rejected=True),
    Row("submit-relabel-without-label", submit("nolbl.csv", csv_rows("r1,35,relabel,")), 1,
        rule("relabel_needs_new_label"), rejected=True),
    Row("submit-label-for-misclassify", submit_with(
        lambda p: csv_rows(f"r1,35,misclassify,{other_label(p, 35)}")), 1,
        rule("new_label_only_for_relabel"), rejected=True),
    Row("submit-request-id-escape-sequence", submit("esc.csv", csv_rows("r\x1b[2J\x1b[31m,36,"
                                                                      "misclassify,")), 1,
        rule("request_id_format"), rejected=True),
    Row("submit-request-id-nul", submit("nul.csv", csv_rows("r\x001,36,misclassify,")), 1,
        rule("request_id_format"), rejected=True),
    Row("submit-request-id-newline", submit("nl.csv", HEADER + '"a\nb",36,misclassify,\n'), 1,
        rule("request_id_format"), rejected=True),
    Row("submit-request-id-10k-chars", submit("long.csv", csv_rows("x" * 10_000
                                                                   + ",36,misclassify,")), 1,
        rule("request_id_format"), rejected=True),
    # -- submit: the same requests again (recognised, nothing recorded, exit 0) -------------
    Row("submit-same-manifest-again", submit_with(lambda p: p.pending_manifest), 0,
        r"already submitted \(pending, 2 request\(s\)\); nothing recorded"),
    Row("submit-same-requests-as-jsonl", submit_with(lambda p: jsonl(*(
        {"request_id": f"p-{i}", "instance_id": i, "objective": "misclassify"}
        for i in PENDING_IDS)), "same.jsonl"), 0, "already submitted"),
    # -- run: the pending batch's accepted manifest damaged (exit 1, nothing applied) -------
    Row("run-manifest-tampered", lambda p: ["run"], 1, "changed since it was accepted",
        setup=tamper_content),
    Row("run-manifest-garbage", lambda p: ["run"], 1, "changed since it was accepted",
        setup=tamper_garbage),
    Row("run-manifest-missing", lambda p: ["run"], 1, r"is missing: restore data/",
        setup=tamper_missing),
    Row("run-manifest-symlink-outside", lambda p: ["run"], 1, "leads out of",
        setup=tamper_symlink_outside),
    Row("run-manifest-symlink-passwd", lambda p: ["run"], 1, "leads out of",
        setup=tamper_symlink_passwd),
    # -- a damaged ledger, for every command that reads it (exit 1, file untouched) ---------
    Row("run-ledger-corrupt", lambda p: ["run"], 1, "damaged or not a ledger",
        setup=corrupt_ledger),
    Row("submit-ledger-corrupt", good_manifest, 1, "damaged or not a ledger",
        setup=corrupt_ledger),
    Row("audit-ledger-corrupt", lambda p: ["audit", "d-10"], 1, "damaged or not a ledger",
        setup=corrupt_ledger),
    Row("promote-ledger-corrupt", lambda p: ["promote", "1"], 1, "damaged or not a ledger",
        setup=corrupt_ledger),
    # -- promote / rollback / verify: unknown or malformed versions ------------------------
    Row("promote-unknown-version", lambda p: ["promote", "99"], 2, "has no version 99"),
    Row("promote-zero", lambda p: ["promote", "0"], 2, "expected a version number"),
    Row("promote-negative", lambda p: ["promote", "-1"], 2, "expected a version number"),
    Row("promote-not-a-number", lambda p: ["promote", "champion"], 2, "expected a version number"),
    Row("promote-float", lambda p: ["promote", "1.5"], 2, "expected a version number"),
    Row("promote-huge", lambda p: ["promote", "9" * 30], 2, "expected a version number"),
    Row("promote-empty-string", lambda p: ["promote", ""], 2, "expected a version number"),
    Row("promote-missing-argument", lambda p: ["promote"], 2, "required: version"),
    Row("promote-predates-deletion", lambda p: ["promote", "1"], 1,
        "predates committed deletion"),
    Row("rollback-unknown-version", lambda p: ["rollback", "--to", "99"], 2, "has no version 99"),
    Row("rollback-negative", lambda p: ["rollback", "--to", "-3"], 2, "expected a version|"
        "expected a version number"),
    Row("rollback-not-a-number", lambda p: ["rollback", "--to", "@champion"], 2,
        "expected a version number"),
    Row("rollback-predates-deletion", lambda p: ["rollback"], 1, "predates committed deletion"),
    Row("verify-unknown-version", lambda p: ["verify", "99"], 2, "has no version 99"),
    Row("verify-negative", lambda p: ["verify", "-1"], 2, "expected a version|"
        "expected a version number"),
    Row("verify-not-a-number", lambda p: ["verify", "latest"], 2, "expected a version number"),
    Row("verify-version-and-all", lambda p: ["verify", "1", "--all"], 2, "not allowed with"),
    # -- audit: ids that match nothing (exit 2) ---------------------------------------------
    Row("audit-empty-id", lambda p: ["audit", ""], 2, "no request or instance"),
    Row("audit-path-escape", lambda p: ["audit", "../../etc/passwd"], 2,
        "no request or instance"),
    Row("audit-escape-sequence", lambda p: ["audit", "\x1b[2J\x1b[31m"], 2,
        r"no request or instance with id '\\x1b"),
    Row("audit-10k-chars", lambda p: ["audit", "y" * 10_000], 2, "no request or instance"),
    Row("audit-negative-instance", lambda p: ["audit", "-987654"], 2, "no request or instance"),
    Row("audit-huge-instance", lambda p: ["audit", "9" * 40], 2, "no request or instance"),
    # -- bench: argument checks before any work (exit 2) ------------------------------------
    Row("bench-negative-k", lambda p: ["bench", "--k", "-1"], 2, "non-negative integers"),
    Row("bench-zero-k", lambda p: ["bench", "--k", "0"], 2, "--k values must be >= 1"),
    Row("bench-text-k", lambda p: ["bench", "--k", "eight"], 2, "comma-separated integers"),
    Row("bench-zero-threads", lambda p: ["bench", "--threads", "0"], 2, "--threads must be"),
    Row("bench-unknown-method", lambda p: ["bench", "--methods", "nosuch"], 2, "nosuch"),
    Row("bench-unknown-objective", lambda p: ["bench", "--objective", "forget"], 2,
        "--objective must be"),
    Row("bench-unknown-dataset", lambda p: ["bench", "--dataset", "../../etc"], 2,
        "unknown dataset"),
    Row("bench-retain-fraction", lambda p: ["bench", "--retain-fraction", "5"], 2,
        "--retain-fraction must be"),
    Row("bench-k-too-large", lambda p: ["bench", "--k", "100000"], 2, "exceed"),
    Row("bench-checkpoint-not-a-checkpoint", lambda p: ["bench", "--checkpoint", "/etc/passwd"],
        2, "not a weights-only checkpoint"),
    Row("bench-bad-set", lambda p: ["bench", "--set", "lr=1"], 2, "expected METHOD.KEY=VALUE"),
    Row("unknown-command", lambda p: ["frobnicate"], 2, "invalid choice"),
    # -- params.yaml (UNLEARN_PARAMS) for each pipeline command (exit 2) --------------------
    *(Row(f"params-{name}-{cmd}", GOOD_PARAMS_CMDS[cmd], 2, msg, params=content)
      for cmd in GOOD_PARAMS_CMDS
      for name, content, msg in (
          ("malformed-yaml", "gates: [unclosed\n", "not valid YAML"),
          ("empty", "", "is empty"),
          ("unknown-key", "gates:\n  max_test_dorp: 1.0\n", "unknown key 'gates.max_test_dorp'"),
      )),
    Row("params-wrong-type", lambda p: ["run"], 2, "pretrain.epochs: input should be a valid "
        "integer", params="pretrain:\n  epochs: ten\n"),
    Row("params-a-list", lambda p: ["run"], 2, "expected a mapping", params="- 1\n- 2\n"),
    Row("params-binary", lambda p: ["run"], 2, "not readable YAML|not valid YAML",
        params=bytes(range(256))),
    Row("params-negative-threads", lambda p: ["run"], 2, "runtime.torch_threads",
        params="runtime:\n  torch_threads: -4\n"),
    Row("params-unknown-method-param", lambda p: ["run"], 2, "unknown parameter",
        params="unlearn:\n  params:\n    learning_rate: 0.1\n"),
    Row("params-missing-file", lambda p: ["run"], 2, "cannot read",
        env={"UNLEARN_PARAMS": "/nonexistent/params.yaml"}),
    Row("params-is-directory", lambda p: ["run"], 2, "cannot read",
        env={"UNLEARN_PARAMS": "/etc"}),
]


def test_the_table_is_big_enough():
    assert len(ROWS) >= 40
    assert len({r.id for r in ROWS}) == len(ROWS)
    commands = {r.id.split("-")[0] for r in ROWS}
    assert {"submit", "run", "promote", "rollback", "verify", "bench", "audit",
            "params"} <= commands


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_hostile_input(row: Row, project: Project, capfd, monkeypatch):
    monkeypatch.setenv("UNLEARN_HOME", str(project.paths.home))
    monkeypatch.delenv("UNLEARN_PARAMS", raising=False)
    for key, value in row.env.items():
        monkeypatch.setenv(key, value)
    if row.params is not None:
        monkeypatch.setenv("UNLEARN_PARAMS", project.file("params.yaml", row.params))
    argv = row.argv(project)
    undo = row.setup(project) if row.setup else None
    try:
        before = snapshot(project)
        capfd.readouterr()
        rc = main(argv)
        out, err = capfd.readouterr()
        after = snapshot(project)
    finally:
        if undo is not None:
            undo()

    assert "Traceback" not in out + err, err
    assert rc == row.rc, f"exit {rc}, expected {row.rc}\nstdout: {out[-2000:]}\nstderr: {err}"
    errors = [line for line in err.splitlines() if ERROR_LINE.match(line)]
    others = [line for line in err.splitlines()
              if line.strip() and not ERROR_LINE.match(line)
              and not line.startswith("processing pending batches")]
    assert not others, f"unexpected stderr lines: {others}"
    if rc == 0:
        assert not errors and re.search(row.message, out), out
    else:
        assert len(errors) == 1, err
        assert re.search(row.message, errors[0]), errors[0]
        assert len(errors[0]) < 1000, "an error line must stay readable"

    added = new_batches(before["ledger"], after["ledger"]) if "batches" in before["ledger"] \
        else []
    if row.rejected:
        assert [b[2] for b in added] == ["rejected"], added
    else:
        assert after["ledger"] == before["ledger"]
    assert after["data"] == before["data"]
    assert after["registry"] == before["registry"]
    assert after["params"] == before["params"]


def test_hostile_console_script_prints_one_line(project):
    """The same in a real process (the console script): stderr, fd level, one line."""
    import subprocess
    import sys

    unlearn = shutil.which("unlearn", path=os.path.dirname(sys.executable))
    env = {**os.environ, "UNLEARN_HOME": str(project.paths.home)}
    bad = project.file("fd.jsonl", "[" * 50_000 + "]" * 50_000 + "\n")
    for argv, rc, message in ((["submit", bad], 2, "nested too deeply"),
                              (["promote", "x"], 2, "expected a version number")):
        done = subprocess.run([unlearn, *argv], capture_output=True, text=True, env=env,
                              timeout=300, check=False)
        assert done.returncode == rc, done.stderr
        assert done.stderr.count("\n") == 1 and message in done.stderr, done.stderr
