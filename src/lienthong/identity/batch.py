"""Batch deduplication and linkage of CSV files, as used by `lienthong mpi`.

Why a separate module: the CLI stays a thin shell, and the same functions serve scripts
and the benchmark. Input problems (missing or unknown columns, unknown field names) are
reported as `MappingError` before any work starts, and output is written atomically so
a failed run never leaves a half-written pair file.
"""

from __future__ import annotations

import csv
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lienthong.identity.identifiers import IdentifierError, parse_cccd
from lienthong.identity.matching import FitSettings, MatchModel, ScoredPairs, Thresholds, fit
from lienthong.identity.records import MATCH_FIELDS, PersonRecord, PreparedTable, prepare

Progress = Callable[[str, int, int], None]
"""Callback (stage, done, total) for progress display."""


class MappingError(ValueError):
    """The CSV and the column mapping do not fit; bilingual message."""

    def __init__(self, message_vi: str, message_en: str) -> None:
        self.message_vi = message_vi
        self.message_en = message_en
        super().__init__(f"{message_vi} / {message_en}")


def parse_columns(option: str | None) -> dict[str, str]:
    """Parse `field=csvcol,field=csvcol` into {field: csv column}; unknown fields raise."""
    mapping: dict[str, str] = {}
    if not option:
        return mapping
    for item in option.split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, column = item.partition("=")
        name, column = name.strip(), column.strip()
        if not sep or not name or not column:
            raise MappingError(
                f"Ánh xạ cột '{item}' sai dạng, cần field=cột",
                f"Column mapping '{item}' is malformed; expected field=column",
            )
        if name not in MATCH_FIELDS:
            raise MappingError(
                f"Trường '{name}' không tồn tại; các trường hợp lệ: {', '.join(MATCH_FIELDS)}",
                f"Unknown field '{name}'; valid fields: {', '.join(MATCH_FIELDS)}",
            )
        mapping[name] = column
    return mapping


@dataclass(slots=True)
class LoadedFile:
    """Records read from one CSV plus data-quality counts."""

    records: list[PersonRecord]
    invalid_national_ids: int = 0
    mapping: dict[str, str] = field(default_factory=dict)


def read_records(
    path: str | Path, *, id_column: str = "record_id", columns: dict[str, str] | None = None
) -> LoadedFile:
    """Read a CSV into PersonRecords.

    With no mapping, every column named like a matcher field is used. Mapped columns must
    exist; `national_id` values that are not valid CCCDs are dropped (and counted).
    """
    path = Path(path)
    try:
        handle = open(path, encoding="utf-8-sig", newline="")  # noqa: SIM115 - closed below
    except OSError as err:
        raise MappingError(f"Không đọc được tệp {path}: {err.strerror}", f"Cannot read {path}: {err.strerror}") from err
    with handle:
        reader = csv.DictReader(handle)
        header = list(reader.fieldnames or [])
        if id_column not in header:
            raise MappingError(
                f"Tệp {path.name} không có cột mã hồ sơ '{id_column}'",
                f"File {path.name} has no id column '{id_column}'",
            )
        mapping = dict(columns) if columns else {f: f for f in MATCH_FIELDS if f in header}
        missing = [col for col in mapping.values() if col not in header]
        if missing:
            raise MappingError(
                f"Tệp {path.name} không có cột: {', '.join(missing)}",
                f"File {path.name} lacks column(s): {', '.join(missing)}",
            )
        if not mapping:
            raise MappingError(
                f"Không có cột nào của tệp {path.name} được ánh xạ tới trường so khớp",
                f"No column of {path.name} maps to a matcher field",
            )
        out = LoadedFile([], 0, mapping)
        seen: set[str] = set()
        for row in reader:
            rid = (row.get(id_column) or "").strip()
            if not rid:
                continue
            if rid in seen:
                raise MappingError(
                    f"Mã hồ sơ '{rid}' bị lặp trong {path.name}", f"Record id '{rid}' is repeated in {path.name}"
                )
            seen.add(rid)
            values = {f: ((row.get(c) or "").strip() or None) for f, c in mapping.items()}
            nid = values.get("national_id")
            if nid is not None:
                try:
                    values["national_id"] = parse_cccd(nid).value
                except IdentifierError:
                    values["national_id"] = None
                    out.invalid_national_ids += 1
            out.records.append(PersonRecord(record_id=rid, **values))
    return out


@dataclass(slots=True)
class PairRow:
    """One output line."""

    left_id: str
    right_id: str
    score: float
    decision: str


def _rows(t: PreparedTable, scored: ScoredPairs) -> list[PairRow]:
    names = {1: "review", 2: "match"}
    rows = [
        PairRow(t.ids[int(a)], t.ids[int(b)], float(s), names[int(d)])
        for a, b, s, d in zip(scored.left, scored.right, scored.score, scored.decision, strict=True)
        if d > 0
    ]
    rows.sort(key=lambda r: (-r.score, r.left_id, r.right_id))
    return rows


def run(
    left: Sequence[PersonRecord],
    right: Sequence[PersonRecord] | None = None,
    *,
    model: MatchModel | None = None,
    thresholds: Thresholds | None = None,
    settings: FitSettings | None = None,
    progress: Progress | None = None,
) -> tuple[list[PairRow], MatchModel]:
    """Dedupe `left` (or link it with `right`); train on the data unless a model is given."""
    report = progress or (lambda stage, done, total: None)
    report("prepare", 0, 1)
    t = prepare(left, right)
    report("prepare", 1, 1)
    if model is None:
        report("train", 0, 1)
        model = fit(t, settings=settings)
        report("train", 1, 1)
    if thresholds is not None:
        model.thresholds = thresholds
    s = settings or FitSettings()
    scored = model.predict(
        t, link=right is not None, max_block_size=s.max_block_size,
        progress=lambda done, total: report("score", done, total),
    )
    return _rows(t, scored), model


def write_pairs(rows: Iterable[PairRow], path: str | Path) -> None:
    """Write `left_id,right_id,score,decision` atomically (temp file + rename)."""
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["left_id", "right_id", "score", "decision"])
            for r in rows:
                writer.writerow([r.left_id, r.right_id, f"{r.score:.3f}", r.decision])
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
