"""The memory store is PostgreSQL's twin, proven on random sequences (issue 20, item 7).

A hypothesis state machine drives the same operations through two replicas on PostgreSQL
(``PostgresStore``, the triggers, the SQL a client writes) and two replicas on one
``MemoryStore``: submissions (new and duplicate), claims, finishes (outcomes, hand-backs,
waits with and without a cause), wake-ups by cause, waits falling due, retries by the CLI
and by the documented SQL UPDATE, cancels (by the CLI, by SQL and the sweep), lease expiry,
renewal and recovery. Every call's result is compared, and after every step so is
everything a reader can see of every order: stage, owner, counters, wait state, cancel
request, and its whole history (stage and description of each row).

Time does not pass on PostgreSQL: a lease expires, or a wait falls due, because the rule
moves that one order's time into the past, in both stores alike. One database serves every
example (truncated between them), so an example costs milliseconds.
``BIOMERO_TWIN_EXAMPLES`` sets the budget (default 500).
"""

from __future__ import annotations

import asyncio
import os
import pprint
import uuid as uuidlib
from collections.abc import Iterator
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from biomero_importer.db.urls import asyncpg_dsn
from biomero_importer.model import (
    STAGE_IMPORTED,
    STAGE_INGEST_FAILED,
    STAGE_NEW_ORDER,
    TRANSIENT_KINDS,
    NewOrder,
    TransientKind,
)
from biomero_importer.store import Finish, MemoryStore, OrderStore, PostgresStore

EXAMPLES = int(os.environ.get("BIOMERO_TWIN_EXAMPLES", "500"))
STEPS = 25
CALL_TIMEOUT = 10.0
HOUR = 3600.0
USERS = ("alice", "bob", "carol")
GROUPS = ("Lab-1", "Lab-2")

# one row per order: what a reader of importer_orders and the latest history row sees
# one row per order: what a reader of importer_orders and of the history sees
SNAPSHOT = """
SELECT o.uuid, o.stage, o.worker_id, o.attempts, o.runs, o.cancel_requested, o.retries,
       o.waiting, o.wait_cause, o.not_before IS NULL AS no_not_before,
       o.waiting_since IS NULL AS no_waiting_since, i.description,
       (SELECT array_agg(h.stage ORDER BY h.id) FROM imports h WHERE h.uuid = o.uuid)
           AS stages,
       (SELECT array_agg(h.description ORDER BY h.id) FROM imports h WHERE h.uuid = o.uuid)
           AS descriptions
FROM importer_orders o JOIN imports i ON i.id = o.latest_id
"""


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


