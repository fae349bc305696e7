"""What both training stages share: Adam, and the check that stops training at the first non-finite loss."""

import torch

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
