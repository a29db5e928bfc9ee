"""A log call below the level costs no event (issue 22): structlog's event building (context
copy, processor chain) is skipped, while levels stay dynamic and capture_logs sees all."""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import pytest
import structlog
import structlog.testing
from structlog._base import BoundLoggerBase

from biomero_importer.observability.logging import configure_logging, reset_logging
from biomero_importer.settings import Settings

pytestmark = pytest.mark.unit


@pytest.fixture
def built(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The events structlog started to build."""
    events: list[str] = []
    original = BoundLoggerBase._process_event

    def spy(self: BoundLoggerBase, method_name: str, event: Any, event_kw: Any) -> Any:
        events.append(str(event))
        return original(self, method_name, event, event_kw)

    monkeypatch.setattr(BoundLoggerBase, "_process_event", spy)
    yield events
    reset_logging()


def test_a_call_below_the_level_builds_no_event(built: list[str]) -> None:
    out = io.StringIO()
    configure_logging(Settings(log_level="WARNING", log_file_path=None), stream=out)
    log = structlog.get_logger("biomero_importer.test")
    with structlog.contextvars.bound_contextvars(order_uuid="u1"):
        for _ in range(10):
            log.debug("order_detail")
            log.info("order_started")
        log.warning("order_failed")
    assert built == ["order_failed"]
    assert [line for line in out.getvalue().splitlines() if line] and "order_started" not in (
        out.getvalue()
    )

    # the level is still read per call: a later configuration applies to the same logger
    configure_logging(Settings(log_level="INFO", log_file_path=None), stream=out)
    log.info("order_started")
    assert "order_started" in out.getvalue()


def test_capture_logs_still_sees_calls_below_the_level(built: list[str]) -> None:
    configure_logging(Settings(log_level="WARNING", log_file_path=None), stream=io.StringIO())
    log = structlog.get_logger("biomero_importer.test")
    log.info("cached_first")
    with structlog.testing.capture_logs() as logs:
        log.info("order_started")
    assert [e["event"] for e in logs] == ["order_started"]
