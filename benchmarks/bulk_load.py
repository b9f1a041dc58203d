"""Bulk-load benchmark: 1,000,000 nucleus-like polygons (16-32 vertices) into one slide.

Prints polygons/s for
  (a) the product's loader end to end (repair check, measurements, encoding, binary COPY,
      indexes, ANALYZE, partition swap and commit),
  (b) a bare single-connection COPY of pre-encoded rows (hex EWKB text, the same columns) into an
      unindexed table: the ceiling on this machine; a binary-format bare COPY is shown too,
  (c) ORM inserts of 10,000 rows,
with the ratios a/b and a/c (medians over --repeat runs, alternating) and peak memory.

    python benchmarks/bulk_load.py [--objects 1000000] [--repeat 3]

Uses SPATIALDB_URL, or the embedded cluster in SPATIALDB_HOME.
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
import uuid

import numpy as np
import pandas as pd
import shapely
from geoalchemy2 import WKTElement
from sqlalchemy.orm import Session

from spatialdb.store.catalog import SlideRecord, delete_slide
from spatialdb.store.copy_binary import HEADER, OBJECT_COLUMNS, TRAILER, ObjectRows, encode
from spatialdb.store.db import connect
from spatialdb.store.geometry import measurements
from spatialdb.store.loader import RunWriter
from spatialdb.store.morphometry import shape_measurements
from spatialdb.store.schema import Nucleus

SLIDE_SIZE = 100_000
MPP = 0.25
CLASSES = np.array(["epithelial", "lymphocyte", "plasma", "neutrophil", "eosinophil", "connective"])


def nucleus_polygons(n: int, seed: int = 0) -> np.ndarray:
    """Irregular star-convex blobs, 16-32 vertices, 3-8 px radius, spread over the slide."""
    rng = np.random.default_rng(seed)
    vertices = rng.integers(16, 33, n)
    out = np.empty(n, dtype=object)
    for k in np.unique(vertices):  # one vectorised batch per vertex count
        sel = np.flatnonzero(vertices == k)
        angle = np.linspace(0, 2 * np.pi, k, endpoint=False)
        radius = rng.uniform(3, 8, (len(sel), 1)) * rng.uniform(0.85, 1.15, (len(sel), k))
        centre = rng.uniform(20, SLIDE_SIZE - 20, (len(sel), 2))
        ring = np.stack(
            [centre[:, :1] + radius * np.cos(angle), centre[:, 1:] + radius * np.sin(angle)], -1
        )
        out[sel] = shapely.polygons(ring)
    return out


def slide_record(tag: str) -> SlideRecord:
    return SlideRecord(
        file_path=f"/benchmark/{tag}.svs",
        name=f"benchmark-{tag}",
        fingerprint=tag,
        width=SLIDE_SIZE,
        height=SLIDE_SIZE,
        mpp_x=MPP,
        mpp_y=MPP,
    )


def run_loader(engine, geoms, classes, probability, memory: list) -> float:
    reset_peak_rss()
    before = rss_mib()
    started = time.perf_counter()
    with RunWriter(engine, slide_record("loader"), kind="import") as run:
        run.add("nucleus", geoms, classes, probability)
        result = run.commit()
    elapsed = time.perf_counter() - started
    memory.append(rss_mib("VmHWM") - before)
    assert result.total("nucleus") == len(geoms)
    return elapsed


def pre_encoded_rows(geoms, classes, probability) -> tuple[bytes, bytes]:
    """The loader's rows, encoded in advance: hex-EWKB text and binary COPY."""
    n = len(geoms)
    area, perimeter, cx, cy = measurements(geoms, MPP, MPP)
    uuids = np.frombuffer(uuid.uuid4().bytes * n, dtype=np.uint8).reshape(n, 16)
    text = pd.DataFrame(
        {
            "slide_id": 0,
            "id": np.arange(1, n + 1),
            "run_id": 0,
            "uuid": str(uuid.UUID(bytes=uuids[0].tobytes())),
            "probability": probability,
            "area_um2": area,
            "perimeter_um": perimeter,
            **shape_measurements(geoms, MPP, MPP),
            "centroid": shapely.to_wkb(shapely.points(cx, cy), hex=True),
            "geom": shapely.to_wkb(geoms, hex=True),
            "class": classes,
        }
    )[list(OBJECT_COLUMNS)].to_csv(sep="\t", header=False, index=False)
    class_codes, class_names = pd.factorize(classes)
    binary, _ = encode(
        ObjectRows(
            slide_id=0,
            run_id=0,
            ids=np.arange(1, n + 1),
            uuids=uuids,
            probability=probability,
            class_codes=class_codes,
            class_names=class_names.tolist(),
            geoms=geoms,
            mpp_x=MPP,
            mpp_y=MPP,
        )
    )
    return text.encode(), HEADER + binary + TRAILER


def run_bare_copy(engine, data: bytes, binary: bool) -> float:
    """CREATE TABLE + COPY + COMMIT on one connection, no indexes; the table is dropped after."""
    columns = ", ".join(f'"{c}"' for c in OBJECT_COLUMNS)
    options = "WITH (FORMAT binary)" if binary else ""
    raw = engine.raw_connection()
    try:
        cur = raw.cursor()
        started = time.perf_counter()
        cur.execute("CREATE TABLE bench_bare (LIKE nucleus)")
        cur.copy_expert(
            f"COPY bench_bare ({columns}) FROM STDIN {options}", io.BytesIO(data), size=1 << 20
        )
        raw.commit()
        elapsed = time.perf_counter() - started
        cur.execute("DROP TABLE bench_bare")
        raw.commit()
    finally:
        raw.close()
    return elapsed


def run_orm(engine, geoms, classes, slide_id: int, run_id: int) -> float:
    started = time.perf_counter()
    with Session(engine) as session:
        area, perimeter, cx, cy = measurements(geoms, MPP, MPP)
        session.add_all(
            Nucleus(
                slide_id=slide_id,
                id=10_000_000 + i,
                run_id=run_id,
                uuid=uuid.uuid4(),
                class_=str(classes[i]),
                probability=0.5,
                area_um2=float(area[i]),
                perimeter_um=float(perimeter[i]),
                geom=WKTElement(geom.wkt, srid=0),
                centroid=WKTElement(f"POINT({cx[i]} {cy[i]})", srid=0),
            )
            for i, geom in enumerate(geoms)
        )
        session.commit()
    return time.perf_counter() - started


def rss_mib(field: str = "VmRSS") -> float:
    """Current (VmRSS) or peak (VmHWM) resident memory of this process, MiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> None:
    """Make VmHWM start again from the current RSS (Linux /proc/self/clear_refs)."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objects", type=int, default=1_000_000)
    parser.add_argument("--orm-objects", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    engine = connect()
    rng = np.random.default_rng(1)
    geoms = nucleus_polygons(args.objects)
    classes = CLASSES[rng.integers(0, len(CLASSES), args.objects)]
    probability = rng.uniform(0.5, 1.0, args.objects).astype(np.float32)
    rss_inputs = rss_mib()
    text_rows, binary_rows = pre_encoded_rows(geoms, classes, probability)
    print(
        f"{args.objects:,} polygons; pre-encoded rows: text {len(text_rows) / 2**20:.0f} MiB, "
        f"binary {len(binary_rows) / 2**20:.0f} MiB"
    )

    times = {"loader": [], "bare_text": [], "bare_binary": []}
    loader_memory: list[float] = []
    for i in range(args.repeat):
        times["bare_text"].append(run_bare_copy(engine, text_rows, binary=False))
        times["bare_binary"].append(run_bare_copy(engine, binary_rows, binary=True))
        times["loader"].append(run_loader(engine, geoms, classes, probability, loader_memory))
        print(f"  run {i + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()))

    with engine.connect() as conn:
        slide_id, run_id = conn.exec_driver_sql(
            "SELECT id, current_run_id FROM slide WHERE name = 'benchmark-loader'"
        ).one()
    orm_s = run_orm(engine, geoms[: args.orm_objects], classes, slide_id, run_id)
    delete_slide(engine, slide_id)

    rate = {k: args.objects / statistics.median(v) for k, v in times.items()}
    rate["orm"] = args.orm_objects / orm_s
    print()
    print(f"(a) loader end to end, indexes + ANALYZE: {rate['loader']:>12,.0f} polygons/s")
    print(f"(b) bare COPY, hex EWKB text (ceiling):   {rate['bare_text']:>12,.0f} polygons/s")
    print(f"    bare COPY, binary (for reference):    {rate['bare_binary']:>12,.0f} polygons/s")
    orm_label = f"(c) ORM inserts ({args.orm_objects:,} rows):"
    print(f"{orm_label:<42}{rate['orm']:>12,.0f} polygons/s")
    print(f"a/b = {rate['loader'] / rate['bare_text']:.2f}   (target >= 0.8)")
    print(f"a/b(binary) = {rate['loader'] / rate['bare_binary']:.2f}")
    print(f"a/c = {rate['loader'] / rate['orm']:.1f}")
    print(
        f"loader peak memory above its inputs: {max(loader_memory):.0f} MiB "
        f"(the {args.objects:,} input polygons themselves: {rss_inputs:.0f} MiB RSS)"
    )


if __name__ == "__main__":
    main()
