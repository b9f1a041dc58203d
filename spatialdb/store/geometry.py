"""Vectorised geometry preparation for loading: validity, repair, measurements in µm.

All functions take numpy arrays of shapely geometries and work on the whole array at once;
only the (rare) invalid geometries are repaired one by one, and that loop is named as such.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import shapely
from shapely import GeometryType


@dataclass
class Prepared:
    """Geometries ready to store, with the index of each in the caller's input."""

    geoms: np.ndarray
    source_index: np.ndarray
    repaired: int
    dropped: int


def prepare_polygons(geoms, *, multi: bool) -> Prepared:
    """2-D, valid, non-empty polygons (or multipolygons when `multi`) from arbitrary input.

    Invalid shapes are repaired with make_valid keeping their polygonal parts; for single-polygon
    tables the largest part stands for the object. What has no area left is dropped and counted.
    """
    geoms = np.asarray(geoms, dtype=object)
    if shapely.has_z(geoms).any():
        geoms = shapely.force_2d(geoms)
    index = np.arange(len(geoms))
    invalid = ~shapely.is_valid(geoms)
    repaired = int(invalid.sum())
    if repaired:
        geoms = geoms.copy()
        geoms[invalid] = _polygonal_parts(_make_valid(geoms[invalid]), multi=multi)
    types = shapely.get_type_id(geoms)
    if multi:
        single = types == GeometryType.POLYGON
        geoms[single] = shapely.multipolygons(geoms[single, None])
        wanted = GeometryType.MULTIPOLYGON
    else:
        split = types == GeometryType.MULTIPOLYGON
        geoms[split] = _largest_parts(geoms[split])
        wanted = GeometryType.POLYGON
    keep = (shapely.get_type_id(geoms) == wanted) & (shapely.area(geoms) > 0)
    return Prepared(geoms[keep], index[keep], repaired, int((~keep).sum()))


def star_shaped_rings(rings: np.ndarray) -> np.ndarray:
    """For closed rings of equal point count, as one (n, points, 2) array: True where the ring
    turns strictly one way around its vertex mean and winds once. Such a ring is star-shaped
    around that point and cannot cross itself, so its polygon is valid; False only means "not
    proven" (GEOS decides). This is a fraction of the cost of GEOS's check for nucleus-like shapes.
    """
    if rings.shape[1] < 4:
        return np.zeros(len(rings), dtype=bool)
    ring = rings[:, :-1]
    d = ring - ring.mean(axis=1, keepdims=True)
    x, y = d[..., 0], d[..., 1]
    x1, y1 = np.roll(x, -1, axis=1), np.roll(y, -1, axis=1)
    cross = x * y1 - x1 * y
    # With every step turning the same way by less than pi, the winding number is the number of
    # crossings of the positive x half-axis in that direction.
    ccw = np.all(cross > 0, axis=1) & (np.sum((y < 0) & (y1 >= 0), axis=1) == 1)
    cw = np.all(cross < 0, axis=1) & (np.sum((y >= 0) & (y1 < 0), axis=1) == 1)
    return (ccw | cw) & np.isfinite(d).all(axis=(1, 2))


def _make_valid(geoms: np.ndarray) -> np.ndarray:
    """make_valid of each shape. GEOS's default (linework) method fails on some rings that cross
    themselves at near-coincident vertices (an exception, or an invalid result); those shapes
    are repaired one by one, with the structure method where linework fails."""
    try:
        fixed = shapely.make_valid(geoms)
    except shapely.errors.GEOSException:
        fixed = np.full(len(geoms), None, dtype=object)
    failed = ~shapely.is_valid(fixed)  # None is not valid
    fixed[failed] = [_make_valid_one(g) for g in geoms[failed]]
    return fixed


def _make_valid_one(geom):
    try:
        fixed = shapely.make_valid(geom)
        if fixed.is_valid:
            return fixed
    except shapely.errors.GEOSException:
        pass
    return shapely.make_valid(geom, method="structure", keep_collapsed=False)


def _polygonal_parts(geoms: np.ndarray, *, multi: bool) -> np.ndarray:
    """Loop over repaired shapes only: keep Polygon parts of collections (merged where the
    parts of a repaired collection overlap)."""
    out = np.empty(len(geoms), dtype=object)
    for i, geom in enumerate(geoms):
        parts = [p for p in shapely.get_parts(geom) if p.geom_type in ("Polygon", "MultiPolygon")]
        polygons = [q for p in parts for q in shapely.get_parts(p)]
        out[i] = shapely.multipolygons(polygons) if polygons else shapely.Polygon()
        if not out[i].is_valid:
            out[i] = shapely.union_all(polygons)
    return out if multi else _largest_parts(out)


def _largest_parts(geoms: np.ndarray) -> np.ndarray:
    """The largest polygon of each multipolygon (an instance is one connected shape)."""
    if len(geoms) == 0:
        return geoms
    parts, owner = shapely.get_parts(geoms, return_index=True)
    order = np.lexsort((-shapely.area(parts), owner))
    first = np.unique(owner[order], return_index=True)[1]
    out = np.full(len(geoms), shapely.Polygon(), dtype=object)
    out[owner[order][first]] = parts[order][first]
    return out


def measurements(geoms: np.ndarray, mpp_x: float, mpp_y: float):
    """Area (µm²), perimeter (µm) and centroid x, y (level-0 px) of each geometry."""
    area_um2 = shapely.area(geoms) * (mpp_x * mpp_y)
    if np.isclose(mpp_x, mpp_y, rtol=1e-9):
        perimeter_um = shapely.length(geoms) * mpp_x
    else:
        scaled = shapely.transform(geoms, lambda xy: xy * np.array([mpp_x, mpp_y]))
        perimeter_um = shapely.length(scaled)
    centroids = shapely.centroid(geoms)
    return area_um2, perimeter_um, shapely.get_x(centroids), shapely.get_y(centroids)


def simple_polygons(geoms: np.ndarray) -> np.ndarray:
    """True for polygons without holes (not multipolygons), whose WKB is one ring."""
    return (shapely.get_type_id(geoms) == GeometryType.POLYGON) & (
        shapely.get_num_interior_rings(geoms) == 0
    )


def ring_measurements(rings: np.ndarray, mpp_x: float, mpp_y: float):
    """Like `measurements`, for hole-free polygons whose closed exterior rings all have the same
    number of points, given as one (n, points, 2) array: numpy alone, no per-geometry calls."""
    origin = rings[:, :1, :]  # local frame: no cancellation far from the slide origin
    x, y = (rings[:, :, 0] - origin[:, :, 0]), (rings[:, :, 1] - origin[:, :, 1])
    x0, x1, y0, y1 = x[:, :-1], x[:, 1:], y[:, :-1], y[:, 1:]
    cross = x0 * y1 - x1 * y0
    twice_area = cross.sum(axis=1)
    perimeter_um = np.sqrt(((x1 - x0) * mpp_x) ** 2 + ((y1 - y0) * mpp_y) ** 2).sum(axis=1)
    cx = ((x0 + x1) * cross).sum(axis=1) / (3 * twice_area) + origin[:, 0, 0]
    cy = ((y0 + y1) * cross).sum(axis=1) / (3 * twice_area) + origin[:, 0, 1]
    return np.abs(twice_area) / 2 * (mpp_x * mpp_y), perimeter_um, cx, cy
