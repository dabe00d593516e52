"""The service stack on loopback: PostgreSQL, an S3 endpoint (moto), `mlflow server`,
`prefect server start`. For development and the services test tier (tests/services).

    python stack/stack.py up     [--dir .stack] [--env-file .stack.env]
    python stack/stack.py status [--dir .stack]
    python stack/stack.py down   [--dir .stack]
    python stack/stack.py restart|kill SERVICE [--dir .stack]   # postgres | s3 | mlflow | prefect
    python stack/stack.py env    [--dir .stack]   # the export lines again

``up`` starts every server on 127.0.0.1 on a free port, waits until each answers, and writes
the env file: shell ``export`` lines (``MLFLOW_TRACKING_URI``, ``PREFECT_API_URL``,
``UNLEARN_LEDGER_URL``, the S3 endpoint and credentials) that point every ``unlearn``
command at the stack (``. .stack.env``). ``down`` stops every process it started (by the pids
recorded in ``DIR/pids.json``, then their process groups) and checks that none is left.

- PostgreSQL (the distribution's binaries: /usr/lib/postgresql/*/bin, else PATH) runs as an
  unprivileged user (as root: ``unlearn-stack``, created if missing), its data under
  ``DIR/postgres``; databases ``mlflow`` (tracking and registry) and ``ledger``.
- moto in server mode is the S3 endpoint (in memory: its objects are gone after ``down``,
  so ``up`` always starts every service empty);
  buckets ``unlearn-mlflow`` (the tracking server's ``--artifacts-destination``) and
  ``unlearn-dvc`` (a DVC remote).
- ``mlflow server`` serves the artifacts itself (clients need only HTTP, no S3 credentials).
- ``prefect server start``, its database under ``DIR/prefect``; its scheduler looks for due
  runs every ``UNLEARN_STACK_SCHEDULER_SECONDS`` (default 5; Prefect's own default is 60).

``UNLEARN_STACK_TIMEOUT`` (default 240 s) bounds the wait for each server. ``kill`` (SIGKILL
to a service's process group) and ``restart`` (on the same port) are for fault tests.

Standard library only (plus psycopg and boto3 from the ``services`` extra, imported late), so
it runs under the project's venv: ``.venv/bin/python stack/stack.py up``.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import pwd
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PG_USER = "unlearn-stack"       # the system user PostgreSQL runs as when we are root
DB_USER = "unlearn"             # the database role every client uses
BUCKETS = {"mlflow": "unlearn-mlflow", "dvc": "unlearn-dvc"}
S3_KEY, S3_SECRET, REGION = "unlearn-stack", "unlearn-stack-secret", "us-east-1"
SERVICES = ("postgres", "s3", "mlflow", "prefect")
START_TIMEOUT = float(os.environ.get("UNLEARN_STACK_TIMEOUT", "240"))


class StackError(RuntimeError):
    """One line: what failed and where to look."""


# -- small helpers ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not reaped yet) is not running
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def group_members(pgid: int) -> list[int]:
    """Live processes in process group ``pgid`` (from /proc)."""
    out = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            out.append(int(stat.split("/")[2]))
    return out


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=3) as r:
            return 200 <= r.status < 300
    except OSError:
        return False


def tail(path: Path, n: int = 400) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(text[-3:])[-n:]


class Stack:
    def __init__(self, folder: Path, env_file: Path | None = None):
        self.dir = folder.resolve()
        self.env_file = (env_file or self.dir / "stack.env").resolve()
        self.state_file = self.dir / "pids.json"
        self.logs = self.dir / "logs"

    # -- recorded state ---------------------------------------------------------------------

    def state(self) -> dict:
        try:
            return json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return {}

    def save(self, state: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        tmp.replace(self.state_file)

    def running(self) -> dict[str, int]:
        return {name: info["pid"] for name, info in self.state().get("services", {}).items()
                if alive(info["pid"])}

    # -- processes --------------------------------------------------------------------------

    def spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None,
              user: str | None = None) -> subprocess.Popen:
        self.logs.mkdir(parents=True, exist_ok=True)
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115  (the child keeps it)
        kwargs: dict = {}
        if user is not None:
            pw = pwd.getpwnam(user)
            kwargs.update(user=pw.pw_uid, group=pw.pw_gid, extra_groups=[])
        proc = subprocess.Popen(argv, env={**os.environ, **(env or {})}, stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=self.dir, **kwargs)
        log.close()
        return proc

    def wait_ready(self, name: str, proc: subprocess.Popen, ready, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise StackError(f"{name} exited with {proc.returncode} while starting: "
                                 f"{tail(self.logs / f'{name}.log')} "
                                 f"(log: {self.logs / f'{name}.log'})")
            if ready():
                return
            time.sleep(0.5)
        raise StackError(f"{name} did not answer within {timeout:.0f} s "
                         f"(log: {self.logs / f'{name}.log'})")

    # -- PostgreSQL -------------------------------------------------------------------------

    @staticmethod
    def pg_bindir() -> Path:
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                       key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
        if found:
            return Path(found[-1]).parent
        initdb = shutil.which("initdb")
        if initdb:
            return Path(initdb).resolve().parent
        raise StackError("PostgreSQL is not installed (no initdb in /usr/lib/postgresql/*/bin "
                         "or on PATH): `apt-get install -y postgresql` (Debian) and retry")

    def pg_user(self) -> str | None:
        """The user PostgreSQL runs as: ourselves, or (as root, which it refuses) PG_USER."""
        if os.geteuid() != 0:
            return None
        try:
            pwd.getpwnam(PG_USER)
        except KeyError:
            subprocess.run(["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent",
                            "--shell", "/usr/sbin/nologin", PG_USER], check=True,
                           capture_output=True)
        return PG_USER

    def pg_start(self, state: dict) -> subprocess.Popen:
        bindir = self.pg_bindir()
        data = self.dir / "postgres"
        user = self.pg_user()
        cfg = state["postgres"]
        if not (data / "PG_VERSION").exists():
            shutil.rmtree(data, ignore_errors=True)
            data.mkdir(parents=True, mode=0o700)
            pwfile = self.dir / "pgpass.tmp"
            pwfile.write_text(cfg["password"] + "\n")
            if user is not None:
                pw = pwd.getpwnam(user)
                for p in (data, pwfile):
                    os.chown(p, pw.pw_uid, pw.pw_gid)
                self._reachable(user)
            try:
                res = subprocess.run(
                    [str(bindir / "initdb"), "-D", str(data), "-U", DB_USER, "--pwfile",
                     str(pwfile), "--auth-local=trust", "--auth-host=scram-sha-256",
                     "-E", "UTF8", "--no-instructions"],
                    capture_output=True, text=True, cwd=self.dir, check=False,
                    **(self._as(user) if user else {}))
            finally:
                pwfile.unlink(missing_ok=True)
            if res.returncode != 0:
                raise StackError(f"initdb failed: {(res.stderr or res.stdout).strip()[-300:]}")
        return self.spawn("postgres", [
            str(bindir / "postgres"), "-D", str(data), "-p", str(cfg["port"]),
            "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={data}",
            "-c", "max_connections=200", "-c", "fsync=on"], user=user)

    def _reachable(self, user: str) -> None:
        """PostgreSQL's user must reach its data folder: every folder above it traversable."""
        for folder in self.dir.parents:
            if folder == Path("/"):
                break
            if not os.stat(folder).st_mode & 0o001:
                raise StackError(f"{folder} is not traversable by other users, so PostgreSQL "
                                 f"(running as {user}) cannot reach {self.dir}: choose a stack "
                                 "folder under a world-traversable path (--dir)")
        self.dir.chmod(0o755)

    @staticmethod
    def _as(user: str) -> dict:
        pw = pwd.getpwnam(user)
        return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}

    def pg_ready(self, cfg: dict) -> bool:
        import psycopg

        try:
            psycopg.connect(self.pg_url(cfg, "postgres"), connect_timeout=2).close()
            return True
        except psycopg.Error:
            return False

    @staticmethod
    def pg_url(cfg: dict, db: str, driver: str = "postgresql") -> str:
        return f"{driver}://{DB_USER}:{cfg['password']}@127.0.0.1:{cfg['port']}/{db}"

    def pg_databases(self, cfg: dict) -> None:
        import psycopg

        with psycopg.connect(self.pg_url(cfg, "postgres"), autocommit=True) as conn:
            for db in ("mlflow", "ledger"):
                if conn.execute("SELECT 1 FROM pg_database WHERE datname=%s",
                                (db,)).fetchone() is None:
                    conn.execute(f'CREATE DATABASE "{db}"')

    # -- S3 (moto) --------------------------------------------------------------------------

    def s3_env(self, port: int) -> dict[str, str]:
        endpoint = f"http://127.0.0.1:{port}"
        return {"AWS_ACCESS_KEY_ID": S3_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET,
                "AWS_DEFAULT_REGION": REGION, "AWS_ENDPOINT_URL": endpoint,
                "AWS_ENDPOINT_URL_S3": endpoint, "MLFLOW_S3_ENDPOINT_URL": endpoint}

    def s3_buckets(self, port: int) -> None:
        import boto3

        env = self.s3_env(port)
        s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name=REGION,
                          aws_access_key_id=S3_KEY, aws_secret_access_key=S3_SECRET)
        have = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
        for bucket in BUCKETS.values():
            if bucket not in have:
                s3.create_bucket(Bucket=bucket)

    # -- the services -----------------------------------------------------------------------

    def launch(self, name: str, state: dict) -> subprocess.Popen:
        """Start ``name`` without waiting for it (``wait_service`` waits)."""
        ports = state["ports"]
        quiet = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true",
                 "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
        if name == "postgres":
            proc = self.pg_start(state)
        elif name == "s3":
            proc = self.spawn(name, [str(BIN / "moto_server"), "-H", "127.0.0.1",
                                     "-p", str(ports["s3"])], env=quiet)
        elif name == "mlflow":
            proc = self.spawn(name, [
                str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port",
                str(ports["mlflow"]), "--workers", "1",
                "--backend-store-uri", self.pg_url(state["postgres"], "mlflow"),
                "--artifacts-destination", f"s3://{BUCKETS['mlflow']}/artifacts",
                "--serve-artifacts"],
                env={**quiet, **self.s3_env(ports["s3"]),
                     "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
        elif name == "prefect":
            home = self.dir / "prefect"
            home.mkdir(parents=True, exist_ok=True)
            proc = self.spawn(name, [str(BIN / "prefect"), "server", "start", "--host",
                                     "127.0.0.1", "--port", str(ports["prefect"])],
                              env={**quiet, "PREFECT_HOME": str(home),
                                   "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS":
                                       os.environ.get("UNLEARN_STACK_SCHEDULER_SECONDS", "5")})
        else:
            raise StackError(f"unknown service {name!r} (one of {', '.join(SERVICES)})")
        state.setdefault("services", {})[name] = {"pid": proc.pid, "pgid": proc.pid}
        self.save(state)
        return proc

    def wait_service(self, name: str, proc: subprocess.Popen, state: dict) -> None:
        """Wait until ``name`` answers, then create what it must hold (databases, buckets)."""
        ports = state["ports"]
        checks = {
            "postgres": lambda: self.pg_ready(state["postgres"]),
            "s3": lambda: http_ok(f"http://127.0.0.1:{ports['s3']}/moto-api/data.json"),
            "mlflow": lambda: http_ok(f"http://127.0.0.1:{ports['mlflow']}/health"),
            "prefect": lambda: http_ok(f"http://127.0.0.1:{ports['prefect']}/api/health"),
        }
        self.wait_ready(name, proc, checks[name], START_TIMEOUT)
        if name == "postgres":
            self.pg_databases(state["postgres"])
        elif name == "s3":
            self.s3_buckets(ports["s3"])

    def start(self, name: str, state: dict) -> None:
        self.wait_service(name, self.launch(name, state), state)

    def up(self) -> dict:
        if self.running():
            raise StackError(f"the stack in {self.dir} is already running "
                             f"({', '.join(self.running())}); `stack.py down` first")
        t0 = time.monotonic()
        self.dir.mkdir(parents=True, exist_ok=True)
        # a fresh stack each time: moto's S3 objects live in memory only, so a registry or
        # ledger kept from an earlier stack would name artifacts that are gone
        for old in ("postgres", "prefect"):
            shutil.rmtree(self.dir / old, ignore_errors=True)
        state = {"postgres": {"password": secrets.token_hex(12), "port": free_port()}}
        state["ports"] = {"s3": free_port(), "mlflow": free_port(), "prefect": free_port()}
        state["services"] = {}
        self.save(state)
        try:
            # prefect, moto and PostgreSQL start together; mlflow needs the last two
            procs = {n: self.launch(n, state) for n in ("prefect", "s3", "postgres")}
            for name in ("postgres", "s3"):
                self.wait_service(name, procs[name], state)
            self.start("mlflow", state)
            self.wait_service("prefect", procs["prefect"], state)
        except BaseException:
            self.down()
            raise
        state["startup_s"] = round(time.monotonic() - t0, 1)
        self.save(state)
        self.write_env(state)
        return state

    def env(self, state: dict) -> dict[str, str]:
        ports = state["ports"]
        return {
            "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{ports['mlflow']}",
            "PREFECT_API_URL": f"http://127.0.0.1:{ports['prefect']}/api",
            "UNLEARN_LEDGER_URL": self.pg_url(state["postgres"], "ledger"),
            "UNLEARN_DVC_REMOTE_URL": f"s3://{BUCKETS['dvc']}/dvc",
            **self.s3_env(ports["s3"]),
            "UNLEARN_STACK_DIR": str(self.dir),
        }

    def write_env(self, state: dict) -> None:
        lines = ["# written by stack/stack.py up: `. .stack.env` points unlearn at the stack"]
        lines += [f"export {k}={shlex.quote(v)}" for k, v in self.env(state).items()]
        tmp = self.env_file.with_suffix(".tmp")
        tmp.write_text("\n".join(lines) + "\n")
        tmp.chmod(0o600)  # it holds the database password
        tmp.replace(self.env_file)
        state["env_file"] = str(self.env_file)
        self.save(state)

    def stop(self, name: str, state: dict, timeout: float = 30) -> None:
        info = state.get("services", {}).get(name)
        if not info:
            return
        pid, pgid = info["pid"], info["pgid"]
        first = signal.SIGINT if name == "postgres" else signal.SIGTERM  # postgres: fast stop
        try:
            os.kill(pid, first)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and (alive(pid) or group_members(pgid)):
            if not alive(pid):  # the leader is gone: its children get the same request
                for child in group_members(pgid):
                    try:
                        os.kill(child, signal.SIGTERM)
                    except ProcessLookupError:
                        pass
            time.sleep(0.2)
        for left in [pid, *group_members(pgid)]:
            try:
                os.kill(left, signal.SIGKILL)
            except ProcessLookupError:
                pass
        state["services"].pop(name, None)
        self.save(state)

    def kill(self, name: str) -> None:
        """SIGKILL a service and its process group (a crash, for fault tests)."""
        state = self.state()
        info = state.get("services", {}).get(name)
        if not info:
            raise StackError(f"{name} is not running")
        for pid in [info["pid"], *group_members(info["pgid"])]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (alive(info["pid"]) or
                                               group_members(info["pgid"])):
            time.sleep(0.1)
        state["services"].pop(name, None)
        self.save(state)

    def restart(self, name: str) -> None:
        state = self.state()
        if not state.get("ports"):
            raise StackError(f"no stack in {self.dir}: `stack.py up` first")
        self.stop(name, state)
        self.start(name, state)

    def down(self) -> list[str]:
        """Stop everything recorded; returns what is still alive (nothing, normally)."""
        state = self.state()
        for name in ("prefect", "mlflow", "s3", "postgres"):  # clients before PostgreSQL
            self.stop(name, state)
        self.env_file.unlink(missing_ok=True)
        left = [f"{n} (pid {i['pid']})" for n, i in state.get("services", {}).items()
                if alive(i["pid"]) or group_members(i["pgid"])]
        return left


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="stack.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=("up", "down", "status", "restart", "kill", "env"))
    ap.add_argument("service", nargs="?", help="restart/kill: postgres | s3 | mlflow | prefect")
    ap.add_argument("--dir", type=Path, default=Path(os.environ.get(
        "UNLEARN_STACK_DIR", ROOT / ".stack")), help="the stack's folder (default: .stack)")
    ap.add_argument("--env-file", type=Path, default=None,
                    help="where `up` writes the export lines (default: .stack.env next to "
                         "the default folder, else DIR/stack.env)")
    args = ap.parse_args(argv)
    env_file = args.env_file
    if env_file is None:
        default_dir = (ROOT / ".stack").resolve()
        env_file = ROOT / ".stack.env" if args.dir.resolve() == default_dir else None
    stack = Stack(args.dir, env_file)
    try:
        if args.command == "up":
            state = stack.up()
            print(f"stack up in {state['startup_s']} s: {stack.env_file} "
                  f"(`. {stack.env_file}`); mlflow {stack.env(state)['MLFLOW_TRACKING_URI']}, "
                  f"prefect {stack.env(state)['PREFECT_API_URL']}, postgres "
                  f"127.0.0.1:{state['postgres']['port']}, s3 "
                  f"{stack.env(state)['AWS_ENDPOINT_URL']}")
        elif args.command == "down":
            left = stack.down()
            if left:
                raise StackError(f"still running after down: {', '.join(left)}")
            print(f"stack down: nothing left running from {stack.dir}")
        elif args.command == "status":
            running = stack.running()
            state = stack.state()
            for name in SERVICES:
                pid = running.get(name)
                print(f"{name:9} {'running, pid ' + str(pid) if pid else 'stopped'}")
            if state.get("env_file") and running:
                print(f"env: {state['env_file']}")
            return 0 if len(running) == len(SERVICES) else 1
        elif args.command == "env":
            for k, v in stack.env(stack.state()).items():
                print(f"export {k}={shlex.quote(v)}")
        elif args.command in ("restart", "kill"):
            if args.service not in SERVICES:
                raise StackError(f"{args.command} needs a service: {', '.join(SERVICES)}")
            getattr(stack, args.command)(args.service)
            print(f"{args.service}: {args.command} done")
    except StackError as e:
        print(f"stack.py {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        stack.down()
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
