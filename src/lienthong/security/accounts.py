"""People and systems that may call a node: users with roles, and OAuth clients with scopes.

Why here and not in FHIR resources: credentials and lockout counters are
security state, not clinical data; users link to their Practitioner resource and
practising-licence number so clinical authorship stays attributable.
"""

from __future__ import annotations

import re
import secrets
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
from sqlalchemy import Engine, insert, select, update

from lienthong.fhir.datetimes import now_us
from lienthong.security import passwords, windows
from lienthong.security.roles import ROLES, role
from lienthong.security.scopes import parse_scopes
from lienthong.storage import schema
from lienthong.storage.engine import read_connection

_USERNAME = re.compile(r"^[a-z0-9][a-z0-9._-]{2,63}$")
_FACILITY = re.compile(r"^\d{5}$")


class AccountError(ValueError):
    """A bad request about accounts (message in Vietnamese and English)."""


class LoginFailed(Exception):
    def __init__(self, reason: str, locked: bool = False) -> None:
        super().__init__(reason)
        self.locked = locked


@dataclass
class Assignment:
    role: str
    facility: str | None
    window: dict[str, Any] | None = None
    valid_from: int | None = None
    valid_until: int | None = None

    def active(self, now: datetime | None = None) -> bool:
        return windows.active(self.window, self.valid_from, self.valid_until, now)


@dataclass
class User:
    user_id: str
    username: str
    facility: str | None
    practitioner_id: str | None
    licence_no: str | None
    disabled: bool
    assignments: list[Assignment] = field(default_factory=list)

    def active_roles(self, now: datetime | None = None) -> list[Assignment]:
        return [a for a in self.assignments if a.active(now)]


@dataclass
class Client:
    client_id: str
    name: str
    facility: str | None
    scopes: str
    disabled: bool


def check_facility(code: str | None) -> str | None:
    if code is None:
        return None
    if not _FACILITY.match(code):
        raise AccountError(f"mã cơ sở phải gồm 5 chữ số '{code}' / facility code must be 5 digits '{code}'")
    return code


