"""``unlearn run --watch``: one long-lived process that releases batches as they are submitted.

Real processes against one state folder and the session's Prefect server (one of them on
Prefect's temporary server, the default set-up):

- each batch submitted while the watcher waits is released by the next pass (one JSON line
  per pass, timed), and a pass refused because another command holds the pipeline lock is
  skipped, not fatal: the batch is released once the lock is free;
- SIGTERM while idle ends the watcher at once (exit 0); during a flow run it ends that run
  where it is (exit 143) and loses nothing: the batch stays pending and the next run
  releases it;
- a pass that fails (a pending batch's manifest is gone) ends the watcher with that one line
  (exit 1) instead of failing again every few seconds, and loses nothing: with the manifest
  back, the batch is released;
- a one-shot ``unlearn run`` beside a watcher wakes it and answers with its pass (the
  batch released once, by the watcher); a pass that fails fails that command with the
  pass's line (exit 2 for a params.yaml the pass refuses, as without a watcher), a watcher
  killed mid-pass leaves the batch pending for the next run, and one killed after its
  release but before its report leaves the ledger's word;
- bad options are refused on one line (exit 2) before anything starts.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
import types

import pytest
from flow_helpers import Home, cli, cli_json, pretrained_home

from tasks.ledger import Ledger
from tasks.locks import pipeline_lock
from tasks.watcher import PassLog, record_pass

pytestmark = pytest.mark.flow
WAIT = 300  # seconds for one pass on 2 shared cores, generously


@pytest.fixture(scope="module")
def home(tmp_path_factory, prefect_server, write_params):
    return pretrained_home(tmp_path_factory.mktemp("watch"), write_params, first_id=300)


UNLEARN = shutil.which("unlearn", path=os.path.dirname(sys.executable))


def unlearn_env(home: Home) -> dict[str, str]:
    return {**os.environ, "UNLEARN_HOME": str(home.paths.home),
            "PREFECT_API_URL": home.api_url, "OMP_NUM_THREADS": "1"}


def one_shot_run(home: Home, *args: str) -> subprocess.Popen:
    """``unlearn run ARGS`` in its own process, as an operator types it beside a watcher."""
    return subprocess.Popen([UNLEARN, "run", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=unlearn_env(home))


class Watcher:
    """``unlearn run --watch 1 ARGS`` in its own process; its stdout and stderr lines are
    read as they come (a full pipe never stops it)."""

    def __init__(self, home: Home, *args: str, temporary_server: bool = False,
                 every: int = 1, **extra_env: str) -> None:
        env = {**unlearn_env(home), **extra_env}
        if temporary_server:  # as on a fresh machine: Prefect's temporary server, in here
            env.pop("PREFECT_API_URL")
            env["PREFECT_HOME"] = str(home.paths.home / ".prefect-watch")
        self.proc = subprocess.Popen([UNLEARN, "run", "--watch", str(every), *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env=env)
        self.out: queue.Queue[str] = queue.Queue()
        self.err: queue.Queue[str] = queue.Queue()
        self.said: list[str] = []
        for stream, into in ((self.proc.stdout, self.out), (self.proc.stderr, self.err)):
            threading.Thread(target=lambda s=stream, q=into: [q.put(line) for line in s],
                             daemon=True).start()

    def said_line(self, start: str, timeout: float = WAIT) -> str:
        """The first stderr line that starts with ``start``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.err.get(timeout=1)
            except queue.Empty:
                assert self.proc.poll() is None or not self.err.empty(), \
                    f"the watcher exited {self.proc.returncode}: {self.said[-3:]}"
                continue
            self.said.append(line.rstrip())
            if line.startswith(start):
                return line.rstrip()
        raise AssertionError(f"no line starting {start!r} in {timeout} s: {self.said[-3:]}")

    def next_pass(self, timeout: float = WAIT) -> dict:
        try:
            return json.loads(self.out.get(timeout=timeout))
        except queue.Empty:
            raise AssertionError(f"no pass in {timeout} s (exit {self.proc.poll()}): "
                                 f"{self.said[-3:]}") from None

    def reaches(self, gate, timeout: float = WAIT) -> None:
        """Waits until the watcher waits at its fault point (``gate``.reached exists)."""
        deadline = time.monotonic() + timeout
        while not gate.with_name("gate.reached").exists():
            assert time.monotonic() < deadline and self.proc.poll() is None, self.said
            time.sleep(0.2)

    def wait(self, timeout: float = 60) -> int:
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def submit(home: Home) -> str:
    """``unlearn submit`` of two new rows; the batch id."""
    rc, out, err = cli("submit", str(home.manifest(2, tag="w")))
    assert rc == 0, err
    return out.split(":")[0]


