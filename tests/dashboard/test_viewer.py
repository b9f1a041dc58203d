"""The slide viewer's tile server against the real PostGIS and a generated pyramidal slide: the
tile pyramid, image tiles equal to the slide's pixels, vector tiles with every layer where its
objects are (decoded by the tests' own MVT reader), nuclei by zoom, object details, and the bad
requests it refuses (docs/reliability.md)."""

from __future__ import annotations

import gzip
import http.client
import io
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import shapely
from PIL import Image
from sqlalchemy import text

from dashboard import vector_tiles
from dashboard.data import Box, Reader
from dashboard.tiles import OutsidePyramid, Pyramid
from dashboard.viewer_server import ViewerServer
from spatialdb.features.refresh import refresh
from spatialdb.store.loader import RunWriter
from tests.conftest import blobs, make_slide
from tests.dashboard.conftest import CHROMIUM, launch, viewer_frame
from tests.dashboard.mvt import POINT, POLYGON, decode
from tests.slides import tissue_image, write_pyramid

WIDTH, HEIGHT, MPP = 3000, 2000, 0.5
GLAND = shapely.box(1100, 600, 1500, 900)  # level-0 pixels, inside tile (2, 1, 0)
LUMEN = shapely.box(1250, 700, 1350, 800)


#: Nuclei 8 px wide every 40 px over the slide (their centres).
GRID = [(x, y) for x in range(20, WIDTH - 20, 40) for y in range(20, HEIGHT - 20, 40)]


@pytest.fixture
def viewed(engine, tmp_path):
    """A generated slide file with a gland, a lumen, a tissue region and a grid of nuclei (a
    third of them inflammatory), its features refreshed."""
    image = tissue_image(HEIGHT, WIDTH, seed=3)
    path = write_pyramid(tmp_path / "viewed.tif", image, MPP, levels=4)
    record = replace(make_slide("viewed", WIDTH, HEIGHT, MPP), file_path=str(path))
    nuclei = [shapely.box(x - 4, y - 4, x + 4, y + 4) for x, y in GRID]
    classes = ["inflammatory" if k % 3 == 0 else "epithelial" for k in range(len(nuclei))]
    with RunWriter(engine, record) as run:
        run.add("nucleus", nuclei, classes)
        run.add("gland", [GLAND], "malignant gland")
        run.add("lumen", [LUMEN], "lumen")
        run.add("tissue_region", [shapely.MultiPolygon([shapely.box(500, 300, 2500, 1700)])],
                "stroma")  # fmt: skip
        result = run.commit()
    refresh(engine, result.slide_id)
    with engine.connect() as conn:
        gland_id = conn.execute(
            text("SELECT id FROM gland WHERE slide_id = :s"), {"s": result.slide_id}
        ).scalar()
    return {
        "id": result.slide_id, "run": result.run_id, "image": image, "gland_id": gland_id,
        "classes": classes,
    }  # fmt: skip


@pytest.fixture
def server(db_url):
    reader = Reader(db_url)
    served = ViewerServer(reader)
    yield served
    served.stop()
    reader.engine.dispose()


def get(server: ViewerServer, path: str, gzip: bool = False) -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection(server.address, server.port, timeout=30)
    conn.request("GET", path, headers={"Accept-Encoding": "gzip"} if gzip else {})
    response = conn.getresponse()
    body = response.read()
    conn.close()
    return response.status, dict(response.getheaders()), body


def test_pyramid_addresses():
    pyramid = Pyramid(WIDTH, HEIGHT)
    assert pyramid.max_zoom == 4  # 3,000 px: 12 tiles of 256 px across at level 0
    assert pyramid.tiles(4) == (12, 8) and pyramid.tiles(0) == (1, 1)
    assert pyramid.scale(0) == 16 and pyramid.scale(4) == 1
    assert pyramid.box(4, 11, 7) == Box(2816, 1792, 3072, 2048)
    assert pyramid.box(0, 0, 0) == Box(0, 0, 4096, 4096)
    for address in ((5, 0, 0), (4, 12, 0), (4, 0, 8), (0, 1, 0), (-1, 0, 0)):
        with pytest.raises(OutsidePyramid):
            pyramid.box(*address)
    assert Pyramid(200, 100).max_zoom == 0


