"""``/metrics``, ``/healthz`` and ``/readyz`` over a deliberately tiny HTTP/1.1 server.

Three GET routes for Prometheus and an orchestrator do not justify a web framework: this is
``asyncio.start_server`` with a bounded request parser. Every connection gets one response and
is closed; anything malformed or oversized gets 400, slow clients are dropped after a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog
from prometheus_client.exposition import choose_encoder

from biomero_importer.observability.logging import Redactor
from biomero_importer.observability.metrics import Metrics

log = structlog.get_logger(__name__)

MAX_REQUEST_BYTES = 8 * 1024
REQUEST_TIMEOUT = 5.0
MAX_CONNECTIONS = 64

_REQUEST_LINE = re.compile(r"([A-Z]{1,16}) (/[!-~]*) HTTP/1\.[01]")
_HEADER_LINE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+:[ \t]*[\x20-\x7e\t]*")
_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    503: "Service Unavailable",
}
_ROUTES = ("/metrics", "/healthz", "/readyz")
_JSON = "application/json"


@dataclass
class HealthState:
    """What the service knows about itself; it updates the fields, the endpoints read them."""

    db_ok: bool = False
    listener_connected: bool = False
    migrated: bool = False
    claiming: bool = False
    last_db_error: str | None = None
    #: helpers the supervisor could not keep running (they turn /healthz to 503)
    failing_helpers: list[str] = field(default_factory=list)
    #: dependencies this replica's probes find down (cause -> since, reason): information
    #: only, never a failed check (restarting the replica would not bring OMERO back)
    dependencies_down: dict[str, dict[str, object]] = field(default_factory=dict)

    def liveness(self) -> dict[str, bool]:
        """The checks /healthz answers with (and ``health_check`` exports)."""
        return {
            "process": True,
            "database": self.db_ok,
            "listener": self.listener_connected,
            "helpers": not self.failing_helpers,
        }


@dataclass(frozen=True)
class _Response:
    status: int
    content_type: str
    body: bytes
    extra_headers: tuple[tuple[str, str], ...] = ()


class _BadRequest(Exception):
    pass


class HttpServer:
    """A running metrics/health server; ``port`` is the bound one (useful with port 0)."""

    def __init__(
        self,
        metrics: Metrics,
        health: HealthState,
        redact: Callable[[str], str],
    ) -> None:
        self._metrics = metrics
        self._health = health
        self._redact = redact
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[Any]] = set()
        self.host = ""
        self.port = 0

    async def listen(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._handle, host, port, limit=MAX_REQUEST_BYTES)
        self.host, self.port = self._server.sockets[0].getsockname()[:2]

    async def close(self) -> None:
        """Stop listening and drop connections still in flight."""
        if self._server is None:
            return
        self._server.close()
        for task in list(self._connections):
            task.cancel()
        # Python 3.10/3.11's wait_closed does not wait for open connections, 3.12+ does:
        # cancelling and gathering them first gives the same result on both.
        await asyncio.gather(*self._connections, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            if len(self._connections) > MAX_CONNECTIONS:
                response = _json_response(503, {"status": "busy"})
                head_only = False
            else:
                response, head_only = await self._respond(reader)
            await _write(writer, response, head_only)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except Exception:
            # one bad request must not pass unseen, nor stop the server
            log.exception("http_request_failed")
        finally:
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _respond(self, reader: asyncio.StreamReader) -> tuple[_Response, bool]:
        try:
            method, path, headers = await asyncio.wait_for(_read_request(reader), REQUEST_TIMEOUT)
        except _BadRequest as exc:
            return _json_response(400, {"status": "bad request", "error": str(exc)}), False
        except (TimeoutError, asyncio.TimeoutError):
            return _json_response(408, {"status": "request timeout"}), False
        if path not in _ROUTES:
            return _json_response(404, {"status": "not found"}), method == "HEAD"
        if method not in ("GET", "HEAD"):
            response = _json_response(405, {"status": "method not allowed"})
            return _Response(
                response.status, response.content_type, response.body, (("Allow", "GET, HEAD"),)
            ), False
        return self._route(path, headers), method == "HEAD"

    def _route(self, path: str, headers: dict[str, str]) -> _Response:
        if path == "/metrics":
            encoder, content_type = choose_encoder(headers.get("accept", ""))
            return _Response(200, content_type, encoder(self._metrics.registry))
        health = self._health
        if path == "/healthz":
            checks = health.liveness()
        else:
            checks = {"migrated": health.migrated, "claiming": health.claiming}
        failed = [name for name, ok in checks.items() if not ok]
        body: dict[str, Any] = {"status": "fail" if failed else "ok", "checks": checks}
        if failed:
            body["failed"] = failed
        if path == "/healthz" and health.failing_helpers:
            body["failing_helpers"] = health.failing_helpers
        if path == "/healthz" and health.dependencies_down:
            body["dependencies_down"] = health.dependencies_down
        if path == "/healthz" and not health.db_ok and health.last_db_error:
            body["last_db_error"] = self._redact(health.last_db_error)[:500]
        return _json_response(503 if failed else 200, body)


async def start_http_server(
    host: str,
    port: int,
    metrics: Metrics,
    health: HealthState,
    *,
    redact: Callable[[str], str] | None = None,
) -> HttpServer:
    """Serve metrics and health on ``host:port`` (port 0: any free port) until ``close()``.

    ``redact`` cleans ``last_db_error`` before it is shown; pass ``Redactor.from_settings``
    so configured passwords are removed too. By default URL passwords are masked.
    """
    server = HttpServer(metrics, health, Redactor() if redact is None else redact)
    await server.listen(host, port)
    return server


async def _read_request(reader: asyncio.StreamReader) -> tuple[str, str, dict[str, str]]:
    try:
        raw = await reader.readuntil(b"\r\n\r\n")
    except asyncio.LimitOverrunError as exc:
        raise _BadRequest("request head too large") from exc
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            raise
        raise _BadRequest("incomplete request head") from exc
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError as exc:
        raise _BadRequest("request head is not ASCII") from exc
    request_line, *header_lines = text[:-4].split("\r\n")
    match = _REQUEST_LINE.fullmatch(request_line)
    if match is None:
        raise _BadRequest("malformed request line")
    headers: dict[str, str] = {}
    for line in header_lines:
        if _HEADER_LINE.fullmatch(line) is None:
            raise _BadRequest("malformed header line")
        name, _, value = line.partition(":")
        headers[name.lower()] = value.strip()
    method, target = match.groups()
    return method, target.split("?", 1)[0], headers


def _json_response(status: int, body: dict[str, Any]) -> _Response:
    return _Response(status, _JSON, json.dumps(body).encode() + b"\n")


async def _write(writer: asyncio.StreamWriter, response: _Response, head_only: bool) -> None:
    head = [
        f"HTTP/1.1 {response.status} {_REASONS[response.status]}",
        f"Content-Type: {response.content_type}",
        f"Content-Length: {len(response.body)}",
        "Cache-Control: no-store",
        "Connection: close",
        *(f"{name}: {value}" for name, value in response.extra_headers),
    ]
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode("ascii"))
    if not head_only:
        writer.write(response.body)
    await writer.drain()
