"""Shape measurements for objects stored before they existed (migration 0009).

Each slide's objects are read in id order, measured (`spatialdb.store.morphometry`) and written
back in batches, one transaction per batch: an interrupted backfill keeps what it committed and
a second one carries on where the first stopped. Every statement names one slide, so on Citus each
runs on the slide's worker alone.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import shapely
from psycopg2 import sql
from sqlalchemy import Engine

from spatialdb.store.morphometry import MORPHOMETRY, shape_measurements
from spatialdb.store.schema import OBJECT_TABLES

BATCH_ROWS = 20_000


def backfill_morphometry(
    engine: Engine,
    batch: int = BATCH_ROWS,
    progress: Callable[[str, int, int], None] = lambda table, slide, rows: None,
) -> dict[str, int]:
    """Fill the shape measurements of every object that has none; {table: objects filled}.
    `progress(table, slide_id, rows)` after each batch."""
    filled = {}
    for table in OBJECT_TABLES:
        filled[table] = 0
        for slide_id, mpp_x, mpp_y in _slides_missing(engine, table):
            last = -1
            while True:
                rows, last = _fill_batch(engine, table, slide_id, mpp_x, mpp_y, last, batch)
                if not rows:
                    break
                filled[table] += rows
                progress(table, slide_id, rows)
    return filled


def _slides_missing(engine: Engine, table: str) -> list[tuple[int, float, float]]:
    raw = engine.raw_connection()
    try:
        with raw.cursor() as cur:
            cur.execute(
                sql.SQL(
                    "SELECT s.id, s.mpp_x, s.mpp_y FROM slide s WHERE EXISTS (SELECT 1 FROM {} o "
                    "WHERE o.slide_id = s.id AND o.equivalent_diameter_um IS NULL) ORDER BY s.id"
                ).format(sql.Identifier(table))
            )
            return cur.fetchall()
    finally:
        raw.rollback()
        raw.close()


def _fill_batch(engine, table, slide_id, mpp_x, mpp_y, after, batch) -> tuple[int, int]:
    """Measure and store up to `batch` objects of a slide with ids above `after`; (rows, last
    id)."""
    raw = engine.raw_connection()
    try:
        with raw.cursor() as cur:
            cur.execute(
                sql.SQL(
                    "SELECT id, ST_AsBinary(geom) FROM {} WHERE slide_id = %s AND id > %s "
                    "AND equivalent_diameter_um IS NULL ORDER BY id LIMIT %s"
                ).format(sql.Identifier(table)),
                (slide_id, after, batch),
            )
            found = cur.fetchall()
            if not found:
                return 0, after
            ids = np.array([row[0] for row in found], dtype=np.int64)
            geoms = shapely.from_wkb([bytes(row[1]) for row in found])
            values = shape_measurements(geoms, mpp_x, mpp_y)
            assignments = sql.SQL(", ").join(
                sql.SQL("{0} = v.{0}").format(sql.Identifier(name)) for name in MORPHOMETRY
            )
            columns = sql.SQL(", ").join(map(sql.Identifier, MORPHOMETRY))
            arrays = sql.SQL(", ").join(sql.SQL("%s::float8[]") for _ in MORPHOMETRY)
            cur.execute(
                sql.SQL(
                    "UPDATE {} o SET {} FROM unnest(%s::bigint[], {}) AS v(id, {}) "
                    "WHERE o.slide_id = %s AND o.id = v.id"
                ).format(sql.Identifier(table), assignments, arrays, columns),
                (ids.tolist(), *(_nullable(values[name]) for name in MORPHOMETRY), slide_id),
            )
        raw.commit()
        return len(ids), int(ids[-1])
    except BaseException:
        raw.rollback()
        raise
    finally:
        raw.close()


def _nullable(values: np.ndarray) -> list:
    return [None if np.isnan(v) else float(v) for v in values]
