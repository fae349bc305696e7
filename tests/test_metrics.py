"""Metrics a user reads in every protocol report, checked against numbers computed by hand."""
import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from brainomaly.metrics import (
    PixelMetrics,
    aggregate_patients,
    aucp_to_auc,
    equal_error_threshold,
    evaluate,
    healthy_percentile_threshold,
    slice_auroc,
    slice_scores,
)

# Tiny protocol: healthy patients score 0.1, 0.3, 0.5; diseased ones 0.4, 0.9.
LABELS = [0, 1, 0, 0, 1]
SCORES = [0.1, 0.4, 0.3, 0.5, 0.9]


def test_patient_score_is_mean_of_slices_and_diseased_label_wins():
    out = aggregate_patients(["p2", "p1", "p2", "p1", "p1", "p3"],
                             [0.4, 0.1, 0.6, 0.2, 0.3, 0.9],
                             labels=[1, 0, 0, 0, 0, 1])
    assert out["pid"].tolist() == ["p1", "p2", "p3"]
    np.testing.assert_allclose(out["score"], [0.2, 0.5, 0.9])
    assert out["n_slices"].tolist() == [3, 2, 1]
    assert out["label"].tolist() == [0, 1, 1]  # p2 seen healthy and diseased: diseased


def test_slice_score_is_the_maps_mean_inside_the_head_and_ignores_the_background():
    background = -1.0
    images = np.array([[[0.2, background], [-0.5, background]],      # two head pixels
                       [[background, background], [background, background]]])  # no head at all
    maps = np.array([[[0.3, 0.9], [0.1, 0.7]],
                     [[0.4, 0.4], [0.4, 0.4]]])
    np.testing.assert_allclose(slice_scores(images, maps), [(0.3 + 0.1) / 2, 0.0])
    # the same head in a field of view four times larger (more background, any map there) scores the same
    wide_image = np.full((1, 4, 4), background)
    wide_image[0, :2, :2] = images[0]
    wide_map = np.full((1, 4, 4), 0.8)
    wide_map[0, :2, :2] = maps[0]
    np.testing.assert_allclose(slice_scores(wide_image, wide_map), [0.2])
    with pytest.raises(ValueError, match="both be"):
        slice_scores(images, maps[:, :1])


def test_aggregate_without_labels_has_no_label_key():
    assert "label" not in aggregate_patients(["a", "a"], [1.0, 3.0])


def test_auc_and_average_precision_match_hand_counts():
    result = evaluate(LABELS, SCORES)
    # 5 of the 6 (diseased, healthy) pairs are ordered correctly: only 0.4 < 0.5 is not.
    assert result["auc"] == pytest.approx(5 / 6)
    # Ranked: 0.9 (pos, precision 1), 0.5 (neg), 0.4 (pos, precision 2/3).
    assert result["average_precision"] == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    assert (result["n_positive"], result["n_negative"]) == (2, 3)


def test_threshold_is_equal_error_not_youden():
    # |TPR - (1 - FPR)| over thresholds 0.9, 0.5, 0.4, ...: 0.5, 1/6, 1/3, ... so 0.5 wins;
    # Youden (max TPR - FPR) would pick 0.4 instead.
    assert equal_error_threshold(LABELS, SCORES) == 0.5
    result = evaluate(LABELS, SCORES)
    assert result["threshold"] == 0.5
    # Prediction is score >= 0.5: 0.9 is a TP, 0.5 a FP, 0.4 a FN, 0.1 and 0.3 TNs.
    assert (result["tn"], result["fp"], result["fn"], result["tp"]) == (2, 1, 1, 1)
    assert result["sensitivity"] == pytest.approx(0.5)
    assert result["specificity"] == pytest.approx(2 / 3)


def test_threshold_is_never_infinite_when_scores_tie():
    assert equal_error_threshold([0, 1], [0.3, 0.3]) == 0.3


def test_single_class_raises_clear_error():
    with pytest.raises(ValueError, match="both classes"):
        evaluate([1, 1, 1], [0.1, 0.2, 0.3])


def test_aucp_maps_to_auc_by_hand_values():
    assert aucp_to_auc(0.70, 0.59) == pytest.approx(0.405 / 0.41)  # 0.98780...
    assert aucp_to_auc(0.70, 0.59) == pytest.approx(0.98780, abs=1e-5)
    assert aucp_to_auc(0.60, 0.59) == pytest.approx(0.305 / 0.41)  # 0.74390...
    assert aucp_to_auc(0.8, 0.0) == pytest.approx(0.8)  # no healthy scans in M: AUCp is the AUC


@pytest.mark.parametrize("aucp, rho", [(0.7, 1.0), (0.7, -0.1), (1.2, 0.5), (-0.1, 0.5)])
def test_aucp_to_auc_rejects_invalid_inputs(aucp, rho):
    with pytest.raises(ValueError):
        aucp_to_auc(aucp, rho)


def test_healthy_percentile_threshold_flags_the_top_healthy_share():
    healthy = np.arange(101) / 100.0
    threshold = healthy_percentile_threshold(healthy, 95)
    assert threshold == pytest.approx(0.95)
    assert np.mean(healthy >= threshold) == pytest.approx(6 / 101)
    with pytest.raises(ValueError):
        healthy_percentile_threshold([], 95)