def champion(home: Home) -> int:
    rc, listing = cli_json("releases")
    assert rc == 0
    return int(listing["champion"])


def test_releases_each_batch_as_it_arrives_and_waits_out_a_held_lock(home, monkeypatch):
    monkeypatch.setenv("UNLEARN_HOME", str(home.paths.home))
    before = champion(home)
    watcher = Watcher(home, "--json", "--stop-after", "2")
    try:
        watcher.said_line("watching for pending batches every 1 s")
        assert cli("submit", str(home.manifest(2, tag="w")))[0] == 0
        first = watcher.next_pass()
        assert first["status"] == "ok" and [b["state"] for b in first["batches"]] == ["done"]
        batch = first["batches"][0]
        assert first["champion"] == batch["version"] > before
        # the pass is timed around the state check and the flow: at least the batch itself
        assert first["seconds"] >= batch["seconds"] >= batch["unlearn_seconds"] > 0

        with pipeline_lock(home.paths) as got:  # another pipeline command is running
            assert got
            assert cli("submit", str(home.manifest(2, tag="w")))[0] == 0
            skipped = watcher.said_line("skipped a pass: another pipeline command is running")
            assert f"process {os.getpid()}" in skipped
            with Ledger(home.paths.ledger) as ledger:
                assert len(ledger.batches("pending")) == 1  # refused: nothing moved
        second = watcher.next_pass()
        assert [b["state"] for b in second["batches"]] == ["done"]
        assert second["champion"] == second["batches"][0]["version"] > first["champion"]
        assert watcher.wait() == 0  # --stop-after 2
    finally:
        watcher.stop()
    assert champion(home) == second["champion"]


def test_on_prefects_temporary_server(home, monkeypatch):
    """The default set-up (no PREFECT_API_URL): the watcher starts Prefect's temporary server
    once and releases a batch through it."""
    monkeypatch.setenv("UNLEARN_HOME", str(home.paths.home))
    watcher = Watcher(home, "--json", "--stop-after", "1", temporary_server=True)
    try:
        watcher.said_line("watching for pending batches")
        assert cli("submit", str(home.manifest(2, tag="w")))[0] == 0
        passed = watcher.next_pass()
        assert [b["state"] for b in passed["batches"]] == ["done"]
        assert passed["champion"] == passed["batches"][0]["version"]
        assert watcher.wait() == 0
    finally:
        watcher.stop()
    assert champion(home) == passed["champion"]


def test_sigterm_while_idle_stops_at_once(home):
    watcher = Watcher(home)
    try:
        watcher.said_line("watching for pending batches")
        start = time.monotonic()
        watcher.proc.send_signal(signal.SIGTERM)
        assert watcher.wait(timeout=30) == 0
        assert time.monotonic() - start < 10
    finally:
        watcher.stop()


def test_sigterm_during_a_flow_run_leaves_the_batch_pending(home, monkeypatch, tmp_path):
    monkeypatch.setenv("UNLEARN_HOME", str(home.paths.home))
    gate = tmp_path / "gate"  # the flow run waits at the point while this file exists
    gate.write_text("")
    watcher = Watcher(home, UNLEARN_FAULT="after:lock=wait", UNLEARN_FAULT_GATE=str(gate))
    try:
        watcher.said_line("watching for pending batches")
        batch_id = submit(home)
        watcher.reaches(gate)  # the flow run holds the lock
        watcher.proc.send_signal(signal.SIGTERM)
        assert watcher.wait(timeout=120) == 143
        stopped = watcher.said_line("unlearn run: stopped by SIGTERM during a flow run")
        assert "unfinished batches stay pending" in stopped
    finally:
        watcher.stop()
    with Ledger(home.paths.ledger) as ledger:
        assert [b.batch_id for b in ledger.batches("pending")] == [batch_id]
    rc, result = cli_json("run")
    assert rc == 0 and [(b["batch_id"], b["state"]) for b in result["batches"]] == \
        [(batch_id, "done")]


