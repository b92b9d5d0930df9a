"""The provincial PKI, signed clinical packages, and signed requests between nodes and the hub.

Why X.509 plus JWS: a unit may join the exchange only after security clearance,
so the province's health department runs a small CA and a node's certificate
*is* its clearance; revocation (a CRL) removes it. Signatures are ES256 JWS
(joserfc) carrying the signer's certificate in `x5c`, so any node can verify a
package offline against the CA certificate alone, with no key directory to
keep in sync over slow links.

Identity in a certificate: `serialNumber` in the subject is the 5-digit
facility code and exactly one SAN URI says what the key is for:
`urn:lienthong:facility:NNNNN` (a node), `urn:lienthong:hub:NNNNN` (the hub;
by convention its code is the province code followed by 000) or
`urn:lienthong:practitioner:ID` (a person who co-signs, e.g. the responsible
doctor). The role therefore comes from the CA, never from the signer's own
header.

Packages: the JWS payload is a small manifest with the SHA-256 and size of
the package bytes, which travel beside it (detached content). Embedding the
package would base64-inflate it by a third on a 1 Mbit/s link and hold several
copies in memory; the digest lets every co-signer sign the same few bytes, the
signature be stored or re-verified apart from the content, and lets us tell
"content changed" (`tampered`) from "signature broken" (`bad-signature`).
The signed bytes are whatever the caller passes; in lienthong, the canonical
Bundle JSON, framed with its JWS by `seal_package` and then compressed once
by the outbox. The signature thus does not depend on the codec (zstd today)
and an archive may re-encode the package; the receiver's decompression before
verifying is bounded in size (`delivery.decompress`).

Requests: each request carries a timestamp, a random nonce, an RFC 9530
`Content-Digest` and a detached compact JWS over method, path and query,
digest, timestamp, nonce and optional audience; the receiver rejects a stale
timestamp and any nonce it has already seen within the window. Responses are
signed too and bound to the request's nonce, so a node knows it is talking to
the real hub and a recorded response cannot be replayed to it.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import secrets
import stat
import threading
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol

import orjson
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from joserfc import jws
from joserfc.errors import BadSignatureError, JoseError
from joserfc.jwk import ECKey
from joserfc.jws import JWSRegistry
from joserfc.registry import HeaderParameter
from sqlalchemy import Engine, bindparam, delete
from sqlalchemy.dialects import postgresql as postgresql_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.exc import IntegrityError

from lienthong.exchange import schema

CA_VALIDITY = timedelta(days=3650)
NODE_VALIDITY = timedelta(days=365)
SHORT_VALIDITY = timedelta(days=2)  # e.g. a node on probation, or a key kept only in memory
CRL_VALIDITY = timedelta(days=7)
BACKDATE = timedelta(minutes=5)  # certificates start a little early so a node whose clock lags is not locked out
MAX_SKEW_S = 300.0

PACKAGE_TYP = "lienthong-package+jws"
REQUEST_TYP = "lienthong-request+jws"
RESPONSE_TYP = "lienthong-response+jws"
MAX_SIGNATURES = 8

H_TIMESTAMP = "X-Lienthong-Timestamp"
H_NONCE = "X-Lienthong-Nonce"
H_AUDIENCE = "X-Lienthong-Audience"
H_SIGNATURE = "X-Lienthong-Signature"
H_DIGEST = "Content-Digest"

URN_FACILITY = "urn:lienthong:facility:"
URN_HUB = "urn:lienthong:hub:"
URN_PRACTITIONER = "urn:lienthong:practitioner:"

_CODE_RE = re.compile(r"^\d{5}$")
_PRACTITIONER_RE = re.compile(r"^[A-Za-z0-9._/-]{1,64}$")  # licence numbers look like 000123/BN-CCHN
_NONCE_RE = re.compile(r"^[A-Za-z0-9_-]{16,64}$")
_DIGEST_RE = re.compile(r"(?:^|,)\s*sha-256=:([A-Za-z0-9+/=]+):")


class Role(StrEnum):
    FACILITY = "facility"
    HUB = "hub"
    PRACTITIONER = "practitioner"


class Reason(StrEnum):
    """Machine reason codes of a failed verification (stable: peers and logs match on them)."""

    TAMPERED = "tampered"
    UNKNOWN_ISSUER = "unknown-issuer"
    EXPIRED = "expired"
    NOT_YET_VALID = "not-yet-valid"
    REVOKED = "revoked"
    BAD_SIGNATURE = "bad-signature"
    MISSING_FACILITY_SIGNATURE = "missing-facility-signature"
    MALFORMED = "malformed"
    STALE = "stale"
    REPLAY = "replay"
    CRL_INVALID = "crl-invalid"
    WRONG_ROLE = "wrong-role"
    WRONG_AUDIENCE = "wrong-audience"


_MESSAGES: dict[Reason, str] = {
    Reason.TAMPERED: "nội dung đã bị thay đổi / content was altered",
    Reason.UNKNOWN_ISSUER: "chứng thư không do CA tin cậy cấp / certificate not issued by the trusted CA",
    Reason.EXPIRED: "chứng thư đã hết hạn / certificate expired",
    Reason.NOT_YET_VALID: "chứng thư chưa có hiệu lực / certificate not yet valid",
    Reason.REVOKED: "chứng thư đã bị thu hồi / certificate revoked",
    Reason.BAD_SIGNATURE: "chữ ký không hợp lệ / invalid signature",
    Reason.MISSING_FACILITY_SIGNATURE: "thiếu chữ ký của cơ sở / facility signature missing",
    Reason.MALFORMED: "dữ liệu ký không đúng định dạng / malformed signed data",
    Reason.STALE: "thời điểm ký lệch quá giới hạn / timestamp outside the allowed clock skew",
    Reason.REPLAY: "yêu cầu đã được dùng trước đó / request replayed",
    Reason.CRL_INVALID: "danh sách thu hồi không hợp lệ hoặc đã cũ / revocation list invalid or out of date",
    Reason.WRONG_ROLE: "chứng thư không được phép dùng cho việc này / certificate not allowed for this use",
    Reason.WRONG_AUDIENCE: "sai đơn vị nhận hoặc trả lời / addressed to or answered by another party",
}


class TrustError(Exception):
    """A signature, certificate, CRL or request failed verification; `reason` says which check."""

    def __init__(self, reason: Reason, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(_MESSAGES[reason] + (f": {detail}" if detail else ""))


# ---- small helpers ---------------------------------------------------------------------------------


def _now(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(UTC)
    if now.tzinfo is None:
        raise ValueError("thời điểm phải có múi giờ / `now` must be timezone-aware")
    return now.astimezone(UTC)


def _b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64u_decode(text: str) -> bytes:
    if not isinstance(text, str) or not re.fullmatch(r"[A-Za-z0-9_-]*", text):
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _check_code(code: str) -> str:
    if not isinstance(code, str) or not _CODE_RE.match(code):
        raise ValueError(f"mã cơ sở phải gồm 5 chữ số / facility code must be 5 digits: {code!r}")
    return code


def thumbprint(cert: x509.Certificate) -> str:
    """The certificate's SHA-256 thumbprint, base64url (JOSE `x5t#S256`); used as the JWS `kid`."""
    return _b64u(cert.fingerprint(hashes.SHA256()))


