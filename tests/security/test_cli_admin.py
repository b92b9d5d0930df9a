"""Administration from the command line and secure defaults of `lienthong serve`.

Users and clients are created through the CLI (real argon2 cost), then used through the real
OAuth endpoints of a node on the same database; every administrative change must appear in the
audit trail with the operating-system account as the actor.
"""

from __future__ import annotations

import getpass
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from starlette.testclient import TestClient
from typer.testing import CliRunner

from security.conftest import (
    PASSWORD,
    audit_of,
    authorize,
    bearer,
    client_token,
    close_app,
    login,
    make_app,
)

LIENTHONG = Path(sys.executable).with_name("lienthong")


def user_exists(db_url: str, username: str) -> bool:
    from lienthong.node import open_database
    from lienthong.security.accounts import Accounts

    engine = open_database(db_url).engine  # migrated: a refused command may not have touched the database
    try:
        return Accounts(engine).get_user(username) is not None
    finally:
        engine.dispose()


def cli(*args: str, stdin: str | None = None) -> Any:
    from lienthong.cli.main import app

    return CliRunner().invoke(app, list(args), input=stdin)


def said(result: Any) -> str:
    """Everything the command printed, whitespace collapsed (rich wraps long lines)."""
    return " ".join(result.output.split())  # click >= 8.2: stdout and stderr, interleaved


def admin_details(app: Any) -> list[str]:
    return [e.get("outcomeDesc", "") for e in audit_of(app).events()
            if any(c["code"] == "admin" for c in e["subtype"])
            and e["agent"][0]["who"]["identifier"]["value"] == f"os:{getpass.getuser()}"]


