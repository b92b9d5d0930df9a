"""The audit journal: an fdatasync'd local file that makes a read's audit record durable before its answer.

Why: committing every batch of read records to the database before answering cost most of a cached read
(benchmarks.md, "The audited read in process"). A local append plus `fdatasync` is cheaper, and a
background drain (security/audit.py) moves the lines into the hash-chained audit tables in large batches.

The files, one job each:
- each process appends to its own *segment* (`seg-<pid>-<ns>-<random>.jsonl`, mode 0600) under an
  exclusive `flock`, so no other process drains a segment that is still being written;
- a line is one record's compact facts (`encode_record`) and ends with a newline; only lines up to the last
  `fdatasync` are drained from a live segment, and the torn tail of a dead process's segment (never
  acknowledged: its sync never returned) is dropped;
- a segment is created under a temporary name, locked, registered in the database and only then renamed,
  so a scan never mistakes a segment being born for an orphan, and never drains another database's segment;
- a full segment is retired (no more writes) and a new one opened; a retired or orphaned segment is deleted
  once drained. Nothing here touches the database: the caller passes `register` and does the draining.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.engine import URL

from lienthong.storage.engine import sqlite_file

logger = logging.getLogger(__name__)

SEGMENT_PREFIX = "seg-"
SEGMENT_SUFFIX = ".jsonl"
MAX_SEGMENT_BYTES = 64 * 1024 * 1024  # then the writer moves to a new segment and the old one is deleted once drained
MAX_READ_BYTES = 4 * 1024 * 1024  # one drain transaction at most
# Segments grow by this much of zeros ahead of the writer: overwriting allocated blocks lets `fdatasync` skip the
# file system's metadata commit (on this ext4 disk 170 µs instead of 260 µs per sync, 72 instead of 107 µs of CPU).
PREALLOCATE_BYTES = 1024 * 1024


def journal_location(url: URL, setting: str = "auto") -> Path | None:
    """Where the journal of the database at `url` lives: `setting` is a directory, "off" (each batch of read
    records is committed to the database before its answer) or "auto": beside a SQLite file, or
    ./var/audit-journal/<server and database> for PostgreSQL; off for an in-memory database.

    The journal must be on the node's own durable disk, never on a shared or temporary file system: a
    record in it has been acknowledged."""
    if setting == "off":
        return None
    if setting != "auto":
        return Path(setting)
    if url.get_backend_name() == "sqlite":
        database = sqlite_file(url)
        return None if database is None else database.with_name(database.name + "-audit-journal")
    key = f"{url.get_backend_name()}://{url.host or ''}:{url.port or ''}/{url.database or ''}"
    return Path("var") / "audit-journal" / hashlib.sha256(key.encode()).hexdigest()[:20]


@dataclass
class Segment:
    """One journal file held open and locked by this process."""

    name: str
    path: Path
    fd: int
    synced: int = 0  # bytes known durable: the drain of this process's segment reads no further (not for orphans)
    allocated: int = 0  # bytes of zeros written ahead (see PREALLOCATE_BYTES)
    writable: bool = True  # False once retired, or when it was found as an orphan
    orphan: bool = False  # written by a process that is gone: read to its last complete line


def _write_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def _written_after(fd: int, offset: int) -> int:
    """How many bytes were written after `offset` (up to the zeros written ahead)."""
    count = 0
    while chunk := os.pread(fd, 1024 * 1024, offset + count):
        zeros = chunk.find(0)
        if zeros >= 0:
            return count + zeros
        count += len(chunk)
    return count


class JournalError(OSError):
    """The journal cannot take a batch (disk full, I/O error): the caller commits it another way."""


class AuditJournal:
    """This process's segments in one journal directory."""

    def __init__(self, directory: Path, register: Callable[[str], None],
                 max_segment_bytes: int = MAX_SEGMENT_BYTES, writing: bool = True) -> None:
        """`writing=False`: only claim and drain what dead processes left (`lienthong audit verify`)."""
        self.directory = directory
        self.max_segment_bytes = max_segment_bytes
        self._register = register
        self._lock = threading.Lock()  # guards the segment lists between the writer and the drain
        if writing:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            directory.chmod(0o700)  # also when it existed: who reads the journal reads who saw which patient
        self.current: Segment | None = self._open_segment() if writing else None
        self.retired: list[Segment] = []
        self._reported: set[str] = set()  # foreign segments already reported

    # ---- the writer's side --------------------------------------------------------------------------------
    def write(self, lines: list[bytes]) -> None:
        """Append lines (each without its newline) and return once they are on disk.

        A failed write or sync retires the segment at its last durable offset, so a half-written batch is never
        drained (its records are committed by the caller instead), and the next batch opens a new segment."""
        segment = self.current
        if segment is None:
            segment = self._replace_current()
        data = b"\n".join(lines) + b"\n"
        try:
            if segment.synced + len(data) > segment.allocated:
                grow = max(PREALLOCATE_BYTES, len(data))
                _write_all(segment.fd, bytes(grow), segment.allocated)
                segment.allocated += grow
            _write_all(segment.fd, data, segment.synced)
            os.fdatasync(segment.fd)
        except OSError as exc:
            self._retire(segment)
            self.current = None
            raise JournalError(exc.errno or errno.EIO, f"audit journal {segment.path}: {exc.strerror or exc}"
                               ) from exc
        segment.synced += len(data)
        if segment.synced >= self.max_segment_bytes:
            with contextlib.suppress(Exception):  # rotation waits for the database when it cannot register
                self._replace_current()

    def _replace_current(self) -> Segment:
        fresh = self._open_segment()
        old, self.current = self.current, fresh
        if old is not None:
            self._retire(old)
        return fresh

    def _retire(self, segment: Segment) -> None:
        with self._lock:
            segment.writable = False
            if segment not in self.retired:
                self.retired.append(segment)

    def _open_segment(self) -> Segment:
        name = f"{SEGMENT_PREFIX}{os.getpid()}-{time.time_ns()}-{secrets.token_hex(4)}{SEGMENT_SUFFIX}"
        temporary = self.directory / f".new-{name}"
        fd = os.open(temporary, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self._register(name)
            os.rename(temporary, self.directory / name)
            self._sync_directory()
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
        return Segment(name, self.directory / name, fd)

    def _sync_directory(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # ---- the drain's side ---------------------------------------------------------------------------------
    def segments(self) -> list[Segment]:
        """What this process holds, oldest first: retired and orphaned segments, then the current one."""
        with self._lock:
            held = list(self.retired)
        current = self.current
        return held + ([current] if current is not None else [])

    def claim_orphans(self, registered: Callable[[str], bool]) -> list[Segment]:
        """Lock the segments whose writer is gone, if this database registered them; they join `segments()`.

        A segment that another database registered is left alone (and reported), never deleted: it is audit
        data that belongs elsewhere."""
        held = {s.name for s in self.segments()}
        claimed = []
        for path in sorted(self.directory.glob(f"{SEGMENT_PREFIX}*{SEGMENT_SUFFIX}")):
            if path.name in held:
                continue
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            except OSError:
                continue  # deleted meanwhile by whoever drained it
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)  # its writer (or another drain) holds it
                continue
            if os.fstat(fd).st_nlink == 0 or not registered(path.name):
                if os.fstat(fd).st_nlink and path.name not in self._reported:
                    self._reported.add(path.name)  # said once per process: the scan repeats every few seconds
                    logger.warning("audit journal: %s is not registered in this database; left in place", path)
                os.close(fd)  # already drained and deleted by another process, or not ours
                continue
            claimed.append(Segment(path.name, path, fd, writable=False, orphan=True))
        with self._lock:
            self.retired.extend(claimed)
        return claimed

    @staticmethod
    def read(segment: Segment, offset: int, max_bytes: int = MAX_READ_BYTES) -> tuple[list[bytes], int]:
        """The complete lines after `offset` (at most about `max_bytes`), and the offset after the last one."""
        end = segment.synced if not segment.orphan else os.fstat(segment.fd).st_size
        if end <= offset:
            return [], offset
        data = os.pread(segment.fd, min(end - offset, max_bytes), offset)
        zeros = data.find(0)  # an orphan's lines end where the zeros written ahead begin
        if zeros >= 0:
            data = data[:zeros]
        last = data.rfind(b"\n")
        if last < 0:
            if len(data) >= max_bytes:  # one line longer than a whole read: never written by this journal
                raise JournalError(errno.EINVAL, f"audit journal {segment.path}: line too long at {offset}")
            return [], offset  # an orphan's torn tail, or nothing complete yet
        return data[:last].split(b"\n"), offset + last + 1

    def drained(self, segment: Segment, offset: int) -> bool:
        """Whether `segment` is finished at `offset`; a finished retired or orphaned segment is deleted."""
        if segment.writable or (not segment.orphan and offset < segment.synced):
            return False
        tail = _written_after(segment.fd, offset)
        if tail > 0:  # an orphan's torn last line, or a failed batch past the durable offset: never acknowledged
            logger.warning("audit journal: %d unacknowledged byte(s) dropped at the end of %s", tail, segment.path)
        with contextlib.suppress(FileNotFoundError):
            segment.path.unlink()
        with contextlib.suppress(OSError):
            self._sync_directory()
        with self._lock:
            if segment in self.retired:
                self.retired.remove(segment)
        os.close(segment.fd)  # releases the lock only after the file is gone
        return True

    def close(self) -> None:
        """Stop writing: the current segment is retired (the caller drains it, then it is deleted)."""
        current, self.current = self.current, None
        if current is not None:
            self._retire(current)

    def release(self) -> None:
        """Close every file without deleting anything (what was not drained stays for the next process)."""
        with self._lock:
            held, self.retired = self.retired, []
        current, self.current = self.current, None
        for segment in held + ([current] if current is not None else []):
            with contextlib.suppress(OSError):
                os.close(segment.fd)