def _registry() -> JWSRegistry:
    registry = JWSRegistry(header_registry={"iat": HeaderParameter("Issued at", "int")}, algorithms=["ES256"])
    registry.max_header_length = 16_384  # x5c carries whole certificates
    return registry


_REGISTRY = _registry()


def _public_jwk(cert: x509.Certificate) -> ECKey:
    pem = cert.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return ECKey.import_key(pem)


def _canonical_json(value: Mapping[str, Any]) -> bytes:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


# ---- certificate profile -------------------------------------------------------------------------


@dataclass(frozen=True)
class CertInfo:
    """What a verified certificate says about its holder."""

    role: Role
    facility_code: str
    subject: str
    serial: int
    practitioner_id: str | None = None


def describe(cert: x509.Certificate) -> CertInfo:
    """Read role and facility code from a certificate of this PKI (exactly one lienthong SAN URI)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = [u for u in san.get_values_for_type(x509.UniformResourceIdentifier) if u.startswith("urn:lienthong:")]
        serials = cert.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)
    except (x509.ExtensionNotFound, ValueError):
        raise TrustError(Reason.WRONG_ROLE, "no lienthong identity") from None
    if len(uris) != 1 or len(serials) != 1:
        raise TrustError(Reason.WRONG_ROLE, "expected exactly one lienthong URI and one serialNumber")
    code, uri = str(serials[0].value), uris[0]
    if not _CODE_RE.match(code):
        raise TrustError(Reason.WRONG_ROLE, "subject serialNumber is not a facility code")
    subject = cert.subject.rfc4514_string()
    for prefix, role in ((URN_FACILITY, Role.FACILITY), (URN_HUB, Role.HUB)):
        if uri.startswith(prefix):
            if uri[len(prefix):] != code:
                raise TrustError(Reason.WRONG_ROLE, "SAN and subject disagree on the facility code")
            return CertInfo(role, code, subject, cert.serial_number)
    if uri.startswith(URN_PRACTITIONER) and _PRACTITIONER_RE.match(uri[len(URN_PRACTITIONER):]):
        return CertInfo(Role.PRACTITIONER, code, subject, cert.serial_number, uri[len(URN_PRACTITIONER):])
    raise TrustError(Reason.WRONG_ROLE, f"unknown identity URI {uri!r}")


def check_crl(crl: x509.CertificateRevocationList, anchor: x509.Certificate, now: datetime | None = None) -> None:
    """The CRL must be signed by the trust anchor and not past its next update (fail closed)."""
    now = _now(now)
    pub = anchor.public_key()
    if (crl.issuer != anchor.subject or not isinstance(pub, ec.EllipticCurvePublicKey)
            or not crl.is_signature_valid(pub)):
        raise TrustError(Reason.CRL_INVALID, "not signed by the trust anchor")
    if crl.next_update_utc is None or crl.next_update_utc < now:
        raise TrustError(Reason.CRL_INVALID, "past its next update")


@dataclass(frozen=True)
class _ChainVerdict:
    """A chain that passed `validate_chain` against this anchor and this CRL object, and the time
    windows in which that verdict holds (the tighter of the two certificates', and the CRL's)."""

    info: CertInfo
    anchor: x509.Certificate
    crl: x509.CertificateRevocationList
    valid_from: datetime
    valid_until: datetime
    crl_until: datetime
    expires: float  # time.monotonic() after which the chain is checked from scratch again


class _Memo:
    """A small thread-safe map with a size bound (oldest out first) for the verification caches."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._data: dict[Any, Any] = {}
        self._lock = threading.Lock()

    def get(self, key: Any) -> Any:
        return self._data.get(key)

    def put(self, key: Any, value: Any) -> None:
        with self._lock:
            self._data.pop(key, None)
            while len(self._data) >= self.size:
                self._data.pop(next(iter(self._data)))
            self._data[key] = value

    def clear(self) -> None:
        with self._lock:
            self._data.clear()

    def __len__(self) -> int:
        return len(self._data)


# Verified chains, keyed by the certificates themselves (hashed and compared by their DER bytes).
# A verdict is reused only with the very anchor and CRL objects it was reached with: installing a
# new CRL (`TrustStore.update_crl`, a restart) makes every cached verdict miss, so a revocation takes
# effect exactly when it did without the cache. Validity windows and the CRL's next update are
# re-checked on every use; only the signature checks, extension parsing and revocation lookup are
# saved (about 0.45 ms of the 0.48 ms a full check costs).
CHAIN_CACHE_SECONDS = 300.0
_CHAINS = _Memo(4096)


def clear_verification_caches() -> None:
    """Forget cached chain verdicts and parsed certificates (tests, or after changing trust by hand)."""
    _CHAINS.clear()
    _X5C.clear()


def validate_chain(
    chain: Sequence[x509.Certificate],
    anchor: x509.Certificate,
    crl: x509.CertificateRevocationList,
    now: datetime | None = None,
) -> CertInfo:
    """Check a leaf (optionally followed by the anchor itself) against the provincial CA.

    The PKI has one level: intermediates are refused rather than half-checked.
    A revoked certificate is refused whenever it signed: without a trusted
    timestamp the signing time is only the signer's word. A chain that passed
    against the same anchor and CRL object within `CHAIN_CACHE_SECONDS` is not
    checked again, apart from the time windows (see `_CHAINS`).
    """
    now = _now(now)
    key = tuple(chain)
    hit: _ChainVerdict | None = _CHAINS.get(key)
    if (hit is not None and hit.anchor is anchor and hit.crl is crl and hit.expires > time.monotonic()
            and hit.valid_from <= now <= hit.valid_until and now <= hit.crl_until):
        return hit.info
    info = _validate_chain(chain, anchor, crl, now)
    leaf = chain[0]
    assert crl.next_update_utc is not None  # checked by check_crl
    _CHAINS.put(key, _ChainVerdict(
        info, anchor, crl, max(anchor.not_valid_before_utc, leaf.not_valid_before_utc),
        min(anchor.not_valid_after_utc, leaf.not_valid_after_utc), crl.next_update_utc,
        time.monotonic() + CHAIN_CACHE_SECONDS))
    return info


