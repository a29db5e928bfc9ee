"""Real local receivers for notifications: an HTTP webhook receiver and an SMTP server.

Both behave as a careful production receiver does: the webhook receiver checks the HMAC
signature of every body and keeps one delivery per idempotency key; the SMTP server keeps one
message per Message-ID. Each can be stopped and started again on the same port (a receiver
that is down for a while), and the webhook receiver can answer with an error status or not
answer at all (hang).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import shutil
import socket
import ssl
import subprocess
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session
from pydantic import SecretStr


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class WebhookReceiver:
    secret: str
    port: int = field(default_factory=free_port)
    #: status to answer with; a list is consumed one request at a time, then 200
    statuses: list[int] = field(default_factory=list)
    hang: bool = False
    deliveries: dict[str, dict[str, Any]] = field(default_factory=dict)
    requests: int = 0
    duplicates: int = 0
    bad_signatures: int = 0
    open_hangs: int = 0
    headers_seen: list[dict[str, str]] = field(default_factory=list)
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
        if self.hang:
            self.open_hangs += 1
            try:
                await asyncio.Event().wait()
            finally:
                self.open_hangs -= 1
        status = self.statuses.pop(0) if self.statuses else 200
        if 200 <= status < 300:
            expected = "sha256=" + hmac.new(self.secret.encode(), body, hashlib.sha256).hexdigest()
            key = headers.get("idempotency-key", "")
            payload = json.loads(body)
            signed = hmac.compare_digest(headers.get("x-biomero-signature", ""), expected)
            if not signed or payload.get("idempotency_key") != key:
                self.bad_signatures += 1
                status = 401
            elif key in self.deliveries:
                self.duplicates += 1  # acknowledged, not processed twice
            else:
                self.deliveries[key] = payload
        writer.write(f"HTTP/1.1 {status} X\r\nContent-Length: 0\r\n\r\n".encode())
        await writer.drain()


class _Inbox:
    def __init__(self) -> None:
        self.messages: dict[str, tuple[list[str], EmailMessage]] = {}
        self.received = 0

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content or b""
        message = message_from_bytes(content, policy=policy.default)
        assert isinstance(message, EmailMessage)
        self.received += 1
        self.messages.setdefault(str(message["Message-ID"]), (list(envelope.rcpt_tos), message))
        return "250 Message accepted for delivery"


class SmtpReceiver:
    """A real SMTP server (aiosmtpd, in its own thread). With ``tls`` (certificate and key
    files) it requires STARTTLS; with ``login`` it requires that user and password."""

    def __init__(
        self, *, tls: tuple[Path, Path] | None = None, login: tuple[str, str] | None = None
    ) -> None:
        self.port = free_port()
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
