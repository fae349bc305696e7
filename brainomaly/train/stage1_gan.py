"""Stage 1: the Brainomaly GAN. WGAN-GP with real = known-healthy H, fake = tanh(x_M + G(x_M)), plus identity
L1 on H; checkpoints every --model_save_step (save_stage1 / restore_stage1 for an exact resume). The losses are in
gan_losses.py; the stabilisers (--lr_decay_shape, --g_ema_start, --g_ema_warmup, --r1_gamma, --gan_loss,
--diffaug) are all off by default.

ITER-G.ckpt holds the generator that scoring and the AUCp selection use: the exponential moving average of
G's weights (--g_ema, the standard GAN practice: the raw G swings between checkpoints), or the raw G with
--g_ema 0. The raw G, which keeps training, is in ITER-state.ckpt.

Under torchrun every rank trains the same networks on its shard of the streams (DistributedDataParallel averages
the gradients), so every rank's G, and the EMA each rank updates from its own unwrapped G, stay identical; rank 0
alone writes checkpoints, samples and logs."""
import math
import os

import torch
from torch.profiler import record_function as region

import data_loader
from brainomaly import distributed, seeds, visualize
from brainomaly.data import dataset_check, dataset_layout, healthy_split, preparation_record, slice_files
from brainomaly.errors import UserError
from brainomaly.run import checkpoint as ckpt
from brainomaly.run import run_config, run_layout
from brainomaly.run.networks import build_stage1, model_path, refuse_to_overwrite, saved_config
from brainomaly.run.training_log import TrainingLogger
from brainomaly.train import diff_augment
from brainomaly.train.ema import EMA
from brainomaly.train.gan_losses import critic_terms, generator_term, gradient_penalty, r1_penalty
from brainomaly.train.training_loop import FiniteCheck, TrainingLoop, adam
from model import ARCHITECTURE_FLAGS, healthy_reconstruction


def identity_weight(config, iteration):
    """lambda_id at `iteration`: linear from --lambda_id_start to --lambda_id over the first --lambda_id_ramp
    iterations, then --lambda_id (a ramp of 0: --lambda_id throughout). A low early weight lets G leave the
    identity while the critic still tells mixed from healthy; the full weight then keeps healthy brains as they are."""
    c = config
    ramp = min(1.0, iteration / c.lambda_id_ramp) if c.lambda_id_ramp > 0 else 1.0
    return c.lambda_id_start + (c.lambda_id - c.lambda_id_start) * ramp


def penalty_weight(config, iteration):
    """The gradient penalty's weight at `iteration`. Lazy regularisation (StyleGAN2): the penalty on every
    --gp_every-th critic step only, weighted --gp_every x --lambda_gp so that its mean pull is the same; 0 (its
    double backward skipped) in between."""
    return config.lambda_gp * config.gp_every if iteration % config.gp_every == 0 else 0.0


def r1_weight(config, iteration):
    """R1's weight gamma at `iteration`, lazily as penalty_weight: --gp_every x --r1_gamma on every --gp_every-th
    critic step, 0 in between (the loss adds weight/2 x the penalty)."""
    return config.r1_gamma * config.gp_every if iteration % config.gp_every == 0 else 0.0


def generator_steps(config, iteration):
    """Whether `iteration` updates G: never in the first --d_warmup iterations (the critic alone learns mixed from
    healthy while G is still where it started), then one G update every --n_critic critic updates."""
    return iteration >= config.d_warmup and (iteration + 1 - config.d_warmup) % config.n_critic == 0


