"""Shape measurements for objects stored before they existed (migration 0009).

Each slide's objects are read in id order, measured (`spatialdb.store.morphometry`) and written
back in batches, one transaction per batch: an interrupted backfill keeps what it committed and
a second one carries on where the first stopped. Every read and update of objects names one
slide, so on Citus each runs on the slide's worker alone.
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
    filled = dict.fromkeys(OBJECT_TABLES, 0)
    raw = engine.raw_connection()
    try:
        with raw.cursor() as cur:
            for table in OBJECT_TABLES:
                name = sql.Identifier(table)
                cur.execute(
                    sql.SQL(
                        "SELECT s.id, s.mpp_x, s.mpp_y FROM slide s WHERE EXISTS (SELECT 1 FROM "
                        "{} o WHERE o.slide_id = s.id AND o.equivalent_diameter_um IS NULL) "
                        "ORDER BY s.id"
                    ).format(name)
                )
                for slide_id, mpp_x, mpp_y in cur.fetchall():
                    last = -1
                    while len(rows := _fill_batch(cur, name, slide_id, mpp_x, mpp_y, last, batch)):
                        raw.commit()
                        filled[table] += len(rows)
                        last = int(rows[-1])
                        progress(table, slide_id, len(rows))
        raw.commit()
    except BaseException:
        raw.rollback()
        raise
    finally:
        raw.close()
    return filled


def _fill_batch(cur, table, slide_id, mpp_x, mpp_y, after, batch) -> np.ndarray:
    """Measure and store up to `batch` objects of a slide with ids above `after`; their ids."""
    cur.execute(
        sql.SQL(
            "SELECT id, ST_AsBinary(geom) FROM {} WHERE slide_id = %s AND id > %s "
            "AND equivalent_diameter_um IS NULL ORDER BY id LIMIT %s"
        ).format(table),
        (slide_id, after, batch),
    )
    found = cur.fetchall()
    ids = np.array([row[0] for row in found], dtype=np.int64)
    if not found:
        return ids
    values = shape_measurements(shapely.from_wkb([bytes(row[1]) for row in found]), mpp_x, mpp_y)
    assignments = sql.SQL(", ").join(
        sql.SQL("{0} = v.{0}").format(sql.Identifier(name)) for name in MORPHOMETRY
    )
    columns = sql.SQL(", ").join(map(sql.Identifier, MORPHOMETRY))
    arrays = sql.SQL(", ").join(sql.SQL("%s::float8[]") for _ in MORPHOMETRY)
    cur.execute(
        sql.SQL(
            "UPDATE {} o SET {} FROM unnest(%s::bigint[], {}) AS v(id, {}) "
            "WHERE o.slide_id = %s AND o.id = v.id"
        ).format(table, assignments, arrays, columns),
        (ids.tolist(), *(_nullable(values[name]) for name in MORPHOMETRY), slide_id),
    )
    return ids


def _nullable(values: np.ndarray) -> list:
    return [None if np.isnan(v) else float(v) for v in values]
