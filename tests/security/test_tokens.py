"""Tokens, OAuth flows, passwords and secure defaults.

- The refusal rule: 401 (no token, malformed, forged, expired, wrong audience or issuer, revoked
  through /auth/revoke or /auth/logout), 403 (scope, role), 404 (another facility's or outside the
  care team); every refusal body is an OperationOutcome.
- Authorization code + PKCE and client credentials: scope narrowing, code replay, redirects.
- Passwords: policy, lockout after 5 failures and unlock after the lockout period.
- Security headers, CORS, rate limiting of the token endpoints, JWKS and key rotation.

Forged tokens are built here with joserfc: signed with a fresh key, or with the node's own key
(read from the `signing_key` table) but with bad claims, so that only the claim under test is wrong.
"""

from __future__ import annotations

import base64
import json
import secrets
import time
from typing import Any
from urllib.parse import urljoin, urlsplit

import pytest
from joserfc import jwt
from joserfc.jwk import ECKey, OctKey
from sqlalchemy import select, update
from starlette.testclient import TestClient

from security.conftest import (
    FAC1,
    PASSWORD,
    World,
    add_client,
    add_user,
    assert_outcome,
    authorize,
    authorize_params,
    bearer,
    client_login,
    client_token,
    close_app,
    code_of,
    exchange,
    login,
    make_app,
    new_address,
    pkce_pair,
    wait_for_events,
)

JSON = dict[str, Any]
ISSUER = "urn:lienthong:node:lienthong"
AUDIENCE = "urn:lienthong:fhir:lienthong"


def node_key(world: World) -> ECKey:
    """The node's active signing key, straight from the database."""
    from lienthong.storage import schema

    sk = schema.signing_key
    with world.node.db.engine.connect() as conn:
        row = conn.execute(select(sk.c.private_jwk).where(sk.c.retired.is_(None))).one()
    return ECKey.import_key(json.loads(row[0]))


def claims_for(world: World, username: str = "bs.an", **overrides: Any) -> JSON:
    user = world.node.accounts.get_user(username)
    now = int(time.time())
    body = {"iss": ISSUER, "aud": AUDIENCE, "sub": user.user_id, "iat": now, "exp": now + 600,
            "jti": secrets.token_hex(16), "kind": "user", "username": username, "facility": user.facility,
            "scope": "user/*.cruds"}
    body.update(overrides)
    return {k: v for k, v in body.items() if v is not None}


def sign(key: Any, claims: JSON, alg: str = "ES256", kid: str | None = "same") -> str:
    header = {"alg": alg}
    if kid == "same" and getattr(key, "kid", None):
        header["kid"] = key.kid
    elif kid not in (None, "same"):
        header["kid"] = kid
    return jwt.encode(header, claims, key, algorithms=[alg])


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unauthorized(r: Any) -> JSON:
    body = assert_outcome(r, 401, "login")
    assert r.headers["www-authenticate"].startswith("Bearer")
    return body


# ---- 401 --------------------------------------------------------------------------------------------
PROTECTED = [("GET", "/fhir/Patient"), ("GET", "/fhir/Patient/p1a"), ("GET", "/fhir/Patient/p1a/_history/1"),
             ("POST", "/fhir/Patient"), ("PUT", "/fhir/Patient/p1a"), ("DELETE", "/fhir/Patient/p1a"),
             ("POST", "/fhir"), ("GET", "/fhir/_history"), ("GET", "/fhir/Patient/p1a/$everything"),
             ("GET", "/fhir/$export"), ("GET", "/fhir/$audit"), ("GET", "/fhir/Patient/p1a/$access-report"),
             ("POST", "/fhir/Patient/p1a/$break-glass"), ("POST", "/auth/logout")]


@pytest.mark.parametrize(("method", "url"), PROTECTED)
def test_no_token_is_401(world: World, method: str, url: str) -> None:
    r = world.http.request(method, url, json={"resourceType": "Patient", "id": "p1a"})
    unauthorized(r)


