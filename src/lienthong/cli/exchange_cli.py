"""`lienthong keys init|install`, `lienthong hub ca-init|issue|revoke|facility ...`: trust and the registry from a shell.

Every change to the registry (a facility added, cleared or suspended) is written to the audit trail.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from lienthong.cli.admin import keys_app
from lienthong.cli.common import DB_OPTION, fail

hub_app = typer.Typer(help="Trạm liên thông tỉnh / Provincial hub administration", no_args_is_help=True)
facility_app = typer.Typer(help="Sổ đăng ký cơ sở / Facility registry", no_args_is_help=True)
hub_app.add_typer(facility_app, name="facility")
out = Console()
KEYS_DIR = typer.Option(Path("var/keys"), "--dir", help="Folder of this node's key and certificate")
CA_DIR = typer.Option(Path("var/ca"), "--ca-dir", help="Folder of the provincial CA (keep it offline)")


@keys_app.command("init")
def keys_init(code: str = typer.Option(..., "--code", help="This facility's 5-digit code"),
              name: str = typer.Option(..., "--name"), folder: Path = KEYS_DIR) -> None:
    """Tạo khoá và CSR cho nút / Create this node's key (0600) and a CSR for the provincial CA."""
    from lienthong.exchange.trust import keys_init as make

    folder.mkdir(parents=True, exist_ok=True)
    try:
        csr = make(folder, code, name)
    except (FileExistsError, ValueError) as exc:
        fail("không tạo được khoá", str(exc))
    out.print(f"CSR: {csr}  (gửi cho trạm tỉnh / send it to the provincial hub)")


@keys_app.command("install")
def keys_install(chain: Path, folder: Path = KEYS_DIR) -> None:
    """Cài chứng thư trạm cấp / Install the certificate chain the hub issued."""
    from lienthong.exchange.trust import keys_install as install

    try:
        identity = install(folder, chain.read_bytes())
    except (OSError, ValueError) as exc:
        fail("không cài được chứng thư", str(exc))
    out.print(f"Đã cài / installed: facility {identity.facility_code}, kid {identity.kid}")


@hub_app.command("ca-init")
def ca_init(folder: Path = CA_DIR) -> None:
    """Tạo CA tỉnh / Create the provincial certificate authority."""
    from lienthong.exchange.trust import ProvincialCA

    if (folder / "ca.key").exists():
        fail("CA đã tồn tại", f"a CA already exists in {folder}", 2)
    folder.mkdir(parents=True, exist_ok=True)
    ProvincialCA.create().save(folder)
    out.print(f"CA: {folder / 'ca.crt'}")


@hub_app.command("issue")
def ca_issue(csr: Path, code: str = typer.Option(..., "--code"), output: Path = typer.Option(..., "--out"),
             hub: bool = typer.Option(False, "--hub", help="Issue the hub's own certificate"),
             folder: Path = CA_DIR) -> None:
    """Cấp chứng thư cho một CSR / Issue a certificate for a CSR (after the security check)."""
    from cryptography import x509

    from lienthong.exchange.trust import ProvincialCA, Role

    try:
        ca = ProvincialCA.load_dir(folder)
        cert = ca.issue(x509.load_pem_x509_csr(csr.read_bytes()), facility_code=code,
                        role=Role.HUB if hub else Role.FACILITY)
    except (OSError, ValueError) as exc:
        fail("không cấp được chứng thư", str(exc))
    from cryptography.hazmat.primitives.serialization import Encoding

    output.write_bytes(cert.public_bytes(Encoding.PEM) + ca.cert_pem())
    out.print(f"Đã cấp / issued: {output} (serial {cert.serial_number})")


@hub_app.command("revoke")
def ca_revoke(serial: int, folder: Path = CA_DIR) -> None:
    """Thu hồi chứng thư và cập nhật CRL / Revoke a certificate and write a new CRL."""
    from lienthong.exchange.trust import ProvincialCA

    ca = ProvincialCA.load_dir(folder)
    ca.revoke(serial)
    ca.save(folder)
    out.print(f"Đã thu hồi / revoked {serial}; CRL: {folder / 'ca.crl'}")


def _registry(db: str | None):  # type: ignore[no-untyped-def]
    from lienthong.exchange.registry import Registry
    from lienthong.node import open_database

    return Registry(open_database(db).engine)


def _audit(db: str | None, detail: str) -> None:
    from lienthong.cli.admin import _audit_admin
    from lienthong.node import open_database

    _audit_admin(open_database(db).engine, detail)


@facility_app.command("add")
def facility_add(code: str, name: str = typer.Option(..., "--name"), endpoint: str = typer.Option(None, "--endpoint"),
                 kind: str = typer.Option(None, "--kind"), db: str = DB_OPTION) -> None:
    """Đăng ký cơ sở (trạng thái chờ kiểm tra) / Register a facility (pending security clearance)."""
    from lienthong.exchange.registry import Facility
    from lienthong.fhir.outcome import FhirError

    try:
        _registry(db).upsert(Facility(code=code, name_vi=name, endpoint=endpoint, kind=kind))
    except FhirError as exc:
        fail("không đăng ký được", str(exc))
    _audit(db, f"registry: facility {code} added (pending)")
    out.print(f"{code}: {name} (pending)")


def _clearance(code: str, status: str, date: str | None, ref: str | None, db: str | None) -> None:
    from lienthong.fhir.outcome import FhirError

    try:
        facility = _registry(db).set_clearance(code, status, date, ref)
    except FhirError as exc:
        fail("không cập nhật được", str(exc))
    _audit(db, f"clearance of {code}: {status} {date or ''} {ref or ''}")
    out.print(f"{code}: {facility.clearance} {facility.clearance_date or ''} {facility.clearance_ref or ''}")


@facility_app.command("clear")
def facility_clear(code: str, date: str = typer.Option(..., "--date"), ref: str = typer.Option(..., "--ref"),
                   db: str = DB_OPTION) -> None:
    """Ghi nhận đã qua kiểm tra an ninh / Record a passed police security check."""
    _clearance(code, "cleared", date, ref, db)


@facility_app.command("suspend")
def facility_suspend(code: str, ref: str = typer.Option(None, "--ref"), db: str = DB_OPTION) -> None:
    """Tạm dừng kết nối của cơ sở / Suspend a facility."""
    _clearance(code, "suspended", None, ref, db)


@facility_app.command("list")
def facility_list(as_json: bool = typer.Option(False, "--json"), db: str = DB_OPTION) -> None:
    """Liệt kê cơ sở / List facilities."""
    items = _registry(db).list()
    if as_json:
        typer.echo(json.dumps([f.to_json() for f in items], ensure_ascii=False))
        return
    table = Table("code", "name", "clearance", "date", "reference", "endpoint")
    for f in items:
        table.add_row(f.code, f.name_vi, f.clearance, f.clearance_date or "-", f.clearance_ref or "-", f.endpoint or "-")
    out.print(table)
