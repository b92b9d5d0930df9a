"""`lienthong mpi review list|decide` and `lienthong mpi index`: the review queue and the index, from a shell."""

from __future__ import annotations

import typer
from rich.console import Console

from lienthong.cli.common import DB_OPTION, fail
from lienthong.cli.mpi import mpi_app
from lienthong.fhir.outcome import FhirError

__all__ = ["mpi_app", "review_app"]

review_app = typer.Typer(help="Hàng đợi xét duyệt trùng bệnh nhân / Possible-match review queue", no_args_is_help=True)
mpi_app.add_typer(review_app, name="review")
out = Console()


@review_app.command("list")
def review_list(status: str = typer.Option("pending", "--status"), db: str = DB_OPTION) -> None:
    """Liệt kê các cặp cần xét / List the pairs waiting for a decision."""
    from lienthong.cli.operator import open_node

    node = open_node(db)
    items = node.identity.reviews(status)
    # Plain lines, not a table: the ids are needed whole for `review decide`, in any terminal or pipe.
    typer.echo("review\tleft\tright\tscore\twhy")
    for item in items:
        why = ", ".join(f"{w['field']}={w['level']}" for w in item["explanation"][1:6])
        typer.echo(f"{item['review_id']}\t{item['left_id']}\t{item['right_id']}\t{item['score']:.1f}\t{why}")
    if not items:
        out.print("Không có mục nào / nothing to review")


@review_app.command("decide")
def review_decide(review_id: str, decision: str = typer.Argument(..., help="match | no-match"),
                  db: str = DB_OPTION) -> None:
    """Quyết định một cặp / Decide one pair (audited)."""
    from lienthong.cli.operator import open_node, operator_context

    node = open_node(db)
    try:
        result = node.identity.decide(operator_context(node), review_id, decision)
    except FhirError as exc:
        fail("không quyết định được", str(exc))
    out.print(f"{review_id}: {decision}" + (f" → golden Patient/{result['golden']}" if result.get("golden") else ""))


@mpi_app.command("index")
def mpi_index(db: str = DB_OPTION) -> None:
    """Dựng lại chỉ mục bệnh nhân / Rebuild the patient index from the stored Patients."""
    from lienthong.cli.operator import open_node

    count = open_node(db).identity.rebuild()
    out.print(f"Đã lập chỉ mục / indexed {count} patients")
