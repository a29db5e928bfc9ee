"""OMERO.biomero 1.6.1, the web plugin that writes most orders, against this package (issue 13).

Its real ``omero_biomero/importer_views.py`` runs here: ``process_files`` builds orders from
the files a user picked and writes them through ``biomero_importer.utils.ingest_tracker``; the
service then completes them. Django, OMERO.web and the Leica browser are stand-ins (only
their decorators and two helpers are touched). The wheel (AGPL, so never copied into this
repository) is fetched with pip into a cache; the test is skipped when that is impossible.
Its metadata also pins the biomero-importer versions it installs beside.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import types
import zipfile
from collections.abc import Callable, Iterator
from email.parser import Parser
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from packaging.requirements import Requirement

from biomero_importer.utils import ingest_tracker
from tests.support import make_settings, make_tiffs, running_service, wait_for_stage

PEER = "omero-biomero==1.6.1"
CACHE = Path(
    os.environ.get("BIOMERO_IMPORTER_PEER_CACHE", Path.home() / ".cache/biomero-importer/peers")
)


@pytest.fixture(scope="module")
def wheel() -> Path:
    found = sorted(CACHE.glob("omero_biomero-1.6.1-*.whl"))
    if found:
        return found[0]
    CACHE.mkdir(parents=True, exist_ok=True)
    # It declares Python >= 3.12; its views run on 3.11 too, so fetch it for 3.12.
    done = subprocess.run(
        [
            sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            "--python-version", "3.12", "-d", str(CACHE), PEER,
        ],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    found = sorted(CACHE.glob("omero_biomero-1.6.1-*.whl"))
    if done.returncode != 0 or not found:
        pytest.skip(f"{PEER} cannot be downloaded here: {done.stderr.strip()[-300:]}")
    return found[0]


def _stub(name: str, **attributes: Any) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    return module


def _passthrough(*_args: Any, **_kwargs: Any) -> Callable[[Any], Any]:
    return lambda view: view


class _Response:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs


@pytest.fixture
def views(
    wheel: Path,
    tmp_path: Path,
    import_root: Path,
    migrated_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[types.ModuleType]:
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(tmp_path / "peer")
    monkeypatch.syspath_prepend(str(tmp_path / "peer"))
    stand_ins = {
        "django": _stub("django"),
        "django.http": _stub(
            "django.http", HttpResponseBadRequest=_Response, JsonResponse=_Response
        ),
        "django.views": _stub("django.views"),
        "django.views.decorators": _stub("django.views.decorators"),
        "django.views.decorators.http": _stub(
            "django.views.decorators.http", require_http_methods=_passthrough
        ),
        "omeroweb": _stub("omeroweb"),
        "omeroweb.webclient": _stub("omeroweb.webclient"),
        "omeroweb.webclient.decorators": _stub(
            "omeroweb.webclient.decorators",
            login_required=_passthrough,
            render_response=_passthrough,
        ),
        "convertleica_file_browser": _stub("convertleica_file_browser"),
        "convertleica_file_browser.ci_leica_converters_helpers": _stub(
            "convertleica_file_browser.ci_leica_converters_helpers",
            read_leica_file=lambda *a, **k: None,
            extract_nested_leica_items=lambda path: [],
        ),
    }
    for name, module in stand_ins.items():
        monkeypatch.setitem(sys.modules, name, module)
    # what the web container's environment holds
    monkeypatch.setenv("IMPORT_MOUNT_PATH", str(import_root))
    monkeypatch.setenv(
        "INGEST_TRACKING_DB_URL", migrated_url.replace("postgresql://", "postgresql+psycopg2://", 1)
    )
    monkeypatch.setenv("OMERO_BIOMERO_CONFIG_FILE", str(tmp_path / "no-config.json"))
    monkeypatch.setattr(ingest_tracker, "_ingest_tracker", None)
    for name in [m for m in sys.modules if m == "omero_biomero" or m.startswith("omero_biomero.")]:
        monkeypatch.delitem(sys.modules, name)
    module = importlib.import_module("omero_biomero.importer_views")
    yield module
    tracker = ingest_tracker.get_ingest_tracker()
    if tracker is not None:
        tracker.dispose()
    for name in [m for m in sys.modules if m == "omero_biomero" or m.startswith("omero_biomero.")]:
        del sys.modules[name]


def test_it_installs_beside_this_version(wheel: Path) -> None:
    from importlib.metadata import version

    with zipfile.ZipFile(wheel) as archive:
        metadata_name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        metadata = Parser().parsestr(archive.read(metadata_name).decode())
    (wanted,) = [
        Requirement(r)
        for r in metadata.get_all("Requires-Dist") or []
        if r.startswith("biomero-importer")
    ]
    assert wanted.specifier.contains(version("biomero-importer")), str(wanted)
    # OMERO.Analysis declares the same range tighter
    assert Requirement("biomero-importer>=1.4,<2").specifier.contains(version("biomero-importer"))
    # its biomero 2.8 pins biomero-schema==0.1: ours may only ask for 0.2 through an extra
    from importlib.metadata import requires

    schema = [Requirement(r) for r in requires("biomero-importer") or [] if "biomero-schema" in r]
    assert schema and all("extra" in str(r.marker) for r in schema), schema


async def test_process_files_orders_complete(
    views: types.ModuleType, migrated_url: str, tmp_path: Path, import_root: Path
) -> None:
    images = make_tiffs(import_root / "Demo", 2)
    views.initialize_biomero_importer()
    views.process_files(
        [str(image.relative_to(import_root)) for image in images],
        [("datasets", "151"), ("Dataset", 152)],
        "Demo",
        "researcher",
    )
    conn = await asyncpg.connect(migrated_url)
    try:
        rows = await conn.fetch(
            "SELECT uuid, destination_id, files FROM imports WHERE stage = 'Import Pending'"
            " ORDER BY destination_id"
        )
    finally:
        await conn.close()
    assert [row["destination_id"] for row in rows] == ["151", "152"]
    settings = make_settings(tmp_path, migrated_url, [import_root], poll_interval=0.5)
    async with running_service(settings, migrated_url):
        for row in rows:
            done = await wait_for_stage(migrated_url, row["uuid"], timeout=30)
            assert done["stage"] == "Import Completed", done["description"]
            assert done["file_names"] == '["image0.tif", "image1.tif"]'
