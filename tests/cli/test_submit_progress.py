"""submit --wait shows a running order's progress: plain lines off a terminal, a live bar on one."""

from __future__ import annotations

import asyncio
import os
import re
import sys
import threading
from pathlib import Path

from tests.cli.conftest import CliSetup, run_cli
from tests.support import make_tiffs, running_service

FILES = 15
# the simulator takes this long per file: the import step lasts about 1.5 s
DELAY = 0.1


def _submit_args(setup: CliSetup, files: list[Path]) -> list[str | Path]:
    return [
        "submit", "-g", "Demo", "-u", "researcher", "--dataset", "151", "--wait",
        "--timeout", "60", *files, "--config", setup.config,
    ]  # fmt: skip


async def test_submit_wait_prints_one_progress_line_per_change_off_a_terminal(
    cli_setup: CliSetup,
) -> None:
    slow = cli_setup.with_config(omero_simulator_import_delay=DELAY)
    files = make_tiffs(slow.root / "slow", FILES)
    async with running_service(slow.settings, slow.url):
        done = await run_cli(*_submit_args(slow, files))
    assert done.exit_code == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("  progress: ")]
    middle = [
        line for line in lines if re.match(rf"  progress: import ([1-9]|1[0-4])/{FILES},", line)
    ]
    # the middle of the import was seen, with the file being imported, and each state once:
    # a line per change, not one per poll
    assert middle, done.stderr
    assert all(re.search(r", image\d+\.tif$", line) for line in middle), middle
    counts = [int(n) for n in re.findall(rf"^  progress: import (\d+)/{FILES}", done.stderr, re.M)]
    assert counts == sorted(counts), lines
    assert len(lines) == len(set(lines)), lines
    # the order's end is still reported as before
    assert done.stderr.rstrip().endswith("Import Completed")


def _read_all(fd: int, into: bytearray) -> None:
    """Everything written to a pseudo-terminal until its last writer closes it."""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: the other side is closed
            return
        if not chunk:
            return
        into.extend(chunk)


async def test_submit_wait_draws_a_live_bar_on_a_terminal(cli_setup: CliSetup) -> None:
    """stderr is a real pseudo-terminal: rich draws the bar and redraws it as units finish."""
    slow = cli_setup.with_config(omero_simulator_import_delay=DELAY)
    files = make_tiffs(slow.root / "slow", FILES)
    primary, secondary = os.openpty()
    screen = bytearray()
    reader = threading.Thread(target=_read_all, args=(primary, screen), daemon=True)
    reader.start()
    try:
        async with running_service(slow.settings, slow.url):
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "biomero_importer", *map(str, _submit_args(slow, files)),
                stdout=asyncio.subprocess.PIPE, stderr=secondary,
                env={**os.environ, "COLUMNS": "200", "TERM": "xterm"},
            )  # fmt: skip
            os.close(secondary)
            out, _ = await asyncio.wait_for(proc.communicate(), 60)
        await asyncio.to_thread(reader.join, 10)
    finally:
        os.close(primary)
    text = screen.decode(errors="replace")
    assert proc.returncode == 0, text
    assert out.decode().splitlines()[-1] in text  # the bar's label names the order
    # a terminal gets cursor movements (redraws), and bars with the import in its middle
    assert "\x1b[" in text
    middle = {int(n) for n in re.findall(rf"import (\d+)/{FILES}", text)}
    assert {n for n in middle if 0 < n < FILES}, text[-2000:]
    assert "━" in text  # rich's bar
    assert "  progress: " not in text  # the plain lines are for pipes and files only
