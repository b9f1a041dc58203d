"""Training targets: inner/contour classes and U-Net weights on hand-made instance maps."""

import numpy as np
import pytest

from inference.targets import (
    BACKGROUND,
    CONTOUR,
    INNER,
    hv_maps,
    inner_contour_map,
    unet_weight_map,
)


def test_a_square_gets_a_one_pixel_contour_ring_and_an_inner_core():
    instances = np.zeros((20, 20), dtype=np.int32)
    instances[5:15, 5:15] = 1
    classes = inner_contour_map(instances, contour_px=1)
    assert (classes == INNER).sum() == 8 * 8
    assert (classes == CONTOUR).sum() == 10 * 10 - 8 * 8
    assert (classes[instances == 0] == BACKGROUND).all()


def test_touching_instances_are_separated_by_contour_on_both_sides():
    instances = np.zeros((20, 30), dtype=np.int32)
    instances[5:15, 5:15] = 1
    instances[5:15, 15:25] = 2  # shares an edge with instance 1
    classes = inner_contour_map(instances, contour_px=2)
    assert (classes[5:15, 13:17] == CONTOUR).all()  # two px on each side of the shared edge
    assert (classes[9:11, 7:13] == INNER).all() and (classes[9:11, 17:23] == INNER).all()


def test_distance_maps_run_from_minus_one_to_one_across_each_instance():
    labels = np.zeros((20, 40), dtype=np.int32)
    labels[5:10, 2:13] = 1  # 11 px wide, 5 px high: centroid at x = 7, y = 7
    labels[12:19, 20:23] = 2  # 3 wide, 7 high, apart from the first
    hv = hv_maps(labels)
    assert hv.shape == (2, 20, 40) and hv.dtype == np.float32
    np.testing.assert_allclose(hv[0, 7, 2:13], np.linspace(-1, 1, 11), atol=1e-6)
    np.testing.assert_allclose(hv[1, 5:10, 4], [-1, -0.5, 0, 0.5, 1], atol=1e-6)
    np.testing.assert_allclose(hv[0, 15, 20:23], [-1, 0, 1], atol=1e-6)
    np.testing.assert_allclose(hv[1, 12:19, 21], np.linspace(-1, 1, 7), atol=1e-6)
    assert (hv[:, labels == 0] == 0).all()
    assert (hv_maps(np.zeros((4, 4), np.int32)) == 0).all()


def test_weights_balance_classes_and_peak_in_narrow_gaps():
    instances = np.zeros((40, 60), dtype=np.int32)
    instances[10:30, 5:25] = 1
    instances[10:30, 27:47] = 2  # a 2 px gap between 1 and 2
    classes = inner_contour_map(instances, contour_px=1)
    weights = unet_weight_map(instances, classes, w0=10, sigma=5)
    gap = weights[20, 25:27].mean()
    far = weights[20, 55:60].mean()
    assert gap > far + 5  # the border term dominates between close objects
    assert far == pytest.approx(weights[0, 0], rel=0.05)
    # Class balancing: each class present carries a third of the total (border term aside).
    assert weights[classes == INNER].sum() == pytest.approx(classes.size / 3, rel=1e-6)
    assert weights[classes == CONTOUR].sum() == pytest.approx(classes.size / 3, rel=1e-6)
