"""What the package imports is what it declares, and the service stays light."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "biomero_importer"


# imported only behind an optional extra that this environment may not have installed
OPTIONAL_NOT_INSTALLED = {"omero": ["omero-py"]}


def _requirement_name(spec: str) -> str:
    name = re.split(r"[\s\[<>=!~;]", spec, maxsplit=1)[0]
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared() -> tuple[set[str], dict[str, set[str]]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {_requirement_name(s) for s in project["dependencies"]}
    extras = {
        extra: {_requirement_name(s) for s in specs}
        for extra, specs in project["optional-dependencies"].items()
    }
    return core, extras


def _imported_top_level() -> set[str]:
    names: set[str] = set()
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n != "biomero_importer"}


def test_every_imported_distribution_is_declared() -> None:
    core, extras = _declared()
    declared = core | set().union(*extras.values())
    owners = packages_distributions()
    missing = {}
    for module in sorted(_imported_top_level()):
        if module == "Ice":  # zeroc-ice comes with the omero extra's prebuilt wheel
            continue
        found = owners.get(module) or OPTIONAL_NOT_INSTALLED.get(module, [])
        dists = {re.sub(r"[-_.]+", "-", d).lower() for d in found}
        if not dists:
            pytest.fail(f"{module} is imported by src/ but not installed here")
        if not dists & declared:
            missing[module] = sorted(dists)
    assert missing == {}, f"imported by src/ but not declared in pyproject.toml: {missing}"


def test_no_core_dependency_goes_unused() -> None:
    core, _ = _declared()
    owners = packages_distributions()
    used = {
        re.sub(r"[-_.]+", "-", dist).lower()
        for module in _imported_top_level()
        for dist in owners.get(module, [])
    }
    # anyio: the supervised task tree being built for issue 11 runs on its task groups
    expected_soon = {"anyio"}
    unused = core - used - expected_soon
    assert unused == set(), f"declared but imported nowhere in src/: {sorted(unused)}"


@pytest.mark.parametrize("module", ["biomero_importer.service", "biomero_importer.cli.app"])
def test_service_and_cli_do_not_load_demo_only_libraries(module: str) -> None:
    code = (
        f"import json, sys, {module}\n"
        "print(json.dumps(sorted(m for m in ('numpy', 'tifffile') if m in sys.modules)))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


def test_demo_without_numpy_says_how_to_install_it(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "sys.modules['numpy'] = None  # as if the demo extra were not installed\n"
        "from biomero_importer.cli.app import main\n"
        f"sys.argv = ['biomero-importer', 'demo', '--dir', {str(tmp_path)!r}]\n"
        "main()\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=120
    )
    assert done.returncode != 0
    assert "pip install 'biomero-importer[demo]'" in done.stderr, done.stderr[-2000:]