def learning_rate_factor(config, iteration):
    """The share of the base learning rate at `iteration` with --lr_decay (off by default: 1): over the last
    --num_iters_decay iterations, in steps of --lr_update_step, the rate falls to 0 linearly (--lr_decay_shape
    linear) or as half a cosine, 0.5 (1 + cos(pi p)) with p the progress from 0 to 1 (cosine: slow at first and near
    the end)."""
    c = config
    stepped = (iteration // c.lr_update_step) * c.lr_update_step
    if c.lr_decay_shape == "cosine":
        progress = min(1.0, max(0.0, (stepped - (c.num_iters - c.num_iters_decay)) / c.num_iters_decay))
        return 0.5 * (1 + math.cos(math.pi * progress))
    return min(1.0, max(0.0, (c.num_iters - stepped) / c.num_iters_decay))


def set_learning_rates(config, optimizers, iteration):
    """Each (optimizer, base rate): the base rate, times learning_rate_factor with --lr_decay (off by default)."""
    for optimizer, base_lr in optimizers:
        lr = base_lr * learning_rate_factor(config, iteration) if config.lr_decay else base_lr
        for group in optimizer.param_groups:
            group["lr"] = lr


def update_generator_ema(config, ema, generator, iteration):
    """After a G update at `iteration`: before --g_ema_start the EMA copies G's weights (it starts from the G
    trained so far, not from the initial weights), from it on it averages (update)."""
    if iteration < config.g_ema_start:
        ema.copy_from(generator)
    else:
        ema.update(generator)


class Stage1State:
    """What stage 1 carries from one iteration to the next: G, the EMA of its weights, the critic, both optimisers,
    the mixed- and healthy-set streams, the gradient penalty's noise generator, the critic augmentation's generator
    (--diffaug) and the iteration reached.

    state_dict() holds all of it as the checkpoint files do ("critic": ITER-D.ckpt, "scored_generator": ITER-G.ckpt,
    "training": ITER-state.ckpt), so load_state_dict(state_dict()) continues the run exactly. train_generator and
    train_critic are the networks a step runs: the plain ones, or their DDP and torch.compile wrappers after wrap()."""

    def __init__(self, *, generator, critic, g_optimizer=None, d_optimizer=None, g_ema=None, streams=(),
                 noise_generator=None, augment_generator=None, iteration=0):
        self.generator, self.critic, self.g_ema = generator, critic, g_ema
        self.g_optimizer, self.d_optimizer = g_optimizer, d_optimizer
        self.streams, self.noise_generator, self.iteration = tuple(streams), noise_generator, iteration
        self.augment_generator = augment_generator  # None: --diffaug draws from torch's global generator
        self.train_generator, self.train_critic = generator, critic

    @property
    def scored_generator(self):
        """What samples, checkpoints and scoring use: the EMA of G's weights, or G itself without one (--g_ema 0)."""
        return self.generator if self.g_ema is None else self.g_ema.model

    def wrap(self, runtime):
        """Run the steps through DDP (and --compile's critic). Call it after a restore: DDP copies rank 0's
        weights to every rank when it is built."""
        self.train_generator = runtime.wrapped(self.generator)
        self.train_critic = runtime.compiled(distributed.wrap(self.critic, runtime.device))

    def state_dict(self):
        return {
            "critic": self.critic.state_dict(),
            "scored_generator": self.scored_generator.state_dict(),
            "training": {"iteration": self.iteration, "g_optimizer": self.g_optimizer.state_dict(),
                         "d_optimizer": self.d_optimizer.state_dict(), "torch_rng": torch.get_rng_state(),
                         "noise_generator": self.noise_generator.get_state(),
                         "streams": [s.state_dict() for s in self.streams], "generator": self.generator.state_dict(),
                         "g_ema_updates": None if self.g_ema is None else self.g_ema.num_updates,
                         **({} if self.augment_generator is None
                            else {"augment_generator": self.augment_generator.get_state()})},
        }

    def load_state_dict(self, state):
        training = state["training"]
        # checkpoints written before the generator EMA hold the raw G in ITER-G.ckpt only
        self.generator.load_state_dict(training.get("generator", state["scored_generator"]))
        if self.g_ema is not None:
            self.g_ema.model.load_state_dict(state["scored_generator"])
            self.g_ema.num_updates = training.get("g_ema_updates") or 0
        self.critic.load_state_dict(state["critic"])
        self.g_optimizer.load_state_dict(training["g_optimizer"])
        self.d_optimizer.load_state_dict(training["d_optimizer"])
        torch.set_rng_state(training["torch_rng"])
        self.noise_generator.set_state(training["noise_generator"])
        # checkpoints written before --diffaug hold no augmentation generator: it stays as seeded
        if self.augment_generator is not None and "augment_generator" in training:
            self.augment_generator.set_state(training["augment_generator"])
        for stream, stream_state in zip(self.streams, training["streams"]):
            stream.load_state_dict(stream_state)
        self.iteration = training["iteration"]


def save_stage1(config, state):
    """Checkpoint state.iteration: ITER-D.ckpt, ITER-state.ckpt and, last, ITER-G.ckpt, which marks the checkpoint
    complete for scoring and for resume (checkpoint.save_set)."""
    saved, parts, iteration = saved_config(config), state.state_dict(), state.iteration
    ckpt.save_set([
        ({"state_dict": parts["critic"], "config": saved, "iteration": iteration}, model_path(config, iteration, "D")),
        (parts["training"], model_path(config, iteration, "state")),
        ({"state_dict": parts["scored_generator"], "config": saved, "iteration": iteration,
          "weights": "raw" if state.g_ema is None else f"ema {state.g_ema.decay}"}, model_path(config, iteration, "G")),
    ], "stage-1 checkpoint")


def resume_iteration(config):
    """The checkpoint --resume_iters names ('latest': the newest with G, D and the training state, or None when
    there is none yet: the first start of a requeued job, where the same command starts and resumes). A resume that
    would train again over newer checkpoints is refused, or with --set_aside_newer moves them aside first."""
    model_dir = config.model_save_dir
    if config.resume_iters == "latest":
        saved = ckpt.saved_iterations(model_dir, "G", "D", "state")
        if not saved:
            distributed.main_print(f"No stage-1 checkpoint in {model_dir} yet: starting from iteration 0.")
            return None
        iteration = saved[-1]
    else:
        iteration = config.resume_iters
        for part in ("G", "D", "state"):
            if not os.path.isfile(model_path(config, iteration, part)):
                raise ckpt.missing_checkpoint_error(model_dir, iteration, part, "needed to resume", "--resume_iters")
    # checkpoints: a half-written set (D, state, no G: a save cut short) counts as none, and is written again.
    # Rank 0's listing, so that every rank takes the same branch (and meets the same barrier) below
    newer = distributed.broadcast([later for later, files in ckpt.files_after(model_dir, iteration).items()
                                   if {f"{later}-{part}.ckpt" for part in ("G", "R", "R-state")} & set(files)]
                                  if distributed.is_main() else None)
    if newer and not getattr(config, "set_aside_newer", False):
        raise UserError(f"--resume_iters {config.resume_iters} would train again from iteration {iteration} and "
                        f"overwrite the newer checkpoint(s) {', '.join(map(str, newer))} in {model_dir} (and leave "
                        f"their refiners and results paired with other weights).\nFix: "
                        + ("continue from the newest with --resume_iters latest, or " if config.resume_iters != "latest"
                           else "") + f"add --set_aside_newer to move the newer checkpoints, their "
                        f"refiners, results and sample grids into set_aside_after_{iteration}/ folders first.")
    if newer:
        if distributed.is_main():
            folder = run_layout.set_aside_after(config, iteration)
            print(f"Moved the checkpoint(s) after iteration {iteration} to {folder} (their results and sample grids "
                  f"to set_aside folders beside them); training again from iteration {iteration}.")
        distributed.barrier()
    return iteration


def restore_stage1(config, state, iteration, g_saved):
    """Load checkpoint ITER into state (g_saved: its ITER-G.ckpt, already read); returns ITER."""
    state.load_state_dict({"critic": ckpt.load(model_path(config, iteration, "D"))["state_dict"],
                           "scored_generator": g_saved["state_dict"],
                           "training": ckpt.load(model_path(config, iteration, "state"))})
    distributed.main_print(f"Resumed stage 1 from iteration {iteration} in {config.model_save_dir}.")
    return iteration


def train_step(runtime, config, state, x_mixed, x_healthy, alpha, *, update_generator, lambda_id=None,
               gp_weight=None, r1_weight=None):
    """One stage-1 iteration on state's networks and optimisers: a critic update, and a generator update when
    update_generator. Returns losses. lambda_id: the identity weight of this iteration (default --lambda_id);
    gp_weight: the penalty's weight this step (default --lambda_gp; 0 skips the penalty: lazy regularisation's steps
    in between); r1_weight: R1's gamma this step (default --r1_gamma; 0 skips it). --gan_loss picks the adversarial
    terms; --diffaug augments every batch the critic sees, each with its own draw from state.augment_generator."""
    c = config
    generator, critic = state.train_generator, state.train_critic
    g_optimizer, d_optimizer = state.g_optimizer, state.d_optimizer
    lambda_id = c.lambda_id if lambda_id is None else lambda_id
    gp_weight = c.lambda_gp if gp_weight is None else gp_weight
    r1_weight = c.r1_gamma if r1_weight is None else r1_weight

    def seen(batch):  # what the critic sees of a batch: itself, or its --diffaug transform (differentiable)
        return diff_augment.augment(batch, c.diffaug, state.augment_generator)
    # =================== Train the critic =================== #
    # (region(...): named parts of the step for torch.profiler, bench/profile_stage1.py; next to nothing when not profiling)
    with runtime.autocast(), region("stage1/generator forward"):
        if update_generator:
            # This pass's graph also serves the generator step below (the critic step does not change G;
            # the reference runs G on x_M a second time there).
            fake = healthy_reconstruction(x_mixed, generator(x_mixed))
        else:
            with torch.no_grad():  # the reference builds a graph here that it never uses
                fake = healthy_reconstruction(x_mixed, generator(x_mixed))
    with runtime.autocast():
        # the losses are fp32 means (.float(): the critic's output is bf16 under bf16 autocast)
        with region("stage1/critic forward"):
            real_output = critic(seen(x_healthy))
            fake_output = critic(seen(fake.detach()))
            d_loss_real, d_loss_fake = critic_terms(c.gan_loss, real_output, fake_output)
        # The penalty goes through the plain critic, not its DDP wrapper: DDP synchronises gradients with hooks on
        # each weight's gradient accumulator, which autograd.grad(create_graph=True) never runs (it stops at the
        # input), and a DDP forward whose graph is differentiated twice is not what those hooks expect.
        # d_loss.backward() below runs each weight's accumulator once, on the sum of the first-order and the
        # penalty's second-order terms, so the one all-reduce averages the whole critic gradient.
        # A compiled critic cannot be differentiated twice either: unwrap also strips torch.compile's wrapper.
        # Both penalties are computed on the batches as they are, not augmented (--diffaug): WGAN-GP on the
        # interpolates of the plain real and fake batches, R1 on the plain real batch.
        d_loss = d_loss_real + d_loss_fake
        if gp_weight != 0:  # (a nan weight too: its loss must come out non-finite)
            with region("stage1/gradient penalty forward"):
                d_loss_gp = gradient_penalty(distributed.unwrap(critic), x_healthy, fake, alpha)
            d_loss = d_loss + gp_weight * d_loss_gp
        if r1_weight != 0:  # R1 (Mescheder et al. 2018): zero-centred, on the real (known-healthy) batch
            with region("stage1/r1 penalty forward"):
                d_loss_r1 = r1_penalty(distributed.unwrap(critic), x_healthy)
            d_loss = d_loss + r1_weight / 2 * d_loss_r1
    d_optimizer.zero_grad(set_to_none=True)
    with region("stage1/critic backward"):
        d_loss.backward()
    with region("stage1/critic optimiser"):
        d_optimizer.step()
    losses = {"D/loss_real": d_loss_real, "D/loss_fake": d_loss_fake, "D/loss": d_loss}
    if gp_weight != 0:
        losses["D/loss_gp"] = d_loss_gp
    if r1_weight != 0:
        losses["D/loss_r1"] = d_loss_r1  # E||grad D(x)||^2, before its weight gamma/2

    # =================== Train the generator =================== #
    if update_generator:
        critic.requires_grad_(False)  # no critic weight gradients needed here
        g_optimizer.zero_grad(set_to_none=True)
        # L_G = adversarial + lambda_id * identity is a sum: back-propagate the mixed half first, so its
        # graph is freed before the healthy half's is built (half the activation memory, same gradients).
        with region("stage1/generator adversarial"):
            with runtime.autocast():  # plain critic: its weights get no gradient here, so nothing to synchronise
                g_loss_fake = generator_term(c.gan_loss, distributed.unwrap(critic)(seen(fake)))
            g_loss_fake.backward()
        with region("stage1/generator identity"):
            with runtime.autocast():
                g_loss_id = (healthy_reconstruction(x_healthy, generator(x_healthy)) - x_healthy).abs().mean()
            (lambda_id * g_loss_id).backward()
        with region("stage1/generator optimiser"):
            g_optimizer.step()
        critic.requires_grad_(True)
        losses.update({"G/loss_fake": g_loss_fake, "G/loss_id": g_loss_id,
                       "G/loss": g_loss_fake.detach() + lambda_id * g_loss_id.detach()})
    return losses


@torch.no_grad()
def save_samples(runtime, config, generator, fixed_mixed, fixed_healthy, step):
    """Write SAMPLE_DIR/STEP-images.png (input | map | reconstruction, mixed then healthy); return the grid."""
    columns = []
    for x in (fixed_mixed, fixed_healthy):
        x = x.to(runtime.device)
        anomaly_map = generator(x).float()
        columns += [x, anomaly_map, healthy_reconstruction(x, anomaly_map)]
    return visualize.save_sample_grid([col.cpu() for col in columns],
                                      os.path.join(config.sample_dir, f"{step}-images.png"))


def non_finite_error(config, iteration, losses):
    """The UserError for a non-finite loss at `iteration` ({name: float}), naming the last good checkpoint."""
    last = ckpt.saved_iterations(config.model_save_dir, "G")
    values = ", ".join(f"{name} {value:.4g}" for name, value in losses.items())
    return UserError(f"non-finite loss at iteration {iteration} ({values}). Training stopped; the last good "
                     f"checkpoint is {last[-1] if last else 'none'} in {config.model_save_dir}.\n"
                     f"Fix: lower --g_lr/--d_lr or raise --lambda_gp, then --resume_iters latest.")


def stage1_settings(runtime, config, resume_from, g_saved):
    """The settings stage 1 trains with, built once, and what a resume changed in them (for config.json's history):
    the flags; on a resume the checkpoint's architecture and the run's recorded settings, unless typed; the
    known-healthy split (a new run draws it once; config.json and every checkpoint keep it); the fast path (bf16 /
    channels_last: a resume keeps the run's choice; a new run probes, cached in the models folder). The dataset is
    checked before anything is drawn from it."""
    c, changes = config, None
    if resume_from is not None:
        # Build with the checkpoint's architecture before anything else; every other setting is the run's
        g_path = model_path(c, resume_from, "G")
        c = ckpt.reconciled_config(c, g_saved["config"], ARCHITECTURE_FLAGS, g_path)
        c, changes = run_config.continue_run(c, run_config.saved_run_settings(c.model_save_dir, g_saved["config"]),
                                             f"stage 1 from iteration {resume_from}")
    else:
        refuse_to_overwrite(c, "G", "resume it with --resume_iters latest")
    dataset_check.check_dataset(c.image_dir, c.batch_size * runtime.world_size, healthy_holdout=c.healthy_holdout,
                                seed=c.seed)
    c = run_config.with_known_healthy_split(c)
    c = runtime.settle_fast_path(c, g_saved["config"] if resume_from is not None else None)
    return c, changes


def train(runtime, config):
    """Stage 1: WGAN-GP with real = known-healthy H, fake = tanh(x_M + G(x_M)), plus identity L1 on H."""
    resume_from = None if config.resume_iters is None else resume_iteration(config)
    g_saved = ckpt.load(model_path(config, resume_from, "G")) if resume_from is not None else None
    c, changes = stage1_settings(runtime, config, resume_from, g_saved)
    ranks = runtime.world_size
    max_shift = round(c.augment_shift * c.image_size)
    mixed = data_loader.training_stream(dataset_layout.mixed_set_paths(c.image_dir), c.image_size, c.batch_size,
                                        seeds.seed(c.seed, "mixed_set"), c.preload, **runtime.stream_options(),
                                        max_shift=max_shift)
    trained_on, held_out = healthy_split.run_split(c.image_dir, vars(c))
    distributed.main_print(f"Stage 1 holds {len({dataset_layout.patient_id(p) for p in held_out})} known-healthy "
                           f"patients out of training (--healthy_holdout {c.healthy_holdout:g}): AUCp and the "
                           f"refiner's check score them.")
    healthy = data_loader.training_stream(trained_on, c.image_size, c.batch_size, seeds.seed(c.seed, "healthy_set"),
                                          c.preload, **runtime.stream_options(),
                                          batch_flag="--batch_size or --healthy_holdout", max_shift=max_shift)
    if ranks > 1:
        distributed.main_print(f"Stage 1: {ranks} ranks x batch {c.batch_size} = global batch {ranks * c.batch_size} "
                               f"mixed + as many healthy slices.")
    seeds.seed_weights(c.seed)
    generator, critic = build_stage1(runtime, c)
    state = Stage1State(generator=generator, critic=critic,
                        g_ema=EMA(generator, c.g_ema, warmup=c.g_ema_warmup) if c.g_ema > 0 else None,
                        g_optimizer=adam(generator.parameters(), c.g_lr, (c.beta1, c.beta2), c, runtime.device),
                        d_optimizer=adam(critic.parameters(), c.d_lr, (c.beta1, c.beta2), c, runtime.device),
                        streams=(mixed, healthy),
                        noise_generator=torch.Generator().manual_seed(seeds.seed(c.seed, "gradient_penalty")),
                        augment_generator=torch.Generator().manual_seed(seeds.seed(c.seed, "diff_augment")))
    if resume_from is not None:
        restore_stage1(c, state, resume_from, g_saved)
    start = state.iteration
    writes = runtime.is_main  # rank 0 alone writes checkpoints, samples and logs
    if writes:
        run_config.write_run_config(c, saved_config(c), changes, f"stage 1, iteration {start}")
        preparation_record.copy_into_run(c.image_dir, c.model_save_dir)  # score mode repeats that preparation
    # as many healthy as mixed samples, so each grid row pairs one of each (the held-out split can leave fewer
    # healthy slices than mixed ones)
    n_samples = min(8, len(mixed.paths), len(healthy.paths))
    fixed_mixed, fixed_healthy = (torch.stack([slice_files.load_slice(p, c.image_size) for p in paths[:n_samples]])
                                  for paths in (mixed.paths, healthy.paths))
    # --compile: the critic's plain passes are compiled; train_step runs the gradient penalties eagerly.
    state.wrap(runtime)
    loop = TrainingLoop(runtime=runtime, start=start, total=c.num_iters, desc="stage 1",
                        logger=TrainingLogger(c, "stage1"),
                        finite=FiniteCheck(c.deferred_finite_check,
                                           lambda iteration, values: non_finite_error(c, iteration, values)))
    losses = {}
    for i in loop:
        set_learning_rates(c, ((state.g_optimizer, c.g_lr), (state.d_optimizer, c.d_lr)), i)
        x_mixed = next(mixed).to(runtime.device, non_blocking=True)
        x_healthy = next(healthy).to(runtime.device, non_blocking=True)
        update_generator = generator_steps(c, i)
        # drawn for the global batch, this rank's rows kept: every rank's generator stays in step
        alpha = distributed.rank_slice(torch.rand(c.batch_size * ranks, 1, 1, 1,
                                                  generator=state.noise_generator)).to(runtime.device)
        losses.update(loop.mean_over_ranks(train_step(runtime, c, state, x_mixed, x_healthy, alpha,
                                                      update_generator=update_generator,
                                                      lambda_id=identity_weight(c, i), gp_weight=penalty_weight(c, i),
                                                      r1_weight=r1_weight(c, i))))
        if update_generator and state.g_ema is not None:
            # the unwrapped G: the same weights on every rank (the same averaged gradients), so the same EMA
            update_generator_ema(c, state.g_ema, generator, i)
        step = state.iteration = i + 1
        # eager: checked now; --deferred_finite_check: read below, before anything is logged or saved
        loop.add(step, {"D": losses["D/loss"], "G": losses["G/loss"] if update_generator else None})
        if loop.due(step, c.log_step):
            loop.log(step, {k: v.item() for k, v in losses.items() if not k.endswith("/loss")})
        if writes and loop.due(step, c.sample_step):
            loop.check()
            loop.logger.log_image("samples/stage1", save_samples(runtime, c, state.scored_generator, fixed_mixed,
                                                                 fixed_healthy, step), step)
        if writes and loop.due(step, c.model_save_step):
            loop.check()
            save_stage1(c, state)
    loop.close()
    distributed.main_print(f"Stage 1 done: checkpoints in {c.model_save_dir}, samples in {c.sample_dir}.")
