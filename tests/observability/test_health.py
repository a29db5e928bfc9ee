"""The metrics/health HTTP server, over real sockets."""

from __future__ import annotations

import asyncio
import json
import socket
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest

from biomero_importer.observability import health as health_module
from biomero_importer.observability.health import HealthState, HttpServer, start_http_server
from biomero_importer.observability.logging import Redactor
from biomero_importer.observability.metrics import Metrics


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def _fetch(port: int, path: str, method: str, headers: dict[str, str]) -> Reply:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", method=method, headers=headers
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return Reply(response.status, dict(response.headers), response.read())
    except urllib.error.HTTPError as error:
        return Reply(error.code, dict(error.headers), error.read())


async def fetch(
    server: HttpServer, path: str, method: str = "GET", headers: dict[str, str] | None = None
) -> Reply:
    return await asyncio.to_thread(_fetch, server.port, path, method, headers or {})


def _raw(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(payload)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


async def raw(server: HttpServer, payload: bytes) -> bytes:
    return await asyncio.to_thread(_raw, server.port, payload)


@pytest.fixture
def state() -> HealthState:
    return HealthState()


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
async def server(metrics: Metrics, state: HealthState) -> AsyncIterator[HttpServer]:
    redact = Redactor(["S3cr3t-P@ss-xyz"])
    running = await start_http_server("127.0.0.1", 0, metrics, state, redact=redact)
    try:
        yield running
    finally:
        await running.close()


async def test_port_zero_binds_a_free_port(server: HttpServer) -> None:
    assert server.port > 0
    assert server.host == "127.0.0.1"


async def test_metrics_are_scraped_as_prometheus_text(server: HttpServer, metrics: Metrics) -> None:
    metrics.order_finished("completed")
    metrics.set_backlog(5, 9.5)
    reply = await fetch(server, "/metrics")
    assert reply.status == 200
    assert reply.headers["Content-Type"].startswith("text/plain; version=")
    assert reply.headers["Connection"] == "close"
    text = reply.body.decode()
    assert 'biomero_importer_orders_finished_total{outcome="completed"} 1.0' in text
    assert "biomero_importer_pending_orders 5.0" in text
    assert "biomero_importer_oldest_pending_age_seconds 9.5" in text

    metrics.order_finished("completed")
    text = (await fetch(server, "/metrics?x=1")).body.decode()
    assert 'biomero_importer_orders_finished_total{outcome="completed"} 2.0' in text


async def test_openmetrics_when_asked_for(server: HttpServer) -> None:
    reply = await fetch(server, "/metrics", headers={"Accept": "application/openmetrics-text"})
    assert reply.status == 200
    assert reply.headers["Content-Type"].startswith("application/openmetrics-text")
    assert reply.body.endswith(b"# EOF\n")


async def test_healthz_follows_the_health_state(server: HttpServer, state: HealthState) -> None:
    reply = await fetch(server, "/healthz")
    assert reply.status == 503
    assert reply.headers["Content-Type"] == "application/json"
    assert reply.json()["failed"] == ["database", "listener"]

    state.db_ok = True
    state.listener_connected = True
    reply = await fetch(server, "/healthz")
    assert reply.status == 200
    assert reply.json() == {
        "status": "ok",
        "checks": {"process": True, "database": True, "listener": True, "helpers": True},
    }

    state.db_ok = False
    state.last_db_error = "connection refused: postgresql://u:S3cr3t-P@ss-xyz@db/x and h://a:b@c"
    reply = await fetch(server, "/healthz")
    assert reply.status == 503
    body = reply.json()
    assert body["status"] == "fail"
    assert body["failed"] == ["database"]
    assert body["last_db_error"] == "connection refused: postgresql://u:***@db/x and h://a:***@c"

    state.db_ok = True
    state.listener_connected = False
    reply = await fetch(server, "/healthz")
    assert reply.status == 503
    assert reply.json()["failed"] == ["listener"]
    assert "last_db_error" not in reply.json()


async def test_readyz_needs_migrations_and_claiming(server: HttpServer, state: HealthState) -> None:
    assert (await fetch(server, "/readyz")).json()["failed"] == ["migrated", "claiming"]
    state.migrated = True
    reply = await fetch(server, "/readyz")
    assert reply.status == 503
    assert reply.json()["failed"] == ["claiming"]
    state.claiming = True
    reply = await fetch(server, "/readyz")
    assert reply.status == 200
    assert reply.json()["status"] == "ok"
    state.claiming = False  # shutting down: stop sending traffic
    assert (await fetch(server, "/readyz")).status == 503


async def test_head_returns_headers_only(server: HttpServer, state: HealthState) -> None:
    state.db_ok = state.listener_connected = True
    response = await raw(server, b"HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"Content-Length: " in head
    assert int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0]) > 0
    assert body == b""


