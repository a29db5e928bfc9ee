"""Finding a screen's imported plate: the old query shape against the per-fileset one.

``imported_hql("Plate")`` used to join every field image of the plate with every used file of
its fileset; it now joins the used files per fileset and looks at the field images only in the
subquery that picks the filesets. This runs both shapes, translated to SQL over OMERO's tables
(plate, well, wellsample, image, fileset, filesetentry, the comment annotation links) in
SQLite, for one plate of ``--images`` field images in one fileset of as many files (a
3,456-image screen by default), and prints the rows each join makes and its time. It is a
model of the join's size, not Hibernate against OMERO's PostgreSQL: the row counts carry over,
the times only as a ratio.

    python benchmarks/plate_hql.py
    python benchmarks/plate_hql.py --images 1536
"""

from __future__ import annotations

import argparse
import sqlite3
import time

SCHEMA = """
CREATE TABLE plate (id INTEGER PRIMARY KEY, name TEXT);
CREATE TABLE screenplatelink (parent INTEGER, child INTEGER);
CREATE TABLE well (id INTEGER PRIMARY KEY, plate INTEGER);
CREATE TABLE image (id INTEGER PRIMARY KEY, fileset INTEGER);
CREATE TABLE wellsample (id INTEGER PRIMARY KEY, well INTEGER, image INTEGER);
CREATE TABLE fileset (id INTEGER PRIMARY KEY);
CREATE TABLE filesetentry (id INTEGER PRIMARY KEY, fileset INTEGER, clientpath TEXT);
CREATE TABLE annotation (id INTEGER PRIMARY KEY, ns TEXT, textvalue TEXT);
CREATE TABLE imageannotationlink (parent INTEGER, child INTEGER);
CREATE INDEX well_plate ON well (plate);
CREATE INDEX wellsample_well ON wellsample (well);
CREATE INDEX wellsample_image ON wellsample (image);
CREATE INDEX filesetentry_fileset ON filesetentry (fileset);
CREATE INDEX image_fileset ON image (fileset);
CREATE INDEX ial_parent ON imageannotationlink (parent);
"""

MARKED = (
    "exists (select 1 from imageannotationlink l join annotation a on a.id = l.child"
    " where l.parent = i.id and a.ns = 'biomero.import.order' and a.textvalue = 'order')"
)

# the shape imported_hql("Plate") had: field images x used files
OLD = (
    "select {what} from plate p join screenplatelink sl on sl.child = p.id"
    " join well w on w.plate = p.id join wellsample ws on ws.well = w.id"
    " join image i on i.id = ws.image join fileset fs on fs.id = i.fileset"
    f" join filesetentry u on u.fileset = fs.id where sl.parent = 7 and {MARKED}"
)
# the shape it has now: used files per fileset; a semi-join (exists) on the field images
# ties each fileset to its plate and stops at the first image
NEW = (
    "select {what} from plate p join screenplatelink sl on sl.child = p.id,"
    " fileset fs join filesetentry u on u.fileset = fs.id where sl.parent = 7 and exists"
    " (select 1 from wellsample ws join well w on w.id = ws.well"
    f" join image i on i.id = ws.image where w.plate = p.id and i.fileset = fs.id and {MARKED})"
)

# managed_files_hql("Plate"), before and now
OLD_FILES = (
    "select {what} from plate p join well w on w.plate = p.id join wellsample ws on ws.well = w.id"
    " join image i on i.id = ws.image join filesetentry u on u.fileset = i.fileset where p.id = 1"
)
NEW_FILES = (
    "select {what} from fileset fs join filesetentry u on u.fileset = fs.id where fs.id in"
    " (select i.fileset from wellsample ws join well w on w.id = ws.well"
    " join image i on i.id = ws.image where w.plate = 1)"
)


def build(images: int) -> sqlite3.Connection:
    db = sqlite3.connect(":memory:")
    db.executescript(SCHEMA)
    db.execute("INSERT INTO plate VALUES (1, 'screen plate')")
    db.execute("INSERT INTO screenplatelink VALUES (7, 1)")
    db.execute("INSERT INTO fileset VALUES (1)")
    db.execute("INSERT INTO annotation VALUES (1, 'biomero.import.order', 'order')")
    db.executemany(
        "INSERT INTO filesetentry VALUES (?, 1, ?)",
        [(n, f"data/screen/field_{n:05d}.tif") for n in range(images)],
    )
    db.executemany("INSERT INTO well VALUES (?, 1)", [(n,) for n in range(images)])
    db.executemany("INSERT INTO image VALUES (?, 1)", [(n,) for n in range(images)])
    db.executemany("INSERT INTO wellsample VALUES (?, ?, ?)", [(n, n, n) for n in range(images)])
    db.executemany("INSERT INTO imageannotationlink VALUES (?, 1)", [(n,) for n in range(images)])
    return db


def measure(db: sqlite3.Connection, shape: str, columns: str) -> tuple[int, int, float]:
    """(rows the join makes, distinct rows returned, seconds for the returned rows)."""
    (joined,) = db.execute(shape.format(what="count(*)")).fetchone()
    started = time.perf_counter()
    rows = db.execute(shape.format(what=f"distinct {columns}")).fetchall()
    return int(joined), len(rows), time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=3456)
    args = parser.parse_args()
    db = build(args.images)
    queries = (
        ("imported", OLD, NEW, "p.id, p.name, fs.id, u.clientpath"),
        ("managed files", OLD_FILES, NEW_FILES, "u.clientpath"),
    )
    for name, before, now, columns in queries:
        old = measure(db, before, columns)
        new = measure(db, now, columns)
        for label, (joined, returned, seconds) in (("images x files", old), ("per fileset", new)):
            print(
                f"{name:13} {label:15} {joined:>12,} rows joined  {returned:>6,} returned"
                f"  {seconds:8.3f} s"
            )
        rows, took = old[0] / new[0], old[2] / max(new[2], 1e-9)
        print(f"{name:13} ratio: {rows:,.0f}x rows, {took:,.1f}x time")


if __name__ == "__main__":
    main()
