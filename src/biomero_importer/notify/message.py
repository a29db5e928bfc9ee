"""What a notification says: the webhook's JSON body and signature, the researcher's email.

Both are built from the outcome alone (never the time of sending), so every retry sends the
same bytes under the same idempotency key and Message-ID.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from datetime import datetime
from email.message import EmailMessage
from email.utils import parseaddr
from typing import Any

from biomero_importer.model import CANCELLED, STAGE_IMPORTED, Notification
from biomero_importer.text import safe_json, safe_text, short

IDEMPOTENCY_HEADER = "Idempotency-Key"
SIGNATURE_HEADER = "X-Biomero-Signature"
EVENT_HEADER = "X-Biomero-Event"
EVENT = "order.finished"

# A uuid comes from whoever wrote the order: only these characters may reach a header.
_UNSAFE_HEADER_CHARS = re.compile(r"[^A-Za-z0-9._~-]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def idempotency_key(note: Notification) -> str:
    """One key per order outcome: the order and its terminal history row."""
    return f"{_UNSAFE_HEADER_CHARS.sub('_', note.uuid)}:{note.event_id}"


def outcome(note: Notification) -> str:
    if note.stage == STAGE_IMPORTED:
        return "completed"
    if note.description == CANCELLED:
        return "cancelled"
    return "failed"


def _when(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def webhook_body(note: Notification) -> bytes:
    """The JSON body (UTF-8, keys sorted): the exact bytes that are signed and sent."""
    payload: dict[str, Any] = {
        "event": EVENT,
        "idempotency_key": idempotency_key(note),
        "uuid": note.uuid,
        "event_id": note.event_id,
        "stage": note.stage,
        "outcome": outcome(note),
        "description": note.description,
        "user": note.user,
        "group": note.group,
        "destination": {"type": note.destination_type, "id": note.destination_id},
        "objects": note.objects,
        "timings": {
            "queued_at": _when(note.queued_at),
            "started_at": _when(note.started_at),
            "finished_at": _when(note.finished_at),
        },
    }
    # safe_json makes every string encodable (file names that are not UTF-8); then the
    # canonical form: keys sorted, no spaces
    safe = json.loads(safe_json(payload))
    return json.dumps(safe, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sign(body: bytes, secret: str) -> str:
    """The signature header's value: ``sha256=`` and the hex HMAC-SHA256 of the body."""
    digest = hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


def _line(text: str | None, limit: int = 200) -> str:
    """One header-safe line of text."""
    return short(_CONTROL.sub(" ", safe_text(text or "")).strip(), limit)


_SUBJECTS = {
    "completed": "Import completed",
    "failed": "Import failed",
    "cancelled": "Import cancelled",
}


def _objects_line(objects: list[dict[str, Any]]) -> str:
    counts: dict[str, int] = {}
    for obj in objects:
        kind = str(obj.get("type", "object"))
        counts[kind] = counts.get(kind, 0) + 1
    if not counts:
        return "none"
    return ", ".join(f"{n} {kind}{'s' if n != 1 else ''}" for kind, n in sorted(counts.items()))


def email_message(note: Notification, *, sender: str, recipient: str) -> EmailMessage:
    """A short plain-text message: the outcome, and on failure what to do next."""
    result = outcome(note)
    uuid = _line(note.uuid, 80)
    destination = _line(f"{note.destination_type or '?'} {note.destination_id or '?'}", 120)
    lines = [
        f"Hello {_line(note.user, 80) or 'there'},",
        "",
        f"Your OMERO import order {uuid}",
        f"ended: {note.stage}.",
        "",
        f"Result:       {safe_text(note.description or note.stage, 2000)}",
        f"Destination:  {destination} (group {_line(note.group, 80) or '?'})",
        f"OMERO objects: {_objects_line(note.objects)}",
    ]
    if note.finished_at is not None:
        lines.append(f"Finished:     {note.finished_at.isoformat(timespec='seconds')}")
    lines.append("")
    if result == "failed":
        lines += [
            "What to do: fix what the result above describes (for example a file that is",
            "missing, still being written or not readable by the importer), then submit the",
            "order again from OMERO.biomero, or ask your imaging facility to re-run it with:",
            f"    biomero-importer retry {uuid}",
            "If the reason is unclear, reply to this message or contact your imaging",
            f"facility ({sender}).",
        ]
    elif result == "cancelled":
        lines += [
            "The order was cancelled before it finished; nothing more will be imported for it.",
            "If that was a mistake, submit it again or ask your facility to run:",
            f"    biomero-importer retry {uuid}",
        ]
    else:
        lines.append("Your data is in OMERO now.")
    lines += ["", "-- biomero-importer"]
    message = EmailMessage()
    message["Subject"] = f"{_SUBJECTS[result]}: order {uuid}"
    message["From"] = sender
    message["To"] = recipient
    # The same id on every retry: mail clients and archives drop a second copy.
    domain = parseaddr(sender)[1].rpartition("@")[2] or "biomero-importer"
    message["Message-ID"] = f"<biomero-importer.{idempotency_key(note).replace(':', '.')}@{domain}>"
    message[IDEMPOTENCY_HEADER] = idempotency_key(note)
    message.set_content("\n".join(lines) + "\n")
    return message