def test_server_listens_on_localhost_only_by_default(server):
    assert server.address == "127.0.0.1"


def test_image_tiles_are_the_slides_pixels(server, viewed):
    status, headers, body = get(server, f"/slides/{viewed['id']}/image/4/4/2.jpg")
    assert status == 200 and headers["Content-Type"] == "image/jpeg"
    tile = np.asarray(Image.open(io.BytesIO(body)))
    assert tile.shape == (256, 256, 3)
    truth = viewed["image"][512:768, 1024:1280].astype(int)
    assert np.abs(tile.astype(int) - truth).mean() < 4  # JPEG twice
    # The last column's tile is padded with glass beyond the slide's edge (3,000 px).
    edge = np.asarray(
        Image.open(io.BytesIO(get(server, f"/slides/{viewed['id']}/image/4/11/0.jpg")[2]))
    )
    assert np.abs(edge[:, : 3000 - 2816].astype(int) - viewed["image"][:256, 2816:]).mean() < 4
    assert edge[:, 3000 - 2816 + 2 :].min() >= 250
    # Zoom 0: the whole slide, 16 level-0 pixels per tile pixel.
    whole = np.asarray(
        Image.open(io.BytesIO(get(server, f"/slides/{viewed['id']}/image/0/0/0.jpg")[2]))
    )
    small = np.asarray(Image.fromarray(viewed["image"]).resize((188, 125), Image.Resampling.BOX))
    assert np.abs(whole[:124, :187].astype(int) - small[:124, :187]).mean() < 8


def test_vector_tiles_hold_each_layer_where_its_objects_are(server, viewed):
    path = f"/slides/{viewed['id']}/runs/{viewed['run']}/tiles/2/1/0.pbf"
    status, headers, body = get(server, path, gzip=True)
    assert status == 200 and headers["Content-Encoding"] == "gzip"
    assert headers["Content-Type"] == "application/vnd.mapbox-vector-tile"
    layers = decode(gzip.decompress(body))
    assert set(layers) == {"nucleus", "gland", "lumen", "tissue_region"}
    (gland,) = layers["gland"].features
    assert gland.type == POLYGON and gland.id == viewed["gland_id"]
    assert gland.properties["class"] == "malignant gland"
    assert gland.properties["area_um2"] == pytest.approx(400 * 300 * MPP**2, rel=1e-6)
    # Tile (2, 1, 0) starts at level-0 (1024, 0), 4 px per tile pixel: 4 MVT units per px, y down.
    assert gland.bounds == ((1100 - 1024) * 4, 600 * 4, (1500 - 1024) * 4, 900 * 4)
    (lumen,) = layers["lumen"].features
    assert lumen.bounds == ((1250 - 1024) * 4, 700 * 4, (1350 - 1024) * 4, 800 * 4)
    (tissue,) = layers["tissue_region"].features
    assert tissue.properties["class"] == "stroma"


def test_nuclei_outlines_at_full_zoom(server, viewed):
    tile = get(server, f"/slides/{viewed['id']}/runs/{viewed['run']}/tiles/4/3/2.pbf")[2]
    nuclei = decode(tile)["nucleus"].features
    # Tile (4, 3, 2) is level-0 x 768-1024, y 512-768: the grid's centres x 780-1020 and y
    # 540-740 (7 x 6), each 8 px wide, 16 MVT units per px.
    assert len(nuclei) == 42 and all(f.type == POLYGON for f in nuclei)
    boxes = sorted(f.bounds for f in nuclei)
    assert boxes[0] == ((776 - 768) * 16, (536 - 512) * 16, (784 - 768) * 16, (544 - 512) * 16)
    assert {f.properties["class"] for f in nuclei} == {"inflammatory", "epithelial"}
    assert all(f.properties["area_um2"] == pytest.approx(16.0) for f in nuclei)


