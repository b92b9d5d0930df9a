"""The provincial PKI, package signatures (every rejection reason), request/response signatures, replay."""

from __future__ import annotations

import base64
import os
import stat
from datetime import timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID
from sqlalchemy import Engine, func, select

from lienthong.exchange import schema
from lienthong.exchange.trust import (
    H_AUDIENCE,
    H_DIGEST,
    H_NONCE,
    H_SIGNATURE,
    H_TIMESTAMP,
    PACKAGE_TYP,
    SHORT_VALIDITY,
    URN_FACILITY,
    MemoryNonceStore,
    NodeIdentity,
    ProvincialCA,
    Reason,
    Role,
    SqlNonceStore,
    TrustError,
    TrustStore,
    describe,
    keys_init,
    keys_install,
    load_identity,
    load_key,
    make_csr,
    open_package,
    seal_package,
    sign_package,
    sign_request,
    sign_response,
    verify_package,
    verify_request,
    verify_response,
)

from .conftest import NOW, Pki

PAYLOAD = b"\x28\xb5\x2f\xfd" + os.urandom(4000)  # stands in for a compressed transfer package


def reason_of(exc: pytest.ExceptionInfo[TrustError]) -> Reason:
    return exc.value.reason


# ---- PKI -----------------------------------------------------------------------------------------


def test_ca_certificate_profile(pki: Pki) -> None:
    ca = pki.ca.cert
    assert ca.subject == ca.issuer
    assert ca.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "Sở Y tế Bắc Ninh - CA liên thông"
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign


def test_node_certificate_carries_facility_code_and_urn(pki: Pki) -> None:
    cert = pki.node.cert
    assert cert.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)[0].value == "27001"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["urn:lienthong:facility:27001"]
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    cert.verify_directly_issued_by(pki.ca.cert)
    info = describe(cert)
    assert (info.role, info.facility_code) == (Role.FACILITY, "27001")
    assert describe(pki.hub.cert).role is Role.HUB
    doctor = describe(pki.doctor.cert)
    assert (doctor.role, doctor.facility_code, doctor.practitioner_id) == (Role.PRACTITIONER, "27001", "000123/BN-CCHN")


def test_issue_from_csr_uses_the_approved_code(pki: Pki) -> None:
    key, csr = make_csr("27005", "Trạm Y tế xã Đông Phong")
    cert = pki.ca.issue(csr, facility_code="27005", now=NOW)
    identity = NodeIdentity(key, (cert, pki.ca.cert))
    assert identity.facility_code == "27005"
    assert cert.not_valid_after_utc - cert.not_valid_before_utc > timedelta(days=360)
    short = pki.ca.issue(csr, facility_code="27005", validity=SHORT_VALIDITY, now=NOW)
    assert short.not_valid_after_utc - NOW == SHORT_VALIDITY
    with pytest.raises(ValueError, match="không khớp"):
        pki.ca.issue(csr, facility_code="27006", now=NOW)  # the CSR claims another facility
    with pytest.raises(ValueError, match="5"):
        make_csr("2700", "x")


def test_identity_refuses_a_key_that_does_not_match(pki: Pki) -> None:
    with pytest.raises(ValueError, match="không khớp"):
        NodeIdentity(pki.other.key, pki.node.chain)


def test_keys_init_and_install(tmp_path: Path, pki: Pki) -> None:
    csr_path = keys_init(tmp_path / "keys", "27009", "Phòng khám đa khoa Quế Võ")
    key_file = tmp_path / "keys" / "node.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    with pytest.raises(FileExistsError):
        keys_init(tmp_path / "keys", "27009", "again")
    csr = x509.load_pem_x509_csr(csr_path.read_bytes())
    cert = pki.ca.issue(csr, facility_code="27009", now=NOW)
    chain = cert.public_bytes(serialization.Encoding.PEM) + pki.ca.cert_pem()
    installed = keys_install(tmp_path / "keys", chain)
    loaded = load_identity(tmp_path / "keys")
    assert loaded.kid == installed.kid and loaded.facility_code == "27009"
    with pytest.raises(ValueError):
        keys_install(tmp_path / "keys", pki.node.chain_pem())  # someone else's certificate


