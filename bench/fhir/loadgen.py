"""Closed-loop HTTP load at fixed concurrency: wrk (C, preferred) or an aiohttp fallback.

Why wrk: on a 2-core box the load generator competes with the server for CPU. A
Python client spends roughly as much CPU per request as the server it measures,
so it would cap (and distort) the very number we want; wrk's per-request cost is a
few microseconds, leaving the cores to the server. The request sequence is random
with a fixed seed (LuaJIT math.random), and wrk's latency histogram gives p50/p95.
"""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from common import log, percentile

LUA = r"""
local reqs = {}
init = function(args)
  math.randomseed(%(seed)d)
  for line in io.lines("%(paths)s") do
    reqs[#reqs + 1] = wrk.format("GET", line, %(headers)s)
  end
end
request = function()
  return reqs[math.random(#reqs)]
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%%d,"duration_us":%%d,"bytes":%%d,"connect":%%d,"read":%%d,"write":%%d,' ..
    '"status":%%d,"timeout":%%d,"p50":%%d,"p90":%%d,"p95":%%d,"p99":%%d,"mean":%%f,"max":%%d}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(95), latency:percentile(99),
    latency.mean, latency.max))
end
"""


def have_wrk() -> bool:
    return shutil.which("wrk") is not None


def _lua_headers(headers: dict[str, str]) -> str:
    def q(s: str) -> str:
        return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'

    return "{" + ", ".join(f"[{q(k)}] = {q(v)}" for k, v in headers.items()) + "}"


def run_wrk(base: str, paths: list[str], concurrency: int, seconds: float, headers: dict[str, str],
            seed: int = 20261127, threads: int = 1) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="lienthong-wrk-") as tmp:
        pfile = Path(tmp) / "paths.txt"
        pfile.write_text("\n".join(paths) + "\n")
        script = Path(tmp) / "read.lua"
        script.write_text(LUA % {"seed": seed, "paths": str(pfile), "headers": _lua_headers(headers)})
        cmd = ["wrk", f"-t{threads}", f"-c{concurrency}", f"-d{max(1, round(seconds))}s", "--timeout", "10s",
               "-s", str(script), base]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60, check=False)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("WRKJSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk failed: {out.stdout[-2000:]} {out.stderr[-2000:]}")
    d = json.loads(line[len("WRKJSON "):])
    dur = d["duration_us"] / 1e6
    return {
        "tool": "wrk", "concurrency": concurrency, "seconds": round(dur, 2), "requests": d["requests"],
        "rps": d["requests"] / dur if dur else 0.0, "p50_ms": d["p50"] / 1000, "p90_ms": d["p90"] / 1000,
        "p95_ms": d["p95"] / 1000, "p99_ms": d["p99"] / 1000, "mean_ms": d["mean"] / 1000,
        "max_ms": d["max"] / 1000, "non_2xx": d["status"],
        "socket_errors": d["connect"] + d["read"] + d["write"] + d["timeout"],
        "mb_per_s": d["bytes"] / dur / 1e6 if dur else 0.0,
    }


def run_python(base: str, paths: list[str], concurrency: int, seconds: float, headers: dict[str, str],
               seed: int = 20261127) -> dict[str, Any]:
    """Fallback when wrk is missing: aiohttp, one session, `concurrency` closed-loop workers."""
    import aiohttp

    rng = random.Random(seed)
    seq = [rng.choice(paths) for _ in range(200_000)]
    lat: list[float] = []
    statuses: dict[int, int] = {}

    async def main() -> float:
        conn = aiohttp.TCPConnector(limit=concurrency)
        async with aiohttp.ClientSession(base, connector=conn) as session:
            stop_at = time.perf_counter() + seconds
            idx = 0

            async def worker() -> None:
                nonlocal idx
                while time.perf_counter() < stop_at and idx < len(seq):
                    path = seq[idx]
                    idx += 1
                    t = time.perf_counter()
                    async with session.get(path, headers=headers) as r:
                        await r.read()
                    lat.append(time.perf_counter() - t)
                    statuses[r.status] = statuses.get(r.status, 0) + 1

            t0 = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            return time.perf_counter() - t0

    dur = asyncio.run(main())
    ms = [x * 1000 for x in lat]
    return {"tool": "aiohttp", "concurrency": concurrency, "seconds": round(dur, 2), "requests": len(lat),
            "rps": len(lat) / dur, "p50_ms": percentile(ms, 50), "p90_ms": percentile(ms, 90),
            "p95_ms": percentile(ms, 95), "p99_ms": percentile(ms, 99), "mean_ms": sum(ms) / max(1, len(ms)),
            "max_ms": max(ms, default=0.0), "non_2xx": sum(v for k, v in statuses.items() if k >= 300),
            "socket_errors": 0, "mb_per_s": float("nan")}


def run_load(base: str, paths: list[str], concurrency: int, seconds: float, warmup: float = 2.0,
             tool: str = "auto", headers: dict[str, str] | None = None) -> dict[str, Any]:
    use_wrk = tool == "wrk" or (tool == "auto" and have_wrk())
    fn = run_wrk if use_wrk else run_python
    hdrs = {"Accept": "application/fhir+json", **(headers or {})}
    if warmup > 0:
        fn(base, paths, concurrency, warmup, hdrs)
    res = fn(base, paths, concurrency, seconds, hdrs)
    log(f"  {res['tool']} c={concurrency}: {res['rps']:.0f} req/s p50 {res['p50_ms']:.2f} ms "
        f"p95 {res['p95_ms']:.2f} ms non-2xx {res['non_2xx']}")
    return res


def sweep_errors(base: str, paths: list[str], headers: dict[str, str] | None = None,
                 limit: int = 20) -> list[dict[str, Any]]:
    """After a run with non-2xx answers: GET every path once to find which ones fail, and how."""
    import httpx

    bad: list[dict[str, Any]] = []
    with httpx.Client(base_url=base, timeout=30.0, headers=headers or {}) as client:
        for p in sorted(set(paths)):
            r = client.get(p)
            if r.status_code >= 300:
                bad.append({"request": f"GET {p}", "status": r.status_code, "body": r.text[:400]})
                if len(bad) >= limit:
                    break
    return bad
