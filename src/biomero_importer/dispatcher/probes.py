"""The probes behind :mod:`.causes`: the cheapest call that says whether a dependency is back.

- OMERO: the gateway's ``check`` (the admin connection's keep-alive; a fresh login only when
  it was lost) in the OMERO executor. Only "unavailable" is down: a server that answers but
  refuses (a login no longer an administrator) is up, and orders fail with their own reason.
- Storage: one ``stat`` of each import root in the storage executor, with ``storage_timeout``.
- Container runtime: ``<runtime> info`` (what ``check`` runs), its output discarded.

Each is bounded, and a call still blocked in a thread from an earlier probe (a hung mount,
an Ice call that does not return) is not started again: the cause stays down meanwhile.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any, TypeVar

from biomero_importer.cpus import children_on_every_cpu
from biomero_importer.model import TransientKind
from biomero_importer.omero.port import OmeroError, OmeroGateway, OmeroUnavailable
from biomero_importer.preprocessing.command import runtime_prefix
from biomero_importer.settings import Settings
from biomero_importer.text import short

from .causes import Probe

T = TypeVar("T")

# Seconds an OMERO check or a runtime 'info' may take before the probe says it is down.
PROBE_TIMEOUT = 30.0
REASON_LIMIT = 200


class _NoAnswer(Exception):
    pass


class _Blocking:
    """One blocking call at a time in an executor, given up on after a timeout: the thread
    may stay stuck in the kernel or in Ice, and probing again must not pile more threads
    behind it."""

    def __init__(self, executor: Executor) -> None:
        self.executor = executor
        self.current: Future[Any] | None = None

    async def run(self, call: Callable[[], T], timeout: float) -> T:
        """``call``'s result; _NoAnswer when it did not return within ``timeout`` (or an
        earlier call still has not)."""
        if self.current is not None and not self.current.done():
            raise _NoAnswer
        future = self.executor.submit(call)
        self.current = future
        wrapped = asyncio.wrap_future(future)
        try:
            return await asyncio.wait_for(asyncio.shield(wrapped), timeout)
        except asyncio.TimeoutError:
            # retrieved later, or the loop would warn of an exception never retrieved
            wrapped.add_done_callback(lambda f: f.cancelled() or f.exception())
            raise _NoAnswer from None


def omero_probe(gateway: OmeroGateway, executor: Executor) -> Probe:
    calls = _Blocking(executor)

    def check() -> str | None:
        try:
            gateway.check()
        except OmeroUnavailable as exc:
            return short(f"{exc.reason}: {exc.detail}" if exc.detail else exc.reason, REASON_LIMIT)
        except OmeroError:
            return None  # it answered; what it said is each order's own business
        return None

    async def probe() -> str | None:
        try:
            return await calls.run(check, PROBE_TIMEOUT)
        except _NoAnswer:
            return f"OMERO did not answer within {PROBE_TIMEOUT:g} s"

    return probe


def storage_probe(settings: Settings, executor: Executor) -> Probe:
    calls = _Blocking(executor)
    roots = settings.effective_import_roots

    def stat_roots() -> str | None:
        for root in roots:
            try:
                os.stat(root)
            except OSError as exc:
                return short(f"{root}: {exc.strerror or type(exc).__name__}", REASON_LIMIT)
        return None

    async def probe() -> str | None:
        try:
            return await calls.run(stat_roots, settings.storage_timeout)
        except _NoAnswer:
            where = ", ".join(str(root) for root in roots)
            return short(
                f"Storage did not answer within {settings.storage_timeout:g} s: {where}",
                REASON_LIMIT,
            )

    return probe


def runtime_probe(settings: Settings) -> Probe:
    async def probe() -> str | None:
        try:
            with children_on_every_cpu():
                proc = await asyncio.create_subprocess_exec(
                    *runtime_prefix(settings),
                    "info",
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.DEVNULL,
                    stderr=asyncio.subprocess.PIPE,
                    start_new_session=True,
                )
        except OSError as exc:
            return f"{settings.container_runtime} cannot be started: {exc.strerror or exc}"
        try:
            _, err = await asyncio.wait_for(proc.communicate(), PROBE_TIMEOUT)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
            return f"'{settings.container_runtime} info' did not answer within {PROBE_TIMEOUT:g} s"
        if proc.returncode == 0:
            return None
        lines = [line for line in err.decode(errors="replace").splitlines() if line.strip()]
        last = lines[-1] if lines else f"exit {proc.returncode}"
        return short(f"'{settings.container_runtime} info' failed: {last}", REASON_LIMIT)

    return probe


def default_probes(
    settings: Settings, gateway: OmeroGateway, omero: Executor, storage: Executor
) -> dict[TransientKind, Probe]:
    return {
        "omero": omero_probe(gateway, omero),
        "storage": storage_probe(settings, storage),
        "container_runtime": runtime_probe(settings),
    }
