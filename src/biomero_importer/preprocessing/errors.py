"""The one error preprocessing raises for anything an order (or its converter) got wrong."""

from __future__ import annotations


class PreprocessingError(Exception):
    """``reason`` becomes the order's 'Import Failed' description; ``detail`` is for the log.

    ``transient``: the container runtime itself was not available (never a container that ran
    and failed); the order is then retried automatically."""

    def __init__(self, reason: str, detail: str = "", *, transient: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail
        self.transient = transient
