"""What a notification says: the webhook's JSON body and Standard Webhooks signature, the
researcher's email.

Both are built from the outcome alone (never the time of sending), so every retry sends the
same bytes under the same ``webhook-id`` and Message-ID; only ``webhook-timestamp`` (and so the
signature) is of the attempt, as the Standard Webhooks specification requires.

Whoever can insert an order row chooses its user name, paths and descriptions, so nothing from
the order may speak in the facility's name: the recipient is exactly one checked address, and
order-derived text appears only as labelled, length-capped data, stripped of control and
bidirectional characters, with links defused.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import unicodedata
from datetime import datetime
from email.message import EmailMessage
from email.utils import getaddresses, parseaddr
from typing import Any

from biomero_importer.model import CANCELLED, STAGE_IMPORTED, Notification
from biomero_importer.text import safe_json, safe_text, short

ID_HEADER = "webhook-id"
TIMESTAMP_HEADER = "webhook-timestamp"
SIGNATURE_HEADER = "webhook-signature"
EVENT_HEADER = "X-Biomero-Event"
IDEMPOTENCY_HEADER = "Idempotency-Key"
EVENT = "order.finished"

# A uuid comes from whoever wrote the order: only these characters may reach a header.
_UNSAFE_HEADER_CHARS = re.compile(r"[^A-Za-z0-9._~-]")
# Unicode categories never shown from order data: controls (Cc), format characters such as the
# bidirectional overrides and isolates (Cf), line and paragraph separators (Zl, Zp), unassigned
# and private-use code points (Cn, Co) and lone surrogates (Cs).
_HIDDEN = frozenset({"Cc", "Cf", "Zl", "Zp", "Cn", "Co", "Cs"})
# a link in order data is shown, never clickable: "https://x" becomes "https[:]//x"
_LINK = re.compile(r"([A-Za-z][A-Za-z0-9+.-]{1,15}):(//)")
_WWW = re.compile(r"\bwww\.", re.IGNORECASE)
# RFC 5321 limits; one dot-atom local part and a host name of letters, digits and hyphens
_LOCAL = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*")
_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")

# How much of each order-derived field an email shows.
DATA_LIMIT = 120
REASON_LIMIT = 300


def idempotency_key(note: Notification) -> str:
    """One key per order outcome (the ``webhook-id``): the order and its terminal history row."""
    return f"{_UNSAFE_HEADER_CHARS.sub('_', note.uuid)[:64]}:{note.event_id}"


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


def sign(msg_id: str, timestamp: int, body: bytes, keys: list[bytes]) -> str:
    """The ``webhook-signature`` value: ``v1,<base64 HMAC-SHA256(id.timestamp.body)>`` for each
    key, space-separated, so a receiver holding any one of them verifies it."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return " ".join(
        "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode("ascii")
        for key in keys
    )


def webhook_headers(
    note: Notification, body: bytes, timestamp: int, keys: list[bytes] | None
) -> dict[str, str]:
    msg_id = idempotency_key(note)
    headers = {
        ID_HEADER: msg_id,
        TIMESTAMP_HEADER: str(timestamp),
        IDEMPOTENCY_HEADER: msg_id,
        EVENT_HEADER: EVENT,
    }
    if keys:
        headers[SIGNATURE_HEADER] = sign(msg_id, timestamp, body, keys)
    return headers


# --- email ----------------------------------------------------------------------------------
def valid_address(raw: str | None) -> tuple[str | None, str]:
    """(the address, "") when ``raw`` is exactly one plain address, else (None, why not).

    ``email.utils`` reads it the way a mail program would; anything it would read as more
    than one address, as a name with an address, or with a comment, is refused, as is an
    address outside the dot-atom form (no quoting, no IP literals, no Unicode)."""
    if raw is None or not raw.strip():
        return None, "no address"
    value = raw.strip()
    if len(value) > 254:
        return None, "longer than 254 characters"
    if any(unicodedata.category(c) in _HIDDEN or c.isspace() for c in value):
        return None, "contains spaces or control characters"
    found = getaddresses([value])
    if len(found) != 1:
        return None, "names more than one address"
    name, address = found[0]
    if name or address != value or parseaddr(value)[1] != value:
        return None, "is not a single plain address"
    local, at, domain = value.rpartition("@")
    if not at or "@" in local:
        return None, "needs exactly one @"
    if not local or len(local) > 64 or not _LOCAL.fullmatch(local):
        return None, "has an invalid part before the @"
    labels = domain.split(".")
    if len(labels) < 2 or not all(_LABEL.fullmatch(label) for label in labels):
        return None, "has an invalid domain"
    return value, ""


