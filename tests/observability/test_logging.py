"""The logging pipeline, configured for real and read back from its stream and log file."""

from __future__ import annotations

import io
import json
import logging
import stat
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import structlog

from biomero_importer.observability.logging import Redactor, configure_logging
from biomero_importer.settings import Settings

OMERO_PASSWORD = "S3cr3t-P@ss-xyz"
DB_PASSWORD = "Db-P@ss/w0rd!"
DB_URL = f"postgresql://biomero:{quote(DB_PASSWORD, safe='')}@db.example:5432/biomero"


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line]


def settings(tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "log_file_path": tmp_path / "logs" / "app.log",
        "omero_password": OMERO_PASSWORD,
        "ingest_tracking_db": DB_URL,
    }
    values.update(overrides)
    return Settings(**values)


def test_json_lines_carry_essentials_and_order_context(tmp_path: Path) -> None:
    out = io.StringIO()
    configure_logging(settings(tmp_path, worker_id="replica-7"), stream=out)
    log = structlog.get_logger("biomero_importer.dispatcher")

    with structlog.contextvars.bound_contextvars(
        order_uuid="5f0c1e7a", stage="Import Started", worker_id="host-1-abc"
    ):
        log.info("order_claimed", attempt=1)
    log.info("idle")

    claimed, idle = lines(out.getvalue())
    assert list(claimed)[:4] == ["timestamp", "level", "logger", "event"]
    assert claimed["event"] == "order_claimed"
    assert claimed["level"] == "info"
    assert claimed["logger"] == "biomero_importer.dispatcher"
    assert claimed["attempt"] == 1
    assert claimed["order_uuid"] == "5f0c1e7a"
    assert claimed["stage"] == "Import Started"
    assert claimed["worker_id"] == "host-1-abc"
    stamp = datetime.fromisoformat(claimed["timestamp"].replace("Z", "+00:00"))
    assert stamp.utcoffset() == timezone.utc.utcoffset(None)
    assert abs((datetime.now(timezone.utc) - stamp).total_seconds()) < 60
    assert "order_uuid" not in idle
    assert idle["worker_id"] == "replica-7"


