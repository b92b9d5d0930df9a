"""`lienthong users`, `clients`, `audit` and `keys`: administration from the command line.

Every change to users, roles or clients is written to the audit trail with the
operating-system account that ran the command as the actor.
"""

from __future__ import annotations

import getpass
import json
import sys
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from lienthong.cli.common import DB_OPTION, fail

users_app = typer.Typer(help="Người dùng / Users", no_args_is_help=True)
clients_app = typer.Typer(help="Máy khách hệ thống / System clients", no_args_is_help=True)
audit_app = typer.Typer(help="Nhật ký kiểm toán / Audit trail", no_args_is_help=True)
keys_app = typer.Typer(help="Khoá ký / Signing keys", no_args_is_help=True)
out = Console()


def _engine(db: str | None) -> Any:
    from lienthong.node import open_database

    try:
        return open_database(db).engine
    except Exception as exc:
        fail("không mở được CSDL", f"cannot open the database: {exc}")


def _audit_admin(engine: Any, detail: str) -> None:
    from lienthong.security.audit import AuditRecord, AuditTrail

    trail = AuditTrail(engine, "cli")
    with engine.begin() as conn:
        trail.record_in(conn, [AuditRecord(action="admin", outcome=0, actor=f"os:{getpass.getuser()}",
                                           actor_kind="operator", roles=(), facility=None, address=None,
                                           node="cli", detail=detail)])


def _read_password(username: str) -> str:
    password = sys.stdin.readline().rstrip("\n")
    if not password:
        fail("chưa nhập mật khẩu trên stdin", "no password on standard input")
    return password


def _window(spec: str | None) -> dict[str, str] | None:
    if not spec:
        return None
    try:
        return dict(part.split("=", 1) for part in spec.split(";"))
    except ValueError:
        fail("khung giờ dạng days=mon-fri;start=07:00;end=17:00",
             "window format is days=mon-fri;start=07:00;end=17:00")
    return None


@users_app.command("add")
def users_add(
    username: str,
    role: str = typer.Option(..., "--role", help="clinician, nurse, records-officer, facility-admin, "
                                                 "province-admin, auditor"),
    facility: str = typer.Option(None, "--facility", help="5-digit facility code"),
    password_stdin: bool = typer.Option(False, "--password-stdin", help="Read the password from standard input"),
    practitioner: str = typer.Option(None, "--practitioner", help="Practitioner resource id"),
    licence: str = typer.Option(None, "--licence", help="Practising-licence number"),
    window: str = typer.Option(None, "--window", help="Time window, e.g. days=mon-fri;start=19:00;end=07:00"),
    valid_until: str = typer.Option(None, "--valid-until", help="Last valid date (YYYY-MM-DD)"),
    db: str = DB_OPTION,
) -> None:
    """Thêm người dùng / Add a user."""
    from lienthong.fhir.datetimes import DateFormatError, parse_range
    from lienthong.security.accounts import AccountError, Accounts

    if not password_stdin:
        fail("dùng --password-stdin", "use --password-stdin (passwords are never taken as arguments)")
    password = _read_password(username)
    until = None
    if valid_until:
        try:
            until = parse_range(valid_until)[1]
        except DateFormatError:
            fail("ngày không hợp lệ", f"invalid date '{valid_until}'")
    engine = _engine(db)
    try:
        user = Accounts(engine).add_user(username, password, role, facility, practitioner, licence,
                                         _window(window), until)
    except AccountError as exc:
        fail("không thêm được người dùng", str(exc))
    _audit_admin(engine, f"user added: {username} role={role} facility={facility}")
    out.print(f"Đã thêm / Added {user.username} ({role}, {facility or '-'})")


@users_app.command("bootstrap")
def users_bootstrap(
    username: str,
    facility: str = typer.Option(None, "--facility", help="Facility code (a facility node)"),
    province: bool = typer.Option(False, "--province", help="Create a provincial administrator (the hub)"),
    password_stdin: bool = typer.Option(False, "--password-stdin"),
    db: str = DB_OPTION,
) -> None:
    """Tạo quản trị viên đầu tiên và khoá ký / Create the first administrator and the signing key."""
    from lienthong.security.accounts import AccountError, Accounts

    if not password_stdin:
        fail("dùng --password-stdin", "use --password-stdin")
    engine = _engine(db)
    accounts = Accounts(engine)
    if accounts.has_admin():
        fail("đã có quản trị viên", "an administrator already exists; use `lienthong users add`", 2)
    role = "province-admin" if province else "facility-admin"
    if not province and not facility:
        fail("cần --facility hoặc --province", "give --facility CODE or --province")
    try:
        accounts.add_user(username, _read_password(username), role, facility)
    except AccountError as exc:
        fail("không tạo được quản trị viên", str(exc))
    _ensure_signing_key(engine)
    _audit_admin(engine, f"bootstrap administrator {username} ({role})")
    out.print(f"Đã tạo quản trị viên / Administrator created: {username} ({role})")


