"""Waits tied to their cause (issue 20 item 4): the replica's probes of OMERO, storage and the
container runtime, and the real probes against real folders, processes and the simulator."""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
import urllib.request
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from biomero_importer.dispatcher.causes import Causes, Status
from biomero_importer.dispatcher.probes import omero_probe, runtime_probe, storage_probe
from biomero_importer.dispatcher.supervisor import Supervisor
from biomero_importer.model import ClaimedOrder, PreprocessingSpec, TransientKind
from biomero_importer.observability.health import HealthState, start_http_server
from biomero_importer.observability.metrics import Metrics
from biomero_importer.omero.simulator import OFFLINE_FILE, SimulatorGateway
from biomero_importer.settings import Settings
from tests.support import make_settings

pytestmark = pytest.mark.unit

UNUSED_DB = "postgresql://unused@127.0.0.1:1/none"


def claimed(preprocessing: bool = False) -> ClaimedOrder:
    spec = (
        PreprocessingSpec(1, "localhost/c", "{Files}", "/data", "/out") if preprocessing else None
    )
    return ClaimedOrder(
        uuid="u",
        group_name="g",
        user_name="u",
        destination_id="1",
        destination_type="Dataset",
        files="[]",
        file_names=None,
        preprocessing_id=1 if preprocessing else None,
        preprocessing=spec if preprocessing else None,
        attempt=1,
        runs=1,
        queued_at=0.0,
    )


@dataclass
class Dependency:
    """A dependency a test switches on and off; counts the probes it answers."""

    up: bool = True
    probes: int = 0
    broken: bool = False

    async def probe(self) -> str | None:
        self.probes += 1
        if self.broken:
            raise RuntimeError("probe bug")
        return None if self.up else "refused"


@dataclass
class World:
    causes: Causes
    deps: dict[TransientKind, Dependency]
    woken: list[TransientKind] = field(default_factory=list)
    wakes: int = 0
    wake_fails: int = 0