def shown(text: str | None, limit: int = DATA_LIMIT) -> str:
    """Order data as an email shows it: one line, no hidden or direction-changing characters,
    links defused, cut to ``limit`` characters."""
    cleaned = "".join(
        " " if unicodedata.category(c) in _HIDDEN or c.isspace() else c
        for c in safe_text(text or "")
    )
    cleaned = _WWW.sub("www[.]", _LINK.sub(r"\1[:]\2", " ".join(cleaned.split())))
    return short(cleaned, limit) or "-"


def _header_token(text: str, limit: int = 64) -> str:
    return _UNSAFE_HEADER_CHARS.sub("_", text)[:limit] or "-"


_SUBJECTS = {
    "completed": "Import completed",
    "failed": "Import failed",
    "cancelled": "Import cancelled",
}

_NEXT_STEPS = {
    "failed": [
        "What to do: the reason above says what went wrong (for example a file that is",
        "missing, still being written or not readable by the importer). Fix it, then submit",
        "the order again from OMERO.biomero, or ask your imaging facility to re-run it.",
        "If the reason is unclear, contact your imaging facility.",
    ],
    "cancelled": [
        "The order was cancelled before it finished; nothing more will be imported for it.",
        "If that was a mistake, submit it again or ask your imaging facility to re-run it.",
    ],
    "completed": ["Your data is in OMERO now."],
}


def _objects_line(objects: list[dict[str, Any]]) -> str:
    counts: dict[str, int] = {}
    for obj in objects:
        kind = _header_token(str(obj.get("type", "object")), 20)
        counts[kind] = counts.get(kind, 0) + 1
    if not counts:
        return "none"
    return ", ".join(f"{n} {kind}{'s' if n != 1 else ''}" for kind, n in sorted(counts.items()))


def email_message(note: Notification, *, sender: str, recipient: str) -> EmailMessage:
    """A short plain-text message: the outcome in the facility's words, then the order's own
    data, labelled as such, then what to do next."""
    result = outcome(note)
    order_id = _header_token(note.uuid)
    lines = [
        "Hello,",
        "",
        f"An OMERO import order submitted under your account has {result_word(result)}.",
        "",
        "Details of the order as it was submitted (data from the order, shown as",
        "recorded; not a message from your imaging facility):",
        f"  Order:         {order_id}",
        f"  Stage:         {shown(note.stage, 40)}",
        f"  Reason:        {shown(note.description or note.stage, REASON_LIMIT)}",
        f"  User:          {shown(note.user)}",
        f"  Group:         {shown(note.group)}",
        f"  Destination:   {shown(note.destination_type, 20)} {shown(note.destination_id, 40)}",
        f"  OMERO objects: {_objects_line(note.objects)}",
    ]
    if note.finished_at is not None:
        lines.append(f"  Finished:      {note.finished_at.isoformat(timespec='seconds')}")
    lines += ["", *_NEXT_STEPS[result], "", "-- biomero-importer (an automatic message)"]
    message = EmailMessage()
    message["Subject"] = f"{_SUBJECTS[result]}: order {order_id}"
    message["From"] = sender
    message["To"] = recipient
    message["Auto-Submitted"] = "auto-generated"
    # The same id on every retry: mail clients and archives drop a second copy.
    domain = parseaddr(sender)[1].rpartition("@")[2] or "biomero-importer"
    key = idempotency_key(note).replace(":", ".")
    message["Message-ID"] = f"<biomero-importer.{key}@{_header_token(domain, 253)}>"
    message[IDEMPOTENCY_HEADER] = idempotency_key(note)
    message.set_content("\n".join(lines) + "\n")
    return message


def result_word(result: str) -> str:
    return {"completed": "completed", "cancelled": "been cancelled"}.get(result, "failed")
