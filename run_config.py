"""What a run keeps of how it was made: its training settings and its known-healthy split.

A training run (stage 1 and stage 2 under one --run_dir) records in MODEL_DIR/config.json, and in every
checkpoint's config, every flag that changes what it trains (RUN_FLAGS), and the ids of the known-healthy
patients it trains on and holds out. A resume and stage 2 take those settings from the run, not from the defaults
of a new command line: a flag typed again with the run's value changes nothing, a typed flag with another value is
used, printed once and recorded in config.json's history, and a typed --seed or --healthy_holdout that differs
from the run's is refused (they fix which patients were trained on, so a resume cannot change them).

The held-out patients are stored, not drawn again from the seed, so AUCp, the refiner's check, score mode's
threshold and the intensity correction score the same patients however train/neg changes after training: a
patient added later is ignored, a held-out patient removed is an error naming it.
"""
import json
import os

import checkpoint as ckpt
import data_loader
import distributed
from checkpoint import replace_config
from diffusion_refiner import REFINER_ARCHITECTURE_FLAGS
from errors import UserError
from model import ARCHITECTURE_FLAGS
from run_layout import write_json

# the flags that change what a run trains and when it saves: stage 1, then stage 2 (whose held-out check at the end
# scores with --score_region, --ddim_steps and --refiner_samples)
RUN_FLAGS = ARCHITECTURE_FLAGS + (
    "lambda_gp", "lambda_id", "lambda_id_start", "lambda_id_ramp", "gp_every", "batch_size", "num_iters",
    "num_iters_decay", "lr_decay", "g_lr", "d_lr", "n_critic", "d_warmup",
    "beta1", "beta2", "preload", "g_ema", "seed", "augment_shift", "healthy_holdout",
    "log_step", "sample_step", "model_save_step", "lr_update_step",
) + REFINER_ARCHITECTURE_FLAGS + (
    "refiner_iters", "refine_from", "refiner_batch_size", "refiner_lr", "refiner_ema",
    "score_region", "ddim_steps", "refiner_samples", "select", "select_candidates",  # the pick stage 2 refines
)
# which known-healthy patients the run trains on follows from these: never changed by a resume
FIXED_FLAGS = ("seed", "healthy_holdout")
KNOWN_HEALTHY_KEY = "known_healthy_patients"  # {"held_out": [pid, ...], "trained_on": [pid, ...]}
HISTORY_KEY = "history"  # in config.json only: the flags changed on a resume or at stage 2, and when


def config_json(model_dir):
    return os.path.join(model_dir, "config.json")


def read_run_config(model_dir):
    """The run's config.json, or None where there is none (a new run, or one from before it was written)."""
    path = config_json(model_dir)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as err:
        raise UserError(f"cannot read {path} ({err}).\nFix: restore it from a backup, or delete it to take the "
                        f"settings from the newest checkpoint.") from err


def saved_run_settings(model_dir, checkpoint_config=None):
    """The run's settings: its config.json, or where it has none (a run from before it was written), the config of
    `checkpoint_config` or of its newest stage-1 checkpoint; None for a folder with neither."""
    saved = read_run_config(model_dir)
    if saved is not None:
        return saved
    if checkpoint_config is None:
        newest = ckpt.saved_iterations(model_dir, "G")
        checkpoint_config = ckpt.load(ckpt.checkpoint_path(model_dir, newest[-1], "G"))["config"] if newest else None
    return checkpoint_config


def continue_run(config, saved, what):
    """config with every RUN_FLAG the user did not type taken from `saved` (the run's config), and the run's
    known-healthy split. Returns (config, {flag: (run's value, typed value)} for the typed flags that change it).
    what: the stage and iteration that continues, for the printed lines."""
    taken, changes = {}, {}
    for key in RUN_FLAGS:
        if key not in saved:
            continue
        ours, theirs = getattr(config, key), saved[key]
        if key not in config.explicit_flags:
            taken[key] = theirs
        elif ours != theirs and key in FIXED_FLAGS:
            raise UserError(f"--{key} {ours} does not match this run, which was trained with --{key} {theirs} "
                            f"(it fixes which known-healthy patients were trained on and which are held out).\n"
                            f"Fix: drop --{key} to continue the run, or start a new one with another --run_dir.")
        elif ours != theirs:
            changes[key] = (theirs, ours)
    if KNOWN_HEALTHY_KEY in saved:
        taken[KNOWN_HEALTHY_KEY] = saved[KNOWN_HEALTHY_KEY]
    for key, (before, after) in changes.items():
        until = "to" if key in ("num_iters", "refiner_iters") else "with"
        distributed.main_print(f"--{key} {before} -> {after}: continuing {until} {after} ({what}).")
    return replace_config(config, **taken), changes


