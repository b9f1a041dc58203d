"""Bulk loading of one run of a slide: binary COPY into fresh tables, swapped in at one commit.

Everything happens in one transaction. Each object table gets a staging table created in that
transaction (so COPY can FREEZE and, with wal_level=minimal, skip WAL); objects stream in with
binary COPY; indexes are built after the load; then the slide's old partitions are dropped and
the staging tables attached as its new partitions. A reader sees the old run or the new one,
never a mix, and an interrupted load (exception, SIGKILL, lost server) leaves no rows behind.

    with RunWriter(engine, slide_record, model=model_record) as run:
        run.add("nucleus", polygons, classes, probability)
        result = run.commit()
"""

from __future__ import annotations

import json
import os
import time
import uuid as uuidlib
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from psycopg2 import sql
from sqlalchemy import Engine

from spatialdb.catalog import (
    SLIDE_PARTITIONS,
    ModelRecord,
    SlideRecord,
    upsert_model,
    upsert_slide,
)
from spatialdb.copy_binary import OBJECT_COLUMNS, CopyStream, ObjectRows, encode
from spatialdb.geometry import Prepared, prepare_polygons
from spatialdb.schema import OBJECT_MODELS, OBJECT_TABLES, RUN_KINDS

#: Rows encoded per COPY chunk: large enough to amortise Python, small enough to pipeline.
CHUNK_ROWS = 50_000


@dataclass
class RunResult:
    slide_id: int
    run_id: int
    object_counts: dict[str, dict[str, int]]
    repaired: int
    dropped: int
    timings: dict[str, float] = field(default_factory=dict)

    def total(self, table: str) -> int:
        return sum(self.object_counts.get(table, {}).values())


