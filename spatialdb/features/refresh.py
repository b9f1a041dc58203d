"""Gland–nuclei features: refreshing a slide's feature tables from its current objects.

The features themselves are SQL (`migrations/sql/0002_features.sql`, with the current bodies of
`gland_features()` and `slide_features()` in `0006_faster_features.sql`): `gland_features()`,
`slide_features()` and `nucleus_features()`. A refresh holds the slide's row lock (so no run of
that slide is committed meanwhile), lets `lanes` connections compute a share of the glands each
(its own connection inserts the first share while the others are computed), and writes all rows
in one transaction: readers see the old features or the new ones. The slide's spatial statistics
(`slide_spatial_feature`, `spatialdb.features.spatial`) are computed from its nuclei, glands and
tissue in compiled spatial indexes (k-d tree, GEOS) and written in the same transaction, as are
its nuclei counted per class in a pyramid of cells (`nucleus_density`, the slide viewer's low
zooms).

    seconds = refresh(engine, slide_id)
"""

from __future__ import annotations

import io
import json
import time
from concurrent.futures import ThreadPoolExecutor

from psycopg2 import sql
from sqlalchemy import Engine

from spatialdb.errors import UserError
from spatialdb.store.db import rollback_or_discard
from spatialdb.store.loader import default_lanes
from spatialdb.store.schema import DENSITY_CELL_PX, DENSITY_TOP_CELLS

BINARY = "WITH (FORMAT binary)"
#: The current run's nuclei counted per class and level-0 cell (the centroid index's leaves hold
#: both), then each level from the one below, until a level's cells cover the slide in
#: DENSITY_TOP_CELLS across.
DENSITY_CELLS = """
INSERT INTO nucleus_density (slide_id, level, gx, gy, class, run_id, n)
SELECT s.id, 0, floor(ST_X(n.centroid) / %(cell)s)::integer,
       floor(ST_Y(n.centroid) / %(cell)s)::integer, n.class, s.current_run_id, count(*)
FROM slide s JOIN nucleus n ON n.slide_id = s.id AND n.run_id = s.current_run_id
WHERE s.id = %(slide)s AND n.slide_id = %(slide)s  -- both: one shard's query on Citus
GROUP BY 1, 2, 3, 4, 5, 6
"""
DENSITY_LEVEL = """
INSERT INTO nucleus_density (slide_id, level, gx, gy, class, run_id, n)
SELECT slide_id, level + 1, gx / 2, gy / 2, class, run_id, sum(n)
FROM nucleus_density WHERE slide_id = %(slide)s AND level = %(level)s
GROUP BY 1, 2, 3, 4, 5, 6
"""
COPY_IN = "COPY {} FROM STDIN " + BINARY


def refresh(engine: Engine, slide_id: int, lanes: int | None = None) -> float:
    """Recompute one slide's gland and slide features; the seconds it took."""
    started = time.perf_counter()
    lanes = lanes or default_lanes()
    raw = engine.raw_connection()
    try:
        cur = raw.cursor()
        cur.execute("SELECT current_run_id FROM slide WHERE id = %s FOR UPDATE", (slide_id,))
        if cur.fetchone() is None:
            raise UserError(f"no slide with id {slide_id}")
        cur.execute("DELETE FROM slide_spatial_feature WHERE slide_id = %s", (slide_id,))
        cur.execute(
            "INSERT INTO slide_spatial_feature (slide_id, run_id, statistics) "
            "SELECT id, current_run_id, %s FROM slide WHERE id = %s",
            (json.dumps(spatial_row(cur, slide_id)), slide_id),
        )
        nucleus_density(cur, slide_id)
        if lanes == 1:
            cur.execute("SELECT refresh_slide_features(%s)", (slide_id,))
        else:
            # Lane 0 is inserted by this connection while the others compute theirs.
            with ThreadPoolExecutor(lanes - 1) as pool:
                others = [
                    pool.submit(_gland_rows, engine, slide_id, k, lanes) for k in range(1, lanes)
                ]
                cur.execute("DELETE FROM gland_feature WHERE slide_id = %s", (slide_id,))
                cur.execute("DELETE FROM slide_feature WHERE slide_id = %s", (slide_id,))
                cur.execute(
                    "INSERT INTO gland_feature SELECT * FROM gland_features(%s, 0, %s)",
                    (slide_id, lanes),
                )
                for rows in others:
                    cur.copy_expert(COPY_IN.format("gland_feature"), rows.result())
            # Out and back in rather than INSERT … SELECT: a query that feeds an INSERT never
            # runs in parallel, while this one counts the slide's objects with parallel workers.
            row = _copy_out(cur, "SELECT * FROM slide_features(%s)", (slide_id,))
            cur.copy_expert(COPY_IN.format("slide_feature"), row)
        raw.commit()
    except BaseException:
        rollback_or_discard(raw)
        raise
    finally:
        raw.close()
    return time.perf_counter() - started


