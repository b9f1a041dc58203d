"""Whole-slide post-processing in bounded memory, without seams.

The network's kept outputs tile the slide on a grid (`Grid`, at the model's resolution). The grid
is cut into square *regions* of about `REGION_PX` per side (whole tiles). Each region is
post-processed on a window that adds at least `GLAND_MARGIN_UM` of neighbouring output on every
side (`NUCLEI_MARGIN_UM` for nuclei), and keeps only the objects whose centroid lies in its own
core. Cores partition the slide, so every object comes out exactly once, and whole as long as it
reaches no further than the margin beyond its core (larger glands that touch the window edge are
counted as `truncated`).

Regions are visited in vertical bands `BAND_REGIONS` regions wide, row by row within a band, and
tiles are inferred in the order the regions need them, so that only the tiles still needed by a
later region of the band (about 2 × margin rows of the band's width) are held in memory, as
11 uint8 channels per pixel (`CHANNELS`): the heads' outputs and the tile's own RGB pixels,
from which each nucleus's stain intensity is measured (`inference.intensity`). Tiles at a band's
edge that the next band needs again wait in a temporary file (`TileStore`): memory does not grow
with the slide's width or height.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, field

import cv2
import numpy as np
import shapely
from scipy import ndimage
from shapely.geometry import MultiPolygon, Polygon

from inference.intensity import RING_UM, nucleus_intensity
from inference.network import NUCLEI_HV
from inference.postprocess import majority_types, type_map
from inference.predict import instances

#: Per-pixel channels kept of each tile output, as uint8 (probabilities × 255, a type index, a
#: distance map's value in [-1, 1] as (value + 1) × 127.5, zero for weights without them; the
#: slide's RGB pixels).
CHANNELS = (
    "gland_inner",
    "lumen_inner",
    "nuclei_inner",
    "nuclei_contour",
    "nuclei_type",
    "gland_type",
    "nuclei_h",
    "nuclei_v",
    "red",
    "green",
    "blue",
)
#: The CHANNELS of glands and lumina, post-processed over a region's whole window.
REGION_CHANNELS = tuple(CHANNELS.index(c) for c in ("gland_inner", "lumen_inner", "gland_type"))
#: The leading CHANNELS that hold probabilities (the rest are type indices and pixel values).
PROBABILITY_CHANNELS = 4
#: Where the distance maps and the RGB pixels lie among the CHANNELS.
HV_CHANNELS = slice(CHANNELS.index("nuclei_h"), CHANNELS.index("nuclei_v") + 1)
RGB_CHANNELS = slice(CHANNELS.index("red"), CHANNELS.index("blue") + 1)
REGION_PX = 3072
GLAND_MARGIN_UM = 384.0
#: Regions per band (2 regions of 3,072 px: 3 mm of tissue at 0.5 µm/px).
BAND_REGIONS = 2
NUCLEI_MARGIN_UM = 32.0


@dataclass
class Objects:
    """Objects of one kind (`Nuclei`, `Gland`, `Lumen` or `Tissue`) as shapely polygons in
    level-0 pixels, with a class name and a probability each."""

    task: str
    geoms: list
    classes: list[str]
    probability: np.ndarray
    measurements: dict[str, np.ndarray] = field(default_factory=dict)  # per object, as geoms

    def __len__(self) -> int:
        return len(self.geoms)


@dataclass(frozen=True)
class Grid:
    """Kept-output tiles over a slide at the model's resolution. `shape` is the slide's (h, w)
    there, `scale` the level-0 pixels per model pixel (x, y), `mask` the slide's tissue mask
    (any resolution) and `tissue` the (rows, cols) tiles whose input patch touches tissue."""

    tile: int
    context: int
    shape: tuple[int, int]
    scale: tuple[float, float]
    mask: np.ndarray = field(repr=False)
    tissue: np.ndarray = field(repr=False)

    @property
    def rows(self) -> int:
        return self.tissue.shape[0]

    @property
    def cols(self) -> int:
        return self.tissue.shape[1]

    @classmethod
    def over(cls, shape, scale, tile: int, context: int, mask: np.ndarray) -> Grid:
        """The grid over a slide of (h, w) `shape` whose tissue `mask` covers the whole slide
        at a lower resolution."""
        h, w = shape
        rows, cols = -(-h // tile), -(-w // tile)
        integral = cv2.integral(mask.astype(np.uint8))
        fy, fx = mask.shape[0] / h, mask.shape[1] / w

        def bounds(start, size, factor, limit):
            low = np.clip(np.floor((start - context) * factor), 0, limit).astype(int)
            high = np.clip(np.ceil((start + size + context) * factor), 0, limit).astype(int)
            return low, high

        y0, y1 = bounds(np.arange(rows) * tile, tile, fy, mask.shape[0])
        x0, x1 = bounds(np.arange(cols) * tile, tile, fx, mask.shape[1])
        sums = integral[y1][:, x1] - integral[y0][:, x1] - integral[y1][:, x0] + integral[y0][:, x0]
        return cls(tile, context, (h, w), (float(scale[0]), float(scale[1])), mask, sums > 0)


@dataclass(frozen=True)
class Region:
    """A square of tiles (its core) and the tiles of its window."""

    index: int
    core: tuple[int, int, int, int]  # tile rows/cols [r0, r1) × [c0, c1)
    window: tuple[int, int, int, int]


def region_shape(tile: int, mpp: float) -> tuple[int, int]:
    """Core side and margin of regions, in tiles of `tile` px at `mpp` µm/px: `REGION_PX` and at
    least `GLAND_MARGIN_UM` whatever the tile size (8 and 2 tiles of 384 px at 0.5 µm/px, 4 and 1
    of 768 px; 2 and 1 of 1,536 px at 0.25 µm/px)."""
    return max(1, round(REGION_PX / tile)), max(1, math.ceil(GLAND_MARGIN_UM / mpp / tile))


def regions(grid: Grid, size: int, margin: int, band: int = BAND_REGIONS):
    """Regions with tissue in their core, band by band (`band` regions wide), row by row within
    a band (`size` and `margin` in tiles, as `region_shape` gives them). A slide that fits in one
    window is one region: windows around smaller cores would only repeat its post-processing."""
    if grid.rows <= size + 2 * margin and grid.cols <= size + 2 * margin:
        size = max(grid.rows, grid.cols)
    out = []
    starts = [
        (r0, c0)
        for b0 in range(0, grid.cols, size * band)
        for r0 in range(0, grid.rows, size)
        for c0 in range(b0, min(b0 + size * band, grid.cols), size)
    ]
    for r0, c0 in starts:
        r1, c1 = min(r0 + size, grid.rows), min(c0 + size, grid.cols)
        if grid.tissue[r0:r1, c0:c1].any():
            window = (
                max(0, r0 - margin),
                min(grid.rows, r1 + margin),
                max(0, c0 - margin),
                min(grid.cols, c1 + margin),
            )
            out.append(Region(len(out), (r0, r1, c0, c1), window))
    return out


@dataclass
class Schedule:
    """Tissue tiles in inference order (each once, as the regions need them); per region, how
    many tiles of `order` must be done before it can run, the tiles no later region uses, and the
    tiles idle until a region more than a band's row later."""

    order: list[tuple[int, int]]
    ready_after: list[int]
    done_after: list[list[tuple[int, int]]]
    idle_after: list[list[tuple[int, int]]]


