"""Solver: builds the networks, trains stage 1 (Brainomaly GAN) and stage 2 (residual diffusion refiner),
scores slices through one path and runs the three protocols (inductive, transductive, AUCp)."""
import contextlib
import csv
import json
import os
import time
import zlib

import numpy as np
import torch
from tqdm import tqdm

import checkpoint as ckpt
import data_loader
import metrics
import visualize
from errors import UserError
from main import ARCHITECTURE_FLAGS, REFINER_ARCHITECTURE_FLAGS
from model import Discriminator, Generator, healthy_reconstruction

PROTOCOL_TITLES = {"inductive": "Inductive", "transductive": "Transductive", "aucp": "AUCp"}


def gradient_penalty(critic, real, fake, alpha):
    """WGAN-GP: mean over samples of (||d critic(x~) / d x~||_2 - 1)^2 on x~ = alpha*real + (1-alpha)*fake."""
    mixed = (alpha * real.detach() + (1 - alpha) * fake.detach()).requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(mixed).sum(), mixed, create_graph=True)
    return ((grad.flatten(1).norm(2, dim=1) - 1) ** 2).mean()


def pick_device(choice):
    if choice == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but PyTorch sees no CUDA device.\n"
                        "Fix: use --device cpu or auto, or install a CUDA build of PyTorch.")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


