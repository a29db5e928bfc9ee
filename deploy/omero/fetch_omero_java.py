"""Download a pinned OMERO.java release into ``<omerodir>/lib/client`` (image build step).

    python fetch_omero_java.py VERSION OMERODIR

The URL is the one ``omero import --fetch-jars VERSION`` downloads. When the environment
variable ``OMERO_JAVA_SHA256`` is set, the archive must have that sha256 or the build fails.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import sys
import tempfile
import urllib.request
import zipfile
from pathlib import Path

URL = "https://downloads.openmicroscopy.org/omero/{version}/OMERO.java.zip"


def main(version: str, omerodir: Path) -> int:
    url = URL.format(version=version)
    with urllib.request.urlopen(url, timeout=300) as response:  # noqa: S310 (fixed https URL)
        data = response.read()
    digest = hashlib.sha256(data).hexdigest()
    expected = os.environ.get("OMERO_JAVA_SHA256", "").strip().lower()
    sys.stderr.write(f"OMERO.java {version}: sha256 {digest}\n")
    if expected and digest != expected:
        sys.stderr.write(f"error: checksum mismatch, expected {expected}\n")
        return 1
    if not expected:
        sys.stderr.write("warning: OMERO_JAVA_SHA256 is not set; pin it with --build-arg\n")
    client = omerodir / "lib" / "client"
    client.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(io.BytesIO(data)) as archive:
        archive.extractall(tmp)
        jars = sorted(Path(tmp).glob("*/libs/*.jar"))
        if not jars:
            sys.stderr.write("error: no jars under */libs in OMERO.java.zip\n")
            return 1
        for jar in jars:
            shutil.copy2(jar, client / jar.name)
    (omerodir / "OMERO.java.version").write_text(f"{version} sha256:{digest}\n")
    sys.stderr.write(f"{len(jars)} jars in {client}\n")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.stderr.write(__doc__ or "")
        sys.exit(2)
    sys.exit(main(sys.argv[1], Path(sys.argv[2])))
