"""Signed access tokens: ES256 JWTs with expiry, audience, jti; key rotation; revocation.

Why ES256 via joserfc: small signatures over slow links and a maintained
implementation (no hand-rolled cryptography). Keys live in the node's database,
never in the repository; a rotated key keeps verifying until the tokens it
signed expire. Verified tokens are cached by their SHA-256 for their lifetime so
that a read does not pay for an ECDSA verification each time; a revocation here
takes effect at once, and the revocation list is re-read from the database every
REVOCATION_REFRESH_S for revocations made by other workers or nodes.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any

import orjson
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, KeySet
from sqlalchemy import Engine, delete, insert, select, update

from lienthong.fhir.datetimes import now_us
from lienthong.storage import schema
from lienthong.storage.engine import read_connection

ACCESS_TTL_S = 3600
REVOCATION_REFRESH_S = 2.0
KEY_REFRESH_S = 60.0


class TokenError(Exception):
    """The token is missing, malformed, forged, expired, for another audience, or revoked."""


class NeedsIO(Exception):
    """The answer needs the database (a cache is cold or due for refresh): ask again where blocking is fine.

    Why: the HTTP layer first tries to authenticate on the event loop from caches alone, which saves a
    thread-pool hop per request, and falls back to a worker thread only when this is raised."""


@dataclass(frozen=True)
class Claims:
    raw: dict[str, Any]

    @property
    def subject(self) -> str:
        return str(self.raw["sub"])

    @property
    def jti(self) -> str:
        return str(self.raw["jti"])

    @property
    def expires(self) -> int:
        return int(self.raw["exp"])


class TokenService:
    def __init__(self, engine: Engine, issuer: str, audience: str) -> None:
        self.engine = engine
        self.issuer = issuer
        self.audience = audience
        self._lock = threading.Lock()
        self._signing: ECKey | None = None
        self._keyset: KeySet | None = None
        self._cache: dict[bytes, Claims] = {}  # sha256(token) -> verified claims
        self._revoked: set[str] = set()
        self._revoked_at = 0.0
        self._loaded_at = 0.0

    # ---- keys ----------------------------------------------------------------
    def _load_keys(self) -> None:
        with self.engine.begin() as conn:
            rows = conn.execute(select(schema.signing_key.c.kid, schema.signing_key.c.private_jwk,
                                       schema.signing_key.c.public_jwk, schema.signing_key.c.retired)
                                .order_by(schema.signing_key.c.created)).all()
            if not any(r[3] is None for r in rows):
                self._new_key(conn)
                rows = conn.execute(select(schema.signing_key.c.kid, schema.signing_key.c.private_jwk,
                                           schema.signing_key.c.public_jwk, schema.signing_key.c.retired)
                                    .order_by(schema.signing_key.c.created)).all()
        now = now_us()
        live = [r for r in rows if r[3] is None or r[3] + ACCESS_TTL_S * 1_000_000 > now]
        active = [r for r in rows if r[3] is None][-1]
        self._signing = ECKey.import_key(orjson.loads(active[1]))
        self._keyset = KeySet([ECKey.import_key(orjson.loads(r[2])) for r in live])

    @staticmethod
    def _new_key(conn: Any) -> str:
        kid = secrets.token_hex(8)
        key = ECKey.generate_key("P-256", parameters={"kid": kid}, private=True)
        conn.execute(insert(schema.signing_key).values(
            kid=kid, private_jwk=orjson.dumps(key.as_dict(private=True)).decode(),
            public_jwk=orjson.dumps(key.as_dict(private=False)).decode(), created=now_us()))
        return kid

    def rotate(self) -> str:
        """Start signing with a new key; the old one verifies until its tokens expire."""
        with self.engine.begin() as conn:
            conn.execute(update(schema.signing_key).where(schema.signing_key.c.retired.is_(None))
                         .values(retired=now_us()))
            kid = self._new_key(conn)
        with self._lock:
            self._signing = None
            self._cache.clear()
        return kid

    def jwks(self) -> dict[str, Any]:
        self._ensure()
        assert self._keyset is not None
        return {"keys": [k.as_dict(private=False) for k in self._keyset.keys]}

    def _ensure(self) -> None:
        """Keys are re-read every minute, so a rotation by another process takes effect on running nodes."""
        with self._lock:
            if self._signing is None or time.monotonic() - self._loaded_at > KEY_REFRESH_S:
                self._load_keys()
                self._loaded_at = time.monotonic()

    # ---- issue / verify --------------------------------------------------------
    def issue(self, subject: str, claims: dict[str, Any], ttl: int = ACCESS_TTL_S) -> tuple[str, Claims]:
        self._ensure()
        assert self._signing is not None
        now = int(time.time())
        body = {"iss": self.issuer, "aud": self.audience, "sub": subject, "iat": now, "exp": now + ttl,
                "jti": secrets.token_hex(16), **claims}
        token = jwt.encode({"alg": "ES256", "kid": self._signing.kid}, body, self._signing)
        return token, Claims(body)

    def verify(self, token: str, io: bool = True) -> Claims:
        """The token's claims, or TokenError. With io=False, NeedsIO when the database must be read."""
        key = hashlib.sha256(token.encode()).digest()
        cached = self._cache.get(key)
        now = time.time()
        if now - self._revoked_at >= REVOCATION_REFRESH_S or cached is None:
            if not io:
                raise NeedsIO
            self._refresh_revocations(now)
        if cached is not None:
            if cached.expires <= now:
                self._cache.pop(key, None)
                raise TokenError("token đã hết hạn / token expired")
            if cached.jti in self._revoked:
                raise TokenError("token đã bị thu hồi / token revoked")
            return cached
        self._ensure()
        assert self._keyset is not None
        try:
            decoded = jwt.decode(token, self._keyset, algorithms=["ES256"])
            registry = jwt.JWTClaimsRegistry(
                iss={"essential": True, "value": self.issuer}, aud={"essential": True, "value": self.audience},
                exp={"essential": True}, jti={"essential": True}, sub={"essential": True})
            registry.validate(decoded.claims)
        except (JoseError, ValueError, TypeError) as exc:
            raise TokenError(f"token không hợp lệ / invalid token: {type(exc).__name__}") from None
        claims = Claims(dict(decoded.claims))
        if claims.jti in self._revoked:
            raise TokenError("token đã bị thu hồi / token revoked")
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[key] = claims
        return claims

    def revoke(self, claims: Claims) -> None:
        with self.engine.begin() as conn:
            conn.execute(delete(schema.revoked_token).where(schema.revoked_token.c.expires < now_us()))
            exists = conn.execute(select(schema.revoked_token.c.jti)
                                  .where(schema.revoked_token.c.jti == claims.jti)).first()
            if exists is None:
                conn.execute(insert(schema.revoked_token).values(jti=claims.jti, expires=claims.expires * 1_000_000))
        with self._lock:
            self._revoked.add(claims.jti)

    def _refresh_revocations(self, now: float) -> None:
        if now - self._revoked_at < REVOCATION_REFRESH_S:
            return
        self._revoked_at = now
        with read_connection(self.engine) as conn:
            jtis = {r[0] for r in conn.execute(select(schema.revoked_token.c.jti))}
        with self._lock:
            self._revoked = jtis