def _validate_chain(chain: Sequence[x509.Certificate], anchor: x509.Certificate,
                    crl: x509.CertificateRevocationList, now: datetime) -> CertInfo:
    """Every check of `validate_chain`, from scratch."""
    if not chain:
        raise TrustError(Reason.MALFORMED, "empty certificate chain")
    leaf, rest = chain[0], list(chain[1:])
    if len(rest) > 1 or (rest and rest[0] != anchor):
        raise TrustError(Reason.UNKNOWN_ISSUER, "chain does not end at the trust anchor")
    try:
        leaf.verify_directly_issued_by(anchor)
    except (ValueError, TypeError, InvalidSignature):
        raise TrustError(Reason.UNKNOWN_ISSUER, leaf.issuer.rfc4514_string()) from None
    for cert in (anchor, leaf):
        if now < cert.not_valid_before_utc:
            raise TrustError(Reason.NOT_YET_VALID, f"from {cert.not_valid_before_utc.isoformat()}")
        if now > cert.not_valid_after_utc:
            raise TrustError(Reason.EXPIRED, f"until {cert.not_valid_after_utc.isoformat()}")
    try:
        basic = leaf.extensions.get_extension_for_class(x509.BasicConstraints).value
        usage = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        raise TrustError(Reason.WRONG_ROLE, "missing basicConstraints or keyUsage") from None
    if basic.ca or not usage.digital_signature:
        raise TrustError(Reason.WRONG_ROLE, "not an end-entity signing certificate")
    pub = leaf.public_key()
    if not isinstance(pub, ec.EllipticCurvePublicKey) or pub.curve.name != "secp256r1":
        raise TrustError(Reason.WRONG_ROLE, "key is not EC P-256")
    info = describe(leaf)
    check_crl(crl, anchor, now)
    if crl.get_revoked_certificate_by_serial_number(leaf.serial_number) is not None:
        raise TrustError(Reason.REVOKED, f"serial {leaf.serial_number:x}")
    return info


# ---- node identity -------------------------------------------------------------------------------


def _subject(facility_code: str, name: str) -> x509.Name:
    if not name or len(name) > 64:
        raise ValueError(f"tên phải có 1–64 ký tự / name must have 1-64 characters: {name!r}")
    return x509.Name([
        x509.NameAttribute(NameOID.COUNTRY_NAME, "VN"),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "lienthong"),
        x509.NameAttribute(NameOID.COMMON_NAME, name),
        x509.NameAttribute(NameOID.SERIAL_NUMBER, _check_code(facility_code)),
    ])


def _identity_uri(role: Role, facility_code: str, practitioner_id: str | None) -> str:
    if role is Role.PRACTITIONER:
        if practitioner_id is None or not _PRACTITIONER_RE.match(practitioner_id):
            raise ValueError(f"mã người hành nghề không hợp lệ / invalid practitioner id: {practitioner_id!r}")
        return URN_PRACTITIONER + practitioner_id
    if practitioner_id is not None:
        raise ValueError("chỉ chứng thư người hành nghề có mã người hành nghề / practitioner id only for practitioners")
    return (URN_HUB if role is Role.HUB else URN_FACILITY) + _check_code(facility_code)


def make_csr(
    facility_code: str,
    name: str,
    *,
    role: Role = Role.FACILITY,
    practitioner_id: str | None = None,
    key: ec.EllipticCurvePrivateKey | None = None,
) -> tuple[ec.EllipticCurvePrivateKey, x509.CertificateSigningRequest]:
    """Generate (or reuse) an EC P-256 key and a CSR naming the facility; the key never leaves the node."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    san = x509.SubjectAlternativeName([x509.UniformResourceIdentifier(_identity_uri(role, facility_code, practitioner_id))])
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(_subject(facility_code, name))
           .add_extension(san, critical=False)
           .sign(key, hashes.SHA256()))
    return key, csr


def _key_pem(key: ec.EllipticCurvePrivateKey, password: bytes | None) -> bytes:
    enc: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption())
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)


def _load_key_pem(data: bytes, password: bytes | None) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(data, password)
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise ValueError("khóa phải là EC P-256 / key must be EC P-256")
    return key


def _write_private(path: Path, data: bytes) -> None:
    """Write a secret atomically, created 0600 so it is never readable by others, not even briefly."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_key(path: str | Path, key: ec.EllipticCurvePrivateKey, password: bytes | None = None) -> None:
    _write_private(Path(path), _key_pem(key, password))


def load_key(path: str | Path, password: bytes | None = None) -> ec.EllipticCurvePrivateKey:
    """Load a private key, refusing (like OpenSSH) a file that others can read."""
    path = Path(path)
    if os.name == "posix" and stat.S_IMODE(path.stat().st_mode) & 0o077:
        raise PermissionError(f"tệp khóa bị người khác đọc được, cần chmod 600 / key file readable by others, chmod 600: {path}")
    return _load_key_pem(path.read_bytes(), password)


@dataclass(frozen=True)
class NodeIdentity:
    """A private key and its certificate chain (leaf first): what a node, the hub or a doctor signs with."""

    key: ec.EllipticCurvePrivateKey
    chain: tuple[x509.Certificate, ...]
    info: CertInfo = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.chain:
            raise ValueError("thiếu chứng thư / certificate chain is empty")
        pub = serialization.PublicFormat.SubjectPublicKeyInfo
        if (self.key.public_key().public_bytes(serialization.Encoding.DER, pub)
                != self.chain[0].public_key().public_bytes(serialization.Encoding.DER, pub)):
            raise ValueError("khóa không khớp chứng thư / key does not match the certificate")
        object.__setattr__(self, "info", describe(self.chain[0]))

    @property
    def cert(self) -> x509.Certificate:
        return self.chain[0]

    @property
    def facility_code(self) -> str:
        return self.info.facility_code

    @property
    def role(self) -> Role:
        return self.info.role

    @cached_property
    def kid(self) -> str:
        return thumbprint(self.cert)

    @cached_property
    def jwk(self) -> ECKey:
        return ECKey.import_key(_key_pem(self.key, None))

    @cached_property
    def _x5c(self) -> tuple[str, ...]:
        return tuple(base64.b64encode(c.public_bytes(serialization.Encoding.DER)).decode("ascii") for c in self.chain)

    def request_header(self, typ: str) -> str:
        """The base64url protected header of this identity's request and response signatures."""
        cache: dict[str, str] = self.__dict__.setdefault("_request_headers", {})
        head = cache.get(typ)
        if head is None:
            head = cache[typ] = _b64u(orjson.dumps({"alg": "ES256", "typ": typ, "kid": self.kid,
                                                    "x5c": list(self._x5c[:1])}))
        return head

    def x5c(self, *, leaf_only: bool = False) -> list[str]:
        """Standard-base64 DER (RFC 7515 §4.1.6); the root is kept only for self-contained archives."""
        return list(self._x5c[:1] if leaf_only else self._x5c)

    def chain_pem(self) -> bytes:
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.chain)

    def key_pem(self, password: bytes | None = None) -> bytes:
        return _key_pem(self.key, password)

    @classmethod
    def from_pem(cls, key_pem: bytes, chain_pem: bytes, password: bytes | None = None) -> NodeIdentity:
        return cls(_load_key_pem(key_pem, password), tuple(x509.load_pem_x509_certificates(chain_pem)))

    def save(self, key_path: str | Path, chain_path: str | Path, password: bytes | None = None) -> None:
        save_key(key_path, self.key, password)
        Path(chain_path).write_bytes(self.chain_pem())

    @classmethod
    def load(cls, key_path: str | Path, chain_path: str | Path, password: bytes | None = None) -> NodeIdentity:
        return cls(load_key(key_path, password), tuple(x509.load_pem_x509_certificates(Path(chain_path).read_bytes())))


