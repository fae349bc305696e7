"""The one checkpoint writer and reader: atomic files of tensors and plain config, loaded with weights_only.

A checkpoint iteration ITER in the models folder is
    ITER-G.ckpt      generator weights + config          (all scoring needs)
    ITER-D.ckpt      critic weights + config
    ITER-state.ckpt  optimisers, random states, data-stream positions (exact resume)
    ITER-R.ckpt      refiner EMA weights + config, refining ITER-G (stage 2)
    ITER-R-state.ckpt  refiner raw weights, optimiser and random states (stage-2 resume)
    ITER-intensity.json  the intensity correction f of ITER-G (intensity_correction.py; fitted when first scored)

A stage-1 checkpoint ITER is complete when ITER-G.ckpt exists: save_set writes it last, after D and the state,
and a save that fails removes the whole set, so every reader (resume 'latest', scoring, the sweep over 'all')
that asks for G never meets a half-written one. ITER-R.ckpt is written the same way, after ITER-R-state.
"""
import contextlib
import io
import os
import re

import torch

from brainomaly.atomic_files import write_bytes
from brainomaly.errors import UserError
from brainomaly.run.settings import replace_config

CHECKPOINT_PATTERN = re.compile(r"^(\d+)-(G|D|state|R|R-state)\.ckpt$")


def checkpoint_path(model_dir, iteration, part):
    return os.path.join(model_dir, f"{iteration}-{part}.ckpt")


def atomic_save(payload, path, what="checkpoint"):
    """Write a checkpoint atomically (atomic_files: a kill leaves the old file or the new one, never a torn one).
    Serialised in memory first: torch.save writing straight to a full disk raises a RuntimeError about zip
    positions instead of the OS error; a plain write of the bytes raises the OSError that names the cause."""
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    write_bytes(buffer.getbuffer(), path, what)


def save_set(parts, what="checkpoint"):
    """Write [(payload, path), ...] in order, the last one being the part that marks the set complete; when any
    write fails, every file of the set is removed (also an older copy of a part not reached yet), so no half set
    is left to resume from or score, and the error goes on."""
    try:
        for payload, path in parts:
            atomic_save(payload, path, what)
    except BaseException:
        for _, path in parts:
            with contextlib.suppress(OSError):
                os.remove(path)
        raise


def load(path, map_location="cpu"):
    if not os.path.isfile(path):
        raise UserError(f"missing checkpoint {path}.")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # a torn or foreign file: say which one
        raise UserError(f"cannot load checkpoint {path} ({type(err).__name__}: {err}).\n"
                        f"Fix: delete it and use an older iteration.") from err


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


INTENSITY_PATTERN = re.compile(r"^(\d+)-intensity\.json$")  # the intensity correction of a checkpoint


def files_after(model_dir, iteration):
    """{iteration: [file names]} of every checkpoint file (any part, and the intensity correction) of an iteration
    after `iteration` in model_dir."""
    found = {}
    for name in sorted(os.listdir(model_dir)) if os.path.isdir(model_dir) else []:
        match = CHECKPOINT_PATTERN.match(name) or INTENSITY_PATTERN.match(name)
        if match and int(match.group(1)) > iteration:
            found.setdefault(int(match.group(1)), []).append(name)
    return dict(sorted(found.items()))


def missing_checkpoint_error(model_dir, iteration, part, what, flag="ITER"):
    """flag: where the user names the iteration (ITER of the test scripts, --resume_iters, --refine_from)."""
    existing = saved_iterations(model_dir, part)
    listing = ", ".join(map(str, existing)) if existing else "none"
    # 'latest' and 'all' name no file: say which files are missing
    missing = checkpoint_path(model_dir, iteration if isinstance(iteration, int) else "ITER", part)
    return UserError(f"missing checkpoint {missing} ({what}).\n"
                     f"Saved iterations in {model_dir}: {listing}.\nFix: pass one of them as {flag}"
                     + ("." if existing else ", or train first (bash train.sh NAME)."))


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
