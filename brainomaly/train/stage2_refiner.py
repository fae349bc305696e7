"""Stage 2: the residual diffusion refiner. On known-healthy slices only, with the stage-1 generator of
checkpoint ITER frozen, learn p(r | x_c) for the residual r0 = x - x_c; checkpoints ITER-R (EMA weights, used
to score) and ITER-R-state (save_stage2 / restore_stage2 for an exact resume).

Under torchrun every rank trains the same refiner on its shard of the healthy stream (DistributedDataParallel
averages the gradients; every rank updates the same EMA from its unwrapped refiner), the held-out check is scored
in shards and summed, and rank 0 alone writes checkpoints, the check's JSON and logs."""
import os

import torch

import data_loader
from brainomaly import decisions, distributed, metrics, seeds
from brainomaly.data import dataset_check, dataset_layout, healthy_split
from brainomaly.decisions import describe_check
from brainomaly.errors import UserError
from brainomaly.evaluate import intensity_correction, scoring
from brainomaly.evaluate.checkpoint_selection import select_checkpoint, selected_checkpoint
from brainomaly.evaluate.scoring_networks import ScoringNetworks
from brainomaly.run import cache_keys, run_config, run_layout
from brainomaly.run import checkpoint as ckpt
from brainomaly.run.networks import build_refiner, load_generator, model_path, resolve_iteration, saved_config
from brainomaly.run.training_log import TrainingLogger
from brainomaly.train.ema import EMA
from brainomaly.train.training_loop import FiniteCheck, TrainingLoop, adam
from diffusion_refiner import REFINER_ARCHITECTURE_FLAGS
from model import healthy_reconstruction


def refine_from_iteration(runtime, config):
    """(stage-1 checkpoint stage 2 refines, the reconstruction its check compares the refiner with): --refine_from,
    or the pick of the AUCp sweep (no labels). The bar is the reconstruction the pick chose for that checkpoint;
    None for a checkpoint no sweep picked (the check then takes the better of x_c and f(x_c) by AUCp). A restarted
    stage 2 (--resume_iters) with one unfinished refiner continues that one: a new sweep could pick another."""
    if config.refine_from != "aucp":
        iteration = resolve_iteration(config, config.refine_from, flag="--refine_from")
        return iteration, picked_reconstruction(config, iteration)
    unfinished = unfinished_refiners(config) if config.resume_iters is not None else []
    if len(unfinished) == 1:
        distributed.main_print(f"Continuing the unfinished refiner of checkpoint {unfinished[0]} (no new AUCp sweep).")
        return unfinished[0], picked_reconstruction(config, unfinished[0])
    return select_checkpoint(runtime, config)


def picked_reconstruction(config, iteration):
    """The reconstruction the recorded AUCp pick chose, if it picked this checkpoint (every rank reads the file)."""
    picked = selected_checkpoint(config.result_dir)
    return picked[1] if picked is not None and picked[0] == iteration else None


def unfinished_refiners(config):
    """Stage-1 iterations with a refiner training state (ITER-R-state) but no final refiner (ITER-R) yet."""
    return sorted(set(ckpt.saved_iterations(config.model_save_dir, "R-state"))
                  - set(ckpt.saved_iterations(config.model_save_dir, "R")))


@torch.no_grad()
def residual_std(runtime, generator, healthy, batches=8):
    """Std of r0 = x - x_c over a few healthy batches (on resume the saved scale and stream state win); under
    torchrun each batch is gathered from every rank's shard in rank order, as one process with the global batch
    has it, so every rank gets the same scale."""
    residuals = []
    for _ in range(batches):
        x = next(healthy).to(runtime.device)
        with runtime.autocast():
            residual = (x - healthy_reconstruction(x, generator(x)).float()).flatten()
        if runtime.world_size > 1:
            residuals += [part.to(runtime.device) for part in distributed.all_gather(residual.cpu())]
        else:
            residuals.append(residual)
    return float(torch.cat(residuals).std().clamp_min(1e-3))


def refiner_step(runtime, generator, diffusion, optimizer, x, noise_generator):
    """One stage-2 update on healthy slices x: the frozen G gives x_c, the refiner learns r0 = x - x_c."""
    with torch.no_grad(), runtime.autocast():
        coarse = healthy_reconstruction(x, generator(x)).float()
    with runtime.autocast():  # forward = the loss, so under DDP the gradients are synchronised
        loss = diffusion(x - coarse, coarse, noise_generator, (runtime.rank, runtime.world_size))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss


@torch.no_grad()
def holdout_check(runtime, config, iteration, generator, refiner, paths, correction=None, bar=None):
    """The label-free guard, on the known-healthy slices `paths` that neither stage trained on, against the mixed
    set: does x_r reconstruct them better than every reconstruction without the refiner (mean |x - x_r|/2 against
    the lowest of mean |x - x_c|/2 and |x - f(x_c)|/2, scored as the protocols score), and is its AUCp not
    significantly below the bar's (decisions.refiner_verdict)? The bar is the reconstruction the label-free pick
    chose for this checkpoint (`bar`); without one, the better of x_c and f(x_c) by AUCp. A refiner that learns
    what the GAN gets wrong on healthy brains passes; one that also erases the part of the GAN's residual that
    tracks disease lowers the error but loses AUCp. The bar is also the `fallback` --refiner auto scores with when
    the refiner fails. Every rank gets the check."""
    if not paths:
        return None
    mixed = dataset_layout.mixed_set_paths(config.image_dir)
    scored = paths + mixed
    networks = ScoringNetworks(iteration, generator, refiner, config, {}, correction, "refined")
    beside = {name: scoring.ReconstructionScores(len(scored), config.score_region, name)
              for name in map(str, decisions.WITHOUT_REFINER) if name == "coarse" or correction is not None}
    scores = {"refined": scoring.score_slices(runtime, networks, scored, list(beside.values())),  # one pass
              **{name: consumer.scores for name, consumer in beside.items()}}
    pids, labels = [dataset_layout.patient_id(p) for p in scored], [0] * len(paths) + [1] * len(mixed)
    check = {"held_out_slices": len(paths), "held_out_patients": len({dataset_layout.patient_id(p) for p in paths}),
             **cache_keys.data_key(config.image_dir, scored)}
    patients = metrics.aggregate_patients(pids, scores["refined"], labels)
    patient_scores = {name: metrics.aggregate_patients(pids, values)["score"] for name, values in scores.items()}
    bootstrap = decisions.PairedBootstrap(patients["label"], seed=config.seed)
    aucp = {}
    for name, values in scores.items():
        check[f"{name}_error"] = float(values[:len(paths)].mean())
        aucp[name] = bootstrap.auc(patient_scores[name])
        check[f"aucp_{name}"] = aucp[name][0]
    if bar not in beside:  # no pick for this checkpoint (or it chose f(x_c), which this run cannot fit)
        bar = max(beside, key=lambda name: (check[f"aucp_{name}"], name == "coarse"))
    verdict = decisions.refiner_verdict(bar, {name: check[f"{name}_error"] for name in scores}, aucp)
    check.update(bar=bar, fallback=bar, refiner_helps=verdict.refiner_helps, error_change=verdict.error_change,
                 aucp_difference=verdict.aucp_difference, aucp_difference_interval=[verdict.difference_low,
                                                                                    verdict.difference_high],
                 aucp_significantly_below=verdict.significantly_below, ddim_steps=config.ddim_steps,
                 refiner_samples=config.refiner_samples)
    check["patient_scores"] = {"pid": patients["pid"].tolist(), "label": patients["label"].tolist(),
                               **{name: values.tolist() for name, values in patient_scores.items()}}  # the verdict's data
    return check


def report_holdout_check(check, config, iteration):
    if check is None:
        print("Refiner check skipped: train/neg has a single patient, so none could be held out.")
        return
    bar = check.get("bar", "coarse")
    print(f"Refiner check on {check['held_out_slices']} held-out known-healthy slices ({check['held_out_patients']} "
          f"patients never trained on), against the {bar} reconstruction: {describe_check(check)}; refined error "
          f"{100 * check['error_change']:+.1f}% against the lowest without the refiner.")
    if check["error_change"] >= 0:
        print("WARNING: the refiner does NOT reconstruct healthy slices it has not seen better than the coarse and "
              "intensity-corrected reconstructions, so it would add error, not remove the GAN's artifacts.")
    if check.get("aucp_significantly_below"):
        print(f"WARNING: the refined score separates the held-out healthy patients from the mixed set significantly "
              f"LESS well than the {bar} reconstruction (AUCp), so the refiner would blur the disease signal: it also "
              f"removes part of the GAN's residual that tracks disease.")
    if not check["refiner_helps"]:
        print(f"--refiner auto will score checkpoint {iteration} with the {check.get('fallback', 'coarse')} "
              f"reconstruction (--refiner on forces the refiner).\nFix: train stage 2 longer (--refiner_iters) or "
              f"wider (--refiner_dim), or stage 1 longer (a GAN that heals more leaves the refiner only its "
              f"artifacts to learn).")
    run_layout.write_json({"checkpoint": iteration, **check},
                          run_layout.refiner_check(config.result_dir, iteration))