def test_key_file_permissions_and_password(tmp_path: Path, pki: Pki) -> None:
    pki.node.save(tmp_path / "n.key", tmp_path / "n.crt", password=b"mat-khau")
    assert stat.S_IMODE((tmp_path / "n.key").stat().st_mode) == 0o600
    assert b"ENCRYPTED" in (tmp_path / "n.key").read_bytes()
    again = NodeIdentity.load(tmp_path / "n.key", tmp_path / "n.crt", password=b"mat-khau")
    assert again.kid == pki.node.kid
    os.chmod(tmp_path / "n.key", 0o644)
    with pytest.raises(PermissionError, match="chmod 600"):
        load_key(tmp_path / "n.key", b"mat-khau")


def test_ca_round_trips_through_pem_with_its_revocations(tmp_path: Path) -> None:
    ca = ProvincialCA.create("CA thử nghiệm", now=NOW)
    victim = ca.issue_identity("27003", "Bệnh viện Sản Nhi", now=NOW)
    ca.revoke(victim.cert.serial_number, reason=x509.ReasonFlags.key_compromise, now=NOW)
    ca.save(tmp_path / "ca", password=b"pw", now=NOW)
    assert stat.S_IMODE((tmp_path / "ca" / "ca.key").stat().st_mode) == 0o600
    loaded = ProvincialCA.load_dir(tmp_path / "ca", password=b"pw")
    assert loaded.is_revoked(victim.cert.serial_number)
    crl = loaded.crl(now=NOW)
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 2  # continues, not restarts
    entry = crl.get_revoked_certificate_by_serial_number(victim.cert.serial_number)
    assert entry is not None
    assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason is x509.ReasonFlags.key_compromise
    with pytest.raises(ValueError):
        ProvincialCA.load(loaded.cert_pem(), ProvincialCA.create(now=NOW).key_pem())


def test_trust_store_refuses_crl_rollback(pki: Pki) -> None:
    ca = ProvincialCA.create("CA cuộn lại", now=NOW)
    old, new = ca.crl(now=NOW), ca.crl(now=NOW)
    store = TrustStore(ca.cert, old)
    assert store.update_crl(new) is True
    assert store.update_crl(old) is False
    assert store.crl is new
    with pytest.raises(TrustError) as exc:
        store.update_crl(pki.crl)  # another CA's list
    assert reason_of(exc) is Reason.CRL_INVALID


# ---- package signatures: the failure matrix --------------------------------------------------------


def signed(pki: Pki, payload: bytes = PAYLOAD, **kw: Any) -> bytes:
    return sign_package(payload, pki.node, [pki.doctor], now=NOW, **kw)


def test_package_verifies_with_all_signers(pki: Pki) -> None:
    jws_bytes = signed(pki, claims={"dest": "27002", "bundle": "urn:uuid:5f1c"})
    doc = orjson.loads(jws_bytes)
    assert len(doc["signatures"]) == 2
    for sig in doc["signatures"]:
        header = orjson.loads(base64.urlsafe_b64decode(sig["protected"] + "=="))
        assert header["alg"] == "ES256" and header["typ"] == PACKAGE_TYP
        assert set(header) == {"alg", "typ", "kid", "x5c", "iat"} and len(header["x5c"]) == 2
    result = verify_package(jws_bytes, PAYLOAD, pki.ca.cert, pki.crl, NOW + timedelta(hours=1))
    assert result.payload == PAYLOAD and result.facility_code == "27001"
    assert [(s.role, s.facility_code) for s in result.signers] == [(Role.FACILITY, "27001"),
                                                                   (Role.PRACTITIONER, "27001")]
    assert result.signers[1].practitioner_id == "000123/BN-CCHN"
    assert result.manifest["dest"] == "27002"


def test_sealed_package_round_trip(pki: Pki) -> None:
    sealed = seal_package(PAYLOAD, pki.node, now=NOW)
    assert open_package(sealed, pki.ca.cert, pki.crl, NOW).payload == PAYLOAD
    with pytest.raises(TrustError) as exc:
        open_package(sealed[:-1] + bytes([sealed[-1] ^ 1]), pki.ca.cert, pki.crl, NOW)
    assert reason_of(exc) is Reason.TAMPERED
    with pytest.raises(TrustError) as exc:
        open_package(b"LTPKG1\n\x00\x00\xff\xff{}", pki.ca.cert, pki.crl, NOW)
    assert reason_of(exc) is Reason.MALFORMED


