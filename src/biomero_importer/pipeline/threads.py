"""The hand-off of a blocking call to a pool thread and of its outcome back to the event loop.

``loop.run_in_executor`` chains two futures: the pool's, whose completion runs callbacks in
the thread, and an asyncio one that copies its state over in a callback of the event loop.
Here the thread hands the outcome to the awaited future itself, with one
``call_soon_threadsafe``: on the replica's one CPU (``cpus``) a hand-off costs 12 µs of CPU
instead of 18-19 (``benchmarks/handoff.py``), and a one-file order makes two of them.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable
from concurrent.futures import Executor, Future
from functools import partial
from typing import Any, TypeVar

import structlog

log = structlog.get_logger(__name__)

T = TypeVar("T")


def in_thread(executor: Executor, call: Callable[[], T]) -> asyncio.Future[T]:
    """``call`` in one of the executor's threads, with this task's context: the order's log
    fields (order_uuid, stage, worker_id) stay on what it logs. A call the executor drops
    without running it (its shutdown with ``cancel_futures``) cancels the returned future."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()
    context = contextvars.copy_context()

    def job() -> None:
        try:
            result = context.run(call)
        except BaseException as exc:  # the caller's to judge, as run_in_executor hands it
            _hand_back(loop, _fail, future, exc)
        else:
            _hand_back(loop, _succeed, future, result)

    executor.submit(job).add_done_callback(partial(_dropped, loop, future))
    # A caller that stops waiting (cancel, storage timeout) leaves the outcome behind; it is
    # expected (usually ImportAborted or the order's own error), not an unhandled fault.
    future.add_done_callback(_retrieve)
    return future


def _hand_back(loop: asyncio.AbstractEventLoop, settle: Callable[..., object], *args: Any) -> None:
    try:
        loop.call_soon_threadsafe(settle, *args)
    except RuntimeError:  # the loop is closed: nobody is left to tell
        log.debug("call_ended_after_the_event_loop")


def _succeed(future: asyncio.Future[T], result: T) -> None:
    if not future.done():
        future.set_result(result)


def _fail(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


def _dropped(
    loop: asyncio.AbstractEventLoop, future: asyncio.Future[Any], work: Future[None]
) -> None:
    if work.cancelled():
        _hand_back(loop, future.cancel)


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.debug("abandoned_call_ended", error=repr(future.exception()))
