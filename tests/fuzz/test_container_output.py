"""Hostile converter output through a real replica and real podman.

The local test converter (``containers/test-image``) echoes its arguments: an unknown
``--mode`` is written to stderr, every other ``--key value`` into its JSON result. Extra
parameters with control characters, quotes, newlines, non-UTF-8 bytes (surrogate escapes in
the JSON) and lone surrogates therefore come back as converter output and stderr that the
importer must turn into a safe description. Invariants per example: the order ends within a
bound with a description that is valid UTF-8, has no NUL and is bounded in length; a plain
order afterwards completes; no service task ended and nothing was logged at error level.
Skipped (with the reason) when podman does not work here.
"""

from __future__ import annotations

import json
import os
import uuid as uuidlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from biomero_importer.observability.logging import configure_logging, reset_logging
from tests.fuzz.harness import Database, LogSink, ReplicaThread
from tests.fuzz.strategies import component, json_text
from tests.podman_support import leftover_containers, podman
from tests.support import make_settings

pytestmark = [pytest.mark.fuzz, pytest.mark.podman]

# a fifth of the order budget: each example runs a container
EXAMPLES = max(1, int(os.environ.get("BIOMERO_FUZZ_EXAMPLES", "25")) // 5)
SHRINK = os.environ.get("BIOMERO_FUZZ_SHRINK") == "1"
ORDER_BOUND = 20.0
MAX_DESCRIPTION = 20_000

KNOWN_MODES = ["ok", "multi", "exit1", "badjson", "outside", "empty", "legacy"]
modes = st.one_of(st.sampled_from(KNOWN_MODES), json_text)
param_keys = st.one_of(st.sampled_from(["series", "channel", "name", "x"]), json_text)
extra_params = st.builds(
    lambda mode, rest: {"mode": mode, **rest},
    modes,
    st.dictionaries(param_keys, json_text, max_size=3),
)


@dataclass
class ContainerRun:
    db: Database
    replica: ReplicaThread
    logs: LogSink
    root: Path
    image: str
    plain_file: Path
    examples: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    # the problems of the example that froze the replica: hypothesis replays the failing
    # example to report it, and a frozen replica would only make it wait out every bound again
    broken: list[str] = field(default_factory=list)


@pytest.fixture
def container_run(
    podman_image: str,
    migrated_url: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> Iterator[ContainerRun]:
    root = tmp_path / "data"
    root.mkdir()
    plain_file = root / "plain.tif"
    plain_file.write_bytes(b"plain\n")
    fuzz_settings = make_settings(
        tmp_path,
        migrated_url,
        [root],
        run_migrations=False,
        log_format="json",
        log_level="INFO",
        max_attempts=1,
        poll_interval=1.0,
        shutdown_timeout=3.0,
        allowed_containers=[podman_image],
        preprocessing_timeout=60,
    )
    logs = LogSink()
    configure_logging(fuzz_settings, stream=logs)  # type: ignore[arg-type]
    replica = ReplicaThread(fuzz_settings, migrated_url)
    replica.start()
    run = ContainerRun(Database(migrated_url), replica, logs, root, podman_image, plain_file)
    try:
        yield run
    finally:
        # a broken replica's shutdown is not what this test checks (the regressions do)
        replica.stop(grace=3.0 if run.broken else 13.0)
        reset_logging()
        with capsys.disabled():
            print(  # noqa: T201
                f"\nfuzz container output: examples={run.examples}"
                f" outcomes={dict(sorted(run.outcomes.items()))}"
            )
        left = [name for name in leftover_containers() if name.startswith("biomero-")]
        if left:
            podman("rm", "-f", *left)
        if not run.broken:  # a broken replica's hung shutdown is part of its failure
            assert not replica.shutdown_hung, "the replica did not shut down within 13 s"


def _readable(text: str | None) -> bool:
    if text is None:
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return "\x00" not in text and len(text) <= MAX_DESCRIPTION


def _insert(db: Database, image: str, files: str, params: dict[str, Any]) -> str:
    order_uuid = str(uuidlib.uuid4())
    with db.cursor() as cur:
        cur.execute("BEGIN")
        cur.execute(
            "INSERT INTO imports_preprocessing (container, input_file, output_folder,"
            " alt_output_folder, extra_params) VALUES (%s, '{Files}', '/data', '/out', %s)"
            " RETURNING id",
            (image, json.dumps(params)),
        )
        pre_id = cur.fetchone()[0]
        cur.execute(
            "INSERT INTO imports (group_name, user_name, destination_id, destination_type,"
            " stage, uuid, files, preprocessing_id) VALUES ('Demo', 'researcher', '151',"
            " 'Dataset', 'Import Pending', %s, %s, %s)",
            (order_uuid, files, pre_id),
        )
        cur.execute("COMMIT")
    return order_uuid


@pytest.mark.timeout(max(300, EXAMPLES * 30))  # a long run on demand outlasts the default
def test_hostile_converter_output_fails_only_its_order(container_run: ContainerRun) -> None:
    run = container_run
    phases = [Phase.explicit, Phase.reuse, Phase.generate] + ([Phase.shrink] if SHRINK else [])

    @settings(
        max_examples=EXAMPLES,
        derandomize=True,
        database=None,
        deadline=None,
        phases=phases,
        suppress_health_check=list(HealthCheck),
    )
    @given(name=component, params=extra_params)
    # seeds: a converter failure whose description names a non-UTF-8 input file, and
    # key-values coming back with a non-UTF-8 byte in them
    @example(name=b"caf\xe9.tif", params={"mode": "exit1"})
    @example(name=b"image.tif", params={"mode": "ok", "x": "\udcff"})
    def one_example(name: bytes, params: dict[str, Any]) -> None:
        run.examples += 1
        problems, frozen = (run.broken, True) if run.broken else _one_order(run, name, params)
        if frozen:
            run.broken = problems
        assert not problems, "\n".join(problems)

    try:
        one_example()
    finally:
        # before pytest formats a failure: no replica thread logging tracebacks meanwhile
        run.replica.stop(grace=3.0 if run.broken else 13.0)


def _one_order(run: ContainerRun, name: bytes, params: dict[str, Any]) -> tuple[list[str], bool]:
    """The example's problems, and whether they left the replica frozen."""
    problems = []
    log_start = len(run.logs.lines)
    folder = os.path.join(os.fsencode(run.root), f"e{run.examples}".encode())
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name)
    with open(path, "wb") as handle:
        handle.write(b"raw pixels\n")
    order = _insert(run.db, run.image, json.dumps([os.fsdecode(path)]), params)
    stuck = run.db.wait_terminal([order], ORDER_BOUND)
    if stuck:
        problems.append(f"order not terminal after {ORDER_BOUND}s: {stuck[order]}")
    else:
        last = run.db.latest([order])[order]
        run.outcomes[last.stage] = run.outcomes.get(last.stage, 0) + 1
        if not _readable(last.description):
            problems.append(f"unsafe description: {last.description!r:.2000}")
    plain = str(uuidlib.uuid4())
    run.db.execute(
        "INSERT INTO imports (group_name, user_name, destination_id, destination_type,"
        " stage, uuid, files) VALUES ('Demo', 'researcher', '151', 'Dataset',"
        " 'Import Pending', %s, %s)",
        plain,
        json.dumps([str(run.plain_file)]),
    )
    frozen = bool(stuck)
    if run.db.wait_terminal([plain], 5.0 if stuck else 20.0):
        problems.append("the replica stopped claiming: a plain order did not end")
        frozen = True
    elif run.db.latest([plain])[plain].stage != "Import Completed":
        problems.append("a plain order did not complete")
    dead = run.replica.dead_helpers()
    if dead:
        problems.append(f"service tasks ended: {dead}")
        frozen = True
    faults = run.logs.faults(log_start)
    if faults:
        problems.append(f"the service logged faults: {faults[:5]}")
    return problems, frozen