def test_tampered_content(pki: Pki) -> None:
    changed = bytearray(PAYLOAD)
    changed[100] ^= 0x01
    with pytest.raises(TrustError) as exc:
        verify_package(signed(pki), bytes(changed), pki.ca.cert, pki.crl, NOW)
    assert reason_of(exc) is Reason.TAMPERED
    with pytest.raises(TrustError) as exc:
        verify_package(signed(pki), PAYLOAD + b"\x00", pki.ca.cert, pki.crl, NOW)
    assert reason_of(exc) is Reason.TAMPERED


def test_unknown_issuer(pki: Pki) -> None:
    rogue = ProvincialCA.create("Sở Y tế Bắc Ninh - CA liên thông", now=NOW)  # same name, different key
    impostor = rogue.issue_identity("27001", "Bệnh viện Đa khoa tỉnh Bắc Ninh", now=NOW)
    with pytest.raises(TrustError) as exc:
        verify_package(sign_package(PAYLOAD, impostor, now=NOW), PAYLOAD, pki.ca.cert, pki.crl, NOW)
    assert reason_of(exc) is Reason.UNKNOWN_ISSUER


def test_expired_and_not_yet_valid(pki: Pki) -> None:
    short = pki.ca.issue_identity("27004", "Trạm Y tế lưu động", validity=SHORT_VALIDITY, now=NOW)
    jws_bytes = sign_package(PAYLOAD, short, now=NOW)
    assert verify_package(jws_bytes, PAYLOAD, pki.ca.cert, pki.crl, NOW + timedelta(days=1)).facility_code == "27004"
    with pytest.raises(TrustError) as exc:
        verify_package(jws_bytes, PAYLOAD, pki.ca.cert, pki.crl, NOW + timedelta(days=3))
    assert reason_of(exc) is Reason.EXPIRED
    later = pki.ca.issue_identity("27004", "Trạm Y tế lưu động", now=NOW + timedelta(days=30))
    with pytest.raises(TrustError) as exc:
        verify_package(sign_package(PAYLOAD, later, now=NOW), PAYLOAD, pki.ca.cert, pki.crl, NOW)
    assert reason_of(exc) is Reason.NOT_YET_VALID


def test_revoked(pki: Pki) -> None:
    ca = ProvincialCA.create("CA thu hồi", now=NOW)
    node = ca.issue_identity("27001", "Bệnh viện Đa khoa tỉnh Bắc Ninh", now=NOW)
    doctor = ca.issue_identity("27001", "BS. Trần Thị Bình", role=Role.PRACTITIONER, practitioner_id="B-1", now=NOW)
    jws_bytes = sign_package(PAYLOAD, node, [doctor], now=NOW)
    verify_package(jws_bytes, PAYLOAD, ca.cert, ca.crl(now=NOW), NOW)
    ca.revoke(doctor.cert.serial_number, now=NOW)  # a co-signer's revocation sinks the package too
    with pytest.raises(TrustError) as exc:
        verify_package(jws_bytes, PAYLOAD, ca.cert, ca.crl(now=NOW), NOW)
    assert reason_of(exc) is Reason.REVOKED


def test_bad_signature(pki: Pki) -> None:
    doc = orjson.loads(signed(pki))
    sig = bytearray(base64.urlsafe_b64decode(doc["signatures"][1]["signature"] + "=="))
    sig[5] ^= 0x80
    doc["signatures"][1]["signature"] = base64.urlsafe_b64encode(bytes(sig)).rstrip(b"=").decode()
    with pytest.raises(TrustError) as exc:
        verify_package(orjson.dumps(doc), PAYLOAD, pki.ca.cert, pki.crl, NOW)
    assert reason_of(exc) is Reason.BAD_SIGNATURE


def test_changed_manifest_breaks_the_signature(pki: Pki) -> None:
    doc = orjson.loads(signed(pki, claims={"dest": "27002"}))
    manifest = orjson.loads(base64.urlsafe_b64decode(doc["payload"] + "=="))
    manifest["dest"] = "27003"  # redirect the package
    doc["payload"] = base64.urlsafe_b64encode(orjson.dumps(manifest)).rstrip(b"=").decode()
    with pytest.raises(TrustError) as exc:
        verify_package(orjson.dumps(doc), PAYLOAD, pki.ca.cert, pki.crl, NOW)
    assert reason_of(exc) is Reason.BAD_SIGNATURE


