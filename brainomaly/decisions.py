"""The label-free decisions, as pure functions of recorded scores (no networks, no disease labels):

- the pick: which stage-1 checkpoint, scored with which reconstruction, the run ships (--select RULE, over the
  AUCp of every checkpoint);
- the refiner's check: is the refiner trained on the pick used (--refiner auto)?

AUCp is estimated from few patients (12-16 held-out known-healthy ones against the mixed set), so its noise is as
large as the differences it decides: every AUCp here comes with a paired patient bootstrap (the held-out healthy
and the mixed patients resampled separately, the same draws for every candidate), and the rules and the check
decide on those draws, not on point values alone.
"""
import enum
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

BOOTSTRAP_DRAWS = 2000
CONFIDENCE = 0.95  # of every interval shown
SIGNIFICANCE = 0.05  # one-sided level of "significantly better / below", before the correction for candidates
SMOOTHING_WINDOW = 3  # checkpoints averaged by the smoothed rule (the checkpoint and its two neighbours)


class Reconstruction(str, enum.Enum):
    """What a score compares the input with: x_c (coarse), f(x_c) (calibrated), x_r (refined)."""
    COARSE = "coarse"
    CALIBRATED = "calibrated"
    REFINED = "refined"

    def __str__(self):
        return self.value


WITHOUT_REFINER = (Reconstruction.COARSE, Reconstruction.CALIBRATED)


# --- the bootstrap -------------------------------------------------------------------------------------------

def pairwise_wins(positive, negative):
    """(n_pos, n_neg) matrix: 1 where a positive scores above a negative, 1/2 on a tie, else 0. The mean of it is
    the Mann-Whitney form of the ROC AUC."""
    positive, negative = np.asarray(positive, float)[:, None], np.asarray(negative, float)[None, :]
    return (positive > negative) + 0.5 * (positive == negative)


@dataclass
class PairedBootstrap:
    """Resampling draws of the scored units (patients, or slices grouped by patient), label 0 and label 1 apart,
    shared by every candidate scored on the same units, so differences between candidates keep their pairing.

    cluster: the patient of each unit (resampled as a whole: a patient-cluster bootstrap for slice scores); for
    patient scores each unit is its own cluster. labels: per unit (a cluster has one label)."""
    labels: np.ndarray
    cluster: Optional[np.ndarray] = None
    draws: int = BOOTSTRAP_DRAWS
    seed: int = 0
    _weights: dict = field(default=None, init=False, repr=False)

    def __post_init__(self):
        self.labels = np.asarray(self.labels).astype(int)
        clusters = np.arange(len(self.labels)) if self.cluster is None else np.asarray(self.cluster)
        if not {0, 1} <= set(self.labels.tolist()):
            raise ValueError("a bootstrap of an AUC needs units of both labels")
        rng = np.random.default_rng(self.seed)
        self._weights = {}
        for label in (0, 1):
            units = np.flatnonzero(self.labels == label)
            names, member = np.unique(clusters[units], return_inverse=True)
            # multinomial counts: how often each cluster is drawn in a resample of the same size
            counts = rng.multinomial(len(names), np.full(len(names), 1 / len(names)), size=self.draws)
            self._weights[label] = (units, counts[:, member].astype(float))  # a unit weighs as its cluster

    def auc(self, scores):
        """(point AUC, AUC of every draw) of scores on these units."""
        scores = np.asarray(scores, float)
        (neg, w_neg), (pos, w_pos) = self._weights[0], self._weights[1]
        wins = pairwise_wins(scores[pos], scores[neg])
        point = float(wins.mean())
        draws = np.einsum("dp,pn,dn->d", w_pos, wins, w_neg) / (w_pos.sum(1) * w_neg.sum(1))
        return point, draws


def interval(draws, confidence=CONFIDENCE):
    """Two-sided percentile interval of bootstrap draws."""
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(draws, [tail, 100 - tail])
    return float(low), float(high)


# --- the candidates and the rules -----------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)  # compared and hashed by identity: its draws are an array
class Candidate:
    """One (checkpoint, reconstruction) with its AUCp and its bootstrap draws."""
    iteration: int
    reconstruction: str
    aucp: float
    draws: np.ndarray

    @property
    def se(self):
        return float(np.std(self.draws, ddof=1))

    def summary(self):
        low, high = interval(self.draws)
        return {"iteration": self.iteration, "reconstruction": str(self.reconstruction), "aucp": self.aucp,
                "aucp_low": low, "aucp_high": high, "aucp_se": self.se}


def candidates_from_scores(labels, scores_by_candidate, cluster=None, seed=0):
    """Candidates from {(iteration, reconstruction): scores on the same units} (labels: known-healthy 0, mixed 1),
    all with the same bootstrap draws. Order: by iteration, then coarse before calibrated."""
    bootstrap = PairedBootstrap(labels, cluster, seed=seed)
    order = sorted(scores_by_candidate, key=lambda key: (key[0], reconstruction_rank(key[1])))
    return [Candidate(iteration, reconstruction, *bootstrap.auc(scores_by_candidate[(iteration, reconstruction)]))
            for iteration, reconstruction in order]


