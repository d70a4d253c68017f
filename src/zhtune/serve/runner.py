"""Runs blocking engine streams off the event loop for `zhtune serve`: a bounded thread pool, an
admission bound (503 past it), and a pump that moves deltas from worker threads to asyncio.

    runner = Runner(engine, max_concurrency=16, max_queue=256)
    async for index, delta in runner.stream([(prompt, params), ...]):   # several choices, merged
        ...
Leaving the `async for` early (client gone, error) cancels every generation it started: the worker
sees the flag after its next delta and closes the engine's iterator (the engine's cancel contract).
"""

from __future__ import annotations

import asyncio
import errno
import socket
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import AsyncIterator

from zhtune.errors import ZhtuneError
from zhtune.infer.engine import Delta, Engine, GenParams, Prompt
from zhtune.serve.protocol import APIError

_END = object()  # a worker's last message on the queue


class Runner:
    """At most `max_concurrency` generations run (one worker thread each); up to `max_queue` more wait."""

    def __init__(self, engine: Engine, max_concurrency: int = 16, max_queue: int = 256):
        self.engine = engine
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        # the pool's size is the concurrency cap: threads never pile up past it
        self.pool = ThreadPoolExecutor(max_concurrency, thread_name_prefix="zhtune-gen")
        self._lock = threading.Lock()
        self.active = 0    # generations inside engine.stream right now
        self.pending = 0   # admitted and not finished (running + queued)

    # --- admission -------------------------------------------------------------------------
    def admit(self, count: int) -> None:
        """Reserve `count` generations or refuse with 503 (the event loop is single-threaded)."""
        with self._lock:
            if self.pending + count > self.max_concurrency + self.max_queue:
                raise APIError(503, f"server busy: {self.pending} generations running or queued "
                                    f"(limit {self.max_concurrency} running + {self.max_queue} queued); retry later",
                               code="server_busy", headers={"Retry-After": "1"})
            self.pending += count

    def _finished(self, _future: Future) -> None:
        with self._lock:
            self.pending -= 1

    def stats(self) -> dict:
        return {"active_generations": self.active, "pending_generations": self.pending,
                "max_concurrency": self.max_concurrency, "max_queue": self.max_queue}

    # --- one generation, in a worker thread ----------------------------------------------------
    def _work(self, prompt: Prompt, params: GenParams, index: int, post, cancel: threading.Event) -> None:
        if cancel.is_set():  # the client left while this one was queued
            post((index, _END))
            return
        with self._lock:
            self.active += 1
        iterator = None
        try:
            iterator = self.engine.stream(prompt, params)
            for delta in iterator:
                post((index, delta))
                if cancel.is_set() or delta.finish_reason:
                    break
        except BaseException as exc:  # noqa: BLE001 - handed to the request's task, which answers it
            post((index, exc))
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                try:
                    close()  # cancels the engine's generation if it is still running
                except Exception:  # noqa: BLE001 - best effort: the request is already failing
                    pass
            with self._lock:
                self.active -= 1
            post((index, _END))

    # --- the request's side ------------------------------------------------------------------
    async def stream(self, jobs: list[tuple[Prompt, GenParams]]) -> AsyncIterator[tuple[int, Delta]]:
        """(choice index, Delta) from all jobs as they come; raises the first worker's exception.

        Admits len(jobs) generations first (APIError 503 past the bound); each is released when its
        worker finishes or, still queued, is cancelled.
        """
        self.admit(len(jobs))   # 503 before anything starts when the queue is full
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()

        def post(item) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the loop is closed (server shutting down): nobody is listening
                cancel.set()

        futures = []
        for index, (prompt, params) in enumerate(jobs):
            future = self.pool.submit(self._work, prompt, params, index, post, cancel)
            future.add_done_callback(self._finished)
            futures.append(future)
        running = len(futures)
        try:
            while running:
                index, item = await queue.get()
                if item is _END:
                    running -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield index, item
        finally:
            cancel.set()
            for future in futures:
                future.cancel()  # those still queued never start (their done-callback still runs)

    async def call(self, func, *args):
        """Run one blocking engine call (embed) as an admitted job of the same pool."""
        self.admit(1)
        future = self.pool.submit(func, *args)
        future.add_done_callback(self._finished)
        return await asyncio.wrap_future(future)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def bind_port(host: str, port: int) -> socket.socket:
    """A socket bound to host:port, before the model loads: a busy port is "port N is in use" (exit 2) instead
    of "serving" followed by uvicorn's Errno 98 once the model has loaded. The server listens on it."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise ZhtuneError(f"cannot resolve --host {host}: {exc.strerror}", where="--host",
                          expected="an address of this machine, e.g. 127.0.0.1 or 0.0.0.0") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a restart is not held by TIME_WAIT
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ZhtuneError(f"port {port} is in use on {host} / 端口 {port} 已被占用", where="--port",
                              expected="a free port",
                              hint=f"stop what listens there, or pass --port {port + 1}") from None
        raise ZhtuneError(f"cannot listen on {host}:{port}: {exc.strerror}", where="--host / --port",
                          expected="an address of this machine and a port you may use") from None
    sock.set_inheritable(True)
    return sock


def check_port_free(host: str, port: int) -> None:
    """bind_port, released at once: for servers that bind themselves (gradio); names a busy port early."""
    bind_port(host, port).close()
