"""The exchange wire protocol over HTTP: `HttpTransport` (client) and `Receiver` (server side).

Why both here: the two halves of one protocol change together. The receiver
imports no web framework; the API layer only turns its request into
(method, raw path+query, headers, body) and the `Reply` back into a response.

Protocol (every request and response signed, see `trust`; all metadata sits in
the signed path, query or body, never in unsigned headers):

- `POST {base}/messages/{msg_id}?dest=NNNNN&stream=KEY&seq=N`, body = the
  compressed payload -> 200 `{"msg_id", "accepted", "duplicate", "reason"}`.
- Payloads larger than one chunk go as a resumable upload:
  `POST {base}/uploads/{msg_id}` with JSON `{dest, patient_key, total_size, sha256}`
  (idempotent) -> `{"received_size"}`; `PATCH {base}/uploads/{msg_id}?offset=N`
  with the next chunk -> `{"received_size"}` or, on the last one, `{"ack": {...}}`;
  409 `{"received_size"}` when the offset is not where the receiver is;
  `GET {base}/uploads/{msg_id}` is the status call a sender makes after a
  failure to learn where to resume (or the ack, if the upload had completed).
"""

from __future__ import annotations

import http.client
import logging
import re
import select
import socket
import threading
import time
import urllib.request
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, urlencode

import httpx
import orjson
from sqlalchemy import Connection, Engine

from lienthong.exchange.delivery import (
    GZIP_MAGIC,
    MAX_PAYLOAD,
    ZSTD_MAGIC,
    Ack,
    Clock,
    DeliveryError,
    Inbox,
    OffsetMismatch,
    OutboundMessage,
    Outbox,
    PayloadError,
    UploadError,
    UploadStore,
    Validator,
    decompress,
)
from lienthong.exchange.trust import (
    H_NONCE,
    NodeIdentity,
    NonceStore,
    Reason,
    Role,
    TrustError,
    TrustStore,
    new_nonce,
    open_package,
    sign_request,
    sign_response,
    verify_request,
    verify_response,
)

log = logging.getLogger(__name__)

CHUNK_SIZE = 256 * 1024
# Sized for 1 Mbit/s, 300 ms RTT and 5 % loss: TCP then sustains only about MSS/RTT * 1.22/sqrt(p)
# ≈ 200 kbit/s, so a 256 KiB chunk takes ~10 s; SYN retransmissions come after 1, 3 and 7 s; a read
# may stall for several back-to-back retransmission timeouts while the receiver assembles an upload.
DEFAULT_TIMEOUT = httpx.Timeout(connect=15.0, read=60.0, write=60.0, pool=15.0)
OCTETS = "application/octet-stream"
JSON_TYPE = "application/json"

_ROUTE = re.compile(r"/(messages|uploads|queries)/([A-Za-z0-9-]{8,40})$")
_NONCE_OK = re.compile(r"^[A-Za-z0-9_-]{16,64}$")


def _utc(clock: Clock) -> datetime:
    return datetime.fromtimestamp(clock(), UTC)


def _ack_json(msg_id: str, ack: Ack) -> dict[str, Any]:
    return {"msg_id": msg_id, "accepted": ack.accepted, "duplicate": ack.duplicate, "reason": ack.reason}


# ---- client ----------------------------------------------------------------------------------------


