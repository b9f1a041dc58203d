"""One synthetic cohort on a single PostgreSQL server and on a Citus cluster, in one run.

The same slides go into both databases: --slides slides of --nuclei nuclei (glands, lumina and
tissue regions in proportion, from `synthetic.gland_slide`) and one slide of --big nuclei. For
each database it prints the load rate, the median time of one slide's view query (the
dashboard's bounding-box read), of one slide's feature refresh, of the cohort-wide count of
nuclei per class and of the dashboard's cohort table, the catalogue (relations; on Citus, shards
and the workers' relations) and the size (workers included); then each figure's ratio Citus /
single, and what the measured rates give for the Cerberus TCGA release (599 slides, 377 M
nuclei).

    scripts/citus.sh start --workers 3        # prints the coordinator URL
    SPATIALDB_URL=URL spatialdb db upgrade --citus
    python benchmarks/citus.py --citus URL [--single URL] [--slides 200] [--nuclei 2000]
                               [--big 1000000]

--single defaults to SPATIALDB_URL or the embedded cluster in SPATIALDB_HOME. Point both at
scratch databases: the slides stay there.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from sqlalchemy import text

HERE = Path(__file__).resolve().parent
sys.path.remove(str(HERE))  # this folder's dashboard.py must not hide the dashboard package
sys.path[:0] = [str(HERE.parent)]
sys.path.append(str(HERE))

from scale import CITUS_CATALOGUE, HAS_CITUS, timed  # noqa: E402
from synthetic import gland_slide, load_slide  # noqa: E402

from dashboard.data import COHORT, OBJECTS_IN_VIEW  # noqa: E402
from spatialdb.features.refresh import refresh  # noqa: E402
from spatialdb.store.db import connect  # noqa: E402

#: Nuclei per class over every slide's current run: the cohort-wide question.
NUCLEI_PER_CLASS = """
SELECT n.class, count(*) FROM nucleus n JOIN slide s ON s.id = n.slide_id
WHERE n.run_id = s.current_run_id GROUP BY n.class
"""
#: The workers' databases together (the coordinator's size leaves out the shards).
WORKERS_SIZE = """
SELECT sum(result::bigint)
FROM run_command_on_workers('SELECT pg_database_size(current_database())')
"""
TCGA_SLIDES, TCGA_NUCLEI = 599, 377e6
FIGURES = [
    ("load, nuclei/s", "{:,.0f}"),
    ("slide view ms", "{:.2f}"),
    ("big slide view ms", "{:.2f}"),
    ("refresh s", "{:.3f}"),
    ("big slide refresh s", "{:.2f}"),
    ("nuclei per class ms", "{:.0f}"),
    ("cohort table ms", "{:.1f}"),
    ("relations", "{:,}"),
    ("shards", "{:,}"),
    ("worker relations", "{:,}"),
    ("db MiB", "{:,.0f}"),
    ("MiB per M nuclei", "{:,.0f}"),
]


def view_ms(engine, slide_id: int) -> float:
    with engine.connect() as conn:
        run = conn.execute(
            text("SELECT current_run_id FROM slide WHERE id = :s"), {"s": slide_id}
        ).scalar()
    params = {"slide": slide_id, "run": run, "tolerance": 1.0, "limit": 40_000,
              "x0": 0, "y0": 0, "x1": 1200, "y1": 1200}  # fmt: skip
    return 1000 * timed(engine, OBJECTS_IN_VIEW.format(table="nucleus"), params, 20)


def measure(url: str | None, small, big, slides: int, tag: str) -> dict:
    """Load the cohort into the database at `url` and take every figure."""
    engine = connect(url)
    with engine.connect() as conn:
        citus = conn.execute(text(HAS_CITUS)).scalar()
    nuclei = len(small.tables["nucleus"][0])
    print(f"{tag}: loading and measuring", file=sys.stderr, flush=True)
    loads, ids = [], []
    for i in range(slides):
        started = time.perf_counter()
        ids.append(load_slide(engine, f"{tag}-{i}", small))
        loads.append(time.perf_counter() - started)
    started = time.perf_counter()
    big_id = load_slide(engine, f"{tag}-big", big)
    big_load = time.perf_counter() - started
    total = nuclei * slides + len(big.tables["nucleus"][0])
    with engine.connect() as conn:
        relations = conn.execute(text("SELECT count(*) FROM pg_class")).scalar()
        size = conn.execute(text("SELECT pg_database_size(current_database())")).scalar()
        shards, worker_rels = conn.execute(text(CITUS_CATALOGUE)).one() if citus else (0, 0)
        size += int(conn.execute(text(WORKERS_SIZE)).scalar()) if citus else 0
    figures = {
        "load, nuclei/s": total / (sum(loads) + big_load),
        "slide view ms": view_ms(engine, ids[-1]),
        "big slide view ms": view_ms(engine, big_id),
        "refresh s": statistics.median(refresh(engine, s) for s in ids[-5:]),
        "big slide refresh s": refresh(engine, big_id),
        "nuclei per class ms": 1000 * timed(engine, NUCLEI_PER_CLASS, {}, 3),
        "cohort table ms": 1000 * timed(engine, COHORT, {}, 5),
        "relations": relations,
        "shards": shards,
        "worker relations": worker_rels,
        "db MiB": size / 2**20,
        "MiB per M nuclei": size / 2**20 / (total / 1e6),
    }
    engine.dispose()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--citus", required=True, help="a Citus coordinator (db upgrade --citus)")
    parser.add_argument("--single", default=None, help="a single server (default: embedded)")
    parser.add_argument("--slides", type=int, default=200)
    parser.add_argument("--nuclei", type=int, default=2000)
    parser.add_argument("--big", type=int, default=1_000_000)
    args = parser.parse_args()

    def cohort_slide(nuclei: int, seed: int = 0):
        return gland_slide(glands=nuclei // 100, lumina=nuclei // 70, nuclei=nuclei, seed=seed)

    small, big = cohort_slide(args.nuclei), cohort_slide(args.big)
    stamp = time.strftime("%Y%m%d%H%M%S")
    print(f"{args.slides} slides of {args.nuclei:,} nuclei and one of {args.big:,}")
    single = measure(args.single, small, big, args.slides, f"single-{stamp}")
    citus = measure(args.citus, small, big, args.slides, f"citus-{stamp}")
    print(f"{'':<22} {'single':>12} {'citus':>12} {'citus/single':>13}")
    for name, form in FIGURES:
        a, b = single[name], citus[name]
        ratio = f"{b / a:13.2f}" if a else f"{'':>13}"
        print(f"{name:<22} {form.format(a):>12} {form.format(b):>12}{ratio}")
    print(f"\nat these rates, the Cerberus TCGA release ({TCGA_SLIDES} slides, 377 M nuclei):")
    for label, figures in (("single", single), ("citus", citus)):
        hours = TCGA_NUCLEI / figures["load, nuclei/s"] / 3600
        gib = figures["MiB per M nuclei"] * TCGA_NUCLEI / 1e6 / 1024
        print(f"  {label:<7} load {hours:6.1f} h, {gib:7,.0f} GiB")


if __name__ == "__main__":
    main()
