"""Real local receivers for notifications: an HTTP webhook receiver and an SMTP server.

Both behave as a careful production receiver does: the webhook receiver verifies every
request with the Standard Webhooks reference verifier (the ``standardwebhooks`` package: the
signature with any of its secrets, and the timestamp within its tolerance) and keeps one
delivery per ``webhook-id``; the SMTP server keeps one message per Message-ID. Each can be
stopped and started again on the same port (a receiver that is down for a while), the webhook
receiver can answer with an error status (a list, or a function of time) or not answer at all
(hang), and :class:`SmtpBlackHole` accepts connections and never says a word.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session
from pydantic import SecretStr
from standardwebhooks import Webhook as Verifier
from standardwebhooks.webhooks import WebhookVerificationError


def new_secret() -> str:
    """A secret in the Standard Webhooks form."""
    return "whsec_" + base64.b64encode(os.urandom(24)).decode()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class WebhookReceiver:
    """``secret``: the one the receiver verifies with (a ``whsec_`` secret)."""

    secret: str
    port: int = field(default_factory=free_port)
    #: status to answer with; a list is consumed one request at a time, then 200
    statuses: list[int] = field(default_factory=list)
    #: else, when set, the status for each request (called as it arrives)
    answer: Callable[[], int] | None = None
    hang: bool = False
    #: first accepted body per webhook-id
    deliveries: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: when (time.time()) each webhook-id was first accepted
    accepted_at: dict[str, float] = field(default_factory=dict)
    #: how many times each webhook-id was accepted (answered 2xx and verified)
    accepted: dict[str, int] = field(default_factory=dict)
    requests: int = 0
    duplicates: int = 0
    #: verifications the reference verifier refused (answered 401)
    bad_signatures: int = 0
    open_hangs: int = 0
    headers_seen: list[dict[str, str]] = field(default_factory=list)
    #: (headers, body) of every request, for replaying one
    raw: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    _server: asyncio.Server | None = None
    _handlers: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def url(self) -> str:
        # credentials and a token as real webhook URLs carry them: neither may be logged
        return f"http://hook:pw-in-url@127.0.0.1:{self.port}/hooks/biomero?token=t0k3n-in-query"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def stop(self) -> None:
        """Down: no longer listening, open connections dropped."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for task in list(self._handlers):
            task.cancel()
        for task in list(self._handlers):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            await self._serve(reader, writer)
        finally:
            self._handlers.discard(task)
            writer.close()

    def verify(self, headers: dict[str, str], body: bytes) -> dict[str, Any] | None:
        """The reference verifier's verdict: the parsed body, or None when it refuses."""
        try:
            payload = Verifier(self.secret).verify(body, headers)
        except WebhookVerificationError:
            return None
        assert isinstance(payload, dict)
        return payload

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request_line = await reader.readline()
        if not request_line:
            return  # connected and closed without a request (a reachability check)
        headers: dict[str, str] = {}
        while True:
            line = (await reader.readline()).decode("latin-1").strip()
            if not line:
                break
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        self.requests += 1
        self.headers_seen.append({"request_line": request_line.decode("latin-1"), **headers})
        self.raw.append((headers, body))
        if self.hang:
            self.open_hangs += 1
            try:
                await asyncio.Event().wait()
            finally:
                self.open_hangs -= 1
        if self.statuses:
            status = self.statuses.pop(0)
        else:
            status = self.answer() if self.answer is not None else 200
        if 200 <= status < 300:
            key = headers.get("webhook-id", "")
            payload = self.verify(headers, body)
            if payload is None or payload.get("idempotency_key") != key:
                self.bad_signatures += 1
                status = 401
            else:
                self.accepted[key] = self.accepted.get(key, 0) + 1
                if key in self.deliveries:
                    self.duplicates += 1  # acknowledged, not processed twice
                else:
                    self.deliveries[key] = payload
                    self.accepted_at[key] = time.time()
        writer.write(f"HTTP/1.1 {status} X\r\nContent-Length: 0\r\n\r\n".encode())
        await writer.drain()


class SmtpBlackHole:
    """Accepts SMTP connections on ``port`` and never answers (no greeting, nothing): the
    server of a mail relay that hangs. Runs in its own thread."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.connections = 0
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", port))
        self._sock.listen(128)
        self._held: list[socket.socket] = []
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        self._sock.settimeout(0.1)
        while not self._stopped.is_set():
            try:
                conn, _ = self._sock.accept()
            except (TimeoutError, OSError):
                continue
            self.connections += 1
            self._held.append(conn)

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join()
        self._sock.close()
        for conn in self._held:
            with contextlib.suppress(OSError):
                conn.close()


class _Inbox:
    def __init__(self) -> None:
        self.messages: dict[str, tuple[list[str], EmailMessage]] = {}
        self.arrived_at: dict[str, float] = {}
        self.received = 0

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content or b""
        message = message_from_bytes(content, policy=policy.default)
        assert isinstance(message, EmailMessage)
        self.received += 1
        self.messages.setdefault(str(message["Message-ID"]), (list(envelope.rcpt_tos), message))
        self.arrived_at.setdefault(str(message["Message-ID"]), time.time())
        return "250 Message accepted for delivery"


class SmtpReceiver:
    """A real SMTP server (aiosmtpd, in its own thread). With ``tls`` (certificate and key
    files) it requires STARTTLS; with ``login`` it requires that user and password."""

    def __init__(
        self,
        *,
        tls: tuple[Path, Path] | None = None,
        login: tuple[str, str] | None = None,
        port: int | None = None,
    ) -> None:
        self.port = port or free_port()
        self.inbox = _Inbox()
        self.tls = tls
        self.login = login
        self.logins: list[tuple[str, bool]] = []
        self._controller: Controller | None = None

    def _authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        assert isinstance(data, LoginPassword)
        given = (data.login.decode(), data.password.decode())
        self.logins.append((given[0], given == self.login))
        # handled=False: aiosmtpd answers 535 itself (its default assumes we did)
        return AuthResult(success=given == self.login, handled=False)

    def start(self) -> None:
        options: dict[str, Any] = {}
        if self.tls is not None:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(*self.tls)
            options.update(tls_context=context, require_starttls=True)
        if self.login is not None:
            options.update(authenticator=self._authenticate, auth_required=True)
        self._controller = Controller(self.inbox, hostname="127.0.0.1", port=self.port, **options)
        self._controller.start()

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    @property
    def messages(self) -> dict[str, tuple[list[str], EmailMessage]]:
        return self.inbox.messages


def notify_settings(webhook: WebhookReceiver | None, smtp: SmtpReceiver | None) -> dict[str, Any]:
    values: dict[str, Any] = {}
    if webhook is not None:
        values.update(
            notify_webhook_url=webhook.url, notify_webhook_secret=SecretStr(webhook.secret)
        )
    if smtp is not None:
        values.update(
            notify_email_host="127.0.0.1",
            notify_email_port=smtp.port,
            notify_email_starttls=False,
            notify_email_sender="imaging@facility.example",
        )
    return values


def self_signed(folder: Path) -> tuple[Path, Path] | None:
    """A certificate for 127.0.0.1 and its key, made with the openssl command (None without
    it); trust it in this process with ``SSL_CERT_FILE``."""
    openssl = shutil.which("openssl")
    if openssl is None:
        return None
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    return cert, key