def test_a_failed_pass_ends_the_watch_and_loses_nothing(home, monkeypatch):
    monkeypatch.setenv("UNLEARN_HOME", str(home.paths.home))
    watcher = Watcher(home)
    try:
        watcher.said_line("watching for pending batches")
        with pipeline_lock(home.paths) as got:  # no pass gets through while the input goes
            assert got
            batch_id = submit(home)
            manifest = home.paths.manifest(batch_id)
            kept = manifest.read_bytes()
            manifest.unlink()  # a pending batch's input is gone
        # the state is checked under the lock: while another command holds it, passes wait
        failure = watcher.said_line("unlearn run: failed:")
        assert watcher.wait(timeout=WAIT) == 1
    finally:
        watcher.stop()
    assert batch_id in failure, failure
    assert any(line.startswith("pass: pending batches found") for line in watcher.said)
    with Ledger(home.paths.ledger) as ledger:
        assert [b.batch_id for b in ledger.batches("pending")] == [batch_id]
    manifest.write_bytes(kept)
    rc, result = cli_json("run")
    assert rc == 0 and [(b["batch_id"], b["state"]) for b in result["batches"]] == \
        [(batch_id, "done")]


def test_a_one_shot_run_hands_its_batches_to_the_watcher(home, monkeypatch):
    """Beside a watcher that would look again only in an hour, ``unlearn run`` wakes it and
    answers with its pass: the batch is released once, by the watcher."""
    monkeypatch.setenv("UNLEARN_HOME", str(home.paths.home))
    watcher = Watcher(home, "--json", "--stop-after", "1", every=3600)
    try:
        watcher.said_line("watching for pending batches every 3600 s")
        batch_id = submit(home)
        run = one_shot_run(home, "--json")
        out, err = run.communicate(timeout=WAIT)
        passed = watcher.next_pass(timeout=60)
        assert watcher.wait() == 0  # --stop-after 1: the pass was the watcher's
    finally:
        watcher.stop()
    assert run.returncode == 0, err
    assert f"handing 1 pending batch(es) to the watcher of {home.paths.home}" in err
    result = json.loads(out)
    assert result["watcher"] is True
    assert [(b["batch_id"], b["state"]) for b in result["batches"]] == [(batch_id, "done")]
    assert result["batches"] == passed["batches"]
    assert result["champion"] == passed["champion"] == champion(home)


def test_a_pass_that_fails_fails_the_run_that_handed_it_over(home, monkeypatch):
    monkeypatch.setenv("UNLEARN_HOME", str(home.paths.home))
    watcher = Watcher(home, every=3600)
    try:
        watcher.said_line("watching for pending batches")
        batch_id = submit(home)
        manifest = home.paths.manifest(batch_id)
        kept = manifest.read_bytes()
        manifest.unlink()  # a pending batch's input is gone
        run = one_shot_run(home)
        out, err = run.communicate(timeout=WAIT)
        assert watcher.wait(timeout=WAIT) == 1
    finally:
        watcher.stop()
    assert run.returncode == 1 and out == ""
    failure = err.strip().splitlines()[-1]
    assert failure.startswith("unlearn run: failed: the watcher's pass failed: ") \
        and batch_id in failure, err
    with Ledger(home.paths.ledger) as ledger:
        assert [b.batch_id for b in ledger.batches("pending")] == [batch_id]
    manifest.write_bytes(kept)
    rc, result = cli_json("run")  # no watcher now: the command runs the flow itself
    assert rc == 0 and "watcher" not in result
    assert [(b["batch_id"], b["state"]) for b in result["batches"]] == [(batch_id, "done")]


def test_input_the_pass_refuses_is_bad_input_for_the_run_that_handed_it_over(
        tmp_path, write_params, monkeypatch):
    """A params.yaml the watcher's pass refuses fails the handed-over run as it would fail
    without a watcher: one line naming the file and key, exit 2; nothing is released. (Its
    own state: the module's state keeps its batches within the release gates.)"""
    home = pretrained_home(tmp_path, write_params, first_id=900)
    monkeypatch.setenv("UNLEARN_HOME", str(home.paths.home))
    params = home.paths.home / "params.yaml"
    kept = params.read_text()
    watcher = Watcher(home, every=3600)
    try:
        watcher.said_line("watching for pending batches")
        batch_id = submit(home)
        params.write_text(kept.replace("max_batch_size:", "max_batch_size: -3 #", 1))
        run = one_shot_run(home)
        out, err = run.communicate(timeout=WAIT)
        assert watcher.wait(timeout=WAIT) == 2
    finally:
        watcher.stop()
        params.write_text(kept)
    assert run.returncode == 2 and out == "", err
    refusal = err.strip().splitlines()[-1]
    assert refusal.startswith("unlearn run: error: the watcher's pass refused its input: ") \
        and "params.yaml" in refusal and "max_batch_size" in refusal, err
    with Ledger(home.paths.ledger) as ledger:
        assert [b.batch_id for b in ledger.batches("pending")] == [batch_id]
    rc, result = cli_json("run")  # the file mended: the batch goes through
    assert rc == 0 and [(b["batch_id"], b["state"]) for b in result["batches"]] == \
        [(batch_id, "done")]


