"""Single-node limits: how loading, a slide's view and the cohort query grow with the number of
slides in one database.

Slides of --nuclei nuclei (with glands, lumina and tissue regions in proportion, from
`synthetic.gland_slide`) are loaded one by one up to each checkpoint of --slides. At each
checkpoint it prints the median load time of the last slides loaded, the median time of a
bounding-box query on one slide's nuclei (the dashboard's slide view: partition pruning among
all slides), of the cohort query (every slide with its counts and features), the relations in the
catalogue and the database size, and each figure's ratio to the first checkpoint's.

    python benchmarks/scale.py [--slides 10,100,300,1000] [--nuclei 2000]

On a Citus coordinator (`spatialdb db upgrade --citus` done) it also prints the shards in Citus's
metadata and the relations in the workers' catalogues, the figures that decide how many slides the
layout holds.

Uses SPATIALDB_URL, or the embedded cluster in SPATIALDB_HOME: point it at a scratch database,
since it adds (and leaves) that many synthetic slides.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from sqlalchemy import text

# This folder holds a dashboard.py too: the project root goes first, so that `dashboard` is the
# package, and this folder last (for `synthetic`).
HERE = Path(__file__).resolve().parent
sys.path.remove(str(HERE))
sys.path[:0] = [str(HERE.parent)]
sys.path.append(str(HERE))

from synthetic import gland_slide, load_slide  # noqa: E402

from dashboard.data import COHORT, OBJECTS_IN_VIEW  # noqa: E402
from spatialdb.store.db import connect  # noqa: E402

HAS_CITUS = "SELECT EXISTS (SELECT FROM pg_extension WHERE extname = 'citus')"
#: Shards in the metadata, and relations in all the workers' catalogues together.
CITUS_CATALOGUE = """
SELECT (SELECT count(*) FROM pg_dist_shard),
       (SELECT sum(result::bigint) FROM run_command_on_workers('SELECT count(*) FROM pg_class'))
"""


def timed(engine, query: str, params: dict, repeat: int) -> float:
    times = []
    with engine.connect() as conn:
        for _ in range(repeat):
            started = time.perf_counter()
            conn.execute(text(query), params).all()
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slides", default="10,100,300,1000")
    parser.add_argument("--nuclei", type=int, default=2000)
    args = parser.parse_args()
    checkpoints = [int(n) for n in args.slides.split(",")]
    engine = connect()
    with engine.connect() as conn:
        start = conn.execute(text("SELECT count(*) FROM slide")).scalar()
    objects = gland_slide(glands=args.nuclei // 100, lumina=args.nuclei // 70, nuclei=args.nuclei)
    view = OBJECTS_IN_VIEW.format(table="nucleus")
    with engine.connect() as conn:
        citus = conn.execute(text(HAS_CITUS)).scalar()
    print(
        f"slides of {args.nuclei:,} nuclei, {args.nuclei // 100} glands, "
        f"{args.nuclei // 70} lumina ({start} slides there already)"
    )
    print(
        f"{'slides':>7} {'load s':>8} {'view ms':>8} {'cohort ms':>10} {'relations':>10} "
        f"{'db MiB':>8}"
        + (f" {'shards':>8} {'worker rels':>12}" if citus else "")
        + "   ratios to the first row"
    )
    loaded, first = start, None
    for target in checkpoints:
        loads = []
        while loaded < target:
            started = time.perf_counter()
            slide_id = load_slide(engine, f"scale-{loaded}", objects)
            loads.append(time.perf_counter() - started)
            loaded += 1
        with engine.connect() as conn:
            run_id = conn.execute(
                text("SELECT current_run_id FROM slide WHERE id = :s"), {"s": slide_id}
            ).scalar()
            relations = conn.execute(text("SELECT count(*) FROM pg_class")).scalar()
            size = conn.execute(text("SELECT pg_database_size(current_database())")).scalar()
            shards = conn.execute(text(CITUS_CATALOGUE)).one() if citus else ()
        box = {"x0": 0, "y0": 0, "x1": 1200, "y1": 1200}
        params = {"slide": slide_id, "run": run_id, "tolerance": 1.0, "limit": 40_000, **box}
        row = (
            statistics.median(loads) if loads else float("nan"),
            1000 * timed(engine, view, params, 20),
            1000 * timed(engine, COHORT, {}, 5),
            relations,
            size / 2**20,
            *shards,
        )
        first = first or row
        ratios = " ".join(f"{a / b:5.2f}" for a, b in zip(row, first, strict=True))
        print(
            f"{loaded:>7} {row[0]:>8.3f} {row[1]:>8.2f} {row[2]:>10.1f} {row[3]:>10,} "
            f"{row[4]:>8.0f}" + (f" {row[5]:>8,} {row[6]:>12,}" if citus else "") + f"   {ratios}"
        )


if __name__ == "__main__":
    main()