def test_signature_moved_to_another_certificate(pki: Pki) -> None:
    """Swap in the x5c/kid of another valid node: the protected header changes, so the signature fails."""
    doc = orjson.loads(sign_package(PAYLOAD, pki.node, now=NOW))
    header = orjson.loads(base64.urlsafe_b64decode(doc["signatures"][0]["protected"] + "=="))
    header["x5c"], header["kid"] = pki.other.x5c(), pki.other.kid
    doc["signatures"][0]["protected"] = base64.urlsafe_b64encode(orjson.dumps(header)).rstrip(b"=").decode()
    with pytest.raises(TrustError) as exc:
        verify_package(orjson.dumps(doc), PAYLOAD, pki.ca.cert, pki.crl, NOW)
    assert reason_of(exc) is Reason.BAD_SIGNATURE


def test_missing_facility_signature(pki: Pki) -> None:
    doc = orjson.loads(signed(pki))
    doc["signatures"] = doc["signatures"][1:]  # only the doctor's signature is left
    with pytest.raises(TrustError) as exc:
        verify_package(orjson.dumps(doc), PAYLOAD, pki.ca.cert, pki.crl, NOW)
    assert reason_of(exc) is Reason.MISSING_FACILITY_SIGNATURE
    with pytest.raises(ValueError, match="facility"):
        sign_package(PAYLOAD, pki.doctor, now=NOW)


def _reheader(jws_bytes: bytes, **changes: Any) -> bytes:
    doc = orjson.loads(jws_bytes)
    header = orjson.loads(base64.urlsafe_b64decode(doc["signatures"][0]["protected"] + "=="))
    for key, value in changes.items():
        if value is None:
            header.pop(key, None)
        else:
            header[key] = value
    doc["signatures"][0]["protected"] = base64.urlsafe_b64encode(orjson.dumps(header)).rstrip(b"=").decode()
    return orjson.dumps(doc)


@pytest.mark.parametrize("mangle", [
    lambda j: b"not json",
    lambda j: b"[]",
    lambda j: orjson.dumps({**orjson.loads(j), "signatures": []}),
    lambda j: orjson.dumps({"payload": orjson.loads(j)["payload"], "protected": "x", "signature": "y"}),
    lambda j: orjson.dumps({**orjson.loads(j), "payload": "!!"}),
    lambda j: _reheader(j, alg="none"),
    lambda j: _reheader(j, alg="HS256"),
    lambda j: _reheader(j, typ="JWT"),
    lambda j: _reheader(j, x5c=None),
    lambda j: _reheader(j, x5c=["bm90IGEgY2VydA=="]),
    lambda j: _reheader(j, kid="someone-else"),
    lambda j: _reheader(j, iat=None),
    lambda j: _reheader(j, crit=["exp"]),
    lambda j: orjson.dumps({**(d := orjson.loads(j)), "signatures": [{**d["signatures"][0], "header": {"kid": "x"}}]}),
    lambda j: orjson.dumps({**(d := orjson.loads(j)), "signatures": d["signatures"] * 2}),
], ids=["garbage", "array", "no-signatures", "flattened", "payload", "alg-none", "alg-hs256", "typ", "no-x5c",
        "bad-x5c", "kid", "no-iat", "crit", "unprotected-header", "same-signer-twice"])
def test_malformed(pki: Pki, mangle: Any) -> None:
    with pytest.raises(TrustError) as exc:
        verify_package(mangle(sign_package(PAYLOAD, pki.node, now=NOW)), PAYLOAD, pki.ca.cert, pki.crl, NOW)
    assert reason_of(exc) is Reason.MALFORMED


def test_crl_must_be_genuine_and_current(pki: Pki) -> None:
    jws_bytes = signed(pki)
    rogue_crl = ProvincialCA.create("Sở Y tế Bắc Ninh - CA liên thông", now=NOW).crl(now=NOW)
    for crl, when in ((rogue_crl, NOW), (pki.crl, NOW + timedelta(days=8))):
        with pytest.raises(TrustError) as exc:
            verify_package(jws_bytes, PAYLOAD, pki.ca.cert, crl, when)
        assert reason_of(exc) is Reason.CRL_INVALID


