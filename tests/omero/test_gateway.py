"""Backend choice: blitz never falls back to the simulator."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from biomero_importer.omero import OmeroConfigError, create_gateway

from .conftest import make_settings

HAS_OMERO = importlib.util.find_spec("omero") is not None


@pytest.mark.parametrize(
    ("overrides", "missing"),
    [
        ({}, "omero_host, omero_user, omero_password"),
        ({"omero_host": "omero", "omero_user": "root"}, "omero_password"),
        ({"omero_host": "omero", "omero_password": ""}, "omero_user, omero_password"),
    ],
)
def test_blitz_without_credentials_stops_with_one_line(
    tmp_path: Path, overrides: dict[str, str], missing: str
) -> None:
    settings = make_settings(tmp_path, omero_backend="blitz", **overrides)
    with pytest.raises(OmeroConfigError) as caught:
        create_gateway(settings)
    message = str(caught.value)
    assert f"{missing} not set" in message
    assert "\n" not in message
    assert not (tmp_path / "omero-sim").exists()


@pytest.mark.skipif(HAS_OMERO, reason="omero-py is installed here")
def test_blitz_without_omero_py_names_the_extra(tmp_path: Path) -> None:
    settings = make_settings(
        tmp_path,
        omero_backend="blitz",
        omero_host="omero",
        omero_user="root",
        omero_password="secret",
    )
    with pytest.raises(OmeroConfigError, match=r"biomero-importer\[omero\]") as caught:
        create_gateway(settings)
    assert "secret" not in str(caught.value)


@pytest.mark.skipif(HAS_OMERO, reason="omero-py is installed here")
def test_blitz_module_is_not_importable_without_omero() -> None:
    with pytest.raises(ImportError):
        importlib.import_module("biomero_importer.omero.blitz")