def reconstruction_rank(reconstruction):
    """coarse 0, calibrated 1, refined 2: the order of the tables, and the tie-break (the simpler one first)."""
    return [r.value for r in Reconstruction].index(str(reconstruction))


def restrict(candidates, reconstructions):
    """The candidates scored with one of these reconstructions (coarse only: (COARSE,))."""
    allowed = {str(r) for r in reconstructions}
    return [c for c in candidates if str(c.reconstruction) in allowed]


def best_by_aucp(candidates):
    """The highest AUCp; on a tie the earlier checkpoint, then coarse (as today's sweep printed it)."""
    return max(candidates, key=lambda c: (c.aucp, -c.iteration, -reconstruction_rank(c.reconstruction)))


def last_checkpoint(candidates):
    """The newest checkpoint, with the reconstruction that separates best there."""
    newest = max(c.iteration for c in candidates)
    return best_by_aucp([c for c in candidates if c.iteration == newest])


def select_max(candidates):
    """The highest AUCp (the maximum of many noisy estimates: it favours one-checkpoint spikes)."""
    return best_by_aucp(candidates)


def select_last(candidates):
    """The newest checkpoint, whatever AUCp says."""
    return last_checkpoint(candidates)


def smoothed_aucp(candidates, window=SMOOTHING_WINDOW):
    """{candidate: mean AUCp of it and its neighbouring checkpoints of the same reconstruction}."""
    return {original: smoothed.aucp for smoothed, original in smoothed_candidates(candidates, window).items()}


def select_smoothed(candidates):
    """The highest AUCp averaged over neighbouring checkpoints: a spike of one checkpoint is damped."""
    smoothed = smoothed_aucp(candidates)
    return max(candidates, key=lambda c: (smoothed[c], c.aucp, -c.iteration))


def select_one_se(candidates):
    """The newest checkpoint whose AUCp is within one bootstrap standard error of the best (a GAN that is trained
    longer heals more, so among the candidates the data cannot tell apart, the latest)."""
    best = best_by_aucp(candidates)
    close = [c for c in candidates if c.aucp >= best.aucp - best.se]
    newest = max(c.iteration for c in close)
    return best_by_aucp([c for c in close if c.iteration == newest])


def significantly_better(candidate, reference, tests):
    """Does candidate beat reference on AUCp beyond the noise: a one-sided paired bootstrap at SIGNIFICANCE,
    Bonferroni-corrected for `tests` comparisons (the share of draws where it is not better below the level)."""
    not_better = float(np.mean(candidate.draws - reference.draws <= 0))
    return not_better < SIGNIFICANCE / max(tests, 1)


def select_last_unless_beaten(candidates):
    """The newest checkpoint, unless another candidate beats it significantly (corrected for the number of
    candidates compared); then the best of those that do."""
    last = last_checkpoint(candidates)
    others = [c for c in candidates if c is not last]
    beating = [c for c in others if significantly_better(c, last, len(others))]
    return best_by_aucp(beating) if beating else last


def smoothed_candidates(candidates, window=SMOOTHING_WINDOW):
    """{smoothed candidate: its candidate}: each candidate's AUCp and draws averaged with those of its neighbouring
    checkpoints of the same reconstruction (a gain from healing persists over neighbouring checkpoints; a spike of
    one checkpoint's noise is divided by the window)."""
    smoothed = {}
    for reconstruction in {str(c.reconstruction) for c in candidates}:
        curve = sorted((c for c in candidates if str(c.reconstruction) == reconstruction), key=lambda c: c.iteration)
        half = window // 2
        for i, c in enumerate(curve):
            neighbours = curve[max(0, i - half):i + half + 1]
            smoothed[Candidate(c.iteration, c.reconstruction, float(np.mean([n.aucp for n in neighbours])),
                               np.mean([n.draws for n in neighbours], axis=0))] = c
    return smoothed


def select_smoothed_last_unless_beaten(candidates):
    """last_unless_beaten on AUCp averaged over neighbouring checkpoints (draws averaged alike)."""
    smoothed = smoothed_candidates(candidates)
    return smoothed[select_last_unless_beaten(list(smoothed))]


RULES = {
    "smoothed_last_unless_beaten": select_smoothed_last_unless_beaten,
    "last_unless_beaten": select_last_unless_beaten,
    "one_se": select_one_se,
    "smoothed": select_smoothed,
    "max": select_max,
    "last": select_last,
}
DEFAULT_RULE = "smoothed_last_unless_beaten"
CANDIDATE_SETS = {"coarse": (Reconstruction.COARSE,), "coarse+calibrated": WITHOUT_REFINER}
DEFAULT_CANDIDATES = "coarse+calibrated"


