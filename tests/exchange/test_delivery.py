"""Store-and-forward delivery: compression, backoff, ordering under a hostile network, crash recovery, inbox, uploads."""

from __future__ import annotations

import gzip
import hashlib
import random
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import orjson
import pytest
from sqlalchemy import Column, Engine, Integer, MetaData, String, Table, func, insert, select, update

from lienthong.exchange import delivery
from lienthong.exchange.delivery import (
    DEAD,
    FAILED,
    PENDING,
    SENDING,
    SENT,
    Ack,
    Backoff,
    DeliveryError,
    Dispatcher,
    Inbox,
    InboxEntry,
    OffsetMismatch,
    OutboundMessage,
    Outbox,
    PayloadError,
    Receipt,
    RejectMessage,
    UploadError,
    UploadStore,
    compress,
    decompress,
)
from lienthong.exchange.schema import inbox as inbox_table
from lienthong.exchange.schema import outbox as outbox_table
from lienthong.exchange.schema import upload, upload_chunk

from .conftest import FakeClock, new_engine

SYNTHEA = Path(__file__).resolve().parents[3] / "shared" / "samples" / "synthea-r4"


def statuses(engine: Engine) -> dict[str, int]:
    with engine.connect() as conn:
        return Outbox.counts(conn)


# ---- compression -----------------------------------------------------------------------------------


@pytest.mark.parametrize("codec", ["gzip", "zstd"])
def test_compress_round_trip(codec: str) -> None:
    data = orjson.dumps({"resourceType": "Patient", "name": [{"family": "Nguyễn", "given": ["Văn", "An"]}]}) * 50
    packed = compress(data, codec)
    assert packed.startswith(delivery.ZSTD_MAGIC if codec == "zstd" else delivery.GZIP_MAGIC)
    assert len(packed) < len(data) / 5
    assert decompress(packed) == data


