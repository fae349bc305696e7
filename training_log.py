"""Training logs: losses to the progress bar, TensorBoard (default) and neptune.ai (only when asked for)."""
import os

import distributed
from errors import UserError


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

    def close(self):
        if self.writer:
            self.writer.close()
        if self.neptune_run:
            self.neptune_run.stop()


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