async def test_unknown_path_and_method(server: HttpServer) -> None:
    assert (await fetch(server, "/")).status == 404
    assert (await fetch(server, "/metrics/extra")).status == 404
    reply = await fetch(server, "/metrics", method="POST")
    assert reply.status == 405
    assert reply.headers["Allow"] == "GET, HEAD"


@pytest.mark.parametrize(
    "payload",
    [
        b"garbage\r\n\r\n",
        b"GET /healthz\r\n\r\n",
        b"GET healthz HTTP/1.1\r\n\r\n",
        b"GET /healthz HTTP/2.0\r\n\r\n",
        b"GET /he\xffalthz HTTP/1.1\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nno colon here\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nX: " + b"a" * 20_000 + b"\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n",  # head never finished, then EOF
    ],
    ids=["garbage", "no-version", "no-slash", "http2", "non-ascii", "bad-header", "huge", "eof"],
)
async def test_malformed_requests_get_400_and_the_server_survives(
    server: HttpServer, payload: bytes
) -> None:
    response = await asyncio.to_thread(_half_close_raw, server.port, payload)
    assert response.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert (await fetch(server, "/metrics")).status == 200


def _half_close_raw(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except ConnectionResetError:
            pass  # the server may reset after answering an oversized request
    return b"".join(chunks)


async def test_silent_client_is_dropped_after_the_timeout(
    server: HttpServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(health_module, "REQUEST_TIMEOUT", 0.2)
    response = await raw(server, b"GET /hea")
    assert response.startswith(b"HTTP/1.1 408 Request Timeout\r\n")


async def test_connect_and_leave_does_not_disturb_the_server(server: HttpServer) -> None:
    for _ in range(5):
        with socket.create_connection(("127.0.0.1", server.port)):
            pass
    assert (await fetch(server, "/metrics")).status == 200


async def test_many_concurrent_scrapes(server: HttpServer) -> None:
    replies = await asyncio.gather(*(fetch(server, "/metrics") for _ in range(30)))
    assert {reply.status for reply in replies} == {200}


async def test_close_drops_idle_connections_and_frees_the_port(
    metrics: Metrics, state: HealthState
) -> None:
    server = await start_http_server("127.0.0.1", 0, metrics, state)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET /metr")  # never finished
    await writer.drain()
    await asyncio.sleep(0.05)
    await asyncio.wait_for(server.close(), timeout=2)
    assert await reader.read() == b""
    writer.close()
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", server.port)
    await server.close()  # closing twice is harmless


async def test_healthz_names_helpers_the_supervisor_cannot_keep_running(
    server: HttpServer, state: HealthState
) -> None:
    """Before: a dead finish writer left /healthz green while every order hung."""
    state.db_ok = state.listener_connected = True
    state.failing_helpers = ["finish-writer"]
    reply = await fetch(server, "/healthz")
    assert reply.status == 503
    assert reply.json()["failed"] == ["helpers"]
    assert reply.json()["failing_helpers"] == ["finish-writer"]


async def test_metrics_export_the_healthz_checks(
    server: HttpServer, metrics: Metrics, state: HealthState
) -> None:
    """Prometheus scrapes /metrics, not /healthz: the same checks, as 1/0, at every scrape."""
    metrics.follow_health(state.liveness)

    async def exported() -> dict[str, float]:
        text = (await fetch(server, "/metrics")).body.decode()
        prefix = 'biomero_importer_health_check{check="'
        values = {}
        for line in text.splitlines():
            if line.startswith(prefix):
                name, _, value = line[len(prefix) :].partition('"} ')
                values[name] = float(value)
        return values

    assert await exported() == {"process": 1, "database": 0, "listener": 0, "helpers": 1}
    state.db_ok = state.listener_connected = True
    state.failing_helpers = ["health"]
    assert await exported() == {"process": 1, "database": 1, "listener": 1, "helpers": 0}
    assert (await fetch(server, "/healthz")).json()["failed"] == ["helpers"]
