"""Which preprocessing failures pass (issue 15): only the container runtime itself being
unavailable for a while, never a container that ran and failed, nor a runtime that refused
the order (unknown image). The runtime is a real program standing in for podman."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import structlog

from biomero_importer.pipeline.runner import transient_kind
from biomero_importer.preprocessing import PreprocessingError, run_preprocessing
from biomero_importer.settings import Settings

from .conftest import OrderFactory

FAKE_RUNTIME = """#!{python}
import sys
if sys.argv[1] != "run":
    sys.exit(0)  # rm, kill: nothing to clean up
print({message!r}, file=sys.stderr)
sys.exit({code})
"""

CASES = [
    (
        125,
        "Error: Cannot connect to Podman. Please verify your connection to the Linux system"
        " using `podman system connection list`",
        True,
    ),
    (125, "Cannot connect to the Docker daemon at unix:///var/run/docker.sock.", True),
    (125, "Error: database is locked", True),
    (125, "Error: image not known", False),
    (125, "Error: statfs /data/x: permission denied", False),
    # the converter ran: whatever it printed, its failure is the order's own
    (1, "ConnectionRefusedError: connection refused", False),
]


@pytest.mark.parametrize(("code", "message", "transient"), CASES)
async def test_only_an_unavailable_runtime_is_transient(
    make_order: OrderFactory,
    settings: Settings,
    tmp_path: Path,
    *,
    code: int,
    message: str,
    transient: bool,
) -> None:
    program = tmp_path / "fake-podman"
    program.write_text(FAKE_RUNTIME.format(python=sys.executable, message=message, code=code))
    program.chmod(0o755)
    settings = settings.model_copy(update={"container_runtime": str(program)})
    with pytest.raises(PreprocessingError) as caught:
        await run_preprocessing(make_order(), settings, log=structlog.get_logger())
    assert caught.value.transient is transient
    assert transient_kind(caught.value) == ("container_runtime" if transient else None)
