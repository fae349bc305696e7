"""The CSF-fraction baseline on hand-made slices whose CSF fraction is known exactly."""
import json
import os

import numpy as np
import pytest

from brainomaly.data.dataset_layout import slice_filename
from brainomaly.data.slice_files import save_slice_png
from brainomaly.errors import UserError
from brainomaly.evaluate.baseline import baseline_protocol_aucs, csf_fraction, main, patient_scores


def head_slice(dark_pixels, dark_value=0.1):
    """20x20 black slice with a 10x10 head (0.8) holding `dark_pixels` CSF-dark pixels inside it."""
    image = np.zeros((20, 20))
    image[5:15, 5:15] = 0.8
    rows, cols = np.divmod(np.arange(dark_pixels), 8)
    image[6 + rows, 6 + cols] = dark_value
    return image


# (folder, pid, CSF fraction of each slice): patient scores 0.15, 0.30 | 0.25, 0.50 | 0.05, 0.15 | 0.05 | 0.40
DATASET = [
    ("test/neg", "p1", [0.1, 0.2]), ("test/neg", "p2", [0.3]),
    ("test/pos", "p3", [0.2, 0.3]), ("test/pos", "p4", [0.5]),
    ("train/neg", "h1", [0.05]), ("train/neg", "h2", [0.1, 0.2]),
    ("train/neg_mixed", "m1", [0.05, 0.05]), ("train/pos", "m2", [0.4]),
]


def write_dataset(root, folders=None):
    for folder, pid, fractions in DATASET:
        if folders is None or folder in folders:
            for k, fraction in enumerate(fractions):
                save_slice_png(head_slice(round(fraction * 100)), os.path.join(root, folder, slice_filename(pid, k)))


def test_csf_fraction_counts_dark_pixels_inside_the_head_only():
    assert csf_fraction(head_slice(10)) == pytest.approx(0.10)
    # Pure black CSF inside the head still counts: the head mask has its holes filled.
    assert csf_fraction(head_slice(24, dark_value=0.0)) == pytest.approx(0.24)
    assert csf_fraction(np.zeros((20, 20))) == 0.0


def test_patient_score_is_the_mean_of_its_slices(tmp_path):
    write_dataset(str(tmp_path))
    folder = tmp_path / "test" / "neg"
    scores = patient_scores(sorted(str(p) for p in folder.iterdir()))
    assert scores == pytest.approx({"p1": 0.15, "p2": 0.30})


def test_protocol_aucs_match_hand_computation(tmp_path):
    write_dataset(str(tmp_path))
    aucs = baseline_protocol_aucs(str(tmp_path))
    # inductive: neg {0.15, 0.30} vs pos {0.25, 0.50}: (pos, neg) pairs won 1 + 0 + 1 + 1 of 4.
    # transductive: neg_mixed {0.05} vs pos {0.40}: 1 of 1.
    # aucp: train/neg {0.05, 0.15} vs M {0.05, 0.40}: 0.5 (tie) + 1 + 0 + 1 of 4.
    assert aucs == pytest.approx({"inductive": 0.75, "transductive": 1.0, "aucp": 0.625})


def test_missing_test_set_skips_inductive_and_command_writes_json(tmp_path, capsys):
    write_dataset(str(tmp_path), folders={"train/neg", "train/neg_mixed", "train/pos"})
    assert main([str(tmp_path)]) == 0
    with open(tmp_path / "baseline.json") as handle:
        saved = json.load(handle)
    assert saved["auc"] == pytest.approx({"inductive": None, "transductive": 1.0, "aucp": 0.625})
    assert "n/a" in capsys.readouterr().out


def test_missing_dataset_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="make_cohort.py"):
        baseline_protocol_aucs(str(tmp_path / "nowhere"))
