"""The HTTP wire protocol end to end (httpx MockTransport, no sockets): signing, relay, resumable uploads;
and the direct client over real sockets (connection reuse, a peer closing an idle connection)."""

from __future__ import annotations

import hashlib
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import orjson
import pytest
from sqlalchemy import Engine, func, select

from lienthong.exchange.delivery import (
    DEAD,
    FAILED,
    SENT,
    DeliveryError,
    Dispatcher,
    Inbox,
    OutboundMessage,
    Outbox,
    compress,
    decompress,
)
from lienthong.exchange.schema import inbox as inbox_table
from lienthong.exchange.schema import outbox as outbox_table
from lienthong.exchange.schema import upload
from lienthong.exchange.transport import DEFAULT_TIMEOUT, HttpTransport, Receiver, package_validator
from lienthong.exchange.trust import (
    ProvincialCA,
    Role,
    SqlNonceStore,
    TrustStore,
    open_package,
    seal_package,
    sign_request,
    sign_response,
)

from .conftest import NOW, FakeClock, Pki, new_engine

HUB_URL = "https://hub.bacninh.test/lienthong/exchange"


@dataclass
class Wire:
    """An httpx MockTransport in front of a Receiver, with hooks to lose requests or responses."""

    receiver: Receiver
    log: list[tuple[str, str]] = field(default_factory=list)
    before: Callable[[httpx.Request, int], None] | None = None  # may raise: the request never arrives
    after: Callable[[httpx.Request, int], None] | None = None  # may raise: the response is lost
    tamper: Callable[[httpx.Response], httpx.Response] | None = None

    def __call__(self, request: httpx.Request) -> httpx.Response:
        n = len(self.log)
        self.log.append((request.method, request.url.raw_path.decode()))
        if self.before:
            self.before(request, n)
        reply = self.receiver.handle(request.method, request.url.raw_path.decode(), request.headers, request.content)
        if self.after:
            self.after(request, n)
        response = httpx.Response(reply.status, headers=reply.headers, content=reply.body)
        return self.tamper(response) if self.tamper else response

    def client(self) -> httpx.Client:
        return httpx.Client(transport=httpx.MockTransport(self))

    def patches(self) -> list[int]:
        return [int(path.rsplit("offset=", 1)[1]) for method, path in self.log if method == "PATCH"]


@pytest.fixture
def hub_db(tmp_path: Path) -> Engine:
    return new_engine(tmp_path / "hub.db")


@pytest.fixture
def node_db(tmp_path: Path) -> Engine:
    return new_engine(tmp_path / "node.db")


def hub_receiver(pki: Pki, hub_db: Engine, clock: FakeClock, **kw: object) -> Receiver:
    return Receiver(hub_db, pki.hub, pki.trust(), SqlNonceStore(hub_db), relay=Outbox(clock), clock=clock,
                    **kw)  # type: ignore[arg-type]


def node_transport(pki: Pki, wire: Wire, clock: FakeClock, **kw: object) -> HttpTransport:
    return HttpTransport(HUB_URL, pki.node, pki.trust(), peer_code="27000", clock=clock, client=wire.client(),
                         **kw)  # type: ignore[arg-type]


def enqueue(engine: Engine, clock: FakeClock, payload: bytes, dest: str = "27002", key: str = "p-1") -> str:
    with engine.begin() as conn:
        return Outbox(clock).enqueue(conn, dest, key, payload)


def outbox_status(engine: Engine, msg_id: str) -> str:
    with engine.connect() as conn:
        entry = Outbox.get(conn, msg_id)
    assert entry is not None
    return entry.status


def test_timeouts_suit_a_slow_lossy_link() -> None:
    assert DEFAULT_TIMEOUT.connect is not None and DEFAULT_TIMEOUT.connect >= 10  # survives lost SYNs (1, 3, 7 s)
    assert DEFAULT_TIMEOUT.write is not None and DEFAULT_TIMEOUT.write >= 30  # a 256 KiB chunk at ~200 kbit/s
    assert DEFAULT_TIMEOUT.read is not None and DEFAULT_TIMEOUT.read >= 30