def nucleus_density(cursor, slide_id: int) -> None:
    """The slide's `nucleus_density` pyramid, anew."""
    cursor.execute("DELETE FROM nucleus_density WHERE slide_id = %s", (slide_id,))
    cursor.execute(DENSITY_CELLS, {"slide": slide_id, "cell": DENSITY_CELL_PX})
    cursor.execute("SELECT greatest(width, height) FROM slide WHERE id = %s", (slide_id,))
    (side,) = cursor.fetchone()
    level = 0
    while DENSITY_CELL_PX * 2**level * DENSITY_TOP_CELLS < side:
        cursor.execute(DENSITY_LEVEL, {"slide": slide_id, "level": level})
        level += 1


def spatial_row(cursor, slide_id: int) -> dict:
    """The slide's spatial statistics, from its nuclei (with their nearest-neighbour distance
    and neighbours within 25 µm), glands and tissue regions in µm."""
    import numpy as np
    import shapely

    from spatialdb.features.neighbourhood import count_within, nearest_distance
    from spatialdb.features.nuclei import MEASURED, read_nuclei
    from spatialdb.features.spatial import spatial_statistics

    nuclei = read_nuclei(cursor, slide_id)
    points = nuclei[["x_um", "y_um"]].to_numpy(dtype=float).reshape(-1, 2)
    features = {name: nuclei[name].to_numpy(dtype=float) for name in MEASURED}
    features["neighbours_within_25_um"] = count_within(points, 25.0)
    features["nearest_1_distance_um"] = nearest_distance(points)

    def polygons(table: str) -> np.ndarray:
        cursor.execute(
            sql.SQL(
                "SELECT ST_AsBinary(ST_Scale(o.geom, s.mpp_x, s.mpp_y)) FROM {} o "
                "JOIN slide s ON s.id = o.slide_id WHERE o.slide_id = %s"
            ).format(sql.Identifier(table)),
            (slide_id,),
        )
        return shapely.from_wkb([bytes(row[0]) for row in cursor.fetchall()])

    return spatial_statistics(
        points,
        nuclei["class"].astype(object).to_numpy(),
        polygons("gland"),
        polygons("tissue_region"),
        features,
    )


def _gland_rows(engine: Engine, slide_id: int, lane: int, lanes: int) -> io.BytesIO:
    """One lane's share of the slide's gland_feature rows, as binary COPY data."""
    raw = engine.raw_connection()
    try:
        return _copy_out(
            raw.cursor(), "SELECT * FROM gland_features(%s, %s, %s)", (slide_id, lane, lanes)
        )
    finally:
        rollback_or_discard(raw)
        raw.close()


def _copy_out(cur, query: str, params: tuple) -> io.BytesIO:
    """A query's rows as binary COPY data."""
    rows = io.BytesIO()
    cur.copy_expert(f"COPY ({cur.mogrify(query, params).decode()}) TO STDOUT {BINARY}", rows)
    rows.seek(0)
    return rows
