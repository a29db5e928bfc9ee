"""The hand-off of blocking calls to pool threads (``pipeline.threads.in_thread``): what
``run_in_executor`` gave the pipeline, at two thirds of its CPU."""

from __future__ import annotations

import asyncio
import contextvars
import gc
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from structlog.testing import capture_logs

from biomero_importer.pipeline.threads import in_thread

pytestmark = pytest.mark.unit

ORDER = contextvars.ContextVar[str]("order")


async def test_the_call_runs_in_a_pool_thread_with_the_callers_context() -> None:
    ORDER.set("order-7")
    with ThreadPoolExecutor(2, thread_name_prefix="omero") as pool:
        name, order = await in_thread(pool, lambda: (threading.current_thread().name, ORDER.get()))
    assert name.startswith("omero")
    assert order == "order-7"


async def test_the_calls_error_reaches_the_caller() -> None:
    def refuse() -> None:
        raise PermissionError(13, "Permission denied", "/data/a.tif")

    with ThreadPoolExecutor(1) as pool, pytest.raises(PermissionError) as raised:
        await in_thread(pool, refuse)
    assert raised.value.filename == "/data/a.tif"


async def test_a_call_dropped_at_shutdown_cancels_its_caller_instead_of_leaving_it_waiting() -> (
    None
):
    release = threading.Event()
    pool = ThreadPoolExecutor(1)
    running = in_thread(pool, release.wait)
    queued = in_thread(pool, lambda: "never")
    await asyncio.sleep(0.05)  # the first call holds the only thread
    pool.shutdown(wait=False, cancel_futures=True)
    release.set()
    assert await asyncio.wait_for(running, 5) is True
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(queued, 5)


async def test_an_abandoned_calls_error_is_not_reported_as_never_retrieved() -> None:
    """A cancelled order stops waiting for its call (the caller shields it); the call's own
    error afterwards is expected, not an unhandled fault in the loop's log."""
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    try:
        with ThreadPoolExecutor(1) as pool:
            future = in_thread(pool, lambda: 1 / 0)
            await asyncio.wait([future])
        del future
        gc.collect()
        await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(None)
    assert reported == []


def test_a_call_that_ends_after_the_loop_closed_says_so_in_the_log() -> None:
    """The loop of a replica that stopped is closed; a call still running in a thread (a
    hung mount) has nobody to hand its outcome to, and says so instead of vanishing."""
    release = threading.Event()
    pool = ThreadPoolExecutor(1)

    async def main() -> None:
        in_thread(pool, release.wait)

    asyncio.run(main())  # closes the loop with the call still running
    with capture_logs() as logs:
        release.set()
        pool.shutdown(wait=True)
    assert [entry["event"] for entry in logs] == ["call_ended_after_the_event_loop"]
