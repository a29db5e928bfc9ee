"""A real in-process replica in its own thread, and sync database access for fuzz runs.

Hypothesis drives examples synchronously, one after another; the replica must outlive them
all (one service per run, so a defect that only shows after many orders still shows), so it
runs on its own event loop in a background thread. Everything the fuzz tests check about it
goes through this class: the orders' rows, the service's long-lived tasks, and how long its
shutdown takes.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import io
import json
import re
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import psycopg2
import psycopg2.extras

from biomero_importer.service import Service, open_service
from biomero_importer.settings import Settings
from tests.support import TERMINAL

# tasks that end by design: orders, one-off sweeps, and unnamed tasks of the libraries
TRANSIENT_TASKS = re.compile(r"Task-\d+|order-.*|cancel-pending|fuzz-replica-main")

# event names that mean the service itself (not an order) went wrong
SERVICE_FAULTS = ("background_task_failed", "order_crashed", "dispatcher_crashed")


@dataclass
class Row:
    id: int
    uuid: str
    stage: str
    description: str | None


class Database:
    """Short sync connections: the test thread must never share the replica's loop."""

    def __init__(self, url: str) -> None:
        self.url = url

    @contextlib.contextmanager
    def cursor(self) -> Iterator[Any]:
        conn = psycopg2.connect(self.url)
        try:
            conn.autocommit = True
            with conn.cursor(cursor_factory=psycopg2.extras.DictCursor) as cur:
                yield cur
        finally:
            conn.close()

    def execute(self, query: str, *args: Any) -> None:
        with self.cursor() as cur:
            cur.execute(query, args)

    def latest(self, uuids: list[str]) -> dict[str, Row]:
        if not uuids:
            return {}
        with self.cursor() as cur:
            cur.execute(
                "SELECT DISTINCT ON (uuid) id, uuid, stage, description FROM imports"
                " WHERE uuid = ANY(%s) ORDER BY uuid, id DESC",
                (uuids,),
            )
            return {r["uuid"]: Row(r["id"], r["uuid"], r["stage"], r["description"]) for r in cur}

    def history(self, uuid: str) -> list[Row]:
        with self.cursor() as cur:
            cur.execute(
                "SELECT id, uuid, stage, description FROM imports WHERE uuid = %s ORDER BY id",
                (uuid,),
            )
            return [Row(r["id"], r["uuid"], r["stage"], r["description"]) for r in cur]

    def queue_state(self, uuid: str) -> dict[str, Any]:
        """The importer's bookkeeping row of an order, for failure messages."""
        with self.cursor() as cur:
            cur.execute(
                "SELECT stage, latest_id, worker_id, cancel_requested, attempts,"
                " lease_expires_at - now() AS lease_left FROM importer_orders WHERE uuid = %s",
                (uuid,),
            )
            row = cur.fetchone()
            return dict(row) if row is not None else {}

    def wait_terminal(self, uuids: list[str], timeout: float) -> dict[str, Row]:
        """Latest rows once every order is terminal; the stragglers' rows on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            rows = self.latest(uuids)
            open_ = {u: r for u, r in rows.items() if r.stage not in TERMINAL}
            missing = [u for u in uuids if u not in rows]
            if not open_ and not missing:
                return {}
            if time.monotonic() > deadline:
                return open_
            time.sleep(0.05)


@dataclass
class ReplicaThread:
    """``open_service`` + ``dispatcher.run()`` on a private event loop in a daemon thread."""

    settings: Settings
    url: str
    service: Service | None = None
    error: BaseException | None = None
    shutdown_seconds: float | None = None
    shutdown_hung: bool = False
    _loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.new_event_loop)
    _thread: threading.Thread | None = None
    _main: asyncio.Task[None] | None = None
    _run: asyncio.Task[None] | None = None
    _ready: threading.Event = field(default_factory=threading.Event)
    _helpers: dict[str, asyncio.Task[Any]] = field(default_factory=dict)

    def start(self, timeout: float = 60) -> None:
        self._thread = threading.Thread(target=self._thread_main, name="fuzz-replica", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise AssertionError(f"the replica did not start within {timeout}s: {self.error!r}")
        if self.error is not None:
            raise AssertionError(f"the replica failed to start: {self.error!r}")
        # the long-lived tasks as they are once the service runs: each must stay alive
        time.sleep(0.5)
        self._helpers = self._call(self._live_tasks())

    def _thread_main(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._main = self._loop.create_task(self._serve(), name="fuzz-replica-main")
            self._loop.run_until_complete(self._main)
        except BaseException as exc:  # recorded, checked by the test
            self.error = self.error or exc
        finally:
            self._ready.set()
            # end what is left and collect its exceptions here: a task or future whose
            # exception is logged from __del__ later may do so inside another thread's
            # ast.parse (traceback carets), which CPython 3.11 answers with "SystemError: AST
            # constructor recursion depth mismatch" (python/cpython#106905)
            with contextlib.suppress(Exception):
                left = asyncio.all_tasks(self._loop)
                for task in left:
                    task.cancel()
                self._loop.run_until_complete(asyncio.gather(*left, return_exceptions=True))
                self._loop.run_until_complete(self._loop.shutdown_asyncgens())
            self._loop.close()

    async def _serve(self) -> None:
        async with open_service(self.settings, self.url) as service:
            self.service = service
            self._run = asyncio.create_task(service.dispatcher.run(), name="dispatcher")
            self._ready.set()
            try:
                await self._run
            except Exception as exc:
                self.error = exc
                raise

    async def _live_tasks(self) -> dict[str, asyncio.Task[Any]]:
        current = asyncio.current_task()
        return {
            task.get_name(): task
            for task in asyncio.all_tasks()
            if task is not current
            and not task.done()
            and not TRANSIENT_TASKS.fullmatch(task.get_name())
        }

    def _call(self, coro: Any, timeout: float = 10) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return future.result(timeout)

    def dead_helpers(self) -> list[str]:
        """Long-lived tasks that ended while the service was meant to be running."""
        dead = []
        for name, task in self._helpers.items():
            if task.done():
                problem = "cancelled" if task.cancelled() else repr(task.exception())
                dead.append(f"{name}: {problem}")
        if self.error is not None:
            dead.append(f"service: {self.error!r}")
        return dead

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, grace: float) -> None:
        """request_stop(), then wait up to ``grace`` for the whole service to close; a service
        that does not is cancelled (and recorded as hung) so the test run can go on."""
        if not self.alive:
            return
        assert self.service is not None and self._thread is not None
        started = time.monotonic()
        self._loop.call_soon_threadsafe(self.service.dispatcher.request_stop)
        self._thread.join(grace)
        if self._thread.is_alive():
            self.shutdown_hung = True
            # each cancel ends one await; a shutdown that awaits again (a queue join after
            # the dispatcher was cancelled) needs another
            deadline = time.monotonic() + 30
            while self._thread.is_alive() and time.monotonic() < deadline:
                main = self._main
                if main is not None and not self._loop.is_closed():
                    with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                        self._loop.call_soon_threadsafe(main.cancel)
                self._thread.join(0.5)
            assert not self._thread.is_alive(), "the replica's thread survived cancellation"
        else:
            self.shutdown_seconds = time.monotonic() - started
        for task in self._helpers.values():  # retrieved: nothing left to log from __del__
            if task.done() and not task.cancelled():
                task.exception()
        gc.collect()


class LogSink(io.TextIOBase):
    """The replica's JSON log lines, kept for the checks (written from its thread)."""

    def __init__(self) -> None:
        self.lines: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._partial = ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        with self._lock:
            self._partial += text
            *complete, self._partial = self._partial.split("\n")
            for line in complete:
                self._add(line)
        return len(text)

    def _add(self, line: str) -> None:
        if not line.strip():
            return
        try:
            record = json.loads(line)
        except ValueError:
            record = {"event": "unparsed_log_line", "level": "error", "line": line[:500]}
        if isinstance(record, dict):
            self.lines.append(record)

    def faults(self, since: int) -> list[dict[str, Any]]:
        with self._lock:
            return [
                {k: v for k, v in r.items() if k in ("event", "level", "error", "exception")}
                for r in self.lines[since:]
                if r.get("level") in ("error", "critical") or r.get("event") in SERVICE_FAULTS
            ]