def test_a_watcher_killed_mid_pass_leaves_the_batch_pending(home, monkeypatch, tmp_path):
    monkeypatch.setenv("UNLEARN_HOME", str(home.paths.home))
    gate = tmp_path / "gate"  # the watcher's flow run waits at the point while this exists
    gate.write_text("")
    watcher = Watcher(home, every=3600, UNLEARN_FAULT="after:lock=wait",
                      UNLEARN_FAULT_GATE=str(gate))
    try:
        watcher.said_line("watching for pending batches")
        batch_id = submit(home)
        run = one_shot_run(home)
        watcher.reaches(gate)  # woken: its pass holds the lock
        watcher.proc.kill()
        watcher.wait()
        _, err = run.communicate(timeout=60)
    finally:
        watcher.stop()
    assert run.returncode == 1
    assert err.strip().splitlines()[-1] == (
        f"unlearn run: failed: the watcher stopped before releasing {batch_id}: it stays "
        "pending; run `unlearn run` again")
    with Ledger(home.paths.ledger) as ledger:
        assert [b.batch_id for b in ledger.batches("pending")] == [batch_id]
    rc, result = cli_json("run")
    assert rc == 0 and [(b["batch_id"], b["state"]) for b in result["batches"]] == \
        [(batch_id, "done")]


def test_a_watcher_killed_after_its_release_leaves_the_ledgers_word(home, monkeypatch):
    """The watcher dies between a pass that released the batch and its line in the pass
    log: the command that handed the batch over reports the release as the ledger has it."""
    monkeypatch.setenv("UNLEARN_HOME", str(home.paths.home))
    watcher = Watcher(home, every=3600, UNLEARN_FAULT="after:watch_pass")
    try:
        watcher.said_line("watching for pending batches")
        batch_id = submit(home)
        run = one_shot_run(home)
        out, err = run.communicate(timeout=WAIT)
        assert watcher.wait() == -signal.SIGKILL
    finally:
        watcher.stop()
    with Ledger(home.paths.ledger) as ledger:
        version = ledger.batch(batch_id).version
        assert ledger.batch(batch_id).state == "done" and version is not None
    assert run.returncode == 0, err
    assert out.splitlines() == [(f"{batch_id}: done -> version {version} (as the ledger "
                                 "records it: no pass reported it)")]
    assert champion(home) == version


def test_the_pass_log_gives_whole_new_lines_and_is_read_again_after_a_cut(tmp_path,
                                                                         monkeypatch):
    """What a handing-over run reads: only the passes after it started, never half a line,
    and, after the log was cut to its newest lines, what is left of it."""
    paths = types.SimpleNamespace(artifacts=tmp_path)
    record_pass(paths, {"status": "ok", "n": 0})
    log = PassLog(paths)
    assert log.new_passes() == []
    record_pass(paths, {"status": "ok", "n": 1})
    with open(tmp_path / "watcher-passes.jsonl", "a") as f:
        f.write('{"status": "ok", "n": ')  # a line being written
    assert [p["n"] for p in log.new_passes()] == [1]
    with open(tmp_path / "watcher-passes.jsonl", "a") as f:
        f.write('2, "pid": 1}\n')
    assert [p["n"] for p in log.new_passes()] == [2]
    monkeypatch.setattr("tasks.watcher.PASSES_MAX_BYTES", 400)
    for n in range(3, 12):
        record_pass(paths, {"status": "ok", "n": n, "pad": "x" * 20})
    assert (tmp_path / "watcher-passes.jsonl").stat().st_size <= 400
    kept = [json.loads(line)["n"] for line in
            (tmp_path / "watcher-passes.jsonl").read_text().splitlines()]
    assert kept == list(range(12 - len(kept), 12)) and [p["n"] for p in log.new_passes()] == kept


@pytest.mark.parametrize("args, says", [
    (("--watch", "0"), "argument --watch: expected seconds from 1 to 86400, got '0'"),
    (("--watch", "nan"), "argument --watch: expected seconds from 1 to 86400, got 'nan'"),
    (("--watch", "1e9"), "argument --watch: expected seconds from 1 to 86400, got '1e9'"),
    (("--watch", "1", "--stop-after", "0"),
     "argument --stop-after: expected a whole number from 1, got '0'"),
    (("--stop-after", "2"), "--stop-after needs --watch"),
])
def test_bad_options_are_one_line(home, monkeypatch, args, says):
    monkeypatch.setenv("UNLEARN_HOME", str(home.paths.home))
    rc, out, err = cli("run", *args)
    assert rc == 2 and out == ""
    assert err.strip().splitlines() == [f"unlearn run: error: {says}"]
