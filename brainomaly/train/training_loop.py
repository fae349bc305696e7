"""What both training stages share: Adam, the check that stops training at the first non-finite loss, and the loop
skeleton (progress bar, means over ranks, finite checks, when to log)."""

import torch
from tqdm import tqdm

from brainomaly import distributed
from brainomaly.errors import UserError


def adam(parameters, lr, betas, config, device):
    """torch.optim.Adam; fused into one kernel per step with --fused_adam (same update, float rounding aside)."""
    options = {"fused": True} if config.fused_adam else {}
    if config.fused_adam and device.type not in ("cuda", "cpu"):
        raise UserError(f"--fused_adam is not available on {device.type}.\nFix: drop --fused_adam.")
    return torch.optim.Adam(parameters, lr, betas=betas, **options)


class FiniteCheck:
    """Stops training at the first non-finite loss.

    Eager (the default): looks at the losses after every iteration, which on CUDA waits for the device.
    Deferred (--deferred_finite_check): keeps the iteration's losses on the device and looks at all of them
    only when check() is called (every --log_step and before anything is saved), so the device is never waited
    for in between. Either way the error names the first bad iteration, and since check() runs before every
    save, no checkpoint holds weights updated after a non-finite loss."""

    def __init__(self, deferred, describe_failure):
        self.deferred = deferred
        self.describe_failure = describe_failure  # (iteration, {name: float}) -> UserError
        self.pending = []

    def add(self, iteration, losses):
        """Record iteration's losses ({name: scalar tensor}); eager mode checks them at once."""
        self.pending.append((iteration, {k: v.detach() for k, v in losses.items() if v is not None}))
        if not self.deferred:
            self.check()

    def check(self):
        """Raise the UserError for the first recorded non-finite loss, if any; then forget what was checked."""
        pending, self.pending = self.pending, []
        if not pending:
            return
        flags = torch.stack([torch.isfinite(torch.stack(list(losses.values()))).all() for _, losses in pending])
        if bool(flags.all()):  # the one host sync
            return
        iteration, losses = pending[int((~flags).nonzero()[0])]
        raise self.describe_failure(iteration, {k: v.item() for k, v in losses.items()})


class TrainingLoop:
    """The loop both stages run: iterations start .. total - 1 under a progress bar (rank 0's), each step's losses
    averaged over the ranks (so that every rank logs, and stops on a non-finite loss, alike), checked for non-finite
    values (FiniteCheck, eager or --deferred_finite_check), and logged every --log_step and at the end.

        loop = TrainingLoop(runtime=..., config=..., start=..., total=..., desc=..., logger=..., finite=...)
        for i in loop:
            losses = loop.mean_over_ranks(step(...)); loop.add(i + 1, {...})
            if loop.due(i + 1, config.log_step): loop.log(i + 1, {...})
            if writes and loop.due(i + 1, config.model_save_step): loop.check(); save(...)
        loop.close()
    """

    def __init__(self, *, runtime, start, total, desc, logger, finite):
        self.ranks, self.total, self.logger, self.finite = runtime.world_size, total, logger, finite
        self.progress = tqdm(range(start, total), initial=start, total=total, desc=desc, unit="it",
                             disable=not runtime.is_main)

    def __iter__(self):
        return iter(self.progress)

    def mean_over_ranks(self, losses):
        """{name: scalar tensor} averaged over the ranks (the same dict with one rank)."""
        if self.ranks == 1:
            return losses
        return dict(zip(losses, distributed.mean(torch.stack([v.detach().float() for v in losses.values()]))))

    def add(self, step, losses):
        """Hand step's losses ({name: scalar tensor or None}) to the finite check."""
        self.finite.add(step, losses)

    def due(self, step, every):
        """Whether something done every `every` steps (logging, samples, checkpoints) is due at step: its
        multiples, and the last step."""
        return step % every == 0 or step == self.total

    def check(self):
        """Stop at the first non-finite loss so far (before anything is logged or saved)."""
        self.finite.check()

    def log(self, step, values):
        self.check()
        self.logger.log(values, step, self.progress)

    def close(self):
        self.logger.close()