class _Peer:
    """Keep-alive HTTP/1.1 connections to one peer (`http.client`), shared by the sending threads.

    Why not httpx here: its request and response machinery cost about five times the CPU of
    `http.client` per request on this protocol's small signed messages, and a hub pays it twice
    per relayed message. Only used without a proxy (see `HttpTransport`); TLS uses httpx's
    default context, so certificate checks are the same either way. An idle connection the
    peer has closed is noticed before reuse and replaced; failed connects are retried twice,
    as `httpx.HTTPTransport(retries=2)` did.
    """

    def __init__(self, url: httpx.URL, timeout: httpx.Timeout, max_idle: int = 64) -> None:
        self.https = url.scheme == "https"
        self.host = url.host
        self.port = url.port or (443 if self.https else 80)
        self.connect_timeout = timeout.connect
        self.read_timeout = max(t for t in (timeout.read, timeout.write) if t is not None) \
            if timeout.read is not None or timeout.write is not None else None
        self.ssl = httpx.create_ssl_context() if self.https else None
        self.max_idle = max_idle
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()

    def _connect(self, timeout: float | None) -> http.client.HTTPConnection:
        for attempt in range(3):
            conn: http.client.HTTPConnection = (
                http.client.HTTPSConnection(self.host, self.port, timeout=timeout, context=self.ssl)
                if self.https else http.client.HTTPConnection(self.host, self.port, timeout=timeout))
            try:
                conn.connect()
            except OSError:
                conn.close()
                if attempt == 2:
                    raise
                time.sleep(0.5 * attempt)
                continue
            if conn.sock is not None:
                conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return conn
        raise AssertionError("unreachable")

    def _checkout(self, timeout: float | None) -> http.client.HTTPConnection:
        while True:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            if conn is None:
                return self._connect(timeout)
            if conn.sock is not None:
                poller = select.poll()  # not select.select: a busy server's descriptors pass 1024
                poller.register(conn.sock, select.POLLIN)
                if not poller.poll(0):  # an idle connection has nothing to say; if it has, the peer closed it
                    return conn
            conn.close()

    def request(self, method: str, target: str, headers: Mapping[str, str], body: bytes,
                timeout: float | None) -> tuple[int, dict[str, str], bytes]:
        conn = self._checkout(self.connect_timeout if timeout is None else timeout)
        try:
            if conn.sock is not None:
                conn.sock.settimeout(timeout if timeout is not None else self.read_timeout)
            conn.request(method, target, body=body if body or method != "GET" else None, headers=dict(headers))
            response = conn.getresponse()
            content = response.read()
        except BaseException:
            conn.close()
            raise
        if response.will_close:
            conn.close()
        else:
            with self._lock:
                if len(self._idle) < self.max_idle:
                    self._idle.append(conn)
                    conn = None  # type: ignore[assignment]
            if conn is not None:
                conn.close()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, content

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


def _proxied(url: httpx.URL) -> bool:
    """Whether the environment routes this URL through a proxy (httpx honours HTTP(S)_PROXY; so do we,
    by handing such peers to httpx)."""
    proxies = urllib.request.getproxies()
    return bool(proxies.get(url.scheme) or proxies.get("all")) and not urllib.request.proxy_bypass(url.host)


