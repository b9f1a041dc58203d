"""Per-nucleus feature benchmark on the synthetic 1,000,000-nucleus slide (10,000 glands).

Times, in the same run (medians over --repeat, alternating):
  (a) the baseline: shapely's STRtree count of neighbours within 25 µm (self excluded),
  (b) the product's count within 25 µm, scipy's k-d tree (`neighbourhood.count_within`),
  (c) every neighbourhood feature (`neighbourhood.neighbourhood`: 3 radii, 5 nearest, Delaunay
      degree and mean edge, class mix), split into its parts,
and once each: (d) PostGIS's count (`nucleus_features(slide, 25)`, one GiST descent per nucleus),
(e) the whole `features export --level nucleus --format parquet` from the database. (a) and (b)
must agree nucleus for nucleus. Target: (b) no slower than (a).

    python benchmarks/nucleus_features.py [--repeat 3] [--nuclei 1000000] [--no-sql]

Uses SPATIALDB_URL, or the embedded cluster in SPATIALDB_HOME.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import shapely
from sqlalchemy import text

sys.path.insert(0, str(Path(__file__).resolve().parent))

from synthetic import MPP, gland_slide, load_slide

from spatialdb.features import export as feature_export
from spatialdb.features import neighbourhood as nb
from spatialdb.store.catalog import delete_slide
from spatialdb.store.db import connect

RADIUS_UM = 25.0


def strtree_counts(points_um: np.ndarray) -> np.ndarray:
    points = shapely.points(points_um)
    left, _ = shapely.STRtree(points).query(points, predicate="dwithin", distance=RADIUS_UM)
    return np.bincount(left, minlength=len(points)) - 1


def timed(fn, *args):
    started = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - started, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--nuclei", type=int, default=1_000_000)
    parser.add_argument("--no-sql", action="store_true", help="skip (d) and (e)")
    args = parser.parse_args()

    objects = gland_slide(glands=10_000, lumina=15_000, nuclei=args.nuclei)
    nuclei, classes = objects.tables["nucleus"]
    points = shapely.get_coordinates(shapely.centroid(nuclei)) * MPP
    from scipy.spatial import cKDTree

    parts = {
        "(a) STRtree count 25 um": lambda: strtree_counts(points),
        "(b) k-d tree count 25 um": lambda: nb.count_within(points, RADIUS_UM),
        "(c) all neighbourhood features": lambda: nb.neighbourhood(points, classes),
        "    k-d tree build": lambda: cKDTree(points),
        "    5 nearest": lambda: nb._nearest(cKDTree(points), points),
        "    Delaunay degree + edge": lambda: nb._delaunay(points),
    }
    runs = {name: [] for name in parts}
    for _ in range(args.repeat):
        for name, fn in parts.items():
            seconds, result = timed(fn)
            runs[name].append(seconds)
            if name.startswith("(a)"):
                baseline = result
            if name.startswith("(b)"):
                assert (result == baseline).all(), "k-d tree and STRtree counts differ"
    median = {name: statistics.median(r) for name, r in runs.items()}
    a = median["(a) STRtree count 25 um"]
    print(f"{len(points):,} nuclei, medians of {args.repeat} alternating runs")
    print("| what | s | / (a) |\n|---|---:|---:|")
    for name, seconds in median.items():
        print(f"| {name} | {seconds:.2f} | {seconds / a:.2f} |")

    if args.no_sql:
        return
    engine = connect()
    slide_id = load_slide(engine, "nucleus-feature-benchmark", objects)
    try:
        with engine.connect() as conn:
            sql_s, _ = timed(
                lambda: conn.execute(
                    text("SELECT sum(neighbours_within_radius) FROM nucleus_features(:s, :r)"),
                    {"s": slide_id, "r": RADIUS_UM},
                ).scalar()
            )
        with tempfile.TemporaryDirectory() as tmp:
            export_s, result = timed(
                feature_export.export, engine, "nucleus", "parquet", Path(tmp) / "n.parquet",
                [slide_id],
            )  # fmt: skip
    finally:
        delete_slide(engine, slide_id)
    print(f"| (d) PostGIS count 25 um (nucleus_features) | {sql_s:.2f} | {sql_s / a:.2f} |")
    print(
        f"| (e) nucleus export to Parquet, {result.rows:,} rows x {len(result.columns)} columns "
        f"| {export_s:.2f} | {export_s / a:.2f} |"
    )


if __name__ == "__main__":
    main()