def _ensure_signing_key(engine: Any) -> None:
    from sqlalchemy import select

    from lienthong.security.tokens import TokenService
    from lienthong.storage import schema

    with engine.connect() as conn:
        has_key = conn.execute(select(schema.signing_key.c.kid)).first() is not None
    if not has_key:
        TokenService(engine, "urn:lienthong:bootstrap", "urn:lienthong:bootstrap").jwks()


@users_app.command("list")
def users_list(db: str = DB_OPTION) -> None:
    """Liệt kê người dùng / List users."""
    from lienthong.security.accounts import Accounts

    table = Table("username", "roles", "facility", "practitioner", "disabled")
    for u in Accounts(_engine(db)).list_users():
        roles = ", ".join(a.role + (" (window)" if a.window else "") for a in u.assignments)
        table.add_row(u.username, roles, u.facility or "-", u.practitioner_id or "-", "yes" if u.disabled else "no")
    out.print(table)


def _set_disabled(username: str, disabled: bool, db: str | None) -> None:
    from lienthong.security.accounts import AccountError, Accounts

    engine = _engine(db)
    try:
        Accounts(engine).set_disabled(username, disabled)
    except AccountError as exc:
        fail("không đổi được trạng thái", str(exc))
    _audit_admin(engine, f"user {'disabled' if disabled else 'enabled'}: {username}")
    out.print(f"{username}: {'đã khoá / disabled' if disabled else 'đã mở / enabled'}")


@users_app.command("disable")
def users_disable(username: str, db: str = DB_OPTION) -> None:
    """Khoá người dùng / Disable a user."""
    _set_disabled(username, True, db)


@users_app.command("enable")
def users_enable(username: str, db: str = DB_OPTION) -> None:
    """Mở khoá người dùng / Enable a user."""
    _set_disabled(username, False, db)


@clients_app.command("add")
def clients_add(
    name: str,
    facility: str = typer.Option(None, "--facility"),
    scope: str = typer.Option(..., "--scope", help='e.g. "system/*.rs system/Observation.c"'),
    as_json: bool = typer.Option(False, "--json", help="Print {client_id, client_secret} as JSON"),
    db: str = DB_OPTION,
) -> None:
    """Đăng ký máy khách; bí mật chỉ in một lần / Register a client; the secret is printed once."""
    from lienthong.security.accounts import AccountError, Accounts

    engine = _engine(db)
    try:
        client_id, secret = Accounts(engine).add_client(name, facility, scope)
    except AccountError as exc:
        fail("không đăng ký được máy khách", str(exc))
    _audit_admin(engine, f"client added: {client_id} facility={facility} scope={scope}")
    if as_json:
        typer.echo(json.dumps({"client_id": client_id, "client_secret": secret}))
    else:
        out.print(f"client_id: {client_id}\nclient_secret: {secret}\n"
                  "(bí mật chỉ hiện một lần / the secret is shown only once)")


@audit_app.command("verify")
def audit_verify(db: str = DB_OPTION,
                 audit_journal: str = typer.Option("auto", "--audit-journal",
                                                   help="The node's read-audit journal, whose segments left by "
                                                        "stopped processes are drained first (auto | off | DIR)")
                 ) -> None:
    """Kiểm tra chuỗi băm của nhật ký / Verify the audit hash chain."""
    from lienthong.security.audit import AuditTrail
    from lienthong.security.audit_journal import journal_location

    engine = _engine(db)
    trail = AuditTrail(engine, "cli")
    location = journal_location(engine.url, audit_journal)
    if location is not None:
        try:
            moved = trail.drain_orphans(location)
        except Exception as exc:
            fail("không chuyển được nhật ký cục bộ vào chuỗi", f"cannot drain the audit journal {location}: {exc}")
        if moved:
            out.print(f"Đã chuyển {moved} bản ghi từ nhật ký cục bộ / {moved} journalled records moved into the chain")
    ok, _, message = trail.verify()
    if not ok:
        fail("nhật ký kiểm toán KHÔNG toàn vẹn", message, 3)
    out.print(message)


@keys_app.command("rotate")
def keys_rotate(db: str = DB_OPTION) -> None:
    """Đổi khoá ký token / Rotate the token-signing key."""
    from lienthong.security.tokens import TokenService

    engine = _engine(db)
    kid = TokenService(engine, "urn:lienthong:cli", "urn:lienthong:cli").rotate()
    _audit_admin(engine, f"token signing key rotated: {kid}")
    out.print(f"Khoá mới / new key: {kid}")