def test_message_to_hub_then_relayed_to_the_destination(pki: Pki, hub_db: Engine, node_db: Engine,
                                                         tmp_path: Path, clock: FakeClock) -> None:
    document = orjson.dumps({"resourceType": "Bundle", "type": "document", "entry": []})
    msg_id = enqueue(node_db, clock, document)
    to_hub = Wire(hub_receiver(pki, hub_db, clock))
    assert Dispatcher(node_db, node_transport(pki, to_hub, clock), clock).run_once().sent == 1
    assert outbox_status(node_db, msg_id) == SENT
    assert to_hub.log == [("POST", f"/lienthong/exchange/messages/{msg_id}?dest=27002&stream=p-1&seq=1")]
    with hub_db.connect() as conn:
        entry = Inbox.get(conn, msg_id)
        relayed = Outbox.get(conn, msg_id)
    assert entry is not None and entry.source == "27001" and entry.status == "processed"
    assert relayed is not None and relayed.dest == "27002" and relayed.status == "pending"  # same msg_id

    dest_db = new_engine(tmp_path / "dest.db")
    dest = Receiver(dest_db, pki.other, pki.trust(), SqlNonceStore(dest_db), clock=clock, allowed_roles=(Role.HUB,))
    to_dest = Wire(dest)
    hub_transport = HttpTransport("https://yenphong.test/exchange", pki.hub, pki.trust(), peer_code="27002",
                                  clock=clock, client=to_dest.client())
    assert Dispatcher(hub_db, hub_transport, clock).run_once().sent == 1
    received: list[bytes] = []
    Inbox(clock).process(dest_db, lambda conn, e: received.append(decompress(e.payload or b"")))
    assert received == [document]
    with dest_db.connect() as conn:
        final = Inbox.get(conn, msg_id)
    assert final is not None and final.source == "27000"


def test_duplicate_send_gets_the_same_ack(pki: Pki, hub_db: Engine, clock: FakeClock) -> None:
    transport = node_transport(pki, Wire(hub_receiver(pki, hub_db, clock)), clock)
    payload = compress(b"once")
    message = OutboundMessage("0f0e0d0c-0000-4000-8000-000000000001", "27002", "p-1", 1, payload,
                              hashlib.sha256(payload).hexdigest(), len(payload), 1)
    first, second = transport.send(message), transport.send(message)
    assert (first.accepted, first.duplicate) == (True, False)
    assert (second.accepted, second.duplicate) == (True, True)
    with hub_db.connect() as conn:
        assert conn.execute(select(func.count()).select_from(outbox_table)).scalar() == 1  # relayed once


