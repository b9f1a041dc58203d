"""A synthetic colon-like slide for benchmarks: glands on a jittered grid, lumina inside them,
nuclei lining the glands and scattered in the stroma, and tissue regions from a coarse class map.

    objects = gland_slide(glands=10_000, lumina=15_000, nuclei=1_000_000)
    load_slide(engine, "features", objects)

Every count is exact; shapes are built in vectorised batches (one per vertex count). Objects come
in the order `spatialdb ingest` stores them (`ingest_order`); `shuffled` gives a random order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import shapely

from spatialdb.store.catalog import SlideRecord
from spatialdb.store.loader import RunWriter

MPP = 0.5
#: Side (level-0 px at MPP) of the ingest's post-processing regions (`tiling.REGION_PX` at the
#: CPU presets' 0.5 µm/px).
INGEST_REGION = 1536
#: Glands sit on a grid of this pitch (px); their outer radius stays below half of it.
GLAND_PITCH = 600
TISSUE_TILE = 384
NUCLEAR_CLASSES = np.array(["epithelial", "lymphocyte", "connective", "plasma"])
TISSUE_CLASSES = np.array(["stroma", "normal epithelium", "abnormal epithelium", "inflammatory"])


@dataclass
class SlideObjects:
    width: int
    height: int
    tables: dict[str, tuple[np.ndarray, np.ndarray]]  # table -> (geometries, classes)


def ellipses(centre, a, b, theta, vertices: int, wobble, rng) -> np.ndarray:
    """Closed, star-shaped rings around `centre` ((n, 2)), radii a, b ((n,)), turned by theta."""
    angle = np.linspace(0, 2 * np.pi, vertices, endpoint=False)
    radius = 1 + rng.uniform(-wobble, wobble, (len(centre), vertices))
    x = a[:, None] * np.cos(angle) * radius
    y = b[:, None] * np.sin(angle) * radius
    c, s = np.cos(theta)[:, None], np.sin(theta)[:, None]
    ring = np.stack([centre[:, :1] + c * x - s * y, centre[:, 1:] + s * x + c * y], -1)
    return shapely.polygons(ring)


def gland_slide(
    glands: int = 10_000, lumina: int = 15_000, nuclei: int = 1_000_000, seed: int = 0
) -> SlideObjects:
    rng = np.random.default_rng(seed)
    side = int(np.ceil(np.sqrt(glands)))
    width = height = side * GLAND_PITCH
    cell = np.stack(np.unravel_index(np.arange(glands), (side, side)), -1)[:, ::-1]
    centre = (cell + 0.5) * GLAND_PITCH + rng.uniform(-30, 30, (glands, 2))
    a, b = rng.uniform(150, 250, glands), rng.uniform(100, 150, glands)
    theta = rng.uniform(0, np.pi, glands)
    gland = ellipses(centre, a, b, theta, 96, 0.03, rng)
    gland_class = np.where(rng.random(glands) < 0.7, "gland", "surface-epi")

    # Lumina: one per gland, then a second one in as many glands as are left to reach the count.
    owner = np.concatenate([np.arange(glands), rng.permutation(glands)[: lumina - glands]])
    second = np.arange(len(owner)) >= glands
    offset = np.where(second, 0.35, -0.1)[:, None] * np.stack([a[owner], 0 * a[owner]], -1)
    c, s = np.cos(theta[owner]), np.sin(theta[owner])
    shift = np.stack([c * offset[:, 0], s * offset[:, 0]], -1)
    lr = rng.uniform(0.12, 0.25, len(owner))
    lumen = ellipses(
        centre[owner] + shift, lr * a[owner], lr * b[owner], theta[owner], 32, 0.05, rng
    )

    # Nuclei: 60 % in each gland's epithelial ring, the rest in the stroma between glands.
    in_glands = int(nuclei * 0.6)
    host = rng.integers(0, glands, in_glands)
    phi = rng.uniform(0, 2 * np.pi, in_glands)
    depth = rng.uniform(0.75, 0.92, in_glands)
    gx, gy = depth * a[host] * np.cos(phi), depth * b[host] * np.sin(phi)
    c, s = np.cos(theta[host]), np.sin(theta[host])
    inner = centre[host] + np.stack([c * gx - s * gy, s * gx + c * gy], -1)
    stromal = rng.uniform(10, width - 10, (6 * (nuclei - in_glands), 2))
    from_cell_centre = stromal % GLAND_PITCH - GLAND_PITCH / 2
    stromal = stromal[np.hypot(*from_cell_centre.T) > 0.5 * GLAND_PITCH][: nuclei - in_glands]
    nucleus_centre = np.concatenate([inner, stromal])
    n_vertices = rng.integers(16, 25, nuclei)
    nucleus = np.empty(nuclei, dtype=object)
    for k in np.unique(n_vertices):
        sel = np.flatnonzero(n_vertices == k)
        r = rng.uniform(4, 9, len(sel))
        nucleus[sel] = ellipses(
            nucleus_centre[sel], r, r * rng.uniform(0.6, 1, len(sel)),
            rng.uniform(0, np.pi, len(sel)), int(k), 0.1, rng,
        )  # fmt: skip
    nucleus_class = np.where(
        np.arange(nuclei) < in_glands,
        np.where(rng.random(nuclei) < 0.9, "epithelial", "lymphocyte"),
        NUCLEAR_CLASSES[rng.integers(1, len(NUCLEAR_CLASSES), nuclei)],
    )

    # Tissue regions: a smooth random class map on 384 px tiles, one multipolygon per class.
    tiles = int(np.ceil(width / TISSUE_TILE))
    coarse = rng.integers(0, len(TISSUE_CLASSES), (tiles // 8 + 1, tiles // 8 + 1))
    label = np.kron(coarse, np.ones((8, 8), dtype=int))[:tiles, :tiles]
    label[rng.random(label.shape) < 0.1] = 0
    rows, cols = np.indices(label.shape)
    boxes = shapely.box(
        cols * TISSUE_TILE, rows * TISSUE_TILE,
        np.minimum((cols + 1) * TISSUE_TILE, width), np.minimum((rows + 1) * TISSUE_TILE, height),
    )  # fmt: skip
    present = np.unique(label)
    tissue = np.array(
        [shapely.coverage_union_all(boxes[label == k]) for k in present], dtype=object
    )
    return SlideObjects(
        width,
        height,
        {
            "nucleus": ingest_order(nucleus, nucleus_class),
            "gland": ingest_order(gland, gland_class),
            "lumen": ingest_order(lumen, np.full(len(lumen), "lumen")),
            "tissue_region": (tissue, TISSUE_CLASSES[present]),
        },
    )


def ingest_order(geoms: np.ndarray, classes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The objects in the order ingest stores them: region by region, row by row
    (`inference.tiling`), and top to bottom within a region (instance labels run in raster
    order)."""
    x, y = shapely.get_coordinates(shapely.centroid(geoms)).T
    order = np.lexsort((x, y, x // INGEST_REGION, y // INGEST_REGION))
    return geoms[order], classes[order]


def shuffled(objects: SlideObjects, seed: int = 1) -> SlideObjects:
    """The same objects, each table in a random order."""
    rng = np.random.default_rng(seed)
    tables = {}
    for table, (geoms, classes) in objects.tables.items():
        order = rng.permutation(len(geoms))
        tables[table] = (geoms[order], classes[order])
    return SlideObjects(objects.width, objects.height, tables)


def slide_record(tag: str, objects: SlideObjects) -> SlideRecord:
    return SlideRecord(
        file_path=f"/benchmark/{tag}.svs",
        name=f"benchmark-{tag}",
        fingerprint=f"synthetic-{tag}",
        width=objects.width,
        height=objects.height,
        mpp_x=MPP,
        mpp_y=MPP,
    )


def load_slide(engine, tag: str, objects: SlideObjects) -> int:
    """Store the objects as one run of a synthetic slide; its id."""
    with RunWriter(engine, slide_record(tag, objects), kind="import") as run:
        for table, (geoms, classes) in objects.tables.items():
            run.add(table, geoms, classes)
        return run.commit().slide_id
