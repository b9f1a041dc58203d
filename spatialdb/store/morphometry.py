"""Shape measurements of every object, vectorised over polygons, in µm.

Moments come from Green's theorem over every ring (holes subtract, multipolygons add), with each
axis scaled by its µm per pixel first, so that anisotropic pixels give true lengths. The axes are
those of the ellipse with the shape's second moments (scikit-image's `regionprops` definition:
4·√eigenvalue of the covariance of the area), which makes the results agree with regionprops on
rasterised shapes up to the pixel grid.

| name | unit | definition |
|---|---|---|
| `equivalent_diameter_um` | µm | diameter of the disc of the same area |
| `major_axis_um`, `minor_axis_um` | µm | axes of the ellipse with the same second moments |
| `eccentricity` | | √(1 − minor²/major²): 0 for a disc, towards 1 for a line |
| `orientation_deg` | degrees | major axis from the slide's x axis towards its y (down), (−90, 90] |
| `circularity` | | 4π·area / perimeter² (1 for a disc) |
| `solidity` | | area / convex hull area |
| `extent` | | area / area of the axis-aligned bounding box |
"""

from __future__ import annotations

import numpy as np
import shapely

#: Column names, in the order `shape_measurements` returns them.
MORPHOMETRY = (
    "equivalent_diameter_um",
    "major_axis_um",
    "minor_axis_um",
    "eccentricity",
    "orientation_deg",
    "circularity",
    "solidity",
    "extent",
)


def shape_measurements(geoms: np.ndarray, mpp_x: float, mpp_y: float) -> dict[str, np.ndarray]:
    """`MORPHOMETRY` of each polygon or multipolygon (level-0 px, valid), as float64 arrays."""
    geoms = np.asarray(geoms, dtype=object)
    n = len(geoms)
    parts, part_owner = shapely.get_parts(geoms, return_index=True)
    rings, ring_part = shapely.get_rings(parts, return_index=True)
    ring_owner = part_owner[ring_part]
    coords, point_ring = shapely.get_coordinates(rings, return_index=True)
    # Local frame per object (its first point): no cancellation far from the slide's origin.
    owner = ring_owner[point_ring]
    first = np.zeros(n, dtype=np.int64)
    first[owner[::-1]] = np.arange(len(owner))[::-1]
    xy = (coords - coords[first[owner]]) * (mpp_x, mpp_y)
    # Edges within each ring: point i to point i + 1 of the same ring.
    same = point_ring[:-1] == point_ring[1:]
    x0, y0, x1, y1 = xy[:-1, 0][same], xy[:-1, 1][same], xy[1:, 0][same], xy[1:, 1][same]
    edge_ring = point_ring[:-1][same]
    terms = _moment_terms(x0, y0, x1, y1)
    per_ring = np.stack([np.bincount(edge_ring, t, minlength=len(rings)) for t in terms])
    # Exterior rings (each part's first) count positive and holes negative, whatever their
    # orientation.
    exterior = np.ones(len(rings), dtype=bool)
    exterior[1:] = ring_part[1:] != ring_part[:-1]
    sign = np.sign(per_ring[0]) * np.where(exterior, 1.0, -1.0)
    moments = np.stack([np.bincount(ring_owner, m * sign, minlength=n) for m in per_ring])
    edge_length = np.hypot(x1 - x0, y1 - y0)
    perimeter = np.bincount(ring_owner[edge_ring], edge_length, minlength=n)
    xmin, ymin, xmax, ymax = shapely.bounds(geoms).T
    return _measurements(moments, perimeter, geoms, (xmax - xmin) * (ymax - ymin), mpp_x * mpp_y)


def ring_shape_measurements(
    rings: np.ndarray, geoms: np.ndarray, mpp_x: float, mpp_y: float
) -> dict[str, np.ndarray]:
    """The same for hole-free polygons whose closed rings all have one point count, given as an
    (n, points, 2) array beside the polygons: numpy alone, but for the convex hull."""
    xy = (rings - rings[:, :1]) * (mpp_x, mpp_y)
    x0, y0, x1, y1 = xy[:, :-1, 0], xy[:, :-1, 1], xy[:, 1:, 0], xy[:, 1:, 1]
    moments = np.stack([t.sum(axis=1) for t in _moment_terms(x0, y0, x1, y1)])
    moments *= np.sign(moments[0])
    perimeter = np.hypot(x1 - x0, y1 - y0).sum(axis=1)
    extent = rings.max(axis=1) - rings.min(axis=1)
    return _measurements(moments, perimeter, geoms, extent[:, 0] * extent[:, 1], mpp_x * mpp_y)


def _moment_terms(x0, y0, x1, y1) -> list[np.ndarray]:
    """Per edge, its share of the area and of ∫x, ∫y, ∫x², ∫y², ∫xy (Green's theorem; signed by
    the ring's orientation)."""
    cross = x0 * y1 - x1 * y0
    return [
        cross / 2,
        (x0 + x1) * cross / 6,
        (y0 + y1) * cross / 6,
        (x0 * x0 + x0 * x1 + x1 * x1) * cross / 12,
        (y0 * y0 + y0 * y1 + y1 * y1) * cross / 12,
        (x0 * y1 + 2 * x0 * y0 + 2 * x1 * y1 + x1 * y0) * cross / 24,
    ]


def _measurements(moments, perimeter, geoms, box_px2, px_area) -> dict[str, np.ndarray]:
    area, sx, sy, sxx, syy, sxy = moments
    safe = np.where(area > 0, area, np.nan)
    cx, cy = sx / safe, sy / safe
    mu20, mu02, mu11 = sxx / safe - cx * cx, syy / safe - cy * cy, sxy / safe - cx * cy
    half_trace, spread = (mu20 + mu02) / 2, np.sqrt(((mu20 - mu02) / 2) ** 2 + mu11 * mu11)
    major = 4 * np.sqrt(np.maximum(half_trace + spread, 0))
    minor = 4 * np.sqrt(np.maximum(half_trace - spread, 0))
    orientation = np.degrees(0.5 * np.arctan2(2 * mu11, mu20 - mu02))
    orientation = np.where(orientation <= -90 + 1e-9, orientation + 180, orientation) + 0.0
    hull = shapely.area(shapely.convex_hull(geoms)) * px_area
    box = box_px2 * px_area
    ratio = minor / np.where(major > 0, major, np.nan)
    return {
        "equivalent_diameter_um": np.sqrt(4 * area / np.pi),
        "major_axis_um": major,
        "minor_axis_um": minor,
        "eccentricity": np.sqrt(np.clip(1 - ratio**2, 0, 1)),
        "orientation_deg": orientation,
        "circularity": 4 * np.pi * area / np.where(perimeter > 0, perimeter**2, np.nan),
        "solidity": area / np.where(hull > 0, hull, np.nan),
        "extent": area / np.where(box > 0, box, np.nan),
    }
