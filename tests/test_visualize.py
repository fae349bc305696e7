"""Every picture lands as a readable PNG of a predictable size, and no figure is left open."""
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from PIL import Image

from brainomaly.visualize import (
    normalise_per_image,
    save_anomaly_panel,
    save_learning_curve,
    save_roc_curve,
    save_sample_grid,
    save_score_histogram,
)

LABELS = [0, 0, 0, 1, 1, 1]
SCORES = [0.1, 0.2, 0.35, 0.3, 0.6, 0.8]


def _open(path):
    assert path.stat().st_size > 0
    with Image.open(path) as image:
        image.load()
        return image.size


@pytest.fixture(autouse=True)
def no_open_figures():
    yield
    assert plt.get_fignums() == []  # every function closes what it opened


def test_roc_curve_png_in_new_folder(tmp_path):
    path = tmp_path / "result" / "400000" / "ROC_Inductive.png"
    save_roc_curve(LABELS, SCORES, path, "Inductive")
    assert _open(path) == (500, 500)


def test_score_histogram_png(tmp_path):
    path = tmp_path / "hist" / "ScoreDist.png"
    save_score_histogram(LABELS, SCORES, 0.3, path, "Inductive")
    assert _open(path) == (600, 400)


def _slice(seed):
    return np.random.default_rng(seed).uniform(-1, 1, (32, 32))


def test_anomaly_panel_gains_a_column_per_optional_panel(tmp_path):
    image, coarse, anomaly_map = _slice(0), _slice(1), np.random.default_rng(2).random((32, 32))
    mask = np.zeros((32, 32))
    mask[10:20, 10:20] = 1
    save_anomaly_panel(image, coarse, anomaly_map, tmp_path / "a" / "three.png", title="p1")
    save_anomaly_panel(image, coarse, anomaly_map, tmp_path / "four.png", refined=_slice(3))
    save_anomaly_panel(image, coarse, anomaly_map, tmp_path / "five.png", refined=_slice(3), mask=mask)
    widths = [_open(tmp_path / name)[0] for name in ("a/three.png", "four.png", "five.png")]
    assert widths == [900, 1200, 1500]


def test_anomaly_panel_accepts_channel_first_slices_and_rejects_volumes(tmp_path):
    rgb = np.repeat(_slice(0)[None], 3, axis=0)
    save_anomaly_panel(rgb, rgb, np.zeros((1, 32, 32)), tmp_path / "rgb.png")
    assert _open(tmp_path / "rgb.png")[0] == 900
    with pytest.raises(ValueError, match="2-D"):
        save_anomaly_panel(np.zeros((4, 32, 32)), rgb, rgb, tmp_path / "bad.png")


def test_learning_curve_png_with_missing_values(tmp_path):
    path = tmp_path / "curves" / "auc.png"
    save_learning_curve([10000, 20000, 30000], {"AUCp": [0.55, 0.6, 0.58], "inductive AUC": [0.7, None, 0.9]},
                        path, "selection")
    assert _open(path) == (900, 400)  # the legend beside the axes
    with pytest.raises(ValueError, match="AUCp"):
        save_learning_curve([1, 2], {"AUCp": [0.5]}, tmp_path / "bad.png", "x")


def test_sample_grid_one_row_per_sample(tmp_path):
    inputs = -torch.ones(2, 1, 8, 8)
    anomaly_map = normalise_per_image(torch.rand(2, 1, 8, 8))
    reconstruction = torch.ones(2, 1, 8, 8)
    path = tmp_path / "samples" / "1000-images.png"
    save_sample_grid([inputs, anomaly_map, reconstruction], path)
    with Image.open(path) as image:
        assert image.size == (24, 16)  # three 8-pixel columns, two 8-pixel rows
        rgb = image.convert("RGB")
        assert rgb.getpixel((0, 15)) == (0, 0, 0)  # -1 is black
        assert rgb.getpixel((23, 15)) == (255, 255, 255)  # +1 is white


def test_normalise_per_image_spans_minus_one_to_one():
    x = torch.stack([torch.linspace(0, 5, 16).view(1, 4, 4), torch.full((1, 4, 4), 3.0)])
    out = normalise_per_image(x)
    assert out[0].min() == -1 and out[0].max() == 1
    assert torch.all(out[1] == -1)  # a constant map is flat, not NaN
