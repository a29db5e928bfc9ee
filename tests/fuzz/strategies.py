"""Hostile orders as data, and how each one is laid out on disk and written to ``imports``.

A spec is pure data (so hypothesis can replay and shrink it); ``materialise`` creates the
files, folders and symlinks it names under the example's own folder, with names that are
arbitrary bytes (written through ``os.fsencode``-style bytes paths, so they need not be
UTF-8), and returns the column values an SQL client would insert.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hypothesis import strategies as st

# --- names ----------------------------------------------------------------------------------

# one path component as bytes: anything but '/' and NUL, never '.' or '..'
name_bytes = (
    st.binary(min_size=1, max_size=24)
    .map(lambda b: b.replace(b"/", b"_").replace(b"\x00", b"_"))
    .filter(lambda b: b not in (b".", b".."))
)
# the case from the issue (Latin-1 names from old Windows/SMB shares): never valid UTF-8
non_utf8_name = st.builds(lambda a, b: a + b"\xe9" + b, name_bytes, name_bytes).map(
    lambda b: b.replace(b"/", b"_")
)
component = st.one_of(name_bytes, non_utf8_name, st.just(b"image.tif"))

# text as a database column can hold it: no NUL, no lone surrogates (UTF-8 only)
db_text = st.text(
    alphabet=st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), max_size=40
)
# text as a JSON string can carry it: NUL, lone surrogates and control characters included
json_text = st.text(
    alphabet=st.one_of(
        st.characters(),
        st.characters(categories=["Cs"]),
        st.sampled_from("\x00\x1b\r\n\x7f\u2028\ufeff"),
    ),
    max_size=40,
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | json_text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(json_text, inner, max_size=4),
    max_leaves=12,
)

# --- what an order's files can be ------------------------------------------------------------

LINK_TARGETS = ("inside_file", "outside", "dangling", "self", "parent", "root", "outside_dir")

folder_entry = st.one_of(
    st.tuples(st.just("file"), component),
    st.tuples(st.just("dir"), component),
    st.tuples(st.just("link"), component, st.sampled_from(LINK_TARGETS)),
)

files_spec = st.one_of(
    st.tuples(st.just("file"), component),
    st.tuples(st.just("folder"), st.lists(folder_entry, min_size=1, max_size=6)),
    # the path as JSON text, arbitrary characters appended to a real root
    st.tuples(st.just("path_text"), json_text),
    st.tuples(st.just("nul"), component),
    st.tuples(st.just("outside"), component),
    st.tuples(st.just("relative"), component),
    st.tuples(st.just("dotdot"), component),
    # the column as anything at all (mostly not JSON)
    st.tuples(st.just("raw"), db_text),
    st.tuples(st.just("json"), json_values),
    st.tuples(st.just("many"), st.integers(1, 3000)),
    st.tuples(st.just("long_path"), st.integers(4000, 200_000)),
    st.tuples(st.just("nested"), st.integers(10, 200_000)),
    st.tuples(st.just("huge_raw"), st.integers(100_000, 3_000_000)),
)

names = st.one_of(st.sampled_from(["Demo", "researcher", "", " ", "a" * 300]), db_text)
destination_ids = st.one_of(
    st.sampled_from(
        ["151", "0", "-3", " 7 ", "1e3", "\u0663", "9" * 40, "", "NaN", "0x10", "1_000"]
    ),
    st.integers().map(str),
    db_text,
)
destination_types = st.one_of(
    st.sampled_from(["Dataset", "Screen", "dataset", "Plate", "", " Dataset", "Dataset\n"]),
    db_text,
)
extra_params_text = st.one_of(
    json_values.map(json.dumps),
    st.sampled_from(
        ['{"a": "\\u0000"}', '{"a": "\\udc80"}', "null", "[]", '"x"', "{}", '{"a":1,"a":2}']
    ),
    st.integers(1000, 100_000).map(lambda depth: "[" * depth + "]" * depth),
    st.integers(100_000, 2_000_000).map(lambda n: json.dumps({"k": "x" * n})),
    db_text,  # mostly not JSON: the json column should refuse it at the door
)
preprocessing = st.one_of(
    st.none(),
    st.none(),
    st.none(),
    st.fixed_dictionaries(
        {
            # never an allowed image: these orders end at the allowlist, not in podman
            "container": st.one_of(
                st.sampled_from(["", " ", "docker.io/evil:1", "--privileged", "a;rm -rf /"]),
                db_text,
            ),
            "extra_params": extra_params_text,
        }
    ),
)


@dataclass(frozen=True)
class OrderSpec:
    files: tuple[Any, ...]
    group: str
    user: str
    destination_id: str
    destination_type: str
    preprocessing: dict[str, Any] | None


order_specs = st.builds(
    OrderSpec,
    files=files_spec,
    group=st.one_of(st.just("Demo"), names),
    user=st.one_of(st.just("researcher"), names),
    destination_id=st.one_of(st.just("151"), destination_ids),
    destination_type=st.one_of(st.just("Dataset"), destination_types),
    preprocessing=preprocessing,
)


# --- on disk ---------------------------------------------------------------------------------


def _write(path: bytes, data: bytes = b"fuzz\n") -> None:
    with open(path, "wb") as handle:
        handle.write(data)


def _link(target: bytes, link: bytes) -> None:
    if not os.path.lexists(link):
        os.symlink(target, link)


def materialise(spec: OrderSpec, folder: Path, root: Path, outside: Path) -> str:
    """Create what the spec names under ``folder`` (inside ``root``); the ``files`` column."""
    base = os.fsencode(folder)
    os.makedirs(base, exist_ok=True)
    kind, *args = spec.files

    def as_text(path: bytes) -> str:
        # how a client would name a non-UTF-8 path in JSON: surrogate escapes
        return os.fsdecode(path)

    if kind == "file":
        path = os.path.join(base, args[0])
        _write(path)
        return json.dumps([as_text(path)])
    if kind == "folder":
        top = os.path.join(base, b"folder")
        os.makedirs(top, exist_ok=True)
        inside_file = os.path.join(base, b"inside.tif")
        _write(inside_file)
        outside_file = os.path.join(os.fsencode(outside), b"secret.tif")
        for entry in args[0]:
            where = os.path.join(top, entry[1])
            if os.path.lexists(where):
                continue
            if entry[0] == "file":
                _write(where)
            elif entry[0] == "dir":
                os.makedirs(where, exist_ok=True)
                _write(os.path.join(where, b"x.tif"))
            else:
                target = {
                    "inside_file": inside_file,
                    "outside": outside_file,
                    "outside_dir": os.fsencode(outside),
                    "dangling": os.path.join(base, b"missing-\xff"),
                    "self": where,
                    "parent": top,
                    "root": os.fsencode(root),
                }[entry[2]]
                _link(target, where)
        return json.dumps([as_text(top)])
    if kind == "path_text":
        return json.dumps([str(folder) + "/" + args[0]])
    if kind == "nul":
        path = os.path.join(base, args[0])
        _write(path)
        return json.dumps([as_text(path) + "\x00.tif"])
    if kind == "outside":
        path = os.path.join(os.fsencode(outside), args[0])
        _write(path)
        return json.dumps([as_text(path)])
    if kind == "relative":
        return json.dumps([as_text(args[0])])
    if kind == "dotdot":
        path = os.path.join(os.fsencode(outside), args[0])
        _write(path)
        return json.dumps([f"{root}/../{outside.name}/{as_text(args[0])}"])
    if kind == "raw":
        return str(args[0])
    if kind == "json":
        return json.dumps(args[0])
    if kind == "many":
        path = os.path.join(base, b"many.tif")
        _write(path)
        return json.dumps([as_text(path)] * args[0])
    if kind == "long_path":
        return json.dumps([str(folder) + "/" + "a" * args[0]])
    if kind == "nested":
        return "[" * args[0] + "]" * args[0]
    if kind == "huge_raw":
        return json.dumps([str(folder) + "/" + "b" * args[0]])
    raise AssertionError(f"unknown files spec {kind}")


# --- a seed corpus -----------------------------------------------------------------------------


def _seed(files: tuple[Any, ...], **changes: Any) -> OrderSpec:
    plain: dict[str, Any] = {
        "group": "Demo",
        "user": "researcher",
        "destination_id": "151",
        "destination_type": "Dataset",
        "preprocessing": None,
    }
    return OrderSpec(files=files, **{**plain, **changes})


# Inputs known to have broken a replica, one of which opens every example (fuzzers start
# from a corpus): the run then always meets them, interleaved with whatever hypothesis adds,
# and whether it finds them does not depend on the generated sequence.
SEEDS = [
    # the case: a folder holding a symlink with a Latin-1 name that leads outside
    _seed(("folder", [("link", b"caf\xe9.tif", "outside")])),
    _seed(("outside", b"r\xe9sum\xe9.tif")),
    _seed(("file", b"caf\xe9.tif")),
    _seed(("nested", 100_000)),
    _seed(("path_text", "\ud800.tif")),
    _seed(("file", b"image.tif"), destination_id="9" * 40),
    _seed(
        ("file", b"image.tif"),
        preprocessing={"container": "docker.io/x:1", "extra_params": "[" * 5000 + "]" * 5000},
    ),
]
seed_specs = st.sampled_from(SEEDS)
