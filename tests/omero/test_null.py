"""The null port: every call succeeds and nothing is kept."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from biomero_importer.omero import create_gateway
from biomero_importer.omero.null import NullGateway
from biomero_importer.omero.port import ImportAborted, Target

from .conftest import make_settings


def test_the_null_backend_creates_objects_and_keeps_nothing(tmp_path: Path) -> None:
    gateway = create_gateway(make_settings(tmp_path, omero_backend="null"))
    assert isinstance(gateway, NullGateway)
    session = gateway.open_session("alice", "lab", order_uuid="u")
    (image,) = session.import_path(
        tmp_path / "a.tif", Target("Dataset", 1), order_uuid="u", exclude_existing=False
    )
    (plate,) = session.import_path(
        tmp_path / "p", Target("Screen", 1), order_uuid="u", exclude_existing=False
    )
    assert (image.type, plate.type) == ("Image", "Plate") and image.id != plate.id
    assert session.find_imported(tmp_path / "a.tif", Target("Dataset", 1), order_uuid="u") == []
    assert session.annotate(image, "ns", [("k", "v")]) > 0
    assert session.remaining() == math.inf
    session.abort()
    with pytest.raises(ImportAborted):
        session.annotate(image, "ns", [("k", "v")])
    assert not (tmp_path / "omero-sim").exists()