BAD_HEADERS = ["Bearer", "Bearer ", "Bearer abc", "Bearer a.b.c", "Basic YnMuYW46TWF0LWtoYXUtMjAyNSE=",
               "Token abc", "bearer.eyJ"]


@pytest.mark.parametrize("header", BAD_HEADERS)
def test_malformed_authorization_is_401(world: World, header: str) -> None:
    unauthorized(world.http.get("/fhir/Patient", headers={"Authorization": header}))


def test_tampered_real_token_is_401(world: World) -> None:
    token = world.actors["clinician"].token["access_token"]
    head, payload, sig = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    claims["facility"] = "24002"
    claims["scope"] = "user/*.cruds"
    forged = f"{head}.{b64(json.dumps(claims).encode())}.{sig}"
    unauthorized(world.http.get("/fhir/Patient", headers=bearer(forged)))
    flipped = sig[:10] + ("A" if sig[10] != "A" else "B") + sig[11:]
    unauthorized(world.http.get("/fhir/Patient", headers=bearer(f"{head}.{payload}.{flipped}")))


def test_crafted_token_control_is_accepted(world: World) -> None:
    """The crafting below is right: with the node key and correct claims the token works."""
    token = sign(node_key(world), claims_for(world))
    assert world.http.get("/fhir/Patient/p1a", headers=bearer(token)).status_code == 200


NONE_HEADER = b'{"alg":"none","typ":"JWT"}'
FORGERIES = {
    "fresh-key-same-kid": lambda w: sign(ECKey.generate_key("P-256", private=True), claims_for(w),
                                         kid=node_key(w).kid),
    "fresh-key-no-kid": lambda w: sign(ECKey.generate_key("P-256", private=True), claims_for(w), kid=None),
    "alg-none": lambda w: f"{b64(NONE_HEADER)}.{b64(json.dumps(claims_for(w)).encode())}.",
    "hs256-with-public-key": lambda w: sign(OctKey.import_key(json.dumps(node_key(w).as_dict(private=False))
                                                              .encode()), claims_for(w), "HS256",
                                            kid=node_key(w).kid),
    "expired": lambda w: sign(node_key(w), claims_for(w, iat=int(time.time()) - 7200,
                                                      exp=int(time.time()) - 3600)),
    "expired-just-now": lambda w: sign(node_key(w), claims_for(w, exp=int(time.time()) - 1)),
    "wrong-audience": lambda w: sign(node_key(w), claims_for(w, aud="urn:lienthong:fhir:so-y-te-khac")),
    "no-audience": lambda w: sign(node_key(w), claims_for(w, aud=None)),
    "wrong-issuer": lambda w: sign(node_key(w), claims_for(w, iss="urn:lienthong:node:evil")),
    "no-expiry": lambda w: sign(node_key(w), claims_for(w, exp=None)),
    "no-jti": lambda w: sign(node_key(w), claims_for(w, jti=None)),
    "unknown-subject": lambda w: sign(node_key(w), claims_for(w, sub="00000000-0000-0000-0000-000000000000")),
    "unknown-client": lambda w: sign(node_key(w), claims_for(w, kind="client", sub="no-such-client")),
}


@pytest.mark.parametrize("forgery", sorted(FORGERIES))
def test_forged_or_invalid_tokens_are_401(world: World, forgery: str) -> None:
    token = FORGERIES[forgery](world)
    for url in ("/fhir/Patient/p1a", "/fhir/Observation"):
        unauthorized(world.http.get(url, headers=bearer(token)))


def test_token_from_another_node_is_401(world: World) -> None:
    """Same database and signing key, another node name: its tokens are for another audience."""
    other = make_app(world.url, node_name="tinh-khac")
    try:
        token = login(other, "bs.an")["access_token"]
        with TestClient(other) as http:
            assert http.get("/fhir/Patient/p1a", headers=bearer(token)).status_code == 200
        unauthorized(world.http.get("/fhir/Patient/p1a", headers=bearer(token)))
    finally:
        close_app(other)