KEY_FILE, CSR_FILE, CHAIN_FILE = "node.key", "node.csr", "node.crt"


def keys_init(directory: str | Path, facility_code: str, name: str, password: bytes | None = None) -> Path:
    """`lienthong keys init`: write node.key (0600) and node.csr; the CSR goes to the CA, the key stays.

    Refuses to overwrite an existing key: replacing it silently would orphan the issued certificate.
    """
    directory = Path(directory)
    if (directory / KEY_FILE).exists():
        raise FileExistsError(f"khóa đã tồn tại / key already exists: {directory / KEY_FILE}")
    key, csr = make_csr(facility_code, name)
    save_key(directory / KEY_FILE, key, password)
    (directory / CSR_FILE).write_bytes(csr.public_bytes(serialization.Encoding.PEM))
    return directory / CSR_FILE


def keys_install(directory: str | Path, chain_pem: bytes, password: bytes | None = None) -> NodeIdentity:
    """`lienthong keys install`: store the chain the CA returned after checking it matches node.key."""
    directory = Path(directory)
    identity = NodeIdentity(load_key(directory / KEY_FILE, password), tuple(x509.load_pem_x509_certificates(chain_pem)))
    (directory / CHAIN_FILE).write_bytes(identity.chain_pem())
    return identity


def load_identity(directory: str | Path, password: bytes | None = None) -> NodeIdentity:
    directory = Path(directory)
    return NodeIdentity.load(directory / KEY_FILE, directory / CHAIN_FILE, password)


# ---- the provincial CA ----------------------------------------------------------------------------


@dataclass
class _Revocation:
    when: datetime
    reason: x509.ReasonFlags | None


