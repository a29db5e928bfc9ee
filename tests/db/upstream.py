"""Databases as the original importer (and its neighbours) left them."""

from __future__ import annotations

import json
import random

import psycopg2

# What the original's ``create_all`` produced (no server default on timestamp).
UPSTREAM_SCHEMA = """
CREATE TABLE imports_preprocessing (
    id SERIAL PRIMARY KEY,
    container VARCHAR NOT NULL,
    input_file VARCHAR NOT NULL,
    output_folder VARCHAR NOT NULL,
    alt_output_folder VARCHAR,
    extra_params JSON
);
CREATE TABLE imports (
    id SERIAL PRIMARY KEY,
    group_name VARCHAR NOT NULL,
    user_name VARCHAR NOT NULL,
    destination_id VARCHAR NOT NULL,
    destination_type VARCHAR NOT NULL,
    stage VARCHAR NOT NULL,
    uuid VARCHAR(36) NOT NULL,
    timestamp TIMESTAMP WITH TIME ZONE,
    files TEXT NOT NULL,
    file_names TEXT,
    {description}
    preprocessing_id INTEGER REFERENCES imports_preprocessing (id){import_options}
);
CREATE INDEX ix_imports_user_name ON imports (user_name);
CREATE INDEX ix_imports_uuid ON imports (uuid);
CREATE INDEX imports_ix_uuid_timestamp ON imports (uuid, timestamp);
"""

NEIGHBOURS = """
CREATE TABLE biomero_job_view (job_id INTEGER PRIMARY KEY, user_id INTEGER, note TEXT);
INSERT INTO biomero_job_view VALUES (1, 7, 'analysis'), (2, 8, 'segmentation');
CREATE TABLE alembic_version_biomero (version_num VARCHAR(32) PRIMARY KEY);
INSERT INTO alembic_version_biomero VALUES ('a1b2c3d4e5f6');
"""

STAGE_PATHS = [
    ["Import Pending"],
    ["Import Pending", "Import Started"],
    ["Import Pending", "Import Started", "Import Completed"],
    ["Import Pending", "Import Started", "Import Failed"],
    ["Import Pending", "Import Started", "Import Preprocessing", "Import Completed"],
]


# What OMERO.biomero's newer writer stores in ``imports.import_options`` (revision 92e8f9e637a1).
IMPORT_OPTIONS = [
    None,
    '{"schema": 1, "platePixelSource": "label", "plateLabelName": "nuclei"}',
    '{"schema": 2, "registration": {"platePixelSource": "source"}, "operations": []}',
]


def create_upstream(
    url: str,
    *,
    with_description: bool,
    stamped: bool,
    orders: int = 50,
    seed: int = 1,
    revision: str = "78d3d6d84aec",
) -> None:
    """Tables, optional version stamp and a history of ``orders`` orders in every stage.

    At ``revision`` 92e8f9e637a1 the tables have ``import_options`` and orders carry values.
    """
    with_options = revision == "92e8f9e637a1"
    rng = random.Random(seed)
    conn = psycopg2.connect(url)
    try:
        with conn, conn.cursor() as cur:
            cur.execute(
                UPSTREAM_SCHEMA.format(
                    description="description TEXT," if with_description else "",
                    import_options=",\n    import_options TEXT" if with_options else "",
                )
            )
            cur.execute(NEIGHBOURS)
            if stamped:
                cur.execute(
                    "CREATE TABLE alembic_version_omeroadi (version_num VARCHAR(32) PRIMARY KEY);"
                    "INSERT INTO alembic_version_omeroadi VALUES (%s)",
                    (revision,),
                )
            for n in range(orders):
                pre_id = None
                if n % 5 == 0:
                    cur.execute(
                        "INSERT INTO imports_preprocessing (container, input_file,"
                        " output_folder, alt_output_folder, extra_params)"
                        " VALUES (%s, %s, %s, %s, %s) RETURNING id",
                        (
                            "cellularimagingcf/convertleica-docker:v1.2.0",
                            "{Files}",
                            "/data",
                            "/out",
                            json.dumps({"image_uuid": f"img-{n}"}),
                        ),
                    )
                    row = cur.fetchone()
                    assert row is not None
                    pre_id = row[0]
                files = [f"/data/group{n % 3}/image{n}_{k}.tif" for k in range(rng.randint(1, 3))]
                columns = (
                    "group_name, user_name, destination_id, destination_type, stage, uuid,"
                    " timestamp, files, file_names, preprocessing_id"
                )
                values = "%s, %s, %s, %s, %s, %s, now() - %s * interval '1 minute', %s, %s, %s"
                if with_description:
                    columns += ", description"
                    values += ", %s"
                if with_options:
                    columns += ", import_options"
                    values += ", %s"
                for step, stage in enumerate(rng.choice(STAGE_PATHS)):
                    params: list[object] = [
                        f"group{n % 3}",
                        f"user{n % 4}",
                        str(100 + n),
                        "Screen" if n % 7 == 0 else "Dataset",
                        stage,
                        f"00000000-0000-4000-8000-{n:012d}",
                        (orders - n) * 10 - step,
                        json.dumps(files),
                        json.dumps([f.rsplit("/", 1)[1] for f in files]) if step else None,
                        pre_id,
                    ]
                    if with_description:
                        params.append("boom" if stage == "Import Failed" else None)
                    if with_options:
                        params.append(IMPORT_OPTIONS[n % len(IMPORT_OPTIONS)])
                    cur.execute(f"INSERT INTO imports ({columns}) VALUES ({values})", params)
    finally:
        conn.close()


def dump(url: str, table: str, names: list[str] | None = None) -> list[tuple[object, ...]]:
    """Every row of ``table`` (only the columns ``names`` when given), in id order."""
    selected = ", ".join(names) if names else "*"
    conn = psycopg2.connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute(f"SELECT {selected} FROM {table} ORDER BY 1")
            return list(cur.fetchall())
    finally:
        conn.close()


def columns(url: str, table: str) -> list[str]:
    conn = psycopg2.connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute(f"SELECT * FROM {table} LIMIT 0")
            return [d[0] for d in cur.description or ()]
    finally:
        conn.close()
