"""Start a throw-away PostgreSQL server in a temporary directory (tests, benchmarks, demo).

Why: the suite must run against a real PostgreSQL, not a mock, on a clean
machine. Debian's postgresql package puts initdb/pg_ctl under
/usr/lib/postgresql/<v>/bin; as root, the server runs as the `postgres` user
because PostgreSQL refuses to run as root.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path


class PostgresUnavailable(RuntimeError):
    pass


def _bindir() -> Path:
    env = os.environ.get("LIENTHONG_PG_BINDIR")
    candidates = [env] if env else []
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    which = shutil.which("pg_ctl")
    if which:
        candidates.append(str(Path(which).parent))
    for c in candidates:
        if c and (Path(c) / "initdb").exists() and (Path(c) / "pg_ctl").exists():
            return Path(c)
    raise PostgresUnavailable("PostgreSQL server binaries not found (apt-get install -y postgresql)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostgresServer:
    """A private cluster listening on 127.0.0.1; `url(dbname)` gives SQLAlchemy URLs."""

    def __init__(self, fast: bool = True, settings: dict[str, str] | None = None) -> None:
        self.bindir = _bindir()
        self.root = Path(tempfile.mkdtemp(prefix="lienthong-pg-"))
        self.data = self.root / "data"
        self.port = _free_port()
        self.fast = fast
        self.settings = dict(settings or {})  # extra `-c name=value` server settings, e.g. shared_buffers
        self._demote: Callable[[], None] | None = None
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            os.chown(self.root, user.pw_uid, user.pw_gid)

            def demote() -> None:
                os.setgid(user.pw_gid)
                os.setuid(user.pw_uid)

            self._demote = demote

    def _run(self, *args: str) -> None:
        result = subprocess.run(  # noqa: S603 - fixed argv of Debian's own binaries
            [str(self.bindir / args[0]), *args[1:]], preexec_fn=self._demote, capture_output=True, text=True,
            cwd=self.root, timeout=120, check=False,
        )
        if result.returncode != 0:
            raise PostgresUnavailable(f"{args[0]} failed: {result.stderr.strip() or result.stdout.strip()}")

    def start(self) -> PostgresServer:
        self._run("initdb", "-D", str(self.data), "-U", "lienthong", "--auth=trust", "-E", "UTF8",
                  "--locale=C.UTF-8", "--no-sync")
        opts = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c max_connections=200"
        if self.fast:
            opts += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        for name, value in self.settings.items():
            opts += f" -c {name}={value}"
        self._run("pg_ctl", "-D", str(self.data), "-o", opts, "-l", str(self.root / "log"), "-w", "start")
        return self

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql+psycopg://lienthong@127.0.0.1:{self.port}/{dbname}"

    def create_database(self, name: str, template: str | None = None) -> str:
        import psycopg

        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=lienthong dbname=postgres",
                             autocommit=True) as conn:
            tmpl = f" TEMPLATE {template}" if template else ""
            conn.execute(f'CREATE DATABASE "{name}"{tmpl}')
        return self.url(name)

    def drop_database(self, name: str) -> None:
        """Drop a test database, disconnecting whoever still holds it."""
        import psycopg

        with contextlib.suppress(psycopg.Error), psycopg.connect(
                f"host=127.0.0.1 port={self.port} user=lienthong dbname=postgres", autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def stop(self) -> None:
        with contextlib.suppress(PostgresUnavailable):
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)
        from sqlalchemy.engine import make_url

        from lienthong.storage.read_cache import counters_path

        changes = counters_path(make_url(self.url()))
        if changes is not None:  # the read caches' counters of this server's databases (shared memory)
            changes.unlink(missing_ok=True)