@asynccontextmanager
async def world(backoff: float = 0.05, backoff_max: float = 0.2) -> AsyncIterator[World]:
    deps: dict[TransientKind, Dependency] = {
        "omero": Dependency(),
        "storage": Dependency(),
        "container_runtime": Dependency(),
    }

    async def wake_waiting(kind: TransientKind) -> int:
        if state.wake_fails:
            state.wake_fails -= 1
            raise ConnectionError("database away")
        state.woken.append(kind)
        return 3

    def on_wake() -> None:
        state.wakes += 1

    causes = Causes(
        {kind: dep.probe for kind, dep in deps.items()},
        wake_waiting=wake_waiting,
        on_wake=on_wake,
        metrics=Metrics(),
        health=HealthState(),
        backoff=backoff,
        backoff_max=backoff_max,
        rng=random.Random(1),
    )
    state = World(causes, deps)
    supervisor = Supervisor(backoff_start=0.01)
    tasks = [
        asyncio.create_task(supervisor.keep_running(name, helper))
        for name, helper in causes.helpers().items()
    ]
    try:
        yield state
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def until(check: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not (callable(check) and check()):
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


def probes(causes: Causes, kind: str, result: str) -> float:
    value = causes.metrics.registry.get_sample_value(
        "biomero_importer_dependency_probes_total", {"cause": kind, "result": result}
    )
    return value or 0.0


async def test_nothing_is_probed_while_every_cause_is_up() -> None:
    async with world() as w:
        await asyncio.sleep(0.1)
        assert [dep.probes for dep in w.deps.values()] == [0, 0, 0]
        assert await w.causes.holding(claimed(preprocessing=True)) is None


async def test_a_failure_the_probe_cannot_see_wakes_nobody() -> None:
    """One order's lost connection is not an outage: the probe answers, its wait runs on."""
    async with world() as w:
        w.causes.failed("omero", "OMERO unavailable, retry later")
        await until(
            lambda: w.deps["omero"].probes == 1 and w.causes.causes["omero"].status is Status.UP
        )
        await asyncio.sleep(0.1)
        assert w.deps["omero"].probes == 1
        assert w.woken == [] and w.wakes == 0


async def test_while_down_orders_are_held_and_when_it_answers_the_waiting_are_woken() -> None:
    async with world(backoff=0.05, backoff_max=0.1) as w:
        w.deps["omero"].up = False
        w.causes.failed("omero", "OMERO unavailable, retry later")
        await until(lambda: w.causes.causes["omero"].status is Status.DOWN)
        held = await w.causes.holding(claimed())
        assert held is not None and held.kind == "omero"
        assert held.failure == "OMERO unavailable, retry later" and held.reason == "refused"
        assert w.causes.health.dependencies_down["omero"]["reason"] == "refused"
        assert w.causes.metrics.dependency_down.labels(cause="omero")._value.get() == 1
        await asyncio.sleep(0.3)
        # backing off: far fewer probes than 10 ms polling would make
        assert 2 <= w.deps["omero"].probes <= 8
        assert w.woken == []
        w.deps["omero"].up = True
        await until(lambda: w.woken == ["omero"])
        assert w.wakes == 1
        assert await w.causes.holding(claimed()) is None
        assert w.causes.health.dependencies_down == {}
        assert w.causes.metrics.dependency_down.labels(cause="omero")._value.get() == 0
        # idle again once it is up
        settled = w.deps["omero"].probes
        await asyncio.sleep(0.1)
        assert w.deps["omero"].probes == settled
        assert [w.deps[k].probes for k in ("storage", "container_runtime")] == [0, 0]


async def test_the_container_runtime_holds_only_orders_with_preprocessing() -> None:
    async with world() as w:
        w.deps["container_runtime"].up = False
        w.causes.failed("container_runtime", "Container runtime exited with code 125")
        await until(lambda: w.causes.causes["container_runtime"].status is Status.DOWN)
        assert await w.causes.holding(claimed()) is None
        held = await w.causes.holding(claimed(preprocessing=True))
        assert held is not None and held.kind == "container_runtime"


async def test_a_stale_down_view_is_probed_again_before_an_order_is_held() -> None:
    """Another replica saw OMERO come back and woke the orders; this one's next probe is far
    off. An order it claims is not sent back on that stale view: it probes first."""
    async with world(backoff=0.3, backoff_max=60.0) as w:
        w.deps["omero"].up = False
        w.causes.failed("omero", "OMERO unavailable, retry later")
        await until(lambda: w.causes.causes["omero"].status is Status.DOWN)
        # within the backoff the view is fresh: held without a probe
        probed = w.deps["omero"].probes
        assert await w.causes.holding(claimed()) is not None
        assert w.deps["omero"].probes == probed
        w.deps["omero"].up = True
        w.causes.causes["omero"].probed_at -= 1.0  # the last probe is older than the backoff
        started = time.monotonic()
        assert await w.causes.holding(claimed()) is None
        assert time.monotonic() - started < 0.2
        assert w.woken == ["omero"]


async def test_many_orders_asking_share_one_probe() -> None:
    async with world(backoff=0.3, backoff_max=60.0) as w:
        w.deps["storage"].up = False
        w.causes.failed("storage", "Storage did not answer within 1 s: /data/x")
        await until(lambda: w.causes.causes["storage"].status is Status.DOWN)
        probed = w.deps["storage"].probes
        w.causes.causes["storage"].probed_at -= 1.0
        held = await asyncio.gather(*(w.causes.holding(claimed()) for _ in range(100)))
        assert all(h is not None and h.kind == "storage" for h in held)
        assert w.deps["storage"].probes == probed + 1


async def test_a_wake_that_fails_leaves_the_cause_down_and_is_done_by_the_next_probe() -> None:
    async with world(backoff=0.02, backoff_max=0.05) as w:
        w.deps["omero"].up = False
        w.causes.failed("omero", "OMERO unavailable, retry later")
        await until(lambda: w.causes.causes["omero"].status is Status.DOWN)
        w.wake_fails = 1
        w.deps["omero"].up = True
        await until(lambda: w.woken == ["omero"])
        assert w.causes.causes["omero"].status is Status.UP and w.wakes == 1


async def test_a_probe_that_breaks_is_restarted_not_lost() -> None:
    async with world(backoff=0.02) as w:
        w.deps["omero"].broken = True
        w.deps["omero"].up = False
        w.causes.failed("omero", "OMERO unavailable, retry later")
        await until(lambda: w.deps["omero"].probes >= 3)
        w.deps["omero"].broken = False
        await until(lambda: w.causes.causes["omero"].status is Status.DOWN)
        w.deps["omero"].up = True
        await until(lambda: w.causes.causes["omero"].status is Status.UP)


# --- the real probes -------------------------------------------------------------------------


async def test_storage_probe_stats_every_import_root(tmp_path: Path) -> None:
    good, gone = tmp_path / "a", tmp_path / "b"
    good.mkdir()
    settings = make_settings(tmp_path, UNUSED_DB, [good, gone], storage_timeout=1.0)
    with ThreadPoolExecutor(2) as executor:
        probe = storage_probe(settings, executor)
        assert await probe() == f"{gone}: No such file or directory"
        gone.mkdir()
        assert await probe() is None


async def test_storage_probe_that_hangs_gives_up_and_does_not_pile_calls(tmp_path: Path) -> None:
    """A hung mount: every storage thread is stuck. The probe answers 'down' after the
    timeout, and while its stat has not run no second one is queued behind it."""
    root = tmp_path / "data"
    root.mkdir()
    settings = make_settings(tmp_path, UNUSED_DB, [root], storage_timeout=0.2)
    release = threading.Event()
    with ThreadPoolExecutor(1) as executor:
        executor.submit(release.wait, 10)
        probe = storage_probe(settings, executor)
        started = time.monotonic()
        reason = await probe()
        assert reason == f"Storage did not answer within 0.2 s: {root}"
        assert 0.15 < time.monotonic() - started < 1.0
        again = time.monotonic()
        assert await probe() == reason
        assert time.monotonic() - again < 0.05
        assert executor._work_queue.qsize() == 1  # the first stat only
        release.set()
        await asyncio.sleep(0.05)
        assert await probe() is None


async def test_runtime_probe_runs_info(tmp_path: Path) -> None:
    def settings_for(runtime: str) -> Settings:
        return make_settings(tmp_path, UNUSED_DB, [tmp_path], container_runtime=runtime)

    script = tmp_path / "runtime"
    script.write_text(
        "#!/bin/sh\n"
        '[ "$1" = info ] || exit 2\n'
        '[ -e "$0.down" ] && { echo "Error: cannot connect to Podman socket" >&2; exit 125; }\n'
        "exit 0\n"
    )
    script.chmod(0o755)
    probe = runtime_probe(settings_for(str(script)))
    assert await probe() is None
    Path(f"{script}.down").touch()
    assert await probe() == f"'{script} info' failed: Error: cannot connect to Podman socket"
    missing = runtime_probe(settings_for(str(tmp_path / "nope")))
    assert (await missing() or "").startswith(f"{tmp_path / 'nope'} cannot be started")


async def test_omero_probe_follows_the_simulated_server(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, UNUSED_DB, [tmp_path])
    gateway = SimulatorGateway(settings)
    try:
        with ThreadPoolExecutor(2) as executor:
            probe = omero_probe(gateway, executor)
            assert await probe() is None
            (settings.simulator_dir / OFFLINE_FILE).touch()
            reason = await probe()
            assert reason is not None and reason.startswith("OMERO unavailable, retry later: ")
            assert "ConnectionRefused" in reason
            (settings.simulator_dir / OFFLINE_FILE).unlink()
            assert await probe() is None
    finally:
        gateway.close()


async def test_healthz_lists_a_dependency_down_without_failing() -> None:
    """OMERO down is not this replica's fault (restarting it would not help): /healthz stays
    200 and says what is down; metrics show it too."""
    async with world(backoff=0.05) as w:
        w.deps["omero"].up = False
        w.causes.failed("omero", "OMERO unavailable, retry later")
        await until(lambda: w.causes.causes["omero"].status is Status.DOWN)
        w.causes.health.db_ok = w.causes.health.listener_connected = True
        server = await start_http_server("127.0.0.1", 0, w.causes.metrics, w.causes.health)
        try:
            reply = await asyncio.to_thread(get, server.port, "/healthz")
            metrics = await asyncio.to_thread(get, server.port, "/metrics")
        finally:
            await server.close()
    status, body = reply
    assert status == 200
    down = json.loads(body)["dependencies_down"]
    assert list(down) == ["omero"] and down["omero"]["reason"] == "refused"
    assert 'biomero_importer_dependency_down{cause="omero"} 1.0' in metrics[1]


def get(port: int, path: str) -> tuple[int, str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
        return response.status, response.read().decode()
