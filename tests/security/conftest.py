"""Fixtures for the security suite: a secure node, accounts, real OAuth tokens, a two-facility dataset.

Every fixture runs on SQLite and on a real PostgreSQL (the backends of the root `db_url`
fixture). Argon2 makes each password check cost a noticeable fraction of a second, so the
seeded world (accounts, tokens, data) is built once per backend (`world`, shared by the
modules; tests that add data record it in the oracle with `World.track`), while tests that
need a pristine database use the function-scoped `db_url`.

Tokens are always obtained through the real endpoints: authorization code with PKCE for
users (POST /auth/authorize, then /auth/token) and client credentials for systems. The
token endpoints are rate-limited per address (20/min), so each login uses a fresh client
address.

The leak oracle: the seed records which patient each resource belongs to
(`World.owner`, None for resources outside the Patient compartment such as Practitioner
or Medication) and each principal's visible patients; `World.allowed(name)` is the set of
Type/id the principal may see.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import itertools
import json
import os
import secrets
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from starlette.testclient import TestClient

from conftest import BACKENDS

warnings.filterwarnings("ignore", category=DeprecationWarning)

JSON = dict[str, Any]
Key = tuple[str, str]

FAC1, FAC2 = "24001", "24002"
PASSWORD = "Mat-khau-2025!"  # meets the policy and contains none of the usernames below
WEB_CLIENT = "lienthong-web"
REDIRECT = "/ui/callback"
BTG_REASON = "Cấp cứu: bệnh nhân bất tỉnh, cần xem tiền sử dị ứng"

_addresses = itertools.count(1)
_databases = itertools.count()


# ---- small helpers -------------------------------------------------------------------------
def new_address() -> tuple[str, int]:
    """A client address never used before (the OAuth endpoints rate-limit per address)."""
    n = next(_addresses)
    return (f"10.{n // 65536 % 256}.{n // 256 % 256}.{n % 256}", 40000)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def pkce_pair() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    return verifier, challenge


def authorize_params(challenge: str, scope: str | None = None, redirect_uri: str = REDIRECT) -> dict[str, str]:
    params = {"response_type": "code", "client_id": WEB_CLIENT, "redirect_uri": redirect_uri, "state": "st-42",
              "code_challenge": challenge, "code_challenge_method": "S256"}
    if scope is not None:
        params["scope"] = scope
    return params


def authorize(app: Any, username: str, password: str, scope: str | None = None,
              address: tuple[str, int] | None = None) -> tuple[Any, str]:
    """POST the login form; returns (response, code_verifier). 302 with ?code= on success."""
    verifier, challenge = pkce_pair()
    http = TestClient(app, client=address or new_address())
    r = http.post("/auth/authorize", data={**authorize_params(challenge, scope), "username": username,
                                           "password": password}, follow_redirects=False)
    return r, verifier


def code_of(response: Any) -> str:
    return parse_qs(urlsplit(response.headers["location"]).query)["code"][0]


def exchange(app: Any, code: str, verifier: str, redirect_uri: str = REDIRECT, client_id: str = WEB_CLIENT) -> Any:
    http = TestClient(app, client=new_address())
    return http.post("/auth/token", data={"grant_type": "authorization_code", "code": code, "code_verifier": verifier,
                                          "redirect_uri": redirect_uri, "client_id": client_id})


def login(app: Any, username: str, password: str = PASSWORD, scope: str | None = None) -> JSON:
    """Authorization code + PKCE, the way the web UI signs a user in; returns the token response."""
    r, verifier = authorize(app, username, password, scope)
    assert r.status_code == 302, f"login of {username} refused: {r.status_code} {r.text[:300]}"
    r = exchange(app, code_of(r), verifier)
    assert r.status_code == 200, r.text
    token: JSON = r.json()
    return token


def client_token(app: Any, client_id: str, secret: str, scope: str | None = None) -> Any:
    http = TestClient(app, client=new_address())
    data = {"grant_type": "client_credentials", "client_id": client_id, "client_secret": secret}
    if scope is not None:
        data["scope"] = scope
    return http.post("/auth/token", data=data)


def client_login(app: Any, client_id: str, secret: str, scope: str | None = None) -> JSON:
    r = client_token(app, client_id, secret, scope)
    assert r.status_code == 200, r.text
    token: JSON = r.json()
    return token


def assert_outcome(r: Any, status: int, code: str | None = None) -> JSON:
    """The response has `status` and an OperationOutcome body (every refusal must)."""
    assert r.status_code == status, f"expected {status}, got {r.status_code}: {r.text[:500]}"
    assert r.headers["content-type"].startswith("application/fhir+json"), r.headers
    body: JSON = r.json()
    assert body["resourceType"] == "OperationOutcome", body
    assert body.get("issue"), body
    if code is not None:
        assert any(i.get("code") == code for i in body["issue"]), body
    return body


def keys_of(bundle: JSON) -> list[Key]:
    """Type/id of every resource in a Bundle (OperationOutcome entries aside)."""
    out = []
    for e in bundle.get("entry", []):
        res = e.get("resource")
        if isinstance(res, dict) and res.get("resourceType") != "OperationOutcome" and "id" in res:
            out.append((res["resourceType"], res["id"]))
    return out


def window_excluding_now(hours_ahead: int = 2) -> dict[str, str]:
    """A daily one-hour window that starts `hours_ahead` hours from now (Vietnam time): now is outside."""
    local = datetime.now(UTC) + timedelta(hours=7)
    start = (local.hour + hours_ahead) % 24
    return {"days": "all", "start": f"{start:02d}:00", "end": f"{(start + 1) % 24:02d}:00"}


def window_including_now() -> dict[str, str]:
    local = datetime.now(UTC) + timedelta(hours=7)
    return {"days": "all", "start": f"{(local.hour - 2) % 24:02d}:00", "end": f"{(local.hour + 3) % 24:02d}:00"}


def make_app(url: str, node_name: str = "lienthong", **settings: Any) -> Any:
    from lienthong.api.app import ApiSettings
    from lienthong.node import create_app

    return create_app(url, ApiSettings(node_name=node_name, **settings))


def close_app(app: Any) -> None:
    node = app.state.node
    node.close()
    node.db.engine.dispose()


def audit_of(app: Any) -> Any:
    """The node's AuditTrail."""
    return app.state.node.service.guard.audit


