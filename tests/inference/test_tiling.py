"""Region-by-region post-processing: objects that cross tile and region borders come out once
and whole, on synthetic head outputs with known objects."""

import numpy as np
import pytest
from shapely.geometry import Point

from inference import tiling
from inference.predict import POSTPROCESS
from inference.targets import hv_maps

TILE = 64
MPP = 0.5
SETTINGS = {**POSTPROCESS, "contour_px": {"Gland": 4, "Lumen": 3, "Nuclei": 2}}
TYPES = ["nolabel", "other", "inflammatory", "epithelial", "connective"]
GLAND_TYPES = ["nolabel", "benign gland", "malignant gland"]
REGION_TILES, MARGIN_TILES = 4, 2  # in 64 px tiles: many small regions


def disc_channels(shape, discs, contour_px):
    """(inner, contour) probability maps for discs (cy, cx, r): inner inside r - contour_px,
    contour in the ring outside it."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    inner = np.zeros(shape, np.float32)
    contour = np.zeros(shape, np.float32)
    for cy, cx, r in discs:
        d = np.hypot(yy - cy, xx - cx)
        inner[d <= r - contour_px] = 1
        contour[(d > r - contour_px) & (d <= r)] = 1
    return inner, contour


def disc_labels(shape, discs):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    labels = np.zeros(shape, np.int32)
    for i, (cy, cx, r) in enumerate(discs, start=1):
        labels[(np.hypot(yy - cy, xx - cx) <= r) & (labels == 0)] = i
    return labels


def synthetic_tiles(shape, nuclei, glands, hv=False):
    """Tile outputs (the `CHANNELS` of `reduce_tile`) cut from whole-slide maps; with `hv`, the
    nuclei's distance maps too."""
    n_inner, n_contour = disc_channels(shape, nuclei, 2)
    g_inner, _ = disc_channels(shape, glands, 4)
    types = np.where(n_inner + n_contour > 0, 3, 0)  # every nucleus "epithelial"
    gland_types = np.where(g_inner > 0, 2, 0)  # every gland "malignant gland"
    channels = [g_inner, np.zeros(shape), n_inner, n_contour, types / 255.0, gland_types / 255.0]
    if hv:
        channels += list((hv_maps(disc_labels(shape, nuclei)) + 1) / 2)
    full = np.clip(np.rint(np.stack(channels) * 255), 0, 255).astype(np.uint8)
    rows, cols = -(-shape[0] // TILE), -(-shape[1] // TILE)
    padded = np.zeros((len(tiling.CHANNELS), rows * TILE, cols * TILE), np.uint8)
    padded[: len(full), : shape[0], : shape[1]] = full
    return {
        (r, c): padded[:, r * TILE : (r + 1) * TILE, c * TILE : (c + 1) * TILE]
        for r in range(rows)
        for c in range(cols)
    }


def run_regions(shape, tiles, mask=None, hv=False, band=tiling.BAND_REGIONS, spill=False):
    """Objects found region by region as `segment_slide` streams them (with `spill`, tiles idle
    between bands wait in a `TileStore`'s file, else in memory), the most tiles held in memory
    at once and the grid."""
    mask = np.ones(shape, bool) if mask is None else mask
    grid = tiling.Grid.over(shape, (2.0, 2.0), TILE, 16, mask)
    plan = tiling.regions(grid, REGION_TILES, MARGIN_TILES, band=band)
    sched = tiling.schedule(grid, plan, band=band)
    held = tiling.TileStore() if spill else {}
    found = {"Nuclei": [], "Gland": []}
    next_region = 0
    max_held = 0
    for done, rc in enumerate(sched.order, start=1):  # the inference stream, tile by tile
        held[rc] = tiles[rc]
        max_held = max(max_held, len(getattr(held, "memory", held)))
        while next_region < len(plan) and sched.ready_after[next_region] <= done:
            region = plan[next_region]
            job = tiling.region_job(
                grid,
                region,
                held,
                settings=SETTINGS,
                mpp=MPP,
                nucleus_types=TYPES,
                gland_types=GLAND_TYPES,
                hv=hv,
            )
            for tile in sched.done_after[region.index]:
                held.pop(tile)
            if spill:
                for tile in sched.idle_after[region.index]:
                    held.spill(tile)
            objects, _ = tiling.process_region(job)
            for o in objects:
                if o.task in found:
                    found[o.task].extend(zip(o.geoms, o.classes, strict=True))
            next_region += 1
    assert next_region == len(plan)
    if spill:
        # all read back; the file holds the columns astride one band edge at most
        assert not held.spilled and 0 < held.slots <= 2 * MARGIN_TILES * grid.rows
    return found, max_held, grid


def test_objects_across_tile_and_region_borders_come_out_once_and_whole():
    shape = (700, 900)
    # Nuclei on tile borders (multiples of 64), on region borders (multiples of 256) and corners.
    nuclei = [(64, 100, 8), (256, 256, 9), (200, 320, 7), (511, 640, 8), (400, 830, 8)]
    glands = [(256, 512, 90), (520, 250, 70)]  # each spans several tiles and two regions
    found, _, _ = run_regions(shape, synthetic_tiles(shape, nuclei, glands))

    assert len(found["Nuclei"]) == len(nuclei)
    assert len(found["Gland"]) == len(glands)
    for kind, truth in (("Nuclei", nuclei), ("Gland", glands)):
        for cy, cx, r in truth:
            # level-0 = 2 × model pixels
            expected = Point(2 * cx, 2 * cy).buffer(2 * r)
            matches = [g for g, _ in found[kind] if g.intersects(expected)]
            assert len(matches) == 1, (kind, cy, cx)
            overlap = matches[0].intersection(expected).area / expected.union(matches[0]).area
            assert overlap > 0.85, (kind, cy, cx, overlap)
    assert {c for _, c in found["Nuclei"]} == {"epithelial"}
    assert {c for _, c in found["Gland"]} == {"malignant gland"}  # the type head's majority


def test_nuclei_from_distance_maps_split_and_come_out_once_across_borders():
    shape = (700, 900)
    # Pairs of touching nuclei astride tile and region borders; the inner/contour channels see
    # each pair as one blob (no contour between them), only the distance maps separate them.
    pairs = [
        ((64, 96, 8), (64, 110, 8)),
        ((250, 256, 9), (264, 256, 9)),
        ((511, 630, 8), (511, 645, 8)),
    ]
    nuclei = [disc for pair in pairs for disc in pair]
    tiles = synthetic_tiles(shape, nuclei, [], hv=True)
    for tile in tiles.values():
        blob = (tile[2] > 0) | (tile[3] > 0)
        tile[2], tile[3] = np.where(blob, 255, 0), 0
    found, _, _ = run_regions(shape, tiles, hv=True)
    assert len(found["Nuclei"]) == len(nuclei)
    for cy, cx, r in nuclei:
        expected = Point(2 * cx, 2 * cy).buffer(2 * r)
        best = max(
            g.intersection(expected).area / g.union(expected).area for g, _ in found["Nuclei"]
        )
        assert best > 0.75, (cy, cx, best)
    without_hv, _, _ = run_regions(shape, tiles)
    assert len(without_hv["Nuclei"]) == len(pairs)  # the inner/contour path alone merges them


def test_memory_holds_a_band_of_tiles_not_the_slide():
    shape = (64 * 40, 64 * 12)  # 40 rows of tiles
    tiles = synthetic_tiles(shape, [], [])
    _, max_held, grid = run_regions(shape, tiles, spill=True)
    band = (REGION_TILES + 2 * MARGIN_TILES) * grid.cols
    assert max_held <= band < grid.rows * grid.cols / 3


def test_bands_hold_their_own_width_and_idle_tiles_wait_in_a_file():
    shape = (64 * 14, 64 * 40)  # 40 columns of tiles: five bands of two 4-tile regions
    nuclei = [(64 * r + 20, 64 * c + 30, 7) for r in range(0, 14, 3) for c in range(0, 40, 3)]
    glands = [(300, 64 * 8 - 4, 60), (600, 64 * 24 + 10, 70)]  # astride band edges
    tiles = synthetic_tiles(shape, nuclei, glands)
    found, max_held, grid = run_regions(shape, tiles, spill=True)
    window_cols = tiling.BAND_REGIONS * REGION_TILES + 2 * MARGIN_TILES
    assert max_held <= (REGION_TILES + 2 * MARGIN_TILES) * window_cols < grid.cols * 6
    # The same objects as visiting the slide row by row across its whole width.
    rows, _, _ = run_regions(shape, tiles, band=grid.cols)
    for kind in ("Nuclei", "Gland"):
        assert len(found[kind]) == len(rows[kind]) > 0
        assert sorted(g.wkb for g, _ in found[kind]) == sorted(g.wkb for g, _ in rows[kind])


def test_no_objects_outside_the_tissue_mask():
    shape = (512, 512)
    nuclei = [(100, 100, 8), (400, 400, 8)]
    mask = np.zeros((64, 64), bool)
    mask[:32, :32] = True  # top-left quarter only
    found, _, grid = run_regions(shape, synthetic_tiles(shape, nuclei, []), mask)
    assert len(found["Nuclei"]) == 1
    assert found["Nuclei"][0][0].centroid.distance(Point(200, 200)) < 4
    assert not grid.tissue[-1, -1]


@pytest.mark.parametrize("holes", [False, True])
def test_mask_polygons_outline_the_mask(holes):
    mask = np.zeros((40, 50), bool)
    mask[5:30, 10:45] = True
    if holes:
        mask[10:20, 20:30] = False
    polygons = tiling.mask_polygons(mask)
    assert len(polygons) == 1 and polygons[0].is_valid
    assert polygons[0].area == pytest.approx(mask.sum(), rel=0.08)
    assert len(polygons[0].interiors) == int(holes)


def test_regions_cover_the_same_pixels_whatever_the_tile_size():
    assert tiling.region_shape(384, 0.5) == (8, 2)
    assert tiling.region_shape(768, 0.5) == (4, 1)
    assert tiling.region_shape(1536, 0.25) == (2, 1)  # the margin is the same tissue at 40x