@pytest.mark.parametrize("codec", ["gzip", "zstd"])
def test_decompression_is_bounded(codec: str) -> None:
    bomb = compress(b"\0" * (8 * 1024 * 1024), codec)
    assert len(bomb) < 64 * 1024
    with pytest.raises(PayloadError, match="larger than"):
        decompress(bomb, max_size=1024 * 1024)
    with pytest.raises(PayloadError):
        decompress(bomb[: len(bomb) // 2])  # truncated
    with pytest.raises(PayloadError, match="unknown"):
        decompress(b'{"plain": "json"}')


def test_zstd_beats_gzip_on_synthea_bundles() -> None:
    """The measurement behind the codec choice, on three real-sized bundles (the report covers all 30)."""
    files = sorted(SYNTHEA.glob("*.json"))[:3]
    if not files:
        pytest.skip("Synthea samples not present")
    raw = [f.read_bytes() for f in files]
    total = sum(map(len, raw))
    gz = sum(len(gzip.compress(r, 6, mtime=0)) for r in raw)
    zs = sum(len(compress(r, "zstd")) for r in raw)
    assert total / gz > 10  # gzip-6 already ~15-20x on FHIR JSON
    assert total / zs > 1.8 * (total / gz)  # zstd-6 at least 1.8x smaller again (measured 2.4x)


# ---- backoff ---------------------------------------------------------------------------------------


def test_backoff_bounds_and_full_jitter() -> None:
    backoff, rng = Backoff(), random.Random(1)
    assert [backoff.ceiling(n) for n in range(1, 10)] == [0.5, 1, 2, 4, 8, 16, 32, 60, 60]
    assert backoff.ceiling(10_000) == 60  # no overflow however long a node was away
    for attempt in (1, 3, 7, 8, 50):
        samples = [backoff.delay(attempt, rng) for _ in range(2000)]
        ceiling = backoff.ceiling(attempt)
        assert all(0 <= s <= ceiling for s in samples)
        assert min(samples) < 0.05 * ceiling and max(samples) > 0.95 * ceiling  # full jitter spans the range
        assert abs(sum(samples) / len(samples) - ceiling / 2) < 0.05 * ceiling
    custom = Backoff(base=2, cap=10)
    assert [custom.ceiling(n) for n in range(1, 5)] == [2, 4, 8, 10]
    with pytest.raises(ValueError):
        backoff.ceiling(0)


class Refusing:
    def __init__(self) -> None:
        self.calls = 0

    def send(self, message: OutboundMessage) -> Ack:
        self.calls += 1
        raise DeliveryError("hub unreachable")


def test_dispatcher_schedules_retries_within_the_backoff(engine: Engine, clock: FakeClock) -> None:
    with engine.begin() as conn:
        msg_id = Outbox(clock).enqueue(conn, "27000", "p-1", b"x" * 100)
    dispatcher = Dispatcher(engine, Refusing(), clock, backoff=Backoff(base=0.5, cap=4), rng=random.Random(3))
    for attempt in range(1, 8):
        before = clock()
        assert dispatcher.run_once().failed == 1
        with engine.connect() as conn:
            entry = Outbox.get(conn, msg_id)
        assert entry is not None and entry.status == FAILED and entry.attempts == attempt
        assert entry.last_error == "DeliveryError: hub unreachable"
        assert before <= entry.next_attempt <= before + min(4, 0.5 * 2 ** (attempt - 1))
        assert dispatcher.run_once().attempted == 0 or entry.next_attempt == before  # not due before its time
        clock.now = entry.next_attempt


def test_max_attempts_makes_a_message_dead(engine: Engine, clock: FakeClock) -> None:
    with engine.begin() as conn:
        msg_id = Outbox(clock).enqueue(conn, "27000", "p-1", b"x")
    transport = Refusing()
    dispatcher = Dispatcher(engine, transport, clock, max_attempts=3)
    for _ in range(5):
        dispatcher.run_once()
        clock.advance(61)
    assert transport.calls == 3
    with engine.connect() as conn:
        entry = Outbox.get(conn, msg_id)
    assert entry is not None and entry.status == DEAD


# ---- outbox ----------------------------------------------------------------------------------------


def test_enqueue_commits_or_rolls_back_with_the_business_write(engine: Engine, clock: FakeClock) -> None:
    business = MetaData()
    referral = Table("referral", business, Column("id", Integer, primary_key=True), Column("patient", String(64)))
    business.create_all(engine)
    outbox = Outbox(clock)
    with pytest.raises(RuntimeError), engine.begin() as conn:
        conn.execute(insert(referral).values(id=1, patient="p-1"))
        outbox.enqueue(conn, "27002", "p-1", b"transfer slip")
        raise RuntimeError("the clinical write failed after the enqueue")
    assert statuses(engine) == {}
    with engine.begin() as conn:
        conn.execute(insert(referral).values(id=1, patient="p-1"))
        msg_id = outbox.enqueue(conn, "27002", "p-1", b"transfer slip")
    with engine.connect() as conn:
        row = conn.execute(select(outbox_table).where(outbox_table.c.msg_id == msg_id)).one()._mapping
        assert conn.execute(select(func.count()).select_from(referral)).scalar() == 1
    assert row["status"] == PENDING and row["attempts"] == 0 and row["seq"] == 1
    assert decompress(row["payload"]) == b"transfer slip"
    assert row["sha256"] == hashlib.sha256(row["payload"]).hexdigest() and row["size"] == len(row["payload"])


def test_seq_per_stream_and_validation(engine: Engine, clock: FakeClock) -> None:
    outbox = Outbox(clock)
    with engine.begin() as conn:
        for key in ["a", "a", "b", "a", "b"]:
            outbox.enqueue(conn, "27002", key, key.encode())
        outbox.enqueue(conn, "27003", "a", b"a")
        with pytest.raises(ValueError):
            outbox.enqueue(conn, "hub", "a", b"x")
        with pytest.raises(PayloadError):
            outbox.enqueue_compressed(conn, "27002", "a", b"raw, not compressed")
        seqs = conn.execute(select(outbox_table.c.dest, outbox_table.c.patient_key, outbox_table.c.seq)
                            .order_by(outbox_table.c.dest, outbox_table.c.patient_key, outbox_table.c.seq)).all()
    assert [tuple(r) for r in seqs] == [("27002", "a", 1), ("27002", "a", 2), ("27002", "a", 3),
                                        ("27002", "b", 1), ("27002", "b", 2), ("27003", "a", 1)]


# ---- a hostile network -----------------------------------------------------------------------------


class FlakyNetwork:
    """Delivers into a receiver's inbox, but loses requests, loses acks, duplicates, and replays old copies late."""

    def __init__(self, engine: Engine, inbox: Inbox, rng: random.Random) -> None:
        self.engine, self.inbox, self.rng = engine, inbox, rng
        self.late: list[OutboundMessage] = []
        self.first_arrival: dict[tuple[str, str], list[int]] = defaultdict(list)
        self.deliveries = 0

    def _deliver(self, message: OutboundMessage) -> Receipt:
        self.deliveries += 1
        with self.engine.begin() as conn:
            receipt = self.inbox.receive(conn, message.msg_id, "27001", message.payload)
        if not receipt.duplicate:
            self.first_arrival[(message.dest, message.patient_key)].append(message.seq)
        return receipt

    def send(self, message: OutboundMessage) -> Ack:
        if self.late and self.rng.random() < 0.3:  # an old copy finally arrives, out of order
            self._deliver(self.late.pop(self.rng.randrange(len(self.late))))
        roll = self.rng.random()
        if roll < 0.20:
            raise DeliveryError("request lost")
        if roll < 0.30:
            self.late.append(message)  # stuck in a queue somewhere; the sender times out
            raise DeliveryError("timed out")
        receipt = self._deliver(message)
        if roll < 0.45:
            raise DeliveryError("ack lost")
        if roll < 0.55:
            receipt = self._deliver(message)  # the network duplicated the request
        return Ack(receipt.accepted, receipt.duplicate)


def test_zero_loss_zero_duplicates_in_order_over_a_flaky_network(tmp_path: Path, clock: FakeClock) -> None:
    sender, receiver = new_engine(tmp_path / "sender.db"), new_engine(tmp_path / "receiver.db")
    rng = random.Random(20260302)
    outbox, inbox = Outbox(clock), Inbox(clock)
    streams = [(dest, f"patient-{i}") for dest in ("27000", "27002") for i in range(25)]
    expected: dict[tuple[str, str], list[int]] = defaultdict(list)
    with sender.begin() as conn:
        for n in range(500):
            dest, key = rng.choice(streams)
            expected[(dest, key)].append(n)
            outbox.enqueue(conn, dest, key, orjson.dumps({"dest": dest, "patient": key, "n": n}))
    network = FlakyNetwork(receiver, inbox, rng)
    dispatcher = Dispatcher(sender, network, clock, rng=rng)
    processed: list[dict[str, object]] = []

    def handler(conn: object, entry: InboxEntry) -> None:
        assert entry.payload is not None
        if rng.random() < 0.05:
            raise RuntimeError("database hiccup while applying")  # rolled back, offered again later
        processed.append(orjson.loads(decompress(entry.payload)))

    for _ in range(3000):
        dispatcher.run_once()
        inbox.process(receiver, handler)
        if statuses(sender) == {SENT: 500}:
            break
        clock.advance(rng.uniform(0, 20))
    while inbox.process(receiver, handler):
        pass
    for _ in range(len(network.late)):  # stragglers still arriving after everything was acknowledged
        network._deliver(network.late.pop())
    inbox.process(receiver, handler)

    assert statuses(sender) == {SENT: 500}
    assert network.deliveries > 600  # the network really did duplicate and replay
    with receiver.connect() as conn:
        assert dict(conn.execute(select(inbox_table.c.status, func.count()).group_by(inbox_table.c.status)).all()) \
            == {"processed": 500}
    counts = Counter(p["n"] for p in processed)
    assert len(counts) == 500 and set(counts.values()) == {1}  # zero loss, zero duplicate processing
    got: dict[tuple[str, str], list[int]] = defaultdict(list)
    for p in processed:
        got[(str(p["dest"]), str(p["patient"]))].append(int(str(p["n"])))
    assert got == expected  # per patient, in the order written
    for stream, seqs in network.first_arrival.items():
        assert seqs == sorted(seqs), stream  # no later message ever arrived before an earlier one
    sender.dispose()
    receiver.dispose()


# ---- crash recovery --------------------------------------------------------------------------------


class SimulatedCrash(BaseException):
    """Like the process dying: not an Exception, so nothing on the way up handles it."""


class Recording:
    def __init__(self, engine: Engine, inbox: Inbox, crash_after_delivery: int = 0) -> None:
        self.engine, self.inbox = engine, inbox
        self.crash_after_delivery = crash_after_delivery
        self.sent: list[str] = []

    def send(self, message: OutboundMessage) -> Ack:
        with self.engine.begin() as conn:
            receipt = self.inbox.receive(conn, message.msg_id, "27001", message.payload)
        self.sent.append(message.msg_id)
        if self.crash_after_delivery and len(self.sent) == self.crash_after_delivery:
            raise SimulatedCrash
        return Ack(receipt.accepted, receipt.duplicate)


def test_crash_mid_send_is_recovered_at_restart(tmp_path: Path, clock: FakeClock) -> None:
    sender, receiver = new_engine(tmp_path / "s.db"), new_engine(tmp_path / "r.db")
    inbox = Inbox(clock)
    with sender.begin() as conn:
        ids = [Outbox(clock).enqueue(conn, "27002", "p-1", f"msg {i}".encode()) for i in range(3)]
    crashing = Recording(receiver, inbox, crash_after_delivery=1)
    with pytest.raises(SimulatedCrash):
        Dispatcher(sender, crashing, clock).run_once()
    assert statuses(sender) == {SENDING: 1, PENDING: 2}  # delivered, but the ack never got recorded

    restarted = Recording(receiver, inbox)
    dispatcher = Dispatcher(sender, restarted, clock)
    for _ in range(3):
        dispatcher.run_once()
    assert statuses(sender) == {SENT: 3}
    assert restarted.sent == ids  # the interrupted message first, then the rest in order
    seen: list[bytes] = []
    inbox.process(receiver, lambda conn, e: seen.append(decompress(e.payload or b"")))
    assert seen == [b"msg 0", b"msg 1", b"msg 2"]  # the re-sent one was a duplicate, processed once


def test_sending_rows_become_pending_when_the_thread_starts(tmp_path: Path) -> None:
    sender, receiver = new_engine(tmp_path / "s.db"), new_engine(tmp_path / "r.db")
    with sender.begin() as conn:
        for i in range(20):
            Outbox().enqueue(conn, "27002", f"p-{i % 4}", b"x")
        conn.execute(update(outbox_table).where(outbox_table.c.seq == 1).values(status=SENDING, attempts=1))
    assert statuses(sender)[SENDING] == 4
    transport = Recording(receiver, Inbox())
    dispatcher = Dispatcher(sender, transport, poll_interval=0.02)
    dispatcher.start()
    deadline = time.monotonic() + 10
    while statuses(sender) != {SENT: 20} and time.monotonic() < deadline:
        time.sleep(0.02)
    assert dispatcher.stop(timeout=5)
    assert statuses(sender) == {SENT: 20}
    with sender.begin() as conn:  # a message enqueued while stopped waits for the next start
        Outbox().enqueue(conn, "27002", "p-9", b"later")
    time.sleep(0.1)
    assert statuses(sender)[PENDING] == 1


def test_stop_is_prompt_and_wake_skips_the_poll(tmp_path: Path) -> None:
    sender, receiver = new_engine(tmp_path / "s.db"), new_engine(tmp_path / "r.db")
    dispatcher = Dispatcher(sender, Recording(receiver, Inbox()), poll_interval=30)
    dispatcher.start()
    time.sleep(0.05)
    with sender.begin() as conn:
        Outbox().enqueue(conn, "27002", "p-1", b"now")
    dispatcher.wake()
    deadline = time.monotonic() + 5
    while statuses(sender) != {SENT: 1} and time.monotonic() < deadline:
        time.sleep(0.01)
    assert statuses(sender) == {SENT: 1}
    started = time.monotonic()
    assert dispatcher.stop(timeout=5)
    assert time.monotonic() - started < 2  # not the 30 s poll
    assert not any(t.name == "lienthong-outbox" and t.is_alive() for t in threading.enumerate())


# ---- several sends in flight ------------------------------------------------------------------------


class SlowPeer:
    """A peer 20-40 ms away that records how many sends overlap and the order each stream arrives in."""

    def __init__(self, engine: Engine, inbox: Inbox) -> None:
        self.engine, self.inbox = engine, inbox
        self.lock = threading.Lock()
        self.in_flight = self.most_in_flight = 0
        self.arrivals: dict[str, list[int]] = defaultdict(list)

    def send(self, message: OutboundMessage) -> Ack:
        with self.lock:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
            self.arrivals[message.patient_key].append(message.seq)
        time.sleep(random.uniform(0.02, 0.04))
        with self.engine.begin() as conn:
            receipt = self.inbox.receive(conn, message.msg_id, "27001", message.payload)
        with self.lock:
            self.in_flight -= 1
        return Ack(receipt.accepted, receipt.duplicate)


@pytest.mark.parametrize("background", [False, True])
def test_concurrent_sends_keep_each_patients_order(tmp_path: Path, background: bool) -> None:
    sender, receiver = new_engine(tmp_path / "s.db"), new_engine(tmp_path / "r.db")
    with sender.begin() as conn:
        for n in range(60):
            Outbox().enqueue(conn, "27002", f"p-{n % 12}", f"{n}".encode())
    peer = SlowPeer(receiver, Inbox())
    dispatcher = Dispatcher(sender, peer, concurrency=6, poll_interval=0.02)
    started = time.monotonic()
    if background:
        dispatcher.start()
        while statuses(sender) != {SENT: 60} and time.monotonic() - started < 30:
            time.sleep(0.02)
        assert dispatcher.stop(timeout=5)
    else:
        while statuses(sender) != {SENT: 60} and time.monotonic() - started < 30:
            dispatcher.run_once()
    assert statuses(sender) == {SENT: 60}
    assert 1 < peer.most_in_flight <= 6  # several at once, never more than allowed
    assert sorted(peer.arrivals) == sorted(f"p-{k}" for k in range(12))
    assert all(seqs == [1, 2, 3, 4, 5] for seqs in peer.arrivals.values())  # each patient in order, once
    with receiver.connect() as conn:
        assert conn.execute(select(func.count()).select_from(inbox_table)).scalar_one() == 60
    sender.dispose()
    receiver.dispose()


# ---- a refused message holds its stream -----------------------------------------------------------


class Judging:
    def __init__(self, refuse: set[str]) -> None:
        self.refuse = refuse
        self.sent: list[str] = []

    def send(self, message: OutboundMessage) -> Ack:
        self.sent.append(message.msg_id)
        if message.msg_id in self.refuse:
            return Ack(False, reason="bad-signature")
        return Ack(True)


def test_dead_message_blocks_only_its_own_stream_until_requeued(engine: Engine, clock: FakeClock) -> None:
    outbox = Outbox(clock)
    with engine.begin() as conn:
        first, second = (outbox.enqueue(conn, "27002", "p-1", b"1"), outbox.enqueue(conn, "27002", "p-1", b"2"))
        other = outbox.enqueue(conn, "27002", "p-2", b"3")
    transport = Judging({first})
    dispatcher = Dispatcher(engine, transport, clock)
    for _ in range(3):
        dispatcher.run_once()
    assert transport.sent == [first, other]
    with engine.connect() as conn:
        dead = Outbox.get(conn, first)
        assert dead is not None and dead.status == DEAD and dead.last_error == "rejected: bad-signature"
        held = Outbox.get(conn, second)
        assert held is not None and held.status == PENDING
    transport.refuse.clear()
    with engine.begin() as conn:
        assert outbox.requeue(conn, first)
        assert not outbox.requeue(conn, other)  # only dead or failed messages
    dispatcher.run_once()
    dispatcher.run_once()
    assert transport.sent == [first, other, first, second]
    assert statuses(engine) == {SENT: 3}
    clock.advance(86_400 * 8)
    with engine.begin() as conn:
        assert outbox.purge_sent(conn, older_than=86_400 * 7) == 3


def test_retry_now_skips_the_backoff_for_one_destination_only(engine: Engine, clock: FakeClock) -> None:
    outbox = Outbox(clock)
    with engine.begin() as conn:
        back, other = outbox.enqueue(conn, "27002", "p-1", b"1"), outbox.enqueue(conn, "27003", "p-2", b"2")
    transport = Refusing()
    dispatcher = Dispatcher(engine, transport, clock, backoff=Backoff(base=8, cap=8), rng=random.Random(1))
    for _ in range(4):  # both fail a few times; after the last failure their next attempts lie ahead
        clock.advance(8)
        dispatcher.run_once()
    with engine.begin() as conn:
        assert outbox.retry_now(conn, "27002") == 1  # 27002 was just heard from
    calls = transport.calls
    assert dispatcher.run_once().failed == 1 and transport.calls == calls + 1
    with engine.connect() as conn:
        retried, waiting = Outbox.get(conn, back), Outbox.get(conn, other)
    assert retried is not None and retried.attempts == 5  # attempts kept: the backoff goes on growing
    assert waiting is not None and waiting.attempts == 4 and waiting.next_attempt > clock()


# ---- inbox -----------------------------------------------------------------------------------------


def test_inbox_is_idempotent(engine: Engine, clock: FakeClock) -> None:
    inbox = Inbox(clock, validator=lambda source, payload: "unsigned" if payload == b"bad" else None)
    with engine.begin() as conn:
        assert inbox.receive(conn, "m-000001", "27001", b"ok") == (True, False)
        assert inbox.receive(conn, "m-000001", "27001", b"ok") == (True, True)
        assert inbox.receive(conn, "m-000002", "27001", b"bad") == (False, False)
        assert inbox.receive(conn, "m-000002", "27001", b"bad") == (False, True)  # the same answer again
        assert inbox.receive(conn, "m-000001", "27009", b"ok") == (False, False)  # someone else's msg_id
        with pytest.raises(ValueError):
            inbox.receive(conn, "bad id!", "27001", b"x")
    with pytest.raises(RuntimeError), engine.begin() as conn:
        inbox.receive(conn, "m-000003", "27001", b"x")
        raise RuntimeError("the receiving transaction failed")
    with engine.connect() as conn:
        assert Inbox.get(conn, "m-000003") is None
        entry = Inbox.get(conn, "m-000002")
    assert entry is not None and (entry.status, entry.reason) == ("rejected", "unsigned")


def test_inbox_processing_exactly_once_in_arrival_order(engine: Engine, clock: FakeClock) -> None:
    inbox = Inbox(clock)
    with engine.begin() as conn:
        for i in range(6):
            inbox.receive(conn, f"m-00000{i}", "27001", str(i).encode())
    clock.advance(-3600)  # the clock steps backwards: arrival order must still hold
    with engine.begin() as conn:
        inbox.receive(conn, "m-000006", "27001", b"6")
    done: list[bytes] = []
    failures = {"m-000002": 1}

    def handler(conn: object, entry: InboxEntry) -> None:
        if failures.get(entry.msg_id, 0):
            failures[entry.msg_id] -= 1
            raise RuntimeError("temporary")
        if entry.payload == b"4":
            raise RejectMessage("không hợp lệ / invalid")
        done.append(entry.payload or b"")

    assert inbox.process(engine, handler) == 2  # stops at the failure so 3.. do not overtake 2
    assert inbox.process(engine, handler) == 4
    assert inbox.process(engine, handler) == 0
    assert done == [b"0", b"1", b"2", b"3", b"5", b"6"]
    with engine.connect() as conn:
        rejected = Inbox.get(conn, "m-000004")
    assert rejected is not None and rejected.status == "rejected" and rejected.reason == "không hợp lệ / invalid"
    clock.advance(7200)
    with engine.begin() as conn:
        assert inbox.compact(conn, older_than=60) == 6
        assert inbox.receive(conn, "m-000001", "27001", b"1") == (True, True)  # still deduplicated


# ---- resumable uploads -----------------------------------------------------------------------------


def test_upload_store_protocol(engine: Engine, clock: FakeClock) -> None:
    store = UploadStore(clock)
    data = random.Random(5).randbytes(1000)
    digest = hashlib.sha256(data).hexdigest()
    with engine.begin() as conn:
        state = store.begin(conn, "u-000001", "27001", "27002", "p-1", len(data), digest)
        assert state.received_size == 0
        assert store.begin(conn, "u-000001", "27001", "27002", "p-1", len(data), digest).received_size == 0
        with pytest.raises(UploadError):
            store.begin(conn, "u-000001", "27001", "27002", "p-1", len(data), "0" * 64)  # changed parameters
        assert store.append(conn, "u-000001", "27001", 0, data[:400]).received_size == 400
        with pytest.raises(OffsetMismatch) as exc:
            store.append(conn, "u-000001", "27001", 0, data[:400])  # a retried chunk the receiver already has
        assert exc.value.received_size == 400
        with pytest.raises(OffsetMismatch):
            store.append(conn, "u-000001", "27001", 800, data[800:])  # a gap
        with pytest.raises(UploadError):
            store.append(conn, "u-000001", "27001", 400, data[400:] + b"extra")
        with pytest.raises(UploadError, match="another sender"):
            store.append(conn, "u-000001", "27009", 400, data[400:])
        with pytest.raises(UploadError, match="incomplete"):
            store.assemble(conn, "u-000001", "27001")
        state = store.append(conn, "u-000001", "27001", 400, data[400:])
        assert state.complete
        assert store.assemble(conn, "u-000001", "27001") == data
        assert store.state(conn, "u-000001", "27001") is None
        assert conn.execute(select(func.count()).select_from(upload_chunk)).scalar() == 0


def test_upload_checksum_mismatch_discards(engine: Engine, clock: FakeClock) -> None:
    store = UploadStore(clock)
    with engine.begin() as conn:
        store.begin(conn, "u-000002", "27001", "27002", "p-1", 4, hashlib.sha256(b"abcd").hexdigest())
        store.append(conn, "u-000002", "27001", 0, b"abce")
        with pytest.raises(UploadError, match="SHA-256"):
            store.assemble(conn, "u-000002", "27001")
        assert store.state(conn, "u-000002", "27001") is None
        store.begin(conn, "u-000003", "27001", "27002", "p-1", 4, hashlib.sha256(b"abcd").hexdigest())
    clock.advance(3 * 86_400)
    with engine.begin() as conn:
        assert store.purge(conn, older_than=86_400) == 1
        assert conn.execute(select(func.count()).select_from(upload)).scalar() == 0


def test_replay_guard_and_inbox_deduplication_on_every_backend(db_url: str) -> None:
    """The single-statement nonce upsert and inbox insert tell new from seen on SQLite and PostgreSQL
    alike (by RETURNING: psycopg gives no rowcount for them)."""
    from lienthong.exchange.trust import SqlNonceStore
    from lienthong.storage.engine import make_engine
    from lienthong.storage.schema import metadata

    engine = make_engine(db_url)
    try:
        metadata.create_all(engine, tables=[inbox_table, outbox_table, upload, upload_chunk,
                                            metadata.tables["exchange_nonce"]])
        store = SqlNonceStore(engine)
        t = 1_770_000_000.0
        assert store.check_and_store("27001:a", t, 600)
        assert not store.check_and_store("27001:a", t + 1, 600)  # a replay within the window
        assert store.check_and_store("27001:a", t + 601, 600)  # the timestamp check guards beyond it
        assert not store.check_and_store("27001:a", t + 602, 600)
        inbox = Inbox()
        with engine.begin() as conn:
            assert inbox.receive(conn, "0d7c2f0e-1b2a-4c1e", "27001", b"x") == (True, False)
            assert inbox.receive(conn, "0d7c2f0e-1b2a-4c1e", "27001", b"x") == (True, True)
            assert inbox.receive(conn, "0d7c2f0e-1b2a-4c1f", "27001", b"y", processed=True) == (True, False)
            assert Inbox.state(conn, "0d7c2f0e-1b2a-4c1f") == ("27001", "processed", None)
    finally:
        engine.dispose()
