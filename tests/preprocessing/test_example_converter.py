"""The example converter's answer passes the importer's own contract parser.

The converter runs directly with Python (no image build here), with container paths equal to
host paths, so the mounts map every path to itself.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import tifffile

from biomero_importer.preprocessing import parse_result, plan_jobs
from biomero_importer.settings import Settings

from .conftest import REPO, OrderFactory

CONVERTER = REPO / "containers" / "example-converter" / "convert.py"


def test_example_converter_output_is_accepted(
    make_order: OrderFactory, settings: Settings, data_dir: Path
) -> None:
    order_uuid = str(uuid.uuid4())
    alt_host = settings.omero_inplace_dir / order_uuid / "1"
    order = make_order(
        output_folder=str(data_dir), alt_output_folder=str(alt_host), order_uuid=order_uuid
    )
    stack = np.ones((4, 16, 16), dtype=np.uint16)
    tifffile.imwrite(data_dir / "image.tif", stack, photometric="minisblack")
    (job,) = plan_jobs(order, settings)
    args = list(job.argv[job.argv.index(job.image) + 1 :])
    proc = subprocess.run(
        [sys.executable, str(CONVERTER), *args], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr
    (item,) = parse_result(job, proc.stdout.strip().splitlines()[-1], True)
    assert item.import_path == alt_host / "image.ome.tiff"
    assert item.final_path == data_dir / ".processed" / "image.ome.tiff"
    assert ("axes", "ZYX") in item.keyvalues
