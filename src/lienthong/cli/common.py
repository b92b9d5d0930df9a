"""Shared CLI pieces: the --db option and failing with a bilingual message and a non-zero exit."""

from __future__ import annotations

from typing import NoReturn

import typer
from rich.console import Console

err = Console(stderr=True)
DB_OPTION = typer.Option(None, "--db", help="Database URL; default: SQLite file ./var/lienthong.db")


def fail(vi: str, en: str, code: int = 1) -> NoReturn:
    err.print(f"[bold red]Lỗi / Error:[/] {vi} / {en}")
    raise typer.Exit(code)
