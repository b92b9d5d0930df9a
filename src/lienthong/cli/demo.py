"""`lienthong demo`: the pilot province on one machine (hub, four facilities), and the 304-patient transfer."""

from __future__ import annotations

import json
import signal
import sys
import threading
from pathlib import Path

import typer
from rich.console import Console

err = Console(stderr=True)


def demo(
    scenario: str = typer.Option("pilot-304", "--scenario", help="pilot-304: transfer patients to Bạch Mai"),
    as_json: bool = typer.Option(False, "--json", help="Run the scenario, print a JSON summary and exit"),
    patients: int = typer.Option(304, "--patients", help="How many patients the scenario transfers"),
    folder: Path = typer.Option(Path("var/demo"), "--dir", help="Where the demo databases and keys go"),
) -> None:
    """Chạy tỉnh mẫu: trạm + 4 cơ sở, chuyển 304 bệnh nhân tới Bạch Mai / Run the pilot province demo."""
    from lienthong.exchange.demo import pilot_304, start_province

    if scenario != "pilot-304":
        err.print(f"[red]Lỗi / Error:[/] kịch bản không biết / unknown scenario '{scenario}'")
        raise typer.Exit(2)
    if patients < 1 or patients > 5000:
        err.print("[red]Lỗi / Error:[/] --patients phải từ 1 đến 5000 / must be 1..5000")
        raise typer.Exit(2)
    err.print("Khởi động trạm và các cơ sở / starting the hub and the facilities…")
    province = start_province(folder)
    try:
        for unit in province.units.values():
            err.print(f"  {unit.code}  {unit.name}: {unit.base}/fhir")
        err.print(f"Chuyển {patients} bệnh nhân / transferring {patients} patients…")
        result = pilot_304(province, n=patients)
        summary = result.to_json()
        if as_json:
            sys.stdout.write(json.dumps(summary, ensure_ascii=False) + "\n")
            return
        err.print_json(json.dumps(summary, ensure_ascii=False))
        err.print("Đang phục vụ; Ctrl-C để dừng / serving; Ctrl-C to stop")
        stop = threading.Event()
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        stop.wait()
    finally:
        province.stop()