def test_file_gets_the_same_json_lines(tmp_path: Path) -> None:
    out = io.StringIO()
    configure_logging(settings(tmp_path), stream=out)
    structlog.get_logger("t").warning("disk_low", free_gb=3)
    logging.getLogger("asyncpg.pool").warning("connection lost")

    path = tmp_path / "logs" / "app.log"
    assert path.read_text() == out.getvalue()
    assert [e["event"] for e in lines(path.read_text())] == ["disk_low", "connection lost"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_existing_log_file_is_made_private(tmp_path: Path) -> None:
    path = tmp_path / "app.log"
    path.write_text("")
    path.chmod(0o644)
    configure_logging(settings(tmp_path, log_file_path=path), stream=io.StringIO())
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_log_file_rotates_and_keeps_the_configured_backups(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "app.log"
    configure_logging(
        settings(tmp_path, log_file_max_bytes=4096, log_file_backups=2), stream=io.StringIO()
    )
    log = structlog.get_logger("t")
    for index in range(300):
        log.info("filler", index=index, padding="x" * 40)

    names = sorted(p.name for p in path.parent.iterdir())
    assert names == ["app.log", "app.log.1", "app.log.2"]
    for file in path.parent.iterdir():
        assert stat.S_IMODE(file.stat().st_mode) == 0o600
        assert file.stat().st_size <= 4096
        assert all(entry["event"] == "filler" for entry in lines(file.read_text()))
    # Newest in app.log, older in .1: nothing lost between the kept files.
    kept = [
        entry["index"]
        for name in ("app.log.2", "app.log.1", "app.log")
        for entry in lines((path.parent / name).read_text())
    ]
    assert kept == list(range(kept[0], 300))


def test_stdlib_loggers_are_routed_at_sane_levels(tmp_path: Path) -> None:
    out = io.StringIO()
    configure_logging(settings(tmp_path, log_level="DEBUG"), stream=out)

    with structlog.contextvars.bound_contextvars(order_uuid="u-1"):
        logging.getLogger("asyncpg.protocol").warning("server closed the connection")
    logging.getLogger("asyncpg").info("asyncpg chatter")
    logging.getLogger("sqlalchemy.engine.Engine").info("SELECT 1")
    logging.getLogger("alembic.runtime.migration").info("Running upgrade a -> b")
    logging.getLogger("alembic.script").info("alembic chatter")
    logging.getLogger("omero.gateway").info("omero chatter")
    logging.getLogger("omero.gateway").warning("omero session lost")
    logging.getLogger("biomero_importer.something").debug("our own debug")
    structlog.get_logger("biomero_importer.x").debug("structlog debug")

    events = lines(out.getvalue())
    assert [e["event"] for e in events] == [
        "server closed the connection",
        "Running upgrade a -> b",
        "omero session lost",
        "our own debug",
        "structlog debug",
    ]
    first = events[0]
    assert first["logger"] == "asyncpg.protocol"
    assert first["level"] == "warning"
    assert first["order_uuid"] == "u-1"
    assert first["timestamp"].endswith("Z")


def test_stdlib_exception_is_rendered_in_json(tmp_path: Path) -> None:
    out = io.StringIO()
    configure_logging(settings(tmp_path), stream=out)
    try:
        raise ValueError("bad thing")
    except ValueError:
        logging.getLogger("omero.client").exception("call failed")
    (event,) = lines(out.getvalue())
    assert event["level"] == "error"
    assert "Traceback" in event["exception"]
    assert "ValueError: bad thing" in event["exception"]


def test_level_setting_filters_structlog_events(tmp_path: Path) -> None:
    out = io.StringIO()
    configure_logging(settings(tmp_path, log_level="WARNING"), stream=out)
    log = structlog.get_logger("biomero_importer.t")
    log.info("hidden")
    log.debug("hidden")
    log.warning("shown")
    log.error("shown")
    assert [e["event"] for e in lines(out.getvalue())] == ["shown", "shown"]


def test_reconfiguring_redirects_loggers_already_in_use(tmp_path: Path) -> None:
    first, second = io.StringIO(), io.StringIO()
    log = structlog.get_logger("biomero_importer.cached")
    configure_logging(settings(tmp_path, log_level="WARNING"), stream=first)
    log.warning("one")
    log.info("filtered")
    configure_logging(settings(tmp_path, log_level="INFO"), stream=second)
    log.info("two")

    assert [e["event"] for e in lines(first.getvalue())] == ["one"]
    assert [e["event"] for e in lines(second.getvalue())] == ["two"]
    bridges = [h for h in logging.getLogger().handlers if type(h).__name__ == "_StdlibBridge"]
    assert len(bridges) == 1, "a second call must not add a second bridge handler"


def test_console_renderer_on_a_terminal(tmp_path: Path) -> None:
    out = Terminal()
    configure_logging(settings(tmp_path), stream=out)
    with structlog.contextvars.bound_contextvars(order_uuid="u-42"):
        structlog.get_logger("biomero_importer.t").info("order_claimed")
    text = out.getvalue()
    assert "order_claimed" in text
    assert "u-42" in text
    with pytest.raises(json.JSONDecodeError):
        json.loads(text.splitlines()[0])
    # The file stays JSON whatever the terminal gets.
    (event,) = lines((tmp_path / "logs" / "app.log").read_text())
    assert event["order_uuid"] == "u-42"


def test_json_format_forced_on_a_terminal(tmp_path: Path) -> None:
    out = Terminal()
    configure_logging(settings(tmp_path, log_format="json"), stream=out)
    structlog.get_logger("t").info("hello")
    assert lines(out.getvalue())[0]["event"] == "hello"


def _log_every_way_a_secret_can_leak() -> None:
    log = structlog.get_logger("biomero_importer.leaky")
    log.info("plain value", value=OMERO_PASSWORD)
    log.info(f"in the message {OMERO_PASSWORD}")
    log.info("nested", conf={"omero": {"password": OMERO_PASSWORD}}, items=[DB_PASSWORD])
    log.info("under a secret key", password="not-configured-but-named-password")
    log.info("db url", url=DB_URL, decoded_password=DB_PASSWORD)
    log.info("any url", url="https://alice:hunter2-xyz@example.org/path")
    log.info("quoted", value=f'say "{OMERO_PASSWORD}"')
    try:
        raise ConnectionError(f"login failed for root with {OMERO_PASSWORD} at {DB_URL}")
    except ConnectionError:
        log.exception("omero login failed")
    logging.getLogger("asyncpg").warning("connect to %s failed", DB_URL)
    try:
        raise RuntimeError(f"stdlib path {OMERO_PASSWORD}")
    except RuntimeError:
        logging.getLogger("omero.gateway").exception("gateway error")


FORBIDDEN = (
    OMERO_PASSWORD,
    DB_PASSWORD,
    quote(DB_PASSWORD, safe=""),
    "hunter2-xyz",
    "not-configured-but-named-password",
)


@pytest.mark.parametrize("stream_cls", [io.StringIO, Terminal], ids=["json", "console"])
def test_no_secret_reaches_stream_or_file(tmp_path: Path, stream_cls: type[io.StringIO]) -> None:
    out = stream_cls()
    configure_logging(settings(tmp_path), stream=out)
    _log_every_way_a_secret_can_leak()

    for text in (out.getvalue(), (tmp_path / "logs" / "app.log").read_text()):
        assert "Traceback" in text
        assert "omero login failed" in text
        assert "gateway error" in text
        for secret in FORBIDDEN:
            assert secret not in text
        assert "S3cr3t" not in text
        assert "alice:***@example.org" in text
        assert "biomero:***@db.example" in text


def test_redaction_without_configured_secrets_still_masks_urls(tmp_path: Path) -> None:
    out = io.StringIO()
    configure_logging(settings(tmp_path, omero_password=None, ingest_tracking_db=None), stream=out)
    structlog.get_logger("t").info("dsn", dsn="postgresql://u:pw-123@h/db", other="plain text")
    (event,) = lines(out.getvalue())
    assert event["dsn"] == "postgresql://u:***@h/db"
    assert event["other"] == "plain text"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("no secrets here", "no secrets here"),
        ("postgresql://u:p@ss@host/db", "postgresql://u:***@host/db"),
        ("postgresql://:only-pw@host", "postgresql://:***@host"),
        ("postgresql://user@host/db", "postgresql://user@host/db"),
        ("https://example.org/a:b@c", "https://example.org/a:b@c"),
        ("two http://a:x@h1 and ftp://b:y@h2", "two http://a:***@h1 and ftp://b:***@h2"),
        ('{"url": "postgres://a:b@c"}', '{"url": "postgres://a:***@c"}'),
    ],
)
def test_url_passwords_are_masked(text: str, expected: str) -> None:
    assert Redactor()(text) == expected