def test_nuclei_are_outlines_then_centroids_then_densities(server, viewed):
    base = f"/slides/{viewed['id']}/runs/{viewed['run']}/tiles"
    assert [vector_tiles.nucleus_form(s) for s in (1, 2, 4, 8, 16)] == [
        "outlines", "outlines", "centroids", "centroids", "density",
    ]  # fmt: skip
    points = decode(get(server, f"{base}/2/0/0.pbf")[2])["nucleus"].features  # 4 px per pixel
    assert points and all(f.type == POINT and len(f.parts) == 1 for f in points)
    assert set(points[0].properties) == {"class"}
    whole = decode(get(server, f"{base}/0/0/0.pbf")[2])  # 16 px per pixel: density
    assert "nucleus" not in whole
    cells = whole["nucleus_density"].features
    totals = {}
    for cell in cells:
        for cls, n in cell.properties.items():
            totals[cls] = totals.get(cls, 0) + n
    expected = {c: viewed["classes"].count(c) for c in set(viewed["classes"])}
    assert totals == expected
    # Cells of 256 level-0 px (8 tile pixels would be 128): 256 MVT units at zoom 0.
    assert {(f.bounds[2] - f.bounds[0], f.bounds[3] - f.bounds[1]) for f in cells} == {(256, 256)}