def test_resumable_upload_across_interrupted_chunks(pki: Pki, hub_db: Engine, node_db: Engine,
                                                     clock: FakeClock) -> None:
    payload = random.Random(7).randbytes(10_000)  # incompressible: about ten 1 KiB chunks
    msg_id = enqueue(node_db, clock, payload)
    patches = {"n": 0}
    interruptions: list[str] = []

    def lose_request(request: httpx.Request, n: int) -> None:
        if request.method == "PATCH":
            patches["n"] += 1
            if patches["n"] == 2:
                interruptions.append("request lost")
                raise httpx.ConnectError("connection reset", request=request)

    def lose_response(request: httpx.Request, n: int) -> None:
        last = int(request.url.params["offset"]) + len(request.content) >= 10_000 if request.method == "PATCH" else 0
        if request.method == "PATCH" and (patches["n"] in (4, 5) or last):  # it arrived; we never hear back
            interruptions.append("response lost" + (" (the final ack)" if last else ""))
            raise httpx.ReadTimeout("timed out", request=request)

    wire = Wire(hub_receiver(pki, hub_db, clock), before=lose_request, after=lose_response)
    transport = node_transport(pki, wire, clock, chunk_size=1024)
    assert Dispatcher(node_db, transport, clock).run_once().sent == 1
    assert outbox_status(node_db, msg_id) == SENT
    with node_db.connect() as conn:
        stored = conn.execute(select(outbox_table.c.payload, outbox_table.c.size)
                              .where(outbox_table.c.msg_id == msg_id)).one()
    with hub_db.connect() as conn:
        entry = Inbox.get(conn, msg_id)
        assert conn.execute(select(func.count()).select_from(upload)).scalar() == 0
    assert entry is not None and entry.payload == stored[0] and decompress(entry.payload or b"") == payload
    methods = [m for m, _ in wire.log]
    assert interruptions[-1] == "response lost (the final ack)" and len(interruptions) == 4
    assert methods[0] == "POST" and methods.count("GET") == 4  # one status call per interruption
    assert methods[-1] == "GET"  # the status call answered with the acknowledgement
    offsets = wire.patches()
    assert offsets == sorted(offsets) and offsets.count(0) == 1  # never restarted from the beginning
    assert len(offsets) <= -(-stored[1] // 1024) + 1  # only the lost request's chunk was sent twice


def test_upload_resumes_in_a_later_attempt(pki: Pki, hub_db: Engine, node_db: Engine, clock: FakeClock) -> None:
    payload = random.Random(8).randbytes(8_000)
    msg_id = enqueue(node_db, clock, payload)
    down = {"after": 3}

    def link_drops(request: httpx.Request, n: int) -> None:
        if request.method in ("PATCH", "GET") and n >= down["after"]:
            raise httpx.ConnectError("network unreachable", request=request)

    wire = Wire(hub_receiver(pki, hub_db, clock), before=link_drops)
    dispatcher = Dispatcher(node_db, node_transport(pki, wire, clock, chunk_size=1024, max_resumes=2), clock)
    assert dispatcher.run_once().failed == 1
    assert outbox_status(node_db, msg_id) == FAILED
    progress = max(wire.patches())
    down["after"] = 10**9  # the link is back
    clock.advance(61)
    wire.log.clear()
    assert dispatcher.run_once().sent == 1
    assert wire.log[0][0] == "POST" and min(wire.patches()) == progress  # picked up where the hub was
    with hub_db.connect() as conn:
        entry = Inbox.get(conn, msg_id)
    assert entry is not None and decompress(entry.payload or b"") == payload


def test_upload_checksum_mismatch_is_refused_and_discarded(pki: Pki, hub_db: Engine, clock: FakeClock) -> None:
    transport = node_transport(pki, Wire(hub_receiver(pki, hub_db, clock)), clock, chunk_size=1024)
    payload = compress(random.Random(9).randbytes(3000))
    message = OutboundMessage("0f0e0d0c-0000-4000-8000-000000000002", "27002", "p-1", 1, payload,
                              hashlib.sha256(b"something else").hexdigest(), len(payload), 1)
    with pytest.raises(DeliveryError, match="SHA-256"):
        transport.send(message)
    with hub_db.connect() as conn:
        assert conn.execute(select(func.count()).select_from(upload)).scalar() == 0
        assert conn.execute(select(func.count()).select_from(inbox_table)).scalar() == 0


def test_only_the_real_hub_can_acknowledge(pki: Pki, hub_db: Engine, node_db: Engine, clock: FakeClock) -> None:
    """A man in the middle answering 200 "accepted" must not make the message `sent`."""
    msg_id = enqueue(node_db, clock, b"needs a real ack")
    wire = Wire(hub_receiver(pki, hub_db, clock))
    nonces: list[str] = []
    wire.before = lambda request, n: nonces.append(request.headers["x-lienthong-nonce"])
    forgeries: list[Callable[[httpx.Response], httpx.Response]] = [
        lambda r: httpx.Response(200, content=r.content),  # signature headers stripped
        lambda r: httpx.Response(200, content=r.content,  # signed, but by a facility, not the hub
                                 headers=sign_response(200, r.content, pki.other, NOW, nonces[-1])),
        lambda r: httpx.Response(200, content=r.content.replace(b"true", b"false"), headers=r.headers),
    ]
    dispatcher = Dispatcher(node_db, node_transport(pki, wire, clock), clock)
    for forge in forgeries:
        wire.tamper = forge
        result = dispatcher.run_once()
        assert (result.sent, result.failed) == (0, 1)
        assert outbox_status(node_db, msg_id) == FAILED
        clock.advance(61)
    wire.tamper = None
    assert dispatcher.run_once().sent == 1


def test_receiver_rejects_replays_and_misaddressed_requests(pki: Pki, hub_db: Engine, clock: FakeClock) -> None:
    receiver = hub_receiver(pki, hub_db, clock)
    body = compress(b"x")
    path = "/exchange/messages/0f0e0d0c-0000-4000-8000-000000000003?dest=27002&stream=p-1&seq=1"
    when = NOW
    headers = sign_request("POST", path, body, pki.node, when, audience="27000")
    assert receiver.handle("POST", path, headers, body).status == 200
    replay = receiver.handle("POST", path, headers, body)
    assert (replay.status, orjson.loads(replay.body)) == (401, {"error": "replay"})
    wrong = sign_request("POST", path, body, pki.node, when, audience="27002")
    assert orjson.loads(receiver.handle("POST", path, wrong, body).body) == {"error": "wrong-audience"}
    clock.advance(600)
    stale = sign_request("POST", path, body, pki.node, when, audience="27000")
    assert orjson.loads(receiver.handle("POST", path, stale, body).body) == {"error": "stale"}
    assert receiver.handle("GET", "/exchange/other", {}, b"").status == 404


def test_node_accepts_only_the_hub_and_only_its_own_messages(pki: Pki, tmp_path: Path, clock: FakeClock) -> None:
    dest_db = new_engine(tmp_path / "dest.db")
    dest = Receiver(dest_db, pki.other, pki.trust(), SqlNonceStore(dest_db), clock=clock, allowed_roles=(Role.HUB,))
    node_to_node = HttpTransport("https://yenphong.test/exchange", pki.node, pki.trust(), peer_code="27002",
                                 clock=clock, client=Wire(dest).client())
    payload = compress(b"bypassing the hub")
    message = OutboundMessage("0f0e0d0c-0000-4000-8000-000000000004", "27002", "p-1", 1, payload,
                              hashlib.sha256(payload).hexdigest(), len(payload), 1)
    with pytest.raises(DeliveryError, match="HTTP 401"):
        node_to_node.send(message)
    from_hub = HttpTransport("https://yenphong.test/exchange", pki.hub, pki.trust(), peer_code="27002",
                             clock=clock, client=Wire(dest).client())
    misaddressed = OutboundMessage("0f0e0d0c-0000-4000-8000-000000000005", "27003", "p-1", 1, payload,
                                   hashlib.sha256(payload).hexdigest(), len(payload), 1)
    ack = from_hub.send(misaddressed)
    assert (ack.accepted, ack.reason) == (False, "wrong-destination")


def test_hub_refuses_a_destination_without_clearance(pki: Pki, hub_db: Engine, node_db: Engine,
                                                     clock: FakeClock) -> None:
    suspended = {"27009": "clearance-suspended"}
    receiver = hub_receiver(pki, hub_db, clock, authorize=lambda source, dest: suspended.get(dest))
    dispatcher = Dispatcher(node_db, node_transport(pki, Wire(receiver), clock), clock)
    refused, allowed = enqueue(node_db, clock, b"a", dest="27009"), enqueue(node_db, clock, b"b", key="p-2")
    assert dispatcher.run_once() == (1, 0, 1)
    assert outbox_status(node_db, refused) == DEAD and outbox_status(node_db, allowed) == SENT
    with node_db.connect() as conn:
        entry = Outbox.get(conn, refused)
    assert entry is not None and entry.last_error == "rejected: clearance-suspended"
    with hub_db.connect() as conn:
        assert Inbox.get(conn, refused) is None  # nothing stored for a refused exchange


def test_destination_checks_package_signatures_at_receipt(tmp_path: Path, clock: FakeClock) -> None:
    """Node A seals a transfer package, the hub relays it, node B verifies it before acknowledging."""
    ca = ProvincialCA.create("Sở Y tế Bắc Ninh - CA liên thông", now=NOW)
    hub = ca.issue_identity("27000", "Hub", role=Role.HUB, now=NOW)
    node_a = ca.issue_identity("27001", "Bệnh viện Đa khoa tỉnh Bắc Ninh", now=NOW)
    node_b = ca.issue_identity("27002", "Trung tâm Y tế huyện Yên Phong", now=NOW)
    doctor = ca.issue_identity("27001", "BS. Lê Văn Cường", role=Role.PRACTITIONER, practitioner_id="C-7", now=NOW)
    revoked = ca.issue_identity("27001", "BS. Đã nghỉ", role=Role.PRACTITIONER, practitioner_id="D-8", now=NOW)
    ca.revoke(revoked.cert.serial_number, now=NOW)
    trust = TrustStore(ca.cert, ca.crl(now=NOW))
    a_db, hub_db, b_db = (new_engine(tmp_path / f"{n}.db") for n in ("a", "hub", "b"))
    b_inbox = Inbox(clock, validator=package_validator(trust, clock))
    to_b = Receiver(b_db, node_b, trust, SqlNonceStore(b_db), inbox=b_inbox, clock=clock, allowed_roles=(Role.HUB,))
    to_hub = Receiver(hub_db, hub, trust, SqlNonceStore(hub_db), relay=Outbox(clock), clock=clock)
    a_out = Dispatcher(a_db, HttpTransport(HUB_URL, node_a, trust, peer_code="27000", clock=clock,
                                           client=Wire(to_hub).client()), clock)
    hub_out = Dispatcher(hub_db, HttpTransport("https://b.test/exchange", hub, trust, peer_code="27002", clock=clock,
                                               client=Wire(to_b).client()), clock)
    bundle = orjson.dumps({"resourceType": "Bundle", "type": "document", "id": "chuyen-tuyen-1"})
    with a_db.begin() as conn:
        good = Outbox(clock).enqueue(conn, "27002", "p-1", seal_package(bundle, node_a, [doctor], now=NOW))
        bad = Outbox(clock).enqueue(conn, "27002", "p-2", seal_package(bundle, node_a, [revoked], now=NOW))
    assert a_out.run_once().sent == 2  # the hub only relays; it does not open packages
    assert hub_out.run_once() == (1, 0, 1)
    with hub_db.connect() as conn:
        sent, refused = Outbox.get(conn, good), Outbox.get(conn, bad)
    assert sent is not None and sent.status == SENT
    assert refused is not None and (refused.status, refused.last_error) == (DEAD, "rejected: revoked")
    opened: list[str] = []
    b_inbox.process(b_db, lambda conn, e: opened.append(
        open_package(decompress(e.payload or b""), trust.anchor, trust.crl, NOW).signers[1].subject))
    assert opened == ["2.5.4.5=27001,CN=BS. Lê Văn Cường,O=lienthong,C=VN"]


# ---- the direct client over real sockets ----------------------------------------------------------


class _ReceiverHandler(BaseHTTPRequestHandler):
    """A keep-alive HTTP/1.1 server in front of a Receiver; `drop_after` closes each connection after
    that many requests without saying so (as a peer's idle timeout does)."""

    protocol_version = "HTTP/1.1"
    receiver: Receiver
    drop_after = 0
    served: list[int]  # requests served on each connection, in the order they were opened

    def setup(self) -> None:
        super().setup()
        self.index = len(self.served)
        self.served.append(0)

    def _serve(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        reply = self.receiver.handle(self.command, self.path, dict(self.headers.items()), body)
        self.send_response(reply.status)
        for key, value in reply.headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(reply.body)))
        self.end_headers()
        self.wfile.write(reply.body)
        self.wfile.flush()
        self.served[self.index] += 1
        if self.drop_after and self.served[self.index] >= self.drop_after:
            self.close_connection = True  # silently: no "Connection: close" header was sent

    do_POST = do_GET = do_PATCH = _serve

    def log_message(self, *args: object) -> None:
        pass


