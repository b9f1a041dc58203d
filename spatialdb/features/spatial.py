"""Slide-level spatial statistics of the nuclei around the glands, for `slide_spatial_feature`.

From the slide's nuclei (centroid in µm, class, stored measurements), glands and tissue regions
(polygons in µm):

- `compartment_area_mm2` and `density_per_mm2` per nuclear class in three compartments: *glands*
  (centroid inside a gland), *stroma* (tissue outside glands) and the *border* (within
  `BORDER_UM` of a gland's boundary, on either side, within the tissue);
- `immune`: nuclei of the immune classes inside glands and outside them within `IMMUNE_UM` of a
  gland, counted and per mm of gland boundary;
- `cross_k`: Ripley's cross-K of each ordered pair of classes at `CROSS_K_RADII_UM`, as the ratio
  K_AB(r) / πr² (1 for independent classes spread at random over the tissue; above 1, class B
  gathers around class A); no edge correction, so it reads low near the tissue's edge;
- `nucleus_feature_quantiles`: per feature and class, the mean and the 5th-95th percentiles.

Point-in-polygon and distance tests go through shapely's STRtree and pair counts through scipy's
dual k-d tree (`count_neighbors`): compiled code, no Python loop over nuclei.
"""

from __future__ import annotations

import numpy as np
import shapely
from scipy.spatial import cKDTree

BORDER_UM = 50.0
IMMUNE_UM = 20.0
CROSS_K_RADII_UM = (10.0, 25.0, 50.0)
#: Nuclear classes counted as immune cells (CoNSeP's merged class and the finer ones).
IMMUNE_CLASSES = ("inflammatory", "lymphocyte", "plasma", "neutrophil", "eosinophil")
QUANTILES = {"q05": 0.05, "q25": 0.25, "q50": 0.5, "q75": 0.75, "q95": 0.95}


def spatial_statistics(
    centroids_um: np.ndarray,
    classes: np.ndarray,
    glands_um: np.ndarray,
    tissue_um: np.ndarray,
    features: dict[str, np.ndarray],
) -> dict:
    """The statistics above as a JSON-ready dict (see the module's docstring)."""
    points = np.asarray(centroids_um, dtype=float).reshape(-1, 2)
    classes = np.asarray(classes, dtype=object)
    names = sorted(set(classes))
    glands = shapely.union_all(glands_um) if len(glands_um) else shapely.Polygon()
    tissue = shapely.union_all(tissue_um) if len(tissue_um) else None
    in_gland = _inside(points, glands)
    border = shapely.buffer(shapely.boundary(glands), BORDER_UM)
    if tissue is not None:
        border = shapely.intersection(border, shapely.union(tissue, glands))
    in_border = _inside(points, border)
    areas = {
        "glands": shapely.area(glands),
        "stroma": shapely.area(shapely.difference(tissue, glands)) if tissue is not None else None,
        "border": shapely.area(border),
    }
    members = {"glands": in_gland, "stroma": ~in_gland, "border": in_border}
    density = {
        place: _per_mm2({c: int(np.sum(members[place] & (classes == c))) for c in names}, area)
        for place, area in areas.items()
    }
    boundary_mm = shapely.length(shapely.boundary(glands)) / 1000
    immune = np.isin(classes, IMMUNE_CLASSES)
    near = ~in_gland & _inside(points, shapely.buffer(glands, IMMUNE_UM))
    counts = {
        "inside_glands": int(np.sum(immune & in_gland)),
        "near_glands": int(np.sum(immune & near)),
    }
    study_area = areas["stroma"] + areas["glands"] if tissue is not None else _hull_area(points)
    return {
        "compartment_area_mm2": {k: None if a is None else a / 1e6 for k, a in areas.items()},
        "density_per_mm2": density,
        "immune": {
            "classes": [c for c in IMMUNE_CLASSES if c in names],
            "within_um": IMMUNE_UM,
            "gland_boundary_mm": boundary_mm,
            **counts,
            **{
                f"{k}_per_mm_boundary": v / boundary_mm if boundary_mm > 0 else None
                for k, v in counts.items()
            },
        },
        "cross_k": cross_k(points, classes, names, study_area),
        "nucleus_feature_quantiles": feature_quantiles(features, classes, names),
    }


def cross_k(points: np.ndarray, classes: np.ndarray, names: list[str], area_um2: float) -> dict:
    """{"A|B": {"10_um": K_AB(10) / π·10², ...}} for every ordered pair of classes (A = B:
    Ripley's K, the nucleus itself not counted)."""
    trees = {c: cKDTree(points[classes == c]) for c in names}
    radii = np.array(CROSS_K_RADII_UM)
    out = {}
    for a in names:
        for b in names:
            n_a, n_b = trees[a].n, trees[b].n
            pairs = trees[a].count_neighbors(trees[b], radii).astype(float)
            if a == b:
                pairs -= n_a  # each nucleus with itself
                n_b -= 1
            ratio = area_um2 * pairs / (max(n_a * n_b, 1) * np.pi * radii**2)
            usable = n_a > 0 and n_b > 0 and area_um2 > 0
            out[f"{a}|{b}"] = {
                f"{r:g}_um": float(v) if usable else None for r, v in zip(radii, ratio, strict=True)
            }
    return out


def feature_quantiles(features: dict[str, np.ndarray], classes: np.ndarray, names: list[str]):
    """{feature: {class: {"mean", "q05", ..., "q95"}}} over the nuclei with a value."""
    out = {}
    for feature, values in features.items():
        values = np.asarray(values, dtype=float)
        out[feature] = {}
        for name in names:
            mine = values[(classes == name) & np.isfinite(values)]
            if len(mine) == 0:
                continue
            stats = np.quantile(mine, list(QUANTILES.values()))
            out[feature][name] = {"mean": float(mine.mean())} | {
                k: float(v) for k, v in zip(QUANTILES, stats, strict=True)
            }
    return out


def _inside(points: np.ndarray, area) -> np.ndarray:
    """Which of the (n, 2) points lie inside (or on) `area`: GEOS's prepared, indexed
    point-in-area test, for all points at once."""
    shapely.prepare(area)
    return shapely.intersects_xy(area, points[:, 0], points[:, 1])


def _per_mm2(counts: dict[str, int], area_um2: float | None) -> dict[str, float | None]:
    return {c: n / (area_um2 / 1e6) if area_um2 else None for c, n in counts.items()}


def _hull_area(points: np.ndarray) -> float:
    return shapely.area(shapely.convex_hull(shapely.multipoints(points))) if len(points) else 0.0
