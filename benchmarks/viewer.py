"""Slide viewer benchmark: latency of image tiles and object vector tiles from the viewer's tile
server (`dashboard.viewer_server`), against the old slide page's whole-slide picture.

Slides: the synthetic 1,000,000-nucleus slide (10,000 glands, 15,000 lumina; loaded and its
features refreshed, which fills the nucleus density pyramid; no image file) and a gigapixel slide
of the database with its image (by default the largest one whose file is readable, e.g. the
251 mm² `tissue-256mm2` of `benchmarks/wsi.py`). At every zoom (named: whole — the slide in a
1,024 px view —, mid, full — level 0) every tile while the slide fits a 1,024 px view, else the
tiles of 1,024 px views centred on random nuclei, are fetched one after another over one
keep-alive connection (gzip accepted, as browsers do): cold (a new server, empty tile caches) then
warm (the same tiles again). PostgreSQL's own buffers are warm in both. Printed:
p50 and p95 per kind, zoom and cache, the bytes of the overlay tiles as sent (gzip) and as MVT,
then the old page's whole-slide picture (`dashboard.overlay.render`, the 1.23 s of the README) in
the same run, and a whole view's 16 tiles fetched over 6 connections as a browser does.

    python benchmarks/viewer.py [--nuclei 1000000] [--slide NAME] [--views 3] [--repeat 3]

Uses SPATIALDB_URL, or the embedded cluster in SPATIALDB_HOME. Targets: overlay tiles p95 under
100 ms at every zoom; image tiles p95 under 100 ms warm.
"""

from __future__ import annotations

import argparse
import gzip
import http.client
import math
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# The repository's `dashboard` package must come before benchmarks/dashboard.py.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import synthetic  # benchmarks/synthetic.py, beside this file
from sqlalchemy import text

from dashboard.data import Box, Reader
from dashboard.overlay import LAYERS, render
from dashboard.tiles import TILE_PX, Pyramid
from dashboard.viewer_server import ViewerServer
from spatialdb.features.refresh import refresh
from spatialdb.store.catalog import delete_slide
from spatialdb.store.db import connect

VIEW_PX = 1024
BROWSER_CONNECTIONS = 6