class ProvincialCA:
    """The health department's CA: issues node, hub and practitioner certificates and revokes them.

    Issuing takes the facility code the operator approved (after security
    clearance) and only checks that the CSR agrees: the subject is rebuilt from
    approved values, never copied from the request.
    """

    def __init__(self, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate,
                 revoked: Mapping[int, _Revocation] | None = None, crl_number: int = 0) -> None:
        self.key = key
        self.cert = cert
        self._revoked: dict[int, _Revocation] = dict(revoked or {})
        self._crl_number = crl_number
        self._lock = threading.Lock()

    @classmethod
    def create(cls, name: str = "Sở Y tế Bắc Ninh - CA liên thông", *, validity: timedelta = CA_VALIDITY,
               now: datetime | None = None) -> ProvincialCA:
        now = _now(now)
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([
            x509.NameAttribute(NameOID.COUNTRY_NAME, "VN"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "lienthong"),
            x509.NameAttribute(NameOID.COMMON_NAME, name),
        ])
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (x509.CertificateBuilder()
                .subject_name(subject).issuer_name(subject)
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - BACKDATE).not_valid_after(now + validity)
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                             data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                             crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
                .add_extension(ski, critical=False)
                .sign(key, hashes.SHA256()))
        return cls(key, cert)

    # ---- issuing ---------------------------------------------------------------------------------
    def issue(self, csr: x509.CertificateSigningRequest, *, facility_code: str, role: Role = Role.FACILITY,
              practitioner_id: str | None = None, validity: timedelta = NODE_VALIDITY,
              now: datetime | None = None) -> x509.Certificate:
        """Issue a certificate for a CSR whose key and facility code the operator has approved."""
        now = _now(now)
        if not csr.is_signature_valid:
            raise ValueError("chữ ký CSR không hợp lệ / CSR signature invalid")
        pub = csr.public_key()
        if not isinstance(pub, ec.EllipticCurvePublicKey) or pub.curve.name != "secp256r1":
            raise ValueError("CSR phải dùng khóa EC P-256 / CSR key must be EC P-256")
        claimed = [str(a.value) for a in csr.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)]
        if claimed and claimed != [facility_code]:
            raise ValueError(f"mã cơ sở trong CSR không khớp / CSR facility code {claimed} differs from {facility_code}")
        names = [str(a.value) for a in csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
        return self._issue(pub, facility_code, names[0] if names else facility_code, role, practitioner_id, validity, now)

    def issue_identity(self, facility_code: str, name: str, *, role: Role = Role.FACILITY,
                       practitioner_id: str | None = None, validity: timedelta = NODE_VALIDITY,
                       now: datetime | None = None) -> NodeIdentity:
        """Generate a key and issue its certificate in one go (tests, the hub's own key, enrolment desks)."""
        key = ec.generate_private_key(ec.SECP256R1())
        cert = self._issue(key.public_key(), facility_code, name, role, practitioner_id, validity, _now(now))
        return NodeIdentity(key, (cert, self.cert))

    def _issue(self, pub: ec.EllipticCurvePublicKey, facility_code: str, name: str, role: Role,
               practitioner_id: str | None, validity: timedelta, now: datetime) -> x509.Certificate:
        uri = _identity_uri(role, facility_code, practitioner_id)
        not_after = min(now + validity, self.cert.not_valid_after_utc)  # never outlive the CA
        ca_ski = self.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        eku = [ExtendedKeyUsageOID.CLIENT_AUTH] if role is Role.PRACTITIONER else [
            ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH]
        return (x509.CertificateBuilder()
                .subject_name(_subject(facility_code, name)).issuer_name(self.cert.subject)
                .public_key(pub)
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - BACKDATE).not_valid_after(not_after)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=role is Role.PRACTITIONER,
                                             key_encipherment=False, data_encipherment=False, key_agreement=False,
                                             key_cert_sign=False, crl_sign=False, encipher_only=False,
                                             decipher_only=False), critical=True)
                .add_extension(x509.ExtendedKeyUsage(eku), critical=False)
                .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=False)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(pub), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
                .sign(self.key, hashes.SHA256()))

    # ---- revocation ------------------------------------------------------------------------------
    def revoke(self, serial: int, *, reason: x509.ReasonFlags | None = None, now: datetime | None = None) -> None:
        """Revoke by serial number; takes effect for verifiers when they receive the next CRL."""
        with self._lock:
            self._revoked.setdefault(serial, _Revocation(_now(now), reason))

    def is_revoked(self, serial: int) -> bool:
        return serial in self._revoked

    @property
    def revoked_serials(self) -> frozenset[int]:
        return frozenset(self._revoked)

    def crl(self, *, now: datetime | None = None, next_update: timedelta = CRL_VALIDITY) -> x509.CertificateRevocationList:
        """Sign a fresh CRL; its CRLNumber grows so verifiers can refuse an older list (rollback)."""
        now = _now(now)
        with self._lock:
            self._crl_number += 1
            builder = (x509.CertificateRevocationListBuilder()
                       .issuer_name(self.cert.subject)
                       .last_update(now - BACKDATE).next_update(now + next_update)
                       .add_extension(x509.CRLNumber(self._crl_number), critical=False)
                       .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                                      critical=False))
            for serial, rev in sorted(self._revoked.items()):
                entry = x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(rev.when)
                if rev.reason is not None:
                    entry = entry.add_extension(x509.CRLReason(rev.reason), critical=False)
                builder = builder.add_revoked_certificate(entry.build())
        return builder.sign(self.key, hashes.SHA256())

    # ---- persistence -----------------------------------------------------------------------------
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def key_pem(self, password: bytes | None = None) -> bytes:
        return _key_pem(self.key, password)

    @classmethod
    def load(cls, cert_pem: bytes, key_pem: bytes, *, password: bytes | None = None,
             crl_pem: bytes | None = None) -> ProvincialCA:
        """Restore a CA; its revocations and CRL number come back from its last CRL."""
        cert = x509.load_pem_x509_certificate(cert_pem)
        key = _load_key_pem(key_pem, password)
        cert_pub = cert.public_key()
        if not isinstance(cert_pub, ec.EllipticCurvePublicKey) or key.public_key().public_numbers() != cert_pub.public_numbers():
            raise ValueError("khóa CA không khớp chứng thư / CA key does not match its certificate")
        revoked: dict[int, _Revocation] = {}
        number = 0
        if crl_pem:
            crl = x509.load_pem_x509_crl(crl_pem)
            if crl.issuer != cert.subject or not crl.is_signature_valid(key.public_key()):
                raise ValueError("CRL không do CA này ký / CRL not signed by this CA")
            number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
            for entry in crl:
                try:
                    reason: x509.ReasonFlags | None = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
                except x509.ExtensionNotFound:
                    reason = None
                revoked[entry.serial_number] = _Revocation(entry.revocation_date_utc, reason)
        return cls(key, cert, revoked, number)

    def save(self, directory: str | Path, password: bytes | None = None, *, now: datetime | None = None) -> None:
        """Write ca.key (0600), ca.crt and a fresh ca.crl. Keep this directory offline in production."""
        directory = Path(directory)
        _write_private(directory / "ca.key", self.key_pem(password))
        (directory / "ca.crt").write_bytes(self.cert_pem())
        (directory / "ca.crl").write_bytes(self.crl(now=now).public_bytes(serialization.Encoding.PEM))

    @classmethod
    def load_dir(cls, directory: str | Path, password: bytes | None = None) -> ProvincialCA:
        directory = Path(directory)
        crl = directory / "ca.crl"
        return cls.load((directory / "ca.crt").read_bytes(), (directory / "ca.key").read_bytes(), password=password,
                        crl_pem=crl.read_bytes() if crl.exists() else None)


class TrustStore:
    """The trust anchor and the newest CRL, shared between threads; refuses an older CRL (rollback)."""

    def __init__(self, anchor: x509.Certificate, crl: x509.CertificateRevocationList) -> None:
        self.anchor = anchor
        self._check(crl)
        self._crl = crl
        self._lock = threading.Lock()

    def _check(self, crl: x509.CertificateRevocationList) -> int:
        pub = self.anchor.public_key()
        if (crl.issuer != self.anchor.subject or not isinstance(pub, ec.EllipticCurvePublicKey)
                or not crl.is_signature_valid(pub)):
            raise TrustError(Reason.CRL_INVALID, "not signed by the trust anchor")
        try:
            return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
        except x509.ExtensionNotFound:
            raise TrustError(Reason.CRL_INVALID, "no CRL number") from None

    @property
    def crl(self) -> x509.CertificateRevocationList:
        return self._crl

    def update_crl(self, crl: x509.CertificateRevocationList) -> bool:
        """Install a newer CRL; returns False (and keeps the current one) if it is not newer."""
        number = self._check(crl)
        with self._lock:
            if number <= self._check(self._crl):
                return False
            self._crl = crl
            return True


# ---- package signatures --------------------------------------------------------------------------


@dataclass(frozen=True)
class Signer:
    role: Role
    facility_code: str
    subject: str
    serial: int
    signed_at: int  # the signer's own `iat` (seconds): informative, not trusted
    practitioner_id: str | None = None


@dataclass(frozen=True)
class VerifiedPackage:
    payload: bytes
    signers: tuple[Signer, ...]
    manifest: dict[str, Any]

    @property
    def facility_code(self) -> str:
        """The code of the (first) facility that signed: the package's origin."""
        return next(s.facility_code for s in self.signers if s.role is Role.FACILITY)


_MANIFEST_KEYS = frozenset({"sha256", "size"})


