"""Evaluation metrics on hand-made label maps with answers worked out by hand."""

import numpy as np
import pytest

from inference.metrics import (
    aggregated_jaccard,
    object_dice,
    object_f1,
    object_hausdorff,
    panoptic_quality,
    pixel_dice,
)


def canvas() -> np.ndarray:
    return np.zeros((60, 60), dtype=np.int32)


def test_identical_maps_score_perfectly():
    labels = canvas()
    labels[0:10, 0:10] = 3
    labels[20:35, 5:25] = 7
    assert object_f1(labels, labels)["f1"] == 1.0
    assert object_dice(labels, labels) == 1.0
    assert object_hausdorff(labels, labels) == 0.0
    assert pixel_dice(labels, labels) == 1.0
    assert aggregated_jaccard(labels, labels) == 1.0
    assert panoptic_quality(labels, labels)["pq"] == 1.0


def test_object_f1_uses_the_fifty_percent_rule():
    true, pred = canvas(), canvas()
    true[0:10, 0:10] = 1  # A
    true[20:30, 0:10] = 2  # B
    pred[0:6, 0:10] = 1  # 60 % of A: true positive
    pred[20:24, 0:10] = 2  # 40 % of B: false positive, B is missed
    pred[40:50, 40:50] = 3  # no ground truth: false positive
    score = object_f1(true, pred)
    assert (score["tp"], score["fp"], score["fn"]) == (1, 2, 1)
    assert score["f1"] == pytest.approx(2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2))


def test_object_dice_weights_objects_by_area_in_both_directions():
    true, pred = canvas(), canvas()
    true[0:10, 0:10] = 1
    pred[0:10, 5:15] = 1  # half overlaps: Dice 0.5
    pred[40:50, 40:50] = 2  # unmatched, same area: Dice 0
    assert object_dice(true, pred) == pytest.approx(0.5 * (0.5 + (0.5 * 0.5 + 0.5 * 0.0)))


def test_object_hausdorff_of_a_shifted_square_is_the_shift():
    true, pred = canvas(), canvas()
    true[0:10, 0:10] = 1
    pred[3:13, 0:10] = 1
    assert object_hausdorff(true, pred) == pytest.approx(3.0)


def test_object_hausdorff_uses_the_nearest_object_when_none_overlaps():
    true, pred = canvas(), canvas()
    true[0:10, 0:10] = 1
    pred[0:10, 20:30] = 1
    assert object_hausdorff(true, pred) == pytest.approx(20.0)


def test_pixel_dice_counts_foreground_only():
    true, pred = canvas(), canvas()
    true[0:10, 0:10] = 1
    pred[0:10, 0:5] = 9
    assert pixel_dice(true, pred) == pytest.approx(2 * 50 / 150)


def test_aji_adds_unused_predictions_to_the_union():
    true, pred = canvas(), canvas()
    true[0:10, 0:10] = 1
    pred[0:10, 0:5] = 1  # IoU 0.5 with the true object
    pred[30:35, 30:35] = 2  # never chosen: its 25 px join the union
    assert aggregated_jaccard(true, pred) == pytest.approx(50 / (100 + 25))


def test_panoptic_quality_matches_pairs_above_half_iou():
    true, pred = canvas(), canvas()
    true[0:10, 0:10] = 1
    true[20:30, 0:10] = 2
    pred[0:10, 0:10] = 5  # IoU 1
    pred[20:30, 0:6] = 6  # IoU 0.6
    pred[40:45, 40:45] = 7  # false positive
    score = panoptic_quality(true, pred)
    assert (score["tp"], score["fp"], score["fn"]) == (2, 1, 0)
    assert score["dq"] == pytest.approx(2 / 2.5)
    assert score["sq"] == pytest.approx(0.8)
    assert score["pq"] == pytest.approx(0.64)
    assert score["f1"] == score["dq"]


def test_empty_predictions_score_zero_and_mismatched_shapes_are_refused():
    true = canvas()
    true[0:10, 0:10] = 1
    empty = canvas()
    assert object_f1(true, empty)["f1"] == 0.0
    assert object_dice(true, empty) == 0.0
    assert aggregated_jaccard(true, empty) == 0.0
    assert panoptic_quality(true, empty)["pq"] == 0.0
    assert panoptic_quality(empty, empty)["pq"] == 1.0  # an empty patch found empty is perfect
    assert object_hausdorff(true, empty) == pytest.approx(np.hypot(60, 60))
    with pytest.raises(ValueError, match="differ in shape"):
        pixel_dice(true, np.zeros((5, 5)))
    with pytest.raises(ValueError, match="differ in shape"):
        object_f1(true, np.zeros((5, 5)))


def test_typed_detections_follow_hovernet_pairing_and_type_f1():
    from inference.metrics import TypedDetections, pair_centroids

    true = np.array([[10.0, 10.0], [50.0, 50.0], [90.0, 90.0]])
    pred = np.array([[11.0, 10.0], [50.0, 56.0], [200.0, 200.0]])
    pairs = pair_centroids(true, pred, radius=5.0)
    assert pairs.tolist() == [[0, 0]]  # 6 px is beyond the radius
    detections = TypedDetections()
    detections.add(["epithelial", "inflammatory", "other"], ["epithelial", "other", "other"], pairs)
    # one pair, two unpaired on each side: F_d = 2 / (2 + 2 + 2)
    assert detections.detection_f1() == pytest.approx(1 / 3)
    # epithelial: TP 1, no FP/FN among pairs, no unpaired epithelial -> 1.0
    assert detections.type_f1("epithelial") == 1.0
    # other: TN 1 among pairs, 1 unpaired true (FN_d) and 2 unpaired predicted (FP_d)
    assert detections.type_f1("other") == pytest.approx(2 / (2 + 1 + 2))
    assert detections.counts("other") == {
        "true": 1,
        "paired": 0,
        "typed_right": 0,
        "predicted": 2,
        "unpaired_predicted": 2,
    }
    assert detections.counts("epithelial") == {
        "true": 1,
        "paired": 1,
        "typed_right": 1,
        "predicted": 1,
        "unpaired_predicted": 0,
    }
