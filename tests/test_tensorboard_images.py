"""TensorBoard gets pictures as well as scalars: sample grids while training, ROC and anomaly panels after a protocol."""
import argparse
import os

import numpy as np
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from brainomaly import visualize
from brainomaly.run.training_log import TrainingLogger, log_protocol


def events(folder):
    accumulator = EventAccumulator(folder, size_guidance={"images": 0, "scalars": 0})
    accumulator.Reload()
    return accumulator


def config(tmp_path, **extra):
    return argparse.Namespace(use_tensorboard=True, use_neptune=False, log_dir=str(tmp_path / "logs"), **extra)


def test_logger_writes_sample_grids_and_figures_as_images(tmp_path):
    grid = visualize.save_sample_grid([torch.zeros(2, 1, 8, 8), torch.ones(2, 1, 8, 8)], str(tmp_path / "s.png"))
    assert tuple(grid.shape) == (1, 16, 16)
    roc = str(tmp_path / "roc.png")
    visualize.save_roc_curve([0, 1, 0, 1], [0.1, 0.8, 0.3, 0.6], roc, "ROC")
    logger = TrainingLogger(config(tmp_path), "stage1")
    logger.log_image("samples/stage1", grid, 5)
    logger.log_figure("inductive/roc", roc, 5)
    logger.close()
    images = events(str(tmp_path / "logs" / "stage1")).Images
    assert images("samples/stage1")[0].step == 5 and images("samples/stage1")[0].height == 16
    assert images("inductive/roc")[0].width == 500  # the 5-inch, 100-dpi ROC figure as written


def test_protocol_logs_its_aucs_roc_and_first_anomaly_panels(tmp_path):
    out = tmp_path / "results"
    visualize.save_roc_curve([0, 1, 0, 1], [0.1, 0.8, 0.3, 0.6], str(out / "inductive_roc.png"), "ROC")
    visualize.save_score_histogram([0, 1, 0, 1], [0.1, 0.8, 0.3, 0.6], 0.5, str(out / "inductive_scores.png"), "h")
    image = np.zeros((8, 8))
    for name in ("diseased_a.png", "healthy_b.png"):
        visualize.save_anomaly_panel(image, image, image, str(out / "maps_inductive" / name))
    result = {"protocol": "inductive", "checkpoint": 40, "reconstruction": "coarse", "auc": 0.75, "slice_auroc": 0.7}
    log_protocol(config(tmp_path), result, str(out))
    logged = events(str(tmp_path / "logs" / "test-inductive"))
    assert logged.Scalars("inductive/coarse/slice_auroc")[0].value == np.float32(0.7)
    assert sorted(logged.Tags()["images"]) == ["inductive/coarse/inductive_roc", "inductive/coarse/inductive_scores",
                                               "inductive/coarse/maps_inductive/diseased_a",
                                               "inductive/coarse/maps_inductive/healthy_b"]
    assert all(logged.Images(tag)[0].step == 40 for tag in logged.Tags()["images"])
    assert not os.path.isdir(tmp_path / "logs" / "test-aucp")