def schedule(grid: Grid, plan: list[Region], band: int = BAND_REGIONS) -> Schedule:
    """Tiles in the order the regions of `plan`, in turn, need them; tiles whose next use lies
    more than `band` regions ahead are idle in between (a band's row has at most `band`)."""
    order, ready_after, last_use = [], [], {}
    idle_after: list[list[tuple[int, int]]] = [[] for _ in plan]
    for region in plan:
        r0, r1, c0, c1 = region.window
        for r in range(r0, r1):
            for c in range(c0, c1):
                if grid.tissue[r, c]:
                    if (r, c) not in last_use:
                        order.append((r, c))
                    elif region.index - last_use[(r, c)] > band:
                        idle_after[last_use[(r, c)]].append((r, c))
                    last_use[(r, c)] = region.index
        ready_after.append(len(order))
    done_after: list[list[tuple[int, int]]] = [[] for _ in plan]
    for rc, last in last_use.items():
        done_after[last].append(rc)
    return Schedule(order, ready_after, done_after, idle_after)


class TileStore:
    """Inferred tiles until their last use: in memory, or while they are idle (waiting for the
    next band) in slots of one anonymous temporary file, which the system removes whenever the
    process ends, killed or not. Tiles all have one shape, so freed slots are reused: the file
    holds at most the tiles idle at once (two columns of tiles per band edge)."""

    def __init__(self):
        self.memory: dict[tuple[int, int], np.ndarray] = {}
        self.spilled: dict[tuple[int, int], tuple[int, tuple, np.dtype]] = {}  # slot, shape, dtype
        self.free: list[int] = []
        self.slots = 0
        self.file = tempfile.TemporaryFile(prefix="spatialdb-tiles-")  # noqa: SIM115 (close)

    def __setitem__(self, rc: tuple[int, int], tile: np.ndarray) -> None:
        self.memory[rc] = tile

    def __contains__(self, rc) -> bool:
        return rc in self.memory or rc in self.spilled

    def __getitem__(self, rc: tuple[int, int]) -> np.ndarray:
        if rc not in self.memory and rc in self.spilled:
            slot, shape, dtype = self.spilled.pop(rc)
            tile = np.empty(shape, dtype)
            self.file.seek(slot * tile.nbytes)
            self.file.readinto(memoryview(tile).cast("B"))
            self.free.append(slot)
            self.memory[rc] = tile
        return self.memory[rc]

    def spill(self, rc: tuple[int, int]) -> None:
        if rc in self.memory:
            tile = np.ascontiguousarray(self.memory.pop(rc))
            slot = self.free.pop() if self.free else self.slots
            self.slots = max(self.slots, slot + 1)
            self.file.seek(slot * tile.nbytes)
            self.file.write(memoryview(tile).cast("B"))
            self.spilled[rc] = (slot, tile.shape, tile.dtype)

    def pop(self, rc: tuple[int, int]) -> None:
        self.memory.pop(rc, None)
        if rc in self.spilled:
            self.free.append(self.spilled.pop(rc)[0])

    def close(self) -> None:
        self.file.close()


