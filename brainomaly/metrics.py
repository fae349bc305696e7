"""Metrics shared by every model and every protocol: patient aggregation, AUC, the threshold rule, pixel metrics.

Scores are "higher means more diseased"; label 1 is diseased (or pseudo-positive for AUCp), 0 is healthy.
Nothing here knows about networks: scoring and the protocols hand in numbers and get numbers back.
"""
import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

HEAD_LEVEL = -0.96  # input above this is head, not the black background (2% of the [-1, 1] range)
SCORE_REGIONS = ("head", "image")


def head_region(images):
    """Where the input is head rather than the black background (input above HEAD_LEVEL): the region of the slice
    score, and of the pixel metrics on a dataset with anomaly masks but no brain masks."""
    return np.asarray(images) > HEAD_LEVEL


def slice_scores(images, anomaly_maps, region="head"):
    """Each slice's score: the mean of its anomaly map inside the head (input > HEAD_LEVEL; 0 for a slice with no
    head), or over the whole image with region "image" (the reference's score). Inside the head, a score is change
    per unit of head and does not grow or shrink with how much of the image the head fills (slice level, head
    size, zoom): on the demo cohort this raised every stage-1 checkpoint's inductive AUC by 0.01 to 0.06
    (docs/experiments.md). images: (N, H, W) input in [-1, 1] (channels averaged); anomaly_maps: (N, H, W); float64 (N,)."""
    images = np.asarray(images, dtype=np.float64)
    anomaly_maps = np.asarray(anomaly_maps, dtype=np.float64)
    if images.shape != anomaly_maps.shape or images.ndim != 3:
        raise ValueError(f"images and anomaly maps must both be (N, H, W), got {images.shape} and {anomaly_maps.shape}")
    if region not in SCORE_REGIONS:
        raise ValueError(f"score region must be one of {SCORE_REGIONS}, got {region!r}")
    if region == "image":
        return anomaly_maps.mean(axis=(1, 2))
    head = head_region(images)
    area = head.sum(axis=(1, 2))
    return np.where(area > 0, (anomaly_maps * head).sum(axis=(1, 2)) / np.maximum(area, 1), 0.0)


def aggregate_patients(pids, scores, labels=None):
    """Mean slice score per patient, as the reference does (section 5.1, step 4).

    Returns numpy arrays "pid" (sorted unique ids), "score", "n_slices", and "label" when labels are given.
    A patient's label is the max over its slices, so an id found in both a healthy and a diseased folder
    counts as diseased and its slices merge (the reference's "ano wins").
    """
    pids = np.asarray(pids, dtype=str)
    scores = np.asarray(scores, dtype=np.float64)
    if pids.shape != scores.shape or pids.ndim != 1:
        raise ValueError(f"pids and scores must be 1-D and of equal length, got {pids.shape} and {scores.shape}")
    if pids.size == 0:
        raise ValueError("no slices to aggregate: the scored set is empty")
    unique, inverse = np.unique(pids, return_inverse=True)
    n_slices = np.bincount(inverse, minlength=unique.size)
    out = {
        "pid": unique,
        "score": np.bincount(inverse, weights=scores, minlength=unique.size) / n_slices,
        "n_slices": n_slices,
    }
    if labels is not None:
        labels = np.asarray(labels).astype(np.int64)
        if labels.shape != pids.shape:
            raise ValueError(f"labels must match pids in length, got {labels.shape} and {pids.shape}")
        patient_label = np.zeros(unique.size, dtype=np.int64)
        np.maximum.at(patient_label, inverse, labels)  # diseased wins over healthy for a shared id
        out["label"] = patient_label
    return out


def _check_binary(labels, scores):
    labels = np.asarray(labels).astype(np.int64).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if labels.shape != scores.shape:
        raise ValueError(f"labels and scores differ in length: {labels.size} vs {scores.size}")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("labels must be 0 (healthy) or 1 (diseased)")
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or inf; check the scoring run for a diverged model")
    present = np.unique(labels)
    if present.size < 2:
        raise ValueError(
            f"AUC needs both classes but only label {present.tolist()} is present among {labels.size} "
            "patients; check that both the healthy and the diseased folders of this protocol hold images")
    return labels, scores


