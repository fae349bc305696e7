"""The networks of both stages: built from the config, or loaded from checkpoint ITER with the architecture
saved in it (the returned config carries that architecture; the caller's config is left as it was)."""
import os

from brainomaly import decisions, distributed
from brainomaly.errors import UserError
from brainomaly.run import checkpoint as ckpt
from brainomaly.run import run_layout
from brainomaly.run.cache_keys import file_fingerprint
from diffusion_refiner import REFINER_ARCHITECTURE_FLAGS, RefinerUNet, ResidualDiffusion
from model import ARCHITECTURE_FLAGS, Discriminator, Generator


def stage1_generator(config):
    """The generator config's architecture flags describe (a config from before --g_padding: zeros)."""
    return Generator(config.in_channels, config.g_conv_dim, config.g_repeat_num, config.map_init != "default",
                     config.map_init == "identity", getattr(config, "g_padding", "zeros"))


def build_stage1(runtime, config):
    generator = runtime.prepare(stage1_generator(config))
    critic = runtime.prepare(Discriminator(config.in_channels, config.d_conv_dim, config.d_repeat_num))
    return generator, critic


def build_refiner(runtime, config):
    unet = RefinerUNet(config.in_channels, config.refiner_dim, tuple(config.refiner_dim_mults),
                       config.refiner_blocks, config.refiner_attn_levels, config.refiner_heads)
    return runtime.prepare(ResidualDiffusion(unet, config.diffusion_steps))


def saved_config(config):
    """The plain config a checkpoint stores."""
    return {k: v for k, v in vars(config).items() if k != "explicit_flags"}


def model_path(config, iteration, part):
    return ckpt.checkpoint_path(config.model_save_dir, iteration, part)


def resolve_iteration(config, iteration, part="G", flag="ITER"):
    """An iteration number, or 'latest' -> the newest saved one; a missing one is a UserError naming `flag`."""
    model_dir = config.model_save_dir
    if iteration == "latest":
        saved = ckpt.saved_iterations(model_dir, part)
        if not saved:
            raise ckpt.missing_checkpoint_error(model_dir, "latest", part, "no checkpoint saved yet", flag)
        return saved[-1]
    if not os.path.isfile(model_path(config, iteration, part)):
        raise ckpt.missing_checkpoint_error(model_dir, iteration, part, "stage-1 generator", flag)
    return iteration


def refuse_to_overwrite(config, part, hint):
    existing = ckpt.saved_iterations(config.model_save_dir, part)
    if existing:
        raise UserError(f"{config.model_save_dir} already holds checkpoints (iterations "
                        f"{', '.join(map(str, existing))}); a new run would overwrite them.\n"
                        f"Fix: {hint}, choose another --run_dir, or delete that folder.")


def load_generator(runtime, config, iteration):
    """(frozen generator of checkpoint ITER, config with its architecture, the config it was trained with)."""
    path = model_path(config, resolve_iteration(config, iteration), "G")
    saved = ckpt.load(path)
    config = ckpt.reconciled_config(config, saved["config"], ARCHITECTURE_FLAGS, path)
    # stage 2 and scoring run as the run trained (a checkpoint from before the choice was recorded: resolved here)
    config = runtime.settle_fast_path(config, saved["config"])
    generator = stage1_generator(config)  # the weights replace the init
    generator.load_state_dict(saved["state_dict"])
    return runtime.compiled(runtime.prepare(generator).eval().requires_grad_(False)), config, saved["config"]


def refines_this_generator(config, iteration, saved, path):
    """Whether the refiner checkpoint `saved` (read from `path`) was trained on the ITER-G.ckpt there now (the hash it
    records, cache_keys.file_fingerprint). One saved before refiners recorded it counts as before, with a note."""
    g_path = model_path(config, iteration, "G")
    if saved.get("refines_weights") is None:
        distributed.note_once(f"note: {path} does not record which generator weights it refines (saved before "
                              f"refiners recorded them): used as before, unchecked against {g_path}.")
        return True
    return saved["refines_weights"] == file_fingerprint(g_path)


def retrain_hint(config, iteration):
    r_path, state_path = model_path(config, iteration, "R"), model_path(config, iteration, "R-state")
    return (f"move {r_path} and {state_path} aside and train stage 2 for it again (python main.py --mode "
            f"train_refiner --refine_from {iteration} ...)")


def load_refiner(runtime, config, iteration):
    """(refiner of checkpoint ITER per --refiner: None to score without it, or the EMA refiner in eval mode;
    config with its architecture; the reconstruction to score with: decisions.scored_reconstruction, from the
    refiner checkpoint's recorded held-out check)."""
    path = model_path(config, iteration, "R")
    choice, has_refiner = config.refiner, os.path.isfile(path)
    if choice == "on" and not has_refiner:
        raise UserError(f"--refiner on, but there is no refiner checkpoint {path} for iteration {iteration}.\n"
                        f"Fix: train stage 2 for it (python main.py --mode train_refiner --refine_from "
                        f"{iteration} ...), or score without it (--refiner off or --refiner calibrate).")
    saved = ckpt.load(path) if has_refiner and choice in ("on", "auto") else None
    if saved is not None and not refines_this_generator(config, iteration, saved, path):
        if choice == "on":
            raise UserError(f"--refiner on, but the refiner {path} was trained on another "
                            f"{model_path(config, iteration, 'G')} than the one there now (the generator was trained "
                            f"again since).\nFix: {retrain_hint(config, iteration)}, or score without it (--refiner "
                            f"off or --refiner calibrate).")
        distributed.main_print(f"WARNING: the refiner {path} was trained on another "
                               f"{model_path(config, iteration, 'G')} than the one there now (the generator was "
                               f"trained again since), so --refiner auto scores checkpoint {iteration} without it, "
                               f"with the coarse reconstruction.\n"
                               f"Fix: {retrain_hint(config, iteration)}.")
        return None, config, str(decisions.Reconstruction.COARSE)
    check = saved.get("holdout_check") if saved else None
    reconstruction = decisions.scored_reconstruction(choice, has_refiner, check)
    if reconstruction != decisions.Reconstruction.REFINED:
        if choice == "auto" and has_refiner:
            # one line: stage 2 printed the check in full, with its warning, when the refiner was trained
            distributed.main_print(f"Checkpoint {iteration}: --refiner auto scores the {reconstruction} reconstruction "
                                   f"(its refiner failed its held-out check, "
                                   f"{run_layout.refiner_check(config.result_dir, iteration)}; "
                                   f"--refiner on forces the refiner).")
        return None, config, str(reconstruction)
    config = ckpt.reconciled_config(config, saved["config"], REFINER_ARCHITECTURE_FLAGS, path)
    diffusion = build_refiner(runtime, config)
    diffusion.load_state_dict(saved["state_dict"])
    diffusion.holdout_check = check  # reported beside the protocol results
    return diffusion.eval().requires_grad_(False), config, "refined"
