"""An emulated slow, far, lossy network link: a throttling TCP proxy on 127.0.0.1 (asyncio).

Why: the exchange must work over a district unit's uplink (about 1 Mbit/s,
300 ms round trip, 5 % loss), and the kernel here has no `netem`, so tests and
benchmarks route their TCP connections through this proxy instead.

Model, per link (see docs/decisions.md for its limits):

- Two directions (`up` = from the side that opens connections, `down` = back),
  each a serialiser shared by every connection that crosses it: a segment of
  `s` bytes occupies the direction for `s * 8 / rate` seconds, then arrives
  `delay` seconds later.
- Data is cut into segments of `mss` bytes. Each segment is lost with
  probability `loss`, independently; a lost segment is retransmitted after a
  retransmission timeout (RTO = RTT + `rto_extra`, doubled for each further
  loss of the same segment) and uses the bandwidth again. Delivery on a
  connection stays in order, so everything behind a lost segment waits for
  it (head-of-line blocking, as in TCP).
- Opening a connection costs one round trip (SYN, SYN-ACK) before the first
  byte leaves; a lost SYN adds the initial 1 s SYN timeout.
- Each direction of a connection buffers at most `window` bytes ahead of the
  link, so a fast sender is held back as TCP's window would hold it.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
from dataclasses import dataclass, field

SYN_TIMEOUT = 1.0  # Linux's initial SYN retransmission timeout


@dataclass(frozen=True)
class LinkProfile:
    rate_bps: float = 1_000_000.0  # per direction
    one_way_delay: float = 0.150
    loss: float = 0.05
    mss: int = 1460
    rto_extra: float = 0.200
    window: int = 64 * 1024

    @property
    def rtt(self) -> float:
        return 2 * self.one_way_delay

    @property
    def rto(self) -> float:
        return self.rtt + self.rto_extra


@dataclass
class LinkStats:
    connections: int = 0
    segments: int = 0
    lost: int = 0  # segment transmissions lost (a segment lost twice counts twice)
    bytes: int = 0


class _Direction:
    """One direction of the link: a single serialiser shared by all its connections."""

    def __init__(self, profile: LinkProfile, rng: random.Random, stats: LinkStats) -> None:
        self.profile = profile
        self.rng = rng
        self.stats = stats
        self.free_at = 0.0

    def schedule(self, size: int, now: float) -> float:
        """Put one segment on the wire no earlier than `now`; return when it reaches the far end."""
        p = self.profile
        tx = size * 8 / p.rate_bps
        self.free_at = max(now, self.free_at) + tx
        arrival = self.free_at + p.one_way_delay
        self.stats.segments += 1
        self.stats.bytes += size
        rto = p.rto
        while self.rng.random() < p.loss:  # lost: sent again after the RTO, taking the bandwidth again
            self.stats.lost += 1
            self.free_at = max(self.free_at, arrival - p.one_way_delay + rto) + tx
            arrival = self.free_at + p.one_way_delay
            rto *= 2
        return arrival


@dataclass
class NetLink:
    """Run the emulated link in its own thread; `forward()` opens a proxy port through it.

    Usage: `with NetLink(LinkProfile()) as link: port = link.forward(target_port)`,
    then connect to 127.0.0.1:port instead of the target.
    """

    profile: LinkProfile = field(default_factory=LinkProfile)
    seed: int | None = None
    stats: LinkStats = field(default_factory=LinkStats)

    def __post_init__(self) -> None:
        rng = random.Random(self.seed)
        self._up = _Direction(self.profile, rng, self.stats)
        self._down = _Direction(self.profile, rng, self.stats)
        self._rng = rng
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="netlink", daemon=True)
        self._servers: list[asyncio.Server] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._thread.start()

    def __enter__(self) -> NetLink:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def forward(self, target_port: int, target_host: str = "127.0.0.1", *, reverse: bool = False) -> int:
        """Listen on a free 127.0.0.1 port and relay to the target through the link; returns the port.

        `reverse=True` is for connections opened from the far end of the same
        link (their requests take the `down` direction), so both ends share
        one link's bandwidth.
        """
        up, down = (self._down, self._up) if reverse else (self._up, self._down)

        async def start() -> int:
            server = await asyncio.start_server(
                lambda r, w: self._spawn(self._connection(r, w, target_host, target_port, up, down)),
                "127.0.0.1", 0)
            self._servers.append(server)
            return int(server.sockets[0].getsockname()[1])

        return asyncio.run_coroutine_threadsafe(start(), self._loop).result(10)

    def close(self) -> None:
        if self._loop.is_closed():
            return

        async def shutdown() -> None:
            for server in self._servers:
                server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def _spawn(self, coro: object) -> None:
        task: asyncio.Task[None] = self._loop.create_task(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connection(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter, host: str, port: int,
                          up: _Direction, down: _Direction) -> None:
        self.stats.connections += 1
        loop = asyncio.get_running_loop()
        # The handshake: the first byte leaves one RTT after the client's SYN (plus the SYN timeout if lost).
        ready = loop.time() + self.profile.rtt + (SYN_TIMEOUT if self._rng.random() < self.profile.loss else 0.0)
        try:
            server_r, server_w = await asyncio.open_connection(host, port)
        except OSError:
            client_w.close()
            return
        try:
            await asyncio.gather(self._pump(client_r, server_w, up, ready),
                                 self._pump(server_r, client_w, down, ready))
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            for writer in (client_w, server_w):
                writer.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, direction: _Direction,
                    ready: float) -> None:
        """Carry one direction of one connection: schedule each segment on the link, deliver in order."""
        loop = asyncio.get_running_loop()
        mss = self.profile.mss
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue(max(1, self.profile.window // mss))

        async def deliver() -> None:
            broken = False  # the far end went away: keep draining so the reading side never blocks
            while (item := await queue.get()) is not None:
                arrival, data = item
                wait = arrival - loop.time()
                if wait > 0 and not broken:
                    await asyncio.sleep(wait)
                try:
                    if not broken:
                        writer.write(data)
                        await writer.drain()
                except OSError:
                    broken = True
            with contextlib.suppress(OSError):
                if not broken and writer.can_write_eof():
                    writer.write_eof()

        delivering = asyncio.ensure_future(deliver())
        last = 0.0
        try:
            while data := await reader.read(64 * 1024):
                for i in range(0, len(data), mss):
                    segment = data[i:i + mss]
                    # In order on a connection: a segment waiting for its retransmission holds back the rest.
                    last = max(direction.schedule(len(segment), max(loop.time(), ready)), last)
                    await queue.put((last, segment))
        except OSError:
            pass
        finally:
            await queue.put(None)
            await delivering
