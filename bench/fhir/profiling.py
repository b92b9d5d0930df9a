"""Optional: sample the server with py-spy while a phase runs, and summarise where time went.

Profiled passes are extra passes run after the measured ones, so profiling never skews the
reported numbers. Output: raw collapsed stacks in bench/results/profiles/, plus top lists.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from common import log

# Leaves that mean "this thread is parked" (thread-pool workers waiting for work): not server time.
IDLE_LEAVES = {"Condition.wait (threading.py)", "Queue.get (queue.py)", "Event.wait (threading.py)",
               "_worker (concurrent/futures/thread.py)", "select (selectors.py)"}
NOTES = {
    "Runner.run (asyncio/runners.py)": "uvloop's C event loop (HTTP parsing, socket I/O, and epoll waits)",
    "Connection.wait (psycopg/connection.py)": "waiting for a PostgreSQL round trip",
}

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>.*?)(?::\d+)?\)$")


def py_spy() -> str | None:
    cand = Path(sys.executable).parent / "py-spy"
    return str(cand) if cand.exists() else shutil.which("py-spy")


class Sampler:
    def __init__(self, pid: int, out: Path, rate: int = 97) -> None:
        exe = py_spy()
        if exe is None:
            raise RuntimeError("py-spy not installed (pip install py-spy)")
        out.parent.mkdir(parents=True, exist_ok=True)
        self.out = out
        self.proc = subprocess.Popen([exe, "record", "-p", str(pid), "-o", str(out), "-f", "raw", "-r", str(rate),
                                      "--nonblocking"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     start_new_session=True)

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def _short(path: str) -> str:
    for marker in ("site-packages/", "/src/", "lib/python3.11/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


def summarise(raw_file: Path, top: int = 15) -> dict[str, Any]:
    if not raw_file.exists():
        return {"samples": 0}
    self_c: Counter[str] = Counter()
    incl_c: Counter[str] = Counter()
    file_c: Counter[str] = Counter()
    total = idle = 0
    for line in raw_file.read_text("utf-8", "replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        keys, files = [], []
        for fr in stack.split(";"):
            m = _FRAME.match(fr.strip())
            if not m:
                continue
            f = _short(m["file"])
            keys.append(f"{m['func']} ({f})")
            files.append(f)
        if not keys:
            continue
        if keys[-1] in IDLE_LEAVES:
            idle += n
            continue
        self_c[keys[-1]] += n
        for k in set(keys):
            incl_c[k] += n
        for f in set(files):
            file_c[f] += n

    busy = max(1, total - idle)

    def pct(c: Counter[str], only_lt: bool = False) -> list[tuple[str, float]]:
        items = [(k, v) for k, v in c.most_common() if not only_lt or "lienthong/" in k]
        return [(k, round(100.0 * v / busy, 1)) for k, v in items[:top]]

    return {"samples": total, "idle_samples": idle, "busy_samples": busy, "self": pct(self_c),
            "inclusive_lienthong": pct(incl_c, True), "inclusive_files": pct(file_c), "notes": NOTES}


def profile_phase(pid: int, out: Path, fn: Any) -> dict[str, Any]:
    """Run fn() while sampling pid; never lets a profiler problem fail the benchmark."""
    try:
        sampler = Sampler(pid, out)
    except Exception as exc:
        log(f"  profiling unavailable: {exc}")
        return {"error": str(exc)}
    try:
        fn()
    finally:
        sampler.stop()
    s = summarise(out)
    s["file"] = str(out)
    log(f"  profile {out.name}: {s.get('samples', 0)} samples")
    return s