def test_users_add_list_disable_enable(db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from lienthong.security import authn
    from lienthong.storage import schema

    r = cli("users", "add", "bs.cli", "--role", "clinician", "--facility", "24001", "--practitioner", "prac-cli",
            "--licence", "000123/HNO-CCHN", "--password-stdin", "--db", db_url, stdin=PASSWORD + "\n")
    assert r.exit_code == 0, said(r)
    r = cli("users", "add", "dd.ca-dem", "--role", "nurse", "--facility", "24001", "--password-stdin",
            "--window", "days=mon-fri;start=19:00;end=07:00", "--db", db_url, stdin="Ca-dem-an-toan-7\n")
    assert r.exit_code == 0, said(r)
    r = cli("users", "add", "bs.cli", "--role", "clinician", "--facility", "24001", "--password-stdin",
            "--db", db_url, stdin=PASSWORD + "\n")
    assert r.exit_code != 0 and "already exists" in said(r)
    listing = said(cli("users", "list", "--db", db_url))
    assert "bs.cli" in listing and "clinician" in listing and "24001" in listing and "prac-cli" in listing
    assert "dd.ca-dem" in listing and "nurse (window)" in listing
    assert PASSWORD not in listing

    app = make_app(db_url)
    try:
        with app.state.node.db.engine.connect() as conn:
            stored = conn.execute(select(schema.app_user.c.password_hash)
                                  .where(schema.app_user.c.username == "bs.cli")).scalar_one()
        assert stored.startswith("$argon2id$") and "m=65536,t=3,p=4" in stored  # the real work factor
        token = login(app, "bs.cli")["access_token"]
        with TestClient(app) as http:
            assert http.get("/fhir/Patient", headers=bearer(token)).status_code == 200
            r = cli("users", "disable", "bs.cli", "--db", db_url)
            assert r.exit_code == 0, said(r)
            response, _ = authorize(app, "bs.cli", PASSWORD)
            assert response.status_code == 401 and "disabled" in response.text
            monkeypatch.setattr(authn, "USER_CACHE_S", 0.0)
            assert http.get("/fhir/Patient", headers=bearer(token)).status_code == 401  # the session ends too
            assert "yes" in said(cli("users", "list", "--db", db_url))
            r = cli("users", "enable", "bs.cli", "--db", db_url)
            assert r.exit_code == 0, said(r)
            assert login(app, "bs.cli")["access_token"]
        assert cli("users", "disable", "khong.co", "--db", db_url).exit_code != 0
        details = admin_details(app)
        for expected in ("user added: bs.cli role=clinician facility=24001", "user added: dd.ca-dem role=nurse",
                         "user disabled: bs.cli", "user enabled: bs.cli"):
            assert any(d.startswith(expected) for d in details), (expected, details)
        assert not any("khong.co" in d for d in details)  # failed changes are not recorded as done
    finally:
        close_app(app)


def test_admin_changes_keep_the_trail_verifiable(db_url: str, request: pytest.FixtureRequest) -> None:
    for _ in range(2):
        assert cli("keys", "rotate", "--db", db_url).exit_code == 0
    assert cli("clients", "add", "HIS kiem tra", "--scope", "system/*.rs", "--json", "--db", db_url).exit_code == 0
    r = cli("audit", "verify", "--db", db_url)
    assert r.exit_code == 0, said(r)
    assert "intact: 3 records" in said(r)


WEAK = [("Ngan-1a!", "12"), ("khongcochuhoavaso", "character classes"), ("CHUHOA-KHONGSO", "character classes"),
        ("1234567890123", "character classes"), ("Bs.yeu-Aa-2025", "username")]


@pytest.mark.parametrize(("password", "why"), WEAK)
def test_users_add_rejects_weak_passwords(module_db_url: str, password: str, why: str) -> None:
    db_url = module_db_url  # refused commands change nothing: one database for the module
    r = cli("users", "add", "bs.yeu", "--role", "clinician", "--facility", "24001", "--password-stdin",
            "--db", db_url, stdin=password + "\n")
    assert r.exit_code != 0
    assert "password" in said(r) and why in said(r)
    assert not user_exists(db_url, "bs.yeu")


@pytest.mark.parametrize(("args", "stdin", "why"), [
    (["--role", "clinician", "--facility", "24001"], PASSWORD, "--password-stdin"),
    (["--role", "clinician", "--facility", "24001", "--password-stdin"], "", "no password"),
    (["--role", "surgeon", "--facility", "24001", "--password-stdin"], PASSWORD, "unknown role"),
    (["--role", "clinician", "--facility", "2400", "--password-stdin"], PASSWORD, "5 digits"),
    (["--role", "clinician", "--password-stdin"], PASSWORD, "needs a facility"),
    (["--role", "nurse", "--facility", "24001", "--password-stdin", "--window", "mon-fri 7-17"], PASSWORD, "window"),
    (["--role", "nurse", "--facility", "24001", "--password-stdin", "--window", "start=25:00"], PASSWORD, "invalid"),
])
def test_users_add_refuses_bad_requests(module_db_url: str, args: list[str], stdin: str, why: str) -> None:
    db_url = module_db_url
    r = cli("users", "add", "bs.sai", *args, "--db", db_url, stdin=stdin + "\n" if stdin else "")
    assert r.exit_code != 0 and why in said(r), said(r)
    assert not user_exists(db_url, "bs.sai")


def test_clients_add_json_prints_the_secret_once_and_it_works(db_url: str) -> None:
    from lienthong.storage import schema

    r = cli("clients", "add", "HIS benh vien", "--facility", "24001", "--scope", "system/*.rs system/Observation.c",
            "--json", "--db", db_url)
    assert r.exit_code == 0, said(r)
    printed = json.loads(r.stdout)
    assert set(printed) == {"client_id", "client_secret"}
    cid, secret = printed["client_id"], printed["client_secret"]
    assert len(secret) >= 32
    assert cli("clients", "add", "x", "--scope", "everything", "--json", "--db", db_url).exit_code != 0
    assert cli("clients", "add", "x", "--scope", "openid", "--json", "--db", db_url).exit_code != 0
    app = make_app(db_url)
    try:
        with app.state.node.db.engine.connect() as conn:
            row = conn.execute(select(schema.app_client).where(schema.app_client.c.client_id == cid)).one()
        assert secret not in json.dumps([str(v) for v in row]) and row.secret_hash.startswith("$argon2id$")
        r = client_token(app, cid, secret)
        assert r.status_code == 200 and r.json()["scope"] == "system/*.rs system/Observation.c"
        assert client_token(app, cid, secret[:-1] + ("A" if secret[-1] != "A" else "B")).status_code == 401
        with TestClient(app) as http:
            assert http.get("/fhir/Patient", headers=bearer(r.json()["access_token"])).status_code == 200
        details = admin_details(app)
        assert any(d.startswith(f"client added: {cid} facility=24001") for d in details), details
        assert not any(secret in d for d in details)
    finally:
        close_app(app)


def test_bootstrap_once_and_key_rotation_are_audited(db_url: str) -> None:
    from lienthong.storage import schema

    r = cli("users", "bootstrap", "qt.dau", "--facility", "24001", "--password-stdin", "--db", db_url,
            stdin="Quan-tri-dau-tien-1\n")
    assert r.exit_code == 0, said(r)
    r = cli("users", "bootstrap", "qt.hai", "--facility", "24001", "--password-stdin", "--db", db_url,
            stdin="Quan-tri-thu-hai-2\n")
    assert r.exit_code == 2 and "already exists" in said(r)
    assert cli("keys", "rotate", "--db", db_url).exit_code == 0
    app = make_app(db_url)
    try:
        with app.state.node.db.engine.connect() as conn:
            keys = conn.execute(select(schema.signing_key.c.kid, schema.signing_key.c.retired)).all()
        assert len(keys) == 2 and sum(1 for k in keys if k.retired is None) == 1
        details = admin_details(app)
        assert any(d.startswith("bootstrap administrator qt.dau (facility-admin)") for d in details)
        assert any(d.startswith("token signing key rotated") for d in details)
        assert not any("qt.hai" in d for d in details)
        assert login(app, "qt.dau", "Quan-tri-dau-tien-1")["scope"] == "user/*.rs"
    finally:
        close_app(app)


# ---- secure defaults of `lienthong serve` ----------------------------------------------------------------
def _serve(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([str(LIENTHONG), "serve", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_serve_refuses_unsafe_network_setups(db_url: str, tmp_path: Path) -> None:
    """Both commands must exit at once with a message (run side by side: each pays the start-up)."""
    insecure = _serve("--insecure-dev", "--host", "0.0.0.0", "--port", "0",  # noqa: S104
                      "--db", f"sqlite:///{tmp_path / 'dev.db'}")
    unbootstrapped = _serve("--host", "0.0.0.0", "--port", "0", "--db", db_url)  # noqa: S104
    try:
        _, insecure_err = insecure.communicate(timeout=120)
        _, unbootstrapped_err = unbootstrapped.communicate(timeout=120)
    finally:
        for proc in (insecure, unbootstrapped):
            if proc.poll() is None:
                proc.kill()
    assert insecure.returncode != 0
    assert "--insecure-dev only runs on 127.0.0.1" in " ".join(insecure_err.split())
    assert unbootstrapped.returncode != 0
    assert "lienthong users bootstrap" in " ".join(unbootstrapped_err.split())
    assert "Traceback" not in insecure_err + unbootstrapped_err
