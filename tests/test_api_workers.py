"""The API's thread hand-off: results, errors, context, and the thread bound under load."""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time

import pytest

from lienthong.api.workers import WorkerPool

REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")


def test_result_error_kwargs_and_context() -> None:
    pool = WorkerPool(size=2)

    def fail() -> None:
        raise ValueError("boom")

    async def main() -> None:
        REQUEST_ID.set("r1")
        assert await pool.run(lambda a, b=0: a + b, 1, b=2) == 3
        assert await pool.run(REQUEST_ID.get) == "r1"
        assert await pool.run(threading.current_thread) is not threading.current_thread()
        with pytest.raises(ValueError, match="boom"):
            await pool.run(fail)

    asyncio.run(main())


def test_concurrent_calls_use_free_threads_and_never_exceed_the_bound() -> None:
    """Calls submitted together run together up to `size`; the rest wait and still all complete."""
    size, calls = 4, 12
    pool = WorkerPool(size=size)
    running = peak = 0
    lock = threading.Lock()

    def work() -> str:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        time.sleep(0.05)
        with lock:
            running -= 1
        return threading.current_thread().name

    async def main() -> list[str]:
        return list(await asyncio.gather(*(pool.run(work) for _ in range(calls))))

    started = time.perf_counter()
    names = asyncio.run(main())
    elapsed = time.perf_counter() - started
    assert peak == size
    assert len(set(names)) == size
    assert elapsed < (calls / size) * 0.05 + 0.5  # three rounds, not twelve
    # once idle, a sequence of calls reuses the existing threads
    asyncio.run(main())
    deadline = time.monotonic() + 2  # the last thread counts itself idle just after answering
    while pool._idle < size and time.monotonic() < deadline:
        time.sleep(0.001)
    assert pool._threads == size
    assert pool._idle == size and pool._backlog == 0


def test_cancelled_caller_does_not_break_the_pool() -> None:
    pool = WorkerPool(size=1)
    release = threading.Event()

    async def main() -> int:
        slow = asyncio.ensure_future(pool.run(release.wait, 5))
        await asyncio.sleep(0.01)
        slow.cancel()
        release.set()
        return await pool.run(lambda: 7)

    assert asyncio.run(main()) == 7