def pick(candidates, rule=DEFAULT_RULE, candidate_set=DEFAULT_CANDIDATES):
    """The candidate RULE picks among those of CANDIDATE_SET."""
    allowed = restrict(candidates, CANDIDATE_SETS[candidate_set])
    if not allowed:
        raise ValueError(f"no candidate scored with {candidate_set}")
    return RULES[rule](allowed)


def selection_summary(candidates, chosen, rule, candidate_set):
    """What aucp_selection.json records of the pick: every candidate's AUCp with its interval, and each one's
    difference from the pick with the interval of that difference (paired: the same draws)."""
    table = []
    for c in candidates:
        row = c.summary()
        low, high = interval(c.draws - chosen.draws)
        row.update(difference_from_pick=c.aucp - chosen.aucp, difference_low=low, difference_high=high)
        table.append(row)
    return {"rule": rule, "candidate_set": candidate_set, "best_iteration": chosen.iteration,
            "best_reconstruction": str(chosen.reconstruction), "best_aucp": chosen.aucp,
            "bootstrap": {"draws": int(len(chosen.draws)), "confidence": CONFIDENCE,
                          "resampled": "held-out known-healthy and mixed-set patients, separately; the same draws "
                                       "for every candidate"},
            "candidates": table}


# --- the refiner's check --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RefinerVerdict:
    """The check of the refiner trained on the pick, on held-out known-healthy patients against the mixed set."""
    refiner_helps: bool
    bar: str  # the reconstruction the pick chose: the AUCp the refiner must keep, and --refiner auto's fallback
    error_change: float  # refined held-out healthy error / the lowest without the refiner - 1
    aucp_difference: float  # AUCp refined - the bar's
    difference_low: float  # the CONFIDENCE interval of that difference (paired bootstrap)
    difference_high: float
    significantly_below: bool


def refiner_verdict(bar, errors, aucp_draws):
    """The refiner passes when
    - its held-out known-healthy error is below the lowest without the refiner (x_c's or f(x_c)'s: f is the
      cheapest correction of x_c, and a refiner that cannot beat it only learnt the per-intensity error), and
    - its AUCp is not significantly below the bar's, the reconstruction the pick chose (one-sided paired bootstrap
      at SIGNIFICANCE): a refiner that also erases the disease loses AUCp beyond its noise.

    errors: {reconstruction: mean held-out healthy error}; aucp_draws: {reconstruction: (point, draws)} on the
    same bootstrap."""
    bar = str(bar)
    (refined, refined_draws), (bars, bar_draws) = aucp_draws["refined"], aucp_draws[bar]
    difference = refined_draws - bar_draws
    below = float(np.mean(difference >= 0)) < SIGNIFICANCE
    low, high = interval(difference)
    error_bar = min(error for name, error in errors.items() if name != "refined")
    change = errors["refined"] / error_bar - 1 if error_bar > 0 else float("inf")
    return RefinerVerdict(refiner_helps=bool(errors["refined"] < error_bar and not below), bar=bar,
                          error_change=float(change), aucp_difference=float(refined - bars),
                          difference_low=low, difference_high=high, significantly_below=below)


def scored_reconstruction(choice, has_refiner, check):
    """What --refiner CHOICE scores a checkpoint with: on -> refined; off -> coarse; calibrate -> calibrated;
    auto -> refined where a refiner was trained and did not fail its recorded check (None: skipped, one
    known-healthy patient), else its fallback (the reconstruction the check compared it with), else coarse."""
    if choice == "off" or (choice == "auto" and not has_refiner):
        return Reconstruction.COARSE
    if choice == "calibrate":
        return Reconstruction.CALIBRATED
    if choice == "on" or check is None or check["refiner_helps"]:
        return Reconstruction.REFINED
    return Reconstruction(check.get("fallback", "coarse"))  # checks written before the bar fell back to x_c


def describe_check(check):
    """One line of stage 2's recorded held-out check: the error and AUCp of each reconstruction it compared, and
    the refiner's AUCp difference from its bar with that difference's interval."""
    names = [r.value for r in Reconstruction if f"{r.value}_error" in check]
    error = ", ".join(f"{name} {check[f'{name}_error']:.5f}" for name in names)
    aucp = ", ".join(f"{name} {check[f'aucp_{name}']:.4f}" for name in names if f"aucp_{name}" in check)
    line = f"held-out known-healthy error {error}" + (f"; AUCp against the mixed set {aucp}" if aucp else "")
    if "aucp_difference_interval" in check:
        low, high = check["aucp_difference_interval"]
        line += (f"; AUCp refined - {check['bar']} {check['aucp_difference']:+.4f} ({100 * CONFIDENCE:.0f}% "
                 f"interval {low:+.4f} to {high:+.4f})")
    return line
