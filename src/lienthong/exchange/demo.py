"""`lienthong demo`: a provincial hub and four facility nodes on this machine, and the pilot scenario.

Why real servers: every node is a full lienthong (SQLite, authentication,
audit, patient index) behind its own uvicorn server on 127.0.0.1, and packages
travel over HTTP with signed requests, exactly as between facilities; only the
network is local. Names and facts come from the pilot province's data file;
the Bắc Giang units' facility codes are not published, so the demo uses codes
from its configuration and marks them as not official.
"""

from __future__ import annotations

import random
import shutil
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import uvicorn
from sqlalchemy import Engine, func, select

from lienthong.api.app import ApiSettings
from lienthong.devtools import clinical
from lienthong.exchange import transfer as tr
from lienthong.exchange.registry import Facility, Registry
from lienthong.exchange.schema import outbox
from lienthong.exchange.service import ExchangeConfig, ExchangeService, load_trust, provincial_setup
from lienthong.exchange.trust import ProvincialCA
from lienthong.interactions.bundles import BundleProcessor
from lienthong.node import Node, app_for, build_node, open_database
from lienthong.storage import schema

HUB = ("24000", "Trạm liên thông tỉnh Bắc Ninh (Sở Y tế) / Provincial exchange hub")
PROVINCIAL = "Bệnh viện Đa khoa tỉnh Bắc Giang"
BACH_MAI = "Bệnh viện Bạch Mai"
# Demo codes for units whose real codes are not published (marked code_is_official = False in the registry).
DEMO_CODES = {PROVINCIAL: "24901", "Trung tâm Y tế huyện Lục Ngạn": "24910", "Trung tâm Y tế huyện Hiệp Hòa": "24913"}
DATA_FILE = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "bac-giang-2025-02.json"


SERVER_START_SECONDS = 60


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _bound_socket() -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@dataclass
class Unit:
    code: str
    name: str
    node: Node
    exchange: ExchangeService
    port: int
    server: uvicorn.Server | None = None
    thread: threading.Thread | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass
class Province:
    units: dict[str, Unit] = field(default_factory=dict)
    folder: Path = Path("var/demo")

    def unit(self, name: str) -> Unit:
        return next(u for u in self.units.values() if u.name == name)

    def stop_unit(self, code: str) -> None:
        """Take one unit off the network (server and exchange workers), as if its link or machine went down."""
        unit = self.units[code]
        unit.exchange.stop()
        if unit.server is not None:
            unit.server.should_exit = True
        if unit.thread is not None:
            unit.thread.join(timeout=10)

    def start_unit(self, code: str) -> None:
        """Bring a unit back on the same port; its outbox drains and its inbox accepts again."""
        unit = self.units[code]
        app = app_for(unit.node, ApiSettings(node_name=code, public_base_url=f"{unit.base}/fhir"))
        unit.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=unit.port, log_level="warning",
                                                    lifespan="off"))
        unit.thread = threading.Thread(target=unit.server.run, name=f"server-{code}", daemon=True)
        unit.thread.start()
        while not unit.server.started:
            time.sleep(0.02)
        unit.exchange = ExchangeService(unit.node, unit.exchange.config, unit.exchange.keys, unit.exchange.trust)
        unit.node.exchange = unit.exchange
        unit.exchange.start()

    def stop(self) -> None:
        for unit in self.units.values():
            unit.exchange.stop()
            if unit.server is not None:
                unit.server.should_exit = True
        for unit in self.units.values():
            if unit.thread is not None:
                unit.thread.join(timeout=10)
            unit.node.close()  # its audit journal drained into the chain (the servers run without a lifespan)
            unit.node.db.engine.dispose()


