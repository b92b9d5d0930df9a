"""`lienthong load`: bulk-load Bundles and NDJSON with a progress bar and a summary.

Why through the bundle processor: loaded data gets exactly the validation,
reference rewriting and indexing that HTTP writes get; a file that fails is
rolled back whole and reported, the others still load.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from lienthong.fhir.outcome import FhirError
from lienthong.interactions.bundles import BundleProcessor

NDJSON_BATCH = 500


def _files(paths: list[Path]) -> list[Path]:
    out: list[Path] = []
    for path in paths:
        if path.is_dir():
            out.extend(sorted(p for p in path.rglob("*") if p.suffix in (".json", ".ndjson")))
        else:
            out.append(path)
    return out


def _as_entry(resource: dict[str, Any]) -> dict[str, Any]:
    rtype, rid = resource.get("resourceType"), resource.get("id")
    if rid:
        return {"resource": resource, "request": {"method": "PUT", "url": f"{rtype}/{rid}"}}
    return {"resource": resource, "request": {"method": "POST", "url": str(rtype)}}


def _bundles(path: Path) -> Iterator[dict[str, Any]]:
    """Yield transaction/batch Bundles for one file."""
    raw = path.read_bytes()
    if path.suffix == ".ndjson":
        lines = [line for line in raw.splitlines() if line.strip()]
        for start in range(0, len(lines), NDJSON_BATCH):
            entries = [_as_entry(orjson.loads(line)) for line in lines[start : start + NDJSON_BATCH]]
            yield {"resourceType": "Bundle", "type": "transaction", "entry": entries}
        return
    data = orjson.loads(raw)
    if data.get("resourceType") == "Bundle" and data.get("type") in ("transaction", "batch"):
        yield data
    elif data.get("resourceType") == "Bundle" and data.get("type") == "collection":
        yield {"resourceType": "Bundle", "type": "transaction",
               "entry": [_as_entry(e["resource"]) for e in data.get("entry", []) if "resource" in e]}
    else:
        yield {"resourceType": "Bundle", "type": "transaction", "entry": [_as_entry(data)]}


def load_files(paths: list[Path], db_url: str | None, facility: str | None = None) -> int:
    from lienthong.api.app import ApiSettings
    from lienthong.node import build_node, open_database

    console = Console(stderr=True)
    files = _files(paths)
    missing = [p for p in files if not p.is_file()]
    if missing:
        console.print(f"[red]Không thấy tệp / File not found:[/] {missing[0]}")
        return 2
    from lienthong.cli.operator import operator_context

    node = build_node(open_database(db_url), ApiSettings(node_name="load"), secure=True)
    processor = BundleProcessor(node.service)  # the same validation, patient index and audit as HTTP writes
    ctx = operator_context(node, facility)
    loaded, failed = 0, []
    started = time.perf_counter()
    try:
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      console=console) as progress:
            task = progress.add_task("Đang nạp / Loading", total=len(files))
            for path in files:
                try:
                    for bundle in _bundles(path):
                        result = processor.process(ctx, bundle)
                        assert result.resource is not None
                        loaded += len(result.resource.get("entry", []))
                except FhirError as exc:
                    failed.append((path, str(exc)))
                except (orjson.JSONDecodeError, OSError, AttributeError, KeyError, TypeError) as exc:
                    failed.append((path, f"không đọc được / unreadable: {exc}"))
                progress.advance(task)
    finally:
        node.close()  # the audit journal is drained before the command returns
    seconds = time.perf_counter() - started
    console.print(f"Đã nạp / Loaded {loaded} resources from {len(files) - len(failed)}/{len(files)} files "
                  f"in {seconds:.1f} s ({loaded / seconds if seconds else 0:.0f}/s)")
    for path, reason in failed:
        console.print(f"[red]Lỗi / Failed:[/] {path}: {reason[:500]}")
    return 1 if failed else 0
