"""Segmentation metrics on instance label maps (0 = background, 1..N = objects).

Gland metrics follow the GlaS challenge (Sirinukunwattana et al., Med. Image Anal. 2017): object
F1 with the 50 % overlap rule, object Dice and object Hausdorff. Nucleus metrics follow the usual
nuclear-instance benchmarks: pixel Dice, aggregated Jaccard index (AJI, Kumar et al. 2017) and
panoptic quality (PQ = DQ x SQ, Kirillov et al. 2019) whose DQ is the F1 score at IoU 0.5; nuclear
types are scored as HoVer-Net does (Graham et al. 2019): nuclei paired by centroid, then the
detection F1 and a classification F1 per type.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree


@dataclass
class Overlaps:
    """Pairwise pixel intersections of two label maps, objects renumbered 0..n-1."""

    intersection: np.ndarray  # (n_true, n_pred)
    true_area: np.ndarray
    pred_area: np.ndarray
    true_labels: np.ndarray  # original label of each row
    pred_labels: np.ndarray

    @property
    def union(self) -> np.ndarray:
        return self.true_area[:, None] + self.pred_area[None, :] - self.intersection

    @property
    def iou(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.union > 0, self.intersection / self.union, 0.0)


def _same_shape(true: np.ndarray, pred: np.ndarray) -> None:
    if true.shape != pred.shape:
        raise ValueError(f"label maps differ in shape: {true.shape} vs {pred.shape}")


def overlaps(true: np.ndarray, pred: np.ndarray) -> Overlaps:
    """Intersections of every true object with every predicted one, from one pass of counting."""
    _same_shape(true, pred)
    true_labels, true_index = np.unique(true, return_inverse=True)
    pred_labels, pred_index = np.unique(pred, return_inverse=True)
    # Row/column 0 of the full table is background when the map has any.
    nt, npred = len(true_labels), len(pred_labels)
    table = np.bincount(
        true_index.ravel() * npred + pred_index.ravel(), minlength=nt * npred
    ).reshape(nt, npred)
    t0 = 1 if true_labels[0] == 0 else 0
    p0 = 1 if pred_labels[0] == 0 else 0
    return Overlaps(
        intersection=table[t0:, p0:].astype(np.int64),
        true_area=table[t0:, :].sum(axis=1),
        pred_area=table[:, p0:].sum(axis=0),
        true_labels=true_labels[t0:],
        pred_labels=pred_labels[p0:],
    )


# -- glands (GlaS) -------------------------------------------------------------------------------


def object_f1(true: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """GlaS object-level F1: a predicted object is a true positive when it covers at least 50 %
    of the true object it overlaps most; unmatched true objects are false negatives."""
    ov = overlaps(true, pred)
    tp = 0
    matched = np.zeros(len(ov.true_area), dtype=bool)
    for j in range(len(ov.pred_area)):
        column = ov.intersection[:, j]
        if column.size == 0 or column.max() == 0:
            continue
        i = int(np.argmax(column))
        if column[i] >= 0.5 * ov.true_area[i] and not matched[i]:
            matched[i] = True
            tp += 1
    fp = len(ov.pred_area) - tp
    fn = len(ov.true_area) - tp
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"tp": tp, "fp": fp, "fn": fn, "precision": precision, "recall": recall, "f1": f1}


def object_dice(true: np.ndarray, pred: np.ndarray) -> float:
    """GlaS object Dice: area-weighted Dice of each object with its best-overlapping
    counterpart, averaged over both directions (true->pred and pred->true)."""
    ov = overlaps(true, pred)
    if len(ov.true_area) == 0 and len(ov.pred_area) == 0:
        return 1.0
    if len(ov.true_area) == 0 or len(ov.pred_area) == 0:
        return 0.0

    def one_way(inter: np.ndarray, area: np.ndarray, other_area: np.ndarray) -> float:
        best = np.argmax(inter, axis=1)
        hit = inter[np.arange(len(area)), best]
        dice = np.where(hit > 0, 2 * hit / (area + other_area[best]), 0.0)
        return float(np.sum(area / area.sum() * dice))

    return 0.5 * (
        one_way(ov.intersection, ov.true_area, ov.pred_area)
        + one_way(ov.intersection.T, ov.pred_area, ov.true_area)
    )


def object_hausdorff(true: np.ndarray, pred: np.ndarray) -> float:
    """GlaS object Hausdorff distance (pixels): area-weighted Hausdorff distance of each object
    to its best-overlapping counterpart (the nearest one when none overlaps), both directions.
    When one side has no objects at all the distance is the image diagonal."""
    ov = overlaps(true, pred)
    if len(ov.true_area) == 0 and len(ov.pred_area) == 0:
        return 0.0
    if len(ov.true_area) == 0 or len(ov.pred_area) == 0:
        return float(np.hypot(*true.shape))
    true_pts = _boundaries(true, ov.true_labels)
    pred_pts = _boundaries(pred, ov.pred_labels)

    def one_way(inter, areas, mine, theirs) -> float:
        total = 0.0
        for i, area in enumerate(areas):
            if inter[i].max() > 0:
                distance = _hausdorff(mine[i], theirs[int(np.argmax(inter[i]))])
            else:
                distance = min(_hausdorff(mine[i], other) for other in theirs)
            total += area / areas.sum() * distance
        return total

    return 0.5 * (
        one_way(ov.intersection, ov.true_area, true_pts, pred_pts)
        + one_way(ov.intersection.T, ov.pred_area, pred_pts, true_pts)
    )


def _boundaries(labels: np.ndarray, values: np.ndarray) -> list[np.ndarray]:
    """Boundary pixel coordinates of each object (its pixels minus its erosion)."""
    out = []
    for value, box in zip(values, ndimage.find_objects(labels), strict=False):
        if box is None:
            box = tuple(slice(0, s) for s in labels.shape)
        mask = np.pad(labels[box] == value, 1)
        edge = mask & ~ndimage.binary_erosion(mask)
        out.append(np.argwhere(edge) - 1 + [s.start for s in box])
    return out


def _hausdorff(a: np.ndarray, b: np.ndarray) -> float:
    return float(max(cKDTree(b).query(a)[0].max(), cKDTree(a).query(b)[0].max()))


# -- nuclei --------------------------------------------------------------------------------------


def pixel_dice(true: np.ndarray, pred: np.ndarray) -> float:
    """Dice of the foreground masks (any object vs background)."""
    _same_shape(true, pred)
    t, p = true > 0, pred > 0
    denominator = t.sum() + p.sum()
    return 1.0 if denominator == 0 else float(2 * (t & p).sum() / denominator)


def aggregated_jaccard(true: np.ndarray, pred: np.ndarray) -> float:
    """AJI: each true object is paired with the prediction of highest IoU; intersections over
    unions are summed, and predictions never chosen add their area to the union."""
    ov = overlaps(true, pred)
    if len(ov.true_area) == 0:
        return 1.0 if len(ov.pred_area) == 0 else 0.0
    if len(ov.pred_area) == 0:
        return 0.0
    best = np.argmax(ov.iou, axis=1)
    rows = np.arange(len(ov.true_area))
    hit = ov.intersection[rows, best] > 0
    intersection = ov.intersection[rows, best][hit].sum()
    union = ov.union[rows, best][hit].sum() + ov.true_area[~hit].sum()
    unused = np.ones(len(ov.pred_area), dtype=bool)
    unused[best[hit]] = False
    union += ov.pred_area[unused].sum()
    return float(intersection / union)


def panoptic_quality(true: np.ndarray, pred: np.ndarray, iou: float = 0.5) -> dict[str, float]:
    """PQ = DQ x SQ with pairs of IoU above `iou` (unique for iou >= 0.5); DQ is the F1 score."""
    ov = overlaps(true, pred)
    pairs = np.argwhere(ov.iou > iou)
    if iou < 0.5:  # pairs may compete: keep the best one-to-one assignment
        from scipy.optimize import linear_sum_assignment

        r, c = linear_sum_assignment(-ov.iou)
        keep = ov.iou[r, c] > iou
        pairs = np.stack([r[keep], c[keep]], axis=1)
    tp = len(pairs)
    fp = len(ov.pred_area) - tp
    fn = len(ov.true_area) - tp
    if tp + fp + fn == 0:  # nothing there and nothing found: perfect
        return {"tp": 0, "fp": 0, "fn": 0, "dq": 1.0, "sq": 1.0, "pq": 1.0, "f1": 1.0}
    dq = tp / (tp + 0.5 * fp + 0.5 * fn)
    sq = float(ov.iou[pairs[:, 0], pairs[:, 1]].mean()) if tp else 0.0
    return {"tp": tp, "fp": fp, "fn": fn, "dq": dq, "sq": sq, "pq": dq * sq, "f1": dq}


def centroids(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ids, (n, 2) y, x centroids) of the objects of a label map."""
    ids = np.unique(labels)
    ids = ids[ids > 0]
    if len(ids) == 0:
        return ids, np.zeros((0, 2))
    return ids, np.asarray(ndimage.center_of_mass(labels > 0, labels, ids)).reshape(-1, 2)


