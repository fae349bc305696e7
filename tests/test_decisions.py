"""The label-free decisions (brainomaly/decisions.py): the paired patient bootstrap, the checkpoint-selection rules
and the refiner's check, on recorded scores alone (no networks)."""
import numpy as np
import pytest
from scipy.stats import norm
from sklearn.metrics import roc_auc_score

from brainomaly import decisions
from brainomaly.decisions import Candidate, PairedBootstrap
from brainomaly.evaluate import checkpoint_selection


def test_the_bootstrap_point_auc_is_scikit_learns_roc_auc_ties_included():
    rng = np.random.default_rng(3)
    labels = np.r_[np.zeros(14), np.ones(50)].astype(int)
    scores = np.round(rng.normal(labels * 0.7, 1.0), 1)  # rounded: many ties
    point, draws = PairedBootstrap(labels, seed=1).auc(scores)
    assert point == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert len(draws) == decisions.BOOTSTRAP_DRAWS and 0 < draws.std() < 0.2


def test_a_draw_resamples_each_label_apart_with_its_own_size():
    labels = np.r_[np.zeros(5), np.ones(9)].astype(int)
    bootstrap = PairedBootstrap(labels, draws=50, seed=0)
    (neg_units, neg_weights), (pos_units, pos_weights) = bootstrap._weights[0], bootstrap._weights[1]
    assert set(neg_units) == set(range(5)) and set(pos_units) == set(range(5, 14))
    assert (neg_weights.sum(1) == 5).all() and (pos_weights.sum(1) == 9).all()


def test_bootstrap_intervals_cover_a_known_auc_at_their_nominal_rate():
    """Two Gaussians one unit apart have AUC Phi(1/sqrt 2) = 0.760; with 16 healthy and 60 mixed patients (an AUCp's
    sizes) the 95% interval must hold it in 90-100% of 200 toy data sets."""
    true_auc = norm.cdf(1 / np.sqrt(2))
    rng = np.random.default_rng(0)
    labels = np.r_[np.zeros(16), np.ones(60)].astype(int)
    covered = 0
    for trial in range(200):
        scores = rng.normal(labels * 1.0, 1.0)
        low, high = decisions.interval(PairedBootstrap(labels, draws=400, seed=trial).auc(scores)[1])
        covered += low <= true_auc <= high
    assert 0.90 <= covered / 200 <= 1.0, covered


def test_a_patient_cluster_bootstrap_is_wider_than_treating_slices_as_independent():
    """Slices of one patient share its anatomy: resampling them as independent units understates the noise."""
    rng = np.random.default_rng(5)
    patient_labels = np.r_[np.zeros(12), np.ones(40)].astype(int)
    patient_effect = rng.normal(patient_labels * 0.6, 1.0)
    cluster = np.repeat(np.arange(52), 8)
    labels = patient_labels[cluster]
    scores = patient_effect[cluster] + rng.normal(0, 0.2, cluster.size)
    clustered = PairedBootstrap(labels, cluster, seed=0).auc(scores)[1].std()
    independent = PairedBootstrap(labels, seed=0).auc(scores)[1].std()
    assert clustered > 2 * independent


def candidate(iteration, aucp, se, reconstruction="coarse", seed=0):
    """A candidate whose bootstrap draws have exactly mean aucp and standard deviation se (shared shape: paired)."""
    base = np.random.default_rng(seed).standard_normal(2000)
    base = (base - base.mean()) / base.std(ddof=1)
    return Candidate(iteration, reconstruction, aucp, aucp + se * base)


@pytest.mark.parametrize("aucps, picked", [
    ((0.61, 0.74, 0.69), 200),   # the highest, in the middle
    ((0.74, 0.61, 0.69), 100),   # first
    ((0.61, 0.74, 0.74), 200),   # a tie: the earlier checkpoint
    ((0.55,), 100),              # one checkpoint
])
def test_the_max_rule_takes_the_highest_aucp_and_the_first_of_a_tie(aucps, picked):
    candidates = [candidate(100 * (i + 1), a, 0.05) for i, a in enumerate(aucps)]
    assert decisions.select_max(candidates).iteration == picked


