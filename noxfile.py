"""Developer sessions: ``nox -s tests lint types contract``."""

from __future__ import annotations

import os
from pathlib import Path

import nox

nox.options.sessions = ["lint", "types", "tests"]
nox.options.reuse_existing_virtualenvs = True

ROOT = Path(__file__).parent
# zeroc-ice 3.6.5 compiles from source only up to Python 3.10 and takes 10-15 minutes:
# the wheel is built once and kept here so later runs install it in seconds.
ICE_WHEEL_CACHE = Path(
    os.environ.get("BIOMERO_IMPORTER_WHEEL_CACHE", Path.home() / ".cache/biomero-importer/wheels")
)


@nox.session(python="3.11")
def tests(session: nox.Session) -> None:
    session.install("-e", ".[dev]")
    session.run("pytest", *session.posargs)


@nox.session(python="3.11")
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(python="3.11")
def types(session: nox.Session) -> None:
    session.install("-e", ".[dev]")
    session.run("mypy")


@nox.session(python="3.10")
def contract(session: nox.Session) -> None:
    """The blitz backend against the real omero-py (zeroc-ice builds only up to Python 3.10)."""
    if not any(ICE_WHEEL_CACHE.glob("zeroc_ice-3.6.*-cp310-*.whl")):
        ICE_WHEEL_CACHE.mkdir(parents=True, exist_ok=True)
        session.run(
            "pip", "wheel", "--no-deps", "-w", str(ICE_WHEEL_CACHE), "zeroc-ice>=3.6.5,<3.7"
        )
    session.install("--find-links", str(ICE_WHEEL_CACHE), "zeroc-ice>=3.6.5,<3.7")
    session.install("--find-links", str(ICE_WHEEL_CACHE), "-e", ".[omero]", "pytest")
    session.run("pytest", "tests/contract", "-p", "no:cacheprovider", *session.posargs)