def test_revoked_through_the_revocation_endpoint_is_401(world: World) -> None:
    token = login(world.app, "bs.an")["access_token"]
    assert world.http.get("/fhir/Patient/p1a", headers=bearer(token)).status_code == 200
    r = TestClient(world.app, client=new_address()).post("/auth/revoke", data={"token": token})
    assert r.status_code == 200
    unauthorized(world.http.get("/fhir/Patient/p1a", headers=bearer(token)))
    unauthorized(world.http.post("/auth/logout", headers=bearer(token)))
    # other sessions of the same user are untouched; garbage revocations answer 200 (RFC 7009)
    assert world.http.get("/fhir/Patient/p1a", headers=world.h("clinician")).status_code == 200
    assert TestClient(world.app).post("/auth/revoke", data={"token": "garbage"}).status_code == 200


def test_client_token_can_be_revoked(world: World) -> None:
    a = world.actors["system-readonly"]
    token = client_login(world.app, a.login, a.secret)["access_token"]
    assert world.http.get("/fhir/Patient", headers=bearer(token)).status_code == 200
    assert TestClient(world.app).post("/auth/revoke", data={"token": token}).status_code == 200
    unauthorized(world.http.get("/fhir/Patient", headers=bearer(token)))


def test_a_cached_token_revoked_by_another_worker_is_refused_after_the_refresh(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """A second app on the same database plays another uvicorn worker: its revocation reaches this
    worker's token cache within REVOCATION_REFRESH_S, also on the cache-only (event loop) path."""
    from lienthong.security import tokens

    monkeypatch.setattr(tokens, "REVOCATION_REFRESH_S", 0.2)
    a = world.actors["system-readonly"]
    token = client_login(world.app, a.login, a.secret)["access_token"]
    for _ in range(3):  # verified once, then served from the cache
        assert world.http.get("/fhir/Patient/p1a", headers=bearer(token)).status_code == 200
    other = make_app(world.url)
    try:
        assert TestClient(other).post("/auth/revoke", data={"token": token}).status_code == 200
    finally:
        close_app(other)
    time.sleep(0.3)
    unauthorized(world.http.get("/fhir/Patient/p1a", headers=bearer(token)))
    unauthorized(world.http.get("/fhir/Patient/p1a", headers=bearer(token)))


def test_the_token_cache_holds_no_bearer_token(world: World) -> None:
    token = login(world.app, "bs.an")["access_token"]
    assert world.http.get("/fhir/Patient/p1a", headers=bearer(token)).status_code == 200
    cache = world.node.auth.tokens._cache
    assert cache and token not in cache and all(isinstance(k, bytes) and len(k) == 32 for k in cache)


def test_logout_revokes_the_token(world: World) -> None:
    token = login(world.app, "bs.an")["access_token"]
    assert world.http.get("/fhir/Patient/p1a", headers=bearer(token)).status_code == 200
    assert world.http.post("/auth/logout", headers=bearer(token)).status_code == 204
    unauthorized(world.http.get("/fhir/Patient/p1a", headers=bearer(token)))
    unauthorized(world.http.post("/auth/logout", headers=bearer(token)))


def test_revocation_reaches_the_other_workers(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """A second app on the same database stands for another uvicorn worker."""
    from lienthong.security import tokens

    worker = make_app(world.url)
    try:
        token = login(world.app, "bs.an")["access_token"]
        with TestClient(worker) as http:
            assert http.get("/fhir/Patient/p1a", headers=bearer(token)).status_code == 200  # now cached there
            world.http.post("/auth/logout", headers=bearer(token))
            monkeypatch.setattr(tokens, "REVOCATION_REFRESH_S", 0.0)  # instead of waiting 2 s
            unauthorized(http.get("/fhir/Patient/p1a", headers=bearer(token)))
    finally:
        close_app(worker)


def test_disabled_user_and_client_lose_access(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    from lienthong.security import authn
    from lienthong.storage import schema

    add_user(world.app, "bs.tamnghi", "clinician", FAC1, "prac-an")
    token = login(world.app, "bs.tamnghi")["access_token"]
    cid, secret = add_client(world.app, "Tam ngung", FAC1, "system/*.rs")
    ctoken = client_login(world.app, cid, secret)["access_token"]
    world.node.accounts.set_disabled("bs.tamnghi", True)
    with world.node.db.engine.begin() as conn:
        conn.execute(update(schema.app_client).where(schema.app_client.c.client_id == cid).values(disabled=True))
    monkeypatch.setattr(authn, "USER_CACHE_S", 0.0)
    unauthorized(world.http.get("/fhir/Patient", headers=bearer(token)))
    unauthorized(world.http.get("/fhir/Patient", headers=bearer(ctoken)))
    r, _ = authorize(world.app, "bs.tamnghi", PASSWORD)
    assert r.status_code == 401 and "location" not in r.headers
    r = client_token(world.app, cid, secret)
    assert r.status_code == 401 and r.json()["error"] == "invalid_client"


# ---- 403 and 404: the refusal rule in one place ---------------------------------------------------------
def test_refusal_rule(world: World) -> None:
    obs = {"resourceType": "Observation", "status": "final", "code": {"text": "x"},
           "subject": {"reference": "Patient/p1a"}}
    rs_token = login(world.app, "bs.an", scope="user/*.rs")["access_token"]
    # 403: the scope lacks the interaction
    assert_outcome(world.http.post("/fhir/Observation", json=obs, headers=bearer(rs_token)), 403, "forbidden")
    assert_outcome(world.http.post("/fhir/Observation", json=obs, headers=world.h("system-readonly")), 403)
    # 403: the role lacks it (facility-admin reads only; nurses do not delete; auditors read no patients)
    assert_outcome(world.http.post("/fhir/Observation", json=obs, headers=world.h("facility-admin")), 403)
    assert_outcome(world.http.delete("/fhir/Observation/obs-1a", headers=world.h("nurse")), 403)
    assert_outcome(world.http.get("/fhir/Patient/p1a", headers=world.h("auditor")), 403)
    # 404: exists but at another facility / outside the care team, exactly like a missing id
    for who, rid in (("clinician", "p2a"), ("system-facility", "p2a"), ("clinician", "p1c"), ("nurse", "p1b")):
        assert_outcome(world.http.get(f"/fhir/Patient/{rid}", headers=world.h(who)), 404, "not-found")
    missing = world.http.get("/fhir/Patient/khong-co", headers=world.h("clinician"))
    hidden = world.http.get("/fhir/Patient/p2a", headers=world.h("clinician"))
    assert missing.status_code == hidden.status_code == 404
    assert missing.json()["issue"][0]["code"] == hidden.json()["issue"][0]["code"]


# ---- scopes -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("username", "asked", "granted"), [
    ("bs.an", None, "user/*.cruds"),
    ("bs.an", "openid user/Observation.rs", "user/Observation.rs"),
    ("dd.binh", "user/*.cruds", "user/*.crus"),
    ("qt.coso", "user/*.cruds", "user/*.rs"),
    ("kt.vien", None, "user/AuditEvent.rs"),
    ("qt.tinh", None, "user/Organization.rs user/Endpoint.rs"),
])
def test_user_scopes_are_narrowed_to_the_role(world: World, username: str, asked: str | None,
                                              granted: str) -> None:
    token = login(world.app, username, scope=asked)
    assert token["scope"] == granted
    assert token["token_type"] == "Bearer" and 3000 < token["expires_in"] <= 3600
    claims = json.loads(base64.urlsafe_b64decode(token["access_token"].split(".")[1] + "=="))
    assert claims["scope"] == granted and claims["aud"] == AUDIENCE and claims["iss"] == ISSUER


def test_narrowed_token_is_enforced(world: World) -> None:
    token = login(world.app, "bs.an", scope="user/Observation.rs")["access_token"]
    assert world.http.get("/fhir/Observation/obs-1a", headers=bearer(token)).status_code == 200
    assert_outcome(world.http.get("/fhir/Patient/p1a", headers=bearer(token)), 403)
    assert_outcome(world.http.get("/fhir/Condition", headers=bearer(token)), 403)


@pytest.mark.parametrize(("asked", "status", "granted"), [
    (None, 200, "system/*.rs"), ("system/*.cruds", 200, "system/*.rs"), ("system/Patient.r", 200, "system/Patient.r"),
    ("user/*.rs", 400, None), ("system/*.c", 400, None), ("not a scope/", 400, None), ("system/*.sr", 400, None),
])
def test_client_scopes(world: World, asked: str | None, status: int, granted: str | None) -> None:
    a = world.actors["system-readonly"]
    r = client_token(world.app, a.login, a.secret, asked)
    assert r.status_code == status, r.text
    assert r.headers["cache-control"] == "no-store"
    if granted:
        assert r.json()["scope"] == granted
    else:
        assert "error" in r.json()


def test_client_credentials_failures(world: World) -> None:
    a = world.actors["system-readonly"]
    for cid, secret in ((a.login, "wrong"), ("no-such-client", a.secret), (a.login, "")):
        r = client_token(world.app, cid, secret)
        assert r.status_code == 401 and r.json()["error"] == "invalid_client", r.text
    basic = base64.b64encode(f"{a.login}:{a.secret}".encode()).decode()
    r = TestClient(world.app, client=new_address()).post(
        "/auth/token", data={"grant_type": "client_credentials"}, headers={"Authorization": f"Basic {basic}"})
    assert r.status_code == 200 and r.json()["scope"] == "system/*.rs"
    r = TestClient(world.app, client=new_address()).post("/auth/token", data={"grant_type": "password",
                                                                               "username": "bs.an",
                                                                               "password": PASSWORD})
    assert r.status_code == 400 and r.json()["error"] == "unsupported_grant_type"


# ---- authorization code + PKCE ------------------------------------------------------------------------
def test_code_is_single_use_and_bound_to_verifier_client_and_redirect(world: World) -> None:
    r, verifier = authorize(world.app, "bs.an", PASSWORD)
    assert r.status_code == 302
    code = code_of(r)
    assert urlsplit(r.headers["location"]).path == "/ui/callback" and "state=st-42" in r.headers["location"]
    assert exchange(world.app, code, verifier + "x").status_code == 400  # wrong verifier...
    assert exchange(world.app, code, verifier).status_code == 400  # ...burns the code
    for change in ({"redirect_uri": "/ui/other"}, {"client_id": "other-app"}):
        r, verifier = authorize(world.app, "bs.an", PASSWORD)
        assert exchange(world.app, code_of(r), verifier, **change).status_code == 400, change
    r, verifier = authorize(world.app, "bs.an", PASSWORD)
    code = code_of(r)
    first = exchange(world.app, code, verifier)
    assert first.status_code == 200
    assert first.headers["cache-control"] == "no-store" and first.headers.get("pragma") == "no-cache"
    assert exchange(world.app, code, verifier).status_code == 400  # replay
    assert exchange(world.app, "made-up-code", verifier).status_code == 400


def test_expired_code_is_refused(world: World) -> None:
    from lienthong.storage import schema

    r, verifier = authorize(world.app, "bs.an", PASSWORD)
    code = code_of(r)
    with world.node.db.engine.begin() as conn:
        conn.execute(update(schema.auth_code).where(schema.auth_code.c.code == code).values(expires=1))
    assert exchange(world.app, code, verifier).status_code == 400


@pytest.mark.parametrize("change", [
    {"code_challenge_method": "plain"}, {"code_challenge": ""}, {"code_challenge": "short"},
    {"client_id": "evil-app"}, {"response_type": "token"}, {"redirect_uri": "https://evil.example/cb"},
    {"redirect_uri": "//evil.example/cb"}, {"redirect_uri": "ui/cb"}, {"redirect_uri": ""},
])
def test_authorize_rejects_bad_requests(world: World, change: dict[str, str]) -> None:
    _, challenge = pkce_pair()
    params = {**authorize_params(challenge), **change}
    http = TestClient(world.app, client=new_address())
    assert http.get("/auth/authorize", params=params).status_code == 400
    r = http.post("/auth/authorize", data={**params, "username": "bs.an", "password": PASSWORD},
                  follow_redirects=False)
    assert r.status_code == 400 and "location" not in r.headers


@pytest.mark.parametrize("redirect", ["/\\evil.example/cb", "/\t/evil.example", "/%2F/evil.example"])
def test_redirect_stays_on_this_server(world: World, redirect: str) -> None:
    _, challenge = pkce_pair()
    r = TestClient(world.app, client=new_address()).post(
        "/auth/authorize", data={**authorize_params(challenge, redirect_uri=redirect), "username": "bs.an",
                                 "password": PASSWORD}, follow_redirects=False)
    if r.status_code == 302:
        location = r.headers["location"]
        assert "\\" not in location and "\t" not in location and not location.startswith("//")
        assert urlsplit(urljoin("https://node.example/auth/authorize", location)).netloc == "node.example"
    else:
        assert r.status_code == 400


def test_login_form_is_safe(world: World) -> None:
    _, challenge = pkce_pair()
    params = authorize_params(challenge)
    params["state"] = '"><script>alert(1)</script>'
    r = TestClient(world.app, client=new_address()).get("/auth/authorize", params=params)
    assert r.status_code == 200 and "<script>alert(1)" not in r.text
    assert r.headers["x-frame-options"] == "DENY" and "no-store" in r.headers["cache-control"]
    wrong, _ = authorize(world.app, "qt.tinh", "Sai-mat-khau-99")
    unknown, _ = authorize(world.app, "khong.ton.tai", "Sai-mat-khau-99")
    assert wrong.status_code == unknown.status_code == 401
    assert "wrong username or password" in wrong.text and "wrong username or password" in unknown.text


# ---- passwords --------------------------------------------------------------------------------------
@pytest.mark.parametrize("password", ["Ngan-1a!", "khongcochuhoavaso", "CHUHOA-KHONGSO", "1234567890123",
                                      "bs.weak-Aa1-dai-hon"])
def test_password_policy(world: World, password: str) -> None:
    from lienthong.security.accounts import AccountError

    with pytest.raises(AccountError, match="password"):
        world.node.accounts.add_user("bs.weak", password, "clinician", FAC1)
    assert world.node.accounts.get_user("bs.weak") is None


def test_lockout_after_five_failures_over_http(world: World) -> None:
    from lienthong.security import passwords

    add_user(world.app, "bs.khoa", "clinician", FAC1, "prac-an")
    address = new_address()
    for _ in range(passwords.MAX_FAILURES):
        r, _ = authorize(world.app, "bs.khoa", "Sai-mat-khau-2", address=address)
        assert r.status_code == 401 and "location" not in r.headers
    r, _ = authorize(world.app, "bs.khoa", PASSWORD, address=address)  # the 6th, with the right password
    assert r.status_code == 401 and "locked" in r.text and "location" not in r.headers
    failures = [e for e in wait_for_events(world.audit, lambda evs: len(evs) > passwords.MAX_FAILURES,
                                           actor="bs.khoa")
                if any(c["code"] == "login-failed" for c in e["subtype"])]
    assert len(failures) == passwords.MAX_FAILURES + 1


def test_lockout_ends_after_the_lockout_period(world: World) -> None:
    from lienthong.fhir.datetimes import now_us
    from lienthong.security import passwords
    from lienthong.security.accounts import LoginFailed

    add_user(world.app, "bs.khoa2", "clinician", FAC1, "prac-an")
    accounts = world.node.accounts
    t0 = now_us()
    for i in range(passwords.MAX_FAILURES):
        with pytest.raises(LoginFailed):
            accounts.authenticate("bs.khoa2", "Sai-mat-khau-3", now=t0 + i)
    with pytest.raises(LoginFailed, match="locked"):
        accounts.authenticate("bs.khoa2", PASSWORD, now=t0 + 1_000_000)
    with pytest.raises(LoginFailed, match="locked"):
        accounts.authenticate("bs.khoa2", PASSWORD, now=t0 + passwords.LOCKOUT_US - 1_000_000)
    assert accounts.authenticate("bs.khoa2", PASSWORD, now=t0 + passwords.LOCKOUT_US + 1_000_000)
    assert accounts.authenticate("bs.khoa2", PASSWORD).username == "bs.khoa2"  # and the lock is gone


def test_failed_logins_are_refused_and_audited(world: World) -> None:
    add_user(world.app, "bs.khoa3", "clinician", FAC1, "prac-an")
    address = new_address()
    for _ in range(4):
        r, _ = authorize(world.app, "bs.khoa3", "Sai-mat-khau-1", address=address)
        assert r.status_code == 401 and "location" not in r.headers and "wrong username or password" in r.text
    assert authorize(world.app, "bs.khoa3", PASSWORD, address=address)[0].status_code == 302
    failures = [e for e in wait_for_events(world.audit, lambda evs: len(evs) >= 4, actor="bs.khoa3")
                if any(c["code"] == "login-failed" for c in e["subtype"])]
    assert len(failures) == 4 and all(e["outcome"] == "4" for e in failures)


# ---- rate limiting ------------------------------------------------------------------------------------
def test_token_endpoint_is_rate_limited_per_address(world: World) -> None:
    http = TestClient(world.app, client=new_address())
    for i in range(20):
        r = http.post("/auth/token", data={"grant_type": "nothing"})
        assert r.status_code == 400, (i, r.status_code)
    r = http.post("/auth/token", data={"grant_type": "nothing"})
    assert_outcome(r, 429, "throttled")
    assert r.headers["retry-after"] == "60"
    a = world.actors["system-readonly"]
    r = http.post("/auth/token", data={"grant_type": "client_credentials", "client_id": a.login,
                                       "client_secret": a.secret})
    assert r.status_code == 429  # even with the right secret
    _, challenge = pkce_pair()
    r = http.post("/auth/authorize", data={**authorize_params(challenge), "username": "bs.an",
                                           "password": PASSWORD}, follow_redirects=False)
    assert r.status_code == 429  # the login form shares the budget
    assert TestClient(world.app, client=new_address()).post("/auth/token", data={}).status_code == 400


def test_login_form_posts_count_towards_the_limit(world: World) -> None:
    http = TestClient(world.app, client=new_address())
    _, challenge = pkce_pair()
    form = {**authorize_params(challenge, redirect_uri="https://bad"), "username": "x", "password": "y"}
    statuses = [http.post("/auth/authorize", data=form, follow_redirects=False).status_code for _ in range(21)]
    assert statuses[:20] == [400] * 20 and statuses[20] == 429


def test_rate_limit_cannot_be_reset_by_many_addresses() -> None:
    from lienthong.api.auth import RateLimiter
    from lienthong.fhir.outcome import FhirError

    limiter = RateLimiter(20)
    for _ in range(20):
        limiter.check("203.0.113.7")
    with pytest.raises(FhirError):
        limiter.check("203.0.113.7")
    for i in range(10_001):
        limiter.check(f"2001:db8::{i:x}")
    with pytest.raises(FhirError):
        limiter.check("203.0.113.7")


# ---- headers, CORS, discovery ---------------------------------------------------------------------------
@pytest.mark.parametrize(("method", "url", "auth"), [
    ("GET", "/fhir/metadata", None), ("GET", "/fhir/Patient", None), ("GET", "/fhir/Patient/p1a", "clinician"),
    ("GET", "/fhir/Patient/p2a", "clinician"), ("POST", "/auth/token", None), ("GET", "/auth/jwks", None),
    ("GET", "/fhir/.well-known/smart-configuration", None), ("GET", "/nowhere", None),
    ("GET", "/fhir/Patient?_count=1", "records-officer"),
])
def test_security_headers(world: World, method: str, url: str, auth: str | None) -> None:
    r = world.http.request(method, url, headers=world.h(auth) if auth else {})
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["x-frame-options"] == "DENY"
    assert "no-store" in r.headers["cache-control"]


def test_no_cors_for_arbitrary_origins_by_default(world: World) -> None:
    origin = {"Origin": "https://evil.example"}
    for r in (world.http.get("/fhir/metadata", headers=origin),
              world.http.get("/fhir/Patient/p1a", headers={**origin, **world.h("clinician")}),
              world.http.options("/fhir/Patient", headers={**origin, "Access-Control-Request-Method": "GET",
                                                           "Access-Control-Request-Headers": "authorization"}),
              world.http.post("/auth/token", headers=origin, data={"grant_type": "x"})):
        assert "access-control-allow-origin" not in r.headers
        assert "access-control-allow-credentials" not in r.headers


def test_cors_only_for_configured_origins(world: World) -> None:
    app = make_app(world.url, cors_origins=("https://emr.benhvien.vn",))
    try:
        with TestClient(app) as http:
            ok = http.get("/fhir/metadata", headers={"Origin": "https://emr.benhvien.vn"})
            assert ok.headers["access-control-allow-origin"] == "https://emr.benhvien.vn"
            assert ok.headers["x-frame-options"] == "DENY"  # security headers on CORS answers too
            pre = http.options("/fhir/Patient", headers={"Origin": "https://emr.benhvien.vn",
                                                         "Access-Control-Request-Method": "GET"})
            assert pre.status_code == 200 and pre.headers["cache-control"] == "no-store"
            bad = http.get("/fhir/metadata", headers={"Origin": "https://evil.example"})
            assert "access-control-allow-origin" not in bad.headers
    finally:
        close_app(app)


def test_discovery_documents(world: World) -> None:
    conf = world.http.get("/fhir/.well-known/smart-configuration").json()
    assert conf["code_challenge_methods_supported"] == ["S256"]
    assert conf["token_endpoint"].endswith("/auth/token") and conf["issuer"] == ISSUER
    keys = world.http.get("/auth/jwks").json()["keys"]
    assert keys and all("d" not in k and k["kty"] == "EC" for k in keys)
    kid = json.loads(base64.urlsafe_b64decode(world.actors["clinician"].token["access_token"].split(".")[0]
                                              + "=="))["kid"]
    assert kid in {k["kid"] for k in keys}


# ---- key rotation -------------------------------------------------------------------------------------
def test_rotation_keeps_old_tokens_and_signs_new_ones_with_the_new_key(secure_app: Any) -> None:
    cid, secret = add_client(secure_app, "HIS xoay khoa", FAC1, "system/*.rs")
    old = client_login(secure_app, cid, secret)["access_token"]
    kid = secure_app.state.node.auth.tokens.rotate()
    new = client_login(secure_app, cid, secret)["access_token"]
    with TestClient(secure_app) as http:
        for token in (old, new):
            assert http.get("/fhir/Patient", headers=bearer(token)).status_code == 200
        assert {k["kid"] for k in http.get("/auth/jwks").json()["keys"]} >= {kid, _kid(old)}
    assert _kid(new) == kid != _kid(old)


def _kid(token: str) -> str:
    kid: str = json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))["kid"]
    return kid


def test_running_node_follows_a_rotation_done_by_the_cli(secure_app: Any, db_url: str,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from lienthong.cli.main import app as cli
    from lienthong.security import tokens

    monkeypatch.setattr(tokens, "KEY_REFRESH_S", 0.0, raising=False)  # instead of waiting for the refresh

    cid, secret = add_client(secure_app, "HIS xoay khoa cli", FAC1, "system/*.rs")
    before = _kid(client_login(secure_app, cid, secret)["access_token"])
    result = CliRunner().invoke(cli, ["keys", "rotate", "--db", db_url])
    assert result.exit_code == 0, result.output
    time.sleep(0.1)
    after = _kid(client_login(secure_app, cid, secret)["access_token"])
    assert after != before
