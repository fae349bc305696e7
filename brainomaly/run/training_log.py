"""Training logs: losses to the progress bar, TensorBoard (default) and neptune.ai (only when asked for);
TensorBoard also gets stage 1's sample grids and, after a protocol, its AUCs and figures (log_protocol)."""
import os

import numpy as np
import torch

from brainomaly import distributed, visualize
from brainomaly.errors import UserError
from brainomaly.run.settings import replace_config


class TrainingLogger:
    """Losses to the progress bar, TensorBoard (default) and neptune.ai (only when asked for); under torchrun only
    rank 0 logs (the losses it logs are the means over ranks)."""

    def __init__(self, config, run_name):
        self.writer = self.neptune_run = None
        if not distributed.is_main():
            return
        if config.use_tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(os.path.join(config.log_dir, run_name))
        if config.use_neptune:
            self.neptune_run = start_neptune(config)

    def log(self, values, step, progress):
        progress.set_postfix({k.split("/")[-1]: f"{v:.4f}" for k, v in values.items()})
        for key, value in values.items():
            if self.writer:
                self.writer.add_scalar(key, value, step)
            if self.neptune_run:
                self.neptune_run[key].append(value, step=step)

    def log_image(self, tag, image, step):
        """An image (C, H, W) or (H, W) in [0, 1], e.g. a sample grid, to TensorBoard (neptune gets scalars only)."""
        if self.writer:
            image = torch.as_tensor(np.asarray(image, dtype=np.float32))
            self.writer.add_image(tag, image[None] if image.ndim == 2 else image, step)

    def log_figure(self, tag, png_path, step):
        """A figure visualize.py wrote (ROC, anomaly panel), logged as the same picture."""
        self.log_image(tag, visualize.read_png(png_path), step)

    def close(self):
        if self.writer:
            self.writer.close()
        if self.neptune_run:
            self.neptune_run.stop()


def log_protocol(config, result, out_dir, n_maps=4):
    """A protocol's AUCs, ROC, score histogram and first anomaly panels (out_dir: its results folder) to
    TensorBoard under log_dir/test-PROTOCOL, at step = checkpoint."""
    if not config.use_tensorboard:
        return
    protocol, step = result["protocol"], result["checkpoint"]
    logger = TrainingLogger(replace_config(config, use_neptune=False), f"test-{protocol}")
    for key in ("auc", "slice_auroc", "pixel_auroc", "pixel_auprc"):
        if key in result:
            logger.writer.add_scalar(f"{protocol}/{result['reconstruction']}/{key}", result[key], step)
    figures = [f"{protocol}_roc.png", f"{protocol}_scores.png"]
    maps_dir = os.path.join(out_dir, f"maps_{protocol}")
    if os.path.isdir(maps_dir):
        figures += [os.path.join(f"maps_{protocol}", n) for n in sorted(os.listdir(maps_dir))[:n_maps]]
    for name in figures:
        logger.log_figure(f"{protocol}/{result['reconstruction']}/{os.path.splitext(name)[0]}",
                          os.path.join(out_dir, name), step)
    logger.close()


def start_neptune(config):
    """A neptune run (a new one, or --neptune_id's) with the config as its parameters."""
    try:
        import neptune
    except ImportError:
        raise UserError("--use_neptune true needs the neptune package.\nFix: pip install neptune, or drop the flag.")
    missing = [v for v in ("NEPTUNE_PROJECT", "NEPTUNE_API_TOKEN") if not os.environ.get(v)]
    if missing:
        raise UserError(f"--use_neptune true needs the environment variable(s) {', '.join(missing)}.\n"
                        f"Fix: export them (see neptune.ai), or drop the flag.")
    run = neptune.init_run(project=os.environ["NEPTUNE_PROJECT"], api_token=os.environ["NEPTUNE_API_TOKEN"],
                           with_id=config.neptune_id)
    run["parameters"] = {k: str(v) for k, v in vars(config).items()}
    return run