def test_certificate_without_lienthong_identity_is_refused(pki: Pki) -> None:
    key, _ = make_csr("27001", "x")
    builder = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "plain")]))
               .issuer_name(pki.ca.cert.subject).public_key(key.public_key()).serial_number(7)
               .not_valid_before(NOW - timedelta(days=1)).not_valid_after(NOW + timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(URN_FACILITY + "27001")]),
                              critical=False))
    from cryptography.hazmat.primitives import hashes

    cert = builder.sign(pki.ca.key, hashes.SHA256())
    with pytest.raises(TrustError) as exc:
        describe(cert)  # no serialNumber in the subject
    assert reason_of(exc) is Reason.WRONG_ROLE


# ---- request and response signatures, replay -----------------------------------------------------


PATH = "/exchange/messages/0d7c2f0e-1b2a-4c1e-9a57-3c1b7e0f4a11?dest=27002&stream=p-42&seq=3"
BODY = b'{"resourceType":"Bundle"}'


def verify(pki: Pki, headers: dict[str, str], store: Any, *, method: str = "POST", path: str = PATH,
           body: bytes = BODY, when: Any = NOW, **kw: Any) -> str:
    return verify_request(method, path, headers, body, pki.ca.cert, pki.crl, store, when, **kw)


def test_request_round_trip_and_replay(pki: Pki) -> None:
    store = MemoryNonceStore()
    headers = sign_request("POST", PATH, BODY, pki.node, NOW, "n0nce-0000000000001", audience="27000")
    assert set(headers) == {H_TIMESTAMP, H_NONCE, H_DIGEST, H_SIGNATURE, H_AUDIENCE}
    lowered = {k.lower(): v for k, v in headers.items()}  # header names are case-insensitive
    assert verify(pki, lowered, store, audience="27000") == "27001"
    with pytest.raises(TrustError) as exc:
        verify(pki, headers, store, audience="27000", when=NOW + timedelta(seconds=30))
    assert reason_of(exc) is Reason.REPLAY


def test_sql_nonce_store_rejects_replay_across_instances(engine: Engine, pki: Pki) -> None:
    headers = sign_request("POST", PATH, BODY, pki.node, NOW)
    assert verify(pki, headers, SqlNonceStore(engine)) == "27001"
    with pytest.raises(TrustError) as exc:
        verify(pki, headers, SqlNonceStore(engine), when=NOW + timedelta(seconds=1))  # e.g. another worker
    assert reason_of(exc) is Reason.REPLAY
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(schema.exchange_nonce)).scalar() == 1


def test_sql_nonce_store_forgets_after_the_window(engine: Engine) -> None:
    store = SqlNonceStore(engine, purge_every=1)
    t = NOW.timestamp()
    assert store.check_and_store("27001:a", t, 600)
    assert not store.check_and_store("27001:a", t + 599, 600)
    assert store.check_and_store("27001:b", t + 700, 600)  # purges "a"
    with engine.connect() as conn:
        assert [r[0] for r in conn.execute(select(schema.exchange_nonce.c.nonce))] == ["27001:b"]
    mem = MemoryNonceStore()
    assert mem.check_and_store("k", t, 600) and not mem.check_and_store("k", t + 10, 600)
    assert mem.check_and_store("k", t + 601, 600)


@pytest.mark.parametrize("skew", [-301, 301])
def test_stale_timestamp(pki: Pki, skew: int) -> None:
    headers = sign_request("POST", PATH, BODY, pki.node, NOW + timedelta(seconds=skew))
    with pytest.raises(TrustError) as exc:
        verify(pki, headers, MemoryNonceStore())
    assert reason_of(exc) is Reason.STALE
    assert verify(pki, sign_request("POST", PATH, BODY, pki.node, NOW + timedelta(seconds=299)),
                  MemoryNonceStore()) == "27001"


