"""The one checkpoint writer and reader: atomic files of tensors and plain config, loaded with weights_only.

A checkpoint iteration ITER in the models folder is
    ITER-G.ckpt      generator weights + config          (all scoring needs)
    ITER-D.ckpt      critic weights + config
    ITER-state.ckpt  optimisers, random states, data-stream positions (exact resume)
    ITER-R.ckpt      refiner EMA weights + config, refining ITER-G (stage 2)
    ITER-R-state.ckpt  refiner raw weights, optimiser and random states (stage-2 resume)
    ITER-intensity.json  the intensity correction f of ITER-G (intensity_correction.py; fitted when first scored)
"""
import argparse
import os
import re

import torch

from errors import UserError

CHECKPOINT_PATTERN = re.compile(r"^(\d+)-(G|D|state|R|R-state)\.ckpt$")


def checkpoint_path(model_dir, iteration, part):
    return os.path.join(model_dir, f"{iteration}-{part}.ckpt")


def atomic_save(payload, path):
    """Write to a temporary file in the same folder, flush it to disk, then rename: a kill at any moment
    leaves either the old file or the new one, never a torn one."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load(path, map_location="cpu"):
    if not os.path.isfile(path):
        raise UserError(f"missing checkpoint {path}.")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # a torn or foreign file: say which one
        raise UserError(f"cannot load checkpoint {path} ({type(err).__name__}: {err}).\n"
                        f"Fix: delete it and use an earlier iteration.") from err


def saved_iterations(model_dir, *parts):
    """Iterations for which every named part exists, ascending."""
    if not os.path.isdir(model_dir):
        return []
    found = {}
    for name in os.listdir(model_dir):
        match = CHECKPOINT_PATTERN.match(name)
        if match:
            found.setdefault(int(match.group(1)), set()).add(match.group(2))
    return sorted(i for i, have in found.items() if set(parts) <= have)


def missing_checkpoint_error(model_dir, iteration, part, what, flag="ITER"):
    """flag: where the user names the iteration (ITER of the test scripts, --resume_iters, --refine_from)."""
    existing = saved_iterations(model_dir, part)
    listing = ", ".join(map(str, existing)) if existing else "none"
    return UserError(f"missing checkpoint {checkpoint_path(model_dir, iteration, part)} ({what}).\n"
                     f"Saved iterations in {model_dir}: {listing}.\nFix: pass one of them as {flag}"
                     + ("." if existing else ", or train first (bash train.sh NAME)."))


def replace_config(config, **changes):
    """A copy of the config namespace with some values changed; the caller's config stays as it was."""
    return argparse.Namespace(**{**vars(config), **changes})


def reconciled_config(config, saved, keys, path):
    """A copy of config with the network-defining values taken from a checkpoint; a flag the user typed that
    contradicts one is refused."""
    taken = {}
    for key in keys:
        if key not in saved:
            continue
        ours, theirs = getattr(config, key), saved[key]
        if key in config.explicit_flags and ours != theirs:
            raise UserError(f"--{key} {ours} does not match the checkpoint {path}, which was trained with "
                            f"--{key} {theirs}.\nFix: drop --{key} (the checkpoint's value is used) or "
                            f"pick a checkpoint trained with --{key} {ours}.")
        taken[key] = theirs
    return replace_config(config, **taken)
