"""``load_settings`` as the original's ``biomero_importer.utils.initialize`` offered it.

biomero-scripts tries this import to read the importer's settings (the database URL above all);
it gets this importer's settings, after defaults and environment, as a plain dict.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from biomero_importer.settings import SettingsError
from biomero_importer.settings import load_settings as _load

__all__ = ["load_settings"]


def load_settings(file_path: str | Path | None = None) -> dict[str, Any]:
    """Settings from ``file_path`` (else the usual config lookup) and the environment.

    FileNotFoundError when the file is missing and ValueError when a setting is invalid, as
    callers of the original expect.
    """
    path = Path(file_path) if file_path is not None else None
    if path is not None and not path.is_file():
        raise FileNotFoundError(f"Settings file not found: {path}")
    try:
        loaded = _load(path)
    except SettingsError as exc:
        raise ValueError(str(exc)) from None
    return loaded.settings.model_dump(mode="json")