def _serve_receiver(receiver: Receiver, drop_after: int = 0) -> tuple[ThreadingHTTPServer, list[int]]:
    served: list[int] = []
    handler = type("Handler", (_ReceiverHandler,), {"receiver": receiver, "drop_after": drop_after,
                                                      "served": served})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, served


def test_direct_client_reuses_connections_and_replaces_closed_ones(pki: Pki, hub_db: Engine, node_db: Engine,
                                                                   clock: FakeClock) -> None:
    """Without an injected httpx client (and no proxy) the transport keeps its own connections:
    signed both ways as before, kept alive, and one the peer closed while idle is replaced."""
    server, served = _serve_receiver(hub_receiver(pki, hub_db, clock), drop_after=2)
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}/exchange"
        transport = HttpTransport(base, pki.node, pki.trust(), peer_code="27000", clock=clock)
        assert transport._peer is not None  # the direct path, not httpx
        ids = [enqueue(node_db, clock, b"document %d" % k, key=f"p-{k}") for k in range(5)]
        assert Dispatcher(node_db, transport, clock).run_once().sent == 5
        assert [outbox_status(node_db, m) for m in ids] == [SENT] * 5
        assert served == [2, 2, 1]  # two requests per connection, then a new one
        with hub_db.connect() as conn:
            assert all((e := Inbox.get(conn, m)) is not None and e.source == "27001" for m in ids)
        transport.close()
    finally:
        server.shutdown()
        server.server_close()


def test_direct_client_refuses_an_unsigned_answer_and_reports_an_unreachable_peer(pki: Pki, clock: FakeClock) -> None:
    class Unsigned(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            body = b'{"accepted": true}'
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Unsigned)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    try:
        transport = HttpTransport(f"http://127.0.0.1:{port}/exchange", pki.node, pki.trust(), peer_code="27000",
                                  clock=clock)
        with pytest.raises(DeliveryError, match="unauthenticated answer"):
            transport.request("POST", "/messages/0d7c2f0e-1b2a", {"dest": "27002"}, b"x")
    finally:
        server.shutdown()
        server.server_close()
    transport = HttpTransport(f"http://127.0.0.1:{port}/exchange", pki.node, pki.trust(), peer_code="27000",
                              clock=clock)
    with pytest.raises(DeliveryError, match="ConnectionRefusedError"):
        transport.request("POST", "/messages/0d7c2f0e-1b2a", {"dest": "27002"}, b"x")
