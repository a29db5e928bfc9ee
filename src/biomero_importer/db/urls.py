"""One database URL, spelled for each driver that needs it."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit


def sync_url(url: str) -> str:
    """SQLAlchemy URL for the synchronous driver (migrations, compatibility API)."""
    return urlunsplit(("postgresql+psycopg2", *urlsplit(url)[1:]))


def asyncpg_dsn(url: str) -> str:
    """asyncpg takes plain ``postgresql://`` URLs, including ``?host=/socket/dir``."""
    return urlunsplit(("postgresql", *urlsplit(url)[1:]))


def with_database(url: str, database: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{database}", parts.query, parts.fragment))
