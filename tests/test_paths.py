"""The one containment check (``biomero_importer.paths``) on real files and real symlinks."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from biomero_importer import paths
from biomero_importer.paths import Area, PathRefused, contained, member, recheck

pytestmark = pytest.mark.unit


@pytest.fixture
def root(tmp_path: Path) -> Path:
    folder = tmp_path / "root"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "a.tif").write_bytes(b"a")
    return folder


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "secret.tif").write_bytes(b"s")
    return folder


def refused(path: Path, area: Area, what: str = "File") -> str:
    with pytest.raises(PathRefused) as info:
        contained(path, area, what)
    return info.value.reason


def test_a_file_inside_is_returned_resolved(root: Path) -> None:
    (root / "alias").symlink_to(root / "sub", target_is_directory=True)
    area = paths.import_area([root])
    assert contained(root / "alias" / "a.tif", area) == root / "sub" / "a.tif"


def test_each_way_out_has_its_own_description(root: Path, outside: Path) -> None:
    area = paths.import_area([root])
    (root / "link.tif").symlink_to(outside / "secret.tif")
    (root / "sub" / "out").symlink_to(outside, target_is_directory=True)
    assert refused(Path("sub/a.tif"), area) == "Path is not absolute: sub/a.tif"
    dotdot = root / ".." / "outside" / "secret.tif"
    assert refused(dotdot, area) == f"File is outside the import roots: {dotdot}"
    assert refused(root / "nope.tif", area) == f"File not found: {root / 'nope.tif'}"
    assert refused(root / "link.tif", area, "metadata.csv") == (
        f"metadata.csv links outside the import roots: {root / 'link.tif'}"
    )
    assert refused(root / "sub", area) == (
        f"Folder links outside the import roots: {root / 'sub' / 'out'}"
    )


def test_a_link_cycle_inside_the_roots_ends(root: Path) -> None:
    (root / "sub" / "loop").symlink_to(root, target_is_directory=True)
    assert contained(root, paths.import_area([root])) == root


def test_a_symlinked_root_holds_what_lies_under_its_target(tmp_path: Path, root: Path) -> None:
    alias = tmp_path / "alias-root"
    alias.symlink_to(root, target_is_directory=True)
    area = paths.import_area([alias])
    assert contained(root / "sub" / "a.tif", area) == root / "sub" / "a.tif"
    assert contained(alias / "sub" / "a.tif", area) == root / "sub" / "a.tif"


@pytest.mark.parametrize(
    ("relative", "problem"),
    [
        ("/etc/passwd", "is absolute"),
        ("../other.zarr/0", "is not a normalised relative path"),
        ("0/../../x", "is not a normalised relative path"),
        ("./0", "is not a normalised relative path"),
        ("0//1", "is not a normalised relative path"),
        ("0/", "is not a normalised relative path"),
        ("", "is not a usable path"),
        ("0\\..\\x", "is not a usable path"),
    ],
)
def test_a_metadata_path_must_be_relative_and_normalised(
    root: Path, relative: str, problem: str
) -> None:
    with pytest.raises(PathRefused) as info:
        member(root, relative, "multiscales[0].datasets[0].path")
    assert info.value.reason == (
        f"OME-Zarr entry multiscales[0].datasets[0].path {problem}: {relative!r}"
    )


def test_a_metadata_path_inside_is_resolved_and_one_linking_out_refused(
    root: Path, outside: Path
) -> None:
    assert member(root, "sub/a.tif", "e") == root / "sub" / "a.tif"
    (root / "sub" / "b").symlink_to(outside, target_is_directory=True)
    with pytest.raises(PathRefused) as info:
        member(root, "sub/b", "plate.wells[0].path")
    assert info.value.reason == (
        f"OME-Zarr entry plate.wells[0].path links outside the zarr store: {root / 'sub' / 'b'}"
    )


def test_recheck_passes_an_unchanged_path(root: Path) -> None:
    area = paths.import_area([root])
    file = root / "sub" / "a.tif"
    assert recheck(file, contained(file, area), area) == file


def test_a_file_swapped_for_a_link_out_is_a_change(root: Path, outside: Path) -> None:
    area = paths.import_area([root])
    file = root / "sub" / "a.tif"
    checked = contained(file, area)
    file.unlink()
    file.symlink_to(outside / "secret.tif")
    with pytest.raises(PathRefused) as info:
        recheck(file, checked, area)
    assert info.value.reason == f"Files changed while the order waited: {file}"


def test_a_file_now_resolving_elsewhere_inside_is_a_change(root: Path) -> None:
    area = paths.import_area([root])
    file = root / "sub" / "a.tif"
    checked = contained(file, area)
    (root / "b.tif").write_bytes(b"b")
    file.unlink()
    file.symlink_to(root / "b.tif")
    with pytest.raises(PathRefused, match="Files changed while the order waited"):
        recheck(file, checked, area)


def test_a_link_out_added_to_a_folder_is_a_change_naming_the_entry(
    root: Path, outside: Path
) -> None:
    area = paths.import_area([root])
    checked = contained(root, area)
    (root / "sub" / "late").symlink_to(outside / "secret.tif")
    with pytest.raises(PathRefused) as info:
        recheck(root, checked, area)
    assert info.value.reason == f"Files changed while the order waited: {root / 'sub' / 'late'}"


def test_recheck_without_an_earlier_check_reports_the_first_problem(
    root: Path, outside: Path
) -> None:
    (root / "link.tif").symlink_to(outside / "secret.tif")
    with pytest.raises(PathRefused, match=r"^File links outside the import roots"):
        recheck(root / "link.tif", None, paths.import_area([root]))


@pytest.mark.parametrize(
    ("path", "root"),
    [
        ("/data/lab", "/data/lab"),
        ("/data/lab/a.tif", "/data/lab"),
        ("/data/lab2/a.tif", "/data/lab"),  # a sibling that shares the root's text
        ("/data/lab/../x", "/data/lab"),  # pathlib keeps '..': normpath's job, not this one
        ("/data", "/data/lab"),
        ("//data/lab/a.tif", "/data/lab"),  # POSIX keeps a leading '//'
        ("//data/lab/a.tif", "//data/lab"),
        ("/data/lab/a.tif", "/"),
        ("//data/lab/a.tif", "/"),
        ("/", "/"),
        ("//", "/"),
        ("/data/läb/a.tif", "/data/läb"),
        ("/data/lab/a\udcff.tif", "/data/lab"),  # a file name that is not UTF-8
    ],
)
def test_lying_inside_is_what_is_relative_to_says(path: str, root: str) -> None:
    """The area check reads the paths' text; it must agree with pathlib's own answer."""
    assert paths._inside(Path(path), [Path(root)]) is Path(path).is_relative_to(Path(root))


def test_paths_sits_below_every_other_layer() -> None:
    """paths.py may import only the bottom modules, so everything else can call it."""
    tree = ast.parse(Path(paths.__file__).read_text(encoding="utf-8"))
    imported = {
        node.module
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module is not None
    } | {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    ours = {name for name in imported if name.startswith("biomero_importer")}
    assert ours <= {"biomero_importer.text", "biomero_importer.model"}
