"""Slides, models and runs: registering them, finding a slide, summarising and deleting."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

from psycopg2 import sql
from sqlalchemy import Engine, text

from spatialdb.errors import UserError
from spatialdb.store.db import rollback_or_discard
from spatialdb.store.schema import OBJECT_TABLES


@dataclass
class SlideRecord:
    """What the database keeps about a slide file (level-0 size, µm per pixel, ...)."""

    file_path: str
    name: str
    fingerprint: str
    width: int
    height: int
    mpp_x: float
    mpp_y: float
    level_count: int = 1
    objective_power: float | None = None
    vendor: str | None = None


@dataclass
class ModelRecord:
    """The network weights behind a run."""

    name: str
    preset: str
    weights_hash: str
    class_names: dict
    mpp: float
    info: dict = field(default_factory=dict)


UPSERT_SLIDE = """
INSERT INTO slide (id, file_path, name, fingerprint, width, height, mpp_x, mpp_y, level_count,
                   objective_power, vendor)
VALUES (coalesce(%(id)s, nextval(pg_get_serial_sequence('slide', 'id'))), %(file_path)s,
        %(name)s, %(fingerprint)s, %(width)s, %(height)s, %(mpp_x)s, %(mpp_y)s,
        %(level_count)s, %(objective_power)s, %(vendor)s)
ON CONFLICT (file_path) DO UPDATE SET
    name = EXCLUDED.name, fingerprint = EXCLUDED.fingerprint, width = EXCLUDED.width,
    height = EXCLUDED.height, mpp_x = EXCLUDED.mpp_x, mpp_y = EXCLUDED.mpp_y,
    level_count = EXCLUDED.level_count, objective_power = EXCLUDED.objective_power,
    vendor = EXCLUDED.vendor, updated_at = EXCLUDED.updated_at
RETURNING id
"""

UPSERT_MODEL = """
INSERT INTO model (name, preset, weights_hash, class_names, mpp, info)
VALUES (%(name)s, %(preset)s, %(weights_hash)s, %(class_names)s, %(mpp)s, %(info)s)
ON CONFLICT (weights_hash) DO UPDATE SET name = EXCLUDED.name
RETURNING id
"""

#: The partition currently holding a slide's objects in one object table.
SLIDE_PARTITIONS = """
SELECT c.oid::regclass::text
FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
WHERE i.inhparent = %(parent)s::regclass
  AND pg_get_expr(c.relpartbound, c.oid) = 'FOR VALUES IN (' || %(slide_id)s || ')'