class HttpTransport:
    """Send outbox messages to the hub (or a node) over HTTP with signed requests and verified answers.

    A response that is not signed by `peer_code` for our request's nonce is a
    delivery failure, never an acknowledgement: only the real receiver can make
    a message `sent`.
    """

    def __init__(self, base_url: str, identity: NodeIdentity, trust: TrustStore, *, peer_code: str,
                 clock: Clock = time.time, chunk_size: int = CHUNK_SIZE, max_resumes: int = 16,
                 timeout: httpx.Timeout = DEFAULT_TIMEOUT, client: httpx.Client | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.identity = identity
        self.trust = trust
        self.peer_code = peer_code
        self.clock = clock
        self.chunk_size = chunk_size
        self.max_resumes = max_resumes
        parsed = httpx.URL(self.base_url)
        self._peer: _Peer | None = None
        if client is None and parsed.scheme in ("http", "https") and not _proxied(parsed):
            self._peer = _Peer(parsed, timeout)
            self._base_path = parsed.raw_path.decode("ascii").split("?")[0].rstrip("/")
        self.client = client or httpx.Client(timeout=timeout, transport=httpx.HTTPTransport(retries=2))

    def close(self) -> None:
        if self._peer is not None:
            self._peer.close()
        self.client.close()

    def request(self, method: str, path: str, query: Mapping[str, str | int] | None, body: bytes,
                content_type: str = OCTETS, timeout: float | None = None) -> tuple[int, bytes]:
        """One signed request; the answer counts only if `peer_code` signed it for our nonce. It goes over
        the peer's own keep-alive connections (`_Peer`) or, with an injected client or a proxy, httpx."""
        suffix = path + ("?" + urlencode(query) if query else "")
        built: httpx.Request | None = None
        if self._peer is not None:
            target = self._base_path + suffix
        else:
            built = self.client.build_request(method, self.base_url + suffix, content=body,
                                              headers={"Content-Type": content_type} if body else {},
                                              timeout=self.client.timeout if timeout is None else timeout)
            target = built.url.raw_path.decode("ascii")
        # `target` is exactly the path and query that go on the wire, which the signature covers.
        nonce = new_nonce()
        signed = sign_request(method, target, body, self.identity, _utc(self.clock), nonce, audience=self.peer_code)
        answer_headers: Mapping[str, str]
        try:
            if built is None:
                assert self._peer is not None
                headers = {**signed, "Content-Type": content_type} if body else signed
                status, answer_headers, content = self._peer.request(method, target, headers, body, timeout)
            else:
                built.headers.update(signed)
                response = self.client.send(built)
                status, answer_headers, content = response.status_code, response.headers, response.content
        except (httpx.HTTPError, OSError, http.client.HTTPException) as exc:
            raise DeliveryError(f"{method} {path}: {type(exc).__name__}: {exc}") from exc
        try:
            verify_response(status, answer_headers, content, self.trust.anchor, self.trust.crl, nonce,
                            _utc(self.clock), expected_code=self.peer_code)
        except TrustError as exc:
            raise DeliveryError(f"{method} {path}: HTTP {status}, unauthenticated answer: {exc.reason}") from None
        return status, content

    def _call(self, method: str, path: str, query: Mapping[str, str | int] | None, body: bytes,
              content_type: str = OCTETS) -> tuple[int, dict[str, Any]]:
        status, content = self.request(method, path, query, body, content_type)
        try:
            data = orjson.loads(content) if content else {}
        except orjson.JSONDecodeError:
            raise DeliveryError(f"{method} {path}: HTTP {status}, answer is not JSON") from None
        if not isinstance(data, dict):
            raise DeliveryError(f"{method} {path}: answer is not an object")
        return status, data

    @staticmethod
    def _ack(data: Any, message: OutboundMessage) -> Ack:
        if (not isinstance(data, dict) or data.get("msg_id") != message.msg_id
                or not isinstance(data.get("accepted"), bool)):
            raise DeliveryError("acknowledgement does not match the message")
        reason = data.get("reason")
        return Ack(data["accepted"], bool(data.get("duplicate")), reason if isinstance(reason, str) else None)

    def send(self, message: OutboundMessage) -> Ack:
        if message.size <= self.chunk_size:
            status, data = self._call("POST", f"/messages/{message.msg_id}",
                                      {"dest": message.dest, "stream": message.patient_key, "seq": message.seq},
                                      message.payload)
            if status != 200:
                raise DeliveryError(f"HTTP {status}: {data.get('error')}")
            return self._ack(data, message)
        return self._upload(message)

    def _begin(self, message: OutboundMessage) -> tuple[int, dict[str, Any]]:
        meta = {"dest": message.dest, "patient_key": message.patient_key, "total_size": message.size,
                "sha256": message.sha256}
        return self._call("POST", f"/uploads/{message.msg_id}", None, orjson.dumps(meta), JSON_TYPE)

    def _upload(self, message: OutboundMessage) -> Ack:
        """Send in chunks; after a failure ask the receiver where it is and continue from there."""
        status, data = self._begin(message)
        resumes = 0
        while True:
            if status == 404:  # purged, or discarded after a checksum mismatch: start again
                status, data = self._begin(message)
            if status not in (200, 409) or ("ack" not in data and not isinstance(data.get("received_size"), int)):
                raise DeliveryError(f"upload: HTTP {status}: {data.get('error')}")
            if "ack" in data:
                return self._ack(data["ack"], message)
            offset = int(data["received_size"])
            if not 0 <= offset < message.size:
                raise DeliveryError(f"upload: receiver reports offset {offset} of {message.size}")
            try:
                status, data = self._call("PATCH", f"/uploads/{message.msg_id}", {"offset": offset},
                                          message.payload[offset:offset + self.chunk_size])
            except DeliveryError as exc:
                resumes += 1
                if resumes > self.max_resumes:
                    raise
                log.info("upload %s interrupted at %d (%s); asking where to resume", message.msg_id, offset, exc)
                status, data = self._call("GET", f"/uploads/{message.msg_id}", None, b"")
            if status == 422:
                raise DeliveryError(f"upload: {data.get('error')}")


# ---- server ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)


Authorize = Callable[[str, str], str | None]  # (source, dest) -> reason to refuse, or None
# (source, query id, body) -> (status, body, content type): a synchronous query (see exchange.query)
QueryHandler = Callable[[str, str, bytes], tuple[int, bytes, str]]


class Receiver:
    """The receiving end of the protocol, for the hub and for nodes; knows no web framework.

    With `relay` (the hub), a message for another facility is stored in the
    inbox and queued in the outbox in one transaction under its original
    msg_id; without it, only messages addressed to this unit are accepted.
    `authorize` lets the caller refuse an exchange (e.g. a unit whose security
    clearance is pending or suspended). `on_stored` is called after a new
    message committed.
    """

    def __init__(self, engine: Engine, identity: NodeIdentity, trust: TrustStore, nonce_store: NonceStore, *,
                 inbox: Inbox | None = None, uploads: UploadStore | None = None, relay: Outbox | None = None,
                 authorize: Authorize | None = None, queries: QueryHandler | None = None,
                 on_stored: Callable[[], None] | None = None,
                 clock: Clock = time.time,
                 allowed_roles: Collection[Role] = (Role.FACILITY, Role.HUB),
                 max_message: int = 8 * 1024 * 1024, max_chunk: int = 4 * 1024 * 1024) -> None:
        self.engine = engine
        self.identity = identity
        self.trust = trust
        self.nonce_store = nonce_store
        self.inbox = inbox or Inbox(clock)
        self.uploads = uploads or UploadStore(clock, MAX_PAYLOAD)
        self.relay = relay
        self.authorize = authorize
        self.queries = queries
        self.on_stored = on_stored  # e.g. the hub wakes its dispatcher: relayed at once, not at the next poll
        self.clock = clock
        self.allowed_roles = allowed_roles
        self.max_message = max_message
        self.max_chunk = max_chunk

    @property
    def code(self) -> str:
        return self.identity.facility_code

    def _reply(self, status: int, data: Mapping[str, Any] | bytes, request_nonce: str | None,
               content_type: str = JSON_TYPE) -> Reply:
        body = data if isinstance(data, bytes) else orjson.dumps(data)
        headers = {"Content-Type": content_type}
        if request_nonce and _NONCE_OK.match(request_nonce):
            headers.update(sign_response(status, body, self.identity, _utc(self.clock), request_nonce))
        return Reply(status, body, headers)

    def handle(self, method: str, target: str, headers: Mapping[str, str], body: bytes) -> Reply:
        """Serve one request; `target` is the raw path and query exactly as received."""
        nonce = {k.lower(): v for k, v in headers.items()}.get(H_NONCE.lower())
        path, _, query = target.partition("?")
        route = _ROUTE.search(path)
        if route is None:
            return self._reply(404, {"error": "not-found"}, nonce)
        try:
            source = verify_request(method, target, headers, body, self.trust.anchor, self.trust.crl,
                                    self.nonce_store, _utc(self.clock), audience=self.code, roles=self.allowed_roles)
        except TrustError as exc:
            log.warning("exchange: refused %s %s: %s", method, path, exc)
            return self._reply(401, {"error": str(exc.reason)}, nonce)
        params = {k: v[0] for k, v in parse_qs(query, keep_blank_values=True).items()}
        kind, msg_id = route.group(1), route.group(2)
        try:
            if kind == "messages" and method == "POST":
                return self._message(source, msg_id, params, body, nonce)
            if kind == "uploads" and method == "POST":
                return self._begin_upload(source, msg_id, body, nonce)
            if kind == "uploads" and method == "GET":
                return self._upload_status(source, msg_id, nonce)
            if kind == "uploads" and method == "PATCH":
                return self._append(source, msg_id, params, body, nonce)
            if kind == "queries" and method == "POST" and self.queries is not None:
                status, answer, content_type = self.queries(source, msg_id, body)
                return self._reply(status, answer, nonce, content_type)
        except (UploadError, ValueError) as exc:
            return self._reply(400, {"error": str(exc)}, nonce)
        except TrustError as exc:  # our own trust state is unusable (e.g. CRL out of date): try again later
            log.error("exchange: cannot judge %s %s: %s", method, path, exc)
            return self._reply(503, {"error": str(exc.reason)}, nonce)
        return self._reply(405, {"error": "method-not-allowed"}, nonce)

    def _accept(self, conn: Connection, source: str, msg_id: str, dest: str, patient_key: str, payload: bytes) -> Ack:
        """Store (and, on the hub, relay) one complete message inside the caller's transaction."""
        relaying = dest != self.code
        if self.inbox.state(conn, msg_id) is None:  # a first arrival: check it may be accepted at all
            refusal = "wrong-destination" if relaying and self.relay is None else None
            if refusal is None and self.authorize is not None:
                refusal = self.authorize(source, dest)
            if refusal is None and relaying and not payload.startswith((ZSTD_MAGIC, GZIP_MAGIC)):
                refusal = "not-compressed"
            if refusal is not None:
                return Ack(False, False, refusal)
        relay = self.relay if relaying else None
        # Relayed: stored as processed, since queuing it onward below is all the processing it gets.
        receipt = self.inbox.receive(conn, msg_id, source, payload, processed=relay is not None)
        if not receipt.accepted:
            state = self.inbox.state(conn, msg_id)
            return Ack(False, receipt.duplicate, state[2] if state and state[0] == source else "rejected")
        if not receipt.duplicate and relay is not None:
            relay.enqueue_compressed(conn, dest, patient_key, payload, msg_id=msg_id)
        return Ack(True, receipt.duplicate)

    def _message(self, source: str, msg_id: str, params: Mapping[str, str], body: bytes, nonce: str | None) -> Reply:
        dest, stream = params.get("dest", ""), params.get("stream", "")
        if not re.fullmatch(r"\d{5}", dest) or not stream:
            return self._reply(400, {"error": "dest and stream are required"}, nonce)
        if len(body) > self.max_message:
            return self._reply(413, {"error": "too-large, use an upload"}, nonce)
        with self.engine.begin() as conn:
            ack = self._accept(conn, source, msg_id, dest, stream, body)
        self._stored(ack)
        return self._reply(200, _ack_json(msg_id, ack), nonce)

    def _stored(self, ack: Ack) -> None:
        if ack.accepted and not ack.duplicate and self.on_stored is not None:
            self.on_stored()

    def _delivered(self, conn: Connection, source: str, msg_id: str) -> dict[str, Any] | None:
        """The ack for an upload whose message already arrived (its final answer was lost)."""
        state = self.inbox.state(conn, msg_id)
        if state is None or state[0] != source:
            return None
        return _ack_json(msg_id, Ack(state[1] != "rejected", True, state[2]))

    def _begin_upload(self, source: str, msg_id: str, body: bytes, nonce: str | None) -> Reply:
        try:
            meta = orjson.loads(body)
            dest, patient_key = str(meta["dest"]), str(meta["patient_key"])
            total, sha256 = int(meta["total_size"]), str(meta["sha256"])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return self._reply(400, {"error": "upload needs dest, patient_key, total_size, sha256"}, nonce)
        with self.engine.begin() as conn:
            done = self._delivered(conn, source, msg_id)
            if done is not None:
                return self._reply(200, {"ack": done}, nonce)
            state = self.uploads.begin(conn, msg_id, source, dest, patient_key, total, sha256)
        return self._reply(200, {"received_size": state.received_size, "total_size": state.total_size}, nonce)

    def _upload_status(self, source: str, msg_id: str, nonce: str | None) -> Reply:
        with self.engine.connect() as conn:
            done = self._delivered(conn, source, msg_id)
            if done is not None:
                return self._reply(200, {"ack": done}, nonce)
            state = self.uploads.state(conn, msg_id, source)
        if state is None:
            return self._reply(404, {"error": "no-upload"}, nonce)
        return self._reply(200, {"received_size": state.received_size, "total_size": state.total_size}, nonce)

    def _append(self, source: str, msg_id: str, params: Mapping[str, str], body: bytes, nonce: str | None) -> Reply:
        try:
            offset = int(params["offset"])
        except (KeyError, ValueError):
            return self._reply(400, {"error": "offset is required"}, nonce)
        if len(body) > self.max_chunk:
            return self._reply(413, {"error": "chunk too large"}, nonce)
        with self.engine.begin() as conn:
            if self.uploads.state(conn, msg_id, source) is None:
                done = self._delivered(conn, source, msg_id)
                if done is not None:
                    return self._reply(200, {"ack": done}, nonce)
                return self._reply(404, {"error": "no-upload"}, nonce)
            try:
                state = self.uploads.append(conn, msg_id, source, offset, body)
            except OffsetMismatch as exc:
                return self._reply(409, {"received_size": exc.received_size}, nonce)
            if not state.complete:
                return self._reply(200, {"received_size": state.received_size, "total_size": state.total_size},
                                   nonce)
            try:
                data = self.uploads.assemble(conn, msg_id, source)
            except UploadError as exc:  # the upload is discarded (committed with this block): start again
                return self._reply(422, {"error": str(exc)}, nonce)
            # Assembling, deleting the upload and storing the message commit together.
            ack = self._accept(conn, source, msg_id, state.dest, state.patient_key, data)
        self._stored(ack)
        return self._reply(200, {"received_size": state.total_size, "ack": _ack_json(msg_id, ack)}, nonce)


def package_validator(trust: TrustStore, clock: Clock = time.time, max_size: int = MAX_PAYLOAD) -> Validator:
    """An `Inbox` validator for a destination node: the message must be a sealed package with valid signatures.

    Refusing at receipt puts the reason code (`revoked`, `tampered`, ...) in
    the acknowledgement, so the sender's outbox shows why. An out-of-date CRL
    is this node's problem, not the sender's: it raises, the request fails,
    and the sender retries later instead of giving up.
    """

    def validate(source: str, payload: bytes) -> str | None:
        try:
            open_package(decompress(payload, max_size), trust.anchor, trust.crl, _utc(clock))
        except PayloadError:
            return str(Reason.MALFORMED)
        except TrustError as exc:
            if exc.reason is Reason.CRL_INVALID:
                raise
            return str(exc.reason)
        return None

    return validate