def reduce_tile(heads: dict[str, np.ndarray], rgb: np.ndarray | None = None) -> np.ndarray:
    """The `CHANNELS` of one tile from its head outputs (C, h, w) and its RGB pixels (3, h, w)
    as (11, h, w) uint8 (RGB zero when not given)."""

    def u8(p):
        return np.clip(np.rint(p.astype(np.float32) * 255), 0, 255).astype(np.uint8)

    hv = heads.get(NUCLEI_HV)
    distance = [u8((hv[k] + 1) / 2) for k in (0, 1)] if hv is not None else []
    tile = np.zeros((len(CHANNELS), *heads["Nuclei-INST"].shape[1:]), np.uint8)
    tile[: HV_CHANNELS.start + len(distance)] = [
        u8(heads["Gland-INST"][1]),
        u8(heads["Lumen-INST"][1]),
        u8(heads["Nuclei-INST"][1]),
        u8(heads["Nuclei-INST"][2]),
        type_map(heads["Nuclei-TYPE"]),
        type_map(heads["Gland-TYPE"]),
        *distance,
    ]
    if rgb is not None:
        tile[RGB_CHANNELS] = rgb
    return tile


def assemble(grid: Grid, region: Region, tiles: dict) -> tuple[np.ndarray, tuple[int, int]]:
    """The region's window as one (11, H, W) array, cropped to the slide, and its top-left (y, x)
    in model pixels. Outside the tissue mask it is zero: no objects on glass, and none cut off
    by the edge of the inferred tiles."""
    r0, r1, c0, c1 = region.window
    t = grid.tile
    y0, x0 = r0 * t, c0 * t
    h, w = min(r1 * t, grid.shape[0]) - y0, min(c1 * t, grid.shape[1]) - x0
    window = np.zeros((len(CHANNELS), (r1 - r0) * t, (c1 - c0) * t), np.uint8)
    for r in range(r0, r1):
        for c in range(c0, c1):
            if (r, c) in tiles:
                window[:, (r - r0) * t : (r - r0 + 1) * t, (c - c0) * t : (c - c0 + 1) * t] = tiles[
                    (r, c)
                ]
    fy, fx = grid.mask.shape[0] / grid.shape[0], grid.mask.shape[1] / grid.shape[1]
    ys = np.minimum(((np.arange(y0, y0 + h) + 0.5) * fy).astype(int), grid.mask.shape[0] - 1)
    xs = np.minimum(((np.arange(x0, x0 + w) + 0.5) * fx).astype(int), grid.mask.shape[1] - 1)
    window = window[:, :h, :w]
    window[:PROBABILITY_CHANNELS] *= grid.mask[np.ix_(ys, xs)]
    return window, (y0, x0)


