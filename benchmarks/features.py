"""Feature benchmark: a synthetic slide with 1,000,000 nuclei, 10,000 glands and 15,000 lumina.

Times, in the same run (medians over --repeat, alternating):
  (a) the product's refresh: every per-gland and per-slide feature computed by SQL in PostGIS and
      committed (`spatialdb.features.refresh`, its default connections), with the objects
      stored in the order ingest stores them (region by region, `synthetic.ingest_order`),
  (a') the same refresh of a second copy of the slide stored in random order (the worst case for
      the heap reads behind each index probe),
  (b) the same features with geopandas spatial joins on GeoDataFrames already in memory,
  (c) (b) plus reading the objects out of PostGIS first (what a user without the SQL would do),
and, once each, the per-nucleus neighbour count within 25 µm: PostGIS (the query inside
`nucleus_features`) against shapely's STRtree. The geopandas results are checked against the
database's, so both sides compute the same thing. Target: (a) < 3 s and (b)/(a) >= 5.

    python benchmarks/features.py [--repeat 3] [--nuclei 1000000]

Uses SPATIALDB_URL, or the embedded cluster in SPATIALDB_HOME.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely
from sqlalchemy import text

sys.path.insert(0, str(Path(__file__).resolve().parent))

from synthetic import MPP, gland_slide, load_slide, shuffled

from spatialdb.features.refresh import refresh
from spatialdb.store.catalog import delete_slide
from spatialdb.store.db import connect

QUANTILES = [0.05, 0.25, 0.5, 0.75, 0.95]
RADIUS_UM = 25.0

NEIGHBOURS_SQL = """
SELECT count(*), sum(k.n) FROM nucleus n
CROSS JOIN LATERAL (
    SELECT count(*) AS n FROM nucleus m
    WHERE m.slide_id = :s AND m.id <> n.id AND ST_DWithin(m.centroid, n.centroid, :r)
) k
WHERE n.slide_id = :s
"""


def frames_in_memory(objects) -> dict[str, gpd.GeoDataFrame]:
    """The objects as a geopandas user holds them: nuclei and lumina as centroids with areas."""
    nuclei, nucleus_class = objects.tables["nucleus"]
    glands, gland_class = objects.tables["gland"]
    lumina, _ = objects.tables["lumen"]
    tissue, tissue_class = objects.tables["tissue_region"]
    return {
        "nucleus": gpd.GeoDataFrame(
            {"class": nucleus_class, "area_um2": shapely.area(nuclei) * MPP**2},
            geometry=shapely.centroid(nuclei),
        ),
        "gland": gpd.GeoDataFrame(
            {
                "gland_class": gland_class,
                "area_um2": shapely.area(glands) * MPP**2,
                "perimeter_um": shapely.length(glands) * MPP,
            },
            geometry=glands,
        ),
        "lumen": gpd.GeoDataFrame(
            {"area_um2": shapely.area(lumina) * MPP**2}, geometry=shapely.centroid(lumina)
        ),
        "tissue_region": gpd.GeoDataFrame(
            {"class": tissue_class, "area_um2": shapely.area(tissue) * MPP**2}, geometry=tissue
        ),
    }


def frames_from_database(engine, slide_id: int) -> dict[str, gpd.GeoDataFrame]:
    queries = {
        "nucleus": "SELECT class, area_um2, centroid AS geom FROM nucleus WHERE slide_id = %(s)s",
        "gland": "SELECT id, class AS gland_class, area_um2, perimeter_um, geom FROM gland "
        "WHERE slide_id = %(s)s ORDER BY id",
        "lumen": "SELECT area_um2, centroid AS geom FROM lumen WHERE slide_id = %(s)s",
        "tissue_region": "SELECT class, area_um2, geom FROM tissue_region WHERE slide_id = %(s)s",
    }
    with engine.connect() as conn:
        return {
            name: gpd.read_postgis(
                text(q.replace("%(s)s", ":s")), conn, geom_col="geom", params={"s": slide_id}
            ).rename_geometry("geometry")
            for name, q in queries.items()
        }


def geopandas_features(frames) -> tuple[pd.DataFrame, dict]:
    """The per-gland and per-slide features of `features.sql`, with geopandas spatial joins."""
    nuclei, glands, lumina, tissue = (
        frames[k] for k in ("nucleus", "gland", "lumen", "tissue_region")
    )
    glands = glands.reset_index(drop=True)
    out = pd.DataFrame(index=glands.index)
    inside = gpd.sjoin(nuclei, glands[["geometry"]], predicate="within")
    per_gland = inside.groupby("index_right")["area_um2"]
    out["nuclei_count"] = per_gland.size().reindex(out.index, fill_value=0)
    out["nuclear_area_mean_um2"] = per_gland.mean()
    out["nuclear_area_median_um2"] = per_gland.median()
    by_class = inside.groupby(["index_right", "class"]).size().unstack(fill_value=0)
    by_class = by_class.add_prefix("nuclei_count_").reindex(out.index, fill_value=0)
    out = out.join(by_class)
    out["nuclei_per_1000um2"] = 1000 * out["nuclei_count"] / glands["area_um2"]
    in_gland = gpd.sjoin(lumina, glands[["geometry"]], predicate="within").groupby("index_right")
    out["lumen_count"] = in_gland.size().reindex(out.index, fill_value=0)
    out["lumen_area_um2"] = in_gland["area_um2"].sum().reindex(out.index, fill_value=0)
    out["lumen_to_gland_area_ratio"] = out["lumen_area_um2"] / glands["area_um2"]

    geoms = glands.geometry.values
    hull = shapely.convex_hull(geoms)
    out["solidity"] = shapely.area(geoms) / shapely.area(hull)
    out["major_axis_um"], out["minor_axis_um"] = feret_axes(hull)
    out["elongation"] = out["major_axis_um"] / out["minor_axis_um"]
    out["circularity"] = 4 * np.pi * glands["area_um2"] / glands["perimeter_um"] ** 2
    nearest = gpd.sjoin_nearest(
        glands[["geometry"]], glands[["geometry"]], exclusive=True, distance_col="d"
    )
    out["nearest_gland_distance_um"] = nearest.groupby(level=0)["d"].min() * MPP
    centroids = gpd.GeoDataFrame(geometry=glands.geometry.centroid)
    under = gpd.sjoin(centroids, tissue[["class", "geometry"]], predicate="within")
    out["tissue_class"] = under.groupby(level=0)["class"].first()
    out["area_um2"], out["perimeter_um"] = glands["area_um2"], glands["perimeter_um"]

    tissue_area = tissue["area_um2"].sum()
    gland_area = glands["area_um2"].sum()
    in_glands = int(out["nuclei_count"].sum())
    stroma_area = max(tissue_area - gland_area, 0)
    slide = {
        "object_counts": {
            name: frame[column].value_counts().to_dict()
            for name, frame, column in (
                ("nucleus", nuclei, "class"),
                ("gland", glands, "gland_class"),
                ("tissue_region", tissue, "class"),
            )
        },
        "tissue_class_area_um2": tissue.groupby("class")["area_um2"].sum().to_dict(),
        "gland_area_fraction": gland_area / tissue_area,
        "lumen_area_fraction": lumina["area_um2"].sum() / tissue_area,
        "nuclei_per_1000um2_in_glands": 1000 * in_glands / gland_area,
        "nuclei_per_1000um2_in_stroma": 1000 * (len(nuclei) - in_glands) / stroma_area,
        "gland_feature_quantiles": out.select_dtypes("number").quantile(QUANTILES).to_dict(),
    }
    return out, slide


def feret_axes(hulls: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Maximum Feret diameter (µm) and the width across it, vectorised per vertex count."""
    major, minor = np.empty(len(hulls)), np.empty(len(hulls))
    counts = shapely.get_num_coordinates(hulls)
    for k in np.unique(counts):
        sel = np.flatnonzero(counts == k)
        xy = shapely.get_coordinates(hulls[sel]).reshape(len(sel), k, 2) * MPP
        chord = xy[:, :, None, :] - xy[:, None, :, :]
        longest = np.argmax(np.hypot(chord[..., 0], chord[..., 1]).reshape(len(sel), -1), axis=1)
        i, j = np.unravel_index(longest, (k, k))
        d = xy[np.arange(len(sel)), i] - xy[np.arange(len(sel)), j]
        angle = np.arctan2(d[:, 1], d[:, 0])[:, None]
        along = xy[..., 0] * np.cos(angle) + xy[..., 1] * np.sin(angle)
        across = -xy[..., 0] * np.sin(angle) + xy[..., 1] * np.cos(angle)
        major[sel] = np.ptp(along, axis=1)
        minor[sel] = np.ptp(across, axis=1)
    return major, minor