class RunWriter:
    """One run of one slide, loaded atomically. Use as a context manager; call `commit()`."""

    def __init__(
        self,
        engine: Engine,
        slide: SlideRecord,
        *,
        model: ModelRecord | None = None,
        kind: str = "inference",
        parameters: dict | None = None,
    ):
        if kind not in RUN_KINDS:
            raise ValueError(f"run kind must be one of {RUN_KINDS}, not {kind!r}")
        self.engine = engine
        self.slide = slide
        self.model = model
        self.kind = kind
        self.parameters = parameters or {}
        self.counts: dict[str, Counter] = {t: Counter() for t in OBJECT_TABLES}
        self.repaired = 0
        self.dropped = 0
        self.timings: Counter = Counter()
        self._next_id = dict.fromkeys(OBJECT_TABLES, 1)
        self._raw = None
        self._committed = False

    # -- lifecycle ------------------------------------------------------------------------------

    def __enter__(self) -> RunWriter:
        self._raw = self.engine.raw_connection()
        self._pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 1)
        try:
            self._cursor = self._raw.cursor()
            self._begin()
        except BaseException:
            self._close(rollback=True)
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._close(rollback=not self._committed)

    def _close(self, rollback: bool) -> None:
        if self._raw is None:
            return
        try:
            if rollback:
                self._raw.rollback()
        finally:
            self._pool.shutdown(cancel_futures=True)
            self._raw.close()
            self._raw = None

    def _begin(self) -> None:
        cur = self._cursor
        cur.execute("SET LOCAL maintenance_work_mem = '1GB'")
        self.slide_id = upsert_slide(cur, self.slide)
        model_id = upsert_model(cur, self.model) if self.model else None
        cur.execute(
            "INSERT INTO run (slide_id, model_id, kind, status, parameters) "
            "VALUES (%s, %s, %s, 'complete', %s) RETURNING id",
            (self.slide_id, model_id, self.kind, json.dumps(self.parameters)),
        )
        self.run_id = cur.fetchone()[0]
        self.staging = {t: f"{t}_s{self.slide_id}_r{self.run_id}" for t in OBJECT_TABLES}
        for table, staging in self.staging.items():
            # The CHECK lets ATTACH PARTITION skip its validation scan.
            cur.execute(
                sql.SQL(
                    "CREATE TABLE {staging} (LIKE {table} INCLUDING DEFAULTS, "
                    "CHECK (slide_id = {slide}))"
                ).format(
                    staging=sql.Identifier(staging),
                    table=sql.Identifier(table),
                    slide=sql.Literal(self.slide_id),
                )
            )

    # -- loading --------------------------------------------------------------------------------

    def add(self, table: str, geoms, classes, probability=None, uuids=None) -> int:
        """Load objects of one table: shapely geometries in level-0 pixels, a class per object
        (or one for all), optional probabilities (NaN = unknown) and UUIDs (kept if given).
        Returns how many were stored after repair."""
        if table not in OBJECT_MODELS:
            raise ValueError(f"unknown object table {table!r}; expected one of {OBJECT_TABLES}")
        started = time.perf_counter()
        geoms = np.asarray(geoms, dtype=object)
        n = len(geoms)
        classes = _per_object(classes, n)
        if not all(isinstance(c, str) and c for c in set(classes.tolist())):
            raise ValueError("class names must be non-empty strings")
        probability = (
            np.full(n, np.nan, dtype=np.float32)
            if probability is None
            else _per_object(probability, n).astype(np.float32)
        )
        uuids = _uuid_bytes(uuids, n)
        ids = np.arange(self._next_id[table], self._next_id[table] + n, dtype=np.int64)
        self._next_id[table] += n
        multi = OBJECT_MODELS[table].geometry_type != "POLYGON"

        def encode_chunk(part: slice) -> tuple[bytes, Prepared, dict]:
            prepared = prepare_polygons(geoms[part], multi=multi)
            keep = prepared.source_index
            rows = ObjectRows(
                slide_id=self.slide_id,
                run_id=self.run_id,
                ids=ids[part][keep],
                uuids=uuids[part][keep],
                probability=probability[part][keep],
                classes=classes[part][keep],
                geoms=prepared.geoms,
                mpp_x=self.slide.mpp_x,
                mpp_y=self.slide.mpp_y,
            )
            names, counts = np.unique(rows.classes.astype(str), return_counts=True)
            return encode(rows), prepared, dict(zip(names.tolist(), counts.tolist(), strict=True))

        stored = 0

        def chunks() -> Iterator[bytes]:
            nonlocal stored
            parts = (slice(s, s + CHUNK_ROWS) for s in range(0, n, CHUNK_ROWS))
            for data, prepared, class_counts in _ordered_map(self._pool, encode_chunk, parts):
                self.counts[table].update(class_counts)
                self.repaired += prepared.repaired
                self.dropped += prepared.dropped
                stored += len(prepared.geoms)
                yield data

        columns = sql.SQL(", ").join(map(sql.Identifier, OBJECT_COLUMNS))
        statement = sql.SQL("COPY {} ({}) FROM STDIN WITH (FORMAT binary, FREEZE)").format(
            sql.Identifier(self.staging[table]), columns
        )
        self._cursor.copy_expert(statement, CopyStream(chunks()), size=1 << 20)
        self.timings["copy_s"] += time.perf_counter() - started
        return stored

    # -- commit ---------------------------------------------------------------------------------

    def commit(self, timings: dict[str, float] | None = None) -> RunResult:
        """Index, swap the slide's partitions and commit: the new run becomes current."""
        cur = self._cursor
        started = time.perf_counter()
        for staging in self.staging.values():
            ident = sql.Identifier(staging)
            for statement in (
                "CREATE INDEX ON {} USING gist (geom)",
                "CREATE INDEX ON {} USING gist (centroid)",
                "CREATE INDEX ON {} (slide_id, class)",
                "ALTER TABLE {} ADD PRIMARY KEY (slide_id, id)",
                "ANALYZE {}",
            ):
                cur.execute(sql.SQL(statement).format(ident))
        self.timings["index_s"] += time.perf_counter() - started
        started = time.perf_counter()
        for table, staging in self.staging.items():
            cur.execute(SLIDE_PARTITIONS, {"parent": table, "slide_id": self.slide_id})
            for (old,) in cur.fetchall():
                cur.execute(sql.SQL("DROP TABLE {}").format(sql.SQL(old)))
            cur.execute(
                sql.SQL("ALTER TABLE {} ATTACH PARTITION {} FOR VALUES IN ({})").format(
                    sql.Identifier(table), sql.Identifier(staging), sql.Literal(self.slide_id)
                )
            )
        counts = {t: {k: int(v) for k, v in c.items()} for t, c in self.counts.items()}
        all_timings = {**(timings or {}), **{k: round(v, 4) for k, v in self.timings.items()}}
        all_timings["swap_s"] = round(time.perf_counter() - started, 4)
        cur.execute(
            "UPDATE run SET status = 'superseded' "
            "WHERE slide_id = %s AND id <> %s AND status = 'complete'",
            (self.slide_id, self.run_id),
        )
        cur.execute(
            "UPDATE run SET object_counts = %s, load_report = %s, timings = %s, "
            "finished_at = now() WHERE id = %s",
            (
                json.dumps(counts),
                json.dumps({"repaired": self.repaired, "dropped": self.dropped}),
                json.dumps(all_timings),
                self.run_id,
            ),
        )
        cur.execute(
            "UPDATE slide SET current_run_id = %s, status = 'ready', updated_at = now() "
            "WHERE id = %s",
            (self.run_id, self.slide_id),
        )
        self._raw.commit()
        self._committed = True
        return RunResult(
            self.slide_id, self.run_id, counts, self.repaired, self.dropped, all_timings
        )


def _per_object(values, n: int) -> np.ndarray:
    """One value per object: a scalar is repeated; a sequence must have n items."""
    if np.ndim(values) == 0:
        return np.full(n, values, dtype=object)
    values = np.asarray(values, dtype=object)
    if len(values) != n:
        raise ValueError(f"expected {n} values (one per geometry), got {len(values)}")
    return values


def _ordered_map(pool: ThreadPoolExecutor, fn, items) -> Iterator:
    """fn over items on the pool, results in order, at most a few ahead (bounded memory)."""
    window = (pool._max_workers or 1) + 1
    pending: deque = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _uuid_bytes(uuids, n: int) -> np.ndarray:
    """(n, 16) uint8: the given UUIDs, or random version-4 ones."""
    if uuids is not None:
        given = [uuidlib.UUID(str(u)).bytes for u in _per_object(uuids, n)]
        return np.frombuffer(b"".join(given), dtype=np.uint8).reshape(n, 16)
    raw = np.frombuffer(os.urandom(16 * n), dtype=np.uint8).reshape(n, 16).copy()
    raw[:, 6] = (raw[:, 6] & 0x0F) | 0x40
    raw[:, 8] = (raw[:, 8] & 0x3F) | 0x80
    return raw