@pytest.mark.parametrize(("change", "reason"), [
    ({"method": "PUT"}, Reason.BAD_SIGNATURE),
    ({"path": PATH.replace("27002", "27003")}, Reason.BAD_SIGNATURE),
    ({"path": PATH + "&x=1"}, Reason.BAD_SIGNATURE),
    ({"body": BODY + b" "}, Reason.TAMPERED),
])
def test_request_alterations(pki: Pki, change: dict[str, Any], reason: Reason) -> None:
    headers = sign_request("POST", PATH, BODY, pki.node, NOW)
    with pytest.raises(TrustError) as exc:
        verify(pki, headers, MemoryNonceStore(), **change)
    assert reason_of(exc) is reason


def test_request_header_alterations(pki: Pki) -> None:
    base = sign_request("POST", PATH, BODY, pki.node, NOW, audience="27000")
    cases: list[tuple[dict[str, str], Reason, str | None]] = [
        ({**base, H_TIMESTAMP: str(int(NOW.timestamp()) + 1)}, Reason.BAD_SIGNATURE, "27000"),
        ({**base, H_NONCE: "another-nonce-123456"}, Reason.BAD_SIGNATURE, "27000"),
        ({**base, H_AUDIENCE: "27099"}, Reason.WRONG_AUDIENCE, "27000"),
        ({k: v for k, v in base.items() if k != H_AUDIENCE}, Reason.WRONG_AUDIENCE, "27000"),
        ({k: v for k, v in base.items() if k != H_SIGNATURE}, Reason.MALFORMED, None),
        ({**base, H_NONCE: "short"}, Reason.MALFORMED, None),
        ({**base, H_DIGEST: "md5=:abc:"}, Reason.MALFORMED, None),
    ]
    for headers, reason, audience in cases:
        with pytest.raises(TrustError) as exc:
            verify(pki, headers, MemoryNonceStore(), audience=audience)
        assert reason_of(exc) is reason, headers


def test_request_signer_role_and_revocation(pki: Pki) -> None:
    with pytest.raises(TrustError) as exc:  # a doctor's key does not authenticate a node
        verify(pki, sign_request("POST", PATH, BODY, pki.doctor, NOW), MemoryNonceStore())
    assert reason_of(exc) is Reason.WRONG_ROLE
    ca = ProvincialCA.create("CA yêu cầu", now=NOW)
    node = ca.issue_identity("27001", "Bệnh viện Đa khoa tỉnh Bắc Ninh", now=NOW)
    ca.revoke(node.cert.serial_number, now=NOW)
    with pytest.raises(TrustError) as exc:
        verify_request("POST", PATH, sign_request("POST", PATH, BODY, node, NOW), BODY, ca.cert, ca.crl(now=NOW),
                       MemoryNonceStore(), NOW)
    assert reason_of(exc) is Reason.REVOKED


def test_cached_verdict_gives_way_to_a_new_crl(pki: Pki) -> None:
    """Chain verdicts are cached per CRL object: once a CRL that lists the certificate is installed,
    the very next request and package from it are refused, however recently they were accepted."""
    ca = ProvincialCA.create("CA bộ nhớ đệm", now=NOW)
    node = ca.issue_identity("27001", "Bệnh viện Đa khoa tỉnh Bắc Ninh", now=NOW)
    store = TrustStore(ca.cert, ca.crl(now=NOW))
    sealed = seal_package(PAYLOAD, node, now=NOW)
    for _ in range(2):  # the second round is served from the cache
        assert verify_request("POST", PATH, sign_request("POST", PATH, BODY, node, NOW), BODY, store.anchor,
                              store.crl, MemoryNonceStore(), NOW) == "27001"
        assert open_package(sealed, store.anchor, store.crl, NOW).facility_code == "27001"
    ca.revoke(node.cert.serial_number, now=NOW)
    assert store.update_crl(ca.crl(now=NOW)) is True
    with pytest.raises(TrustError) as exc:
        verify_request("POST", PATH, sign_request("POST", PATH, BODY, node, NOW), BODY, store.anchor, store.crl,
                       MemoryNonceStore(), NOW)
    assert reason_of(exc) is Reason.REVOKED
    with pytest.raises(TrustError) as exc:
        open_package(sealed, store.anchor, store.crl, NOW)
    assert reason_of(exc) is Reason.REVOKED


