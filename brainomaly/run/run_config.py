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

from brainomaly import distributed
from brainomaly.data import healthy_split
from brainomaly.data.healthy_split import KNOWN_HEALTHY_KEY, patient_ids
from brainomaly.errors import UserError
from brainomaly.run import checkpoint as ckpt
from brainomaly.run.run_layout import write_json
from brainomaly.run.settings import replace_config
from diffusion_refiner import REFINER_ARCHITECTURE_FLAGS
from model import ARCHITECTURE_FLAGS

# the flags that change what a run trains and when it saves: stage 1, then stage 2 (whose held-out check at the end
# scores with --score_region, --ddim_steps and --refiner_samples)
RUN_FLAGS = ARCHITECTURE_FLAGS + (
    "lambda_gp", "lambda_id", "lambda_id_start", "lambda_id_ramp", "gp_every", "batch_size", "num_iters",
    "num_iters_decay", "lr_decay", "g_lr", "d_lr", "n_critic", "d_warmup",
    "beta1", "beta2", "preload", "g_ema", "seed", "augment_shift", "healthy_holdout",
    "log_step", "sample_step", "model_save_step", "lr_update_step",
    "lr_decay_shape", "g_ema_start", "g_ema_warmup", "r1_gamma", "gan_loss", "diffaug",  # the stabilisers
) + REFINER_ARCHITECTURE_FLAGS + (
    "refiner_iters", "refine_from", "refiner_batch_size", "refiner_lr", "refiner_ema",
    "score_region", "ddim_steps", "refiner_samples", "select", "select_candidates",  # the pick stage 2 refines
)
# every other flag of main.py, and why the run does not record it (tests/test_run_config.py: each flag is in one list)
NOT_RECORDED = {
    **dict.fromkeys(("mode", "resume_iters", "set_aside_newer", "test_iters"), "what a command does, not the run"),
    **dict.fromkeys(("image_dir", "run_dir", "log_dir", "model_save_dir", "sample_dir", "result_dir", "output"),
                    "where a command reads and writes (the run records the dataset it trained on and its split)"),
    "refiner": "which reconstruction a command scores with",
    **dict.fromkeys(("score_batch_size", "num_workers", "device", "compile", "compile_backend", "fused_adam",
                     "deferred_finite_check", "preload_on_device", "keep_freed_memory"),
                    "speed and placement: the same results (up to float rounding)"),
    **dict.fromkeys(("bf16", "channels_last"), "the run records the fast path it chose (config.json, fast_path)"),
    **dict.fromkeys(("rho", "save_maps", "flag_percentile", "prepared", "prepared_size", "min_brain_fraction",
                     "slices"),
                    "how a command reports or what it scores, not what the run trained"),
    **dict.fromkeys(("use_tensorboard", "use_neptune", "neptune_id", "neptune_key"), "logging only"),
}
# what scoring and the label-free pick read of the run (all in RUN_FLAGS): the protocols, score mode and the sweep
# take the run's values unless typed, so that they score as its refiner's check and its pick did
SCORING_FLAGS = ("score_region", "ddim_steps", "refiner_samples", "select", "select_candidates", "seed")
# which known-healthy patients the run trains on follows from these: never changed by a resume
FIXED_FLAGS = ("seed", "healthy_holdout")
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


def with_run_scoring_flags(config):
    """config with the run's recorded SCORING_FLAGS where the command did not type them (a run without a record: as
    typed or defaulted). Prints once what it took that differs from the defaults, and each typed value that differs
    from the run's."""
    saved = saved_run_settings(config.model_save_dir)
    if saved is None:
        return config
    taken, typed = {}, []
    for key in SCORING_FLAGS:
        if key not in saved or saved[key] == getattr(config, key):
            continue
        if key in config.explicit_flags:
            typed.append(f"--{key} {getattr(config, key)} typed (this run records {saved[key]}): scoring with "
                         f"{getattr(config, key)}.")
        else:
            taken[key] = saved[key]
    if taken:
        distributed.main_print("Scoring with this run's settings (its config.json; a typed flag overrides one): "
                               + ", ".join(f"--{key} {value}" for key, value in taken.items()) + ".")
    for line in typed:
        distributed.main_print(line)
    return replace_config(config, **taken)


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
    trained_on, held_out = healthy_split.draw_split(config.image_dir, config.healthy_holdout, config.seed)
    return replace_config(config, **{KNOWN_HEALTHY_KEY: {"held_out": patient_ids(held_out),
                                                         "trained_on": patient_ids(trained_on)}})