def test_stored_and_counted_densities_agree_at_every_level(engine, db_url):
    """A 20,000 px slide: the stored pyramid has levels 0-2 (cells of 256, 512, 1,024 px); every
    density tile from it equals the one counted from the centroids."""
    with RunWriter(engine, make_slide("dense", 20_000, 20_000, MPP)) as run:
        nuclei = blobs(20_000, seed=4)
        run.add("nucleus", nuclei, ["epithelial", "connective"] * 10_000)
        result = run.commit()
    refresh(engine, result.slide_id)
    with engine.connect() as conn:
        levels = conn.execute(
            text("SELECT level, sum(n) FROM nucleus_density WHERE slide_id = :s GROUP BY 1"),
            {"s": result.slide_id},
        ).all()
    assert sorted(levels) == [(0, 20_000), (1, 20_000), (2, 20_000)]
    reader = Reader(db_url)
    pyramid = Pyramid(20_000, 20_000)
    try:
        for z, x, y in ((0, 0, 0), (1, 1, 0), (2, 2, 1), (3, 4, 2)):
            box, scale = pyramid.box(z, x, y), pyramid.scale(z)
            stored, counted = (
                decode(
                    vector_tiles.vector_tile(
                        reader, result.slide_id, result.run_id, box, scale, MPP, s
                    )
                )["nucleus_density"].features
                for s in (True, False)
            )
            cells = {(f.bounds, tuple(sorted(f.properties.items()))) for f in stored}
            assert stored and cells == {
                (f.bounds, tuple(sorted(f.properties.items()))) for f in counted
            }
            side = {f.bounds[2] - f.bounds[0] for f in stored}
            assert side == {max(256, 8 * scale) * 4096 // (256 * scale)}
    finally:
        reader.engine.dispose()


def test_object_details_with_gland_features(server, viewed):
    path = f"/slides/{viewed['id']}/runs/{viewed['run']}/objects/gland/{viewed['gland_id']}.json"
    status, _, body = get(server, path)
    found = json.loads(body)
    assert status == 200 and found["table"] == "gland"
    assert found["measurements"]["class"] == "malignant gland"
    assert found["measurements"]["area_um2"] == pytest.approx(30_000)
    assert found["measurements"]["centroid_x_px"] == pytest.approx(1300)
    assert found["features"]["lumen_count"] == 1
    assert found["features"]["nuclei_count"] > 0


def test_info_names_the_pyramid_run_and_classes(server, viewed):
    info = json.loads(get(server, f"/slides/{viewed['id']}/info.json")[2])
    assert (info["width"], info["height"], info["max_zoom"], info["run_id"]) == (
        WIDTH, HEIGHT, 4, viewed["run"],
    )  # fmt: skip
    assert info["image"] is True
    assert info["counts"]["gland"] == {"malignant gland": 1}
    assert set(info["colours"]) == {
        "inflammatory",
        "epithelial",
        "malignant gland",
        "lumen",
        "stroma",
    }


@pytest.mark.parametrize(
    "path, status",
    [
        ("/slides/999999/info.json", 404),  # unknown slide
        ("/slides/999999/image/0/0/0.jpg", 404),
        ("/slides/{id}/image/5/0/0.jpg", 404),  # zoom past the pyramid
        ("/slides/{id}/image/4/12/0.jpg", 404),  # column past the slide
        ("/slides/{id}/runs/{run}/tiles/0/1/0.pbf", 404),
        ("/slides/{id}/runs/{run}/tiles/9/0/0.pbf", 404),
        ("/slides/{id}/runs/999999/tiles/0/0/0.pbf", 404),  # not the slide's current run
        ("/slides/{id}/runs/{run}/objects/slide/1.json", 404),  # not an object table
        ("/slides/{id}/runs/{run}/objects/gland/999999.json", 404),
        ("/slides/abc/info.json", 400),  # malformed addresses
        ("/slides/{id}/image/-1/0/0.jpg", 400),
        ("/slides/{id}/image/1.5/0/0.jpg", 400),
        ("/slides/{id}/image/0/0/%EF%BC%90.jpg", 400),  # a full-width digit zero
        ("/slides/{id}/image/99999999999999999999/0/0.jpg", 400),
        ("/slides/{id}/runs/{run}/tiles/0/0/0%0D%0AX-Injected:%201.pbf", 400),
        ("/slides/{id}/image/0/0/0.png", 404),  # no such route
        ("/slides/{id}/../../etc/passwd", 404),
        ("/static/../viewer_server.py", 403),
        ("/static/%2e%2e/viewer_server.py", 403),
        ("/files/etc/passwd", 404),
    ],
)
def test_bad_requests_get_an_error_and_nothing_else(server, viewed, path, status):
    got, headers, body = get(server, path.format(id=viewed["id"], run=viewed["run"]))
    assert got == status
    assert "X-Injected" not in headers
    assert headers["Content-Type"].startswith("text/")
    assert body.count(b"\n") <= 1 and b"Traceback" not in body


def test_a_slide_whose_file_is_gone_still_shows_its_objects(server, viewed, tmp_path):
    (tmp_path / "viewed.tif").unlink()
    info = json.loads(get(server, f"/slides/{viewed['id']}/info.json")[2])
    assert info["image"] is False
    assert get(server, f"/slides/{viewed['id']}/image/0/0/0.jpg")[0] == 404
    tile = get(server, f"/slides/{viewed['id']}/runs/{viewed['run']}/tiles/2/1/0.pbf")
    assert tile[0] == 200 and "gland" in decode(tile[2])


def test_a_new_run_retires_the_old_runs_tiles(engine, server, viewed, tmp_path):
    old = f"/slides/{viewed['id']}/runs/{viewed['run']}/tiles/4/3/2.pbf"
    assert get(server, old)[0] == 200
    record = replace(
        make_slide("viewed", WIDTH, HEIGHT, MPP), file_path=str(tmp_path / "viewed.tif")
    )
    with RunWriter(engine, record) as run:
        run.add("gland", [shapely.box(100, 100, 200, 200)], "benign gland")
        new = run.commit()
    assert get(server, old)[0] == 404
    info = json.loads(get(server, f"/slides/{viewed['id']}/info.json")[2])
    assert info["run_id"] == new.run_id != viewed["run"]
    tile = decode(get(server, f"/slides/{viewed['id']}/runs/{new.run_id}/tiles/0/0/0.pbf")[2])
    assert [f.properties["class"] for f in tile["gland"].features] == ["benign gland"]


# -- in a real browser -------------------------------------------------------------------------


def colour_distance(image: np.ndarray, pixel, colour) -> float:
    """The smallest distance from `colour` of the pixels within 3 px of `pixel` (x, y)."""
    x, y = (round(v) for v in pixel)
    window = image[y - 3 : y + 4, x - 3 : x + 4, :3].astype(float)
    return float(np.sqrt(((window - np.asarray(colour)) ** 2).sum(-1)).min())


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed")
def test_the_slide_viewer_in_chromium(dashboard_url, viewer_port, viewed, tmp_path):
    """The dashboard's slide page: the viewer loads, zooms in and out and pans with the mouse,
    fetches vector tiles and draws their objects in their class colours, hides a layer, and
    shows a clicked gland's measurements and features."""
    from playwright.sync_api import sync_playwright

    overlay_requests = []
    with sync_playwright() as p:
        browser = launch(p)
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.on("request", lambda r: overlay_requests.append(r.url) if ".pbf" in r.url else None)
        page.goto(dashboard_url)
        page.get_by_text("Slide", exact=True).first.click()
        frame = viewer_frame(page)
        assert frame.url == f"http://127.0.0.1:{viewer_port}/viewer?slide={viewed['id']}"
        frame.wait_for_function("window.viewer && window.viewer.renders > 0", timeout=60_000)
        frame.locator("#map").scroll_into_view_if_needed()
        info = frame.evaluate("window.viewer.info")
        assert info["id"] == viewed["id"] and info["run_id"] == viewed["run"]

        def view() -> list[float]:
            return frame.evaluate(
                "(() => { const v = window.viewer.map.getView();"
                " return [v.getZoom(), ...v.getCenter()]; })()"
            )

        def settle(action) -> None:
            before = frame.evaluate("window.viewer.renders")
            action()
            frame.wait_for_function(f"window.viewer.renders > {before}", timeout=30_000)
            page.wait_for_timeout(300)  # let an animation end

        box = frame.locator("#map").bounding_box()
        centre = (box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        page.mouse.move(*centre)
        start = view()
        settle(lambda: page.mouse.wheel(0, -400))
        zoomed = view()
        assert zoomed[0] > start[0]
        settle(lambda: page.mouse.wheel(0, 400))
        assert view()[0] < zoomed[0]

        def drag() -> None:
            page.mouse.move(*centre)
            page.mouse.down()
            page.mouse.move(centre[0] + 120, centre[1] + 60, steps=6)
            page.mouse.up()

        before_pan = view()
        settle(drag)
        panned = view()
        assert panned[1] < before_pan[1] and panned[2] > before_pan[2]  # dragged right and down

        # Full zoom over the gland (level-0 x 1100-1500, y 600-900).
        settle(lambda: frame.evaluate(
            "window.viewer.map.getView().setResolution(1);"
            "window.viewer.map.getView().setCenter([1300, -750]);"
        ))  # fmt: skip
        assert any(f"/runs/{viewed['run']}/tiles/4/" in url for url in overlay_requests)

        def shot(name: str) -> np.ndarray:
            path = tmp_path / f"{name}.png"
            frame.locator("#map").screenshot(path=path)
            return np.asarray(Image.open(path).convert("RGB"))

        def pixel(x: float, y: float) -> list[float]:
            return frame.evaluate(f"window.viewer.map.getPixelFromCoordinate([{x}, {-y}])")

        gland_colour = info["colours"]["malignant gland"]
        nucleus_colour = info["colours"][viewed["classes"][GRID.index((1140, 660))]]
        edge = pixel(1100, 760)  # the gland's left edge, clear of nuclei
        nucleus = pixel(1140, 660)  # a nucleus's centre (the grid's every 40 px from 20)
        shown = shot("shown")
        assert colour_distance(shown, edge, gland_colour) < 40

        nuclei_switch = frame.locator("fieldset[data-table=nucleus] > label").first
        settle(nuclei_switch.click)
        no_nuclei = shot("no-nuclei")
        assert colour_distance(shown, nucleus, nucleus_colour) + 30 < colour_distance(
            no_nuclei, nucleus, nucleus_colour
        )  # the nucleus's fill tints the slide towards its class colour
        settle(nuclei_switch.click)

        gland_switch = frame.locator("fieldset[data-table=gland] > label").first
        settle(gland_switch.click)
        assert colour_distance(shot("no-glands"), edge, gland_colour) > 80
        settle(gland_switch.click)
        assert colour_distance(shot("glands-again"), edge, gland_colour) < 40

        inside = pixel(1160, 640)  # inside the gland, between nuclei
        page.mouse.click(box["x"] + inside[0], box["y"] + inside[1])
        heading = frame.locator(f"#details h2[data-object='gland/{viewed['gland_id']}']")
        heading.wait_for(timeout=30_000)
        assert "malignant gland" in heading.inner_text()
        details = frame.locator("#details").inner_text()
        assert "area_um2\t30,000" in details and "centroid_x_px\t1,300" in details
        assert "Gland features" in details and "nuclei_count" in details
        browser.close()