def test_the_one_se_rule_takes_the_newest_checkpoint_within_one_standard_error_of_the_best():
    # best 0.80 (se 0.05): 0.76 at 400 is within 0.75, 0.74 at 500 is not
    candidates = [candidate(i, a, 0.05) for i, a in ((100, 0.60), (200, 0.80), (300, 0.70), (400, 0.76), (500, 0.74))]
    assert decisions.select_one_se(candidates).iteration == 400


def test_the_smoothed_rule_averages_each_checkpoint_with_its_neighbours():
    # means of (self and neighbours): 100: (.60+.85)/2=.725, 200: (.60+.85+.62)/3=.69, 300: (.85+.62+.78)/3=.75,
    # 400: (.62+.78+.80)/3=.733, 500: (.78+.80)/2=.79 -> 500, where max takes the spike at 200
    candidates = [candidate(i, a, 0.05) for i, a in ((100, 0.60), (200, 0.85), (300, 0.62), (400, 0.78), (500, 0.80))]
    assert decisions.smoothed_aucp(candidates)[candidates[2]] == pytest.approx(0.75)
    assert decisions.select_smoothed(candidates).iteration == 500
    assert decisions.select_max(candidates).iteration == 200


def test_the_last_checkpoint_is_kept_unless_a_candidate_beats_it_beyond_the_corrected_noise():
    # paired draws of independent shape: the difference's sd is sqrt(2) x 0.03
    last = candidate(400, 0.70, 0.03, seed=9)
    close = [candidate(100, 0.60, 0.03, seed=1), candidate(200, 0.76, 0.03, seed=2), candidate(300, 0.66, 0.03, seed=3)]
    assert decisions.select_last_unless_beaten(close + [last]).iteration == 400  # +0.06: z 1.4, not significant
    far = close[:1] + [candidate(200, 0.90, 0.03, seed=2)] + close[2:]
    assert decisions.select_last_unless_beaten(far + [last]).iteration == 200  # +0.20: z 4.7, beyond any correction


def correlated_candidates(iterations, aucps, se, correlation, seed=0):
    """Candidates whose draws share a component (correlation between any two), as the checkpoints of one run do."""
    rng = np.random.default_rng(seed)
    common = rng.standard_normal(2000)
    return [Candidate(i, "coarse", a, a + se * (np.sqrt(correlation) * common
                                                + np.sqrt(1 - correlation) * rng.standard_normal(2000)))
            for i, a in zip(iterations, aucps)]


def test_a_recorded_one_checkpoint_spike_is_taken_by_max_and_the_plain_test_but_not_by_the_shipped_rule():
    """The AUCp curve of `bash demo.sh --full --data CohortB` (docs/experiments.md): 800 spikes, its neighbours do
    not, and the GAN heals from 2,400 on. With an AUCp's noise (se 0.07, draws of two checkpoints correlated 0.84
    as in the scored runs) max and the plain last-unless-beaten take 800; the shipped rule keeps the newest."""
    iterations = list(range(400, 4000, 400))
    aucps = [0.475, 0.614, 0.395, 0.497, 0.502, 0.437, 0.469, 0.513, 0.505]
    candidates = correlated_candidates(iterations, aucps, 0.07, 0.84)
    assert decisions.select_max(candidates).iteration == 800
    assert decisions.select_last_unless_beaten(candidates).iteration == 800
    assert decisions.pick(candidates).iteration == 3600
    # a gain that persists over neighbouring checkpoints still beats the newest
    plateau = correlated_candidates(iterations, [0.48, 0.70, 0.72, 0.71, 0.50, 0.48, 0.47, 0.50, 0.50], 0.07, 0.84)
    assert decisions.pick(plateau).iteration in (800, 1200, 1600)


