"""Scoring by hand on tiny tensors: the anomaly map |x - x_r| / 2 (x_r when a refiner is loaded, x_c otherwise),
the slice score as the map's mean inside the head, and the patient-level AUC over ids taken from the file names."""
import contextlib
import math
import types

import numpy as np
import pytest
import torch

from brainomaly import metrics
from brainomaly.data import dataset_layout
from brainomaly.evaluate import scoring
from brainomaly.evaluate.scoring_networks import ScoringNetworks

# one 2x2 slice: background (-1, and -0.97 just under the head level -0.96) and head pixels (-0.95 just over)
X = torch.tensor([[[[-1.0, 0.75], [-0.97, -0.25]]],
                  [[[-0.95, 0.5], [0.25, -1.0]]]])


def test_anomaly_map_is_half_the_absolute_difference_and_the_score_its_mean_inside_the_head():
    reconstruction = torch.tensor([[[[0.0, -0.25], [-0.97, 0.75]]],
                                   [[[0.05, 0.5], [-0.75, 1.0]]]])
    anomaly_map, scores = scoring.map_and_scores(X, reconstruction, "head")
    # |x - x_r| / 2: slice 0 [[1, 1], [0, 1]] / 2, slice 1 [[1, 0], [1, 2]] / 2
    torch.testing.assert_close(anomaly_map, torch.tensor([[[0.5, 0.5], [0.0, 0.5]],
                                                          [[0.5, 0.0], [0.5, 1.0]]]))
    # head = input > -0.96: slice 0 its right column (0.5, 0.5); slice 1 all but the -1 pixel (0.5, 0.0, 0.5)
    assert scores.dtype == np.float64
    np.testing.assert_allclose(scores, [0.5, 1 / 3], rtol=1e-6)
    _, image_scores = scoring.map_and_scores(X, reconstruction, "image")  # the reference's whole-image mean
    np.testing.assert_allclose(image_scores, [1.5 / 4, 2.0 / 4], rtol=1e-6)


def test_channels_are_averaged_in_the_map_and_in_the_head_and_a_headless_slice_scores_zero():
    x = torch.tensor([[[[0.5, -1.0]], [[0.1, -0.94]]],   # channel means 0.3 (head) and -0.97 (background)
                      [[[-1.0, -1.0]], [[-1.0, -1.0]]]])  # no head at all
    reconstruction = torch.tensor([[[[0.1, -1.0]], [[0.5, -0.5]]],
                                   [[[1.0, 1.0]], [[1.0, 1.0]]]])
    anomaly_map, scores = scoring.map_and_scores(x, reconstruction, "head")
    # (|0.5-0.1| + |0.1-0.5|) / 2 / 2 = 0.2 and (0 + 0.44) / 2 / 2 = 0.11; the second slice differs by 2 -> 1
    torch.testing.assert_close(anomaly_map, torch.tensor([[[0.2, 0.11]], [[1.0, 1.0]]]))
    np.testing.assert_allclose(scores, [0.2, 0.0], rtol=1e-6)


class CoarseIsQuarter(torch.nn.Module):
    """A generator whose map makes x_c = tanh(x + map) = 0.25 everywhere."""

    def forward(self, x):
        return math.atanh(0.25) - x


class ResidualHalf:
    """A refiner whose residual r_hat is 0.5 everywhere: x_r = clamp(x_c + 0.5) = 0.75."""

    def sample_residual(self, coarse, steps, noise=None):
        return torch.full_like(coarse, 0.5)


def scored(refiner):
    config = types.SimpleNamespace(seed=0, refiner_samples=1, ddim_steps=1, score_region="head")
    runtime = types.SimpleNamespace(autocast=contextlib.nullcontext)
    networks = ScoringNetworks(1, CoarseIsQuarter(), refiner, config, {})
    return scoring.score_batch(runtime, networks, X, ["a__000.png", "b__000.png"], [0, 1])


def test_score_batch_uses_the_coarse_reconstruction_without_a_refiner():
    batch = scored(refiner=None)
    assert batch.refined is None
    torch.testing.assert_close(batch.coarse, torch.full_like(X, 0.25))
    # |x - 0.25| / 2
    torch.testing.assert_close(batch.anomaly_map, torch.tensor([[[0.625, 0.25], [0.61, 0.25]],
                                                                [[0.6, 0.125], [0.0, 0.625]]]))
    np.testing.assert_allclose(batch.scores, [0.25, (0.6 + 0.125 + 0.0) / 3], rtol=1e-5)
    assert batch.index.tolist() == [0, 1]


def test_score_batch_uses_the_refined_reconstruction_when_a_refiner_is_loaded():
    batch = scored(refiner=ResidualHalf())
    torch.testing.assert_close(batch.coarse, torch.full_like(X, 0.25))  # x_c is kept beside x_r
    torch.testing.assert_close(batch.refined, torch.full_like(X, 0.75))
    # |x - 0.75| / 2
    torch.testing.assert_close(batch.anomaly_map, torch.tensor([[[0.875, 0.0], [0.86, 0.5]],
                                                                [[0.85, 0.125], [0.25, 0.875]]]))
    np.testing.assert_allclose(batch.scores, [0.25, (0.85 + 0.125 + 0.25) / 3], rtol=1e-5)


def test_patient_auc_groups_slices_by_the_id_before_the_double_underscore():
    slices = [  # (file name, slice score, label)
        ("hea1__000.png", 0.10, 0), ("hea1__001.png", 0.50, 0),  # healthy patient hea1: mean 0.30
        ("hea2__007.png", 0.20, 0),                               # hea2: 0.20
        ("pos1__000.png", 0.25, 1), ("pos1__001.png", 0.45, 1),  # pos1: 0.35
        ("pos2__scan__003.png", 0.25, 1),                         # id "pos2" (the first __): 0.25
    ]
    paths = [f"/data/Toy/train/x/{name}" for name, _, _ in slices]
    pids = [dataset_layout.patient_id(p) for p in paths]
    assert pids == ["hea1", "hea1", "hea2", "pos1", "pos1", "pos2"]
    scores, labels = [s for _, s, _ in slices], [y for _, _, y in slices]
    # patients: diseased 0.35, 0.25 vs healthy 0.30, 0.20: 0.35 beats both, 0.25 beats 0.20 only -> 3/4
    assert metrics.patient_auc(pids, scores, labels) == pytest.approx(0.75)
    # slice by slice it would be 6/9: the grouping matters
    assert metrics.slice_auroc(pids, scores, labels) == pytest.approx(6 / 9)


def test_patient_auc_counts_a_patient_in_both_folders_as_diseased_with_all_its_slices():
    pids = ["a", "a", "b", "c", "d"]
    scores = [0.9, 0.1, 0.2, 0.6, 0.4]
    labels = [0, 1, 0, 1, 0]  # "a" has a healthy and a diseased slice: diseased, mean 0.5
    # diseased a 0.5, c 0.6 vs healthy b 0.2, d 0.4: every pair ordered -> 1.0
    assert metrics.patient_auc(pids, scores, labels) == pytest.approx(1.0)
    # a tied pair counts a half: diseased a 0.5, c 0.6 vs healthy b 0.5, d 0.4 -> (0.5 + 1 + 1 + 1) / 4
    assert metrics.patient_auc(pids, [0.9, 0.1, 0.5, 0.6, 0.4], labels) == pytest.approx(0.875)
    with pytest.raises(ValueError, match="needs both classes"):
        metrics.patient_auc(pids, scores, [0] * 5)
