"""Helpers of the services tier: the stack's handle and a state folder on the stack."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
STACK = [sys.executable, str(ROOT / "stack" / "stack.py")]


def read_env_file(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        if line.startswith("export "):
            key, _, value = line[len("export "):].partition("=")
            env[key] = shlex.split(value)[0] if value else ""
    return env


@dataclass
class StackHandle:
    dir: Path
    env: dict[str, str]
    startup_s: float

    def command(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        res = subprocess.run([*STACK, *args, "--dir", str(self.dir)],
                             capture_output=True, check=False,
                             text=True, timeout=timeout)
        assert res.returncode == 0, f"stack.py {' '.join(args)}: {res.stderr or res.stdout}"
        return res

    def state(self) -> dict:
        return json.loads((self.dir / "pids.json").read_text())

    def database(self, name: str) -> str:
        """A fresh PostgreSQL database ``name`` on the stack's server; its URL."""
        import psycopg

        url = self.env["UNLEARN_LEDGER_URL"]
        base = url.rsplit("/", 1)[0]
        with psycopg.connect(f"{base}/postgres", autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
            conn.execute(f'CREATE DATABASE "{name}"')
        return f"{base}/{name}"


def running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@dataclass
class ServiceHome:
    """A state folder whose commands run against the stack: its own ledger database and
    model name, so tests sharing the stack do not see each other."""

    home: Path
    env: dict[str, str]
    model: str

    def unlearn(self, *args: str, timeout: float = 600, **extra: str
                ) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "unlearn"), *args],
                              capture_output=True, check=False, text=True,
                              env={**self.env, **extra}, cwd=self.home, timeout=timeout)

    def ok(self, *args: str, **extra: str) -> str:
        res = self.unlearn(*args, **extra)
        assert res.returncode == 0, (f"unlearn {' '.join(args)} exited {res.returncode}: "
                                     f"{res.stderr.strip()[-2000:]}")
        return res.stdout

    def json(self, *args: str) -> dict:
        res = self.unlearn(*args, "--json")
        assert res.stdout.strip(), res.stderr
        return json.loads(res.stdout)

    def manifest(self, name: str, rows: list[tuple[str, int]]) -> Path:
        path = self.home / f"{name}.csv"
        path.write_text("request_id,instance_id,objective,new_label\n"
                        + "".join(f"{rid},{iid},misclassify,\n" for rid, iid in rows))
        return path

    def ledger_rows(self, sql: str) -> list[tuple]:
        import psycopg

        with psycopg.connect(self.env["UNLEARN_LEDGER_URL"]) as conn:
            return conn.execute(sql).fetchall()