def _units_from_data() -> list[tuple[str, str]]:
    names = [PROVINCIAL, "Trung tâm Y tế huyện Lục Ngạn", "Trung tâm Y tế huyện Hiệp Hòa"]
    if DATA_FILE.is_file():
        import json

        data = json.loads(DATA_FILE.read_text(encoding="utf-8"))
        known = {u["name_vi"] for u in data.get("units", [])}
        names = [n for n in names if n in known]
        partner = data.get("partner", {})
        return [(DEMO_CODES[n], n) for n in names] + [(partner.get("facility_code", "01001"),
                                                        partner.get("name_vi", BACH_MAI))]
    return [(DEMO_CODES[n], n) for n in names] + [("01001", BACH_MAI)]


def start_province(folder: Path, fresh: bool = True, units: list[tuple[str, str]] | None = None,
                   poll_seconds: float = 0.05) -> Province:
    """Create the CA and keys, open one database per unit, start every server and exchange worker."""
    if fresh and folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    units = units or _units_from_data()
    identities = provincial_setup(folder, HUB[0], units)
    ca = ProvincialCA.load_dir(folder / "ca")
    trust = load_trust(ca.cert_pem(), ca.crl().public_bytes(_pem()))
    province = Province(folder=folder)
    # Each server gets a socket bound here and kept open, so no other process can take its port between
    # choosing it and the server's start (a port chosen and released first was seen taken by then).
    sockets = {code: _bound_socket() for code, _ in [HUB, *units]}
    ports = {code: int(sock.getsockname()[1]) for code, sock in sockets.items()}
    hub_url = f"http://127.0.0.1:{ports[HUB[0]]}/exchange"
    for code, name in [HUB, *units]:
        role = "hub" if code == HUB[0] else "node"
        base = f"http://127.0.0.1:{ports[code]}"
        settings = ApiSettings(node_name=code, public_base_url=f"{base}/fhir")
        node = build_node(open_database(f"sqlite:///{folder / f'{code}.db'}"), settings, secure=True)
        config = ExchangeConfig(role=role, code=code, name=name, hub_code=HUB[0],
                                hub_url=None if role == "hub" else hub_url, poll_seconds=poll_seconds)
        exchange = ExchangeService(node, config, identities[code], trust)
        node.exchange = exchange
        server = uvicorn.Server(uvicorn.Config(app_for(node, settings), host="127.0.0.1", port=ports[code],
                                               log_level="warning", lifespan="off"))
        unit = Unit(code, name, node, exchange, ports[code], server)
        unit.thread = threading.Thread(target=server.run, kwargs={"sockets": [sockets[code]]}, name=f"server-{code}",
                                       daemon=True)
        unit.thread.start()
        province.units[code] = unit
    hub = province.units[HUB[0]]
    registry = Registry(hub.node.db.engine)
    today = datetime.now(UTC).date().isoformat()
    for code, name in units:
        registry.upsert(Facility(code=code, name_vi=name, endpoint=f"{province.units[code].base}/exchange",
                                 clearance="cleared", clearance_date=today,
                                 clearance_ref="Demo: kiểm tra an ninh giả lập / simulated security check",
                                 code_is_official=code not in DEMO_CODES.values(),
                                 cert_pem=identities[code].chain_pem().decode()))
    deadline = time.monotonic() + SERVER_START_SECONDS
    for unit in province.units.values():
        while unit.server is not None and not unit.server.started:
            if unit.thread is None or not unit.thread.is_alive() or time.monotonic() > deadline:
                province.stop()
                raise RuntimeError(f"máy chủ {unit.code} không khởi động được / the server of {unit.code} did not "
                                   f"start on port {unit.port}")
            time.sleep(0.02)
        unit.exchange.start()
    return province


def _pem() -> Any:
    from cryptography.hazmat.primitives.serialization import Encoding

    return Encoding.PEM


@dataclass
class ScenarioResult:
    sent: int = 0
    delivered: int = 0
    received: int = 0
    matched: int = 0
    new_patients: int = 0
    review: int = 0
    acknowledged: int = 0
    refused: int = 0
    bytes_on_wire: int = 0  # transfer messages on the sender's link (compressed, sealed, signed)
    raw_json_bytes: int = 0  # the same transfer documents as plain JSON
    wire_ratio: float = 0.0
    seconds: float = 0.0
    transfers_per_second: float = 0.0
    latency_p50_s: float = 0.0
    latency_p95_s: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


