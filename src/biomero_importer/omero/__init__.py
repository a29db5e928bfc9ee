"""OMERO backends behind one port (``port.py``), chosen by ``omero_backend``."""

from __future__ import annotations

from biomero_importer.omero.port import OmeroGateway
from biomero_importer.omero.simulator import SimulatorGateway
from biomero_importer.settings import Settings


class OmeroConfigError(Exception):
    """The OMERO settings cannot work; the message is the one line an admin needs."""


def create_gateway(settings: Settings) -> OmeroGateway:
    """The configured backend; ``blitz`` never falls back to the simulator."""
    if settings.omero_backend == "simulator":
        return SimulatorGateway(settings)
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