def wait_for_events(audit: Any, done: Any, timeout: float = 10.0, **filters: Any) -> list[JSON]:
    """`audit.events(**filters)` once `done(events)` holds (or the timeout passes).

    An HTTP request answers only once its records are committed, but records of in-process callers
    are only queued, so a test that needs such a record polls.
    """
    deadline = time.monotonic() + timeout
    while True:
        events: list[JSON] = audit.events(**filters)
        if done(events) or time.monotonic() > deadline:
            return events
        time.sleep(0.05)


# ---- database fixtures ----------------------------------------------------------------------
def _new_database(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A migrated, empty database on the backend `request.param` (same PostgreSQL template as `db_url`)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path_factory.mktemp('security') / 'lienthong.db'}"
    server = request.getfixturevalue("pg_server")
    url: str = server.create_database(f"sec{next(_databases)}_{os.getpid()}", template="lienthong_template")
    return url


@pytest.fixture(scope="session", params=BACKENDS)
def shared_db_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Like the root `db_url` (same backends) but shared by the seeded world."""
    return _new_database(request, tmp_path_factory)


@pytest.fixture(scope="module", params=BACKENDS)
def module_db_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Like the root `db_url` (same backends) but shared by one module."""
    return _new_database(request, tmp_path_factory)


@pytest.fixture
def secure_app(db_url: str) -> Iterator[Any]:
    """A fresh secure node on the function-scoped `db_url` (both backends)."""
    app = make_app(db_url)
    yield app
    close_app(app)


# ---- the seeded world -------------------------------------------------------------------------
@dataclass
class Actor:
    """A principal of the matrix: who it is, how it signs in, and which patients it may see."""

    name: str
    kind: str  # user | client
    login: str  # username or client_id
    secret: str
    role: str | None
    facility: str | None
    patients: frozenset[str] | None  # visible patient ids; None: every patient
    refused: bool = False  # the role may not read clinical data at all (403)
    facility_wide: bool = False  # sees every patient registered at its facility
    headers: dict[str, str] = field(default_factory=dict)
    token: JSON = field(default_factory=dict)


