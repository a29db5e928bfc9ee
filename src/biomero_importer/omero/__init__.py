"""OMERO backends behind one port (``port.py``), chosen by ``omero_backend``."""

from __future__ import annotations

import structlog

from biomero_importer.omero.null import NullGateway
from biomero_importer.omero.port import SESSION_TTL_MARGIN_SECONDS, OmeroGateway, session_ttl_ms
from biomero_importer.omero.simulator import SimulatorGateway
from biomero_importer.settings import Settings


class OmeroConfigError(Exception):
    """The OMERO settings cannot work; the message is the one line an admin needs."""


log = structlog.get_logger(__name__)


def warn_short_ttl(settings: Settings) -> None:
    """Once, at start: a ``ttl_for_user_conn`` too short for one import is raised, never left
    to fail imports (the original's shipped settings.yml has 60000, which it never applied).

    Only a value the admin set is worth a warning: the default (6 h, as long as the default
    import_timeout, so 600 s short) simply follows import_timeout, or every command of a
    fresh installation would warn about a setting nobody chose.
    """
    ttl = session_ttl_ms(settings)
    if ttl > settings.ttl_for_user_conn and "ttl_for_user_conn" in settings.model_fields_set:
        log.warning(
            "omero_session_ttl_raised",
            configured_ms=settings.ttl_for_user_conn,
            ttl_ms=ttl,
            message=(
                "ttl_for_user_conn is shorter than import_timeout plus"
                f" {SESSION_TTL_MARGIN_SECONDS:g} s; OMERO session lifetimes are hard limits,"
                " so sessions are opened with the longer time-to-live"
            ),
        )


def create_gateway(settings: Settings) -> OmeroGateway:
    """The configured backend; ``blitz`` never falls back to the simulator."""
    warn_short_ttl(settings)
    if settings.omero_backend == "simulator":
        return SimulatorGateway(settings)
    if settings.omero_backend == "null":
        return NullGateway(settings)
    password = settings.omero_password.get_secret_value() if settings.omero_password else ""
    missing = [
        name
        for name, value in (
            ("omero_host", settings.omero_host),
            ("omero_user", settings.omero_user),
            ("omero_password", password),
        )
        if not value
    ]
    if missing:
        raise OmeroConfigError(
            f"omero_backend is 'blitz' but {', '.join(missing)} not set"
            " (OMERO_HOST, OMERO_USER, OMERO_PASSWORD); set omero_backend: simulator to try"
            " things out without OMERO"
        )
    try:
        # omero-py is an optional extra: import it only when the blitz backend is chosen.
        from biomero_importer.omero.blitz import BlitzBackend  # noqa: PLC0415
    except ImportError as exc:
        raise OmeroConfigError(
            f"omero_backend is 'blitz' but omero-py cannot be imported ({exc.name or exc});"
            " install biomero-importer[omero]"
        ) from exc
    return BlitzBackend(settings)