"""


def upsert_slide(cursor, slide: SlideRecord, slide_id: int | None = None) -> int:
    """Insert (as `slide_id` if given) or refresh a slide row, locking it until the transaction
    ends; its id."""
    cursor.execute(UPSERT_SLIDE, {**asdict(slide), "id": slide_id})
    return cursor.fetchone()[0]


def upsert_model(cursor, model: ModelRecord) -> int:
    values = asdict(model)
    values["class_names"] = json.dumps(model.class_names)
    values["info"] = json.dumps(model.info)
    cursor.execute(UPSERT_MODEL, values)
    return cursor.fetchone()[0]


def drop_slide_objects(cursor, slide_id: int) -> None:
    """Remove a slide's objects from every object table: its partitions dropped, or (tables not
    partitioned, as on Citus) its rows deleted."""
    for table in OBJECT_TABLES:
        cursor.execute(SLIDE_PARTITIONS, {"parent": table, "slide_id": slide_id})
        for (partition,) in cursor.fetchall():
            cursor.execute(sql.SQL("DROP TABLE {}").format(sql.SQL(partition)))
        cursor.execute(
            sql.SQL("DELETE FROM {} WHERE slide_id = %s").format(sql.Identifier(table)),
            (slide_id,),
        )


def find_slide(engine: Engine, ref: str) -> dict:
    """A slide by id, name or file path; an error naming the candidates when ambiguous."""
    query = text(
        "SELECT id, name, file_path FROM slide "
        "WHERE id::text = :ref OR name = :ref OR file_path = :ref ORDER BY id"
    )
    with engine.connect() as conn:
        rows = conn.execute(query, {"ref": ref}).mappings().all()
    if not rows:
        raise UserError(f"no slide matches {ref!r} (give its id, name or file path)")
    if len(rows) > 1:
        ids = ", ".join(str(r["id"]) for r in rows)
        raise UserError(f"{ref!r} matches several slides (ids {ids}); give the id")
    return dict(rows[0])


def stored_slide(engine: Engine, slide_id: int) -> SlideRecord:
    """The slide record as the database holds it (for runs made without the slide file)."""
    columns = ", ".join(SlideRecord.__dataclass_fields__)
    with engine.connect() as conn:
        row = conn.execute(
            text(f"SELECT {columns} FROM slide WHERE id = :id"), {"id": slide_id}
        ).mappings()
        found = next(iter(row), None)
    if found is None:
        raise UserError(f"no slide with id {slide_id}")
    return SlideRecord(**found)


def save_class_colours(engine: Engine, colours: dict[str, list[int]]) -> None:
    """Record class colours (creating classes not seen before; a new colour replaces the old)."""
    if not colours:
        return
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO object_class (name, color) VALUES (:name, :color) "
                "ON CONFLICT (name) DO UPDATE SET color = EXCLUDED.color"
            ),
            [{"name": n, "color": list(c)} for n, c in colours.items()],
        )


def delete_slide(engine: Engine, slide_id: int) -> None:
    """Remove a slide, its runs and all its objects in one transaction."""
    raw = engine.raw_connection()
    try:
        with raw.cursor() as cursor:
            cursor.execute("SELECT id FROM slide WHERE id = %s FOR UPDATE", (slide_id,))
            if cursor.fetchone() is None:
                raise UserError(f"no slide with id {slide_id}")
            drop_slide_objects(cursor, slide_id)
            cursor.execute("DELETE FROM slide WHERE id = %s", (slide_id,))
        raw.commit()
    except BaseException:
        rollback_or_discard(raw)
        raise
    finally:
        raw.close()


STATUS_QUERY = """
SELECT s.id, s.name, s.status, s.width, s.height, s.mpp_x, r.id AS run_id, r.kind,
       m.name AS model, r.object_counts, r.finished_at,
       (SELECT count(*) FROM run a WHERE a.slide_id = s.id) AS runs,
       coalesce(f.run_id = s.current_run_id, false) AS features_current
FROM slide s
LEFT JOIN run r ON r.id = s.current_run_id
LEFT JOIN model m ON m.id = r.model_id
LEFT JOIN slide_feature f ON f.slide_id = s.id
ORDER BY s.id
"""


def slide_summaries(engine: Engine) -> list[dict]:
    """One row per slide: current run, its model, object counts per table and whether its
    features describe that run."""
    with engine.connect() as conn:
        rows = conn.execute(text(STATUS_QUERY)).mappings().all()
    summaries = []
    for row in rows:
        counts = row["object_counts"] or {}
        summary = dict(row)
        for table in OBJECT_TABLES:
            summary[table] = sum(counts.get(table, {}).values())
        summaries.append(summary)
    return summaries


FIND_INGESTED = """
SELECT s.id, s.file_path
FROM slide s
JOIN run r ON r.id = s.current_run_id
JOIN model m ON m.id = r.model_id
WHERE s.fingerprint = :fingerprint AND m.weights_hash = :weights_hash AND r.kind = 'inference'
ORDER BY s.id
LIMIT 1
"""


def find_ingested(engine: Engine, fingerprint: str, weights_hash: str) -> dict | None:
    """The slide whose file content and current model are these, if any."""
    with engine.connect() as conn:
        row = (
            conn.execute(
                text(FIND_INGESTED), {"fingerprint": fingerprint, "weights_hash": weights_hash}
            )
            .mappings()
            .first()
        )
    return dict(row) if row else None


def fingerprint(path) -> str:
    """SHA-256 of a file's bytes: the identity of its content, wherever it lies."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(1 << 22):
            digest.update(block)
    return "sha256:" + digest.hexdigest()
