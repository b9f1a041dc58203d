"""Feature tables users take away: gland, nucleus or slide level, as CSV, Parquet or GeoParquet,
and nuclei as AnnData for scverse (squidpy, scanpy).

Class-keyed maps of the feature tables become one column per class (`nuclei_count_epithelial`,
`tissue_area_um2_stroma`, `gland_area_um2_q50`, ...), over the classes present in the exported
slides. Rows stream from the server (COPY for CSV, a server-side cursor for Parquet) into a
temporary file that replaces OUT only when complete: an error leaves no half-written export.
The columns are described in the README's data dictionary.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from psycopg2 import sql
from sqlalchemy import Engine

from spatialdb.errors import UserError
from spatialdb.store.db import rollback_or_discard
from spatialdb.store.morphometry import MORPHOMETRY
from spatialdb.store.schema import INTENSITY_COLUMNS

LEVELS = ("gland", "nucleus", "slide")
FORMATS = ("csv", "parquet", "geoparquet", "anndata")
#: Nucleus export columns that are its identity and labels (AnnData `obs`), not features (`X`).
NUCLEUS_LABELS = (
    "slide_id", "slide_name", "run_id", "nucleus_id", "nucleus_uuid", "nucleus_class",
    "centroid_x_px", "centroid_y_px", "gland_id", "tissue_class", "radius_um",
)  # fmt: skip
BATCH_ROWS = 50_000

GLAND_COLUMNS = (
    "run_id", "gland_id", "gland_uuid", "gland_class", "centroid_x_px", "centroid_y_px",
    "area_um2", "perimeter_um", "circularity", "solidity", "major_axis_um", "minor_axis_um",
    "elongation", "nuclei_count", "nuclei_per_1000um2", "nuclear_area_mean_um2",
    "nuclear_area_median_um2", "lumen_count", "lumen_area_um2", "lumen_to_gland_area_ratio",
    "nearest_gland_distance_um", "tissue_class",
)  # fmt: skip
NUCLEUS_COLUMNS = (
    "run_id", "nucleus_id", "nucleus_uuid", "nucleus_class", "centroid_x_px", "centroid_y_px",
    "area_um2", "perimeter_um", "gland_id", "distance_to_gland_boundary_um", "tissue_class",
)  # fmt: skip
SLIDE_COLUMNS = (
    "run_id", "computed_at", "tissue_area_um2", "nucleus_count", "gland_count", "lumen_count",
    "gland_area_um2", "lumen_area_um2", "gland_area_fraction", "lumen_area_fraction",
    "stroma_area_um2", "nuclei_in_glands", "nuclei_in_stroma", "nuclei_per_1000um2_in_glands",
    "nuclei_per_1000um2_in_stroma",
)  # fmt: skip
#: Per-slide summary statistics of the per-gland features (keys of gland_feature_quantiles).
QUANTILE_STATS = ("mean", "q05", "q25", "q50", "q75", "q95")
SLIDE_OBJECTS = ("nucleus", "gland", "lumen", "tissue_region")
#: Column name prefixes of the spatial statistics' groups (`nucleus_FEATURE_CLASS_STAT`, as the
#: per-gland `gland_FEATURE_STAT`); other groups are named as they are.
SPATIAL_PREFIX = {"nucleus_feature_quantiles": ("nucleus",)}

#: PostgreSQL type OIDs of the exported columns -> Arrow type names.
ARROW_TYPES = {
    16: "bool", 20: "int64", 21: "int16", 23: "int32", 25: "string", 700: "float32",
    701: "float64", 1043: "string", 1184: "timestamp", 2950: "string", 17: "binary",
}  # fmt: skip


@dataclass
class ExportResult:
    path: Path
    rows: int
    columns: list[str]


def column_name(*parts: str) -> str:
    """A stable snake_case column name from a prefix and a class name."""
    return "_".join(re.sub(r"[^0-9a-z]+", "_", p.lower()).strip("_") or "unnamed" for p in parts)


def export(
    engine: Engine,
    level: str,
    fmt: str,
    out: Path,
    slide_ids: list[int],
    *,
    radius_um: float = 25.0,
) -> ExportResult:
    """Write the features of `slide_ids` at `level` to `out` in `fmt`."""
    if level not in LEVELS:
        raise UserError(f"--level must be one of {', '.join(LEVELS)}, not {level!r}")
    if fmt not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    if fmt == "geoparquet" and level == "slide":
        raise UserError("slide-level features have no geometry: use --format csv or parquet")
    if fmt == "anndata" and level != "nucleus":
        raise UserError("--format anndata holds nuclei: use it with --level nucleus")
    if not out.parent.is_dir():
        raise UserError(f"{out.parent}: no such directory")
    raw = engine.raw_connection()
    try:
        with raw.cursor() as cur:
            # One snapshot for every statement: a run committed meanwhile is not mixed in (the
            # nucleus export reads the rows and their neighbourhood apart).
            cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            queries = list(_queries(cur, level, slide_ids, fmt == "geoparquet"))
        fd, partial = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent)
        os.close(fd)
        try:
            if level == "nucleus":
                rows, columns = _write_nuclei(
                    raw, slide_ids, queries, Path(partial), fmt, radius_um
                )
            elif fmt == "csv":
                rows, columns = _write_csv(raw, queries, Path(partial))
            else:
                rows, columns = _write_parquet(raw, queries, Path(partial), fmt == "geoparquet")
            os.replace(partial, out)
        except BaseException:
            Path(partial).unlink(missing_ok=True)
            raise
    finally:
        rollback_or_discard(raw)
        raw.close()
    return ExportResult(out, rows, columns)


def _queries(cur, level: str, slide_ids: list[int], geometry: bool):
    """The SELECT statements whose rows make the export, in order (one per slide for nuclei)."""
    ids = sql.Literal(list(slide_ids))
    if level == "gland":
        cur.execute(
            "SELECT DISTINCT jsonb_object_keys(nuclei_by_class) FROM gland_feature "
            "WHERE slide_id = ANY(%s) ORDER BY 1",
            (list(slide_ids),),
        )
        pivot = [
            (
                column_name("nuclei_count", c),
                sql.SQL("coalesce((f.nuclei_by_class ->> {})::integer, 0)").format(sql.Literal(c)),
            )
            for (c,) in cur.fetchall()
        ]
        select = _select(
            [("slide_id", sql.SQL("f.slide_id")), ("slide_name", sql.SQL("s.name"))]
            + [(c, sql.SQL("f.{}").format(sql.Identifier(c))) for c in GLAND_COLUMNS]
            + pivot
            + ([("geometry", sql.SQL("ST_AsBinary(g.geom)"))] if geometry else [])
        )
        join = (
            sql.SQL(" JOIN gland g ON g.slide_id = f.slide_id AND g.id = f.gland_id")
            if geometry
            else sql.SQL("")
        )
        yield sql.SQL(
            "{} FROM gland_feature f JOIN slide s ON s.id = f.slide_id{} "
            "WHERE f.slide_id = ANY({}) ORDER BY f.slide_id, f.gland_id"
        ).format(select, join, ids)
    elif level == "nucleus":
        for slide_id in slide_ids:
            select = _select(
                [("slide_id", sql.SQL("f.slide_id")), ("slide_name", sql.SQL("s.name"))]
                + [(c, sql.SQL("f.{}").format(sql.Identifier(c))) for c in NUCLEUS_COLUMNS]
                + ([("geometry", sql.SQL("ST_AsBinary(n.geom)"))] if geometry else [])
            )
            join = (
                sql.SQL(" JOIN nucleus n ON n.slide_id = {} AND n.id = f.nucleus_id").format(
                    sql.Literal(slide_id)
                )
                if geometry
                else sql.SQL("")
            )
            # No radius: neighbours are counted here with a k-d tree (`_write_nuclei`).
            yield sql.SQL(
                "{} FROM nucleus_features({}, NULL) f JOIN slide s ON s.id = f.slide_id{} "
                "ORDER BY f.nucleus_id"
            ).format(select, sql.Literal(slide_id), join)
    else:
        yield _slide_query(cur, slide_ids)


def _slide_query(cur, slide_ids: list[int]) -> sql.Composed:
    cur.execute(
        "SELECT o.key, c.key FROM slide_feature f, jsonb_each(f.object_counts) o, "
        "jsonb_object_keys(o.value) c(key) WHERE f.slide_id = ANY(%s) "
        "UNION SELECT 'tissue_area', t FROM slide_feature f, "
        "jsonb_object_keys(f.tissue_class_area_um2) t WHERE f.slide_id = ANY(%s) "
        "UNION SELECT 'quantile', q FROM slide_feature f, "
        "jsonb_object_keys(f.gland_feature_quantiles) q WHERE f.slide_id = ANY(%s) ORDER BY 1, 2",
        (list(slide_ids),) * 3,
    )
    keys = cur.fetchall()
    columns = [
        ("slide_id", sql.SQL("s.id")), ("slide_name", sql.SQL("s.name")),
        ("file_path", sql.SQL("s.file_path")), ("width_px", sql.SQL("s.width")),
        ("height_px", sql.SQL("s.height")), ("mpp_x", sql.SQL("s.mpp_x")),
        ("mpp_y", sql.SQL("s.mpp_y")),
    ]  # fmt: skip
    columns += [(c, sql.SQL("f.{}").format(sql.Identifier(c))) for c in SLIDE_COLUMNS]
    for group, key in keys:
        if group in SLIDE_OBJECTS:
            columns.append((
                column_name(group, "count", key),
                sql.SQL("coalesce((f.object_counts -> {} ->> {})::integer, 0)").format(
                    sql.Literal(group), sql.Literal(key)
                ),
            ))  # fmt: skip
        elif group == "tissue_area":
            columns.append((
                column_name("tissue_area_um2", key),
                sql.SQL("coalesce((f.tissue_class_area_um2 ->> {})::double precision, 0)").format(
                    sql.Literal(key)
                ),
            ))  # fmt: skip
        else:
            columns += [
                (
                    column_name("gland", key, stat),
                    sql.SQL("(f.gland_feature_quantiles -> {} ->> {})::double precision").format(
                        sql.Literal(key), sql.Literal(stat)
                    ),
                )
                for stat in QUANTILE_STATS
            ]
    cur.execute(
        "SELECT statistics FROM slide_spatial_feature WHERE slide_id = ANY(%s)", (list(slide_ids),)
    )
    paths = sorted({path for (statistics,) in cur.fetchall() for path in _leaf_paths(statistics)})
    columns += [
        (
            column_name(*SPATIAL_PREFIX.get(path[0], (path[0],)), *path[1:]),
            sql.SQL("(sp.statistics #>> {})::double precision").format(sql.Literal(list(path))),
        )
        for path in paths
    ]
    return sql.SQL(
        "{} FROM slide_feature f JOIN slide s ON s.id = f.slide_id "
        "LEFT JOIN slide_spatial_feature sp ON sp.slide_id = f.slide_id "
        "WHERE f.slide_id = ANY({}) ORDER BY s.id"
    ).format(_select(columns), sql.Literal(list(slide_ids)))


def _leaf_paths(tree: dict, prefix: tuple = ()) -> list[tuple[str, ...]]:
    """Paths to the numbers (and empty values) of nested statistics; lists are left out."""
    out = []
    for key, value in tree.items():
        if isinstance(value, dict):
            out += _leaf_paths(value, (*prefix, key))
        elif value is None or isinstance(value, int | float):
            out.append((*prefix, key))
    return out


def _select(columns: list[tuple[str, sql.Composable]]) -> sql.Composed:
    names = [name for name, _ in columns]
    duplicated = {n for n in names if names.count(n) > 1}
    if duplicated:  # two class names that differ only in punctuation or case
        raise UserError(f"class names collide as column names: {', '.join(sorted(duplicated))}")
    return sql.SQL("SELECT ") + sql.SQL(", ").join(
        sql.SQL("{} AS {}").format(expr, sql.Identifier(name)) for name, expr in columns
    )


def _write_csv(raw, queries: list, path: Path) -> tuple[int, list[str]]:
    rows, columns = 0, []
    with open(path, "wb") as file, raw.cursor() as cur:
        for k, query in enumerate(queries):
            header = sql.SQL("HEADER") if k == 0 else sql.SQL("HEADER false")
            cur.copy_expert(
                sql.SQL("COPY ({}) TO STDOUT WITH (FORMAT csv, {})")
                .format(query, header)
                .as_string(cur),
                file,
            )
            rows += cur.rowcount
        if queries:
            cur.execute(sql.SQL("{} LIMIT 0").format(queries[0]))
            columns = [d.name for d in cur.description]
    return rows, columns


def _batches(raw, query) -> Iterator[tuple[list, list[tuple]]]:
    """(cursor description, rows) in batches from a server-side cursor."""
    with raw.cursor(name="feature_export") as cur:
        cur.itersize = BATCH_ROWS
        cur.execute(query)
        while batch := cur.fetchmany(BATCH_ROWS):
            yield cur.description, batch


def _write_parquet(raw, queries: list, path: Path, geometry: bool) -> tuple[int, list[str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    writer, schema, rows = None, None, 0
    try:
        for query in queries:
            for description, batch in _batches(raw, query):
                if schema is None:
                    schema = _arrow_schema(pa, description, geometry)
                    writer = pq.ParquetWriter(path, schema)
                writer.write_batch(_record_batch(pa, schema, batch))
                rows += len(batch)
        if writer is None:  # nothing to write: an empty file with the columns
            schema = _arrow_schema(pa, _description(raw, queries[0]), geometry)
            writer = pq.ParquetWriter(path, schema)
    finally:
        if writer is not None:
            writer.close()
    return rows, schema.names


def _write_nuclei(raw, slide_ids, queries, path: Path, fmt: str, radius_um: float):
    """Nucleus rows of each slide from SQL with their neighbourhood columns beside them (counted
    here over the slide's centroids, `spatialdb.features.neighbourhood`), as CSV, Parquet or
    AnnData."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    with raw.cursor() as cur:
        cur.execute(
            "SELECT DISTINCT class FROM nucleus WHERE slide_id = ANY(%s) ORDER BY 1",
            (list(slide_ids),),
        )
        classes = [c for (c,) in cur.fetchall()]
    base = _arrow_schema(pa, _description(raw, queries[0]), fmt == "geoparquet")
    writers = {"csv": pacsv.CSVWriter, "anndata": _Collected}
    rows, writer = 0, None
    try:
        for slide_id, query in zip(slide_ids, queries, strict=True):
            extra = _neighbourhood_columns(raw, slide_id, classes, radius_um)
            if writer is None:
                fields = [pa.field(n, pa.from_numpy_dtype(a.dtype)) for n, a in extra.items()]
                schema = pa.schema(list(base) + fields, metadata=base.metadata)
                writer = writers.get(fmt, pq.ParquetWriter)(path, schema)
            offset = 0
            for _, batch in _batches(raw, query):
                arrays = _record_batch(pa, base, batch).columns
                arrays += [pa.array(a[offset : offset + len(batch)]) for a in extra.values()]
                writer.write_batch(pa.RecordBatch.from_arrays(arrays, schema=schema))
                offset += len(batch)
            rows += offset
    finally:
        if writer is not None:
            writer.close()
    if fmt == "anndata":  # written whole, once every row is in
        _write_anndata(raw, pa.Table.from_batches(writer.batches, schema=schema), slide_ids, path)
    return rows, schema.names


class _Collected:
    """A record-batch writer that keeps the batches (AnnData is written from all of them)."""

    def __init__(self, path: Path, schema):
        self.batches = []

    def write_batch(self, batch) -> None:
        self.batches.append(batch)

    def close(self) -> None:
        pass


def _write_anndata(raw, table, slide_ids: list[int], path: Path) -> None:
    """Nuclei as an AnnData file: `obs` their identity and labels, `X` their numeric features
    (`var` names them), `obsm["spatial"]` their centroids in µm, `uns["spatialdb"]["slides"]`
    each slide by id (name, file, µm per pixel, run, model)."""
    import anndata
    import numpy as np
    import pandas as pd

    frame = table.to_pandas()
    with raw.cursor() as cur:
        cur.execute(
            "SELECT s.id, s.name, s.file_path, s.mpp_x, s.mpp_y, r.id, r.kind, "
            "coalesce(m.name, ''), coalesce(m.preset, ''), coalesce(m.weights_hash, '') "
            "FROM slide s LEFT JOIN run r ON r.id = s.current_run_id "
            "LEFT JOIN model m ON m.id = r.model_id WHERE s.id = ANY(%s) ORDER BY s.id",
            (list(slide_ids),),
        )
        keys = ("id", "name", "file_path", "mpp_x", "mpp_y", "run_id", "run_kind", "model",
                "preset", "weights_sha256")  # fmt: skip
        slides = [dict(zip(keys, row, strict=True)) for row in cur.fetchall()]
    mpp = pd.DataFrame(slides).set_index("id").loc[frame["slide_id"], ["mpp_x", "mpp_y"]]
    # uns holds mappings of plain values (h5py): slides by id, no empty values
    by_id = {str(s["id"]): {k: "" if v is None else v for k, v in s.items()} for s in slides}
    spatial = frame[["centroid_x_px", "centroid_y_px"]].to_numpy(float) * mpp.to_numpy(float)
    labels = [c for c in frame.columns if c in NUCLEUS_LABELS]
    obs = frame[labels].copy()
    for column in ("nucleus_class", "tissue_class", "slide_name"):
        obs[column] = obs[column].astype("category")
    obs.index = obs["nucleus_uuid"].astype(str).to_numpy()
    features = [c for c in frame.columns if c not in NUCLEUS_LABELS and c != "geometry"]
    data = anndata.AnnData(
        X=frame[features].to_numpy(dtype=np.float32),
        obs=obs,
        var=pd.DataFrame(index=features),
        obsm={"spatial": spatial},
        uns={"spatialdb": {"slides": by_id, "spatial_units": "µm"}},
    )
    data.write_h5ad(path)


def _neighbourhood_columns(raw, slide_id: int, classes: list[str], radius_um: float) -> dict:
    """The slide's nuclei's shape, stain intensity and neighbourhood features in nucleus id order,
    and the count within `--radius` (`neighbours_within_radius`, `radius_um`)."""
    import numpy as np

    from spatialdb.features.neighbourhood import count_within, neighbourhood
    from spatialdb.features.nuclei import read_nuclei

    with raw.cursor() as cur:
        found = read_nuclei(cur, slide_id)
    centroids = found[["x_um", "y_um"]].to_numpy(dtype=float).reshape(-1, 2)
    names = found["class"].astype(object).to_numpy()
    measured = (*MORPHOMETRY, *INTENSITY_COLUMNS)
    columns = {name: found[name].to_numpy(dtype=float) for name in measured} | {
        "neighbours_within_radius": count_within(centroids, radius_um),
        "radius_um": np.full(len(centroids), float(radius_um)),
    }
    features = neighbourhood(centroids, names, classes)
    fractions = {
        column_name("neighbour_fraction", c): features.pop(f"neighbour_fraction_{c}")
        for c in classes
    }
    return columns | features | fractions


def _record_batch(pa, schema, batch: list[tuple]):
    """Rows from the server as an Arrow record batch of `schema`."""
    columns = list(zip(*batch, strict=True))
    arrays = [
        pa.array([None if v is None else str(v) for v in col], type=field.type)
        if field.type == pa.string()
        else pa.array(col, type=field.type)
        for col, field in zip(columns, schema, strict=True)
    ]
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


def _description(raw, query):
    with raw.cursor() as cur:
        cur.execute(sql.SQL("{} LIMIT 0").format(query))
        return cur.description


def _arrow_schema(pa, description, geometry: bool):
    fields = []
    for column in description:
        kind = ARROW_TYPES.get(column.type_code, "string")
        arrow_type = {
            "timestamp": pa.timestamp("us", tz="UTC"),
            "binary": pa.binary(),
        }.get(kind) or getattr(pa, kind)()
        fields.append(pa.field(column.name, arrow_type))
    metadata = None
    if geometry:
        geo = {
            "version": "1.1.0",
            "primary_column": "geometry",
            # Level-0 pixel coordinates of the slide: no geographic CRS.
            "columns": {
                "geometry": {"encoding": "WKB", "geometry_types": ["Polygon"], "crs": None}
            },
        }
        metadata = {b"geo": json.dumps(geo).encode()}
    return pa.schema(fields, metadata=metadata)
