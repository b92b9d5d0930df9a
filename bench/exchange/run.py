"""Exchange benchmark: transfers per second through one hub, end-to-end latency, bytes on the wire, and the
304-patient batch over an emulated 1 Mbit/s, 300 ms round-trip, 5 % loss link.

    python bench/exchange/run.py [--transfers 300] [--paced 150 --rate 20] [--concurrency 8] [--import]
    python bench/exchange/run.py --link [--transfers 304]
    (either with --db postgresql: each unit on its own PostgreSQL database instead of an SQLite file)

Topology: the provincial hub (24000), the sending facility (24901, Bắc Giang provincial general hospital)
and the receiver (01001, Bạch Mai), each a real `lienthong serve --role hub|node --config FILE` process on
127.0.0.1 with its own SQLite database, keys issued by the provincial CA, every request and response signed.

Setup (not timed): CA and keys, databases, `--transfers + --paced` patients with realistic records at the
sender (20 % already known at the receiver), one transfer each queued in the sender's outbox through the
real `$transfer` code path (Task, ServiceRequest, sealed document) and held (not due) until released.

Without --link (throughput and latency):
 (1) burst: the first `--transfers` messages are released at once. Counted "through the hub" = the hub
     accepted the message (stored in its inbox and relay outbox, acknowledged to the sender), forwarded it,
     and the receiver verified the package signatures, stored it and acknowledged it, so the hub's outbox
     row is `sent`. Timed from the release to the moment all N hub outbox rows are `sent`.
 (2) paced: the next `--paced` messages become due one by one at `--rate` per second; latency per message
     = the receiver's inbox receipt time minus the time it became due at the sender (both from the
     databases, same clock).
 The receiver's import (patient index, FHIR import, status messages back) is deferred unless --import is
 given: it is the receiver's own work, not the hub's (its rate is reported separately when on).
 (ref) the same stack's raw HTTP round trip: a Starlette app on uvicorn (one process, same server settings)
     that reads a POST of the same payload bytes and answers a small JSON, driven by the same number of
     concurrent httpx clients. One transfer is two such hops (sender->hub, hub->receiver) plus database
     writes and signatures on both, so the ideal ratio is below 0.5.
With --link: the 304 transfers cross an emulated link (`lienthong.devtools.netlink`): the sender's uplink
 to the hub, and the receiver's link to the hub (hub->receiver deliveries and receiver->hub status
 messages share it). Timed from release until every transfer is `received` at the sender (the full loop:
 delivered, imported at Bạch Mai, status returned through the hub over both links); then checks that
 nothing was lost or imported twice. `uplink_bytes_per_transfer` is everything that crossed the sender's
 link, both ways: the package, HTTP and signature headers, acknowledgements and the status message back.

Markdown summary on stdout, progress on stderr, JSON in bench/results/exchange*.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "fhir"))

import httpx  # noqa: E402
from common import REPO, RESULTS, Cleanup, ServerProcess, background_busy, free_port, log, percentile  # noqa: E402
from sqlalchemy import func, select, update  # noqa: E402

from lienthong.api.app import ApiSettings  # noqa: E402
from lienthong.devtools.netlink import LinkProfile, NetLink  # noqa: E402
from lienthong.exchange import transfer as tr  # noqa: E402
from lienthong.exchange.demo import BACH_MAI, HUB, PROVINCIAL, load_pilot, queue_transfers, transfer_steps  # noqa: E402
from lienthong.exchange.registry import Facility, Registry  # noqa: E402
from lienthong.exchange.schema import inbox, outbox  # noqa: E402
from lienthong.exchange.service import ExchangeConfig, ExchangeService, load_trust, provincial_setup  # noqa: E402
from lienthong.node import build_node, open_database  # noqa: E402
from lienthong.storage import schema  # noqa: E402
from lienthong.storage.engine import make_engine  # noqa: E402

SENDER, RECEIVER = "24901", "01001"
HOLD = 4_000_000_000 * 1_000_000  # next_attempt far in the future (µs): queued but not due


def _identity_files(folder: Path, identities: dict[str, Any]) -> None:
    for code, identity in identities.items():
        (folder / code).mkdir(parents=True, exist_ok=True)
        identity.save(folder / code / "node.key", folder / code / "node.crt")


def _config(folder: Path, code: str, name: str, role: str, hub_url: str | None, poll: float, concurrency: int) -> Path:
    lines = [f'role = "{role}"', f'code = "{code}"', f'name = "{name}"', f'hub_code = "{HUB[0]}"',
             f'keys_dir = "{folder / code}"', f'ca_dir = "{folder / "ca"}"', f"poll_seconds = {poll}",
             f"send_concurrency = {concurrency}"]
    if hub_url:
        lines.append(f'hub_url = "{hub_url}"')
    path = folder / f"{code}.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


class Province:
    """Three units as `lienthong serve` processes, optionally with emulated links between them."""

    def __init__(self, folder: Path, n: int, cleanup: Cleanup, link: LinkProfile | None, concurrency: int,
                 receiver_import: bool, server_src: Path, db: str = "sqlite") -> None:
        self.folder = folder
        self.cleanup = cleanup
        self.urls = {code: f"sqlite:///{folder / f'{code}.db'}" for code in (HUB[0], SENDER, RECEIVER)}
        if db == "postgresql":  # production: each unit on its own database of one throw-away cluster
            from lienthong.devtools.pgserver import PostgresServer

            pg = PostgresServer().start()
            cleanup.push("postgresql", pg.stop)
            self.urls = {code: pg.create_database(f"unit_{code}") for code in self.urls}
        self.ports = {code: free_port() for code in self.urls}
        self.links: list[NetLink] = []
        hub_for_sender = hub_for_receiver = self.ports[HUB[0]]
        receiver_port = self.ports[RECEIVER]
        if link is not None:
            uplink, receiver_link = NetLink(link, seed=1), NetLink(link, seed=2)
            self.links = [uplink, receiver_link]
            cleanup.push("links", lambda: [x.close() for x in self.links])  # type: ignore[func-returns-value]
            hub_for_sender = uplink.forward(self.ports[HUB[0]])
            receiver_port = receiver_link.forward(self.ports[RECEIVER], reverse=True)
            hub_for_receiver = receiver_link.forward(self.ports[HUB[0]])
        units = [(SENDER, PROVINCIAL), (RECEIVER, BACH_MAI)]
        identities = provincial_setup(folder, HUB[0], units)
        _identity_files(folder, identities)
        trust = load_trust((folder / "ca" / "ca.crt").read_bytes(), (folder / "ca" / "ca.crl").read_bytes())
        services: dict[str, ExchangeService] = {}
        for code, name in [HUB, *units]:
            role = "hub" if code == HUB[0] else "node"
            node = build_node(open_database(self.urls[code]), ApiSettings(node_name=code), secure=True)
            config = ExchangeConfig(role=role, code=code, name=name, hub_code=HUB[0],
                                    hub_url=None if role == "hub" else "http://127.0.0.1:1/exchange")
            services[code] = ExchangeService(node, config, identities[code], trust)
        registry = Registry(services[HUB[0]].engine)
        for code, name in units:
            port = receiver_port if code == RECEIVER else self.ports[code]
            registry.upsert(Facility(code=code, name_vi=name, endpoint=f"http://127.0.0.1:{port}/exchange",
                                     clearance="cleared", clearance_date=time.strftime("%Y-%m-%d"),
                                     clearance_ref="benchmark", code_is_official=code == RECEIVER,
                                     cert_pem=identities[code].chain_pem().decode()))
        log(f"setup: {n} patients with records at the sender, transfers queued and held")
        t = time.perf_counter()
        patients, rng = load_pilot(services[SENDER], services[RECEIVER], n)
        self.packages = queue_transfers(services[SENDER], RECEIVER, patients, rng)
        with services[SENDER].engine.begin() as conn:
            conn.execute(update(outbox).values(next_attempt=HOLD))
        self.raw_json = _raw_document_bytes(services[SENDER])
        log(f"setup: {len(self.packages)} transfers queued in {time.perf_counter() - t:.1f} s")
        for service in services.values():
            service.engine.dispose()
        self.engines = {code: make_engine(url) for code, url in self.urls.items()}
        configs = {
            HUB[0]: _config(folder, *HUB, "hub", None, 0.2, concurrency),
            SENDER: _config(folder, SENDER, PROVINCIAL, "node", f"http://127.0.0.1:{hub_for_sender}/exchange", 0.2,
                            concurrency),
            RECEIVER: _config(folder, RECEIVER, BACH_MAI, "node", f"http://127.0.0.1:{hub_for_receiver}/exchange",
                              0.2 if receiver_import else 3600.0, concurrency),
        }
        self.servers: dict[str, ServerProcess] = {}
        for code in (HUB[0], RECEIVER, SENDER):
            argv = [sys.executable, "-m", "lienthong.cli.main", "serve", "--db", self.urls[code], "--port",
                    str(self.ports[code]), "--node-name", code, "--config", str(configs[code])]
            self.servers[code] = ServerProcess(code, argv, self.ports[code], folder, "/fhir/metadata", cleanup,
                                               env={"PYTHONPATH": str(server_src)})

    def release(self, due: list[int]) -> dict[str, int]:
        """Make held messages due at the given times (µs), oldest first; returns msg_id -> due time."""
        with self.engines[SENDER].begin() as conn:
            held = [r[0] for r in conn.execute(select(outbox.c.msg_id).where(outbox.c.next_attempt == HOLD)
                                               .order_by(outbox.c.created).limit(len(due)))]
            for msg_id, when in zip(held, due, strict=False):
                conn.execute(update(outbox).where(outbox.c.msg_id == msg_id).values(next_attempt=when))
        return dict(zip(held, due, strict=False))

    def relayed(self, ids: set[str]) -> int:
        """How many of `ids` the hub has forwarded and the receiver acknowledged."""
        with self.engines[HUB[0]].connect() as conn:
            sent = {r[0] for r in conn.execute(select(outbox.c.msg_id).where(outbox.c.dest == RECEIVER,
                                                                              outbox.c.status == "sent"))}
        return len(sent & ids)

    def receipts(self) -> dict[str, int]:
        with self.engines[RECEIVER].connect() as conn:
            return {r[0]: r[1] for r in conn.execute(select(inbox.c.msg_id, inbox.c.received)
                                                      .where(inbox.c.source == HUB[0]))}

    def wire_bytes(self, ids: set[str]) -> int:
        with self.engines[SENDER].connect() as conn:
            return sum(r[1] for r in conn.execute(select(outbox.c.msg_id, outbox.c.size)) if r[0] in ids)


def _raw_document_bytes(sender: ExchangeService) -> int:
    """Raw JSON size of the transfer documents the sender stored (its local copy of each package)."""
    r, v = schema.resource, schema.resource_version
    with sender.engine.connect() as conn:
        return int(conn.execute(select(func.coalesce(func.sum(func.length(v.c.body)), 0))
                                .join(r, (r.c.res_pk == v.c.res_pk) & (r.c.version == v.c.version))
                                .where(r.c.rtype == "Bundle")).scalar_one())


def _wait(what: str, done: Any, total: int, timeout: float) -> float:
    start = time.perf_counter()
    last = -1
    while (n := done()) < total:
        if time.perf_counter() - start > timeout:
            raise RuntimeError(f"{what}: only {n} of {total} after {timeout:.0f} s")
        if n != last and n:
            log(f"{what}: {n}/{total}")
            last = n
        time.sleep(0.05)
    return time.perf_counter() - start


def reference(payload: bytes, requests: int, concurrency: int, folder: Path, cleanup: Cleanup) -> float:
    """Round trips per second of a bare Starlette/uvicorn POST endpoint with the same payload bytes."""
    port = free_port()
    server = ServerProcess("reference", [sys.executable, str(HERE / "echoapp.py"), "--port", str(port)], port, folder,
                           "/health", cleanup)
    try:
        with httpx.Client(timeout=30) as client:
            def one(_: int) -> None:
                client.post(f"{server.base}/messages", content=payload,
                            headers={"Content-Type": "application/octet-stream"}).raise_for_status()

            with ThreadPoolExecutor(concurrency) as pool:
                list(pool.map(one, range(20)))  # warm-up
                start = time.perf_counter()
                list(pool.map(one, range(requests)))
                return requests / (time.perf_counter() - start)
    finally:
        server.stop()


def throughput(args: argparse.Namespace, folder: Path, cleanup: Cleanup) -> dict[str, Any]:
    n, m = args.transfers, args.paced
    province = Province(folder, n + m, cleanup, None, args.concurrency, args.receiver_import, args.server_src,
                        args.db)
    busy = background_busy(2.0)
    log(f"machine busy before the run (other users): {busy:.0%}")
    now = int(time.time() * 1_000_000)
    burst = province.release([now] * n)
    ids = set(burst)
    seconds = _wait("burst", lambda: province.relayed(ids), n, args.timeout)
    receipts = province.receipts()
    burst_lat = [(receipts[i] - burst[i]) / 1e6 for i in ids if i in receipts]
    start = int(time.time() * 1_000_000) + 200_000
    paced = province.release([start + int(k * 1_000_000 / args.rate) for k in range(m)])
    paced_ids = set(paced)
    _wait("paced", lambda: province.relayed(paced_ids), m, args.timeout + m / args.rate)
    receipts = province.receipts()
    paced_lat = [(receipts[i] - paced[i]) / 1e6 for i in paced_ids if i in receipts]
    imported = None
    if args.receiver_import:
        done = lambda: sum(tr.RANK.get(s, 0) >= tr.RANK["received"]  # noqa: E731
                           for s in transfer_steps(province.engines[SENDER]).values())
        imported = _wait("imported", done, n + m, args.timeout * 4)
    wire = province.wire_bytes(ids | paced_ids)
    with province.engines[SENDER].connect() as conn:
        sample = bytes(conn.execute(select(outbox.c.payload).limit(1)).scalar_one())
    for server in province.servers.values():
        server.stop()
    ref = reference(sample, max(200, n), args.concurrency, folder, cleanup)
    rate = n / seconds
    return {
        "transfers": n, "seconds": round(seconds, 2), "transfers_per_second": round(rate, 1),
        "reference_round_trips_per_second": round(ref, 1), "ratio_to_reference": round(rate / ref, 3),
        "burst_latency_p50_s": round(percentile(burst_lat, 50), 3),
        "burst_latency_p95_s": round(percentile(burst_lat, 95), 3),
        "paced": m, "paced_rate": args.rate,
        "paced_latency_p50_s": round(percentile(paced_lat, 50), 3),
        "paced_latency_p95_s": round(percentile(paced_lat, 95), 3),
        "wire_bytes_per_transfer": round(wire / (n + m)), "raw_json_bytes_per_transfer": round(province.raw_json / (n + m)),
        "wire_ratio": round(wire / province.raw_json, 3),
        "receiver_import_seconds_after_burst": round(imported, 1) if imported is not None else None,
        "machine_busy_before": round(busy, 2),
    }


def over_link(args: argparse.Namespace, folder: Path, cleanup: Cleanup) -> dict[str, Any]:
    n = args.transfers
    profile = LinkProfile(rate_bps=1_000_000, one_way_delay=0.150, loss=0.05)
    province = Province(folder, n, cleanup, profile, args.concurrency, True, args.server_src, args.db)
    busy = background_busy(2.0)
    log(f"machine busy before the run (other users): {busy:.0%}")
    released = province.release([int(time.time() * 1_000_000)] * n)

    def received() -> int:
        steps = transfer_steps(province.engines[SENDER])
        return sum(tr.RANK.get(steps.get(pk, ""), 0) >= tr.RANK["received"] for pk in province.packages)

    seconds = _wait("full loop over the link", received, n, args.timeout)
    time.sleep(1.0)  # let the last status messages settle before counting
    with province.engines[RECEIVER].connect() as conn:
        provenances = int(conn.execute(select(func.count()).select_from(schema.resource)
                                       .where(schema.resource.c.rtype == "Provenance")).scalar_one())
        processed = int(conn.execute(select(func.count()).select_from(inbox)
                                     .where(inbox.c.status == "processed")).scalar_one())
    with province.engines[SENDER].connect() as conn:
        counts = dict(conn.execute(select(outbox.c.status, func.count()).group_by(outbox.c.status)).all())
    stats = [link.stats for link in province.links]
    return {
        "transfers": n, "link": "1 Mbit/s per direction, 150 ms one way (300 ms RTT), 5 % segment loss",
        "seconds_full_loop": round(seconds, 1), "released": len(released),
        "received_at_sender": received(), "imports_at_receiver": provenances, "processed_at_receiver": processed,
        "sender_outbox": counts, "lost": n - received(), "duplicate_imports": provenances - n,
        "uplink_bytes_per_transfer": round(stats[0].bytes / n),
        "uplink_ratio_to_raw_json": round(stats[0].bytes / province.raw_json, 3),
        "payload_ratio_to_raw_json": round(province.wire_bytes(set(released)) / province.raw_json, 3),
        "link_bytes": sum(s.bytes for s in stats), "link_segments": sum(s.segments for s in stats),
        "link_segments_lost": sum(s.lost for s in stats), "link_connections": sum(s.connections for s in stats),
        "machine_busy_before": round(busy, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--transfers", type=int, default=None, help="burst size (300), or the batch with --link (304)")
    ap.add_argument("--paced", type=int, default=150, help="messages for the paced latency run")
    ap.add_argument("--rate", type=float, default=20.0, help="offered rate of the paced run, transfers/s")
    ap.add_argument("--concurrency", type=int, default=8, help="send_concurrency of every unit (and of the reference)")
    ap.add_argument("--import", dest="receiver_import", action="store_true", help="import at the receiver meanwhile")
    ap.add_argument("--link", action="store_true", help="the 304 batch over the emulated slow, lossy link")
    ap.add_argument("--db", choices=("sqlite", "postgresql"), default="sqlite",
                    help="every unit's database: an SQLite file each, or a database each on one PostgreSQL cluster")
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--server-src", type=Path, default=REPO / "src",
                    help="the lienthong sources the three servers run (e.g. a checkout of an earlier commit)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    args.transfers = args.transfers or (304 if args.link else 300)
    cleanup = Cleanup()
    load_before = os.getloadavg()
    try:
        with tempfile.TemporaryDirectory(prefix="lt-exchange-bench-") as tmp:
            folder = Path(tmp)
            result = over_link(args, folder, cleanup) if args.link else throughput(args, folder, cleanup)
            cleanup.run()
    finally:
        cleanup.run()
    result.update({"cores": os.cpu_count(), "loadavg_before": [round(x, 2) for x in load_before],
                   "loadavg_after": [round(x, 2) for x in os.getloadavg()], "python": platform.python_version(),
                   "send_concurrency": args.concurrency, "server_src": str(args.server_src), "db": args.db,
                   "receiver_import": args.receiver_import or args.link,
                   "command": "python bench/exchange/run.py " + " ".join(sys.argv[1:])})
    out = args.out or RESULTS / ("exchange-link.json" if args.link else "exchange.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print("| measure | value |\n|---|---|")
    for key, value in result.items():
        print(f"| {key} | {value} |")


if __name__ == "__main__":
    threading.current_thread().name = "bench"
    main()