def load_pilot(sender: ExchangeService, receiver: ExchangeService, n: int, seed: int = 304,
               known_share: float = 0.2) -> tuple[list[dict[str, Any]], random.Random]:
    """Register `n` inpatients with realistic records at the sender; a share of them also at the receiver.

    The share already known at Bạch Mai (an earlier visit) lets the receiver's patient index link
    them instead of creating duplicates. Returns the patients and the random stream to go on with."""
    rng = random.Random(seed)
    org, doctor = clinical.facility_resources(sender.config.code, sender.config.name)
    patients = clinical.pilot_patients(n, sender.config.code, seed)
    ctx_sender = sender.system_context("demo")
    loader = BundleProcessor(sender.node.service)
    loader.process(ctx_sender, clinical.as_transaction([org, doctor]))
    for start in range(0, len(patients), 25):  # short transactions: the exchange workers write meanwhile
        batch: list[dict[str, Any]] = []
        for patient in patients[start : start + 25]:
            batch += [patient, *clinical.clinical_record(patient, rng, org, doctor)]
        loader.process(ctx_sender, clinical.as_transaction(batch))
    known = [p for p in patients if rng.random() < known_share]
    if known:
        ctx_receiver = receiver.system_context("demo")
        earlier = []
        for p in known:  # the same person, registered earlier at Bạch Mai without the other hospital's code
            copy = {k: v for k, v in p.items() if k != "identifier"}
            kept = [i for i in p["identifier"] if "/ma-bn/" not in i["system"]]
            if kept:
                copy["identifier"] = kept
            earlier.append(copy)
        BundleProcessor(receiver.node.service).process(ctx_receiver, clinical.as_transaction(earlier))
    return patients, rng


def queue_transfers(sender: ExchangeService, destination: str, patients: list[dict[str, Any]],
                    rng: random.Random) -> dict[str, float]:
    """A clinician transfers each patient (Task, ServiceRequest, signed document, outbox row);
    returns package id -> `time.perf_counter()` when it was queued."""
    ctx = sender.system_context("demo")
    queued: dict[str, float] = {}
    for patient in patients:
        main, _, secondary, signs = rng.choice(clinical.TRANSFER_CASES)
        slip = tr.TransferSlip(destination=destination, reason="2", main_diagnosis=main,
                               secondary_diagnoses=secondary, doctor_licence=f"{sender.config.code}/CCHN-0001",
                               clinical_signs=signs, course="Điều trị nội khoa 3 ngày, không cải thiện",
                               results_summary="Xem kết quả xét nghiệm kèm theo", treatment="Theo y lệnh",
                               condition="Ổn định để vận chuyển", next_treatment="Điều trị chuyên sâu tuyến trung ương",
                               transport="Xe cứu thương", escort_name="Nguyễn Thị Lan", escort_title="Điều dưỡng")
        out = sender.start_transfer(ctx, patient["id"], slip)
        queued[out["package"]] = time.perf_counter()
    return queued


def pilot_304(province: Province, n: int = 304, seed: int = 304, known_share: float = 0.2,
              timeout: float = 900.0) -> ScenarioResult:
    """Transfer `n` inpatients with realistic records from the provincial hospital to Bạch Mai."""
    sender = province.unit(PROVINCIAL)
    receiver = province.units["01001"] if "01001" in province.units else province.unit(BACH_MAI)
    patients, rng = load_pilot(sender.exchange, receiver.exchange, n, seed, known_share)
    patients_before = _count_type(receiver, "Patient")
    result = ScenarioResult()
    started = time.perf_counter()
    started_at = queue_transfers(sender.exchange, receiver.code, patients, rng)
    result.sent = len(started_at)
    latencies = _wait_acknowledged(sender, started_at, timeout)
    result.seconds = time.perf_counter() - started
    result.acknowledged = len(latencies)
    result.transfers_per_second = result.acknowledged / result.seconds if result.seconds else 0.0
    if latencies:
        ordered = sorted(latencies)
        result.latency_p50_s = ordered[len(ordered) // 2]
        result.latency_p95_s = ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))]
    _count(province, sender, receiver, result, patients_before)
    return result


