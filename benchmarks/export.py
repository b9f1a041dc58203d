"""QuPath GeoJSON export benchmark: 1,000,000 nuclei of one slide into a gzipped FeatureCollection.

Times and peak memory (VmHWM of a fresh process each) of
  (a) the product's export: feature text built by PostGIS, streamed from a server-side cursor
      and compressed while the next rows are fetched (`spatialdb export-qupath --objects nuclei`),
  (b) the naive way: fetch the rows, build a list of feature dicts with shapely's `mapping`,
      `json.dump` it (same gzip level),
alternating over --repeat runs (medians), and checks that both files hold the same objects.

With --project, for each of --sizes nuclei (default 10,000, 100,000 and 1,000,000): (a) as above
against (c) the whole `export-qupath` with QuPath: the GeoJSON file and a QuPath project holding
the same objects, written by a child process at the same time; peak memory of (c) is the larger
of the exporting process and the QuPath process. The project's image is the bundled sample
(QuPath needs an image it can open; the objects' coordinates need not lie on it).

    python benchmarks/export.py [--repeat 3] [--nuclei 1000000]
    python benchmarks/export.py --project [--repeat 1] [--sizes 10000,100000,1000000]

Uses SPATIALDB_URL, or the embedded cluster in SPATIALDB_HOME.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from spatialdb.store.db import connect


def peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def product(slide_id: int, out: Path) -> None:
    from spatialdb.interop import qupath_geojson as qupath

    raw = connect().raw_connection()
    with raw.cursor() as cur:
        colours = qupath.class_colours(cur, [slide_id], ["nucleus"])
    qupath.write_feature_collection(
        out, qupath.stream_features(raw, slide_id, ["nucleus"], colours)
    )


def project(slide_id: int, out: Path) -> None:
    from spatialdb.interop.qupath_export import export_slides

    result = export_slides(connect(), out.parent / "project-export", [slide_id], ["nucleus"])
    assert result.project, result.no_project
    (_, _, count), written = result.files[0], result.project_objects[slide_id]
    assert count == written, (count, written)


def naive(slide_id: int, out: Path) -> None:
    import shapely
    from shapely.geometry import mapping

    from spatialdb.interop.qupath_geojson import default_colour

    raw = connect().raw_connection()
    with raw.cursor() as cur:
        cur.execute(
            "SELECT uuid::text, class, area_um2, perimeter_um, probability, ST_AsBinary(geom) "
            "FROM nucleus WHERE slide_id = %s ORDER BY id",
            (slide_id,),
        )
        rows = cur.fetchall()
    features = []
    for uid, cls, area, perimeter, probability, wkb in rows:
        measurements = {"Area µm^2": area, "Perimeter µm": perimeter}
        if probability is not None:
            measurements["Probability"] = probability
        features.append({
            "type": "Feature",
            "id": uid,
            "geometry": mapping(shapely.from_wkb(bytes(wkb))),
            "properties": {
                "objectType": "detection",
                "classification": {"name": cls, "color": list(default_colour(cls))},
                "isLocked": False,
                "measurements": measurements,
            },
        })  # fmt: skip
    with gzip.open(out, "wt", encoding="utf-8", compresslevel=1) as file:
        json.dump({"type": "FeatureCollection", "features": features}, file)


def child(mode: str, slide_id: int, out: Path) -> tuple[float, float]:
    """Run one export in a fresh process: (seconds, peak MiB)."""
    result = subprocess.run(
        [sys.executable, __file__, "--child", mode, "--slide-id", str(slide_id), "--out", str(out)],
        capture_output=True,
        text=True,
        check=True,
    )
    seconds, peak = result.stdout.splitlines()[-1].split()
    return float(seconds), float(peak)


def features_in(path: Path) -> tuple[int, set[str]]:
    with gzip.open(path, "rt", encoding="utf-8") as file:
        features = json.load(file)["features"]
    return len(features), {f["id"] for f in features[:: max(1, len(features) // 1000)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--nuclei", type=int, default=1_000_000)
    parser.add_argument("--project", action="store_true", help="the QuPath project mode")
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--child", choices=("product", "naive", "project"))
    parser.add_argument("--slide-id", type=int)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.child:
        base = peak_rss_mib()
        started = time.perf_counter()
        {"product": product, "naive": naive, "project": project}[args.child](
            args.slide_id, args.out
        )
        seconds = time.perf_counter() - started
        children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        print(seconds, max(peak_rss_mib() - base, children))
        return
    if args.project:
        project_mode(args)
        return

    from synthetic import gland_slide, load_slide

    from spatialdb.store.catalog import delete_slide

    engine = connect()
    objects = gland_slide(glands=10_000, lumina=15_000, nuclei=args.nuclei)
    objects.tables = {"nucleus": objects.tables["nucleus"]}
    slide_id = load_slide(engine, "export-benchmark", objects)
    results = {"product": [], "naive": []}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            outs = {mode: Path(tmp) / f"{mode}.geojson.gz" for mode in results}
            for _ in range(args.repeat):
                for mode in results:
                    results[mode].append(child(mode, slide_id, outs[mode]))
            counts = {mode: features_in(path) for mode, path in outs.items()}
            sizes = {mode: path.stat().st_size / 2**20 for mode, path in outs.items()}
    finally:
        delete_slide(engine, slide_id)
    (n_a, ids_a), (n_b, ids_b) = counts["product"], counts["naive"]
    assert n_a == n_b == args.nuclei and ids_a == ids_b, (n_a, n_b)

    def median(mode: str, k: int) -> float:
        return statistics.median(r[k] for r in results[mode])

    a_s, a_m, b_s, b_m = (
        median("product", 0),
        median("product", 1),
        median("naive", 0),
        median("naive", 1),
    )
    print(f"{args.nuclei:,} nuclei, medians of {args.repeat} alternating runs:")
    print(
        f"(a) product (streamed, server-built features): {a_s:6.1f} s, peak {a_m:7.0f} MiB, "
        f"{sizes['product']:.0f} MiB file"
    )
    print(
        f"(b) naive json.dump of shapely mapping dicts:  {b_s:6.1f} s, peak {b_m:7.0f} MiB, "
        f"{sizes['naive']:.0f} MiB file"
    )
    print(f"b/a: time {b_s / a_s:.1f}x, memory {b_m / a_m:.1f}x")  # fmt: skip
    print(
        "runs: "
        + ", ".join(f"{m}={[(round(s, 1), round(p)) for s, p in r]}" for m, r in results.items())
    )


def project_mode(args) -> None:
    """GeoJSON export against the whole export with a QuPath project, per size."""
    from sqlalchemy import text
    from synthetic import gland_slide, load_slide

    from spatialdb.store.catalog import delete_slide

    if not os.environ.get("PAQUO_QUPATH_DIR"):
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from tests.qupath import install

        missing = install(Path(tempfile.mkdtemp(prefix="spatialdb-qupath-")))
        assert missing is None, missing
    sample = Path(__file__).resolve().parents[1] / "data" / "sample" / "CMU-1-Small-Region.svs"
    engine = connect()
    table = []
    for size in [int(s) for s in args.sizes.split(",")]:
        objects = gland_slide(glands=max(1, size // 100), lumina=1, nuclei=size)
        objects.tables = {"nucleus": objects.tables["nucleus"]}
        slide_id = load_slide(engine, f"project-benchmark-{size}", objects)
        with engine.begin() as conn:
            conn.execute(
                text("UPDATE slide SET file_path = :p WHERE id = :s"),
                {"p": str(sample), "s": slide_id},
            )
        runs = {"product": [], "project": []}
        try:
            with tempfile.TemporaryDirectory() as tmp:
                for _ in range(args.repeat):
                    for mode in runs:
                        out = Path(tmp) / mode / "product.geojson.gz"
                        out.parent.mkdir(exist_ok=True)
                        runs[mode].append(child(mode, slide_id, out))
        finally:
            delete_slide(engine, slide_id)
        a_s, a_m = (statistics.median(r[k] for r in runs["product"]) for k in (0, 1))
        c_s, c_m = (statistics.median(r[k] for r in runs["project"]) for k in (0, 1))
        table.append((size, a_s, a_m, c_s, c_m))
        print(f"{size:,}: runs {runs}", flush=True)
    print(f"medians of {args.repeat} alternating run(s); peak MiB of the process tree")
    print(
        "| nuclei | (a) GeoJSON s | (a) peak MiB | (c) GeoJSON + project s | (c) peak MiB | c/a |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    for size, a_s, a_m, c_s, c_m in table:
        print(f"| {size:,} | {a_s:.1f} | {a_m:.0f} | {c_s:.1f} | {c_m:.0f} | {c_s / a_s:.2f} |")


if __name__ == "__main__":
    main()