@dataclass
class World:
    url: str
    app: Any
    http: TestClient
    actors: dict[str, Actor]
    owner: dict[Key, str | None]  # resource -> its patient (None: outside the Patient compartment)
    facility_of: dict[str, str]  # patient -> facility
    deleted: set[Key] = field(default_factory=set)

    @property
    def node(self) -> Any:
        return self.app.state.node

    @property
    def audit(self) -> Any:
        return audit_of(self.app)

    def h(self, actor: str) -> dict[str, str]:
        return self.actors[actor].headers

    def may_see(self, actor: str, key: Key) -> bool:
        a = self.actors[actor]
        if a.refused:
            return False
        patient = self.owner[key]
        return patient is None or a.patients is None or patient in a.patients

    def allowed(self, actor: str, types: set[str] | None = None, deleted: bool = False) -> set[Key]:
        """What `actor` may see (current resources; with `deleted`, also those deleted since)."""
        return {k for k in self.owner if self.may_see(actor, k) and (types is None or k[0] in types)
                and (deleted or k not in self.deleted)}

    def patients_visible(self, actor: str) -> set[str]:
        return {i for t, i in self.allowed(actor, {"Patient"})}

    def track(self, rtype: str, rid: str, patient: str | None, facility: str | None = None) -> None:
        """Record a resource a test created, so that the oracle stays exact."""
        self.owner[(rtype, rid)] = patient
        if rtype == "Patient" and facility:
            self.facility_of[rid] = facility
            for a in self.actors.values():
                if a.facility == facility and a.facility_wide and a.patients is not None:
                    a.patients = a.patients | {rid}

    def leaks(self, actor: str, keys: list[Key] | set[Key]) -> set[Key]:
        """The returned resources the actor may not see (unknown ones count as leaks)."""
        return {k for k in keys if k not in self.owner or not self.may_see(actor, k)}


def _ref(rtype: str, rid: str) -> JSON:
    return {"reference": f"{rtype}/{rid}"}


def patient_resource(rid: str, family: str, given: str, gender: str = "female") -> JSON:
    return {"resourceType": "Patient", "id": rid, "name": [{"family": family, "given": [given]}],
            "gender": gender, "birthDate": "1980-05-17"}


def encounter(rid: str, patient: str, practitioners: list[str]) -> JSON:
    enc: JSON = {"resourceType": "Encounter", "id": rid, "status": "finished",
                 "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
                 "subject": _ref("Patient", patient)}
    if practitioners:
        enc["participant"] = [{"individual": _ref("Practitioner", p)} for p in practitioners]
    return enc


def observation(rid: str, patient: str, value: float, derived_from: str | None = None,
                encounter_id: str | None = None) -> JSON:
    obs: JSON = {"resourceType": "Observation", "id": rid, "status": "final",
                 "code": {"coding": [{"system": "http://loinc.org", "code": "2339-0", "display": "Glucose"}]},
                 "subject": _ref("Patient", patient),
                 "valueQuantity": {"value": value, "unit": "mmol/L", "system": "http://unitsofmeasure.org",
                                   "code": "mmol/L"}}
    if derived_from:
        obs["derivedFrom"] = [_ref("Observation", derived_from)]
    if encounter_id:
        obs["encounter"] = _ref("Encounter", encounter_id)
    return obs


def condition(rid: str, patient: str, icd: str) -> JSON:
    return {"resourceType": "Condition", "id": rid,
            "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                                           "code": "active"}]},
            "code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10", "code": icd}]},
            "subject": _ref("Patient", patient)}


def medication(rid: str, name: str) -> JSON:
    return {"resourceType": "Medication", "id": rid, "code": {"text": name}}


def medication_request(rid: str, patient: str, med: str, requester: str) -> JSON:
    return {"resourceType": "MedicationRequest", "id": rid, "status": "active", "intent": "order",
            "medicationReference": _ref("Medication", med), "subject": _ref("Patient", patient),
            "requester": _ref("Practitioner", requester)}


def practitioner(rid: str, family: str) -> JSON:
    return {"resourceType": "Practitioner", "id": rid, "name": [{"family": family}]}


def organization(rid: str, name: str) -> JSON:
    return {"resourceType": "Organization", "id": rid, "name": name}


