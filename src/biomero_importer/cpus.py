"""The replica's threads on one CPU, the processes it starts on every CPU it may use.

The event loop and the storage and OMERO threads take turns holding the GIL, many times per
order. With the threads free to run on any CPU, every turn wakes a thread on another CPU
(an inter-processor interrupt, and in a virtual machine an exit to the host), and a replica
on two cores spent about half its CPU time on that: pinned to one CPU, the same drain took
half the CPU per order and ran nearly twice as fast (docs/performance.md, "One CPU for the
replica's threads"). The work that runs without the GIL, which more CPUs would speed up,
runs in child processes (``omero import``, podman and its converters), and those start on
every CPU the replica was given: the spawning thread widens its own CPU set for the spawn,
which a child inherits.

Linux only (``sched_setaffinity`` sets the calling thread's CPUs, and threads it starts
inherit them); elsewhere, or with one CPU, nothing changes.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress


class _Pinning:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        # the CPUs the process was given before pinning: what children get (None: not pinned)
        self.given: set[int] | None = None
        # the one CPU of the replica's threads (None: not pinned)
        self.cpu: int | None = None


_pinning = _Pinning()
_state = threading.local()  # each thread's widening for children: how deep, and its own CPUs


def _current_cpu() -> int | None:
    """The CPU the calling thread runs on now (field 39 of its stat), where the scheduler
    put it: a choice that follows the machine's load at start-up."""
    try:
        with open("/proc/thread-self/stat", encoding="ascii") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return int(fields[36])
    except (OSError, IndexError, ValueError):
        return None


def pin_threads() -> int | None:
    """Run the calling thread, and every thread it starts from now on, on one of the CPUs it
    may use; returns that CPU, or None when there is nothing to pin (one CPU, not Linux)."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    given = os.sched_getaffinity(0)
    if len(given) < 2:
        return None
    cpu = _current_cpu()
    if cpu not in given:
        cpu = min(given)
    try:
        os.sched_setaffinity(0, {cpu})
    except OSError:  # not allowed here (a sandbox's seccomp rules): the threads stay free
        return None
    with _pinning.lock:
        _pinning.given = set(given)
        _pinning.cpu = cpu
    return cpu


def pool_thread_joins() -> None:
    """A pool's initializer: the new thread runs on the replica's CPU, whatever CPUs the
    thread that started it had then (the event loop stays widened across the awaits of a
    spawn, and pools start their threads lazily, from the submitting thread)."""
    with _pinning.lock:
        cpu = _pinning.cpu
    if cpu is not None:
        with suppress(OSError):
            os.sched_setaffinity(0, {cpu})


def unpin_threads() -> None:
    """The calling thread back on every CPU it was given (a replica that stops in a process
    that goes on, such as a test's)."""
    with _pinning.lock:
        given, _pinning.given, _pinning.cpu = _pinning.given, None, None
    if given is not None:
        with suppress(OSError):
            os.sched_setaffinity(0, given)


@contextmanager
def children_on_every_cpu() -> Iterator[None]:
    """Processes the calling thread starts in this block get every CPU the replica was given.

    Nested and overlapping blocks of one thread (coroutines of the event loop) share one
    widening: the thread is pinned again when the last of them ends."""
    with _pinning.lock:
        given = _pinning.given
    if given is None:
        yield
        return
    depth = getattr(_state, "depth", 0)
    if depth == 0:
        _state.pinned = os.sched_getaffinity(0)
        with suppress(OSError):  # a child on the replica's CPU is slower, not wrong
            os.sched_setaffinity(0, given)
    _state.depth = depth + 1
    try:
        yield
    finally:
        _state.depth -= 1
        if _state.depth == 0:
            with suppress(OSError):
                os.sched_setaffinity(0, _state.pinned)
