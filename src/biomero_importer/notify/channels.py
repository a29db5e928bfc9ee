"""The two channels: an HTTP POST (asyncio streams, no client library) and SMTP (smtplib,
blocking: the notifier runs it in its own thread).

Each send either returns (delivered) or raises :class:`DeliveryFailed`, saying whether a later
attempt may succeed. Only an answer that can never change is final: a webhook receiver's
410 Gone, an SMTP server refusing the recipient for good (5xx to RCPT). Every other answer is
tried again with backoff: a 401 or 404 is as likely a receiver being reconfigured (its secret
rotated, its route redeployed) as a permanent refusal, and giving up on it would drop every
outcome that finished meanwhile.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import smtplib
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from urllib.parse import unquote, urlsplit

from biomero_importer.settings import Settings

WEBHOOK_TIMEOUT = 10.0
SMTP_TIMEOUT = 30.0
USER_AGENT = "biomero-importer"


class DeliveryFailed(Exception):
    """``reason`` is short, names no secret, and goes to the logs and the outbox row."""

    def __init__(self, reason: str, *, permanent: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.permanent = permanent


def endpoint(url: str) -> str:
    """Where a URL points, for logs: scheme, host and port only (its user, password, path
    and query may hold tokens)."""
    parts = urlsplit(url)
    port = f":{parts.port}" if parts.port else ""
    host = parts.hostname or ""
    return f"{parts.scheme}://{f'[{host}]' if ':' in host else host}{port}"


def _http_status_failure(status: int) -> DeliveryFailed:
    if status == 410:
        return DeliveryFailed("HTTP 410: the receiver is gone for good", permanent=True)
    if 300 <= status < 400:
        return DeliveryFailed(f"HTTP {status}: redirects are not followed", permanent=False)
    return DeliveryFailed(f"HTTP {status}", permanent=False)


@dataclass(frozen=True)
class Webhook:
    url: str
    timeout: float = WEBHOOK_TIMEOUT

    async def post(self, body: bytes, headers: dict[str, str]) -> int:
        """POST ``body``; the status code when it is 2xx, else DeliveryFailed."""
        try:
            status = await asyncio.wait_for(self._exchange(body, headers), timeout=self.timeout)
        except asyncio.TimeoutError:
            raise DeliveryFailed(f"no answer within {self.timeout:g} s", permanent=False) from None
        except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
            raise DeliveryFailed(f"{type(exc).__name__}", permanent=False) from None
        if not 200 <= status < 300:
            raise _http_status_failure(status)
        return status

    async def _exchange(self, body: bytes, headers: dict[str, str]) -> int:
        parts = urlsplit(self.url)
        secure = parts.scheme == "https"
        host = parts.hostname or ""
        port = parts.port or (443 if secure else 80)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        default_port = port == (443 if secure else 80)
        host_header = host if default_port else f"{host}:{port}"
        if ":" in host and not default_port:
            host_header = f"[{host}]:{port}"
        lines = [
            f"POST {target} HTTP/1.1",
            f"Host: {host_header}",
            f"User-Agent: {USER_AGENT}",
            "Content-Type: application/json",
            f"Content-Length: {len(body)}",
            "Connection: close",
        ]
        if parts.username is not None:
            user, password = unquote(parts.username), unquote(parts.password or "")
            token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
            lines.append(f"Authorization: Basic {token}")
        lines += [f"{name}: {value}" for name, value in headers.items()]
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        reader, writer = await asyncio.open_connection(
            host, port, ssl=ssl.create_default_context() if secure else None
        )
        try:
            writer.write(head + body)
            await writer.drain()
            status_line = await reader.readline()
            version, _, rest = status_line.decode("latin-1").partition(" ")
            if not version.startswith("HTTP/"):
                raise ValueError("not an HTTP response")
            return int(rest.split(" ", 1)[0])
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


@dataclass(frozen=True)
class Mailer:
    host: str
    port: int
    starttls: bool
    user: str | None
    password: str | None
    timeout: float = SMTP_TIMEOUT

    @classmethod
    def from_settings(cls, settings: Settings) -> Mailer:
        assert settings.notify_email_host is not None
        password = settings.notify_email_password
        return cls(
            settings.notify_email_host,
            settings.notify_email_port,
            settings.notify_email_starttls,
            settings.notify_email_user,
            None if password is None else password.get_secret_value(),
            settings.notify_email_timeout,
        )

    def describe(self) -> str:
        return f"smtp://{self.host}:{self.port}" + (" (STARTTLS)" if self.starttls else "")

    @contextlib.contextmanager
    def _session(self) -> Iterator[smtplib.SMTP]:
        """A connection ready to send: greeted, upgraded with STARTTLS, logged in."""
        with smtplib.SMTP(self.host, self.port, timeout=self.timeout) as smtp:
            smtp.ehlo()
            if self.starttls:
                smtp.starttls(context=ssl.create_default_context())
                smtp.ehlo()
            if self.user:
                smtp.login(self.user, self.password or "")
            yield smtp

    def send(self, message: EmailMessage) -> None:
        """Blocking: run it in a thread."""
        try:
            with self._session() as smtp:
                smtp.send_message(message)
        except smtplib.SMTPRecipientsRefused as exc:
            codes = [c for c, _ in exc.recipients.values()]
            code = codes[0] if codes else None
            # 5xx to RCPT: no such mailbox, not ours to relay; 4xx asks to come back later
            final = code is not None and code >= 500
            raise DeliveryFailed(f"SMTP {code}: recipient refused", permanent=final) from None
        except smtplib.SMTPResponseException as exc:
            raise DeliveryFailed(
                f"SMTP {exc.smtp_code} ({type(exc).__name__})", permanent=False
            ) from None
        except (smtplib.SMTPException, OSError) as exc:
            raise DeliveryFailed(type(exc).__name__, permanent=False) from None

    def probe(self) -> None:
        """Connect (and log in) without sending: for ``check``."""
        with self._session():
            pass
