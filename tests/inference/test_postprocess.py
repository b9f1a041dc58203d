"""Post-processing from head probabilities to instances, on synthetic maps with known answers."""

import numpy as np
import pytest
from scipy import ndimage

from inference import postprocess
from inference.postprocess import (
    lumina_inside_glands,
    majority_types,
    nuclei_instances,
    nuclei_instances_hv,
    region_instances,
    type_map,
)
from inference.targets import disk, hv_maps, inner_contour_map


def probabilities(classes: np.ndarray) -> np.ndarray:
    """A confident (3, H, W) probability map from a class map."""
    return np.stack([(classes == c).astype(np.float32) for c in range(3)])


def discs(centres, radius, shape=(60, 80)) -> np.ndarray:
    y, x = np.mgrid[: shape[0], : shape[1]]
    labels = np.zeros(shape, dtype=np.int32)
    for i, (cy, cx) in enumerate(centres, start=1):
        labels[((y - cy) ** 2 + (x - cx) ** 2 <= radius**2) & (labels == 0)] = i
    return labels


def test_touching_nuclei_are_split_by_the_watershed():
    truth = discs([(30, 30), (30, 44)], radius=8)  # overlapping discs: one blob of foreground
    probs = probabilities(inner_contour_map(truth, contour_px=2))
    labels = nuclei_instances(probs)
    assert labels.max() == 2
    for i in (1, 2):
        overlap = np.bincount(labels[truth == i])
        assert overlap[1:].max() / (truth == i).sum() > 0.9


@pytest.mark.parametrize("sobel_px", [5, 11])
def test_distance_maps_split_touching_nuclei_the_class_maps_merge(sobel_px):
    """Three nuclei in a row, touching, of different sizes: the foreground is one blob with no
    contour between them, so the inner/contour watershed finds one nucleus; HoVer-Net's distance
    maps fall from 1 to -1 where two nuclei meet, and split the blob into the three."""
    truth = discs([(30, 20), (30, 33)], radius=7)
    third = discs([(30, 49)], radius=10)
    truth[(third > 0) & (truth == 0)] = 3
    blob = truth > 0
    probs = np.stack([~blob, blob, np.zeros_like(blob)]).astype(np.float32)
    assert nuclei_instances(probs).max() == 1
    labels = nuclei_instances_hv(probs, hv_maps(truth), sobel_px=sobel_px)
    assert labels.max() == 3
    for i in (1, 2, 3):
        overlap = np.bincount(labels[truth == i])
        assert overlap[1:].max() / (truth == i).sum() > 0.85


def test_small_specks_are_not_nuclei():
    truth = discs([(30, 30)], radius=8)
    classes = inner_contour_map(truth, contour_px=2)
    classes[5:7, 5:7] = 1  # a 4-pixel speck
    assert nuclei_instances(probabilities(classes), min_area_px=10).max() == 1


def test_glands_are_grown_back_over_their_contour_and_filled():
    truth = np.zeros((80, 80), dtype=np.int32)
    truth[10:50, 10:50] = 1
    classes = inner_contour_map(truth, contour_px=3)
    classes[25:30, 25:30] = 0  # a hole in the predicted inner region
    labels = region_instances(probabilities(classes), contour_px=3)
    assert labels.max() == 1
    assert abs(int((labels == 1).sum()) - 40 * 40) <= 40  # within one pixel of the outline
    assert labels[27, 27] == 1


def test_lumina_outside_glands_are_dropped():
    glands = np.zeros((50, 50), dtype=np.int32)
    glands[0:30, 0:30] = 1
    lumina = np.zeros_like(glands)
    lumina[10:15, 10:15] = 1  # inside
    lumina[40:45, 40:45] = 2  # outside
    lumina[27:33, 10:15] = 3  # half inside
    kept = lumina_inside_glands(lumina, glands, min_inside=0.5)
    assert kept.max() == 2
    assert kept[12, 12] > 0 and kept[42, 42] == 0 and kept[28, 12] > 0


def test_instance_type_is_the_majority_of_typed_pixels():
    instances = np.zeros((10, 10), dtype=np.int32)
    instances[:, :5] = 1
    instances[:, 5:] = 2
    types = np.zeros_like(instances)
    types[:6, :5] = 3
    types[6:, :5] = 2
    types[:, 5:] = 0  # untyped
    assert majority_types(instances, types, n_types=7) == {1: (3, 0.6)}


