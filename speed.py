"""Speed options that do not change the maths: the CPU heap setting, fused Adam, torch.compile, and a
non-finite-loss check that reads the device only every few iterations."""
import ctypes
import ctypes.util
import sys

import torch

from errors import UserError

# glibc mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4


def keep_freed_memory():
    """Make glibc malloc keep freed memory for reuse instead of handing it back to the kernel.

    By default glibc serves every allocation above its mmap threshold (at most 32 MiB) with a fresh mmap and
    unmaps it on free, and trims the heap top once more than twice that threshold is free. A training step
    allocates and frees the same large activations every iteration (a 64-channel 192 px batch of 16 is 151 MB),
    so every iteration page-faults them in again: millions of minor faults, each zeroing a 4 KiB page in the
    kernel, whose cost swings with what the rest of the machine does. With no mmap'd chunks and no trimming,
    the heap grows to the step's peak once and is reused. Returns True when applied (glibc only)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def adam(parameters, lr, betas, config, device):
    """torch.optim.Adam; fused into one kernel per step with --fused_adam (same update, float rounding aside)."""
    options = {"fused": True} if config.fused_adam else {}
    if config.fused_adam and device.type not in ("cuda", "cpu"):
        raise UserError(f"--fused_adam is not available on {device.type}.\nFix: drop --fused_adam.")
    return torch.optim.Adam(parameters, lr, betas=betas, **options)


def compile_module(network, config):
    """torch.compile(network) with --compile (backend --compile_backend); the network itself otherwise."""
    return torch.compile(network, backend=config.compile_backend) if config.compile else network


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