def pair_centroids(true: np.ndarray, pred: np.ndarray, radius: float) -> np.ndarray:
    """One-to-one pairs (i, j) of true and predicted centroids at most `radius` apart, with the
    smallest total distance (HoVer-Net's `pair_coordinates`)."""
    from scipy.optimize import linear_sum_assignment
    from scipy.spatial.distance import cdist

    if len(true) == 0 or len(pred) == 0:
        return np.zeros((0, 2), dtype=int)
    distance = cdist(true, pred)
    rows, cols = linear_sum_assignment(distance)
    keep = distance[rows, cols] <= radius
    return np.stack([rows[keep], cols[keep]], axis=1)


@dataclass
class TypedDetections:
    """Detection and classification counts pooled over images, as HoVer-Net reports them."""

    paired_true: list = field(default_factory=list)  # type of the true nucleus of each pair
    paired_pred: list = field(default_factory=list)  # type of the predicted nucleus of each pair
    unpaired_true: list = field(default_factory=list)  # types of true nuclei without a pair
    unpaired_pred: list = field(default_factory=list)

    def add(self, true_types, pred_types, pairs: np.ndarray) -> None:
        true_types, pred_types = np.asarray(true_types), np.asarray(pred_types)
        self.paired_true += true_types[pairs[:, 0]].tolist()
        self.paired_pred += pred_types[pairs[:, 1]].tolist()
        self.unpaired_true += np.delete(true_types, pairs[:, 0]).tolist()
        self.unpaired_pred += np.delete(pred_types, pairs[:, 1]).tolist()

    def detection_f1(self) -> float:
        tp = len(self.paired_true)
        denominator = 2 * tp + len(self.unpaired_true) + len(self.unpaired_pred)
        return 2 * tp / denominator if denominator else 1.0

    def type_f1(self, kind) -> float:
        """HoVer-Net's F_c of one type: 2(TP+TN) / (2(TP+TN) + 2 FP + 2 FN + FP_d + FN_d), where TP,
        TN, FP, FN count the paired nuclei and FP_d, FN_d the unpaired ones of this type."""
        c = self.counts(kind)
        tp = c["typed_right"]
        fn = c["paired"] - tp  # true nuclei of this type, paired and typed otherwise
        fp = c["predicted"] - c["unpaired_predicted"] - tp  # paired, called this type wrongly
        tn = len(self.paired_true) - tp - fn - fp
        fp_d, fn_d = c["unpaired_predicted"], c["true"] - c["paired"]
        denominator = 2 * (tp + tn) + 2 * fp + 2 * fn + fp_d + fn_d
        return float(2 * (tp + tn) / denominator) if denominator else 1.0

    def counts(self, kind) -> dict[str, int]:
        """Where F_c's terms come from for one type: its true nuclei, how many of them pair and
        how many of those are typed right; the predictions of this type, and how many of them
        pair with no true nucleus (FP_d)."""
        t, p = np.asarray(self.paired_true), np.asarray(self.paired_pred)
        unpaired_true = int(np.sum(np.asarray(self.unpaired_true) == kind))
        unpaired_pred = int(np.sum(np.asarray(self.unpaired_pred) == kind))
        return {
            "true": int(np.sum(t == kind)) + unpaired_true,
            "paired": int(np.sum(t == kind)),
            "typed_right": int(np.sum((t == kind) & (p == kind))),
            "predicted": int(np.sum(p == kind)) + unpaired_pred,
            "unpaired_predicted": unpaired_pred,
        }


def polygon_agreement(a: list, b: list, iou: float = 0.5) -> dict[str, float]:
    """How far two sets of polygons (two runs over the same slide) find the same objects: pairs
    with IoU above `iou` (at most one such partner each, as for PQ), the share of either set
    paired, and the median IoU of the pairs."""
    import shapely

    tree = shapely.STRtree(b)
    ious = []
    for polygon in a:
        candidates = [b[k] for k in tree.query(polygon, predicate="intersects")]
        best = max(
            (polygon.intersection(c).area / polygon.union(c).area for c in candidates), default=0
        )
        if best > iou:
            ious.append(best)
    return {
        "pairs": len(ious),
        "share_a": len(ious) / max(len(a), 1),
        "share_b": len(ious) / max(len(b), 1),
        "median_iou": float(np.median(ious)) if ious else 0.0,
    }