def test_pixel_metrics_perfect_separation():
    mask = np.zeros((2, 8, 8), dtype=bool)
    mask[:, 2:5, 3:6] = True
    metric = PixelMetrics()
    metric.update(np.where(mask, 0.9, 0.05), mask)
    out = metric.compute()
    assert out["pixel_auroc"] == pytest.approx(1.0)
    assert out["best_dice"] == pytest.approx(1.0)
    assert 0.05 < out["best_dice_threshold"] <= 0.9


def test_pixel_metrics_hand_case():
    # Lesion pixels 0.85, 0.65, 0.25; others 0.75, 0.45, 0.15, 0.05; 10 bins so thresholds are 0.0, 0.1, ...
    values = np.array([0.85, 0.65, 0.25, 0.75, 0.45, 0.15, 0.05])
    mask = np.array([1, 1, 1, 0, 0, 0, 0])
    metric = PixelMetrics(n_bins=10)
    metric.update(values, mask)
    out = metric.compute()
    # At >= 0.2: TP 3, FP 2 (0.75, 0.45), FN 0 -> Dice 6/8, the best (>= 0.6 gives 4/6, >= 0.8 gives 2/4).
    assert out["best_dice"] == pytest.approx(0.75)
    assert out["best_dice_threshold"] == pytest.approx(0.2)
    # Correctly ordered (lesion, other) pairs: 4 + 3 + 2 of 12.
    assert out["pixel_auroc"] == pytest.approx(9 / 12)
    # Descending: 0.85 lesion (precision 1, recall 1/3), 0.65 lesion (2/3, 2/3), 0.25 lesion (3/5, 1).
    assert out["pixel_auprc"] == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)
    assert out["pixel_auprc"] == pytest.approx(average_precision_score(mask, values))


def test_pixel_auprc_equals_sklearn_average_precision_when_values_sit_in_distinct_bins():
    rng = np.random.default_rng(1)
    mask = rng.random((3, 16, 16)) < 0.15
    bins = np.clip(np.round(rng.normal(40, 12, mask.shape) + 15 * mask), 0, 99)
    values = (bins + 0.5) / 100  # bin centres of 100 bins: binning loses nothing, ties are real ties
    metric = PixelMetrics(n_bins=100)
    metric.update(values, mask)
    assert metric.compute()["pixel_auprc"] == pytest.approx(average_precision_score(mask.ravel(), values.ravel()),
                                                            abs=1e-12)


def test_slice_auroc_labels_each_slice_with_its_patient():
    # Patient a (healthy) slices 0.1, 0.6; patient b (diseased) 0.5, 0.9; c is in a healthy and a diseased folder
    # (diseased wins), slices 0.2 (folder label 0) and 0.7. Pairs diseased > healthy: of 4 x 2 = 8, 0.5 < 0.6
    # and 0.2 < 0.6 lose, 0.2 > 0.1 wins: 6 of 8.
    pids = ["a", "a", "b", "b", "c", "c"]
    scores = [0.1, 0.6, 0.5, 0.9, 0.2, 0.7]
    labels = [0, 0, 1, 1, 0, 1]
    assert slice_auroc(pids, scores, labels) == pytest.approx(6 / 8)
    assert slice_auroc(pids, scores, labels) == pytest.approx(roc_auc_score([0, 0, 1, 1, 1, 1], scores))


def test_region_restricts_counted_pixels():
    values = np.array([0.9, 0.8, 0.1, 0.2, 0.95])
    mask = np.array([1, 1, 0, 0, 0])
    brain = np.array([1, 1, 1, 1, 0])  # the bright non-lesion pixel lies outside the brain
    inside = PixelMetrics()
    inside.update(values, mask, region=brain)
    everywhere = PixelMetrics()
    everywhere.update(values, mask)
    assert inside.compute()["pixel_auroc"] == pytest.approx(1.0)
    assert everywhere.compute()["pixel_auroc"] == pytest.approx(4 / 6)
    assert inside.positive.sum() + inside.negative.sum() == 4


def test_pixel_auroc_matches_sklearn_within_bin_tolerance():
    rng = np.random.default_rng(0)
    mask = rng.random((4, 32, 32)) < 0.1
    values = np.clip(rng.normal(0.4, 0.15, mask.shape) + 0.2 * mask, 0, 1)
    metric = PixelMetrics(n_bins=1000)
    metric.update(values, mask)
    assert metric.compute()["pixel_auroc"] == pytest.approx(roc_auc_score(mask.ravel(), values.ravel()), abs=1e-3)


def test_streaming_two_updates_equals_one():
    rng = np.random.default_rng(1)
    values, mask = rng.random((6, 16, 16)), rng.random((6, 16, 16)) < 0.2
    once, twice = PixelMetrics(n_bins=50), PixelMetrics(n_bins=50)
    once.update(values, mask)
    twice.update(values[:2], mask[:2])
    twice.update(values[2:], mask[2:])
    assert once.compute() == twice.compute()


def test_out_of_range_values_are_clipped_into_end_bins():
    metric = PixelMetrics(n_bins=4)
    metric.update(np.array([5.0, -3.0]), np.array([1, 0]))
    assert metric.positive.tolist() == [0, 0, 0, 1]
    assert metric.negative.tolist() == [1, 0, 0, 0]


def test_pixel_metrics_without_lesion_pixels_raise():
    metric = PixelMetrics()
    metric.update(np.random.default_rng(2).random((4, 4)), np.zeros((4, 4)))
    with pytest.raises(ValueError, match="lesion"):
        metric.compute()
