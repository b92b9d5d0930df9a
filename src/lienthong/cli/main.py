"""The `lienthong` command line: serve a node, manage its database, users and data.

Messages are Vietnamese first, then English. Errors print a message and exit
non-zero; they never show a traceback.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from lienthong import __version__
from lienthong.cli.admin import audit_app, clients_app, keys_app, users_app
from lienthong.cli.common import DB_OPTION, err, fail
from lienthong.cli.demo import demo
from lienthong.cli.exchange_cli import hub_app
from lienthong.cli.mpi_admin import mpi_app
from lienthong.cli.synth import synth_app

if TYPE_CHECKING:
    from sqlalchemy.engine import URL

app = typer.Typer(help="lienthong: kho FHIR R4 và liên thông dữ liệu y tế / FHIR R4 repository and health-data exchange",
                  no_args_is_help=True, pretty_exceptions_enable=False)
db_app = typer.Typer(help="Cơ sở dữ liệu / Database", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(users_app, name="users")
app.add_typer(clients_app, name="clients")
app.add_typer(audit_app, name="audit")
app.add_typer(keys_app, name="keys")
app.add_typer(mpi_app, name="mpi")
app.add_typer(synth_app, name="synth")
app.command()(demo)
app.add_typer(hub_app, name="hub")

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


@app.command()
def version() -> None:
    """In phiên bản / Print the version."""
    typer.echo(__version__)


@app.command()
def serve(
    db: str = DB_OPTION,
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(8080, "--port"),
    insecure_dev: bool = typer.Option(False, "--insecure-dev",
                                      help="Turn authentication off (127.0.0.1 only, for local experiments)"),
    node_name: str = typer.Option("lienthong", "--node-name", help="This node's name in audit records and tokens"),
    max_body_mb: int = typer.Option(32, "--max-body-mb", help="Largest request body accepted, in MiB"),
    public_base_url: str = typer.Option(None, "--public-base-url", help="Absolute FHIR base seen by clients"),
    cors_origin: list[str] = typer.Option([], "--cors-origin", help="Browser origin allowed to call the API"),
    workers: int = typer.Option(1, "--workers", help="uvicorn worker processes"),
    read_cache_mb: int = typer.Option(64, "--read-cache-mb", min=0,
                                      help="Memory per worker for current versions served to reads by id; 0 turns "
                                           "it off (needed when nodes on other hosts write to the same database)"),
    audit_journal: str = typer.Option("auto", "--audit-journal",
                                      help="Local directory where read audits are made durable before the answer "
                                           "(auto: beside the SQLite file, or ./var/audit-journal/…), or off"),
    role: str = typer.Option(None, "--role", help="node | hub (checked against --config)"),
    config: Path = typer.Option(None, "--config", help="Exchange configuration (TOML): role, code, hub, keys"),
) -> None:
    """Chạy nút FHIR / Run the FHIR node (base URL /fhir)."""
    import os

    import uvicorn

    from lienthong.api.app import ApiSettings

    if insecure_dev:
        if host not in LOOPBACK:
            fail("--insecure-dev chỉ chạy trên 127.0.0.1", "--insecure-dev only runs on 127.0.0.1", 2)
        err.print("[bold yellow]CẢNH BÁO / WARNING:[/] xác thực đang TẮT; chỉ dùng để thử nghiệm cục bộ / "
                  "authentication is OFF; for local experiments only")
    if config is not None:
        from lienthong.exchange.service import load_config

        try:
            exchange_config, _, _ = load_config(config)
        except ValueError as exc:
            fail("cấu hình không hợp lệ", str(exc), 2)
        if role and role != exchange_config.role:
            fail("--role khác cấu hình", f"--role {role} but the configuration says {exchange_config.role}", 2)
        if workers != 1:
            fail("nút liên thông chạy 1 tiến trình", "an exchange node runs one worker (one dispatcher per database)", 2)
        os.environ["LIENTHONG_APP_CONFIG"] = str(config.resolve())
    elif role:
        fail("--role cần --config", "--role needs --config (keys, hub address)", 2)
    settings = ApiSettings(max_body_bytes=max_body_mb * 1024 * 1024, public_base_url=public_base_url,
                           node_name=node_name, cors_origins=tuple(cors_origin), audit_journal=audit_journal)
    try:
        from lienthong.node import open_database

        database = open_database(db, read_cache_mb=0)
        _require_journal_directory(database.engine.url, audit_journal)
        if not insecure_dev and host not in LOOPBACK:
            _require_configured(database.engine)
    except typer.Exit:
        raise
    except Exception as exc:  # startup problems are the operator's to fix: say what, no traceback
        fail("không khởi động được", f"cannot start: {exc}")
    err.print(f"lienthong {__version__}: http://{host}:{port}/fhir"
              + ("" if insecure_dev else "  (xác thực bật / authentication on)"))
    os.environ["LIENTHONG_APP_DB"] = db or ""
    os.environ["LIENTHONG_APP_SECURE"] = "0" if insecure_dev else "1"
    os.environ["LIENTHONG_APP_SETTINGS"] = settings.to_json()
    os.environ["LIENTHONG_APP_READ_CACHE_MB"] = str(read_cache_mb)
    # Access lines are INFO, never shown at this level; without access_log uvicorn also skips building them.
    if workers > 1:
        uvicorn.run("lienthong.node:app_from_env", factory=True, host=host, port=port, workers=workers,
                    log_level="warning", access_log=False)
    else:
        from lienthong.node import app_from_env

        uvicorn.run(app_from_env(), host=host, port=port, log_level="warning", access_log=False)


def _require_journal_directory(url: URL, setting: str) -> None:
    """Fail before serving when the audit journal's directory cannot be written (every read would fail): the
    node builds the journal in its worker, where a failure would be a traceback instead of this message."""
    from lienthong.security.audit_journal import journal_location

    location = journal_location(url, setting)
    if location is None:
        return
    location.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not os.access(location, os.W_OK | os.X_OK):
        fail("không ghi được nhật ký kiểm toán", f"cannot write the audit journal directory {location}", 2)


def _require_configured(engine: object) -> None:
    from sqlalchemy import select

    from lienthong.security.accounts import Accounts
    from lienthong.storage import schema

    with engine.connect() as conn:  # type: ignore[attr-defined]
        has_key = conn.execute(select(schema.signing_key.c.kid)).first() is not None
    if not has_key or not Accounts(engine).has_admin():  # type: ignore[arg-type]
        fail("chưa có quản trị viên và khoá ký; chạy `lienthong users bootstrap` trước khi mở ra mạng",
             "no administrator and signing key configured; run `lienthong users bootstrap` before serving "
             "on a network interface", 2)


@db_app.command("upgrade")
def db_upgrade(db: str = DB_OPTION) -> None:
    """Nâng cấp lược đồ CSDL / Apply schema migrations."""
    from lienthong.storage import migrate
    from lienthong.storage.engine import make_engine

    try:
        engine = make_engine(db)
        migrate.upgrade(engine)
        typer.echo(f"Lược đồ ở phiên bản / schema at revision: {migrate.current(engine)}")
    except Exception as exc:
        fail("không nâng cấp được", f"upgrade failed: {exc}")


@app.command()
def load(
    paths: list[Path] = typer.Argument(..., help="Bundle JSON files, NDJSON files or folders of them"),
    db: str = DB_OPTION,
    facility: str = typer.Option(None, "--facility", help="The facility the data belongs to (its access scope)"),
) -> None:
    """Nạp Bundle/NDJSON vào kho / Load transaction, batch, collection Bundles or NDJSON files."""
    from lienthong.cli.loader import load_files

    if facility is not None and not (len(facility) == 5 and facility.isdigit()):
        fail("mã cơ sở phải gồm 5 chữ số", "--facility must be a 5-digit code", 2)
    code = load_files(paths, db, facility)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    app()