def write_run_config(config, saved_config, changes=None, what=""):
    """Write config.json (rank 0 only): the run's settings now, and its history of changes with `changes` added."""
    previous = read_run_config(config.model_save_dir) or {}
    history = list(previous.get(HISTORY_KEY, []))
    if changes:
        history.append({"at": what, "changed": {key: {"from": before, "to": after}
                                                 for key, (before, after) in changes.items()}})
    write_json({**saved_config, HISTORY_KEY: history}, config_json(config.model_save_dir), "run config")


def with_known_healthy_split(config):
    """config with its known-healthy split recorded (a new run: drawn now from --seed and --healthy_holdout; a
    run that has one keeps it)."""
    if getattr(config, KNOWN_HEALTHY_KEY, None):
        return config
    trained_on, held_out = data_loader.known_healthy_split(config.image_dir, config.healthy_holdout, config.seed)
    return replace_config(config, **{KNOWN_HEALTHY_KEY: {"held_out": patient_ids(held_out),
                                                         "trained_on": patient_ids(trained_on)}})


def patient_ids(paths):
    return sorted({data_loader.patient_id(p) for p in paths})


_noted = set()


def note_once(message):
    """Print a note once per process: the split is read by every protocol and by scoring, each run prints it once."""
    if message not in _noted:
        _noted.add(message)
        distributed.main_print(message)


def is_training_data(training_config, image_dir):
    """Whether image_dir is the dataset the run was trained on: the folder it names, or (the run and its data
    moved to another folder or machine) one whose train/neg holds the run's held-out patients and some of those
    it trained on."""
    trained_dir = training_config.get("image_dir", image_dir)
    if os.path.realpath(trained_dir) == os.path.realpath(image_dir):
        return True
    recorded = training_config.get(KNOWN_HEALTHY_KEY)
    folder = os.path.join(image_dir, data_loader.HEALTHY_FOLDER)
    if not recorded or not os.path.isdir(folder):
        return False
    present = set(patient_ids(data_loader.list_images(folder, warn=False)))
    return set(recorded["held_out"]) <= present and bool(set(recorded["trained_on"]) & present)


def training_data_dir(training_config, image_dir):
    """The folder the run was trained on: the one it names, or image_dir where the run's data has moved there."""
    trained_dir = training_config.get("image_dir", image_dir)
    if not os.path.isdir(trained_dir) and is_training_data(training_config, image_dir):
        return image_dir
    return trained_dir


def known_healthy_split(root, training_config, unset_fraction=0.0):
    """(trained_on, held_out) slices of ROOT/train/neg for the run trained with training_config: its recorded
    patients; a run that recorded none (from before the record) draws them again from its --healthy_holdout and
    --seed (unset_fraction: for a run from before --healthy_holdout, which held none out)."""
    recorded = training_config.get(KNOWN_HEALTHY_KEY)
    if not recorded:
        return data_loader.known_healthy_split(root, training_config.get("healthy_holdout", unset_fraction),
                                               training_config.get("seed", 0))
    folder = os.path.join(root, data_loader.HEALTHY_FOLDER)
    paths = data_loader.require_images(root, data_loader.HEALTHY_FOLDER)
    present = set(patient_ids(paths))
    held_out, trained_on = set(recorded["held_out"]), set(recorded["trained_on"])
    missing = sorted(held_out - present)
    if missing:
        raise UserError(f"the held-out known-healthy patient(s) {', '.join(missing)} of this run are missing from "
                        f"{folder}: AUCp, the refiner's check and score mode's threshold score exactly the patients "
                        f"stage 1 held out.\nFix: put their slices back in {folder}.")
    added = present - held_out - trained_on
    if added:
        note_once(f"note: {len(added)} patient(s) in {folder} joined after this run started; they are ignored "
                  f"(neither trained on nor held out).")
    gone = trained_on - present
    if gone:
        note_once(f"note: {len(gone)} known-healthy patient(s) this run trained on are no longer in {folder}.")
    return ([p for p in paths if data_loader.patient_id(p) in trained_on],
            [p for p in paths if data_loader.patient_id(p) in held_out])
