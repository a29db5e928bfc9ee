"""Hostile-input fuzzing of one real replica on PostgreSQL.

A hypothesis state machine writes orders the way SQL clients do, with arbitrary bytes in
file and folder names (non-UTF-8 names and symlinks created on disk), NUL bytes and lone
surrogates in paths, malformed, huge and deeply nested JSON in ``files`` and
``extra_params``, odd group, user and destination values, and interleaves them with cancels
(``UPDATE importer_orders SET cancel_requested = true``), ``biomero-importer retry`` and the
documented SQL retry (``UPDATE imports SET stage = 'Import Pending'``).

After every example:

- every order it wrote reaches a terminal stage within ``TERMINAL_BOUND`` seconds;
- a plain, good order written afterwards completes (the replica keeps claiming);
- no long-lived task of the service has ended and nothing was logged at error level or as
  ``background_task_failed``/``order_crashed``;
- an SQL retry of a finished order runs it again; one of a running order either runs it
  again or is refused with a description that says so (never silently dropped).

At the end the replica's shutdown must finish within ``shutdown_timeout`` + 10 s.

Every example opens with one order from a seed corpus of inputs that broke a replica before
(``SEEDS``), so the run meets them whatever hypothesis generates around them.

One replica serves the whole run (not one per example), so a defect that only shows after
many orders shows; after an example breaks it, the next example gets a fresh replica.
The budget is ``BIOMERO_FUZZ_EXAMPLES`` (default 25, fixed seed); shrinking is on
only when ``BIOMERO_FUZZ_SHRINK=1``, because shrinking a frozen replica costs a
bound per step.
"""

from __future__ import annotations

import json
import os
import time
import uuid as uuidlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    precondition,
    rule,
    run_state_machine_as_test,
)

from biomero_importer.observability.logging import configure_logging, reset_logging
from biomero_importer.settings import Settings
from tests.fuzz.harness import Database, LogSink, ReplicaThread
from tests.fuzz.strategies import OrderSpec, materialise, order_specs, seed_specs
from tests.support import invoke, make_settings, write_config

pytestmark = pytest.mark.fuzz

EXAMPLES = int(os.environ.get("BIOMERO_FUZZ_EXAMPLES", "25"))
SHRINK = os.environ.get("BIOMERO_FUZZ_SHRINK") == "1"
STEPS = 8
TERMINAL_BOUND = 15.0  # seconds for every order of an example to end
# how lease recovery describes an order whose replica stopped renewing its lease
RECOVERED = "The importer stopped while this order ran"
PLAIN_BOUND = 20.0  # seconds for the plain order after it
SHUTDOWN_TIMEOUT = 3.0
SHUTDOWN_BOUND = SHUTDOWN_TIMEOUT + 10.0


@dataclass
class FuzzRun:
    """What lives across examples: the replica, its database, folders, counters."""

    settings: Settings
    url: str
    config: Path
    root: Path
    outside: Path
    plain_file: Path
    db: Database
    logs: LogSink
    replica: ReplicaThread | None = None
    examples: int = 0
    orders: int = 0
    actions: dict[str, int] = field(default_factory=dict)
    replicas_started: int = 0
    hung_shutdowns: list[str] = field(default_factory=list)
    broken: bool = False
    # the failing example's problems: without shrinking, hypothesis only replays it to report
    # it, and on a frozen replica that would wait out every bound again
    problems: list[str] = field(default_factory=list)

    def log_to_sink(self) -> None:
        configure_logging(self.settings, stream=self.logs)  # type: ignore[arg-type]

    def count(self, action: str) -> None:
        self.actions[action] = self.actions.get(action, 0) + 1

    def ensure_replica(self) -> ReplicaThread:
        if self.replica is not None and self.broken:
            self.stop_replica()
        if self.replica is None:
            self.replica = ReplicaThread(self.settings, self.url)
            self.replica.start()
            self.replicas_started += 1
            self.broken = False
        return self.replica

    def stop_replica(self) -> None:
        replica, self.replica = self.replica, None
        if replica is None:
            return
        if self.broken:
            # its failure is reported already; only a healthy replica's shutdown is judged
            replica.stop(grace=3.0)
            return
        replica.stop(grace=SHUTDOWN_BOUND)
        if replica.shutdown_hung:
            self.hung_shutdowns.append(f"replica {self.replicas_started}")


# the machine's examples are built by hypothesis, without arguments: they find the run here
_CURRENT: dict[str, FuzzRun] = {}


def _run() -> FuzzRun:
    assert "run" in _CURRENT, "the fuzz run is set up by the fuzz_run fixture"
    return _CURRENT["run"]


