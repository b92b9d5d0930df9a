from __future__ import annotations

import csv
from pathlib import Path

import typer
from typer.testing import CliRunner

from lienthong.cli.mpi import mpi_app
from lienthong.cli.synth import synth_app
from lienthong.identity.identifiers import parse_cccd
from lienthong.identity.synth import generate

app = typer.Typer()
app.add_typer(mpi_app, name="mpi")
app.add_typer(synth_app, name="synth")
runner = CliRunner()


def test_synth_is_deterministic_and_consistent() -> None:
    a = generate(300, seed=5)
    b = generate(300, seed=5)
    c = generate(300, seed=6)
    assert [s.record for s in a] == [s.record for s in b]
    assert [s.record for s in a] != [s.record for s in c]
    kinds = {s.kind for s in a}
    assert kinds == {"original", "duplicate"}
    for s in a:
        if s.record.national_id:
            parse_cccd(s.record.national_id)  # valid, province of birth registration included


def _synth(tmp_path: Path, n: int = 600, seed: int = 1) -> Path:
    out = tmp_path / "p.csv"
    result = runner.invoke(app, ["synth", "patients", str(n), "--seed", str(seed), "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


def test_synth_cli_same_seed_same_file(tmp_path: Path) -> None:
    first = _synth(tmp_path).read_bytes()
    assert _synth(tmp_path).read_bytes() == first
    with (tmp_path / "p.csv").open(encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 600 and "true_person_id" in rows[0]


def test_dedupe_writes_pairs(tmp_path: Path) -> None:
    src = _synth(tmp_path)
    out = tmp_path / "pairs.csv"
    result = runner.invoke(app, ["mpi", "dedupe", str(src), "--out", str(out)])
    assert result.exit_code == 0, result.output
    with out.open(encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert rows and set(rows[0]) == {"left_id", "right_id", "score", "decision"}
    assert {r["decision"] for r in rows} <= {"match", "review"}


def test_link_with_mapping(tmp_path: Path) -> None:
    src = _synth(tmp_path)
    lines = src.read_text(encoding="utf-8").splitlines()
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    a.write_text("\n".join(lines[:301]) + "\n", encoding="utf-8")
    b.write_text("\n".join([lines[0], *lines[301:]]) + "\n", encoding="utf-8")
    out = tmp_path / "links.csv"
    mapping = "full_name=full_name,birth_date=birth_date,sex=sex,phone=phone,national_id=national_id,address=address"
    result = runner.invoke(app, ["mpi", "link", str(a), str(b), "--columns", mapping, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert out.read_text(encoding="utf-8").startswith("left_id,right_id,score,decision")


def test_bad_columns_exit_2_and_write_nothing(tmp_path: Path) -> None:
    src = _synth(tmp_path, n=50)
    out = tmp_path / "never.csv"
    cases = [
        ["--columns", "full_name=HO_TEN"],  # missing CSV column
        ["--columns", "ho_ten=full_name"],  # unknown field
        ["--columns", "full_name"],  # malformed
        ["--id-column", "MA_BN"],  # missing id column
    ]
    for extra in cases:
        result = runner.invoke(app, ["mpi", "dedupe", str(src), "--out", str(out), *extra])
        assert result.exit_code == 2, (extra, result.output)
        assert not out.exists()
    assert list(tmp_path.glob(".never.csv*")) == []
