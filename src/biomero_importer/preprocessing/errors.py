"""The one error preprocessing raises for anything an order (or its converter) got wrong."""

from __future__ import annotations


class PreprocessingError(Exception):
    """``reason`` becomes the order's 'Import Failed' description; ``detail`` is for the log."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail
