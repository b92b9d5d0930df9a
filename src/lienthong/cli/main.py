"""The `lienthong` command line: serve a node, manage its database, load data.

Messages are Vietnamese first, then English. Errors print a message and exit
non-zero; they never show a traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console

from lienthong import __version__

app = typer.Typer(help="lienthong: kho FHIR R4 và liên thông dữ liệu y tế / FHIR R4 repository and health-data exchange",
                  no_args_is_help=True, pretty_exceptions_enable=False)
db_app = typer.Typer(help="Cơ sở dữ liệu / Database", no_args_is_help=True)
app.add_typer(db_app, name="db")
err = Console(stderr=True)

DB_OPTION = typer.Option(None, "--db", help="Database URL; default: SQLite file ./var/lienthong.db")


def fail(vi: str, en: str, code: int = 1) -> None:
    err.print(f"[bold red]Lỗi / Error:[/] {vi} / {en}")
    raise typer.Exit(code)


@app.command()
def version() -> None:
    """In phiên bản / Print the version."""
    typer.echo(__version__)


@app.command()
def serve(
    db: str = DB_OPTION,
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(8080, "--port"),
    max_body_mb: int = typer.Option(32, "--max-body-mb", help="Largest request body accepted, in MiB"),
    public_base_url: str = typer.Option(None, "--public-base-url", help="Absolute FHIR base seen by clients"),
) -> None:
    """Chạy nút FHIR / Run the FHIR node (base URL /fhir)."""
    import uvicorn

    from lienthong.api.app import ApiSettings
    from lienthong.node import create_app

    try:
        application = create_app(db, ApiSettings(max_body_bytes=max_body_mb * 1024 * 1024,
                                                 public_base_url=public_base_url))
    except Exception as exc:  # startup problems are the operator's to fix: say what, no traceback
        fail("không khởi động được", f"cannot start: {exc}")
    err.print(f"lienthong {__version__}: http://{host}:{port}/fhir")
    uvicorn.run(application, host=host, port=port, log_level="warning")


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
) -> None:
    """Nạp Bundle/NDJSON vào kho / Load transaction, batch, collection Bundles or NDJSON files."""
    from lienthong.cli.loader import load_files

    code = load_files(paths, db)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    app()