def recorded_sweep(spike_at=300, seed=0):
    """Patient scores of five checkpoints of one run (14 held-out healthy, 60 mixed patients): a real signal that
    grows slowly with training, plus, at one checkpoint, eight mixed patients that happen to score high."""
    rng = np.random.default_rng(seed)
    labels = np.r_[np.zeros(14), np.ones(60)].astype(int)
    anatomy = rng.normal(0, 1, labels.size)  # what every checkpoint scores alike
    scores = {}
    for k, iteration in enumerate((100, 200, 300, 400, 500)):
        signal = labels * (0.35 + 0.05 * k)
        values = anatomy + signal + rng.normal(0, 0.3, labels.size)
        if iteration == spike_at:
            values[np.flatnonzero(labels)[:8]] += 3.0
        scores[(iteration, "coarse")] = values
    return labels, scores


def test_the_shipped_rule_does_not_take_a_one_checkpoint_spike_that_max_aucp_takes():
    labels, scores = recorded_sweep()
    candidates = decisions.candidates_from_scores(labels, scores)
    aucps = {c.iteration: round(c.aucp, 3) for c in candidates}
    assert decisions.select_max(candidates).iteration == 300, aucps
    assert decisions.pick(candidates).iteration != 300, aucps
    assert decisions.pick(candidates).iteration == 500
    assert decisions.select_last_unless_beaten(candidates).iteration == 500


def test_the_selection_summary_holds_every_candidates_interval_and_its_paired_difference_from_the_pick():
    labels, scores = recorded_sweep()
    candidates = decisions.candidates_from_scores(labels, scores)
    chosen = decisions.pick(candidates)
    summary = decisions.selection_summary(candidates, chosen, decisions.DEFAULT_RULE, decisions.DEFAULT_CANDIDATES)
    assert summary["best_iteration"] == chosen.iteration and len(summary["candidates"]) == 5
    for row in summary["candidates"]:
        assert row["aucp_low"] <= row["aucp"] <= row["aucp_high"]
        assert row["difference_low"] <= row["difference_from_pick"] <= row["difference_high"]
    # paired: the checkpoints score the same patients alike (their anatomy), so a difference from the pick varies far
    # less over the draws than two independent AUCps would (the quadrature of their intervals' widths)
    pick = next(r for r in summary["candidates"] if r["iteration"] == chosen.iteration)
    for row in summary["candidates"]:
        if row is not pick:
            independent = np.hypot(row["aucp_high"] - row["aucp_low"], pick["aucp_high"] - pick["aucp_low"])
            assert row["difference_high"] - row["difference_low"] < 0.6 * independent, row


def test_every_candidate_of_a_sweep_is_resampled_with_the_same_draws():
    """The pick compares candidates on one set of bootstrap draws (docs/method.md): two checkpoints, or two
    reconstructions, that score every patient alike have the same draws, and a difference of exactly zero."""
    labels, scores = recorded_sweep()
    patients = [f"p{i}" for i in range(len(labels))]
    results = [{"checkpoint": iteration, "patient_scores": {"pid": patients, "label": labels.tolist(),
                                                            "coarse": scores[(iteration, "coarse")].tolist(),
                                                            "calibrated": scores[(100, "coarse")].tolist()}}
               for iteration in (100, 200, 300, 400, 500)]
    results[-1]["patient_scores"]["coarse"] = scores[(100, "coarse")].tolist()  # 500 scores as 100 does
    candidates = checkpoint_selection.sweep_candidates(results, seed=7)
    alike = [c for c in candidates if c.iteration == 100 or c.iteration == 500 or c.reconstruction == "calibrated"]
    assert len(alike) == 2 + 5
    for c in alike:
        assert np.array_equal(c.draws, alike[0].draws), (c.iteration, c.reconstruction)
    others = [c for c in candidates if c not in alike]
    assert all(not np.array_equal(c.draws, alike[0].draws) for c in others)
    summary = decisions.selection_summary(candidates, alike[0], "max", decisions.DEFAULT_CANDIDATES)
    for row in summary["candidates"]:
        if (row["iteration"], row["reconstruction"]) in {(c.iteration, c.reconstruction) for c in alike}:
            assert row["difference_low"] == row["difference_high"] == row["difference_from_pick"] == 0