def sign_package(payload: bytes, identity: NodeIdentity, extra_signers: Sequence[NodeIdentity] = (), *,
                 now: datetime | None = None, claims: Mapping[str, Any] | None = None) -> bytes:
    """Sign a package as the facility, plus optional co-signers; returns the JWS (General JSON) bytes.

    The package bytes are *not* inside the JWS (see the module docstring):
    keep them beside it, e.g. with `seal_package`. `claims` (say, the
    destination facility or the Bundle id) are signed into the manifest.
    """
    if identity.role is not Role.FACILITY:
        raise ValueError("chữ ký đầu tiên phải của cơ sở / the first signer must be a facility")
    signers = [identity, *extra_signers]
    if len({s.kid for s in signers}) != len(signers) or len(signers) > MAX_SIGNATURES:
        raise ValueError("người ký bị trùng hoặc quá nhiều / duplicate or too many signers")
    extra = dict(claims or {})
    if _MANIFEST_KEYS & extra.keys():
        raise ValueError("claims không được ghi đè sha256/size / claims may not override sha256/size")
    manifest = _canonical_json({**extra, "sha256": _b64u(hashlib.sha256(payload).digest()), "size": len(payload)})
    iat = int(_now(now).timestamp())
    payload_segment = ""
    signatures: list[dict[str, str]] = []
    for signer in signers:
        protected = {"alg": "ES256", "typ": PACKAGE_TYP, "kid": signer.kid, "x5c": signer.x5c(), "iat": iat}
        flat = jws.serialize_json({"protected": protected}, manifest, signer.jwk, registry=_REGISTRY)
        payload_segment = flat["payload"]
        signatures.append({"protected": flat["protected"], "signature": flat["signature"]})
    return orjson.dumps({"payload": payload_segment, "signatures": signatures})


class _Certs:
    """The certificates of one `x5c` header value, parsed once, with the leaf's thumbprint and key."""

    def __init__(self, certs: list[x509.Certificate]) -> None:
        self.certs = certs
        self.kid = thumbprint(certs[0])
        self._jwk: ECKey | None = None
        self._public_key: ec.EllipticCurvePublicKey | None = None

    @property
    def jwk(self) -> ECKey:
        """The leaf's public key for JOSE; only asked for after `validate_chain` accepted the leaf."""
        if self._jwk is None:
            self._jwk = _public_jwk(self.certs[0])
        return self._jwk

    @property
    def public_key(self) -> ec.EllipticCurvePublicKey:
        """The leaf's P-256 key; `validate_chain` has checked its type before this is asked for."""
        if self._public_key is None:
            key = self.certs[0].public_key()
            if not isinstance(key, ec.EllipticCurvePublicKey):
                raise TypeError("not an EC key")
            self._public_key = key
        return self._public_key


# Parsed x5c values: every request of a signer carries the same certificate, so it is decoded,
# hashed and its key imported once. Only chains that then validated are kept (`_trusted`), so
# strangers cannot crowd the cache.
_X5C = _Memo(1024)


def _parse_header(segment: Any, typ: str) -> tuple[dict[str, Any], _Certs]:
    """Decode and check a protected header; every shape problem is `malformed`, before any crypto."""
    try:
        header = orjson.loads(_b64u_decode(segment))
    except (ValueError, TypeError, orjson.JSONDecodeError):
        raise TrustError(Reason.MALFORMED, "protected header is not base64url JSON") from None
    if not isinstance(header, dict):
        raise TrustError(Reason.MALFORMED, "protected header is not an object")
    if header.get("alg") != "ES256":  # a fixed algorithm: no `none`, no HMAC-with-public-key confusion
        raise TrustError(Reason.MALFORMED, f"alg must be ES256, not {header.get('alg')!r}")
    if header.get("typ") != typ:
        raise TrustError(Reason.MALFORMED, f"typ must be {typ!r}")
    if "crit" in header or "b64" in header:
        raise TrustError(Reason.MALFORMED, "crit/b64 not supported")
    x5c, kid = header.get("x5c"), header.get("kid")
    if not isinstance(x5c, list) or not 1 <= len(x5c) <= 2 or not all(isinstance(c, str) for c in x5c):
        raise TrustError(Reason.MALFORMED, "x5c must list one or two certificates")
    parsed: _Certs | None = _X5C.get(tuple(x5c))
    if parsed is None:
        try:
            parsed = _Certs([x509.load_der_x509_certificate(base64.b64decode(c, validate=True)) for c in x5c])
        except ValueError:
            raise TrustError(Reason.MALFORMED, "x5c holds an unreadable certificate") from None
    if kid != parsed.kid:
        raise TrustError(Reason.MALFORMED, "kid is not the leaf certificate's thumbprint")
    return header, parsed


def _trusted(header: dict[str, Any], parsed: _Certs, anchor: x509.Certificate,
             crl: x509.CertificateRevocationList, now: datetime) -> CertInfo:
    """`validate_chain` for a parsed header; a chain that passed keeps its parsed form for next time."""
    info = validate_chain(parsed.certs, anchor, crl, now)
    key = tuple(header["x5c"])
    if _X5C.get(key) is not parsed:
        _X5C.put(key, parsed)
    return info


def verify_package(jws_bytes: bytes, payload: bytes, trust_anchor: x509.Certificate,
                   crl: x509.CertificateRevocationList, now: datetime | None = None, *,
                   max_skew: float = MAX_SKEW_S) -> VerifiedPackage:
    """Verify every signature of a package and its content digest; raise `TrustError` with the reason.

    All signatures must verify (a broken co-signature is not ignored) and at
    least one must be by a facility certificate. To re-verify an archived
    package, pass the time it was received (the receiver's own record) as `now`.
    """
    now = _now(now)
    try:
        doc = orjson.loads(jws_bytes)
    except orjson.JSONDecodeError:
        raise TrustError(Reason.MALFORMED, "not JSON") from None
    if (not isinstance(doc, dict) or set(doc) != {"payload", "signatures"} or not isinstance(doc["payload"], str)
            or not isinstance(doc["signatures"], list) or not 1 <= len(doc["signatures"]) <= MAX_SIGNATURES):
        raise TrustError(Reason.MALFORMED, "not a JWS General JSON Serialization")
    try:
        manifest = orjson.loads(_b64u_decode(doc["payload"]))
    except (ValueError, orjson.JSONDecodeError):
        raise TrustError(Reason.MALFORMED, "payload is not a manifest") from None
    if (not isinstance(manifest, dict) or not isinstance(manifest.get("sha256"), str)
            or not isinstance(manifest.get("size"), int)):
        raise TrustError(Reason.MALFORMED, "manifest lacks sha256/size")
    signers: list[Signer] = []
    seen: set[str] = set()
    for sig in doc["signatures"]:
        if not isinstance(sig, dict) or set(sig) != {"protected", "signature"}:
            raise TrustError(Reason.MALFORMED, "each signature needs exactly `protected` and `signature`")
        header, parsed = _parse_header(sig["protected"], PACKAGE_TYP)
        if header["kid"] in seen:
            raise TrustError(Reason.MALFORMED, "the same certificate signed twice")
        seen.add(header["kid"])
        iat = header.get("iat")
        if not isinstance(iat, int):
            raise TrustError(Reason.MALFORMED, "iat missing")
        info = _trusted(header, parsed, trust_anchor, crl, now)
        if iat > now.timestamp() + max_skew:
            raise TrustError(Reason.NOT_YET_VALID, "signed in the future")
        flat: jws.FlattenedJSONSerialization = {
            "payload": doc["payload"], "protected": sig["protected"], "signature": sig["signature"]}
        try:
            jws.deserialize_json(flat, parsed.jwk, registry=_REGISTRY)
        except BadSignatureError:
            raise TrustError(Reason.BAD_SIGNATURE, info.subject) from None
        except (JoseError, ValueError, TypeError) as exc:
            raise TrustError(Reason.MALFORMED, type(exc).__name__) from None
        signers.append(Signer(info.role, info.facility_code, info.subject, info.serial, iat, info.practitioner_id))
    if manifest["size"] != len(payload) or manifest["sha256"] != _b64u(hashlib.sha256(payload).digest()):
        raise TrustError(Reason.TAMPERED, "package bytes differ from the signed digest")
    if not any(s.role is Role.FACILITY for s in signers):
        raise TrustError(Reason.MISSING_FACILITY_SIGNATURE)
    return VerifiedPackage(payload, tuple(signers), manifest)