@dataclass
class RegionJob:
    """Everything a worker process needs to post-process one region: the `REGION_CHANNELS` of
    its whole window, and all `CHANNELS` of the part where nuclei are sought (its core plus
    `NUCLEI_MARGIN_UM`), so that no more than that travels to the worker."""

    window: np.ndarray  # (3, H, W) REGION_CHANNELS
    origin: tuple[int, int]
    nuclear: np.ndarray  # (11, h, w) CHANNELS
    nuclear_origin: tuple[int, int]
    core: tuple[int, int, int, int]  # model pixels y0, y1, x0, x1
    slide_shape: tuple[int, int]
    scale: tuple[float, float]
    settings: dict
    mpp: float
    nucleus_types: list[str]
    gland_types: list[str]
    hv: bool = False  # the distance-map channels hold the weights' `Nuclei-HV`


def region_job(grid: Grid, region: Region, tiles: dict, **fields) -> RegionJob:
    window, (oy, ox) = assemble(grid, region, tiles)
    r0, r1, c0, c1 = region.core
    t = grid.tile
    y0, y1, x0, x1 = core = (r0 * t, min(r1 * t, grid.shape[0]), c0 * t, min(c1 * t, grid.shape[1]))
    m = round(NUCLEI_MARGIN_UM / fields["mpp"])
    ny0, nx0 = max(y0 - m, oy), max(x0 - m, ox)
    ny1, nx1 = min(y1 + m, oy + window.shape[1]), min(x1 + m, ox + window.shape[2])
    nuclear = window[:, ny0 - oy : ny1 - oy, nx0 - ox : nx1 - ox].copy()
    regions_ = window[list(REGION_CHANNELS)]
    return RegionJob(
        regions_, (oy, ox), nuclear, (ny0, nx0), core, grid.shape, grid.scale, **fields
    )


def process_region(job: RegionJob) -> tuple[list[Objects], dict]:
    """Instances of one region as polygons, and counts (`truncated` glands)."""
    gland, lumen, gland_type = job.window  # uint8: probabilities × 255, type indices
    # Nuclei on the core plus a small margin; glands and lumina on the whole window.
    inner, contour = (job.nuclear[k].astype(np.float32) / 255 for k in (2, 3))
    maps = {"Nuclei-INST": (None, inner, contour)}
    if job.hv:
        maps[NUCLEI_HV] = job.nuclear[HV_CHANNELS].astype(np.float32) / 127.5 - 1
    nuclei = instances(maps, job.settings, job.mpp)["Nuclei"]
    regions_ = instances(
        {"Gland-INST": (None, gland, None), "Lumen-INST": (None, lumen, None)},
        job.settings,
        job.mpp,
    )

    out = []
    kept, geoms, _ = _owned_polygons(nuclei, job.nuclear_origin, job)
    types = majority_types(nuclei, job.nuclear[4], len(job.nucleus_types))
    classes = [job.nucleus_types[types[i][0]] if i in types else "nucleus" for i in kept]
    prob = np.array([types[i][1] if i in types else np.nan for i in kept], np.float32)
    measured = {}
    if kept:
        rgb = job.nuclear[RGB_CHANNELS].transpose(1, 2, 0)
        ring_px = max(1, round(RING_UM / job.mpp))
        index = np.array(kept) - 1
        measured = {k: v[index] for k, v in nucleus_intensity(nuclei, rgb, ring_px).items()}
    out.append(Objects("Nuclei", geoms, classes, prob, measured))

    truncated = 0
    border = _window_border(regions_["Gland"], job)
    for task, probs in (("Gland", gland), ("Lumen", lumen)):
        labels = regions_[task]
        kept, geoms, pixels = _owned_polygons(labels, job.origin, job)
        mean = np.array([probs[box][mask].mean() / 255 for box, mask in pixels])
        classes = [task.lower()] * len(kept)
        if task == "Gland":
            truncated = len(set(kept) & border)
            types = majority_types(labels, gland_type, len(job.gland_types))
            classes = [job.gland_types[types[i][0]] if i in types else "gland" for i in kept]
        out.append(Objects(task, geoms, classes, mean.astype(np.float32)))
    return out, {"truncated": truncated}


def _owned_polygons(labels: np.ndarray, origin, job: RegionJob) -> tuple[list[int], list, list]:
    """Labels whose centroid lies in the job's core, their outlines in level-0 pixels and their
    pixels (bounding box, mask within it)."""
    y0, y1, x0, x1 = job.core
    oy, ox = origin
    kept, outlines, pixels = [], [], []
    for label, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        mask = labels[box] == label
        ys, xs = np.nonzero(mask)
        cy, cx = ys.mean() + box[0].start + oy, xs.mean() + box[1].start + ox
        if not (y0 <= cy < y1 and x0 <= cx < x1):
            continue
        # Contours run through boundary pixel centres (+0.5) at the model's resolution.
        offset = np.array([box[1].start + ox + 0.5, box[0].start + oy + 0.5])
        kept.append(label)
        pixels.append((box, mask))
        outlines.append(Polygon(_outline(mask) + offset))
    # Out by half a pixel to the pixels' outer edges (else small nuclei lose ~10 % of their
    # area), then to level 0.
    grown = shapely.buffer(np.array(outlines, dtype=object), 0.5, join_style="mitre")
    geoms = shapely.transform(grown, lambda c: c * job.scale)
    return kept, list(geoms), pixels