def slice_noise(paths, shape, seed):
    """DDIM start noise seeded per slice (seed + file name), so a slice's score does not depend on the batch,
    the order or the protocol it is scored in."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(
        seed * 1_000_003 + zlib.crc32(os.path.basename(p).encode()))) for p in paths])


def write_json(payload, path):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)


def write_csv(rows, path):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


class Solver:
    def __init__(self, config):
        self.config = config
        self.device = pick_device(config.device)
        use_bf16 = config.bf16 == "on" or (config.bf16 == "auto" and self.device.type == "cuda")
        self.autocast_dtype = torch.bfloat16 if use_bf16 else None
        self.loader_options = {"num_workers": config.num_workers, "pin_memory": self.device.type == "cuda"}
        torch.manual_seed(config.seed)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True

    def run(self):
        mode = self.config.mode
        if mode == "train":
            self.train()
        elif mode == "train_refiner":
            self.train_refiner()
        elif mode.startswith("test_"):
            self.test(mode[len("test_"):])
        elif mode == "score":
            self.score_folder()
        elif mode == "check_data":
            data_loader.check_dataset(self.config.image_dir, self.config.batch_size, full=True)

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def prepare(self, network):
        network = network.to(self.device)
        if self.config.channels_last:
            network = network.to(memory_format=torch.channels_last)
        return network

    def compiled(self, network):
        return torch.compile(network) if self.config.compile else network

    # ------------------------------------------------------------------ networks and checkpoints
    def build_stage1(self):
        c = self.config
        generator = self.prepare(Generator(c.in_channels, c.g_conv_dim, c.g_repeat_num, c.map_init == "zero"))
        critic = self.prepare(Discriminator(c.in_channels, c.d_conv_dim, c.d_repeat_num))
        return generator, critic

    def build_refiner(self):
        from diffusion_refiner import RefinerUNet, ResidualDiffusion
        c = self.config
        unet = RefinerUNet(c.in_channels, c.refiner_dim, tuple(c.refiner_dim_mults), c.refiner_blocks,
                           c.refiner_attn_levels, c.refiner_heads)
        return self.prepare(ResidualDiffusion(unet, c.diffusion_steps))

    def saved_config(self):
        return {k: v for k, v in vars(self.config).items() if k != "explicit_flags"}

    def model_path(self, iteration, part):
        return ckpt.checkpoint_path(self.config.model_save_dir, iteration, part)

    def resolve_iteration(self, iteration, part="G"):
        """An iteration number, or 'latest' -> the newest saved one; a missing one is a UserError."""
        model_dir = self.config.model_save_dir
        if iteration == "latest":
            saved = ckpt.saved_iterations(model_dir, part)
            if not saved:
                raise ckpt.missing_checkpoint_error(model_dir, "latest", part, "no checkpoint saved yet")
            return saved[-1]
        if not os.path.isfile(self.model_path(iteration, part)):
            raise ckpt.missing_checkpoint_error(model_dir, iteration, part, "stage-1 generator")
        return iteration

    def load_generator(self, iteration):
        """The frozen generator of checkpoint ITER, built with the architecture saved in it."""
        path = self.model_path(self.resolve_iteration(iteration), "G")
        saved = ckpt.load(path)
        ckpt.reconcile_config(self.config, saved["config"], ARCHITECTURE_FLAGS, path)
        generator = Generator(self.config.in_channels, self.config.g_conv_dim, self.config.g_repeat_num)
        generator.load_state_dict(saved["state_dict"])
        self.training_config = saved["config"]
        return self.compiled(self.prepare(generator).eval().requires_grad_(False))

    def load_refiner(self, iteration):
        """The refiner of checkpoint ITER per --refiner: None (score with x_c) or the EMA refiner in eval mode."""
        path = self.model_path(iteration, "R")
        choice = self.config.refiner
        if choice == "off" or (choice == "auto" and not os.path.isfile(path)):
            return None
        if not os.path.isfile(path):
            raise UserError(f"--refiner on, but there is no refiner checkpoint {path} for iteration {iteration}.\n"
                            f"Fix: train stage 2 for it (python main.py --mode train_refiner --refine_from "
                            f"{iteration} ...), or score without it (--refiner off).")
        saved = ckpt.load(path)
        ckpt.reconcile_config(self.config, saved["config"], REFINER_ARCHITECTURE_FLAGS, path)
        diffusion = self.build_refiner()
        diffusion.load_state_dict(saved["state_dict"])
        return diffusion.eval().requires_grad_(False)

    def refuse_to_overwrite(self, part, hint):
        existing = ckpt.saved_iterations(self.config.model_save_dir, part)
        if existing:
            raise UserError(f"{self.config.model_save_dir} already holds checkpoints (iterations "
                            f"{', '.join(map(str, existing))}); a new run would overwrite them.\n"
                            f"Fix: {hint}, choose another --run_dir, or delete that folder.")

    # ------------------------------------------------------------------ stage 1
    def set_learning_rates(self, optimizers, iteration):
        """Linear decay to 0 over the last num_iters_decay iterations, in steps of lr_update_step (off by default)."""
        c = self.config
        for optimizer, base_lr in optimizers:
            lr = base_lr
            if c.lr_decay:
                stepped = (iteration // c.lr_update_step) * c.lr_update_step
                lr = base_lr * min(1.0, max(0.0, (c.num_iters - stepped) / c.num_iters_decay))
            for group in optimizer.param_groups:
                group["lr"] = lr

    def save_stage1(self, iteration, generator, critic, g_optimizer, d_optimizer, streams, noise_generator):
        config = self.saved_config()
        ckpt.atomic_save({"state_dict": critic.state_dict(), "config": config, "iteration": iteration},
                         self.model_path(iteration, "D"))
        ckpt.atomic_save({"iteration": iteration, "g_optimizer": g_optimizer.state_dict(),
                          "d_optimizer": d_optimizer.state_dict(), "torch_rng": torch.get_rng_state(),
                          "noise_generator": noise_generator.get_state(),
                          "streams": [s.state_dict() for s in streams]}, self.model_path(iteration, "state"))
        # G last: scoring treats ITER-G.ckpt as "checkpoint ITER exists".
        ckpt.atomic_save({"state_dict": generator.state_dict(), "config": config, "iteration": iteration},
                         self.model_path(iteration, "G"))

    def resume_iteration(self):
        """The checkpoint --resume_iters names ('latest': the newest with G, D and the training state)."""
        c = self.config
        model_dir = c.model_save_dir
        if c.resume_iters == "latest":
            saved = ckpt.saved_iterations(model_dir, "G", "D", "state")
            if not saved:
                raise ckpt.missing_checkpoint_error(model_dir, "latest", "state", "nothing to resume")
            iteration = saved[-1]
        else:
            iteration = c.resume_iters
            for part in ("G", "D", "state"):
                if not os.path.isfile(self.model_path(iteration, part)):
                    raise ckpt.missing_checkpoint_error(model_dir, iteration, part, "needed to resume")
        return iteration

    def restore_stage1(self, iteration, g_saved, generator, critic, g_optimizer, d_optimizer, streams,
                       noise_generator):
        generator.load_state_dict(g_saved["state_dict"])
        critic.load_state_dict(ckpt.load(self.model_path(iteration, "D"))["state_dict"])
        state = ckpt.load(self.model_path(iteration, "state"))
        g_optimizer.load_state_dict(state["g_optimizer"])
        d_optimizer.load_state_dict(state["d_optimizer"])
        torch.set_rng_state(state["torch_rng"])
        noise_generator.set_state(state["noise_generator"])
        for stream, stream_state in zip(streams, state["streams"]):
            stream.load_state_dict(stream_state)
        print(f"Resumed stage 1 from iteration {iteration} in {self.config.model_save_dir}.")
        return iteration

    def train_step(self, generator, critic, g_optimizer, d_optimizer, x_mixed, x_healthy, alpha, update_generator):
        """One stage-1 iteration: a critic update, and a generator update when update_generator. Returns losses."""
        c = self.config
        # =================== Train the critic =================== #
        with self.autocast():
            if update_generator:
                # This pass's graph also serves the generator step below (the critic step does not change G;
                # the reference runs G on x_M a second time there).
                fake = healthy_reconstruction(x_mixed, generator(x_mixed))
            else:
                with torch.no_grad():  # the reference builds a graph here that it never uses
                    fake = healthy_reconstruction(x_mixed, generator(x_mixed))
            d_loss_real = -critic(x_healthy).mean()
            d_loss_fake = critic(fake.detach()).mean()
            d_loss_gp = gradient_penalty(critic, x_healthy, fake, alpha)
            d_loss = d_loss_real + d_loss_fake + c.lambda_gp * d_loss_gp
        d_optimizer.zero_grad(set_to_none=True)
        d_loss.backward()
        d_optimizer.step()
        losses = {"D/loss_real": d_loss_real, "D/loss_fake": d_loss_fake, "D/loss_gp": d_loss_gp, "D/loss": d_loss}

        # =================== Train the generator =================== #
        if update_generator:
            critic.requires_grad_(False)  # no critic weight gradients needed here
            g_optimizer.zero_grad(set_to_none=True)
            # L_G = adversarial + lambda_id * identity is a sum: back-propagate the mixed half first, so its
            # graph is freed before the healthy half's is built (half the activation memory, same gradients).
            with self.autocast():
                g_loss_fake = -critic(fake).mean()
            g_loss_fake.backward()
            with self.autocast():
                g_loss_id = (healthy_reconstruction(x_healthy, generator(x_healthy)) - x_healthy).abs().mean()
            (c.lambda_id * g_loss_id).backward()
            g_optimizer.step()
            critic.requires_grad_(True)
            losses.update({"G/loss_fake": g_loss_fake, "G/loss_id": g_loss_id,
                           "G/loss": g_loss_fake.detach() + c.lambda_id * g_loss_id.detach()})
        return losses

    def train(self):
        """Stage 1: WGAN-GP with real = known-healthy H, fake = tanh(x_M + G(x_M)), plus identity L1 on H."""
        c = self.config
        if c.resume_iters is not None:
            # Build with the checkpoint's architecture before anything else.
            resume_from = self.resume_iteration()
            g_saved = ckpt.load(self.model_path(resume_from, "G"))
            ckpt.reconcile_config(c, g_saved["config"], ARCHITECTURE_FLAGS, self.model_path(resume_from, "G"))
        else:
            self.refuse_to_overwrite("G", "resume it with --resume_iters latest")
        data_loader.check_dataset(c.image_dir, c.batch_size)
        mixed = data_loader.training_stream(data_loader.mixed_set_paths(c.image_dir), c.image_size,
                                            c.batch_size, c.seed, c.preload, **self.loader_options)
        healthy = data_loader.training_stream(data_loader.require_images(c.image_dir, data_loader.HEALTHY_FOLDER),
                                              c.image_size, c.batch_size, c.seed + 1, c.preload,
                                              **self.loader_options)
        generator, critic = self.build_stage1()
        g_optimizer = torch.optim.Adam(generator.parameters(), c.g_lr, betas=(c.beta1, c.beta2))
        d_optimizer = torch.optim.Adam(critic.parameters(), c.d_lr, betas=(c.beta1, c.beta2))
        noise_generator = torch.Generator().manual_seed(c.seed + 2)  # gradient-penalty interpolation weights
        start = 0
        if c.resume_iters is not None:
            start = self.restore_stage1(resume_from, g_saved, generator, critic, g_optimizer, d_optimizer,
                                        (mixed, healthy), noise_generator)
        write_json(self.saved_config(), os.path.join(c.model_save_dir, "config.json"))
        fixed_mixed, fixed_healthy = (torch.stack([data_loader.load_slice(p, c.image_size) for p in paths[:8]])
                                      for paths in (mixed.paths, healthy.paths))
        # The critic stays eager: torch.compile cannot differentiate twice, which the gradient penalty needs.
        train_generator, train_critic = self.compiled(generator), critic
        logger = TrainingLogger(c, "stage1")
        losses = {}
        progress = tqdm(range(start, c.num_iters), initial=start, total=c.num_iters, desc="stage 1", unit="it")
        for i in progress:
            self.set_learning_rates(((g_optimizer, c.g_lr), (d_optimizer, c.d_lr)), i)
            x_mixed = next(mixed).to(self.device, non_blocking=True)
            x_healthy = next(healthy).to(self.device, non_blocking=True)
            update_generator = (i + 1) % c.n_critic == 0
            alpha = torch.rand(c.batch_size, 1, 1, 1, generator=noise_generator).to(self.device)
            losses.update(self.train_step(train_generator, train_critic, g_optimizer, d_optimizer,
                                          x_mixed, x_healthy, alpha, update_generator))
            d_loss, g_loss = losses["D/loss"], losses.get("G/loss")
            if not torch.isfinite(d_loss) or (update_generator and not torch.isfinite(g_loss)):
                last = ckpt.saved_iterations(c.model_save_dir, "G")
                raise UserError(f"non-finite loss at iteration {i + 1} (D {d_loss.item():.4g}"
                                + (f", G {g_loss.item():.4g}" if update_generator else "") + "). Training stopped; "
                                f"the last good checkpoint is {last[-1] if last else 'none'} in {c.model_save_dir}.\n"
                                f"Fix: lower --g_lr/--d_lr or raise --lambda_gp, then --resume_iters latest.")
            step = i + 1
            if step % c.log_step == 0 or step == c.num_iters:
                logger.log({k: v.item() for k, v in losses.items() if not k.endswith("/loss")}, step, progress)
            if step % c.sample_step == 0 or step == c.num_iters:
                self.save_samples(generator, fixed_mixed, fixed_healthy, step)
            if step % c.model_save_step == 0 or step == c.num_iters:
                self.save_stage1(step, generator, critic, g_optimizer, d_optimizer, (mixed, healthy), noise_generator)
        logger.close()
        print(f"Stage 1 done: checkpoints in {c.model_save_dir}, samples in {c.sample_dir}.")

    @torch.no_grad()
    def save_samples(self, generator, fixed_mixed, fixed_healthy, step):
        columns = []
        for x in (fixed_mixed, fixed_healthy):
            x = x.to(self.device)
            anomaly_map = generator(x).float()
            columns += [x, anomaly_map, healthy_reconstruction(x, anomaly_map)]
        visualize.save_sample_grid([col.cpu() for col in columns],
                                   os.path.join(self.config.sample_dir, f"{step}-images.png"))

    # ------------------------------------------------------------------ stage 2
    def refine_from_iteration(self):
        """Stage 2 refines the stage-1 checkpoint --refine_from, or the one AUCp picks (no labels)."""
        c = self.config
        if c.refine_from != "aucp":
            return self.resolve_iteration(c.refine_from)
        refiner_choice, c.refiner = c.refiner, "off"  # selection among stage-1 checkpoints scores x_c
        table = self.test_every_checkpoint("aucp")
        c.refiner = refiner_choice
        return max(table, key=lambda row: row["auc"])["iteration"]

    @torch.no_grad()
    def residual_std(self, generator, healthy, batches=8):
        """Std of r0 = x - x_c over a few healthy batches (on resume the saved scale and stream state win)."""
        residuals = []
        for _ in range(batches):
            x = next(healthy).to(self.device)
            with self.autocast():
                residuals.append((x - healthy_reconstruction(x, generator(x)).float()).flatten())
        return float(torch.cat(residuals).std().clamp_min(1e-3))

    def refiner_step(self, generator, diffusion, optimizer, x, noise_generator):
        """One stage-2 update on healthy slices x: the frozen G gives x_c, the refiner learns r0 = x - x_c."""
        with torch.no_grad(), self.autocast():
            coarse = healthy_reconstruction(x, generator(x)).float()
        with self.autocast():
            loss = diffusion.loss(x - coarse, coarse, generator=noise_generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    def train_refiner(self):
        """Stage 2: on known-healthy slices only, learn p(r | x_c) for r0 = x - x_c with G frozen."""
        from diffusion_refiner import EMA
        c = self.config
        if c.refiner_iters <= 0:
            print("Stage 2 skipped (--refiner_iters 0): scoring uses the coarse reconstruction.")
            return
        data_loader.check_dataset(c.image_dir, c.refiner_batch_size)
        iteration = self.refine_from_iteration()
        generator = self.load_generator(iteration)
        r_path, state_path = self.model_path(iteration, "R"), self.model_path(iteration, "R-state")
        resume = c.resume_iters is not None and os.path.isfile(state_path)
        if os.path.isfile(r_path) and not resume:
            raise UserError(f"{r_path} already exists; training stage 2 again would overwrite it.\n"
                            f"Fix: continue it with --resume_iters latest, or delete {r_path} and {state_path}.")
        healthy = data_loader.training_stream(data_loader.require_images(c.image_dir, data_loader.HEALTHY_FOLDER),
                                              c.image_size, c.refiner_batch_size, c.seed + 3, c.preload,
                                              **self.loader_options)
        diffusion = self.build_refiner()
        diffusion.residual_scale.fill_(self.residual_std(generator, healthy))
        ema = EMA(diffusion, c.refiner_ema)
        optimizer = torch.optim.Adam(diffusion.parameters(), c.refiner_lr)
        noise_generator = torch.Generator(self.device).manual_seed(c.seed + 4)
        start = 0
        if resume:
            state = ckpt.load(state_path)
            diffusion.load_state_dict(state["state_dict"])
            ema.load_state_dict(state["ema"])
            optimizer.load_state_dict(state["optimizer"])
            noise_generator.set_state(state["noise_generator"])
            healthy.load_state_dict(state["stream"])
            start = state["refiner_iteration"]
            print(f"Resumed stage 2 of checkpoint {iteration} from refiner iteration {start}.")
        train_diffusion = self.compiled(diffusion)
        logger = TrainingLogger(c, f"stage2-{iteration}")
        progress = tqdm(range(start, c.refiner_iters), initial=start, total=c.refiner_iters,
                        desc=f"stage 2 (refining G@{iteration})", unit="it")
        for i in progress:
            x = next(healthy).to(self.device, non_blocking=True)
            loss = self.refiner_step(generator, train_diffusion, optimizer, x, noise_generator)
            ema.update(diffusion)
            if not torch.isfinite(loss):
                raise UserError(f"non-finite refiner loss at stage-2 iteration {i + 1}; the last good refiner "
                                f"checkpoint stays in {c.model_save_dir}.\nFix: lower --refiner_lr.")
            step = i + 1
            if step == start + 5 and c.refiner_iters > step:
                rate = progress.format_dict["rate"] or 0
                if rate:
                    print(f"stage 2: {c.refiner_iters} iterations, about "
                          f"{(c.refiner_iters - step) / rate / 60:.1f} min at {rate:.2f} it/s")
            if step % c.log_step == 0 or step == c.refiner_iters:
                logger.log({"R/loss_diffusion": loss.item()}, step, progress)
            if step % c.model_save_step == 0 or step == c.refiner_iters:
                config = self.saved_config()
                ckpt.atomic_save({"state_dict": diffusion.state_dict(), "ema": ema.state_dict(),
                                  "optimizer": optimizer.state_dict(), "noise_generator": noise_generator.get_state(),
                                  "stream": healthy.state_dict(), "refiner_iteration": step, "config": config},
                                 state_path)
                ckpt.atomic_save({"state_dict": ema.model.state_dict(), "config": config, "refines": iteration,
                                  "refiner_iteration": step}, r_path)
        logger.close()
        print(f"Stage 2 done: {r_path} refines {self.model_path(iteration, 'G')}.")

    # ------------------------------------------------------------------ scoring (one path for every protocol)
    def reconstruct(self, x, generator, diffusion=None, noise=None):
        """(coarse x_c = tanh(x + G(x)), refined x_r or None); noise = the refiner's DDIM start noise."""
        with self.autocast():
            coarse = healthy_reconstruction(x, generator(x)).float()
            if diffusion is None:
                return coarse, None
            return coarse, diffusion.refine(coarse, self.config.ddim_steps, noise=noise.to(x.device)).float()

    @torch.inference_mode()
    def score_slices(self, paths, generator, diffusion, labels=None, maps_dir=None, pixel_metrics=None,
                     label_names=("healthy", "diseased")):
        """Slice score = mean over pixels of |x - x_r| / 2 (x_r refined, or x_c with no refiner), in [0, 1]."""
        c = self.config
        to_save = set()
        if maps_dir and c.save_maps > 0:
            by_label = {}
            for index, label in enumerate(labels if labels is not None else [None] * len(paths)):
                by_label.setdefault(label, []).append(index)
            to_save = {i for indices in by_label.values() for i in indices[:c.save_maps]}
        scores = np.empty(len(paths))
        loader = data_loader.scoring_loader(paths, c.image_size, c.score_batch_size, **self.loader_options)
        for x, index in tqdm(loader, desc="scoring", unit="batch", leave=False):
            x = x.to(self.device, non_blocking=True)
            noise = None if diffusion is None else slice_noise([paths[i] for i in index], x.shape[1:], c.seed)
            coarse, refined = self.reconstruct(x, generator, diffusion, noise)
            reconstruction = coarse if refined is None else refined
            anomaly_map = (x - reconstruction).abs().mean(dim=1) / 2
            scores[index.numpy()] = anomaly_map.mean(dim=(1, 2)).cpu().double().numpy()
            for row, i in enumerate(index.tolist()):
                masks = self.ground_truth_masks(paths[i]) if (pixel_metrics is not None or i in to_save) else None
                if pixel_metrics is not None and masks is not None:
                    pixel_metrics.update(anomaly_map[row].cpu().numpy(), masks[0], masks[1])
                if i in to_save:
                    name = os.path.splitext(os.path.basename(paths[i]))[0]
                    prefix = "" if labels is None else f"{label_names[labels[i]].replace(' ', '_')}_"
                    visualize.save_anomaly_panel(
                        x[row, 0].cpu().numpy(), coarse[row, 0].cpu().numpy(), anomaly_map[row].cpu().numpy(),
                        os.path.join(maps_dir, f"{prefix}{name}.png"),
                        title=f"{os.path.basename(paths[i])}  score {scores[i]:.4f}",
                        refined=None if refined is None else refined[row, 0].cpu().numpy(),
                        mask=None if masks is None else masks[0])
        return scores

    def ground_truth_masks(self, path):
        """(anomaly mask, brain mask) from IMAGE_DIR/masks and IMAGE_DIR/brain_masks, when a dataset has them."""
        relative = os.path.relpath(path, self.config.image_dir)
        found = []
        for folder in ("masks", "brain_masks"):
            mask_path = os.path.join(self.config.image_dir, folder, relative)
            if not os.path.isfile(mask_path):
                return None
            found.append(data_loader.load_slice(mask_path, self.config.image_size)[0].numpy() > 0)
        return found

    def has_masks(self):
        return os.path.isdir(os.path.join(self.config.image_dir, "masks"))

    def run_protocol(self, protocol, iteration):
        """Score a protocol's sets with checkpoint ITER; write CSV, JSON and plots; return the JSON dict."""
        c = self.config
        started = time.time()
        paths, labels = data_loader.protocol_slices(c.image_dir, protocol)
        generator = self.load_generator(iteration)
        diffusion = self.load_refiner(iteration)
        reconstruction = "coarse" if diffusion is None else "refined"
        out_dir = os.path.join(c.result_dir, str(iteration), reconstruction)
        pixel_metrics = metrics.PixelMetrics() if self.has_masks() and protocol != "aucp" else None
        names = ("known healthy", "mixed set") if protocol == "aucp" else ("healthy", "diseased")
        scores = self.score_slices(paths, generator, diffusion, labels,
                                   os.path.join(out_dir, f"maps_{protocol}"), pixel_metrics, names)
        patients = metrics.aggregate_patients([data_loader.patient_id(p) for p in paths], scores, labels)
        result = {"protocol": protocol, "checkpoint": iteration, "reconstruction": reconstruction,
                  **metrics.evaluate(patients["label"], patients["score"]),
                  "n_patients": len(patients["pid"]), "n_slices": len(paths)}
        result["threshold_note"] = "sensitivity = specificity point, fitted on these same labels (optimistic)"
        if diffusion is not None:
            result["ddim_steps"] = c.ddim_steps
        if protocol == "aucp":
            result["labels_used"] = "none: known-healthy set = 0, whole mixed set = 1"
            if c.rho is not None:
                result["auc_estimate_from_rho"] = metrics.aucp_to_auc(result["auc"], c.rho)
                result["rho"] = c.rho
            healthy = patients["score"][patients["label"] == 0]
            write_json({"checkpoint": iteration, "reconstruction": reconstruction,
                        "percentile_95": metrics.healthy_percentile_threshold(healthy, 95),
                        "healthy_patient_scores": healthy.tolist()},
                       os.path.join(out_dir, "healthy_reference.json"))
        if pixel_metrics is not None:
            result.update(pixel_metrics.compute())
        result["seconds"] = round(time.time() - started, 2)
        write_csv([{"pid": pid, "label": int(label), "n_slices": int(n), "score": f"{score:.6f}",
                    "prediction": int(score >= result["threshold"])}
                   for pid, label, n, score in zip(patients["pid"], patients["label"], patients["n_slices"],
                                                   patients["score"])],
                  os.path.join(out_dir, f"{protocol}.csv"))
        write_json(result, os.path.join(out_dir, f"{protocol}.json"))
        title = f"{PROTOCOL_TITLES[protocol]} - checkpoint {iteration} ({reconstruction})"
        visualize.save_roc_curve(patients["label"], patients["score"], os.path.join(out_dir, f"{protocol}_roc.png"), title)
        visualize.save_score_histogram(patients["label"], patients["score"], result["threshold"],
                                       os.path.join(out_dir, f"{protocol}_scores.png"), title, label_names=names)
        return result

    def test(self, protocol):
        if self.config.test_iters == "all":
            self.test_every_checkpoint(protocol)
            return
        result = self.run_protocol(protocol, self.resolve_iteration(self.config.test_iters))
        if self.config.use_neptune:  # attach the metrics to the training run (--neptune_id) under --neptune_key
            run = start_neptune(self.config)
            prefix = self.config.neptune_key or f"Test_{PROTOCOL_TITLES[protocol]}"
            for key in ("auc", "average_precision", "sensitivity", "specificity", "threshold", "tn", "fp", "fn", "tp"):
                run[f"{prefix}/{key}"] = result[key]
            run.stop()
        print_result(result, os.path.join(self.config.result_dir, str(result["checkpoint"]), result["reconstruction"]))

    def test_every_checkpoint(self, protocol):
        """Run a protocol for every saved checkpoint; for AUCp, name the best one (no labels involved)."""
        c = self.config
        data_loader.protocol_slices(c.image_dir, protocol)  # fail on a missing folder before any scoring
        iterations = ckpt.saved_iterations(c.model_save_dir, "G")
        if not iterations:
            raise ckpt.missing_checkpoint_error(c.model_save_dir, "all", "G", "no checkpoint saved yet")
        table = []
        for iteration in tqdm(iterations, desc=f"{protocol} over checkpoints", unit="ckpt"):
            result = self.run_protocol(protocol, iteration)
            table.append({"iteration": iteration, "reconstruction": result["reconstruction"],
                          "auc": result["auc"], "n_patients": result["n_patients"]})
        name = "aucp_selection" if protocol == "aucp" else f"{protocol}_by_iteration"
        summary = {"protocol": protocol, "table": table}
        print(f"\n{PROTOCOL_TITLES[protocol]} AUC by checkpoint")
        print(f"{'iteration':>10}  {'reconstruction':>14}  {'AUC':>7}")
        for row in table:
            print(f"{row['iteration']:>10}  {row['reconstruction']:>14}  {row['auc']:7.4f}")
        if protocol == "aucp":
            best = max(table, key=lambda row: row["auc"])
            summary["best_iteration"] = best["iteration"]
            print(f"Best checkpoint by AUCp (no disease labels used): {best['iteration']} (AUCp {best['auc']:.4f})")
        write_json(summary, os.path.join(c.result_dir, f"{name}.json"))
        write_csv(table, os.path.join(c.result_dir, f"{name}.csv"))
        return table

    # ------------------------------------------------------------------ scoring new scans
    def score_folder(self):
        """Score an unlabelled folder of slices; flag patients above the known-healthy percentile."""
        c = self.config
        folder = c.image_dir
        paths = data_loader.list_images_recursive(folder)
        iteration = self.resolve_iteration(c.test_iters)
        generator = self.load_generator(iteration)
        diffusion = self.load_refiner(iteration)
        reconstruction = "coarse" if diffusion is None else "refined"
        threshold = self.healthy_threshold(iteration, reconstruction)
        out_dir = os.path.join(c.result_dir, str(iteration), reconstruction)
        tag = os.path.basename(os.path.normpath(folder))
        scores = self.score_slices(paths, generator, diffusion, None, os.path.join(out_dir, f"maps_score_{tag}"))
        patients = metrics.aggregate_patients([data_loader.patient_id(p) for p in paths], scores)
        output = c.output or os.path.join(out_dir, f"scores_{tag}.csv")
        write_csv([{"pid": pid, "n_slices": int(n), "score": f"{score:.6f}", "flagged": int(score > threshold)}
                   for pid, n, score in zip(patients["pid"], patients["n_slices"], patients["score"])], output)
        flagged = int((patients["score"] > threshold).sum())
        print(f"Scored {len(paths)} slices of {len(patients['pid'])} patients from {folder} with checkpoint "
              f"{iteration} ({reconstruction}).\nFlagged {flagged} above the {c.flag_percentile:g}th percentile of "
              f"known-healthy patient scores ({threshold:.6f}).\nWrote {output}")

    def healthy_threshold(self, iteration, reconstruction):
        """The label-free flag threshold: a percentile of the known-healthy set's patient scores, taken from
        the AUCp run of this checkpoint (scored now if it has not been)."""
        c = self.config
        reference = os.path.join(c.result_dir, str(iteration), reconstruction, "healthy_reference.json")
        if not os.path.isfile(reference):
            training_dir = self.training_config["image_dir"]
            print(f"No known-healthy reference for checkpoint {iteration} yet: scoring {training_dir}/train/neg once.")
            scorer = Solver(type(c)(**{**vars(c), "image_dir": training_dir, "save_maps": 0}))
            scorer.run_protocol("aucp", iteration)
        with open(reference) as f:
            healthy = np.array(json.load(f)["healthy_patient_scores"])
        return metrics.healthy_percentile_threshold(healthy, c.flag_percentile)