def percentile(values, q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def zoom_names(pyramid: Pyramid) -> dict[int, str]:
    """Every zoom of the pyramid, the whole-slide (the slide in a VIEW_PX view), mid and full ones
    named."""
    side = max(pyramid.width, pyramid.height)
    whole = max(0, pyramid.max_zoom - math.ceil(math.log2(side / VIEW_PX)))
    full = pyramid.max_zoom
    names = {z: "" for z in range(full + 1)}
    names.update({whole: "whole", (whole + full) // 2: "mid", full: "full"})
    return names


def view_tiles(pyramid: Pyramid, z: int, centre: tuple[float, float]) -> list[tuple[int, int, int]]:
    """The tiles of a VIEW_PX view centred on `centre` (level-0 pixels) at zoom z."""
    columns, rows = pyramid.tiles(z)
    side = TILE_PX * pyramid.scale(z)
    half = VIEW_PX / 2 * pyramid.scale(z)
    x0, x1 = (int((centre[0] + d) // side) for d in (-half, half - 1))
    y0, y1 = (int((centre[1] + d) // side) for d in (-half, half - 1))
    return [
        (z, x, y)
        for x in range(max(0, x0), min(columns - 1, x1) + 1)
        for y in range(max(0, y0), min(rows - 1, y1) + 1)
    ]


def tile_sets(engine, slide: dict, views: int, seed: int) -> dict[str, list]:
    """Per (zoom, name), the tiles to fetch: every tile while the slide fits a view, else the
    tiles of views centred on nuclei."""
    pyramid = Pyramid(slide["width"], slide["height"])
    with engine.connect() as conn:
        centres = conn.execute(
            text(
                "SELECT ST_X(centroid), ST_Y(centroid) FROM nucleus WHERE slide_id = :s "
                "AND run_id = :r ORDER BY md5(id::text || :seed) LIMIT :n"
            ),
            {"s": slide["id"], "r": slide["run_id"], "seed": str(seed), "n": views},
        ).all()
    sets = {}
    for z, name in zoom_names(pyramid).items():
        columns, rows = pyramid.tiles(z)
        if columns * rows <= (VIEW_PX // TILE_PX) ** 2:  # the whole slide fits a view
            sets[(z, name)] = [(z, x, y) for x in range(columns) for y in range(rows)]
        else:
            sets[(z, name)] = sorted({t for c in centres for t in view_tiles(pyramid, z, tuple(c))})
    return sets


def tile_path(slide: dict, kind: str, z: int, x: int, y: int) -> str:
    if kind == "image":
        return f"/slides/{slide['id']}/image/{z}/{x}/{y}.jpg"
    return f"/slides/{slide['id']}/runs/{slide['run_id']}/tiles/{z}/{x}/{y}.pbf"


class Client:
    """One keep-alive HTTP connection to the tile server."""

    def __init__(self, server: ViewerServer):
        self.conn = http.client.HTTPConnection(server.address, server.port, timeout=60)

    def get(self, path: str) -> tuple[float, bytes, str]:
        started = time.perf_counter()
        self.conn.request("GET", path, headers={"Accept-Encoding": "gzip"})
        response = self.conn.getresponse()
        body = response.read()
        elapsed = time.perf_counter() - started
        if response.status != 200:
            raise RuntimeError(f"{path}: {response.status} {body[:200]!r}")
        return elapsed, body, response.getheader("Content-Encoding") or ""


def measure(reader: Reader, slides: list[dict], sets: dict, with_image: dict) -> list[dict]:
    """Each slide's tiles cold (a new server) then warm (the same server again)."""
    server = ViewerServer(reader)
    client = Client(server)
    rows = []
    try:
        for cache in ("cold", "warm"):
            for slide in slides:
                kinds = ["overlay"] + (["image"] if with_image[slide["id"]] else [])
                for kind in kinds:
                    for zoom, tiles in sets[slide["id"]].items():
                        times, sent, raw = [], [], []
                        for tile in tiles:
                            elapsed, body, encoding = client.get(tile_path(slide, kind, *tile))
                            times.append(elapsed)
                            sent.append(len(body))
                            raw.append(len(gzip.decompress(body)) if encoding else len(body))
                        rows.append({
                            "slide": slide["name"], "kind": kind, "zoom": zoom, "cache": cache,
                            "n": len(tiles), "times": times, "sent": sent, "raw": raw,
                        })  # fmt: skip
    finally:
        server.stop()
    return rows


def whole_view(reader: Reader, slide: dict, tiles: list, kind: str) -> float:
    """Seconds to fetch a whole view's tiles over BROWSER_CONNECTIONS connections (a new server:
    cold)."""
    server = ViewerServer(reader)
    clients = [Client(server) for _ in range(BROWSER_CONNECTIONS)]
    paths = [tile_path(slide, kind, *tile) for tile in tiles]
    try:
        started = time.perf_counter()
        with ThreadPoolExecutor(BROWSER_CONNECTIONS) as pool:
            list(pool.map(lambda k: [clients[k].get(p) for p in paths[k::BROWSER_CONNECTIONS]],
                          range(BROWSER_CONNECTIONS)))  # fmt: skip
        return time.perf_counter() - started
    finally:
        server.stop()


def slide_row(engine, where: str, **params) -> dict | None:
    with engine.connect() as conn:
        row = conn.execute(
            text(
                "SELECT id, name, width, height, mpp_x, file_path, current_run_id AS run_id "
                f"FROM slide WHERE current_run_id IS NOT NULL AND {where} "
                "ORDER BY width::bigint * height DESC LIMIT 1"
            ),
            params,
        ).mappings().first()  # fmt: skip
    return dict(row) if row else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nuclei", type=int, default=1_000_000)
    parser.add_argument("--slide", help="the gigapixel slide's name (default: the largest one)")
    parser.add_argument("--views", type=int, default=3, help="views per zoom below whole")
    parser.add_argument("--repeat", type=int, default=3, help="runs of the old page's picture")
    args = parser.parse_args()

    engine = connect()
    url = engine.url.render_as_string(hide_password=False)
    started = time.perf_counter()
    synthetic_id = synthetic.load_slide(engine, "viewer", synthetic.gland_slide(nuclei=args.nuclei))
    refresh(engine, synthetic_id)
    print(f"synthetic slide loaded and refreshed in {time.perf_counter() - started:.0f} s")
    try:
        slides = [slide_row(engine, "id = :id", id=synthetic_id)]
        real = slide_row(engine, "name = :n", n=args.slide) if args.slide else None
        if real is None and not args.slide:
            with engine.connect() as conn:
                candidates = conn.execute(
                    text("SELECT id, file_path FROM slide WHERE id <> :s AND current_run_id "
                         "IS NOT NULL ORDER BY width::bigint * height DESC"),
                    {"s": synthetic_id},
                ).all()  # fmt: skip
            found = next((i for i, path in candidates if Path(path).is_file()), None)
            real = slide_row(engine, "id = :id", id=found) if found else None
        if real is None:
            print("no slide with a readable image file in the database: image tiles not measured")
        else:
            slides.append(real)
        with_image = {s["id"]: Path(s["file_path"]).is_file() for s in slides}
        sets = {s["id"]: tile_sets(engine, s, args.views, seed=1) for s in slides}
        reader = Reader(url)
        report(reader, slides, sets, with_image, args.repeat)
    finally:
        delete_slide(engine, synthetic_id)


def report(reader: Reader, slides: list[dict], sets: dict, with_image: dict, repeat: int) -> None:
    rows = measure(reader, slides, sets, with_image)
    print()
    print("| slide | tiles | zoom | n | cold p50 / p95 ms | warm p50 / p95 ms | "
          "bytes sent p50 / p95 | MVT bytes p50 / p95 |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    cold = {(r["slide"], r["kind"], r["zoom"]): r for r in rows if r["cache"] == "cold"}
    worst = {"overlay": 0.0, "image warm": 0.0}
    for r in (r for r in rows if r["cache"] == "warm"):
        c = cold[(r["slide"], r["kind"], r["zoom"])]
        ms = lambda t, q: 1000 * percentile(t, q)  # noqa: E731
        size = (
            f"{percentile(r['sent'], 50):,.0f} / {percentile(r['sent'], 95):,.0f} | "
            f"{percentile(r['raw'], 50):,.0f} / {percentile(r['raw'], 95):,.0f}"
            if r["kind"] == "overlay"
            else f"{percentile(r['sent'], 50):,.0f} / {percentile(r['sent'], 95):,.0f} | -"
        )
        z, name = r["zoom"]
        print(f"| {r['slide']} | {r['kind']} | {z}{f' ({name})' if name else ''} | {r['n']} | "
              f"{ms(c['times'], 50):.1f} / {ms(c['times'], 95):.1f} | "
              f"{ms(r['times'], 50):.1f} / {ms(r['times'], 95):.1f} | {size} |")  # fmt: skip
        if r["kind"] == "overlay":
            worst["overlay"] = max(worst["overlay"], ms(c["times"], 95), ms(r["times"], 95))
        else:
            worst["image warm"] = max(worst["image warm"], ms(r["times"], 95))
    print()
    print(
        f"worst p95: overlay tiles {worst['overlay']:.1f} ms (cold or warm, target < 100), "
        f"image tiles warm {worst['image warm']:.1f} ms (target < 100)"
    )
    print()
    for slide in slides:
        whole_box = Box(0, 0, slide["width"], slide["height"])
        picture = []
        for _ in range(repeat):
            started = time.perf_counter()
            render(reader, slide, whole_box, list(LAYERS), with_image=with_image[slide["id"]])
            picture.append(time.perf_counter() - started)
        tiles = next(t for (_, name), t in sets[slide["id"]].items() if name == "whole")
        kinds = ["overlay"] + (["image"] if with_image[slide["id"]] else [])
        view = {k: whole_view(reader, slide, tiles, k) for k in kinds}
        old = statistics.median(picture)
        faster = ", ".join(f"{k} {v:.2f} s ({old / v:.1f}x faster)" for k, v in view.items())
        print(f"{slide['name']}: old page's whole-slide picture {old:.2f} s (median of {repeat}"
              f"{', with the image' if with_image[slide['id']] else ', no image file'}); the "
              f"viewer's whole view, {len(tiles)} tiles over {BROWSER_CONNECTIONS} connections, "
              f"cold: {faster}")  # fmt: skip


if __name__ == "__main__":
    main()
