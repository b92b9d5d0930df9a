"""`lienthong mpi …`: find duplicate patients in a CSV or link two CSVs.

Exit code 2 and no output file when the input does not fit the column mapping.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from lienthong.identity.batch import MappingError, PairRow, parse_columns, read_records, run, write_pairs
from lienthong.identity.matching import MatchModel, Thresholds

mpi_app = typer.Typer(
    help="Chỉ mục bệnh nhân: tìm hồ sơ trùng, liên kết hai danh sách / "
    "Master patient index: find duplicates, link two lists.",
    no_args_is_help=True,
)
_err = Console(stderr=True)
SMALL_INPUT = 1000
DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "identity" / "data" / "default_model.json"

_STAGES = {"prepare": "Chuẩn hóa / normalising", "train": "Huấn luyện / training", "score": "Chấm điểm / scoring"}

IdColumn = Annotated[str, typer.Option("--id-column", help="Cột mã hồ sơ / record-id column")]
Columns = Annotated[
    str | None,
    typer.Option("--columns", help="field=cột,... ánh xạ trường so khớp / matcher field=CSV column mapping"),
]
Out = Annotated[Path, typer.Option("--out", help="Tệp cặp kết quả / output pairs CSV")]
MatchT = Annotated[float, typer.Option("--match-threshold", help="Ngưỡng tự liên kết (log2 odds) / auto-link")]
ReviewT = Annotated[float, typer.Option("--review-threshold", help="Ngưỡng cần xem xét / review")]
ModelIn = Annotated[Path | None, typer.Option("--model", help="Mô hình đã huấn luyện (JSON) / trained model")]
ModelOut = Annotated[Path | None, typer.Option("--save-model", help="Lưu mô hình (JSON) / save the model")]


@mpi_app.callback()
def _group() -> None:
    """Chỉ mục bệnh nhân / master patient index."""


def _fail(err: MappingError) -> typer.Exit:
    _err.print(f"[red]Lỗi / error:[/red] {err.message_vi}\n  {err.message_en}")
    return typer.Exit(code=2)


def _execute(
    files: list[Path], id_column: str, columns: str | None, out: Path, match_threshold: float,
    review_threshold: float, model_path: Path | None, save_model: Path | None,
) -> None:
    try:
        mapping = parse_columns(columns)
        loaded = [read_records(f, id_column=id_column, columns=mapping or None) for f in files]
    except MappingError as err:
        raise _fail(err) from err
    for f, data in zip(files, loaded, strict=True):
        if data.invalid_national_ids:
            _err.print(
                f"[yellow]{f.name}: bỏ qua {data.invalid_national_ids} số CCCD không hợp lệ / "
                f"ignored {data.invalid_national_ids} invalid CCCD numbers[/yellow]"
            )
    model = MatchModel.load(model_path) if model_path else None
    n_records = sum(len(d.records) for d in loaded)
    if model is None and n_records < SMALL_INPUT and DEFAULT_MODEL.exists():
        # Too few records to estimate m/u from the file itself: use the shipped model.
        model = MatchModel.load(DEFAULT_MODEL)
        _err.print(f"Dùng mô hình mặc định cho {n_records} hồ sơ / using the default model for {n_records} records")
    thresholds = Thresholds(match=match_threshold, review=review_threshold)
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=_err, transient=True) as bar:
        tasks: dict[str, TaskID] = {}

        def report(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(_STAGES.get(stage, stage), total=max(total, 1))
            bar.update(tasks[stage], completed=done, total=max(total, 1))

        rows: list[PairRow]
        rows, fitted = run(
            loaded[0].records, loaded[1].records if len(loaded) > 1 else None,
            model=model, thresholds=thresholds, progress=report,
        )
    write_pairs(rows, out)
    if save_model:
        fitted.save(save_model)
    n_match = sum(r.decision == "match" for r in rows)
    _err.print(
        f"Đã ghi {len(rows)} cặp ({n_match} tự liên kết, {len(rows) - n_match} cần xem xét) vào {out} / "
        f"wrote {len(rows)} pairs ({n_match} match, {len(rows) - n_match} review) to {out}"
    )


@mpi_app.command("dedupe")
def dedupe(
    file: Annotated[Path, typer.Argument(help="CSV hồ sơ bệnh nhân / patient CSV")],
    id_column: IdColumn = "record_id",
    columns: Columns = None,
    out: Out = Path("pairs.csv"),
    match_threshold: MatchT = Thresholds().match,
    review_threshold: ReviewT = Thresholds().review,
    model: ModelIn = None,
    save_model: ModelOut = None,
) -> None:
    """Tìm các hồ sơ trùng trong một tệp / find duplicate records in one file."""
    _execute([file], id_column, columns, out, match_threshold, review_threshold, model, save_model)


@mpi_app.command("link")
def link(
    a: Annotated[Path, typer.Argument(help="CSV thứ nhất / first CSV")],
    b: Annotated[Path, typer.Argument(help="CSV thứ hai / second CSV")],
    id_column: IdColumn = "record_id",
    columns: Columns = None,
    out: Out = Path("pairs.csv"),
    match_threshold: MatchT = Thresholds().match,
    review_threshold: ReviewT = Thresholds().review,
    model: ModelIn = None,
    save_model: ModelOut = None,
) -> None:
    """Liên kết hồ sơ giữa hai tệp / link records across two files."""
    _execute([a, b], id_column, columns, out, match_threshold, review_threshold, model, save_model)