def print_result(result, out_dir):
    rows = [("AUC" if result["protocol"] != "aucp" else "AUCp", result["auc"]),
            ("average precision", result["average_precision"]),
            ("sensitivity", result["sensitivity"]), ("specificity", result["specificity"]),
            ("threshold (sens = spec)", result["threshold"])]
    if "auc_estimate_from_rho" in result:
        rows.append((f"AUC estimate (rho {result['rho']})", result["auc_estimate_from_rho"]))
    for key in ("pixel_auroc", "best_dice"):
        if key in result:
            rows.append((key.replace("_", " "), result[key]))
    print(f"\n{PROTOCOL_TITLES[result['protocol']]} protocol, checkpoint {result['checkpoint']} "
          f"({result['reconstruction']} reconstruction): {result['n_patients']} patients, "
          f"{result['n_slices']} slices, {result['seconds']} s")
    for name, value in rows:
        print(f"  {name:<26} {value:.4f}")
    print(f"Results written to {out_dir}")


class TrainingLogger:
    """Losses to the progress bar, TensorBoard (default) and neptune.ai (only when asked for)."""

    def __init__(self, config, run_name):
        self.writer = self.neptune_run = None
        if config.use_tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(os.path.join(config.log_dir, run_name))
        if config.use_neptune:
            self.neptune_run = start_neptune(config)

    def log(self, values, step, progress):
        progress.set_postfix({k.split("/")[-1]: f"{v:.4f}" for k, v in values.items()})
        for key, value in values.items():
            if self.writer:
                self.writer.add_scalar(key, value, step)
            if self.neptune_run:
                self.neptune_run[key].append(value, step=step)

    def close(self):
        if self.writer:
            self.writer.close()
        if self.neptune_run:
            self.neptune_run.stop()


def start_neptune(config):
    try:
        import neptune
    except ImportError:
        raise UserError("--use_neptune true needs the neptune package.\nFix: pip install neptune, or drop the flag.")
    missing = [v for v in ("NEPTUNE_PROJECT", "NEPTUNE_API_TOKEN") if not os.environ.get(v)]
    if missing:
        raise UserError(f"--use_neptune true needs the environment variable(s) {', '.join(missing)}.\n"
                        f"Fix: export them (see neptune.ai), or drop the flag.")
    run = neptune.init_run(project=os.environ["NEPTUNE_PROJECT"], api_token=os.environ["NEPTUNE_API_TOKEN"],
                           with_id=config.neptune_id)
    run["parameters"] = {k: str(v) for k, v in vars(config).items()}
    return run