def _wait_acknowledged(sender: Unit, started_at: dict[str, float], timeout: float) -> list[float]:
    """Poll the sender's Tasks until every transfer is at least `received` (acknowledged by the receiver)."""
    deadline = time.perf_counter() + timeout
    done: dict[str, float] = {}
    while len(done) < len(started_at) and time.perf_counter() < deadline:
        for package, step in _steps(sender).items():
            if package in started_at and package not in done and tr.RANK.get(step, 0) >= tr.RANK["received"]:
                done[package] = time.perf_counter() - started_at[package]
        if len(done) < len(started_at):
            time.sleep(0.1)
    return list(done.values())


def _steps(unit: Unit) -> dict[str, str]:
    return transfer_steps(unit.node.db.engine)


def transfer_steps(engine: Engine) -> dict[str, str]:
    """Package id -> the current step of its transfer Task in this unit's database."""
    import orjson

    r, v = schema.resource, schema.resource_version
    with engine.connect() as conn:
        rows = conn.execute(select(v.c.body).join(r, (r.c.res_pk == v.c.res_pk) & (r.c.version == v.c.version))
                            .where(r.c.rtype == "Task", r.c.deleted.is_(False))).all()
    out = {}
    for (body,) in rows:
        task = orjson.loads(body)
        ident = next((i["value"] for i in task.get("identifier", []) if i.get("system") == tr.PACKAGE_SYSTEM), None)
        if ident:
            out[ident] = tr.step_of(task)
    return out


def _count(province: Province, sender: Unit, receiver: Unit, result: ScenarioResult, patients_before: int) -> None:
    from lienthong.exchange.schema import inbox

    hub = province.units[HUB[0]]
    with sender.node.db.engine.connect() as conn:  # what the sender's link carried for the transfers
        result.bytes_on_wire = int(conn.execute(select(func.coalesce(func.sum(outbox.c.size), 0))
                                                .where(outbox.c.status == "sent",
                                                       outbox.c.dest == receiver.code)).scalar_one())
    with hub.node.db.engine.connect() as conn:
        result.delivered = int(conn.execute(select(func.count()).select_from(inbox)
                                            .where(inbox.c.source == sender.code)).scalar_one())
        result.refused = int(conn.execute(select(func.count()).select_from(outbox)
                                          .where(outbox.c.status == "dead")).scalar_one())
    with receiver.node.db.engine.connect() as conn:
        result.received = int(conn.execute(select(func.count()).select_from(inbox)
                                           .where(inbox.c.source == HUB[0], inbox.c.status == "processed")).scalar_one())
        result.review = int(conn.execute(select(func.count()).select_from(schema.mpi_review)
                                         .where(schema.mpi_review.c.status == "pending")).scalar_one())
    imports = _count_type(receiver, "Provenance")
    result.new_patients = _count_type(receiver, "Patient") - patients_before
    result.matched = imports - result.new_patients
    result.raw_json_bytes = _raw_sizes(sender)
    result.wire_ratio = result.bytes_on_wire / result.raw_json_bytes if result.raw_json_bytes else 0.0


def _count_type(unit: Unit, rtype: str) -> int:
    with unit.node.db.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(schema.resource)
                                .where(schema.resource.c.rtype == rtype, schema.resource.c.deleted.is_(False)))
                   .scalar_one())


def _raw_sizes(sender: Unit) -> int:
    """Raw JSON size of the transfer documents the sender stored (what would go on the wire uncompressed)."""
    r, v = schema.resource, schema.resource_version
    with sender.node.db.engine.connect() as conn:
        return int(conn.execute(select(func.coalesce(func.sum(func.length(v.c.body)), 0))
                                .join(r, (r.c.res_pk == v.c.res_pk) & (r.c.version == v.c.version))
                                .where(r.c.rtype == "Bundle")).scalar_one())
