"""What the dashboard reads, through a connection that cannot write.

Every connection takes the `spatialdb_reader` role (SELECT only, created by migration 0004) and
read-only transactions; where the role is missing (a server on which it could not be created),
read-only transactions alone. Every filter is a bound parameter.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pandas as pd
import psycopg2
from sqlalchemy import Engine, event, text
from sqlalchemy.exc import DBAPIError

from spatialdb.interop.qupath_geojson import default_colour
from spatialdb.store.db import lost_database, make_engine

READER_ROLE = "spatialdb_reader"
TABLES = ("nucleus", "gland", "lumen", "tissue_region")

COHORT = """
SELECT DISTINCT ON (s.id) s.id, s.name, s.status, r.kind AS run_kind, m.name AS model,
       (SELECT coalesce(sum(v::text::bigint), 0) FROM jsonb_each(r.object_counts -> 'nucleus') e(k, v)) AS nuclei,
       (SELECT coalesce(sum(v::text::bigint), 0) FROM jsonb_each(r.object_counts -> 'gland') e(k, v)) AS glands,
       (SELECT coalesce(sum(v::text::bigint), 0) FROM jsonb_each(r.object_counts -> 'lumen') e(k, v)) AS lumina,
       f.run_id IS NOT NULL AND f.run_id = s.current_run_id AS features,
       f.gland_area_fraction, f.nuclei_per_1000um2_in_glands, f.nuclei_per_1000um2_in_stroma,
       f.gland_feature_quantiles -> 'area_um2' ->> 'q50' AS median_gland_area_um2,
       p.target || ': ' || coalesce(p.label || ' (p = ' || round(p.value::numeric, 2) || ')',
                                    round(p.value::numeric, 3)::text) AS prediction,
       s.width, s.height, s.mpp_x, s.file_path, s.current_run_id AS run_id, r.finished_at
FROM slide s
LEFT JOIN run r ON r.id = s.current_run_id
LEFT JOIN model m ON m.id = r.model_id
LEFT JOIN slide_feature f ON f.slide_id = s.id
-- Each slide's latest prediction (DISTINCT ON): Citus refuses a correlated subquery here.
LEFT JOIN slide_prediction p ON p.slide_id = s.id
ORDER BY s.id, p.created_at DESC
"""  # noqa: E501
#: The layer queries read one run (the one the view shows), so that layers fetched on separate
#: connections can be checked to come from the same run (see `dashboard.overlay.render`).
#: Objects whose box meets the view (GiST on geom: `&&` box pre-filter), simplified for drawing
#: (Douglas-Peucker, keeping shapes that would collapse).
OBJECTS_IN_VIEW = """
SELECT class, ST_AsBinary(ST_Simplify(geom, :tolerance, true)) AS wkb
FROM {table}
WHERE slide_id = :slide AND run_id = :run AND geom && ST_MakeEnvelope(:x0, :y0, :x1, :y1, 0)
LIMIT :limit
"""
#: How many objects have their centroid in the view, counting no further than :limit.
COUNT_IN_VIEW = """
SELECT count(*) FROM (
    SELECT 1 FROM {table}
    WHERE slide_id = :slide AND run_id = :run AND centroid && ST_MakeEnvelope(:x0, :y0, :x1, :y1, 0)
    LIMIT :limit
) AS found
"""
#: Stored centroids counted per grid cell and class: the aggregate drawn when detail is too much.
CENTROID_GRID = """
SELECT floor(ST_X(centroid) / :cell)::integer AS gx, floor(ST_Y(centroid) / :cell)::integer AS gy,
       count(*) AS n
