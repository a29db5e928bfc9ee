"""Text that reaches the database or a description: readable, bounded and always encodable.

File names on old SMB shares are often not UTF-8; Python hands them over with surrogate
escapes, which PostgreSQL (and every JSON encoder in strict mode) refuses. Everything derived
from an order passes through :func:`safe_text` before it is written.
"""

from __future__ import annotations

import json
from typing import Any

DESCRIPTION_LIMIT = 2000


def short(text: str, limit: int = 160) -> str:
    """Keep descriptions readable: long paths and values are cut in the middle."""
    if len(text) <= limit:
        return text
    half = (limit - 3) // 2
    return f"{text[:half]}...{text[-half:]}"


def duration(seconds: float) -> str:
    """A wait as people say it: "45 s", "4 min", "2 h", "1 h 30 min" (rounded)."""
    seconds = max(0, round(seconds))
    if seconds < 90:
        return f"{seconds} s"
    minutes = round(seconds / 60)
    if minutes < 90:
        return f"{minutes} min"
    hours, rest = divmod(minutes, 60)
    return f"{hours} h" if rest == 0 else f"{hours} h {rest} min"


def safe_text(text: str, limit: int | None = None) -> str:
    """``text`` as valid UTF-8 without NUL: undecodable bytes become ``\\xNN``, lone
    surrogates ``\\uNNNN``, NUL ``\\0``; cut in the middle to ``limit`` characters."""
    if "\x00" in text:
        text = text.replace("\x00", "\\0")
    if not text.isascii():  # ASCII, most text, is UTF-8 as it is: no copy to find that out
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            text = "".join(_escape_char(ch) for ch in text)
    return short(text, limit) if limit is not None else text


def _escape_char(ch: str) -> str:
    code = ord(ch)
    if 0xDC80 <= code <= 0xDCFF:  # a byte that os.fsdecode could not decode
        return f"\\x{code - 0xDC00:02x}"
    if 0xD800 <= code <= 0xDFFF:
        return f"\\u{code:04x}"
    return ch


def safe_json(value: Any) -> str:
    """JSON text of ``value`` with every string made safe (keys included)."""
    return json.dumps(_safe_value(value), ensure_ascii=False)


def _safe_value(value: Any) -> Any:
    if isinstance(value, str):
        return safe_text(value)
    if isinstance(value, dict):
        return {safe_text(str(k)): _safe_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_safe_value(v) for v in value]
    return value