def test_a_large_irregular_malignant_gland_stays_one_object():
    """A gland of about 900 x 700 px (450 µm at 0.5 µm/px): a ragged, branching epithelial ring
    whose predicted inner region is thin in places and encloses a large lumen the network calls
    background, next to a small separate gland. One object each, the lumen filled in."""
    y, x = np.mgrid[:800, :1000]
    angle, radius = np.arctan2(y - 400, x - 500), np.hypot((y - 400) / 0.75, x - 500)
    outer = 420 + 40 * np.sin(5 * angle) + 25 * np.sin(11 * angle)  # ragged outline
    ring = (radius < outer) & (radius > outer - 60 + 45 * np.sin(3 * angle) ** 2)  # 15-60 px
    branch = (np.abs(y - 400) < 12) & (x > 120) & (x < 500)  # a bridge across the lumen
    gland = ring | (branch & (radius < outer))
    inner = np.zeros((800, 1000), np.float32)
    inner[gland] = 0.9
    inner[(np.abs(x - 950) < 30) & (np.abs(y - 45) < 30)] = 0.9  # a small gland apart
    probs = np.stack([1 - inner, inner, np.zeros_like(inner)])
    labels = region_instances(probs, contour_px=6, min_area_px=2400)
    big = labels[400, 700]  # in the lumen: filled
    assert big > 0 and labels[400, 300] == big
    assert np.unique(labels[gland]).tolist() == [big]
    assert labels.max() == 2


def test_type_map_takes_the_best_real_type_and_leaves_untrained_heads_at_zero():
    probs = np.zeros((3, 1, 3), np.float32)
    probs[:, 0, 0] = [0.8, 0.15, 0.05]  # the head says "no label": the best real type wins
    probs[:, 0, 1] = [0.1, 0.2, 0.7]
    probs[:, 0, 2] = [1.0, 0.0, 0.0]  # real types zeroed (untrained): no type
    assert type_map(probs).tolist() == [[1, 2, 0]]


def _blobs(seed: int, shape=(300, 400), sigma=6.0, quantile=0.6) -> np.ndarray:
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.random(shape), sigma)
    return ndimage.label(field > np.quantile(field, quantile))[0]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("radius", [1, 2, 4, 6, 9])
def test_nearest_within_is_the_distance_transform_with_indices(seed, radius):
    labels = _blobs(seed, sigma=3.0 + seed)
    distance, (iy, ix) = ndimage.distance_transform_edt(labels == 0, return_indices=True)
    expected = np.where(distance <= radius, labels[iy, ix], 0)
    np.testing.assert_array_equal(postprocess.nearest_within(labels, radius), expected)


@pytest.mark.parametrize("radius", [1, 4])
def test_dilate_labels_is_grey_dilation_with_a_disk(radius):
    labels = _blobs(7)
    expected = ndimage.grey_dilation(labels, footprint=disk(radius))
    np.testing.assert_array_equal(postprocess.dilate_labels(labels, radius), expected)
    many = labels + 70_000 * (labels > 0)  # past uint16: the float32 path
    expected = ndimage.grey_dilation(many, footprint=disk(radius))
    np.testing.assert_array_equal(postprocess.dilate_labels(many, radius), expected)


def test_small_labels_go_and_the_rest_are_numbered_in_order():
    labels = np.array([[0, 5, 5, 9], [2, 2, 0, 9], [2, 0, 7, 7]])
    np.testing.assert_array_equal(
        postprocess._remove_small(labels, 2),
        [[0, 2, 2, 4], [1, 1, 0, 4], [1, 0, 3, 3]],
    )
    np.testing.assert_array_equal(
        postprocess._remove_small(labels, 3), [[0, 0, 0, 0], [1, 1, 0, 0], [1, 0, 0, 0]]
    )
    consecutive = np.array([[1, 2], [0, 3]])
    assert postprocess._relabel(consecutive) is consecutive  # nothing to renumber


def test_uint8_probabilities_threshold_as_their_float_values():
    values = np.arange(256, dtype=np.uint8)
    for threshold in (0.2, 0.3, 0.5, 0.7):
        np.testing.assert_array_equal(
            postprocess.above(values, threshold),
            values.astype(np.float32) / 255 > threshold,
        )