class HostileOrders(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.run = _run()
        self.run.examples += 1
        self.replay = self.run.broken and not SHRINK
        self.replica = self.run.replica if self.replay else self.run.ensure_replica()
        self.folder = self.run.root / f"example{self.run.examples}"
        self.orders: list[str] = []
        self.retries: list[tuple[str, int, str]] = []  # uuid, retried row id, stage before
        self.log_start = len(self.run.logs.lines)

    # --- actions ------------------------------------------------------------------------
    @initialize(spec=seed_specs)
    def submit_seed(self, spec: OrderSpec) -> None:
        self.run.count("seed")
        self.submit(spec)

    @rule(spec=order_specs)
    def submit(self, spec: OrderSpec) -> None:
        folder = self.folder / f"order{len(self.orders)}"
        files = materialise(spec, folder, self.run.root, self.run.outside)
        order_uuid = str(uuidlib.uuid4())
        try:
            self._insert(order_uuid, spec, files)
        except Exception as exc:
            # refused at the door (e.g. text the json column will not take): not an order
            if "psycopg2" not in type(exc).__module__:
                raise
            self.run.count("refused_by_database")
            return
        self.orders.append(order_uuid)
        self.run.orders += 1
        self.run.count("submit")
        self.run.count(f"files:{spec.files[0]}")

    def _insert(self, order_uuid: str, spec: OrderSpec, files: str) -> None:
        with self.run.db.cursor() as cur:
            cur.execute("BEGIN")
            pre_id = None
            if spec.preprocessing is not None:
                cur.execute(
                    "INSERT INTO imports_preprocessing (container, input_file, output_folder,"
                    " alt_output_folder, extra_params) VALUES (%s, '{Files}', '/data', '/out',"
                    " %s) RETURNING id",
                    (spec.preprocessing["container"], spec.preprocessing["extra_params"]),
                )
                pre_id = cur.fetchone()[0]
            cur.execute(
                "INSERT INTO imports (group_name, user_name, destination_id, destination_type,"
                " stage, uuid, files, preprocessing_id)"
                " VALUES (%s, %s, %s, %s, 'Import Pending', %s, %s, %s)",
                (
                    spec.group,
                    spec.user,
                    spec.destination_id,
                    spec.destination_type,
                    order_uuid,
                    files,
                    pre_id,
                ),
            )
            cur.execute("COMMIT")

    @precondition(lambda self: self.orders)
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        order_uuid = data.draw(st.sampled_from(self.orders), label="cancel")
        self.run.db.execute(
            "UPDATE importer_orders SET cancel_requested = true WHERE uuid = %s", order_uuid
        )
        self.run.count("cancel")

    @precondition(lambda self: self.orders)
    @rule(data=st.data())
    def cli_retry(self, data: st.DataObject) -> None:
        order_uuid = data.draw(st.sampled_from(self.orders), label="cli retry")
        try:
            result = invoke("retry", "--config", self.run.config, order_uuid)
        finally:
            self.run.log_to_sink()
        # 0: queued again; 1: refused (the order is not finished); nothing else
        assert result.exit_code in (0, 1), result.output
        self.run.count("cli_retry" if result.exit_code == 0 else "cli_retry_refused")

    @precondition(lambda self: self.orders)
    @rule(data=st.data())
    def sql_retry(self, data: st.DataObject) -> None:
        """README's manual retry, on the latest row (so the history before it is kept)."""
        order_uuid = data.draw(st.sampled_from(self.orders), label="sql retry")
        with self.run.db.cursor() as cur:
            cur.execute(
                "SELECT id, stage FROM imports WHERE uuid = %s ORDER BY id DESC LIMIT 1",
                (order_uuid,),
            )
            row_id, stage = cur.fetchone()
            cur.execute("UPDATE imports SET stage = 'Import Pending' WHERE id = %s", (row_id,))
        if stage != "Import Pending":
            self.retries.append((order_uuid, row_id, stage))
        self.run.count("sql_retry")

    @rule(seconds=st.sampled_from([0.0, 0.05, 0.4]))
    def pause(self, seconds: float) -> None:
        time.sleep(seconds)

    # --- invariants, once the example's actions are done ----------------------------------
    def teardown(self) -> None:
        if self.replay:
            problems = self.run.problems
        else:
            problems, frozen = self._problems()
            if frozen:  # the next example needs a fresh replica (or, replaying, these)
                self.run.broken, self.run.problems = True, problems
        assert not problems, "\n".join(problems)

    def _problems(self) -> tuple[list[str], bool]:
        """The example's problems, and whether they left the replica frozen."""
        run, replica = self.run, self.replica
        assert replica is not None
        problems = []
        stuck = run.db.wait_terminal(self.orders, TERMINAL_BOUND)
        if stuck:
            problems.append(
                f"orders not terminal after {TERMINAL_BOUND}s: "
                + "; ".join(
                    f"{u} {r.stage} {r.description!r} (queue: {run.db.queue_state(u)},"
                    f" history: {[(h.id, h.stage) for h in run.db.history(u)]})"
                    for u, r in stuck.items()
                )
            )
        else:
            problems += self._dropped_retries()
            problems += self._lost_orders()
        plain = str(uuidlib.uuid4())
        run.db.execute(
            "INSERT INTO imports (group_name, user_name, destination_id, destination_type,"
            " stage, uuid, files) VALUES ('Demo', 'researcher', '151', 'Dataset',"
            " 'Import Pending', %s, %s)",
            plain,
            json.dumps([str(run.plain_file)]),
        )
        frozen = bool(stuck)
        bound = 5.0 if stuck else PLAIN_BOUND  # a replica that froze once stays frozen
        if run.db.wait_terminal([plain], bound):
            problems.append(f"the replica stopped claiming: a plain order did not end in {bound}s")
            frozen = True
        else:
            last = run.db.latest([plain])[plain]
            if last.stage != "Import Completed":
                problems.append(f"a plain order ended {last.stage}: {last.description}")
        dead = replica.dead_helpers()
        if dead:
            problems.append(f"service tasks ended: {dead}")
            frozen = True
        faults = run.logs.faults(self.log_start)
        if faults:
            problems.append(f"the service logged faults: {faults[:5]}")
        return problems, frozen

    def _lost_orders(self) -> list[str]:
        """Lease recovery means a replica stopped under a running order; this one never did,
        so a recovered order was claimed and then lost (the bound alone would not show it:
        recovery ends such an order within a lease or two)."""
        lost = []
        for order_uuid in self.orders:
            for row in self.run.db.history(order_uuid):
                if (row.description or "").startswith(RECOVERED):
                    lost.append(f"{order_uuid} was recovered from a lost lease: {row.description}")
        return lost

    def _dropped_retries(self) -> list[str]:
        dropped = []
        for order_uuid, row_id, before in self.retries:
            history = self.run.db.history(order_uuid)
            later = [r for r in history if r.id > row_id]
            ran_again = any(r.stage == "Import Started" for r in later)
            refused = any("retry" in (r.description or "").lower() for r in later)
            if not (ran_again or refused):
                dropped.append(
                    f"SQL retry of {order_uuid} (was {before}) was silently dropped:"
                    f" {[(r.id, r.stage, r.description) for r in history]}"
                )
        return dropped


@pytest.fixture
def fuzz_run(
    migrated_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> Iterator[FuzzRun]:
    root = tmp_path / "data"
    outside = tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "secret.tif").write_bytes(b"secret\n")
    plain_file = root / "plain.tif"
    plain_file.write_bytes(b"plain\n")
    fuzz_settings = make_settings(
        tmp_path,
        migrated_url,
        [root],
        run_migrations=False,
        log_format="json",
        log_level="INFO",
        lease_seconds=5.0,
        max_attempts=1,
        poll_interval=1.0,
        shutdown_timeout=SHUTDOWN_TIMEOUT,
        omero_simulator_import_delay=0.05,
    )
    run = FuzzRun(
        settings=fuzz_settings,
        url=migrated_url,
        config=write_config(tmp_path / "fuzz.yml", fuzz_settings),
        root=root,
        outside=outside,
        plain_file=plain_file,
        db=Database(migrated_url),
        logs=LogSink(),
    )
    run.log_to_sink()
    _CURRENT["run"] = run
    try:
        yield run
    finally:
        _CURRENT.clear()
        try:
            run.stop_replica()
        finally:
            reset_logging()
            with capsys.disabled():
                print(  # noqa: T201
                    f"\nfuzz hostile orders: examples={run.examples} orders={run.orders}"
                    f" actions={dict(sorted(run.actions.items()))}"
                    f" replicas={run.replicas_started} hung_shutdowns={run.hung_shutdowns}"
                    f" log_lines={len(run.logs.lines)}"
                )


@pytest.mark.timeout(max(300, EXAMPLES * 10))  # a long run on demand outlasts the default
def test_hostile_orders_never_freeze_the_replica(fuzz_run: FuzzRun, record_property: Any) -> None:
    phases = [Phase.explicit, Phase.reuse, Phase.generate] + ([Phase.shrink] if SHRINK else [])
    try:
        run_state_machine_as_test(
            HostileOrders,
            settings=settings(
                max_examples=EXAMPLES,
                stateful_step_count=STEPS,
                derandomize=True,
                database=None,
                deadline=None,
                phases=phases,
                suppress_health_check=list(HealthCheck),
            ),
        )
    finally:
        record_property("fuzz_examples", fuzz_run.examples)
        record_property("fuzz_orders", fuzz_run.orders)
        # before pytest formats a failure: no replica thread logging tracebacks meanwhile
        fuzz_run.stop_replica()
    assert not fuzz_run.hung_shutdowns, (
        f"shutdown did not finish within {SHUTDOWN_BOUND}s: {fuzz_run.hung_shutdowns}"
    )
