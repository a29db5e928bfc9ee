"""Notifications of order outcomes: a webhook and an email to the researcher.

Each outcome is queued in ``importer_outbox`` by the database, in the transaction that writes
the order's terminal row, whoever writes it, with the channels it owes;
:class:`Notifier` delivers each channel on its own afterwards, at least once, without ever
holding up an order.
"""

from biomero_importer.notify.channels import DeliveryFailed
from biomero_importer.notify.message import (
    SIGNATURE_HEADER,
    email_message,
    idempotency_key,
    sign,
    valid_address,
    webhook_body,
    webhook_headers,
)
from biomero_importer.notify.notifier import CHANNELS, Notifier, channel_skew, check_channels

__all__ = [
    "CHANNELS",
    "SIGNATURE_HEADER",
    "DeliveryFailed",
    "Notifier",
    "channel_skew",
    "check_channels",
    "email_message",
    "idempotency_key",
    "sign",
    "valid_address",
    "webhook_body",
    "webhook_headers",
]
