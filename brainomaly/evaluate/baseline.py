"""A trivial, label-free baseline: how much of the brain is CSF-dark.

Slice score = fraction of pixels darker than CSF_THRESHOLD inside a head mask taken from the image itself
(pixels brighter than HEAD_THRESHOLD, holes filled); patient score = mean of its slices. Atrophy turns tissue
into CSF, so a method that cannot beat this score has learned nothing beyond "more CSF".

Usage: python baseline.py data/Demo   (prints the AUC of each protocol, writes data/Demo/baseline.json)
"""
import argparse
import json
import os
import sys

import numpy as np
from scipy import ndimage as ndi
from sklearn.metrics import roc_auc_score

from brainomaly.data.dataset_layout import PROTOCOL_SETS, patient_id, require_images
from brainomaly.data.slice_files import read_grayscale
from brainomaly.errors import UserError, run_cli

HEAD_THRESHOLD = 0.02  # above the black background of skull-stripped slices
CSF_THRESHOLD = 0.3    # between CSF (dark) and grey matter on a [0, 1] T1 slice


def csf_fraction(image01):
    """Fraction of the head (image > HEAD_THRESHOLD, holes filled) that is darker than CSF_THRESHOLD."""
    head = ndi.binary_fill_holes(image01 > HEAD_THRESHOLD)
    if not head.any():
        return 0.0
    return float((image01[head] < CSF_THRESHOLD).mean())


def patient_scores(paths):
    """{patient id: mean CSF fraction of its slices}, in first-seen order."""
    slices = {}
    for path in paths:
        slices.setdefault(patient_id(path), []).append(csf_fraction(read_grayscale(path)))
    return {pid: float(np.mean(values)) for pid, values in slices.items()}


def protocol_auc(root, protocol):
    """Patient-level ROC AUC of the baseline for one protocol; None when one of its folders does not exist."""
    scores, labels = [], []
    for folder, label in PROTOCOL_SETS[protocol]:
        if not os.path.isdir(os.path.join(root, folder)):
            return None
        patients = patient_scores(require_images(root, folder))
        scores += list(patients.values())
        labels += [label] * len(patients)
    return float(roc_auc_score(labels, scores))


def baseline_protocol_aucs(root):
    """{"inductive": auc, "transductive": auc, "aucp": auc}; None for a protocol whose folders are missing."""
    if not os.path.isdir(root):
        raise UserError(f"missing dataset folder {root}.\nFix: pass the folder holding train/ and test/, or make "
                        f"one with `python make_cohort.py {root}`.")
    aucs = {protocol: protocol_auc(root, protocol) for protocol in PROTOCOL_SETS}
    if all(auc is None for auc in aucs.values()):
        raise UserError(f"no protocol can be scored in {root}: train/pos, train/neg_mixed, train/neg or "
                        f"test/pos + test/neg are missing.\nFix: see README, 'Data layout'.")
    return aucs


def run(argv=None):
    parser = argparse.ArgumentParser(description="CSF-fraction baseline: patient-level AUC for each protocol.")
    parser.add_argument("root", help="dataset folder, e.g. data/Demo")
    args = parser.parse_args(argv)
    aucs = baseline_protocol_aucs(args.root)
    print(f"{'protocol':<14}baseline AUC (CSF fraction)")
    for protocol, auc in aucs.items():
        print(f"{protocol:<14}{'n/a (folders missing)' if auc is None else f'{auc:.3f}'}")
    with open(os.path.join(args.root, "baseline.json"), "w") as handle:
        json.dump({"score": "CSF fraction", "csf_threshold": CSF_THRESHOLD, "auc": aucs}, handle, indent=2)
    return 0


def main(argv=None):
    return run_cli(run, argv)


if __name__ == "__main__":
    sys.exit(main())