def shapely_neighbours(points: np.ndarray, radius_px: float) -> int:
    """Pairs within the radius, counted per nucleus, with shapely's STRtree (self excluded)."""
    left, _ = shapely.STRtree(points).query(points, predicate="dwithin", distance=radius_px)
    return int(len(left) - len(points))


def check_same(engine, slide_id: int, gpd_glands: pd.DataFrame) -> None:
    with engine.connect() as conn:
        db = pd.read_sql(
            text(
                "SELECT nuclei_count, lumen_count, nearest_gland_distance_um, solidity, "
                "major_axis_um FROM gland_feature WHERE slide_id = :s ORDER BY gland_id"
            ),
            conn,
            params={"s": slide_id},
        )
    # `gpd_glands` was computed from the database's glands, read in gland id order.
    for column in db.columns:
        assert np.allclose(db[column], gpd_glands[column].to_numpy(), rtol=1e-6), column


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--nuclei", type=int, default=1_000_000)
    parser.add_argument("--glands", type=int, default=10_000)
    parser.add_argument("--lumina", type=int, default=15_000)
    args = parser.parse_args()

    engine = connect()
    started = time.perf_counter()
    objects = gland_slide(args.glands, args.lumina, args.nuclei)
    slide_id = load_slide(engine, "features-benchmark", objects)
    random_id = load_slide(engine, "features-benchmark-random", shuffled(objects))
    print(
        f"synthetic slides {slide_id} (ingest order) and {random_id} (random order): "
        f"{args.nuclei:,} nuclei, {args.glands:,} glands, {args.lumina:,} lumina "
        f"({time.perf_counter() - started:.0f} s to make and load)"
    )
    memory = frames_in_memory(objects)
    times: dict[str, list[float]] = {"a": [], "a'": [], "b": [], "c": []}
    try:
        for _ in range(args.repeat):
            times["a"].append(refresh(engine, slide_id))
            times["a'"].append(refresh(engine, random_id))
            t = time.perf_counter()
            geopandas_features(memory)
            times["b"].append(time.perf_counter() - t)
            t = time.perf_counter()
            gpd_glands, _ = geopandas_features(frames_from_database(engine, slide_id))
            times["c"].append(time.perf_counter() - t)
        check_same(engine, slide_id, gpd_glands)
        single = refresh(engine, slide_id, lanes=1)

        radius_px = RADIUS_UM / MPP
        t = time.perf_counter()
        with engine.connect() as conn:
            _, db_pairs = conn.execute(text(NEIGHBOURS_SQL), {"s": slide_id, "r": radius_px}).one()
        db_neighbours = time.perf_counter() - t
        t = time.perf_counter()
        pairs = shapely_neighbours(memory["nucleus"].geometry.values, radius_px)
        st_neighbours = time.perf_counter() - t
        assert pairs == db_pairs, (pairs, db_pairs)
    finally:
        delete_slide(engine, slide_id)
        delete_slide(engine, random_id)

    a, a_random, b, c = (statistics.median(v) for v in times.values())
    print(f"(a) PostGIS refresh, all per-gland + per-slide features: {a:.2f} s (target < 3 s)")
    print(f"    the same in one connection (refresh_slide_features): {single:.2f} s")
    print(f"(a') the same, objects stored in random order:           {a_random:.2f} s")
    print(f"(b) geopandas on in-memory frames:                       {b:.2f} s  b/a = {b / a:.1f}")
    print(f"(c) geopandas, reading the objects from PostGIS first:   {c:.2f} s  c/a = {c / a:.1f}")
    print(
        f"per-nucleus neighbours within {RADIUS_UM:g} µm ({db_pairs:,} pairs): "
        f"PostGIS {db_neighbours:.1f} s, shapely STRtree {st_neighbours:.1f} s "
        f"(PostGIS/shapely = {db_neighbours / st_neighbours:.1f})"
    )
    print("all times: " + ", ".join(f"{k}={[round(v, 2) for v in vs]}" for k, vs in times.items()))


if __name__ == "__main__":
    main()