class Twins:
    """The two worlds: PostgreSQL replicas A and B, memory replicas A and B."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.loop = asyncio.new_event_loop()
        self.pg = [PostgresStore(url, worker_id=w, lease_seconds=HOUR, pool_size=1) for w in "AB"]
        self.conn: asyncpg.Connection = self.run(self._open())
        self.clock = Clock()
        self.mem: list[MemoryStore] = []

    def run(self, coro: Any) -> Any:
        # a store that waits (a lock, an outage it retries) fails the step instead of the run
        return self.loop.run_until_complete(asyncio.wait_for(coro, CALL_TIMEOUT))

    async def _open(self) -> asyncpg.Connection:
        for store in self.pg:
            await store.open()
        return await asyncpg.connect(self.url)

    def reset(self, cap: int | None) -> None:
        # a handful of rows: DELETE is much cheaper than TRUNCATE (ids are never compared)
        self.run(
            self.conn.execute(
                "DELETE FROM importer_outbox; DELETE FROM importer_orders;"
                " DELETE FROM importer_users; DELETE FROM imports"
            )
        )
        self.clock.now += 1000
        a = MemoryStore(worker_id="A", lease_seconds=HOUR, clock=self.clock)
        b = MemoryStore(worker_id="B", lease_seconds=HOUR, clock=self.clock, shared=a)
        self.mem = [a, b]
        for store in (*self.pg, *self.mem):
            store.max_running_per_user = cap

    def close(self) -> None:
        self.run(self.conn.close())
        for store in self.pg:
            self.run(store.close())
        self.loop.close()

    def both(self, call: Any) -> tuple[Any, Any]:
        """``call(store, world)`` in each world; results (or the exception type) compared."""
        results = []
        for world, store in (("pg", self.pg), ("mem", self.mem)):
            # a step on PostgreSQL is a later transaction: a later now(); so in memory
            self.clock.now += 0.001
            try:
                results.append(self.run(call(store, world)))
            except Exception as exc:
                results.append(("raised", type(exc).__name__, getattr(exc, "stage", None)))
        return results[0], results[1]

    def snapshot(self) -> tuple[dict[str, tuple[Any, ...]], dict[str, tuple[Any, ...]]]:
        rows = self.run(self.conn.fetch(SNAPSHOT))
        pg = {
            r["uuid"]: (
                r["stage"],
                r["worker_id"],
                r["attempts"],
                r["runs"],
                r["cancel_requested"],
                r["retries"],
                r["waiting"],
                r["wait_cause"],
                r["no_not_before"],
                r["no_waiting_since"],
                r["description"],
                tuple(zip(r["stages"], r["descriptions"], strict=True)),
            )
            for r in rows
        }
        mem = {
            uuid: (
                o.stage,
                o.worker_id,
                o.attempts,
                o.runs,
                o.cancel_requested,
                o.retries,
                o.waiting,
                o.wait_cause,
                o.not_before is None,
                o.waiting_since is None,
                o.rows[-1].description,
                tuple((r.stage, r.description) for r in o.rows),
            )
            for uuid, o in self.mem[0]._db.items()
        }
        return pg, mem


_TWINS: dict[str, Twins] = {}


FINISHES = st.sampled_from(
    [
        ("completed", None),
        ("failed", None),
        ("hand_back", None),
        ("settle", None),
        *(("wait", kind) for kind in TRANSIENT_KINDS),
        ("wait_due", "omero"),
    ]
)


class TwinMachine(RuleBasedStateMachine):
    orders = Bundle("orders")

    def __init__(self) -> None:
        super().__init__()
        self.t = _TWINS["twins"]

    @initialize(cap=st.sampled_from([None, None, 1, 2]))
    def start(self, cap: int | None) -> None:
        self.t.reset(cap)

    def same(self, call: Any) -> Any:
        pg, mem = self.t.both(call)
        if pg != mem:
            raise AssertionError(pprint.pformat({"postgresql": pg, "memory": mem}, width=100))
        return pg

    @rule(target=orders, user=st.sampled_from(USERS), group=st.sampled_from(GROUPS))
    def submit(self, user: str, group: str) -> str:
        order = NewOrder(str(uuidlib.uuid4()), group, user, "Dataset", "1", '["/data/a.tif"]')

        async def call(store: list[OrderStore], _world: str) -> None:
            await store[0].submit(order)

        self.same(call)
        return order.uuid

    @rule(uuid=orders)
    def submit_again(self, uuid: str) -> None:
        """A writer inserts the same order again (its first row's values)."""
        first = self.t.mem[0]._db[uuid].new

        async def call(store: list[OrderStore], _world: str) -> None:
            await store[1].submit(first)

        self.same(call)

    @rule(replica=st.integers(0, 1), slots=st.integers(1, 3))
    def claim(self, replica: int, slots: int) -> None:
        async def call(store: list[OrderStore], _world: str) -> list[tuple[Any, ...]]:
            claimed = await store[replica].claim(slots)
            return sorted((c.uuid, c.attempt, c.runs, c.retries) for c in claimed)

        self.same(call)

    @rule(replica=st.integers(0, 1), uuid=orders, how=FINISHES, stale=st.booleans())
    def finish(
        self, replica: int, uuid: str, how: tuple[str, TransientKind | None], stale: bool
    ) -> None:
        """An ending from the order's current claim, or from the run before it (a run that
        lost the order: it must write nothing in either store)."""
        kind, cause = how
        run = self.t.mem[0]._db[uuid].runs - (1 if stale else 0)
        item = {
            "completed": Finish(uuid, STAGE_IMPORTED, "done", run=run),
            "failed": Finish(uuid, STAGE_INGEST_FAILED, "bad file", run=run),
            "hand_back": Finish(uuid, STAGE_NEW_ORDER, "shutdown", run=run),
            "settle": Finish(uuid, STAGE_NEW_ORDER, "settling", delay=HOUR, settling=True, run=run),
            "wait": Finish(
                uuid,
                STAGE_NEW_ORDER,
                "down",
                delay=HOUR,
                transient_retry=True,
                wait_cause=cause,
                run=run,
            ),
            "wait_due": Finish(uuid, STAGE_NEW_ORDER, "down", delay=0, wait_cause=cause, run=run),
        }[kind]

        async def call(store: list[OrderStore], _world: str) -> bool:
            return await store[replica].finish(item)

        self.same(call)

    @rule(cause=st.sampled_from(TRANSIENT_KINDS))
    def wake(self, cause: TransientKind) -> None:
        async def call(store: list[OrderStore], _world: str) -> int:
            return await store[0].wake_waiting(cause)

        self.same(call)

    @rule(uuid=orders)
    def falls_due(self, uuid: str) -> None:
        """Its wait's time passes."""

        async def call(_store: list[OrderStore], world: str) -> None:
            if world == "pg":
                await self.t.conn.execute(
                    "UPDATE importer_orders SET not_before = now() - interval '1 hour'"
                    " WHERE uuid = $1 AND not_before IS NOT NULL",
                    uuid,
                )
            else:
                order = self.t.mem[0]._db[uuid]
                if order.not_before is not None:
                    order.not_before = self.t.clock() - HOUR

        self.same(call)

    @rule(uuid=orders)
    def lease_expires(self, uuid: str) -> None:
        async def call(_store: list[OrderStore], world: str) -> None:
            if world == "pg":
                await self.t.conn.execute(
                    "UPDATE importer_orders SET lease_expires_at = now() - interval '1 hour'"
                    " WHERE uuid = $1 AND worker_id IS NOT NULL",
                    uuid,
                )
            else:
                order = self.t.mem[0]._db[uuid]
                if order.worker_id is not None:
                    order.lease_expires_at = self.t.clock() - HOUR

        self.same(call)

    @rule(replica=st.integers(0, 1), max_attempts=st.integers(1, 3))
    def recover(self, replica: int, max_attempts: int) -> None:
        async def call(store: list[OrderStore], _world: str) -> list[tuple[str, str]]:
            return sorted(await store[replica].recover_expired(max_attempts))

        self.same(call)

    @rule(replica=st.integers(0, 1), uuids=st.lists(orders, max_size=3))
    def renew(self, replica: int, uuids: list[str]) -> None:
        async def call(store: list[OrderStore], _world: str) -> dict[str, Any]:
            return await store[replica].renew_leases(uuids)

        self.same(call)

    @rule(uuid=orders)
    def retry_cli(self, uuid: str) -> None:
        async def call(store: list[OrderStore], _world: str) -> str:
            return await store[1].retry(uuid, "Queued again with biomero-importer retry")

        self.same(call)

    @rule(uuid=orders)
    def retry_sql(self, uuid: str) -> None:
        async def call(_store: list[OrderStore], world: str) -> None:
            if world == "pg":
                await self.t.conn.execute(
                    "UPDATE imports SET stage = 'Import Pending' WHERE uuid = $1", uuid
                )
            else:
                self.t.mem[0].manual_retry(uuid)

        self.same(call)

    @rule(uuid=orders)
    def cancel_cli(self, uuid: str) -> None:
        async def call(store: list[OrderStore], _world: str) -> Any:
            return await store[0].request_cancel(uuid)

        self.same(call)

    @rule(uuid=orders)
    def cancel_sql(self, uuid: str) -> None:
        """A SQL client sets the flag itself; only the sweep (or the run) ends the order."""

        async def call(_store: list[OrderStore], world: str) -> None:
            if world == "pg":
                await self.t.conn.execute(
                    "UPDATE importer_orders SET cancel_requested = true"
                    " WHERE uuid = $1 AND stage NOT IN ('Import Completed', 'Import Failed')",
                    uuid,
                )
            else:
                order = self.t.mem[0]._db[uuid]
                if order.stage not in (STAGE_IMPORTED, STAGE_INGEST_FAILED):
                    order.cancel_requested = True

        self.same(call)

    @rule(replica=st.integers(0, 1))
    def sweep(self, replica: int) -> None:
        async def call(store: list[OrderStore], _world: str) -> list[str]:
            return sorted(await store[replica].cancel_pending())

        self.same(call)

    @invariant()
    def everything_a_reader_sees_is_the_same(self) -> None:
        if not self.t.mem:
            return
        pg, mem = self.t.snapshot()
        differing = {
            uuid: (pg.get(uuid), mem.get(uuid))
            for uuid in pg.keys() | mem.keys()
            if pg.get(uuid) != mem.get(uuid)
        }
        if differing:  # in full: pytest would shorten the repr
            raise AssertionError(pprint.pformat(differing, width=100))


@pytest.fixture
def twins(migrated_url: str) -> Iterator[Twins]:
    twins = Twins(asyncpg_dsn(migrated_url))
    _TWINS["twins"] = twins
    try:
        yield twins
    finally:
        _TWINS.pop("twins", None)
        twins.close()


def test_the_memory_store_behaves_as_postgresql(twins: Twins) -> None:
    run_state_machine_as_test(
        TwinMachine,
        settings=settings(
            max_examples=EXAMPLES,
            stateful_step_count=STEPS,
            deadline=None,
            derandomize=True,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )
