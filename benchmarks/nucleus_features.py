"""Per-nucleus feature benchmark on the synthetic 1,000,000-nucleus slide (10,000 glands).

Times, in the same run (medians over --repeat, alternating):
  (a) the baseline: shapely's STRtree count of neighbours within 25 µm (self excluded),
  (b) the product's count within 25 µm, scipy's k-d tree (`neighbourhood.count_within`),
  (c) every neighbourhood feature (`neighbourhood.neighbourhood`: 3 radii, 5 nearest, Delaunay
      degree and mean edge, class mix), split into its parts,
  (f) shape measurements (`morphometry`, as the loader computes them) of --shapes nuclei against
      scikit-image's `regionprops` on the same nuclei rasterised at level 0 (rasterising not
      timed), per 1,000 nuclei,
  (i) stain intensity (`inference.intensity`: haematoxylin and eosin density, mean, std and 3
      percentiles, in each nucleus and its 2 µm cytoplasm ring) of the same nuclei over an H&E-like
      image, against `rgb2hed` and `regionprops` with the same statistics,
and once each: (d) PostGIS's count (`nucleus_features(slide, 25)`, one GiST descent per nucleus),
(e) the whole `features export --level nucleus --format parquet` from the database, (g) the same
as AnnData (.h5ad), (h) the slide's spatial statistics (`refresh.spatial_row`). (a) and (b) must
agree nucleus for nucleus. Target: (b) no slower than (a).

    python benchmarks/nucleus_features.py [--repeat 3] [--nuclei 1000000] [--shapes 20000]
                                          [--no-sql]

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

from inference.intensity import RING_UM, nucleus_intensity
from spatialdb.features import export as feature_export
from spatialdb.features import neighbourhood as nb
from spatialdb.features.refresh import spatial_row
from spatialdb.store.catalog import delete_slide
from spatialdb.store.db import connect
from spatialdb.store.morphometry import ring_shape_measurements

RADIUS_UM = 25.0


def strtree_counts(points_um: np.ndarray) -> np.ndarray:
    points = shapely.points(points_um)
    left, _ = shapely.STRtree(points).query(points, predicate="dwithin", distance=RADIUS_UM)
    return np.bincount(left, minlength=len(points)) - 1


def regionprops_baseline(nuclei: np.ndarray):
    """A label image of the nuclei (level-0 px, each in its own 64 px cell of a grid, so that
    none overlap) and a function that measures them with `regionprops` as the product does."""
    from skimage.draw import polygon as raster_polygon
    from skimage.measure import regionprops

    side = int(np.ceil(np.sqrt(len(nuclei))))
    labels = np.zeros((side * 64, side * 64), dtype=np.int32)
    for k, nucleus in enumerate(nuclei):
        xy = shapely.get_coordinates(nucleus)
        xy = xy - xy.min(axis=0) + (k % side * 64 + 8, k // side * 64 + 8)
        rr, cc = raster_polygon(xy[:, 1], xy[:, 0], labels.shape)
        labels[rr, cc] = k + 1

    def measure():
        return [
            (p.area, p.perimeter, p.equivalent_diameter_area, p.axis_major_length,
             p.axis_minor_length, p.eccentricity, p.orientation, p.solidity, p.extent)
            for p in regionprops(labels)
        ]  # fmt: skip

    return labels, measure


def stained(labels: np.ndarray) -> np.ndarray:
    """An H&E-like RGB image: purple nuclei on pink cytoplasm, with noise."""
    rng = np.random.default_rng(0)
    rgb = np.where(labels[..., None] > 0, (80, 60, 150), (230, 150, 190)).astype(np.float32)
    return np.clip(rgb + rng.normal(0, 12, rgb.shape), 1, 255).astype(np.uint8)


def regionprops_intensity(labels: np.ndarray, rgb: np.ndarray, ring_px: int):
    """The same statistics with scikit-image: `rgb2hed`, a grown label image for the rings, and
    `regionprops` (mean, std and the percentiles as an extra property) over both."""
    from skimage.color import rgb2hed
    from skimage.measure import regionprops
    from skimage.segmentation import expand_labels

    def quantiles(mask, values):
        return np.quantile(values[mask], [0.1, 0.5, 0.9], axis=0)

    def measure():
        he = rgb2hed(rgb)[..., :2] * 6
        ring = np.where(labels == 0, expand_labels(labels, ring_px), 0)
        return [
            (p.intensity_mean, p.intensity_std, p.quantiles)
            for owner in (labels, ring)
            for p in regionprops(owner, intensity_image=he, extra_properties=(quantiles,))
        ]

    return measure


def product_shapes(nuclei: np.ndarray) -> None:
    """Shape measurements as the loader computes them: per group of equal point counts, from
    the rings' coordinates."""
    counts = shapely.get_num_coordinates(nuclei)
    for k in np.unique(counts):
        group = nuclei[counts == k]
        rings = shapely.get_coordinates(group).reshape(len(group), k, 2)
        ring_shape_measurements(rings, group, MPP, MPP)


def timed(fn, *args):
    started = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - started, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--nuclei", type=int, default=1_000_000)
    parser.add_argument("--shapes", type=int, default=20_000, help="nuclei measured in (f)")
    parser.add_argument("--no-sql", action="store_true", help="skip (d), (e), (g) and (h)")
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
    sample = nuclei[: args.shapes]
    labels, shapes_baseline = regionprops_baseline(sample)
    rgb = stained(labels)
    ring_px = round(RING_UM / MPP)
    shape_parts = {
        "(f) shape measurements, product": lambda: product_shapes(sample),
        "(f') regionprops, same nuclei": shapes_baseline,
        "(i) stain intensity, product": lambda: nucleus_intensity(labels, rgb, ring_px),
        "(i') rgb2hed + regionprops, same nuclei": regionprops_intensity(labels, rgb, ring_px),
    }
    parts |= shape_parts
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
        if name not in shape_parts:
            print(f"| {name} | {seconds:.2f} | {seconds / a:.2f} |")
    per_1000 = [median[name] * 1000 / len(sample) * 1000 for name in shape_parts]
    for what, (product, skimage) in (("shape", per_1000[:2]), ("stain intensity", per_1000[2:])):
        print(
            f"{what} of {len(sample):,} nuclei, ms per 1,000 nuclei: product {product:.1f}, "
            f"scikit-image {skimage:.1f} (scikit-image / product = {skimage / product:.1f})"
        )

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
            anndata_s, _ = timed(
                feature_export.export, engine, "nucleus", "anndata", Path(tmp) / "n.h5ad",
                [slide_id],
            )  # fmt: skip
        raw = engine.raw_connection()
        try:
            spatial_s, _ = timed(spatial_row, raw.cursor(), slide_id)
        finally:
            raw.close()
    finally:
        delete_slide(engine, slide_id)
    print(f"| (d) PostGIS count 25 um (nucleus_features) | {sql_s:.2f} | {sql_s / a:.2f} |")
    print(
        f"| (e) nucleus export to Parquet, {result.rows:,} rows x {len(result.columns)} columns "
        f"| {export_s:.2f} | {export_s / a:.2f} |"
    )
    print(f"| (g) the same as AnnData (.h5ad) | {anndata_s:.2f} | {anndata_s / a:.2f} |")
    print(f"| (h) slide spatial statistics | {spatial_s:.2f} | {spatial_s / a:.2f} |")


if __name__ == "__main__":
    main()