class Stage2State:
    """What stage 2 carries from one iteration to the next: the refiner, the EMA of its weights (what is scored), the
    optimiser, the healthy-set stream, the diffusion noise generator and the refiner iteration reached (step).
    state_dict() is what ITER-R-state.ckpt holds besides the config; load_state_dict(state_dict()) continues
    exactly."""

    def __init__(self, *, diffusion, ema, optimizer, stream, noise_generator, step=0):
        self.diffusion, self.ema, self.optimizer = diffusion, ema, optimizer
        self.stream, self.noise_generator, self.step = stream, noise_generator, step

    def state_dict(self):
        return {"state_dict": self.diffusion.state_dict(), "ema": self.ema.state_dict(),
                "optimizer": self.optimizer.state_dict(), "noise_generator": self.noise_generator.get_state(),
                "stream": self.stream.state_dict(), "refiner_iteration": self.step}

    def load_state_dict(self, state):
        self.diffusion.load_state_dict(state["state_dict"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.noise_generator.set_state(state["noise_generator"])
        self.stream.load_state_dict(state["stream"])
        self.step = state["refiner_iteration"]


def save_stage2(config, iteration, state, *, check=None, final=False, refines_weights=None):
    """ITER-R-state (raw weights, EMA, optimiser, stream position, noise generator); when training has ended
    (final), then ITER-R (EMA weights and the held-out check). Periodic saves write no ITER-R, so scoring never
    picks up a half-trained refiner that has not passed the held-out check. Both record refines_weights, the hash
    of the ITER-G.ckpt the refiner was trained on (cache_keys.file_fingerprint; default: the one there now)."""
    saved = saved_config(config)
    g_path = model_path(config, iteration, "G")
    if refines_weights is None and os.path.isfile(g_path):
        refines_weights = cache_keys.file_fingerprint(g_path)
    ckpt.atomic_save({**state.state_dict(), "config": saved, "refines_weights": refines_weights},
                     model_path(config, iteration, "R-state"), "refiner training state")
    if not final:
        return
    # R last: scoring treats ITER-R.ckpt as "the refiner of ITER exists". When writing it fails, the complete
    # ITER-R-state of the last step stays: --resume_iters latest goes straight to the check and this save.
    ckpt.atomic_save({"state_dict": state.ema.model.state_dict(), "config": saved, "refines": iteration,
                      "refines_weights": refines_weights, "refiner_iteration": state.step, "holdout_check": check},
                     model_path(config, iteration, "R"), "refiner checkpoint")


def restore_stage2(config, iteration, state, refines_weights=None):
    """Load what save_stage2 wrote for ITER into state; returns the refiner iteration to continue from. A state
    trained on another ITER-G.ckpt than refines_weights (the one there now) is refused."""
    path = model_path(config, iteration, "R-state")
    saved = ckpt.load(path)
    check_refined_generator(saved, path, model_path(config, iteration, "G"), refines_weights)
    state.load_state_dict(saved)
    start = state.step
    if isinstance(config.resume_iters, int) and config.resume_iters != start:
        # train.sh hands stage 1's --resume_iters N to stage 2 too; the refiner keeps only its latest state
        distributed.main_print(f"(--resume_iters {config.resume_iters} names a stage-1 checkpoint; stage 2 keeps "
                               f"only its latest state and continues that.)")
    distributed.main_print(f"Resumed stage 2 of checkpoint {iteration} from refiner iteration {start}.")
    return start


def check_refined_generator(saved, path, g_path, refines_weights):
    """Refuse to continue the refiner state `saved` (from `path`) on a generator other than the one it was trained on;
    a state saved before refiners recorded their generator continues as before."""
    if refines_weights is None or "refines_weights" not in saved:
        if refines_weights is not None:
            distributed.main_print(f"note: {path} does not record which generator weights it refines (saved "
                                   f"before refiners recorded them): continuing it as before, unchecked against "
                                   f"{g_path}.")
        return
    if saved["refines_weights"] != refines_weights:
        raise UserError(f"{path} continues a refiner trained on another {g_path} than the one there now (the "
                        f"generator was trained again since).\nFix: move {path} aside and train stage 2 for this "
                        f"checkpoint afresh (without --resume_iters).")


def train_refiner(runtime, config):
    """Stage 2: on known-healthy slices only, learn p(r | x_c) for r0 = x - x_c with G frozen."""
    c, changes = config, None
    saved = run_config.saved_run_settings(c.model_save_dir)
    if saved is not None:  # the run's settings (stage 2's among them, as the run was started), unless typed
        c, changes = run_config.continue_run(c, saved, "stage 2")
    if changes and runtime.is_main:
        run_config.write_run_config(c, {**saved, **saved_config(c)}, changes, "stage 2")
    if c.refiner_iters <= 0:
        distributed.main_print("Stage 2 skipped (--refiner_iters 0): scoring uses the coarse reconstruction.")
        return
    ranks = runtime.world_size
    dataset_check.check_dataset(c.image_dir, c.refiner_batch_size * ranks, batch_flag="--refiner_batch_size",
                                mixed_in_batches=False)  # the refiner trains on known-healthy slices alone
    iteration, bar = refine_from_iteration(runtime, c)
    generator, c, trained_with = load_generator(runtime, c, iteration)
    refines_weights = cache_keys.file_fingerprint(model_path(c, iteration, "G"))  # the G this refiner refines
    r_path, state_path = model_path(c, iteration, "R"), model_path(c, iteration, "R-state")
    resume = c.resume_iters is not None and os.path.isfile(state_path)
    for path in (r_path, state_path):
        if os.path.isfile(path) and not resume:
            raise UserError(f"{path} already exists; training stage 2 again would overwrite it.\n"
                            f"Fix: continue it with --resume_iters latest, or delete {r_path} and {state_path}.")
    if resume:  # build the refiner the saved state was trained with (refiner flags need not be repeated)
        c = ckpt.reconciled_config(c, ckpt.load(state_path)["config"], REFINER_ARCHITECTURE_FLAGS, state_path)
    # known-healthy patients held out of refiner training, for the label-free check at the end: the ones stage 1
    # held out (seen by neither stage); for a stage 1 trained before --healthy_holdout existed (it held none out),
    # this --healthy_holdout share, as the refiner alone held out before
    trained_on, held_out = healthy_split.run_split(c.image_dir, trained_with, c.healthy_holdout)
    healthy = data_loader.training_stream(trained_on, c.image_size, c.refiner_batch_size,
                                          seeds.seed(c.seed, "refiner_healthy_set"), c.preload,
                                          **runtime.stream_options(),
                                          batch_flag="--refiner_batch_size or --healthy_holdout")
    seeds.seed_weights(c.seed)
    diffusion = build_refiner(runtime, c)
    diffusion.residual_scale.fill_(residual_std(runtime, generator, healthy))
    state = Stage2State(diffusion=diffusion, ema=EMA(diffusion, c.refiner_ema),
                        optimizer=adam(diffusion.parameters(), c.refiner_lr, (0.9, 0.999), c, runtime.device),
                        stream=healthy,
                        noise_generator=torch.Generator(runtime.device).manual_seed(
                            seeds.seed(c.seed, "refiner_noise")))
    start = restore_stage2(c, iteration, state, refines_weights) if resume else 0
    if ranks > 1:
        distributed.main_print(f"Stage 2: {ranks} ranks x batch {c.refiner_batch_size} = global batch "
                               f"{ranks * c.refiner_batch_size} healthy slices.")
    # Wrapped after the restore: DDP copies rank 0's weights to every rank when it is built.
    train_diffusion = runtime.wrapped(diffusion)
    writes = runtime.is_main  # rank 0 alone writes checkpoints, the check and logs
    loop = TrainingLoop(runtime=runtime, start=start, total=c.refiner_iters, desc=f"stage 2 (refining G@{iteration})",
                        logger=TrainingLogger(c, f"stage2-{iteration}"),
                        finite=FiniteCheck(c.deferred_finite_check, lambda step, _: UserError(
                            f"non-finite refiner loss at stage-2 iteration {step}; the last good refiner checkpoint "
                            f"stays in {c.model_save_dir}.\nFix: lower --refiner_lr.")))
    for i in loop:
        x = next(healthy).to(runtime.device, non_blocking=True)
        loss = refiner_step(runtime, generator, train_diffusion, state.optimizer, x, state.noise_generator)
        loss = loop.mean_over_ranks({"R": loss})["R"]
        state.ema.update(diffusion)  # the unwrapped refiner: the same weights on every rank
        step = state.step = i + 1
        loop.add(step, {"R": loss})  # --deferred_finite_check: read before the log and every save
        if writes and step == start + 5 and c.refiner_iters > step:
            rate = loop.progress.format_dict["rate"] or 0
            if rate:
                print(f"stage 2: {c.refiner_iters} iterations, about "
                      f"{(c.refiner_iters - step) / rate / 60:.1f} min at {rate:.2f} it/s")
        if loop.due(step, c.log_step):
            loop.log(step, {"R/loss_diffusion": loss.item()})
        if writes and step % c.model_save_step == 0 and step < c.refiner_iters:
            loop.check()
            save_stage2(c, iteration, state, refines_weights=refines_weights)
    loop.check()
    loop.close()
    correction = intensity_correction.for_checkpoint(runtime, c, iteration, generator, trained_with)
    # every rank: its shard
    check = holdout_check(runtime, c, iteration, generator, state.ema.model, held_out, correction, bar)
    if not writes:
        return
    state.step = c.refiner_iters
    save_stage2(c, iteration, state, check=check, final=True, refines_weights=refines_weights)
    report_holdout_check(check, c, iteration)
    print(f"Stage 2 done: {r_path} refines {model_path(c, iteration, 'G')}.")