_SEAL_MAGIC = b"LTPKG1\n"


def seal_package(payload: bytes, identity: NodeIdentity, extra_signers: Sequence[NodeIdentity] = (), *,
                 now: datetime | None = None, claims: Mapping[str, Any] | None = None) -> bytes:
    """Sign and frame a package as one blob for the outbox: magic, JWS length, JWS, package bytes."""
    sig = sign_package(payload, identity, extra_signers, now=now, claims=claims)
    return _SEAL_MAGIC + len(sig).to_bytes(4, "big") + sig + payload


def open_package(sealed: bytes, trust_anchor: x509.Certificate, crl: x509.CertificateRevocationList,
                 now: datetime | None = None, *, max_skew: float = MAX_SKEW_S) -> VerifiedPackage:
    """Split a sealed blob and verify it (see `verify_package`)."""
    head = len(_SEAL_MAGIC)
    if not sealed.startswith(_SEAL_MAGIC) or len(sealed) < head + 4:
        raise TrustError(Reason.MALFORMED, "not a sealed package")
    size = int.from_bytes(sealed[head:head + 4], "big")
    if len(sealed) < head + 4 + size:
        raise TrustError(Reason.MALFORMED, "truncated sealed package")
    return verify_package(sealed[head + 4:head + 4 + size], sealed[head + 4 + size:], trust_anchor, crl, now,
                          max_skew=max_skew)


# ---- replay protection ---------------------------------------------------------------------------


class NonceStore(Protocol):
    """Remembers accepted nonces; `check_and_store` is False when `key` was seen within `window` seconds."""

    def check_and_store(self, key: str, now: float, window: float) -> bool: ...


class MemoryNonceStore:
    """For a single process (tests, a node's response check); forgets on restart."""

    def __init__(self) -> None:
        self._seen: dict[str, float] = {}
        self._lock = threading.Lock()
        self._next_purge = 0.0

    def check_and_store(self, key: str, now: float, window: float) -> bool:
        with self._lock:
            if now >= self._next_purge:
                self._seen = {k: t for k, t in self._seen.items() if t > now - window}
                self._next_purge = now + window / 4
            seen = self._seen.get(key)
            if seen is not None and seen > now - window:
                return False
            self._seen[key] = now
            return True

    def __len__(self) -> int:
        return len(self._seen)


_NONCE = schema.exchange_nonce
_NONCE_PURGE = delete(_NONCE).where(_NONCE.c.seen < bindparam("cutoff"))


def _nonce_upsert(insert_: Any) -> Any:
    stmt = insert_(_NONCE).values(nonce=bindparam("nonce"), seen=bindparam("seen"))
    return stmt.on_conflict_do_update(index_elements=[_NONCE.c.nonce], set_={"seen": stmt.excluded.seen},
                                      where=_NONCE.c.seen <= bindparam("cutoff")).returning(_NONCE.c.seen)


_NONCE_UPSERT = {"sqlite": _nonce_upsert(sqlite_dialect.insert), "postgresql": _nonce_upsert(postgresql_dialect.insert)}


class SqlNonceStore:
    """In the node's database (`exchange_nonce`), shared by all workers and surviving restarts.

    A concurrent duplicate loses on the primary key, so the check is atomic on
    SQLite and PostgreSQL alike. Expired rows are purged every `purge_every` calls.
    """

    def __init__(self, engine: Engine, purge_every: int = 256) -> None:
        self.engine = engine
        self.purge_every = purge_every
        self._calls = 0

    def check_and_store(self, key: str, now: float, window: float) -> bool:
        now_us, cutoff = int(now * 1_000_000), int((now - window) * 1_000_000)
        self._calls += 1
        purge = self._calls >= self.purge_every
        if purge:
            self._calls = 0
        try:
            with self.engine.begin() as conn:
                if purge:
                    conn.execute(_NONCE_PURGE, {"cutoff": cutoff})
                # One statement: stored, or refreshed if older than the window. RETURNING, not rowcount,
                # says which: psycopg reports no rowcount for an upsert here.
                return conn.execute(_NONCE_UPSERT[conn.dialect.name],
                                    {"nonce": key, "seen": now_us, "cutoff": cutoff}).first() is not None
        except IntegrityError:
            return False


# ---- request and response signatures ---------------------------------------------------------------


def _digest_header(body: bytes) -> str:
    return "sha-256=:" + base64.b64encode(hashlib.sha256(body).digest()).decode("ascii") + ":"


_ES256 = ec.ECDSA(hashes.SHA256())


def _sign_detached(identity: NodeIdentity, typ: str, canonical: bytes) -> str:
    """A detached compact ES256 JWS (RFC 7515 appendix F: the receiver rebuilds the payload from the
    message). Signed with `cryptography` directly rather than through joserfc: the protected header
    is the same for every request of a signer, so it is encoded once (`NodeIdentity.request_header`),
    and each hop signs and verifies two of these."""
    head = identity.request_header(typ)
    der = identity.key.sign(f"{head}.{_b64u(canonical)}".encode("ascii"), _ES256)
    r, s = decode_dss_signature(der)
    return f"{head}..{_b64u(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


def _verify_es256(public_key: ec.EllipticCurvePublicKey, head: str, payload: bytes, signature: str) -> bool:
    """Check a compact JWS's ES256 signature (R || S, 32 bytes each) over `head` and `payload`."""
    raw = _b64u_decode(signature)  # ValueError: not base64url
    if len(raw) != 64:
        return False
    der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    try:
        public_key.verify(der, f"{head}.{_b64u(payload)}".encode("ascii"), _ES256)
    except InvalidSignature:
        return False
    return True


def _lower(headers: Mapping[str, str]) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items()}