def test_the_coarse_only_candidate_set_never_picks_the_calibrated_reconstruction():
    candidates = [candidate(100, 0.60, 0.05), candidate(100, 0.90, 0.01, "calibrated")]
    assert decisions.pick(candidates, "max").reconstruction == "calibrated"
    assert decisions.pick(candidates, "max", "coarse").reconstruction == "coarse"


# --- the refiner's check --------------------------------------------------------------------------------------

def check_scores(refined_shift, seed=0):
    """Patient scores of the bar and of a refiner on 14 held-out healthy and 60 mixed patients: the refiner changes
    every score (it halves the reconstruction error), and takes refined_shift of the mixed set's signal."""
    rng = np.random.default_rng(seed)
    labels = np.r_[np.zeros(14), np.ones(60)].astype(int)
    bar = rng.normal(labels * 1.0, 1.0)
    refined = bar + rng.normal(0, 0.3, labels.size) - refined_shift * labels
    bootstrap = PairedBootstrap(labels, seed=1)
    return bootstrap.auc(bar), bootstrap.auc(refined)


def test_the_check_passes_a_refiner_whose_aucp_is_lower_by_less_than_its_noise():
    bar, refined = check_scores(refined_shift=0.05)
    verdict = decisions.refiner_verdict("calibrated", {"refined": 0.003, "calibrated": 0.005},
                                        {"refined": refined, "calibrated": bar})
    assert bar[0] - refined[0] > 0.03  # lower: a check that compares point AUCps fails it
    assert bar[0] - refined[0] < bar[1].std()  # by less than the AUCp's own standard error
    assert verdict.refiner_helps and not verdict.significantly_below
    assert verdict.difference_low < verdict.aucp_difference < 0 < verdict.difference_high
    assert verdict.error_change == pytest.approx(-0.4)


def test_the_check_fails_a_refiner_whose_aucp_is_lower_by_far_more_than_its_noise():
    bar, refined = check_scores(refined_shift=1.0)
    verdict = decisions.refiner_verdict("coarse", {"refined": 0.003, "coarse": 0.005},
                                        {"refined": refined, "coarse": bar})
    assert bar[0] - refined[0] > 0.2
    assert verdict.significantly_below and not verdict.refiner_helps and verdict.difference_high < 0


def test_the_check_fails_a_refiner_that_beats_the_picks_error_but_not_the_intensity_correction():
    bar, refined = check_scores(refined_shift=0.0)
    verdict = decisions.refiner_verdict("coarse", {"refined": 0.004, "coarse": 0.005, "calibrated": 0.0035},
                                        {"refined": refined, "coarse": bar})
    assert not verdict.significantly_below and not verdict.refiner_helps
    assert verdict.error_change == pytest.approx(0.004 / 0.0035 - 1)


def test_the_check_fails_a_refiner_that_does_not_lower_the_held_out_healthy_error():
    bar, refined = check_scores(refined_shift=0.0)
    verdict = decisions.refiner_verdict("coarse", {"refined": 0.006, "coarse": 0.005},
                                        {"refined": refined, "coarse": bar})
    assert not verdict.significantly_below and not verdict.refiner_helps


@pytest.mark.parametrize("choice, has_refiner, check, scored", [
    ("on", True, {"refiner_helps": False, "fallback": "calibrated"}, "refined"),
    ("off", True, {"refiner_helps": True}, "coarse"),
    ("calibrate", False, None, "calibrated"),
    ("auto", False, None, "coarse"),
    ("auto", True, None, "refined"),  # no check (a single known-healthy patient): the refiner
    ("auto", True, {"refiner_helps": True, "fallback": "calibrated"}, "refined"),
    ("auto", True, {"refiner_helps": False, "fallback": "calibrated"}, "calibrated"),
    ("auto", True, {"refiner_helps": False}, "coarse"),  # a check recorded before it named its fallback
])
def test_refiner_auto_scores_with_the_refiner_only_when_it_passed_its_check(choice, has_refiner, check, scored):
    assert decisions.scored_reconstruction(choice, has_refiner, check) == scored