FROM {table}
WHERE slide_id = :slide AND run_id = :run AND centroid && ST_MakeEnvelope(:x0, :y0, :x1, :y1, 0)
GROUP BY 1, 2
"""


class Unavailable(Exception):
    """The database cannot be reached or read."""


@dataclass(frozen=True)
class Box:
    """A region of the slide in level-0 pixels."""

    x0: float
    y0: float
    x1: float
    y1: float

    @property
    def width(self) -> float:
        return self.x1 - self.x0

    @property
    def height(self) -> float:
        return self.y1 - self.y0


class Reader:
    """Read-only access to one spatialdb database."""

    def __init__(self, url: str):
        self.engine: Engine = make_engine(url)
        self.mode = "role"
        event.listen(self.engine, "connect", self._read_only)
        try:
            with self.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except DBAPIError as exc:
            self.engine.dispose()
            raise _unavailable(exc) from None

    @classmethod
    def from_url(cls, url: str | None) -> Reader:
        if not url:
            raise Unavailable("no database URL: start the dashboard with `spatialdb dashboard`")
        return cls(url)

    def _read_only(self, dbapi_connection, _record) -> None:
        cursor = dbapi_connection.cursor()
        # Citus runs a query's tasks on the workers as the current role, and the reader role
        # cannot log in: there, read-only transactions only.
        cursor.execute("SELECT EXISTS (SELECT FROM pg_extension WHERE extname = 'citus')")
        if cursor.fetchone()[0]:
            self.mode = "read-only transactions"
        else:
            try:
                cursor.execute(f"SET ROLE {READER_ROLE}")
            except Exception:  # the role is missing or not granted: read-only transactions only
                dbapi_connection.rollback()
                self.mode = "read-only transactions"
        cursor.execute("SET default_transaction_read_only = on")
        cursor.close()
        dbapi_connection.commit()

    def frame(self, query: str, **params) -> pd.DataFrame:
        try:
            with self.engine.connect() as conn:
                return pd.read_sql(text(query), conn, params=params)
        except (DBAPIError, pd.errors.DatabaseError) as exc:
            raise _unavailable(exc) from None

    def cohort(self) -> pd.DataFrame:
        return self.frame(COHORT)

    def colours(self) -> dict[str, tuple[int, int, int]]:
        frame = self.frame("SELECT name, color FROM object_class")
        return {row.name: tuple(row.color) for row in frame.itertuples()}

    def colour(self, name: str, known: dict) -> tuple[int, int, int]:
        return known.get(name) or default_colour(name)

    def current_run(self, slide_id: int) -> int | None:
        """The slide's current run now."""
        frame = self.frame("SELECT current_run_id FROM slide WHERE id = :slide", slide=slide_id)
        return None if frame.empty or pd.isna(frame.iloc[0, 0]) else int(frame.iloc[0, 0])

    def count_in(self, table: str, slide_id: int, run_id: int, box: Box, limit: int) -> int:
        """Objects of `table` in run `run_id` with their centroid in `box`, or `limit` if there
        are more."""
        assert table in TABLES
        query = COUNT_IN_VIEW.format(table=table)
        frame = self.frame(query, slide=slide_id, run=run_id, limit=limit, **_box(box))
        return int(frame.iloc[0, 0])

    def objects_in(
        self, table: str, slide_id: int, run_id: int, box: Box, tolerance: float, limit: int
    ):
        """(classes, WKB) of up to `limit` objects of `table` in run `run_id` meeting `box`,
        simplified to `tolerance` px (through the DBAPI cursor: no per-row conversions)."""
        assert table in TABLES
        query = OBJECTS_IN_VIEW.format(table=table).replace(":tolerance", "%(tolerance)s")
        for name in ("slide", "run", "limit", "x0", "y0", "x1", "y1"):
            query = query.replace(f":{name}", f"%({name})s")
        params = {
            "slide": slide_id,
            "run": run_id,
            "tolerance": tolerance,
            "limit": limit,
            **_box(box),
        }
        with self.cursor() as cur:
            cur.execute(query, params)
            rows = cur.fetchall()
        return [r[0] for r in rows], [bytes(r[1]) for r in rows]

    @contextmanager
    def cursor(self) -> Iterator:
        """A DBAPI cursor on a pooled read-only connection (no per-row conversions); a failed
        read raises `Unavailable`."""
        try:
            raw = self.engine.raw_connection()
        except DBAPIError as exc:
            raise _unavailable(exc) from None
        try:
            with raw.cursor() as cur:
                yield cur
            raw.rollback()
        except psycopg2.Error as exc:  # the cursor is the driver's, not SQLAlchemy's
            raise _unavailable(exc) from None
        finally:
            raw.close()

    def centroid_grid(
        self, table: str, slide_id: int, run_id: int, box: Box, cell: float
    ) -> pd.DataFrame:
        assert table in TABLES
        query = CENTROID_GRID.format(table=table)
        return self.frame(query, slide=slide_id, run=run_id, cell=cell, **_box(box))

    def gland_features(self, slide_ids: list[int]) -> pd.DataFrame:
        return self.frame(
            "SELECT s.name AS slide, f.* FROM gland_feature f JOIN slide s ON s.id = f.slide_id "
            "WHERE f.slide_id = ANY(:ids) ORDER BY f.slide_id, f.gland_id",
            ids=list(slide_ids),
        )

    def spatial_features(self, slide_ids: list[int]) -> pd.DataFrame:
        return self.frame(
            "SELECT s.name AS slide, f.statistics FROM slide_spatial_feature f "
            "JOIN slide s ON s.id = f.slide_id WHERE f.slide_id = ANY(:ids) ORDER BY f.slide_id",
            ids=list(slide_ids),
        )

    def slide_features(self, slide_ids: list[int]) -> pd.DataFrame:
        return self.frame(
            "SELECT s.name AS slide, f.* FROM slide_feature f JOIN slide s ON s.id = f.slide_id "
            "WHERE f.slide_id = ANY(:ids) ORDER BY f.slide_id",
            ids=list(slide_ids),
        )


def _box(box: Box) -> dict:
    return {"x0": box.x0, "y0": box.y0, "x1": box.x1, "y1": box.y1}


def _unavailable(exc: BaseException) -> Unavailable:
    """One line for a failed read: which connection was lost (a Citus worker's or the database's),
    else the database's message."""
    if isinstance(exc, pd.errors.DatabaseError) and exc.__cause__ is not None:
        exc = exc.__cause__  # pandas wraps SQLAlchemy's error
    return Unavailable(lost_database(exc) or _first_line(exc))


def _first_line(exc: BaseException) -> str:
    message = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return message[0] if message else type(exc).__name__
