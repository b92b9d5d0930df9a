"""The emulated link delays, throttles and loses segments as its model says (short, bounded runs)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from lienthong.devtools.netlink import LinkProfile, NetLink


@pytest.fixture
def echo_port() -> Iterator[int]:
    """A plain TCP server that answers every received block with its length as 8 bytes."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(len(data).to_bytes(8, "big"))

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    yield port
    listener.close()


def _upload(port: int, data: bytes) -> float:
    """Send `data`, wait until the server has counted every byte; return the elapsed seconds."""
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        s.sendall(data)
        counted = 0
        while counted < len(data):
            counted += int.from_bytes(s.recv(8, socket.MSG_WAITALL), "big")
    return time.perf_counter() - start


def test_round_trip_costs_handshake_plus_two_delays(echo_port: int) -> None:
    profile = LinkProfile(rate_bps=10_000_000, one_way_delay=0.1, loss=0.0)
    with NetLink(profile, seed=1) as link:
        elapsed = _upload(link.forward(echo_port), b"ping")
    # SYN/SYN-ACK (0.2 s) + request (0.1 s) + answer (0.1 s)
    assert 0.39 <= elapsed < 0.8


def test_bandwidth_is_the_configured_rate(echo_port: int) -> None:
    profile = LinkProfile(rate_bps=2_000_000, one_way_delay=0.01, loss=0.0)
    data = bytes(range(256)) * 400  # 102,400 bytes = 0.41 s at 2 Mbit/s
    with NetLink(profile, seed=1) as link:
        elapsed = _upload(link.forward(echo_port), data)
        assert link.stats.bytes >= len(data)
    assert 0.41 <= elapsed < 1.0


def test_loss_costs_retransmission_timeouts_and_loses_no_byte(echo_port: int) -> None:
    data = bytes(range(256)) * 160  # 40,960 bytes = 29 segments
    fast = LinkProfile(rate_bps=50_000_000, one_way_delay=0.01, loss=0.0, rto_extra=0.2)
    lossy = LinkProfile(rate_bps=50_000_000, one_way_delay=0.01, loss=0.2, rto_extra=0.2)
    with NetLink(fast, seed=7) as link:
        clean = _upload(link.forward(echo_port), data)
    with NetLink(lossy, seed=7) as link:
        slow = _upload(link.forward(echo_port), data)
        lost = link.stats.lost
    assert 2 <= lost <= 20  # ~20 % of ~30 segment transmissions, answers included
    assert slow >= clean + 0.22  # at least one RTO (RTT + 0.2 s) on the connection's critical path
