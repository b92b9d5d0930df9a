"""Shared plumbing for the FHIR benchmark: paths, logging, databases, server subprocesses.

Everything started here is registered with a `Cleanup` stack so that servers,
PostgreSQL clusters and temp dirs go away even when a phase fails or the run is
interrupted (SIGINT/SIGTERM are turned into exceptions).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).resolve().parent
REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO.parent / "shared" / "samples" / "synthea-r4"
RESULTS = REPO / "bench" / "results"
FHIR_JSON = "application/fhir+json"

_T0 = time.monotonic()


def log(msg: str) -> None:
    """Progress goes to stderr so stdout stays a clean markdown report."""
    print(f"[{time.monotonic() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100); NaN for an empty list."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = max(0, min(len(s) - 1, round(p / 100.0 * len(s) + 0.5) - 1))
    return s[k]


class Cleanup:
    """A LIFO stack of cleanup callbacks, run once, each guarded."""

    def __init__(self) -> None:
        self._stack: list[tuple[str, Callable[[], None]]] = []

    def push(self, name: str, fn: Callable[[], None]) -> None:
        self._stack.append((name, fn))

    def remove(self, fn: Callable[[], None]) -> None:
        self._stack = [(n, f) for n, f in self._stack if f is not fn]

    def run(self) -> None:
        while self._stack:
            name, fn = self._stack.pop()
            try:
                fn()
            except Exception as exc:  # keep cleaning up
                log(f"cleanup of {name} failed: {exc!r}")


def install_signal_handlers() -> None:
    def handler(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGHUP, handler)


# ---- databases -------------------------------------------------------------------


class Backend(ABC):
    """A place to make fresh, empty databases: a private PG cluster or a temp dir of SQLite files."""

    name: str

    @abstractmethod
    def new_url(self, dbname: str) -> str: ...

    @abstractmethod
    def stop(self) -> None: ...


class PgBackend(Backend):
    name = "postgresql"

    def __init__(self, cleanup: Cleanup) -> None:
        from lienthong.devtools.pgserver import PostgresServer

        self.server = PostgresServer()
        # PostgresServer.__init__ already made its temp dir: remove it whatever happens next.
        cleanup.push("postgresql", self.stop)
        self.server.start()
        self.settings = "fsync=off, synchronous_commit=off, full_page_writes=off (lienthong.devtools.pgserver fast mode)"
        self.log_file = self.server.root / "log"

    def enable_slow_log(self, min_ms: int) -> None:
        """Log statements slower than min_ms with their parameters, and their plans (auto_explain, no
        ANALYZE, so no per-query instrumentation cost). Applies to sessions opened afterwards."""
        import psycopg

        with psycopg.connect(self.conninfo("postgres"), autocommit=True) as conn:
            conn.execute("LOAD 'auto_explain'")  # so that its settings are known to ALTER SYSTEM
            conn.execute("ALTER SYSTEM SET session_preload_libraries = 'auto_explain'")
            conn.execute(f"ALTER SYSTEM SET auto_explain.log_min_duration = '{int(min_ms)}ms'")
            conn.execute(f"ALTER SYSTEM SET log_min_duration_statement = '{int(min_ms)}ms'")
            conn.execute("SELECT pg_reload_conf()")
        self.settings += f"; slow-statement log + auto_explain plans at ≥ {int(min_ms)} ms"

    def log_offset(self) -> int:
        try:
            return self.log_file.stat().st_size
        except OSError:
            return 0

    def log_since(self, offset: int) -> str:
        try:
            with open(self.log_file, "rb") as f:
                f.seek(offset)
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def new_url(self, dbname: str) -> str:
        return self.server.create_database(dbname)

    def drop(self, dbname: str) -> None:
        import psycopg

        with psycopg.connect(f"host=127.0.0.1 port={self.server.port} user=lienthong dbname=postgres",
                             autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')

    def conninfo(self, dbname: str) -> str:
        return f"host=127.0.0.1 port={self.server.port} user=lienthong dbname={dbname}"

    def stop(self) -> None:
        self.server.stop()


class SqliteBackend(Backend):
    name = "sqlite"

    def __init__(self, cleanup: Cleanup) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="lienthong-bench-sqlite-"))
        cleanup.push("sqlite temp dir", self.stop)
        self.settings = "WAL, synchronous=NORMAL (lienthong.storage.engine pragmas)"

    def path(self, dbname: str) -> Path:
        return self.root / f"{dbname}.db"

    def new_url(self, dbname: str) -> str:
        return f"sqlite:///{self.path(dbname)}"

    def drop(self, dbname: str) -> None:
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(str(self.path(dbname)) + suffix)

    def stop(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


# ---- server subprocesses ------------------------------------------------------------


def venv_bin(name: str) -> str:
    cand = Path(sys.executable).parent / name
    return str(cand) if cand.exists() else name


class ServerProcess:
    """A uvicorn-served ASGI app in its own process group, logs to a file, stopped by pid."""

    def __init__(self, name: str, argv: list[str], port: int, log_dir: Path, ready_path: str,
                 cleanup: Cleanup, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.port = port
        self.base = f"http://127.0.0.1:{port}"
        self.log_path = log_dir / f"{name}-{port}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     cwd=str(REPO), env={**os.environ, **(env or {})}, start_new_session=True)
        self._cleanup = cleanup
        self.headers: dict[str, str] = {}
        self.auth = ""
        self.src_hash = ""
        cleanup.push(f"server {name}", self.stop)
        self._wait_ready(ready_path)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _wait_ready(self, path: str, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=5.0) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited with {self.proc.returncode} on start: {self.tail()}")
                try:
                    if client.get(self.base + path).status_code < 500:
                        return
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)
        raise RuntimeError(f"{self.name} not ready after {timeout}s: {self.tail()}")

    def tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_bytes()[-n:].decode("utf-8", "replace")
        except OSError:
            return ""

    def log_text(self) -> str:
        try:
            return self.log_path.read_text("utf-8", "replace")
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            # Only this process group, which this harness created (start_new_session=True).
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self._log.close()
        self._cleanup.remove(self.stop)


def src_hash() -> str:
    """Short hash of the server's source tree: the server code may change while a long run goes on."""
    import hashlib

    h = hashlib.sha256()
    for f in sorted((REPO / "src" / "lienthong").rglob("*.py")):
        h.update(str(f.relative_to(REPO)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


def serve_supports(flag: str) -> bool:
    out = subprocess.run([venv_bin("lienthong"), "serve", "--help"], capture_output=True, text=True, timeout=60,
                         cwd=str(REPO), check=False, env={**os.environ, "COLUMNS": "200"})
    return flag in out.stdout


def start_lienthong(url: str, log_dir: Path, cleanup: Cleanup, name: str = "lienthong",
                    auth: str = "auto", workers: int = 1, read_cache_mb: int | None = None,
                    audit_journal: str | None = None) -> ServerProcess:
    """`lienthong serve` on a free port. auth: auto (get a token if the server asks for one), insecure
    (pass --insecure-dev), token (always provision a client and use a bearer token). read_cache_mb: the
    node's read cache (None: its default; 0 turns it off, so every read asks the database)."""
    port = free_port()
    argv = [venv_bin("lienthong"), "serve", "--db", url, "--host", "127.0.0.1", "--port", str(port)]
    if not Path(argv[0]).exists():
        argv = [sys.executable, "-m", "lienthong.cli.main", *argv[1:]]
    if auth == "insecure":
        argv.append("--insecure-dev")
    if workers > 1:
        argv += ["--workers", str(workers)]
    if read_cache_mb is not None:
        argv += ["--read-cache-mb", str(read_cache_mb)]
    if audit_journal is not None:
        argv += ["--audit-journal", audit_journal]
    code = src_hash()
    srv = ServerProcess(name, argv, port, log_dir, "/fhir/metadata", cleanup)
    srv.src_hash = code
    srv.auth = "open (no authentication)" if auth != "insecure" else "open (--insecure-dev)"
    probe = httpx.get(srv.base + "/fhir/Patient?_count=1", timeout=30)
    if auth == "token" or (auth == "auto" and probe.status_code == 401):
        token = provision_token(url, srv.base)
        srv.headers = {"Authorization": f"Bearer {token}"}
        srv.auth = ("bearer token from /auth/token (client_credentials, system/*.cruds, no facility): "
                    "every request verifies the token and passes the access guard/audit")
        check = httpx.get(srv.base + "/fhir/Patient?_count=1", headers=srv.headers, timeout=30)
        if check.status_code >= 300:
            raise RuntimeError(f"token does not work: {check.status_code} {check.text[:300]}")
    elif probe.status_code >= 300:
        raise RuntimeError(f"server answers {probe.status_code} to a plain search: {probe.text[:300]}")
    return srv


def provision_token(url: str, base: str) -> str:
    """Register a system client straight in the node's database, then ask the server for a token."""
    from lienthong.security.accounts import Accounts
    from lienthong.storage.engine import make_engine

    engine = make_engine(url)
    try:
        client_id, secret = Accounts(engine).add_client("lienthong-bench", None, "system/*.cruds")
    finally:
        engine.dispose()
    r = httpx.post(base + "/auth/token", data={"grant_type": "client_credentials", "client_id": client_id,
                                               "client_secret": secret}, timeout=30)
    if r.status_code != 200:
        raise RuntimeError(f"/auth/token refused the bench client: {r.status_code} {r.text[:300]}")
    return str(r.json()["access_token"])


def start_memapp(data_file: Path, log_dir: Path, cleanup: Cleanup, workers: int = 1) -> ServerProcess:
    port = free_port()
    argv = [sys.executable, str(HERE / "memapp.py"), "--data", str(data_file), "--host", "127.0.0.1",
            "--port", str(port), "--workers", str(workers)]
    return ServerProcess("memapp", argv, port, log_dir, "/health", cleanup)


def cpu_times(pid: int) -> float:
    """User+system CPU seconds of a server: every process of its process group (the harness starts each
    server in its own session, so uvicorn's worker processes count too; Linux /proc)."""
    total, found = 0, False
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # a process that exited meanwhile
        if int(fields[2]) == pid:  # field 5 of stat: the process group
            total += int(fields[11]) + int(fields[12])
            found = True
    return total / os.sysconf("SC_CLK_TCK") if found else float("nan")


def git_commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src"], cwd=REPO, capture_output=True,
                               text=True, timeout=10).stdout.strip()
        return head + (" (+ uncommitted changes in src/)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def system_cpu() -> tuple[float, float]:
    """(busy, total) jiffies over all cores from /proc/stat; diff two readings for utilisation."""
    try:
        vals = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
        return float(sum(vals) - idle), float(sum(vals))
    except (OSError, ValueError, IndexError):
        return float("nan"), float("nan")


def cpu_util(a: tuple[float, float], b: tuple[float, float]) -> float:
    """Machine-wide busy fraction (0..1 of all cores) between two system_cpu() readings."""
    dt = b[1] - a[1]
    return (b[0] - a[0]) / dt if dt > 0 else float("nan")


def background_busy(seconds: float = 1.0) -> float:
    """Machine-wide busy fraction while this harness is idle: other users of the shared box."""
    a = system_cpu()
    time.sleep(seconds)
    return cpu_util(a, system_cpu())
