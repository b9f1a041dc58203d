"""Dashboard benchmark: the slide page's still picture of a slide with 1,000,000 nuclei, server
side (AppTest). The slide viewer's tiles have their own benchmark, `benchmarks/viewer.py`.

Times, medians over --repeat fresh sessions (after one warm-up that pays the imports):
  - first load of the slide page: the whole slide, nuclei as a density grid, 10,000 glands,
    15,000 lumina and the tissue regions drawn from bounding-box queries;
  - after a zoom into a 500 µm field, where every object is drawn;
and, since the synthetic slide has no image file, the time to read the bundled sample slide's
pixels through tiatoolbox at the same view size (whole slide and a 500 µm field), which a real
slide adds to the page. Target: under 3 s each.

    python benchmarks/dashboard.py [--repeat 3] [--nuclei 1000000]

Uses SPATIALDB_URL, or the embedded cluster in SPATIALDB_HOME.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

# This file is called dashboard.py too: the repository's `dashboard` package must come first.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import synthetic  # benchmarks/synthetic.py, beside this file
from streamlit.testing.v1 import AppTest

from dashboard.data import Box
from dashboard.overlay import VIEW_PX, slide_region
from spatialdb.config import ENV_DASHBOARD_URL as ENV_URL
from spatialdb.store.catalog import delete_slide
from spatialdb.store.db import connect

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "dashboard" / "app.py"
SAMPLE = ROOT / "data" / "sample" / "CMU-1-Small-Region.svs"


def timed(at: AppTest) -> float:
    started = time.perf_counter()
    at.run()
    elapsed = time.perf_counter() - started
    assert not at.exception, [e.value for e in at.exception]
    return elapsed


def page_times(slide_id: int) -> tuple[float, float, str, str]:
    at = AppTest.from_file(str(APP), default_timeout=300)
    at.session_state["slide_id"] = slide_id
    at.session_state["page"] = "Slide"
    at.session_state["picture"] = True  # the still picture, drawn on demand under the viewer
    first = timed(at)
    whole = at.get("image")[0].proto.imgs[0].caption
    at.toggle(key="zoom").set_value(True)
    zoom = timed(at)
    zoomed = at.get("image")[0].proto.imgs[0].caption
    return first, zoom, whole, zoomed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--nuclei", type=int, default=1_000_000)
    args = parser.parse_args()

    engine = connect()
    os.environ[ENV_URL] = engine.url.render_as_string(hide_password=False)
    slide_id = synthetic.load_slide(
        engine, "dashboard-benchmark", synthetic.gland_slide(nuclei=args.nuclei)
    )
    try:
        page_times(slide_id)  # warm-up: imports, first connections
        runs = [page_times(slide_id) for _ in range(args.repeat)]
    finally:
        delete_slide(engine, slide_id)
    first = statistics.median(r[0] for r in runs)
    zoom = statistics.median(r[1] for r in runs)
    print(f"slide page, {args.nuclei:,} nuclei, medians of {args.repeat} sessions:")
    print(f"  first load (whole slide): {first:.2f} s  [{runs[0][2]}]")
    print(f"  after a zoom (500 µm):    {zoom:.2f} s  [{runs[0][3]}]")

    import tiatoolbox.wsicore.wsireader as wsireader

    width, height = wsireader.WSIReader.open(SAMPLE).info.slide_dimensions
    views = {"whole": Box(0, 0, width, height), "500 µm": Box(500, 500, 500 + 500 / 0.499, 1502)}
    for name, box in views.items():
        scale = VIEW_PX / max(box.width, box.height)
        size = (round(box.width * scale), round(box.height * scale))
        times = []
        for _ in range(args.repeat):
            started = time.perf_counter()
            _, note = slide_region(str(SAMPLE), box, size)
            times.append(time.perf_counter() - started)
            assert not note, note
        print(f"  + reading the sample slide's pixels ({name}, {size[0]}x{size[1]}): "
              f"{statistics.median(times):.2f} s")  # fmt: skip
    print("runs (first, zoom): " + ", ".join(f"({r[0]:.2f}, {r[1]:.2f})" for r in runs))


if __name__ == "__main__":
    main()
