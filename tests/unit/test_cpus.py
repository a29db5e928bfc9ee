"""The replica's threads on one CPU, its children on every CPU (``biomero_importer.cpus``).

Each check runs in a thread of its own, which pins itself: the test process stays free."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest

from biomero_importer import cpus

pytestmark = [
    pytest.mark.unit,
    pytest.mark.skipif(
        not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
        reason="needs Linux and two CPUs",
    ),
]

CHILD = [sys.executable, "-I", "-S", "-c", "import os; print(sorted(os.sched_getaffinity(0)))"]


def in_thread(check: Callable[[], None]) -> None:
    failure: list[BaseException] = []

    def run() -> None:
        try:
            check()
        except BaseException as exc:
            failure.append(exc)
        finally:
            cpus.unpin_threads()

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive()
    if failure:
        raise failure[0]


def printed_cpus(out: str) -> list[int]:
    return [int(cpu) for cpu in out.strip("[]\n").split(",")]


def child_cpus() -> list[int]:
    return printed_cpus(
        subprocess.run(CHILD, capture_output=True, text=True, check=True, timeout=30).stdout
    )


def test_threads_stay_on_the_cpu_and_children_get_every_cpu() -> None:
    given = os.sched_getaffinity(0)

    def check() -> None:
        cpu = cpus.pin_threads()
        assert cpu in given
        assert os.sched_getaffinity(0) == {cpu}
        # a thread started from now on (a pool's) inherits the one CPU
        seen: list[set[int]] = []
        worker = threading.Thread(target=lambda: seen.append(os.sched_getaffinity(0)))
        worker.start()
        worker.join()
        assert seen == [{cpu}]
        assert child_cpus() == [cpu]  # without the block a child would share it
        with cpus.children_on_every_cpu():
            assert child_cpus() == sorted(given)
        assert os.sched_getaffinity(0) == {cpu}
        cpus.unpin_threads()
        assert os.sched_getaffinity(0) == given

    in_thread(check)


def test_overlapping_spawns_of_the_event_loop_share_one_widening() -> None:
    given = os.sched_getaffinity(0)

    async def spawn() -> list[int]:
        with cpus.children_on_every_cpu():
            proc = await asyncio.create_subprocess_exec(*CHILD, stdout=asyncio.subprocess.PIPE)
            out, _ = await proc.communicate()
        return printed_cpus(out.decode())

    async def spawns() -> list[list[int]]:
        return list(await asyncio.gather(*(spawn() for _ in range(4))))

    def check() -> None:
        cpu = cpus.pin_threads()
        assert all(found == sorted(given) for found in asyncio.run(spawns()))
        # the last block to end pinned the loop's thread again
        assert os.sched_getaffinity(0) == {cpu}

    in_thread(check)


def test_nothing_changes_when_not_pinned() -> None:
    given = os.sched_getaffinity(0)

    def check() -> None:
        with cpus.children_on_every_cpu():
            assert os.sched_getaffinity(0) == given
        assert child_cpus() == sorted(given)

    in_thread(check)


def test_a_pool_thread_started_while_the_loop_is_widened_joins_the_cpu() -> None:
    """Pools start threads lazily, from the submitting thread: one first needed while the
    event loop is widened for a spawn still runs on the replica's CPU."""

    def check() -> None:
        cpu = cpus.pin_threads()
        pool = ThreadPoolExecutor(max_workers=1, initializer=cpus.pool_thread_joins)
        with pool, cpus.children_on_every_cpu():
            found = pool.submit(os.sched_getaffinity, 0).result(timeout=30)
        assert found == {cpu}

    in_thread(check)