def test_cached_verdict_still_checks_the_time(pki: Pki) -> None:
    """A cached chain is still refused once its certificate expired or the CRL passed its next update."""
    ca = ProvincialCA.create("CA thời hạn", now=NOW)
    node = ca.issue_identity("27001", "Bệnh viện Đa khoa tỉnh Bắc Ninh", validity=SHORT_VALIDITY, now=NOW)
    crl = ca.crl(now=NOW, next_update=timedelta(days=7))
    sealed = seal_package(PAYLOAD, node, now=NOW)
    assert open_package(sealed, ca.cert, crl, NOW).facility_code == "27001"
    with pytest.raises(TrustError) as exc:
        open_package(sealed, ca.cert, crl, NOW + SHORT_VALIDITY + timedelta(seconds=1))
    assert reason_of(exc) is Reason.EXPIRED
    with pytest.raises(TrustError) as exc:
        open_package(sealed, ca.cert, crl, NOW - timedelta(days=1))
    assert reason_of(exc) is Reason.NOT_YET_VALID
    long_lived = ca.issue_identity("27002", "Trung tâm Y tế huyện Yên Phong", now=NOW)
    sealed = seal_package(PAYLOAD, long_lived, now=NOW)
    assert open_package(sealed, ca.cert, crl, NOW).facility_code == "27002"
    with pytest.raises(TrustError) as exc:
        open_package(sealed, ca.cert, crl, NOW + timedelta(days=8), max_skew=10**9)
    assert reason_of(exc) is Reason.CRL_INVALID


def test_request_signatures_interoperate_with_joserfc(pki: Pki) -> None:
    """Requests are signed and checked without joserfc (speed), in the same JWS form: a peer that
    still uses joserfc verifies ours, and we verify its."""
    from joserfc import jws

    from lienthong.exchange.trust import _REGISTRY, _public_jwk, _request_canonical

    headers = sign_request("POST", PATH, BODY, pki.node, NOW, "interop-nonce-00001", audience="27000")
    canonical = _request_canonical("POST", PATH, BODY, int(NOW.timestamp()), "interop-nonce-00001", "27000")
    jws.deserialize_compact(headers[H_SIGNATURE], _public_jwk(pki.node.cert), registry=_REGISTRY, payload=canonical)
    protected = {"alg": "ES256", "typ": "lienthong-request+jws", "kid": pki.node.kid, "x5c": pki.node.x5c(leaf_only=True)}
    head, _, sig = jws.serialize_compact(protected, canonical, pki.node.jwk, registry=_REGISTRY).split(".")
    theirs = {**headers, H_SIGNATURE: f"{head}..{sig}"}
    assert verify(pki, theirs, MemoryNonceStore(), audience="27000") == "27001"
    flipped = sig[:-2] + ("A" if sig[-2] != "A" else "B") + sig[-1]
    with pytest.raises(TrustError) as exc:
        verify(pki, {**headers, H_SIGNATURE: f"{head}..{flipped}"}, MemoryNonceStore(), audience="27000")
    assert reason_of(exc) is Reason.BAD_SIGNATURE


def test_response_is_bound_to_the_request(pki: Pki) -> None:
    nonce = "request-nonce-000001"
    body = b'{"accepted":true}'
    headers = sign_response(200, body, pki.hub, NOW, nonce)
    assert verify_response(200, headers, body, pki.ca.cert, pki.crl, nonce, NOW, expected_code="27000") == "27000"
    cases: list[tuple[int, bytes, str, str | None, Reason]] = [
        (200, body, "another-request-0001", "27000", Reason.BAD_SIGNATURE),  # replayed to another request
        (500, body, nonce, "27000", Reason.BAD_SIGNATURE),
        (200, b'{"accepted":false}', nonce, "27000", Reason.TAMPERED),
        (200, body, nonce, "27001", Reason.WRONG_AUDIENCE),  # someone other than the hub answered
    ]
    for status, data, req_nonce, expected, reason in cases:
        with pytest.raises(TrustError) as exc:
            verify_response(status, headers, data, pki.ca.cert, pki.crl, req_nonce, NOW, expected_code=expected)
        assert reason_of(exc) is reason
    request_headers = sign_request("POST", PATH, body, pki.hub, NOW, nonce)
    with pytest.raises(TrustError) as exc:  # a request signature is not a response signature
        verify_response(200, request_headers, body, pki.ca.cert, pki.crl, nonce, NOW)
    assert reason_of(exc) is Reason.MALFORMED
