"""Blocking service calls handed from the event loop to a fixed set of threads.

Why not `starlette.concurrency.run_in_threadpool`: anyio opens a cancel scope, takes a
capacity-limiter token and checkpoints twice per call, which cost about 100 µs of CPU per
hand-off, a tenth of a read by id. This pool keeps the same bound (40 threads, anyio's default,
matching the database pool of 20 + 20 connections) and the same semantics (the call runs to the
end even if the request is cancelled; context variables are copied; exceptions reach the caller),
with one queue put and one `call_soon_threadsafe` per call.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import Callable
from contextlib import suppress
from functools import partial
from queue import SimpleQueue
from typing import Any, ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

_Job = tuple[asyncio.AbstractEventLoop, "asyncio.Future[Any]", contextvars.Context, Callable[..., Any], tuple[Any, ...]]


def _settle(future: asyncio.Future[Any], value: Any, failure: BaseException | None) -> None:
    if future.done():  # the waiting request was cancelled; the call still ran to its end
        return
    if failure is not None:
        future.set_exception(failure)
    else:
        future.set_result(value)


class WorkerPool:
    """Up to `size` threads, started on demand; callers beyond that wait in order (back-pressure).

    Thread accounting is exact: a submitter claims an idle thread, starts a new one, or joins the
    backlog, under one lock, so a call never waits behind another while a thread is free.
    """

    def __init__(self, size: int = 40, name: str = "lienthong-worker") -> None:
        self.size = size
        self.name = name
        self._jobs: SimpleQueue[_Job] = SimpleQueue()
        self._lock = threading.Lock()
        self._threads = 0
        self._idle = 0  # threads waiting for a job that no submitter has claimed
        self._backlog = 0  # jobs queued while every thread was busy

    def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> asyncio.Future[T]:
        """Run `fn(*args, **kwargs)` on a worker thread; await the returned future for its result."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        if kwargs:
            fn = partial(fn, **kwargs)
        start = False
        with self._lock:
            if self._idle:
                self._idle -= 1
            elif self._threads < self.size:
                self._threads += 1
                start = True
            else:
                self._backlog += 1
        self._jobs.put((loop, future, contextvars.copy_context(), fn, args))
        if start:
            threading.Thread(target=self._work, name=f"{self.name}-{self._threads}", daemon=True).start()
        return future

    def _work(self) -> None:
        jobs, lock = self._jobs, self._lock
        while True:
            loop, future, context, fn, args = jobs.get()
            value: Any = None
            failure: BaseException | None = None
            try:
                value = context.run(fn, *args)
            except BaseException as exc:
                failure = exc
            with suppress(RuntimeError):  # the loop closed while the call ran; nobody is waiting any more
                loop.call_soon_threadsafe(_settle, future, value, failure)
            del future, value, failure, fn, args, context
            with lock:
                if self._backlog:
                    self._backlog -= 1
                else:
                    self._idle += 1


POOL = WorkerPool()


def in_thread(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> asyncio.Future[T]:
    """Await this instead of `run_in_threadpool` for the API's blocking calls."""
    return POOL.run(fn, *args, **kwargs)