def _outline(mask: np.ndarray) -> np.ndarray:
    """The outer contour of a filled object as (n, 2) x, y; a pixel square for tiny ones."""
    padded = np.zeros((mask.shape[0] + 2, mask.shape[1] + 2), np.uint8)
    padded[1:-1, 1:-1] = mask
    contours, _ = cv2.findContours(padded, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    contour = max(contours, key=cv2.contourArea)[:, 0, :].astype(np.float64) - 1
    if len(contour) < 3:
        x, y = contour.min(axis=0)
        return np.array([[x - 0.5, y - 0.5], [x + 0.5, y - 0.5], [x + 0.5, y + 0.5]])
    return contour


def _window_border(labels: np.ndarray, job: RegionJob) -> set[int]:
    """Labels touching a window edge that is not the slide's edge (possibly cut off)."""
    oy, ox = job.origin
    h, w = labels.shape
    edges = []
    if oy > 0:
        edges.append(labels[0])
    if ox > 0:
        edges.append(labels[:, 0])
    if oy + h < job.slide_shape[0]:
        edges.append(labels[-1])
    if ox + w < job.slide_shape[1]:
        edges.append(labels[:, -1])
    return set(np.unique(np.concatenate(edges)).tolist()) - {0} if edges else set()


def tissue_regions(
    grid: Grid, tile_classes: dict, mask: np.ndarray, class_names: list[str]
) -> Objects:
    """One multipolygon per tissue class (background excluded): the tissue mask where the
    patch-classification head gave that class to the tile, with the class's mean probability."""
    h, w = mask.shape
    # Tile of each mask pixel.
    rows = np.minimum((np.arange(h) + 0.5) * grid.shape[0] / h // grid.tile, grid.rows - 1)
    cols = np.minimum((np.arange(w) + 0.5) * grid.shape[1] / w // grid.tile, grid.cols - 1)
    tile_class = np.full((grid.rows, grid.cols), -1, np.int16)
    for (r, c), probs in tile_classes.items():
        tile_class[r, c] = int(np.argmax(probs))
    pixel_class = np.where(mask, tile_class[rows.astype(int)][:, cols.astype(int)], -1)
    # Mask pixel corners to level 0.
    sx = grid.shape[1] / w * grid.scale[0]
    sy = grid.shape[0] / h * grid.scale[1]
    geoms, classes, probability = [], [], []
    for k, name in enumerate(class_names):
        if k == 0 or not (pixel_class == k).any():
            continue
        polygons = mask_polygons(pixel_class == k)
        geoms.append(MultiPolygon([_scaled(p, sx, sy) for p in polygons]))
        classes.append(name)
        probability.append(np.mean([p[k] for p in tile_classes.values() if np.argmax(p) == k]))
    return Objects("Tissue", geoms, classes, np.array(probability, np.float32))


def mask_polygons(mask: np.ndarray) -> list[Polygon]:
    """Polygons (with holes) outlining a boolean mask, in pixel-corner coordinates."""
    # Upsample ×2 so that contour points (pixel centres) fall on the original pixel corners.
    big = np.kron(mask.astype(np.uint8), np.ones((2, 2), np.uint8))
    contours, hierarchy = cv2.findContours(np.pad(big, 1), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if hierarchy is None:
        return []
    out = []
    for i, (_, _, first_child, parent) in enumerate(hierarchy[0]):
        if parent != -1 or len(contours[i]) < 3:
            continue
        holes = []
        child = first_child
        while child != -1:
            if len(contours[child]) >= 3:
                holes.append(_corners(contours[child]))
            child = hierarchy[0][child][0]
        out.append(Polygon(_corners(contours[i]), holes))
    return out


def _corners(contour: np.ndarray) -> np.ndarray:
    return (contour[:, 0, :].astype(np.float64) - 1 + 0.5) / 2


def _scaled(polygon: Polygon, sx: float, sy: float) -> Polygon:
    def scale(ring):
        return np.asarray(ring.coords) * (sx, sy)

    return Polygon(scale(polygon.exterior), [scale(r) for r in polygon.interiors])
