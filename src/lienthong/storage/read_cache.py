"""Current versions kept in memory for reads by id, coherent across every process of one host.

Why: a read by id spent most of its time in the database round trip (thread hop, connection
checkout, driver), not in anything FHIR asks for; the same resources are read again and again
(a patient's chart, the Practitioner and Organization every entry points at). So a bounded
in-process cache answers them, and change counters keep it honest.

Coherence: every `Database` on this host that opens the same database maps the same small
file of counters (`ChangeCounters`), one pair per slot of `hash(type/id)`. A writer marks the
slot of each resource it changes as *active* before its UPDATE and, once its transaction has
ended (committed or not), bumps the slot's *generation* and clears the mark. A cached entry is
served only while its slot is not active and has the generation it was filled under, and an
entry is filled only from a read that began while its slot was idle. So once a write has been
acknowledged, no process on the host serves the version before it; a read concurrent with a
write may return either version, as with the database itself; a writer that dies in the middle
leaves its slots marked, so they are not cached (safe, only slower) until a process opens the counters
while no other has them open. New resources need no counter: an id nobody has written is never cached.

Limits (docs/decisions.md): writers on another host against the same PostgreSQL database do not
share the counters, so such deployments turn the cache off (`--read-cache-mb 0`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import mmap
import os
import tempfile
import threading
import zlib
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy.engine import URL

from lienthong.storage.engine import sqlite_file

if TYPE_CHECKING:
    from lienthong.storage.repository import Stored

logger = logging.getLogger(__name__)

SLOTS = 1 << 14  # 16,384 slots of two 8-byte counters: a 256 KiB file; collisions cost only a miss
_FILE_BYTES = SLOTS * 16
DEFAULT_CACHE_MB = 64
_ENTRY_OVERHEAD = 200  # bytes an entry costs beyond its body (key, Stored, bookkeeping), for the budget


def slot_of(rtype: str, rid: str) -> int:
    """The counter slot of a resource: crc32, because Python's str hash differs between processes."""
    return zlib.crc32(f"{rtype}/{rid}".encode()) & (SLOTS - 1)