def equal_error_threshold(labels, scores):
    """The ROC threshold where sensitivity ≈ specificity: argmin |TPR - (1 - FPR)| (the reference's rule, not Youden).

    Prediction is score >= threshold. The threshold is fitted on the same labels it is then evaluated on,
    so the sensitivity and specificity reported at it are optimistic. Every distinct score is a candidate
    (roc_curve with drop_intermediate=False), so collinear ROC points are not skipped; ties go to the
    highest threshold.
    """
    labels, scores = _check_binary(labels, scores)
    fpr, tpr, thresholds = roc_curve(labels, scores, drop_intermediate=False)
    finite = np.isfinite(thresholds)  # roc_curve's first point (+inf) predicts nobody; never a useful cut-off
    gap = np.abs(tpr[finite] - (1.0 - fpr[finite]))
    return float(thresholds[finite][np.argmin(gap)])


def evaluate(labels, scores):
    """Patient-level metrics of one protocol: AUC, average precision and the confusion at the equal-error threshold."""
    labels, scores = _check_binary(labels, scores)
    threshold = equal_error_threshold(labels, scores)
    predicted = scores >= threshold
    positive = labels == 1
    tp = int(np.sum(predicted & positive))
    fn = int(np.sum(~predicted & positive))
    fp = int(np.sum(predicted & ~positive))
    tn = int(np.sum(~predicted & ~positive))
    return {
        "auc": float(roc_auc_score(labels, scores)),
        "average_precision": float(average_precision_score(labels, scores)),
        "threshold": threshold,
        "sensitivity": tp / (tp + fn),
        "specificity": tn / (tn + fp),
        "tn": tn, "fp": fp, "fn": fn, "tp": tp,
        "n_positive": tp + fn,
        "n_negative": tn + fp,
    }


def patient_auc(pids, slice_scores, labels):
    """Patient-level ROC AUC of slice scores (patients aggregated as aggregate_patients does)."""
    patients = aggregate_patients(pids, slice_scores, labels)
    return float(roc_auc_score(*_check_binary(patients["label"], patients["score"])))


def slice_auroc(pids, slice_scores, labels):
    """Slice-level ROC AUC: every slice scored on its own, labelled with its patient's label (as aggregated)."""
    patients = aggregate_patients(pids, slice_scores, labels)
    patient_label = dict(zip(patients["pid"], patients["label"]))
    slice_labels, scores = _check_binary([patient_label[pid] for pid in np.asarray(pids, dtype=str)], slice_scores)
    return float(roc_auc_score(slice_labels, scores))


def aucp_to_auc(aucp, rho):
    """AUC estimated from the label-free AUCp: (AUCp - rho/2) / (1 - rho).

    rho is the healthy share of the mixed set M. The estimate holds when M's healthy scans score like the known
    healthy set H; it is not clipped, so a value outside [0, 1] says that assumption (or rho) is off.
    """
    aucp, rho = float(aucp), float(rho)
    if not 0.0 <= rho < 1.0:
        raise ValueError(f"rho (healthy share of the mixed set) must satisfy 0 <= rho < 1, got {rho}")
    if not 0.0 <= aucp <= 1.0:
        raise ValueError(f"AUCp must lie in [0, 1], got {aucp}")
    return (aucp - rho / 2.0) / (1.0 - rho)


def healthy_percentile_threshold(healthy_patient_scores, percentile=95):
    """Label-free threshold for new scans: the given percentile of known-healthy patient scores.

    At percentile p about (100 - p)% of healthy patients are flagged, whatever the disease prevalence.
    """
    scores = np.asarray(healthy_patient_scores, dtype=np.float64).ravel()
    if scores.size == 0:
        raise ValueError("no healthy patient scores given; score the healthy set (train/neg) first")
    if not 0.0 <= percentile <= 100.0:
        raise ValueError(f"percentile must lie in [0, 100], got {percentile}")
    return float(np.percentile(scores, percentile))


