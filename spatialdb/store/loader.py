"""Bulk loading of one run of a slide: parallel binary COPY into fresh tables, swapped in at once.

Each object table of the slide is loaded through `lanes` database connections at once (one per
core by default). Lane k writes its own leaf table, numbering its objects from
k * LANE_ID_BLOCK + 1, with binary COPY (FREEZE; with wal_level=minimal no WAL), then builds its
indexes and runs ANALYZE, all in parallel. At commit, the coordinating connection (lane 0) gathers
the leaves under one range-partitioned table per object table, drops the slide's old partitions
and attaches the new ones, marks the run current and commits: readers see the old run or the new
one, never a mix. A one-lane load attaches its single leaf as the slide's partition itself.

Where the object tables are not partitioned (a Citus coordinator after `db upgrade --citus`:
spatialdb/sql/citus.sql), a load takes one lane and writes in place: its transaction deletes the
slide's objects, copies the new ones into the tables themselves and, at commit, writes the slide
and run rows; readers see the old run or the new one, as above. A load of many objects then
ANALYZEs the tables it wrote (`ANALYZE_IN_PLACE_FROM`), so the refresh that follows is planned on
them.

Lane 0's leaves live inside the coordinating transaction. The other lanes' leaves are committed
just before the swap; if the process dies in that window they are orphans no reader can see
(not attached), and `sweep_orphans`, run by every writer before it starts, drops them once the
coordinator's transaction-level advisory lock shows it is gone.

The swap also deletes the slide's feature rows, which describe the old run;
`spatialdb.features.refresh` computes the new ones.

    with RunWriter(engine, slide_record, model=model_record) as run:
        run.add("nucleus", polygons, classes, probability)
        result = run.commit()
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid as uuidlib
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

import numpy as np
import pandas as pd
import psycopg2
from psycopg2 import sql
from sqlalchemy import Engine

from spatialdb.store.catalog import (
    SLIDE_PARTITIONS,
    ModelRecord,
    SlideRecord,
    upsert_model,
    upsert_slide,
)
from spatialdb.store.copy_binary import CopyStream, ObjectRows, copy_columns, encode
from spatialdb.store.db import rollback_or_discard
from spatialdb.store.geometry import Prepared, prepare_polygons
from spatialdb.store.schema import (
    CENTROID_INDEX_INCLUDE,
    FEATURE_TABLES,
    OBJECT_MODELS,
    OBJECT_TABLES,
    OPTIONAL_MEASUREMENTS,
    RUN_KINDS,
)

#: Rows encoded per COPY chunk: large enough to amortise Python, small enough to pipeline.
CHUNK_ROWS = 50_000
#: Lane k numbers its objects k * LANE_ID_BLOCK + 1, + 2, ...
LANE_ID_BLOCK = 1_000_000_000
#: Advisory-lock class held by a loading transaction on its run id.
LOADER_LOCK = 72_617_002
#: Advisory-lock classes: on a slide file's path while it loads, and on 0 while a run is swapped in.
SLIDE_LOCK = 72_617_003
SWAP_LOCK = 72_617_004
#: In place (Citus), a load of at least this many objects ANALYZEs every table it wrote, after the
#: commit: planned on statistics from before a 1,000,000-nucleus slide (its glands' included), the
#: feature refresh that follows the load ran for minutes instead of 2 s (benchmarks/citus.py).
#: Smaller loads leave it to autovacuum, as ANALYZE on Citus samples every shard of a table.
ANALYZE_IN_PLACE_FROM = 50_000
#: A table's columns as DDL, from the catalog (which, unlike LIKE, locks nothing).
COLUMNS_DDL = """
SELECT string_agg(format('%%I %%s%%s', attname, format_type(atttypid, atttypmod),
                         CASE WHEN attnotnull THEN ' NOT NULL' ELSE '' END), ', ' ORDER BY attnum)
FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped
"""
_LEAF_NAME = re.compile(rf"^(?:{'|'.join(OBJECT_TABLES)})_s\d+_r(\d+)_l\d+$")

INDEX_STATEMENTS = (
    "CREATE INDEX ON {} USING gist (geom)",
    f"CREATE INDEX ON {{}} USING gist (centroid) INCLUDE ({', '.join(CENTROID_INDEX_INCLUDE)})",
    "CREATE INDEX ON {} (slide_id, class)",
    "ALTER TABLE {} ADD PRIMARY KEY (slide_id, id)",
    "ANALYZE {}",
)


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


def default_lanes() -> int:
    return max(1, min(4, os.cpu_count() or 1))


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
        lanes: int | None = None,
    ):
        if kind not in RUN_KINDS:
            raise ValueError(f"run kind must be one of {RUN_KINDS}, not {kind!r}")
        self.engine = engine
        self.slide = slide
        self.model = model
        self.kind = kind
        self.parameters = parameters or {}
        self.n_lanes = lanes or default_lanes()
        self.counts: dict[str, Counter] = {t: Counter() for t in OBJECT_TABLES}
        self.repaired = 0
        self.dropped = 0
        self.timings: Counter = Counter()
        self._in_place = False
        self._conns: list = []
        self._committed_leaves: list[str] = []
        self._committed = False

    # -- lifecycle ------------------------------------------------------------------------------

    def __enter__(self) -> RunWriter:
        self._pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 1)
        self._lane_pool = ThreadPoolExecutor(max_workers=self.n_lanes)
        try:
            self._conns = [self.engine.raw_connection()]
            self._in_place = not objects_partitioned(self._conns[0].cursor())
            if self._in_place:
                self.n_lanes = 1
            self._conns += [self.engine.raw_connection() for _ in range(1, self.n_lanes)]
            self._cursors = [conn.cursor() for conn in self._conns]
            self._next_id = {
                t: [k * LANE_ID_BLOCK + 1 for k in range(self.n_lanes)] for t in OBJECT_TABLES
            }
            self._next_lane = dict.fromkeys(OBJECT_TABLES, 0)
            sweep_orphans(self._cursors[0])
            # Committed at once: a model row locked until the run commits would make concurrent
            # loaders of the same model (`ingest --scheduler`) wait for each other.
            self._model_id = upsert_model(self._cursors[0], self.model) if self.model else None
            self._conns[0].commit()
            self._begin()
        except BaseException:
            self._close(rollback=True)
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._close(rollback=not self._committed)

    def _close(self, rollback: bool) -> None:
        self._pool.shutdown(cancel_futures=True)
        self._lane_pool.shutdown(cancel_futures=True)
        try:
            if rollback:
                for conn in self._conns:
                    rollback_or_discard(conn)
                if self._committed_leaves and self._conns[0].is_valid:
                    self._drop_committed_leaves()
        finally:
            for conn in self._conns:
                conn.close()
            self._conns = []

    def _drop_committed_leaves(self) -> None:
        """Lanes committed, the swap did not: drop their leaves now, or leave them to the next
        writer's sweep if the connection is gone too (a failed commit can leave it looking
        valid until it is used)."""
        try:
            cur = self._conns[0].cursor()
            for leaf in self._committed_leaves:
                cur.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(leaf)))
            self._conns[0].commit()
        except psycopg2.Error:
            self._conns[0].invalidate()

    def _begin(self) -> None:
        # Until the swap, a load writes no row of slide or run and locks no shared table: the
        # foreign keys that ATTACH PARTITION adds lock slide and run against writers, so rows held
        # through a load would stall (or deadlock) the swaps of concurrent loaders. The ids are
        # reserved instead, and a lock on the file path keeps two loads of one slide apart.
        cur = self._cursors[0]
        cur.execute(
            "SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (SLIDE_LOCK, self.slide.file_path)
        )
        cur.execute(
            "SELECT coalesce((SELECT id FROM slide WHERE file_path = %s), "
            "nextval(pg_get_serial_sequence('slide', 'id'))), "
            "nextval(pg_get_serial_sequence('run', 'id'))",
            (self.slide.file_path,),
        )
        self.slide_id, self.run_id = cur.fetchone()
        cur.execute("SELECT pg_advisory_xact_lock(%s, %s)", (LOADER_LOCK, self.run_id))
        columns = {}
        for table in OBJECT_TABLES:
            cur.execute(COLUMNS_DDL, (table,))
            columns[table] = cur.fetchone()[0]
        if self._in_place:
            self.leaves = {t: [t] for t in OBJECT_TABLES}
            for table in OBJECT_TABLES:  # the old run's objects (their ids would collide)
                cur.execute(
                    sql.SQL("DELETE FROM {} WHERE slide_id = %s").format(sql.Identifier(table)),
                    (self.slide_id,),
                )
            return
        self.partition = {t: f"{t}_s{self.slide_id}_r{self.run_id}" for t in OBJECT_TABLES}
        self.leaves = {
            t: [f"{p}_l{k}" for k in range(self.n_lanes)] for t, p in self.partition.items()
        }
        for k, lane in enumerate(self._cursors):
            lane.execute("SET maintenance_work_mem = '1GB'")
            for table, leaves in self.leaves.items():
                # The CHECKs imply the partition bounds, so ATTACH PARTITION skips its scans.
                lane.execute(
                    sql.SQL(
                        "CREATE TABLE {leaf} ({columns}, "
                        "CHECK (slide_id = {slide}), CHECK (id >= {low} AND id < {high}))"
                    ).format(
                        leaf=sql.Identifier(leaves[k]),
                        columns=sql.SQL(columns[table]),
                        slide=sql.Literal(self.slide_id),
                        low=sql.Literal(k * LANE_ID_BLOCK + 1),
                        high=sql.Literal((k + 1) * LANE_ID_BLOCK + 1),
                    )
                )

    # -- loading --------------------------------------------------------------------------------

    def add(
        self, table: str, geoms, classes, probability=None, uuids=None, measurements=None
    ) -> int:
        """Load objects of one table: shapely geometries in level-0 pixels, a class per object
        (or one for all), optional probabilities (NaN = unknown), UUIDs (kept if given) and
        measurements of the table's optional columns (`OPTIONAL_MEASUREMENTS`; name -> values,
        NaN = unknown). Returns how many were stored after repair."""
        if table not in OBJECT_MODELS:
            raise ValueError(f"unknown object table {table!r}; expected one of {OBJECT_TABLES}")
        measurements = dict(measurements or {})
        unknown = set(measurements) - set(OPTIONAL_MEASUREMENTS.get(table, ()))
        if unknown:
            raise ValueError(f"{table} has no measurement columns {sorted(unknown)}")
        started = time.perf_counter()
        geoms = np.asarray(geoms, dtype=object)
        n = len(geoms)
        class_codes, class_names = pd.factorize(_per_object(classes, n))
        class_names = class_names.tolist()
        if not all(isinstance(c, str) and c for c in class_names) or (class_codes < 0).any():
            raise ValueError("class names must be non-empty strings")
        probability = (
            np.full(n, np.nan, dtype=np.float32)
            if probability is None
            else _per_object(probability, n).astype(np.float32)
        )
        uuids = _uuid_bytes(uuids, n)
        measurements = {k: np.asarray(v, dtype=np.float64) for k, v in measurements.items()}
        if any(len(v) != n for v in measurements.values()):
            raise ValueError("measurements need one value per object")
        multi = OBJECT_MODELS[table].geometry_type != "POLYGON"

        # Chunks go to the lanes in turn; each lane numbers its objects in its own id block.
        lane_chunks: list[list[tuple[slice, int]]] = [[] for _ in range(self.n_lanes)]
        for start in range(0, n, CHUNK_ROWS):
            part = slice(start, min(start + CHUNK_ROWS, n))
            lane = self._next_lane[table]
            lane_chunks[lane].append((part, self._next_id[table][lane]))
            self._next_id[table][lane] += part.stop - part.start
            self._next_lane[table] = (lane + 1) % self.n_lanes

        def encode_chunk(item: tuple[slice, int]) -> tuple[bytes, Prepared, Counter]:
            part, first_id = item
            rows = ObjectRows(
                slide_id=self.slide_id,
                run_id=self.run_id,
                ids=first_id + np.arange(part.stop - part.start, dtype=np.int64),
                uuids=uuids[part],
                probability=probability[part],
                class_codes=class_codes[part],
                class_names=class_names,
                geoms=geoms[part],
                mpp_x=self.slide.mpp_x,
                mpp_y=self.slide.mpp_y,
                extra={k: v[part] for k, v in measurements.items()},
            )
            # Shapes proven valid cheaply are encoded at once; GEOS checks and repairs the rest.
            if multi:  # every shape becomes a multipolygon through the checked path
                proven, left_out = b"", np.arange(len(rows.ids))
            else:
                proven, left_out = encode(rows, prove_validity=True)
            unchecked = rows.take(left_out)
            prepared = prepare_polygons(unchecked.geoms, multi=multi)
            rest = replace(unchecked.take(prepared.source_index), geoms=prepared.geoms)
            checked, _ = encode(rest)
            n_classes = len(class_names)
            counts = (
                np.bincount(rows.class_codes, minlength=n_classes)
                - np.bincount(unchecked.class_codes, minlength=n_classes)
                + np.bincount(rest.class_codes, minlength=n_classes)
            )
            stored = Counter({c: int(k) for c, k in zip(class_names, counts, strict=True) if k})
            return proven + checked, prepared, stored

        columns = sql.SQL(", ").join(map(sql.Identifier, copy_columns(measurements)))
        reports: list[tuple[Prepared, Counter]] = []

        def copy_lane(k: int) -> None:
            def chunks() -> Iterator[bytes]:
                for data, prepared, class_counts in _ordered_map(
                    self._pool, encode_chunk, lane_chunks[k]
                ):
                    reports.append((prepared, class_counts))
                    yield data

            statement = sql.SQL("COPY {} ({}) FROM STDIN WITH (FORMAT binary{})").format(
                sql.Identifier(self.leaves[table][k]),
                columns,
                sql.SQL("" if self._in_place else ", FREEZE"),  # FREEZE: tables of this load
            )
            self._cursors[k].copy_expert(statement, CopyStream(chunks()), size=1 << 20)

        self._on_lanes(copy_lane, [k for k in range(self.n_lanes) if lane_chunks[k]])
        stored = 0
        for prepared, class_counts in reports:
            self.counts[table].update(class_counts)
            self.repaired += prepared.repaired
            self.dropped += prepared.dropped
            stored += sum(class_counts.values())
        self.timings["copy_s"] += time.perf_counter() - started
        return stored

    def _on_lanes(self, fn, lanes: list[int]) -> None:
        """fn(k) for each lane at once (one connection each); re-raises the first failure."""
        for future in [self._lane_pool.submit(fn, k) for k in lanes]:
            future.result()

    # -- commit ---------------------------------------------------------------------------------

    def commit(self, timings: dict[str, float] | None = None) -> RunResult:
        """Index, swap the slide's partitions and commit: the new run becomes current."""
        started = time.perf_counter()

        def index_lane(k: int) -> None:
            for leaves in self.leaves.values():
                for statement in INDEX_STATEMENTS:
                    self._cursors[k].execute(sql.SQL(statement).format(sql.Identifier(leaves[k])))

        if not self._in_place:  # in place, the tables' own indexes are kept up to date
            self._on_lanes(index_lane, list(range(self.n_lanes)))
        for k in range(1, self.n_lanes):
            self._committed_leaves += [leaves[k] for leaves in self.leaves.values()]
            self._conns[k].commit()
        self.timings["index_s"] += time.perf_counter() - started

        started = time.perf_counter()
        cur = self._cursors[0]
        cur.execute("SELECT pg_advisory_xact_lock(%s, 0)", (SWAP_LOCK,))  # one swap at a time
        if upsert_slide(cur, self.slide, self.slide_id) != self.slide_id:
            raise RuntimeError(f"{self.slide.file_path} was registered meanwhile; load it again")
        cur.execute(
            "INSERT INTO run (id, slide_id, model_id, kind, status, parameters) "
            "VALUES (%s, %s, %s, %s, 'complete', %s)",
            (self.run_id, self.slide_id, self._model_id, self.kind, json.dumps(self.parameters)),
        )
        if not self._in_place:
            for table, partition in self.partition.items():
                self._assemble(cur, table, partition)
        counts = {t: {k: int(v) for k, v in c.items()} for t, c in self.counts.items()}
        all_timings = {**(timings or {}), **{k: round(v, 4) for k, v in self.timings.items()}}
        all_timings["swap_s"] = round(time.perf_counter() - started, 4)
        for table in FEATURE_TABLES:  # they describe the old run; `features.refresh` redoes them
            cur.execute(
                sql.SQL("DELETE FROM {} WHERE slide_id = %s").format(sql.Identifier(table)),
                (self.slide_id,),
            )
        cur.execute(
            "UPDATE run SET status = 'superseded' "
            "WHERE slide_id = %s AND id <> %s AND status = 'complete'",
            (self.slide_id, self.run_id),
        )
        cur.execute(
            "UPDATE run SET object_counts = %s, load_report = %s, timings = %s, "
            "finished_at = %s WHERE id = %s",  # Citus refuses volatile clock_timestamp() here
            (
                json.dumps(counts),
                json.dumps({"repaired": self.repaired, "dropped": self.dropped}),
                json.dumps(all_timings),
                datetime.now(UTC),
                self.run_id,
            ),
        )
        cur.execute(
            "UPDATE slide SET current_run_id = %s, status = 'ready', updated_at = now() "
            "WHERE id = %s",
            (self.run_id, self.slide_id),
        )
        self._conns[0].commit()
        self._committed = True
        if self._in_place and sum(c.total() for c in self.counts.values()) >= ANALYZE_IN_PLACE_FROM:
            for table in (t for t, classes in self.counts.items() if classes.total()):
                cur.execute(sql.SQL("ANALYZE {}").format(sql.Identifier(table)))
            self._conns[0].commit()
        return RunResult(
            self.slide_id, self.run_id, counts, self.repaired, self.dropped, all_timings
        )

    def _assemble(self, cur, table: str, partition: str) -> None:
        """The lanes' leaves under one table (a lone leaf as it is), swapped in as the slide's
        partition."""
        leaves = self.leaves[table]
        if len(leaves) == 1:
            (partition,) = leaves
        else:
            cur.execute(
                sql.SQL(
                    "CREATE TABLE {} (LIKE {} INCLUDING DEFAULTS) PARTITION BY RANGE (id)"
                ).format(sql.Identifier(partition), sql.Identifier(table))
            )
            for k, leaf in enumerate(leaves):
                cur.execute(
                    sql.SQL(
                        "ALTER TABLE {} ATTACH PARTITION {} FOR VALUES FROM ({}) TO ({})"
                    ).format(
                        sql.Identifier(partition),
                        sql.Identifier(leaf),
                        sql.Literal(k * LANE_ID_BLOCK + 1),
                        sql.Literal((k + 1) * LANE_ID_BLOCK + 1),
                    )
                )
        cur.execute(SLIDE_PARTITIONS, {"parent": table, "slide_id": self.slide_id})
        for (old,) in cur.fetchall():
            cur.execute(sql.SQL("DROP TABLE {}").format(sql.SQL(old)))
        cur.execute(
            sql.SQL("ALTER TABLE {} ATTACH PARTITION {} FOR VALUES IN ({})").format(
                sql.Identifier(table), sql.Identifier(partition), sql.Literal(self.slide_id)
            )
        )


def objects_partitioned(cursor) -> bool:
    """Whether the object tables are partitioned by slide (not so on a distributed Citus schema)."""
    cursor.execute("SELECT relkind = 'p' FROM pg_class WHERE oid = 'nucleus'::regclass")
    return cursor.fetchone()[0]


def sweep_orphans(cursor) -> list[str]:
    """Drop lane tables left by a loader that died between its lanes' commit and its swap."""
    cursor.execute(
        "SELECT relname FROM pg_class WHERE relkind = 'r' AND NOT relispartition "
        "AND relnamespace = 'public'::regnamespace"
    )
    dropped = []
    for (name,) in cursor.fetchall():
        match = _LEAF_NAME.match(name)
        if match is None:
            continue
        cursor.execute("SELECT pg_try_advisory_xact_lock(%s, %s)", (LOADER_LOCK, int(match[1])))
        if cursor.fetchone()[0]:  # its loader is gone
            cursor.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(name)))
            dropped.append(name)
    return dropped


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
