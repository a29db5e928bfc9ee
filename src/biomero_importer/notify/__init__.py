"""Notifications of order outcomes: a webhook and an email to the researcher.

Each outcome is queued in ``importer_outbox`` by the database, in the transaction that writes
the order's terminal row, whoever writes it; :class:`Notifier` delivers it afterwards, at
least once per channel, without ever holding up an order.
"""

from biomero_importer.notify.channels import DeliveryFailed
from biomero_importer.notify.message import (
    SIGNATURE_HEADER,
    email_message,
    idempotency_key,
    sign,
    webhook_body,
)
from biomero_importer.notify.notifier import CHANNELS, Notifier, check_channels

__all__ = [
    "CHANNELS",
    "SIGNATURE_HEADER",
    "DeliveryFailed",
    "Notifier",
    "check_channels",
    "email_message",
    "idempotency_key",
    "sign",
    "webhook_body",
]
