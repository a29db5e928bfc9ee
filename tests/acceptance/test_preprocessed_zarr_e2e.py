"""A converter that writes OME-Zarr, with use_register_zarr: the store is registered from
its copy on shared storage (``.processed``), never from the temporary folder that is deleted
after the import.

No podman here: a tiny stand-in runtime (``container_runtime``) maps the mounts of the
command the service built and writes a real zarr v2 store into both output folders, the way
a zarr-writing converter does.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from tests.support import insert_order, make_settings, make_tiffs, running_service, wait_for_stage

from .conftest import sim_annotations, sim_objects

_FAKE_RUNTIME = """#!{python}
import json, sys
from pathlib import Path

import numpy as np
import zarr

args = sys.argv[1:]
if not args or args[0] != "run":
    sys.exit(0)  # kill / rm: nothing to do
mounts = {{}}
for flag, value in zip(args, args[1:]):
    if flag == "-v":
        host, inside = value.rsplit(":", 1)
        mounts[inside] = host
opts = dict(zip(args[::1], args[1::1]))
def host(path):
    for inside, outside in mounts.items():
        if path == inside or path.startswith(inside + "/"):
            return Path(outside + path[len(inside):])
    raise SystemExit("unmapped " + path)
stem = Path(opts["--inputfile"]).stem
items = []
for key in ("--outputfolder", "--altoutputfolder"):
    store = host(opts[key]) / (stem + ".zarr")
    group = zarr.open_group(str(store), mode="w", zarr_format=2)
    group.create_array("0", shape=(1, 4, 4), dtype="uint8", chunks=(1, 4, 4))[...] = 1
    axes = [{{"name": n, "type": t}} for n, t in (("c", "channel"), ("y", "space"), ("x", "space"))]
    scale = [{{"type": "scale", "scale": [1, 1, 1]}}]
    group.attrs.update({{"multiscales": [{{"version": "0.4", "name": stem, "axes": axes,
        "datasets": [{{"path": "0", "coordinateTransformations": scale}}]}}]}})
print(json.dumps([{{
    "name": stem + " converted",
    "full_path": opts["--outputfolder"] + "/" + stem + ".zarr",
    "alt_path": opts["--altoutputfolder"] + "/" + stem + ".zarr",
    "keyvalues": {{"format": "ome-zarr"}},
}}]))
"""


async def test_a_converted_zarr_is_registered_from_shared_storage(
    migrated_url: str, tmp_path: Path, import_root: Path
) -> None:
    runtime = tmp_path / "fake-runtime"
    runtime.write_text(_FAKE_RUNTIME.format(python=sys.executable))
    runtime.chmod(0o700)
    (source,) = make_tiffs(import_root, 1, prefix="scan")
    settings = make_settings(
        tmp_path,
        migrated_url,
        [import_root],
        poll_interval=0.5,
        use_register_zarr=True,
        container_runtime=str(runtime),
    )
    async with running_service(settings, migrated_url):
        order = await insert_order(
            migrated_url, [source], preprocessing={"container": "localhost/zarr-writer"}
        )
        row = await wait_for_stage(migrated_url, order, timeout=30)
    assert (row["stage"], row["description"]) == ("Import Completed", None)
    shared = import_root / ".processed" / "scan0.zarr"
    (image,) = sim_objects(settings.simulator_dir, order)
    assert image.type == "Image"
    assert image.name == "scan0 converted"
    # Registered where the pixels stay: the temporary copy is gone by now.
    assert image.client_path == str(shared)
    assert Path(image.client_path).is_dir()
    assert not (Path(os.path.abspath(settings.omero_inplace_dir)) / order).exists()
    (annotation,) = sim_annotations(settings.simulator_dir, image)
    assert annotation["Filepath"] == str(shared)
    assert annotation["processing_output_format"] == "ome-zarr"