def test_secret_spellings_are_all_masked() -> None:
    secret = 'p"w\\é@1'
    redact = Redactor([secret])
    for spelling in (
        secret,
        quote(secret, safe=""),
        json.dumps(secret)[1:-1],
        json.dumps(secret, ensure_ascii=False)[1:-1],
        repr(secret)[1:-1],
    ):
        assert redact(f"<{spelling}>") == "<***>"


def test_redactor_from_settings_knows_both_passwords() -> None:
    redact = Redactor.from_settings(
        Settings(omero_password=OMERO_PASSWORD, ingest_tracking_db=DB_URL)
    )
    assert redact(f"{OMERO_PASSWORD} {DB_PASSWORD}") == "*** ***"
    query_url = "postgresql://db.example/biomero?user=u&password=qry-S3cret"
    redact = Redactor.from_settings(Settings(ingest_tracking_db=query_url))
    assert "qry-S3cret" not in redact("password is qry-S3cret")


def test_unwritable_log_file_falls_back_to_stdout(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    out = io.StringIO()
    configure_logging(settings(tmp_path, log_file_path=blocker / "app.log"), stream=out)
    structlog.get_logger("t").info("still logging")
    events = lines(out.getvalue())
    assert events[0]["event"] == "log file unavailable, logging to stdout only"
    assert events[0]["level"] == "warning"
    assert events[1]["event"] == "still logging"


def test_a_closed_stream_does_not_break_the_caller(tmp_path: Path) -> None:
    out = io.StringIO()
    configure_logging(settings(tmp_path), stream=out)
    out.close()
    structlog.get_logger("t").info("into the void")
    logging.getLogger("asyncpg").warning("into the void too")
    assert "into the void" in (tmp_path / "logs" / "app.log").read_text()


def test_safe_to_configure_many_times(tmp_path: Path) -> None:
    for _ in range(20):
        configure_logging(settings(tmp_path), stream=io.StringIO())
    out = io.StringIO()
    configure_logging(settings(tmp_path), stream=out)
    logging.getLogger("asyncpg").warning("once")
    assert [e["event"] for e in lines(out.getvalue())] == ["once"]


def test_rotation_survives_a_log_file_moved_away(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "app.log"
    configure_logging(settings(tmp_path, log_file_max_bytes=4096), stream=io.StringIO())
    log = structlog.get_logger("t")
    log.info("before")
    path.rename(tmp_path / "moved.log")  # an external logrotate without copytruncate
    for index in range(100):
        log.info("after", index=index, padding="x" * 40)
    assert lines(path.read_text())[-1]["index"] == 99
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