def _verify_detached(
    headers: dict[str, str], body: bytes, typ: str, build: Any, ca: x509.Certificate,
    crl: x509.CertificateRevocationList, now: datetime, max_skew: float, roles: Collection[Role],
) -> tuple[CertInfo, str]:
    """Shared by requests and responses: shape, clock, digest, certificate, signature, role."""
    try:
        ts_text, nonce, digest, signature = (headers[h.lower()] for h in (H_TIMESTAMP, H_NONCE, H_DIGEST, H_SIGNATURE))
        ts = int(ts_text)
    except (KeyError, ValueError):
        raise TrustError(Reason.MALFORMED, "missing or invalid signature headers") from None
    if not _NONCE_RE.match(nonce):
        raise TrustError(Reason.MALFORMED, "nonce must be 16-64 base64url characters")
    if abs(now.timestamp() - ts) > max_skew:
        raise TrustError(Reason.STALE, f"{int(now.timestamp()) - ts} s")
    match = _DIGEST_RE.search(digest)
    if not match:
        raise TrustError(Reason.MALFORMED, "Content-Digest lacks sha-256")
    if match.group(1) != _digest_header(body)[len("sha-256=:"):-1]:
        raise TrustError(Reason.TAMPERED, "body does not match Content-Digest")
    parts = signature.split(".")
    if len(parts) != 3 or parts[1] != "":
        raise TrustError(Reason.MALFORMED, "signature must be a detached compact JWS")
    header, parsed = _parse_header(parts[0], typ)
    if len(parsed.certs) != 1:
        raise TrustError(Reason.MALFORMED, "x5c must hold only the leaf")
    info = _trusted(header, parsed, ca, crl, now)
    if info.role not in roles:
        raise TrustError(Reason.WRONG_ROLE, f"{info.role} may not sign this")
    try:
        valid = _verify_es256(parsed.public_key, parts[0], build(ts, nonce), parts[2])
    except (ValueError, TypeError) as exc:
        raise TrustError(Reason.MALFORMED, type(exc).__name__) from None
    if not valid:
        raise TrustError(Reason.BAD_SIGNATURE, info.subject)
    return info, nonce


def _request_canonical(method: str, path: str, body: bytes, ts: int, nonce: str, audience: str) -> bytes:
    return "\n".join(("LIENTHONG-REQUEST-V1", method.upper(), path, _digest_header(body), str(ts), nonce,
                      audience)).encode("utf-8")


def new_nonce() -> str:
    return secrets.token_urlsafe(18)


def sign_request(method: str, path: str, body: bytes, identity: NodeIdentity, now: datetime | None = None,
                 nonce: str | None = None, *, audience: str | None = None) -> dict[str, str]:
    """Headers that authenticate one request. `path` is the raw path with its query, as sent on the wire;
    `audience` (the receiver's facility code) stops a request for one party being replayed to another."""
    ts = int(_now(now).timestamp())
    nonce = nonce or new_nonce()
    if not _NONCE_RE.match(nonce):
        raise ValueError("nonce phải gồm 16–64 ký tự base64url / nonce must be 16-64 base64url characters")
    canonical = _request_canonical(method, path, body, ts, nonce, audience or "")
    headers = {H_TIMESTAMP: str(ts), H_NONCE: nonce, H_DIGEST: _digest_header(body),
               H_SIGNATURE: _sign_detached(identity, REQUEST_TYP, canonical)}
    if audience:
        headers[H_AUDIENCE] = audience
    return headers


def verify_request(method: str, path: str, headers: Mapping[str, str], body: bytes, ca: x509.Certificate,
                   crl: x509.CertificateRevocationList, nonce_store: NonceStore, now: datetime | None = None,
                   max_skew: float = MAX_SKEW_S, *, audience: str | None = None,
                   roles: Collection[Role] = (Role.FACILITY, Role.HUB)) -> str:
    """Authenticate a request and return the sender's facility code.

    The nonce is recorded only after the signature verified, so strangers
    cannot fill the store; it is remembered for twice the skew, the longest a
    signed timestamp stays acceptable.
    """
    now = _now(now)
    h = _lower(headers)
    sent_audience = h.get(H_AUDIENCE.lower(), "")
    if audience is not None and sent_audience != audience:
        raise TrustError(Reason.WRONG_AUDIENCE, f"for {sent_audience or 'anyone'}, not {audience}")
    info, nonce = _verify_detached(
        h, body, REQUEST_TYP, lambda ts, n: _request_canonical(method, path, body, ts, n, sent_audience),
        ca, crl, now, max_skew, roles)
    if not nonce_store.check_and_store(f"{info.facility_code}:{nonce}", now.timestamp(), 2 * max_skew):
        raise TrustError(Reason.REPLAY, nonce)
    return info.facility_code


def _response_canonical(status: int, body: bytes, ts: int, nonce: str, request_nonce: str) -> bytes:
    return "\n".join(("LIENTHONG-RESPONSE-V1", str(status), request_nonce, _digest_header(body), str(ts),
                      nonce)).encode("utf-8")


def sign_response(status: int, body: bytes, identity: NodeIdentity, now: datetime | None = None,
                  request_nonce: str = "") -> dict[str, str]:
    """Headers that authenticate a response to the request that carried `request_nonce`."""
    if not _NONCE_RE.match(request_nonce):
        raise ValueError("thiếu nonce của yêu cầu / the request's nonce is required")
    ts, nonce = int(_now(now).timestamp()), new_nonce()
    canonical = _response_canonical(status, body, ts, nonce, request_nonce)
    return {H_TIMESTAMP: str(ts), H_NONCE: nonce, H_DIGEST: _digest_header(body),
            H_SIGNATURE: _sign_detached(identity, RESPONSE_TYP, canonical)}


def verify_response(status: int, headers: Mapping[str, str], body: bytes, ca: x509.Certificate,
                    crl: x509.CertificateRevocationList, request_nonce: str, now: datetime | None = None,
                    max_skew: float = MAX_SKEW_S, *, expected_code: str | None = None,
                    roles: Collection[Role] = (Role.HUB, Role.FACILITY)) -> str:
    """Authenticate a response and return the responder's facility code.

    Binding to our own fresh request nonce makes a stored response useless
    for any other request, so no nonce store is needed on this side.
    """
    now = _now(now)
    info, _ = _verify_detached(
        _lower(headers), body, RESPONSE_TYP, lambda ts, n: _response_canonical(status, body, ts, n, request_nonce),
        ca, crl, now, max_skew, roles)
    if expected_code is not None and info.facility_code != expected_code:
        raise TrustError(Reason.WRONG_AUDIENCE, f"answered by {info.facility_code}, expected {expected_code}")
    return info.facility_code