class Accounts:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    # ---- users ---------------------------------------------------------------
    def add_user(self, username: str, password: str, role_code: str, facility: str | None,
                 practitioner_id: str | None = None, licence_no: str | None = None,
                 window: dict[str, Any] | None = None, valid_until: int | None = None,
                 display_name: str | None = None) -> User:
        if not _USERNAME.match(username):
            raise AccountError("tên đăng nhập 3–64 ký tự a-z 0-9 . _ - / username must be 3–64 chars of a-z 0-9 . _ -")
        try:
            r = role(role_code)
        except ValueError as exc:
            raise AccountError(str(exc)) from None
        check_facility(facility)
        if r.clinical and facility is None:
            raise AccountError("vai trò lâm sàng cần mã cơ sở / a clinical role needs a facility")
        if window is not None:
            try:
                windows.parse_window(window)
            except windows.WindowError as exc:
                raise AccountError(str(exc)) from None
        try:
            passwords.check_policy(password, username)
        except passwords.WeakPassword as exc:
            raise AccountError(str(exc)) from None
        user_id = str(uuid.uuid4())
        with self.engine.begin() as conn:
            if conn.execute(select(schema.app_user.c.user_id).where(schema.app_user.c.username == username)).first():
                raise AccountError(f"tên đăng nhập đã có '{username}' / username already exists '{username}'")
            conn.execute(insert(schema.app_user).values(
                user_id=user_id, username=username, password_hash=passwords.hash_password(password),
                display_name=display_name, facility=facility, practitioner_id=practitioner_id,
                licence_no=licence_no, disabled=False, failed_logins=0, created=now_us()))
            conn.execute(insert(schema.role_assignment).values(
                user_id=user_id, role=role_code, facility=facility,
                window=orjson.dumps(window).decode() if window else None, valid_until=valid_until))
        user = self.get_user(username)
        assert user is not None
        return user

    def get_user(self, username: str | None = None, user_id: str | None = None) -> User | None:
        u, ra = schema.app_user, schema.role_assignment
        with read_connection(self.engine) as conn:
            cond = u.c.username == username if username is not None else u.c.user_id == user_id
            row = conn.execute(select(u.c.user_id, u.c.username, u.c.facility, u.c.practitioner_id,
                                      u.c.licence_no, u.c.disabled).where(cond)).first()
            if row is None:
                return None
            assigned = conn.execute(select(ra.c.role, ra.c.facility, ra.c.window, ra.c.valid_from,
                                           ra.c.valid_until).where(ra.c.user_id == row[0])).all()
        return User(*row, assignments=[
            Assignment(a[0], a[1], orjson.loads(a[2]) if a[2] else None, a[3], a[4]) for a in assigned])

    def list_users(self) -> list[User]:
        with read_connection(self.engine) as conn:
            names = [r[0] for r in conn.execute(select(schema.app_user.c.username).order_by(schema.app_user.c.username))]
        return [u for u in (self.get_user(n) for n in names) if u is not None]

    def set_disabled(self, username: str, disabled: bool) -> None:
        with self.engine.begin() as conn:
            changed = conn.execute(update(schema.app_user).where(schema.app_user.c.username == username)
                                   .values(disabled=disabled)).rowcount
        if not changed:
            raise AccountError(f"không có người dùng '{username}' / no such user '{username}'")

    def authenticate(self, username: str, password: str, now: int | None = None) -> User:
        """Check a password with lockout: 5 failures lock the account for 15 minutes."""
        now = now or now_us()
        u = schema.app_user
        failure: LoginFailed | None = None
        with self.engine.begin() as conn:  # the failure counter must commit, so refusals are raised after
            row = conn.execute(select(u.c.user_id, u.c.password_hash, u.c.disabled, u.c.failed_logins,
                                      u.c.locked_until).where(u.c.username == username)).first()
            if row is None:
                passwords.verify_password(_DUMMY_HASH, password)  # same time as a real check
                failure = LoginFailed("sai tên đăng nhập hoặc mật khẩu / wrong username or password")
            else:
                user_id, stored, disabled, failures, locked_until = row
                if disabled:
                    failure = LoginFailed("tài khoản đã bị khoá / account disabled")
                elif locked_until is not None and locked_until > now:
                    failure = LoginFailed("tài khoản tạm khoá do sai nhiều lần / account locked after failed logins",
                                          locked=True)
                elif not passwords.verify_password(stored, password):
                    failures += 1
                    lock = now + passwords.LOCKOUT_US if failures >= passwords.MAX_FAILURES else None
                    conn.execute(update(u).where(u.c.user_id == user_id).values(
                        failed_logins=0 if lock else failures, locked_until=lock))
                    failure = LoginFailed("sai tên đăng nhập hoặc mật khẩu / wrong username or password",
                                          locked=bool(lock))
                else:
                    conn.execute(update(u).where(u.c.user_id == user_id).values(failed_logins=0, locked_until=None))
        if failure is not None or row is None:
            raise failure or LoginFailed("sai tên đăng nhập hoặc mật khẩu / wrong username or password")
        user = self.get_user(user_id=user_id)
        assert user is not None
        if not user.active_roles(datetime.fromtimestamp(now / 1e6, UTC)):
            raise LoginFailed("ngoài khung giờ được phép / outside the permitted time window")
        return user

    # ---- clients -------------------------------------------------------------
    def add_client(self, name: str, facility: str | None, scopes: str) -> tuple[str, str]:
        """Register a system client; returns (client_id, secret). The secret is shown once, stored hashed."""
        check_facility(facility)
        try:
            resource_scopes, _ = parse_scopes(scopes)
        except ValueError as exc:
            raise AccountError(str(exc)) from None
        if not resource_scopes:
            raise AccountError("cần ít nhất một phạm vi tài nguyên / at least one resource scope is needed")
        client_id = f"{re.sub(r'[^a-z0-9]+', '-', name.lower()).strip('-')[:40]}-{secrets.token_hex(4)}"
        secret = secrets.token_urlsafe(32)
        with self.engine.begin() as conn:
            conn.execute(insert(schema.app_client).values(
                client_id=client_id, name=name, secret_hash=passwords.hash_password(secret), facility=facility,
                scopes=scopes, disabled=False, created=now_us()))
        return client_id, secret

    def authenticate_client(self, client_id: str, secret: str) -> Client:
        c = schema.app_client
        with read_connection(self.engine) as conn:
            row = conn.execute(select(c.c.client_id, c.c.name, c.c.facility, c.c.scopes, c.c.disabled,
                                      c.c.secret_hash).where(c.c.client_id == client_id)).first()
        if row is None or row[4] or not passwords.verify_password(row[5], secret):
            if row is None:
                passwords.verify_password(_DUMMY_HASH, secret)
            raise LoginFailed("sai thông tin máy khách / invalid client credentials")
        return Client(*row[:5])

    def get_client(self, client_id: str) -> Client | None:
        c = schema.app_client
        with read_connection(self.engine) as conn:
            row = conn.execute(select(c.c.client_id, c.c.name, c.c.facility, c.c.scopes, c.c.disabled)
                               .where(c.c.client_id == client_id)).first()
        return Client(*row) if row else None

    def has_admin(self) -> bool:
        ra = schema.role_assignment
        with read_connection(self.engine) as conn:
            return conn.execute(select(ra.c.user_id).where(
                ra.c.role.in_([r for r, v in ROLES.items() if v.user_admin]))).first() is not None


_DUMMY_HASH = passwords.hash_password("lienthong-timing-equaliser-Aa1!")
