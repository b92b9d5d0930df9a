"""`lienthong synth …`: synthetic test data with ground truth."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Annotated

import typer

from lienthong.identity.synth import generate, write_csv

synth_app = typer.Typer(
    help="Sinh dữ liệu thử nghiệm / generate synthetic test data.",
    no_args_is_help=True,
)


@synth_app.callback()
def _group() -> None:
    """Dữ liệu tổng hợp / synthetic data."""


@synth_app.command("patients")
def patients(
    n: Annotated[int, typer.Argument(min=1, help="Số hồ sơ / number of records")],
    seed: Annotated[int, typer.Option("--seed", help="Hạt ngẫu nhiên / random seed")] = 0,
    out: Annotated[Path | None, typer.Option("--out", help="Tệp CSV (mặc định stdout) / output CSV")] = None,
) -> None:
    """Dân số bệnh nhân Bắc Giang–Bắc Ninh có trùng lặp và cột true_person_id /
    Bắc Giang–Bắc Ninh patients with duplicates and a true_person_id column."""
    records = generate(n, seed)
    if out is None:
        write_csv(records, sys.stdout)
        return
    directory = out.parent if str(out.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            write_csv(records, fh)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    typer.echo(f"Đã ghi {len(records)} hồ sơ vào {out} / wrote {len(records)} records to {out}", err=True)