class PixelMetrics:
    """Streaming pixel-level AUROC, AUPRC and best Dice where ground-truth masks exist, in bounded memory.

    Anomaly-map values are clipped into value_range and counted in n_bins equal bins, separately for
    lesion and non-lesion pixels; memory is two histograms whatever the number of images. Thresholds are the
    bin lower edges, and pixels in one bin count as tied, so results match exact ones up to the bin width.
    """

    def __init__(self, n_bins=1000, value_range=(0.0, 1.0)):
        low, high = float(value_range[0]), float(value_range[1])
        if n_bins < 1 or not high > low:
            raise ValueError(f"need n_bins >= 1 and value_range low < high, got {n_bins} and {value_range}")
        self.n_bins = int(n_bins)
        self.edges = np.linspace(low, high, self.n_bins + 1)
        self.positive = np.zeros(self.n_bins, dtype=np.int64)
        self.negative = np.zeros(self.n_bins, dtype=np.int64)

    def update(self, anomaly_map, mask, region=None):
        """Add pixels; mask marks lesion pixels, region (e.g. a brain mask) limits which pixels count at all."""
        anomaly_map = np.asarray(anomaly_map, dtype=np.float64)
        mask = np.asarray(mask) > 0.5
        if mask.shape != anomaly_map.shape:
            raise ValueError(f"anomaly map {anomaly_map.shape} and mask {mask.shape} must have the same shape")
        if region is not None:
            region = np.asarray(region) > 0.5
            if region.shape != anomaly_map.shape:
                raise ValueError(f"region {region.shape} must have the anomaly map's shape {anomaly_map.shape}")
            anomaly_map, mask = anomaly_map[region], mask[region]
        if not np.isfinite(anomaly_map).all():
            raise ValueError("anomaly map contains NaN or inf")
        values = np.clip(anomaly_map, self.edges[0], self.edges[-1])
        self.positive += np.histogram(values[mask], bins=self.edges)[0]
        self.negative += np.histogram(values[~mask], bins=self.edges)[0]

    def compute(self):
        """Pixel AUROC (trapezoid over the binned ROC), pixel AUPRC (average precision: sum over thresholds of
    the recall gained times the precision there, sklearn's definition) and the best Dice over bin thresholds
    (pixel >= threshold)."""
        n_pos, n_neg = int(self.positive.sum()), int(self.negative.sum())
        if n_pos == 0 and n_neg == 0:
            raise ValueError("no scored slice has an anomaly mask (masks/ at the slice's relative path)")
        if n_pos == 0 or n_neg == 0:
            raise ValueError(
                f"pixel metrics need lesion and non-lesion pixels, got {n_pos} lesion and {n_neg} other pixels "
                f"inside the region")
        # Predicted positive at threshold edges[k] = pixels in bins k..n-1; append k = n (nobody predicted).
        tp = np.append(np.cumsum(self.positive[::-1])[::-1], 0)
        fp = np.append(np.cumsum(self.negative[::-1])[::-1], 0)
        tpr, fpr = tp[::-1] / n_pos, fp[::-1] / n_neg  # from (0, 0) to (1, 1)
        auroc = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))
        predicted = tp + fp
        precision = np.divide(tp, predicted, out=np.ones(tp.shape), where=predicted > 0)
        auprc = float(np.sum((tp[:-1] - tp[1:]) / n_pos * precision[:-1]))
        dice = 2.0 * tp[:-1] / (2.0 * tp[:-1] + fp[:-1] + (n_pos - tp[:-1]))
        best = int(np.argmax(dice))
        return {"pixel_auroc": auroc, "pixel_auprc": auprc, "best_dice": float(dice[best]), "best_dice_threshold": float(self.edges[best])}

    def reset(self):
        self.positive[:] = 0
        self.negative[:] = 0
