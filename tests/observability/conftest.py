"""Every logging test starts from, and leaves behind, structlog's and stdlib's defaults."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import structlog

from biomero_importer.observability.logging import reset_logging


@pytest.fixture(autouse=True)
def _clean_logging() -> Iterator[None]:
    levels = {name: logging.getLogger(name).level for name in ("", "asyncpg", "sqlalchemy")}
    yield
    reset_logging()
    structlog.contextvars.clear_contextvars()
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