class ChangeCounters:
    """Per-slot (active writers, generation) counters in a shared memory-mapped file.

    `path` None maps anonymous memory: one process only (in-memory SQLite, tests of one process).
    Readers take no lock: an aligned 8-byte load cannot be half-written on the platforms served,
    and a torn value would only mismatch, which is a miss. Writers serialise their read-modify-write
    with a thread lock and an advisory lock on the file (other processes)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._fd = -1
        if path is None:
            self._map = mmap.mmap(-1, _FILE_BYTES)
        else:
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
            info = os.fstat(self._fd)
            if info.st_uid != os.getuid() or info.st_mode & 0o077:  # another account could forge the counters
                os.close(self._fd)
                raise PermissionError(f"{path} is not private to this account")
            if info.st_size < _FILE_BYTES:
                os.ftruncate(self._fd, _FILE_BYTES)
            self._map = mmap.mmap(self._fd, _FILE_BYTES)
        self.view = memoryview(self._map).cast("Q")  # [2 * slot] active writers, [2 * slot + 1] generation
        self._lock = threading.Lock()
        if self._fd >= 0:
            self._join()

    def _join(self) -> None:
        """Hold a shared lock on the byte past the counters for as long as this process maps them. The first
        process to arrive (its exclusive try succeeds) clears the active marks that writers which died in
        the middle left behind; generations are never reset, so no old entry can become valid again."""
        try:
            fcntl.lockf(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, _FILE_BYTES)
        except OSError:
            pass
        else:
            with self._exclusive():
                view = self.view
                for s in range(SLOTS):
                    view[2 * s] = 0
        fcntl.lockf(self._fd, fcntl.LOCK_SH, 1, _FILE_BYTES)

    @classmethod
    def shared(cls, path: Path | None) -> ChangeCounters:
        """One instance per file in a process: POSIX record locks belong to the process, and closing any
        descriptor of the file would drop them."""
        if path is None:
            return cls(None)
        with _OPEN_LOCK:
            found = _OPEN.get(path)
            if found is None:
                found = _OPEN[path] = cls(path)
            return found

    def state(self, slot: int) -> tuple[int, int]:
        view = self.view
        return view[2 * slot], view[2 * slot + 1]

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        with self._lock:
            if self._fd < 0:
                yield
                return
            fcntl.lockf(self._fd, fcntl.LOCK_EX, 1, 0)  # byte 0: the writers' lock
            try:
                yield
            finally:
                fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, 0)

    def begin(self, slots: Iterable[int]) -> None:
        """Mark slots as being written: their entries stop being served, and none are filled."""
        with self._exclusive():
            view = self.view
            for s in slots:
                view[2 * s] += 1

    def end(self, slots: Iterable[int]) -> None:
        """The writes of `begin` have ended: invalidate what was cached under the old generation."""
        with self._exclusive():
            view = self.view
            for s in slots:
                view[2 * s + 1] = (view[2 * s + 1] + 1) & 0xFFFF_FFFF_FFFF_FFFF
                if view[2 * s]:
                    view[2 * s] -= 1


_OPEN: dict[Path, ChangeCounters] = {}
_OPEN_LOCK = threading.Lock()


def counters_path(url: URL, directory: Path | None = None) -> Path | None:
    """Where the processes of this host find the counters of the database at `url`.

    SQLite: beside the database file (None for an in-memory database, private to its process).
    PostgreSQL: one file per server (host and port, never a password) in shared memory, shared by its
    databases: a collision between two databases costs a miss, and throw-away servers leave one file."""
    if url.get_backend_name() == "sqlite":
        database = sqlite_file(url)
        return None if database is None else database.with_name(database.name + "-changes")
    key = f"{url.get_backend_name()}://{url.host or ''}:{url.port or ''}"
    if directory is None:
        shm = Path("/dev/shm")  # noqa: S108 - opened with O_NOFOLLOW, used only if private to this account
        directory = shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())
    return directory / f"lienthong-changes-{hashlib.sha256(key.encode()).hexdigest()[:20]}"


@dataclass(slots=True)
class Ticket:
    """Taken before a database read: the read may fill the cache only if its slot was idle then."""

    key: tuple[str, str]
    slot: int
    generation: int


@dataclass(slots=True)
class _Entry:
    stored: Stored
    slot: int
    generation: int
    size: int


class CurrentVersions:
    """A bounded, least-recently-used map from (type, id) to the current version, checked against
    the change counters on every hit."""

    def __init__(self, counters: ChangeCounters, max_bytes: int) -> None:
        self.counters = counters
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[str, str], _Entry] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()  # fills and evictions; hits only read
        self.hits = 0
        self.misses = 0

    def get(self, rtype: str, rid: str) -> Stored | None:
        """The current version if it is cached and still current, else None (the caller reads the database)."""
        key = (rtype, rid)
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        view, slot = self.counters.view, entry.slot
        if view[2 * slot] or view[2 * slot + 1] != entry.generation:  # a writer is at it, or has been
            self.misses += 1
            return None
        with contextlib.suppress(KeyError):  # evicted meanwhile by another thread: still a valid answer
            self._entries.move_to_end(key)
        self.hits += 1
        return entry.stored

    def ticket(self, rtype: str, rid: str) -> Ticket | None:
        slot = slot_of(rtype, rid)
        active, generation = self.counters.state(slot)
        return None if active else Ticket((rtype, rid), slot, generation)

    def fill(self, ticket: Ticket, stored: Stored) -> None:
        size = len(stored.body or b"") + _ENTRY_OVERHEAD
        if size > self.max_bytes // 8:  # one huge Binary must not flush the whole cache
            return
        with self._lock:
            old = self._entries.pop(ticket.key, None)
            if old is not None:
                self._bytes -= old.size
            self._entries[ticket.key] = _Entry(stored, ticket.slot, ticket.generation, size)
            self._bytes += size
            while self._bytes > self.max_bytes and self._entries:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= evicted.size

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)


def open_cache(url: URL, max_mb: int = DEFAULT_CACHE_MB) -> CurrentVersions | None:
    """The cache for the database at `url`, or None when it is turned off or its counters cannot be shared."""
    if max_mb <= 0:
        return None
    path = counters_path(url)
    try:
        counters = ChangeCounters.shared(path)
    except OSError as exc:
        logger.warning("read cache off: cannot map %s (%s)", path, exc)
        return None
    return CurrentVersions(counters, max_mb * 1024 * 1024)
