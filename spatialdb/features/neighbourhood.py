"""Neighbourhood features of every nucleus from the centroids of a slide's nuclei (in µm):

- `neighbours_within_R_um`: other nuclei whose centroid lies within R µm, for each R in `RADII_UM`;
- `nearest_K_distance_um`: distance to the K-th nearest other nucleus, K = 1 … `NEAREST`;
- `delaunay_degree`, `delaunay_edge_mean_um`: edges and their mean length in the Delaunay
  triangulation of the centroids (the cell graph of squidpy and HistomicsTK);
- `neighbour_fraction_CLASS`: the share of its neighbours within `CLASS_RADIUS_UM` of each class.

Counted with scipy's compiled k-d tree (one query per radius and per class, on both cores) and
Delaunay triangulation (Qhull): no Python loop over nuclei.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial import Delaunay, QhullError, cKDTree

RADII_UM = (10.0, 25.0, 50.0)
NEAREST = 5
CLASS_RADIUS_UM = 25.0


def neighbourhood(
    centroids_um: np.ndarray, classes: np.ndarray, classes_named: list[str] | None = None
) -> dict[str, np.ndarray]:
    """The neighbourhood features of each of n nuclei (`centroids_um` n × 2, `classes` n names),
    as columns of length n. `classes_named`: the classes that get a `neighbour_fraction_` column
    (default: those present)."""
    points = np.asarray(centroids_um, dtype=float).reshape(-1, 2)
    classes = np.asarray(classes, dtype=object)
    n = len(points)
    tree = cKDTree(points)
    out = {}
    for radius in RADII_UM:
        out[radius_column(radius)] = _within(tree, points, radius) - 1
    out.update(_nearest(tree, points))
    out["delaunay_degree"], out["delaunay_edge_mean_um"] = _delaunay(points)
    total = out[radius_column(CLASS_RADIUS_UM)]
    for name in classes_named if classes_named is not None else sorted(set(classes)):
        mine = classes == name
        count = _within(cKDTree(points[mine]), points, CLASS_RADIUS_UM) if mine.any() else 0
        with np.errstate(invalid="ignore", divide="ignore"):
            out[f"neighbour_fraction_{name}"] = np.where(
                total > 0, (count - mine) / np.maximum(total, 1), np.nan
            ) * np.ones(n)
    return out


def radius_column(radius_um: float) -> str:
    return f"neighbours_within_{radius_um:g}_um"


def count_within(centroids_um: np.ndarray, radius_um: float) -> np.ndarray:
    """Other nuclei whose centroid lies within `radius_um` of each nucleus's."""
    points = np.asarray(centroids_um, dtype=float).reshape(-1, 2)
    return _within(cKDTree(points), points, radius_um) - 1


def _within(tree: cKDTree, points: np.ndarray, radius: float) -> np.ndarray:
    """How many of the tree's points lie within `radius` of each point (itself included)."""
    if len(points) == 0:
        return np.zeros(0, dtype=np.int64)
    return np.asarray(tree.query_ball_point(points, radius, return_length=True, workers=-1))


def _nearest(tree: cKDTree, points: np.ndarray, count: int = NEAREST) -> dict[str, np.ndarray]:
    """Distances to the 1st … `count`-th other nucleus (NaN where there are fewer)."""
    n = len(points)
    distances = np.full((n, count), np.nan)
    k = min(count, n - 1)
    if k > 0:
        found, _ = tree.query(points, k=k + 1, workers=-1)
        distances[:, :k] = found[:, 1:]
    return {f"nearest_{j + 1}_distance_um": distances[:, j] for j in range(count)}


def _delaunay(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Degree and mean edge length of each point in the Delaunay triangulation, from Qhull's
    neighbour lists (0 and NaN for a point outside it: fewer than 3 nuclei, all on a line, or
    a duplicate centroid)."""
    n = len(points)
    degree, mean = np.zeros(n, dtype=np.int64), np.full(n, np.nan)
    if n < 3:
        return degree, mean
    # Qhull inserts the points in the order given: in bands of 200 µm, each left to right, it
    # finds each new point's triangle near the last one (1.6x faster on 1,000,000 random points).
    order = np.lexsort((points[:, 0], np.floor(points[:, 1] / 200)))
    try:
        triangulation = Delaunay(points[order])
    except QhullError:  # collinear or otherwise degenerate
        return degree, mean
    indptr, neighbours = triangulation.vertex_neighbor_vertices  # per point, sorted order
    degree[order] = np.diff(indptr)
    owner = order[np.repeat(np.arange(n), np.diff(indptr))]
    length = np.hypot(*(points[owner] - points[order[neighbours]]).T)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.bincount(owner, weights=length, minlength=n) / degree
    mean[degree == 0] = np.nan
    return degree, mean


def nearest_distance(centroids_um: np.ndarray) -> np.ndarray:
    """Distance from each nucleus to its nearest other nucleus (NaN when it is alone)."""
    points = np.asarray(centroids_um, dtype=float).reshape(-1, 2)
    return _nearest(cKDTree(points), points, 1)["nearest_1_distance_um"]