def put_transaction(resources: list[JSON]) -> JSON:
    return {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": f"{r['resourceType']}/{r['id']}", "resource": r,
         "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}} for r in resources]}


# Facility 24001: p1a in the care team of bs.an and dd.binh, p1b of bs.an only, p1c of nobody.
SEED_24001 = [
    organization("org-24001", "Bệnh viện Đa khoa tỉnh"),
    practitioner("prac-an", "Nguyễn"), practitioner("prac-binh", "Lê"), practitioner("prac-khanh", "Võ"),
    patient_resource("p1a", "Nguyễn", "An", "male"), patient_resource("p1b", "Lê", "Bình"),
    patient_resource("p1c", "Phạm", "Cúc"),
    encounter("enc-1a", "p1a", ["prac-an", "prac-binh"]), encounter("enc-1b", "p1b", ["prac-an"]),
    encounter("enc-1c", "p1c", []),
    observation("obs-1a", "p1a", 5.4, encounter_id="enc-1a"), observation("obs-1b", "p1b", 6.1),
    observation("obs-1c", "p1c", 7.2),
    # A cross-facility reference: derived from an Observation of a 24002 patient.
    observation("obs-1a-derived", "p1a", 5.9, derived_from="obs-2a"),
    condition("cond-1a", "p1a", "E11"), condition("cond-1c", "p1c", "I10"),
    medication("med-para", "Paracetamol 500 mg"),
    medication_request("mr-1a", "p1a", "med-para", "prac-an"),
]
# Facility 24002: p2a treated by bs.cuong; both patients are named Trần (a chained-search probe).
SEED_24002 = [
    organization("org-24002", "Trung tâm Y tế huyện"),
    practitioner("prac-cuong", "Trần"),
    patient_resource("p2a", "Trần", "Dung"), patient_resource("p2b", "Trần", "Em", "male"),
    encounter("enc-2a", "p2a", ["prac-cuong"]),
    observation("obs-2a", "p2a", 9.9, encounter_id="enc-2a"), observation("obs-2b", "p2b", 4.4),
    observation("obs-2a-derived", "p2a", 8.8, derived_from="obs-1a"),
    condition("cond-2a", "p2a", "B20"),
    # Only p2a is prescribed this one: its existence in a result tells about p2a's treatment.
    medication("med-secret", "Tenofovir/Lamivudine/Dolutegravir"),
    medication_request("mr-2a", "p2a", "med-secret", "prac-cuong"),
]
FACILITY_PATIENTS = {FAC1: {"p1a", "p1b", "p1c"}, FAC2: {"p2a", "p2b"}}
PUBLIC_TYPES = {"Organization", "Practitioner", "Medication"}


def _owner_of(resource: JSON) -> str | None:
    if resource["resourceType"] == "Patient":
        return str(resource["id"])
    if resource["resourceType"] in PUBLIC_TYPES:
        return None
    return str(resource["subject"]["reference"].split("/")[1])


# (name, kind, login, role, facility, practitioner, visible patients, refused)
USERS = [
    ("clinician", "bs.an", "clinician", FAC1, "prac-an", {"p1a", "p1b"}, False),
    ("nurse", "dd.binh", "nurse", FAC1, "prac-binh", {"p1a"}, False),
    ("records-officer", "lt.hoa", "records-officer", FAC1, None, FACILITY_PATIENTS[FAC1], False),
    ("facility-admin", "qt.coso", "facility-admin", FAC1, None, FACILITY_PATIENTS[FAC1], False),
    ("province-admin", "qt.tinh", "province-admin", None, None, set(), True),
    ("auditor", "kt.vien", "auditor", None, None, set(), True),
    ("btg-clinician", "bs.khanh", "clinician", FAC1, "prac-khanh", set(), False),
]
# (name, client name, facility, scopes, visible patients; None = all)
CLIENTS: list[tuple[str, str, str | None, str, set[str] | None]] = [
    ("system-facility", "HIS 24001", FAC1, "system/*.cruds", FACILITY_PATIENTS[FAC1]),
    ("system-other", "HIS 24002", FAC2, "system/*.cruds", FACILITY_PATIENTS[FAC2]),
    ("system-global", "So Y te hub", None, "system/*.cruds", None),
    ("system-readonly", "Lab reader 24001", FAC1, "system/*.rs", FACILITY_PATIENTS[FAC1]),
]
ACTORS = [u[0] for u in USERS] + [c[0] for c in CLIENTS]


@contextlib.contextmanager
def fast_hashing() -> Iterator[None]:
    """Store new password hashes with a low argon2id work factor while the block runs.

    The hashes are still argon2id and are checked by the real `verify_password` (argon2 reads the
    cost from the hash), so logins go through the production code path; only the seconds spent
    hashing fixture accounts go away. Password policy, lockout and the CLI use the real cost.
    """
    from argon2 import PasswordHasher

    from lienthong.security import passwords

    cheap = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
    real = passwords.hash_password
    passwords.hash_password = cheap.hash  # type: ignore[assignment]
    try:
        yield
    finally:
        passwords.hash_password = real  # type: ignore[assignment]


def add_user(app: Any, username: str, role: str, facility: str | None, practitioner: str | None = None,
             window: JSON | None = None, password: str = PASSWORD) -> Any:
    with fast_hashing():
        return app.state.node.accounts.add_user(username, password, role, facility, practitioner_id=practitioner,
                                                window=window)


def add_client(app: Any, name: str, facility: str | None, scopes: str) -> tuple[str, str]:
    with fast_hashing():
        cid, secret = app.state.node.accounts.add_client(name, facility, scopes)
    return cid, secret


def build_world(url: str) -> World:
    """A secure node with the two-facility seed, every actor signed in through the OAuth endpoints."""
    app = make_app(url)
    actors: dict[str, Actor] = {}
    for name, username, role, facility, prac, visible, refused in USERS:
        add_user(app, username, role, facility, prac)
        actors[name] = Actor(name, "user", username, PASSWORD, role, facility, frozenset(visible), refused,
                             facility_wide=role in ("records-officer", "facility-admin"))
    for name, label, facility, scopes, cvisible in CLIENTS:
        cid, secret = add_client(app, label, facility, scopes)
        actors[name] = Actor(name, "client", cid, secret, None, facility,
                             None if cvisible is None else frozenset(cvisible), facility_wide=facility is not None)
    for a in actors.values():
        a.token = login(app, a.login, a.secret) if a.kind == "user" else client_login(app, a.login, a.secret)
        a.headers = bearer(a.token["access_token"])
    http = TestClient(app)
    owner: dict[Key, str | None] = {}
    for actor, seed in (("system-other", SEED_24002), ("system-facility", SEED_24001)):
        r = http.post("/fhir", json=put_transaction(seed), headers=actors[actor].headers)
        assert r.status_code == 200, r.text
        for res in seed:
            owner[(res["resourceType"], res["id"])] = _owner_of(res)
    facility_of = {p: f for f, ps in FACILITY_PATIENTS.items() for p in ps}
    return World(url, app, http, actors, owner, facility_of)


@pytest.fixture(scope="session")
def world(shared_db_url: str) -> Iterator[World]:
    w = build_world(shared_db_url)
    with w.http:
        yield w
    close_app(w.app)


# ---- flows used by several modules -------------------------------------------------------------
def run_export(app: Any, http: TestClient, headers: dict[str, str], level: str = "system",
               query: str = "") -> tuple[int, list[Key], JSON | None]:
    """Kick off $export, wait for it, download every file; returns (kick-off status, Type/id, manifest)."""
    path = "/fhir/$export" if level == "system" else "/fhir/Patient/$export"
    r = http.get(path + (f"?{query}" if query else ""), headers={**headers, "Prefer": "respond-async"})
    if r.status_code != 202:
        assert_outcome(r, r.status_code)
        return r.status_code, [], None
    job = parse_qs(urlsplit(r.headers["content-location"]).query)["_jobId"][0]
    app.state.api.exports.wait(job, 60)
    r = http.get(f"/fhir/$export-poll-status?_jobId={job}", headers=headers)
    assert r.status_code == 200, r.text
    manifest: JSON = r.json()
    keys: list[Key] = []
    for out in manifest["output"]:
        f = http.get(urlsplit(out["url"]).path, headers=headers)
        assert f.status_code == 200, f.text
        for line in f.text.splitlines():
            if line.strip():
                res = json.loads(line)
                keys.append((res["resourceType"], res["id"]))
    return 202, keys, manifest


def all_pages(http: TestClient, url: str, headers: dict[str, str], limit: int = 50) -> tuple[list[Key], list[JSON]]:
    """Follow `next` links; returns every Type/id and every page."""
    keys: list[Key] = []
    pages: list[JSON] = []
    for _ in range(limit):
        r = http.get(url, headers=headers)
        assert r.status_code == 200, r.text
        page = r.json()
        pages.append(page)
        keys += keys_of(page)
        nxt = [link["url"] for link in page.get("link", []) if link["relation"] == "next"]
        if not nxt:
            break
        parts = urlsplit(nxt[0])
        url = parts.path + (f"?{parts.query}" if parts.query else "")
    return keys, pages
