"""Brainomaly-Diff command line: every flag lives here; --mode hands the config to the Solver."""
import argparse
import difflib
import sys

from brainomaly import decisions, distributed, metrics
from brainomaly.errors import EXIT_USER_ERROR, UserError, run_cli
from brainomaly.run import run_layout
from brainomaly.run.settings import Settings
from brainomaly.train import diff_augment, fast_path_selection
from brainomaly.train.gan_losses import GAN_LOSSES
from solver import Solver

MODE_ALIASES = {"testAUCInductive": "test_inductive", "testAUCTransductive": "test_transductive",
                "testAUCp": "test_aucp"}
MODES = ("train", "train_refiner", "test_inductive", "test_transductive", "test_aucp", "score", "check_data")


def str2bool(value):
    if isinstance(value, bool):
        return value
    if value.lower() in ("true", "1", "yes", "on"):
        return True
    if value.lower() in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def int_list(value):
    try:
        return [int(v) for v in value.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 1,2,4, got {value!r}")


def shift_fraction(value):
    """--augment_shift: a share of the image size in [0, 0.5); a larger shift could move the brain out of view."""
    try:
        fraction = float(value)
    except ValueError:
        fraction = None
    if fraction is None or not 0 <= fraction < 0.5:
        raise argparse.ArgumentTypeError(f"expected a fraction of the image size in [0, 0.5) such as 0.06, "
                                         f"got {value!r}")
    return fraction


def augment_policy(value):
    """--diffaug: a comma list of the critic's augmentations, returned in the order they are applied ('' = off)."""
    try:
        return ",".join(diff_augment.parse_policy(value))
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err))


def non_negative(value):
    """A float of at least 0 (a weight)."""
    try:
        number = float(value)
    except ValueError:
        number = None
    if number is None or not number >= 0:
        raise argparse.ArgumentTypeError(f"expected a number of at least 0, got {value!r}")
    return number


def whole_number(minimum):
    """An argparse type: an integer of at least `minimum` (a count of iterations or steps)."""
    def parse(value):
        try:
            number = int(value)
        except ValueError:
            number = None
        if number is None or number < minimum:
            raise argparse.ArgumentTypeError(f"expected a whole number of at least {minimum}, got {value!r}")
        return number
    return parse


def iteration_or_keyword(*keywords):
    def parse(value):
        if value in keywords:
            return value
        try:
            return int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an iteration number or one of {keywords}, got {value!r}")
    return parse


class FlagParser(argparse.ArgumentParser):
    """Whole flag names only (a prefix such as --lambda_g is not taken for --lambda_gp), and a bad command line
    answered in a few lines, not the whole usage: the flag, the closest valid names, and where the list is."""

    def __init__(self, **kwargs):
        super().__init__(allow_abbrev=False, **kwargs)

    def error(self, message):
        lines = [f"error: {message}"]
        if message.startswith("unrecognized arguments:"):
            known = [o for action in self._actions for o in action.option_strings if o.startswith("--")]
            for typed in message.split(":", 1)[1].split():
                if typed.startswith("-"):
                    close = difflib.get_close_matches(typed.split("=")[0], known, n=3, cutoff=0.7)
                    lines.append(f"{typed} is not a flag" + (f"; did you mean {', '.join(close)}?" if close else "."))
        lines.append(f"Fix: correct the command line; {self.prog} --help lists every flag.")
        self.exit(EXIT_USER_ERROR, "\n".join(lines) + "\n")


def build_parser():
    p = FlagParser(
        prog="python main.py",
        description="Brainomaly-Diff: GAN healthy reconstruction + residual diffusion refinement for "
                    "unsupervised brain anomaly detection.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)

    m = p.add_argument_group("model (stage 1: Brainomaly GAN)")
    m.add_argument("--image_size", type=int, default=192, help="slices are resized to image_size x image_size")
    m.add_argument("--in_channels", type=int, default=1, help="input channels (the reference copies grayscale to 3)")
    m.add_argument("--g_conv_dim", type=int, default=64, help="generator width of the first layer")
    m.add_argument("--d_conv_dim", type=int, default=64, help="critic width of the first layer")
    m.add_argument("--g_repeat_num", type=int, default=6, help="residual blocks in the generator")
    m.add_argument("--d_repeat_num", type=int, default=6, help="strided convolutions in the critic")
    m.add_argument("--map_init", choices=("zero", "default", "identity"), default="zero",
                   help="zero: the map starts at 0 (x_c = tanh(x), near identity); default: PyTorch's random init "
                        "as in the reference; identity: the map is atanh(x) - x plus a learned map that starts at 0, "
                        "so x_c = x at iteration 0 (a control run: any AUC it reaches is the generator healing, not "
                        "the tanh head's per-intensity error)")
    m.add_argument("--g_padding", choices=("zeros", "reflect"), default="zeros",
                   help="how the generator's convolutions pad the image: zeros (the reference) or reflect (the "
                        "image's own border, so that the map cannot depend on where the head sits in the frame)")
    m.add_argument("--lambda_gp", type=float, default=10.0, help="weight of the WGAN-GP gradient penalty")
    m.add_argument("--lambda_id", type=float, default=1.0, help="weight of the identity L1 loss on healthy slices")
    m.add_argument("--lambda_id_start", type=float, default=1.0,
                   help="the identity weight at iteration 0 when --lambda_id_ramp is set (linear to --lambda_id)")
    m.add_argument("--lambda_id_ramp", type=whole_number(0), default=0,
                   help="iterations over which the identity weight rises from --lambda_id_start to --lambda_id "
                        "(0: --lambda_id from the start, as the reference)")
    m.add_argument("--gp_every", type=whole_number(1), default=1,
                   help="lazy regularisation: the gradient penalty on every k-th critic step only, weighted k x "
                        "--lambda_gp (1: every step, as the reference); R1 (--r1_gamma) alike")
    m.add_argument("--gan_loss", choices=GAN_LOSSES, default="wgan",
                   help="the critic's and the generator's adversarial losses: wgan (Wasserstein, the reference), "
                        "nonsaturating (logistic; usually with --r1_gamma and --lambda_gp 0) or hinge: unlike wgan, "
                        "they stop rewarding the critic for outputs that already separate real from fake")
    m.add_argument("--r1_gamma", type=non_negative, default=0.0,
                   help="weight gamma of the zero-centred R1 penalty gamma/2 E||grad D(x)||^2 on the known-healthy "
                        "(real) batch: pulls the critic flat on the real slices, which damps the oscillation of the "
                        "GAN around its equilibrium (Mescheder et al. 2018; alone with --lambda_gp 0, or beside "
                        "WGAN-GP; 0: off)")
    m.add_argument("--diffaug", type=augment_policy, default="",
                   help="differentiable augmentation of every batch the critic sees, real and generated alike: a "
                        "comma list of translation, cutout and brightness; stops the critic memorising a small "
                        "healthy set, G learning through it (default %(default)r: off)")

    t = p.add_argument_group("training (stage 1)")
    t.add_argument("--batch_size", type=int, default=16,
                   help="mixed and healthy slices per batch (each), per rank: under torchrun the global batch is "
                        "batch_size x number of ranks")
    t.add_argument("--num_iters", type=int, default=150000, help="critic iterations of stage 1")
    t.add_argument("--num_iters_decay", type=int, default=100000, help="last iterations over which lr decays to 0")
    t.add_argument("--lr_decay", type=str2bool, default=False, help="linear learning-rate decay (the reference's was a no-op)")
    t.add_argument("--lr_decay_shape", choices=("linear", "cosine"), default="linear",
                   help="shape of the --lr_decay decay to 0 over the last --num_iters_decay iterations: linear, or "
                        "cosine (0.5 (1 + cos(pi progress)): gentle at the start and near the end)")
    t.add_argument("--g_lr", type=float, default=1e-4, help="generator learning rate")
    t.add_argument("--d_lr", type=float, default=1e-4, help="critic learning rate")
    t.add_argument("--n_critic", type=int, default=2, help="critic updates per generator update")
    t.add_argument("--d_warmup", type=whole_number(0), default=0,
                   help="iterations at the start that train the critic alone, G left where it started (counted in "
                        "--num_iters; 0: none, as the reference)")
    t.add_argument("--beta1", type=float, default=0.5, help="Adam beta1")
    t.add_argument("--beta2", type=float, default=0.999, help="Adam beta2")
    t.add_argument("--resume_iters", type=iteration_or_keyword("latest"), default=None,
                   help="resume training from this checkpoint iteration, or 'latest' (the newest; a run folder with "
                        "none yet starts at iteration 0, so one command serves the first start and every restart), "
                        "with the run's own settings from its config.json for every training flag not typed; "
                        "stage 2 (train.sh passes it on) continues its one latest state whatever the number")
    t.add_argument("--set_aside_newer", type=str2bool, nargs="?", const=True, default=False,
                   help="with --resume_iters ITER where the run holds checkpoints after ITER: move them (with their "
                        "refiners, results and sample grids) into set_aside_after_ITER/ folders and train again from "
                        "ITER; without it such a resume is refused, since it would overwrite them")
    t.add_argument("--preload", choices=("auto", "on", "off"), default="auto",
                   help="hold decoded training slices in memory (auto: when they fit in 3 GiB)")
    t.add_argument("--g_ema", type=float, default=0.999,
                   help="decay of the exponential moving average of G's weights that checkpoints hold and scoring and "
                        "the AUCp selection use (0: off, the raw G as in the reference)")
    t.add_argument("--g_ema_start", type=whole_number(0), default=0,
                   help="iteration from which the generator EMA averages; before it the EMA copies G's weights, so "
                        "the average starts from a trained G rather than the initial one (0: from the start)")
    t.add_argument("--g_ema_warmup", type=str2bool, default=True,
                   help="warm the EMA's decay up as min(--g_ema, (1 + n) / (10 + n)) over its first n updates; "
                        "false: the full --g_ema from the first update, so that a long horizon such as 0.999 takes "
                        "effect in a run of a few thousand iterations")
    t.add_argument("--seed", type=int, default=0, help="random seed (a CPU run is repeatable)")
    t.add_argument("--augment_shift", type=shift_fraction, default=0.0,
                   help="move each training slice by up to this fraction of the image size in each direction, as "
                        "well as the random flip (0: flips only, as in the reference)")
    t.add_argument("--healthy_holdout", "--refiner_holdout", type=float, default=0.2,
                   help="share of the known-healthy patients (train/neg) held out of both stages' training: AUCp "
                        "scores them, healthy brains the GAN has not memorised, against the mixed set, and stage 2 "
                        "ends by checking on them that the refiner lowers their reconstruction error; 0 = none "
                        "(AUCp over all of train/neg, as the reference)")

    r = p.add_argument_group("refiner (stage 2: residual diffusion)")
    r.add_argument("--refiner", choices=("auto", "on", "off", "calibrate"), default="auto",
                   help="the reconstruction scores use: refined x_r (on), coarse x_c (off), or the intensity-corrected "
                        "f(x_c) (calibrate: a monotone per-intensity map fitted on the known-healthy slices stage 1 "
                        "trained on, which removes the tanh head's per-intensity error; label-free); auto = refined "
                        "when <ITER>-R.ckpt exists and passed stage 2's held-out check, else the reconstruction the "
                        "check compared it with (the one the label-free pick chose; coarse when there is no "
                        "refiner). Every protocol also reports the coarse and calibrated AUC beside it")
    r.add_argument("--refiner_iters", type=int, default=30000, help="stage-2 training iterations; 0 skips stage 2")
    r.add_argument("--refine_from", type=iteration_or_keyword("aucp"), default="aucp",
                   help="stage-1 checkpoint the refiner refines: an iteration, or 'aucp' to pick it by AUCp")
    r.add_argument("--refiner_batch_size", type=int, default=16, help="known-healthy slices per refiner batch, per rank")
    r.add_argument("--refiner_lr", type=float, default=2e-4, help="refiner Adam learning rate")
    r.add_argument("--refiner_ema", type=float, default=0.999, help="EMA decay of the refiner weights used to score")
    r.add_argument("--refiner_dim", type=int, default=64, help="refiner UNet base width")
    r.add_argument("--refiner_dim_mults", type=int_list, default=[1, 2, 4, 8], help="UNet width multipliers per level")
    r.add_argument("--refiner_blocks", type=int, default=1, help="residual blocks per UNet level")
    r.add_argument("--refiner_attn_levels", type=int, default=2, help="self-attention at this many lowest resolutions")
    r.add_argument("--refiner_heads", type=int, default=4, help="attention heads")
    r.add_argument("--diffusion_steps", type=int, default=1000, help="training timesteps T (cosine schedule)")
    r.add_argument("--ddim_steps", type=int, default=1,
                   help="deterministic DDIM (eta 0) steps per refiner sample at scoring; 1 = one x0-prediction from "
                        "t = T-1, the posterior-mean estimate of the residual")
    r.add_argument("--refiner_samples", type=int, default=1,
                   help="refiner samples averaged per slice at scoring (each from its own seeded start noise)")

    e = p.add_argument_group("testing and scoring")
    e.add_argument("--test_iters", type=iteration_or_keyword("all", "latest"), default="latest",
                   help="checkpoint to score: an iteration, 'latest' (the newest saved) or 'all' (every saved one)")
    e.add_argument("--score_region", choices=metrics.SCORE_REGIONS, default="head",
                   help="slice score = the anomaly map's mean inside the head (input above the black background) or "
                        "over the whole image (the reference's score)")
    e.add_argument("--score_batch_size", type=int, default=16,
                   help="slices per scoring batch (under torchrun whole batches are shared out among the ranks)")
    e.add_argument("--select", choices=tuple(decisions.RULES), default=decisions.DEFAULT_RULE,
                   help="label-free rule that picks the checkpoint (and reconstruction) from the AUCp of every "
                        "checkpoint, each with a paired patient bootstrap: last_unless_beaten = the newest unless "
                        "another is significantly better (one-sided, corrected for the number of candidates); "
                        "smoothed_last_unless_beaten = the same on AUCp averaged with the neighbouring checkpoints "
                        "(a one-checkpoint spike does not win); one_se = the newest within one standard error of "
                        "the best; smoothed = the best neighbour-averaged AUCp; max = the highest AUCp; last = the "
                        "newest (docs/experiments.md compares them against the labels)")
    e.add_argument("--select_candidates", choices=tuple(decisions.CANDIDATE_SETS), default=decisions.DEFAULT_CANDIDATES,
                   help="reconstructions the pick may choose: coarse x_c only, or x_c and the intensity-corrected "
                        "f(x_c)")
    e.add_argument("--rho", type=float, default=None, help="healthy share of the mixed set: turns AUCp into an AUC estimate")
    e.add_argument("--save_maps", type=int, default=0, help="write anomaly-map panels for the first K slices of each class")
    e.add_argument("--flag_percentile", type=float, default=95.0,
                   help="score mode: flag patients above this percentile of known-healthy patient scores")
    e.add_argument("--output", type=str, default=None,
                   help="score mode: CSV to write, a name ending in .csv (default under the run folder); for NIfTI "
                        "input the anomaly maps go to the folder named like it without .csv")
    e.add_argument("--prepared", type=str2bool, nargs="?", const=True, default=False,
                   help="score mode, NIfTI input: the scans are already prepared as the training data were; slice "
                        "them without repeating the preparation the run recorded (prepare.json), or score scans "
                        "for a run that recorded none (its data were sliced by other tools)")
    e.add_argument("--prepared_size", type=int, default=None,
                   help="score mode, NIfTI input with --prepared on a run without prepare.json (required there): "
                        "the side in pixels of the training slices as they were written (prepare_data.py's or "
                        "make_cohort.py's --image_size); each scan is sliced at that size, then resized to "
                        "--image_size as the training slices were (a run with prepare.json uses its recorded size)")
    e.add_argument("--min_brain_fraction", type=float, default=None,
                   help="score mode, NIfTI input with --prepared on a run without prepare.json: keep axial slices "
                        "with at least this fraction of the largest slice's brain area (default 0.3; otherwise "
                        "the run's recorded value is used)")
    e.add_argument("--slices", type=str, default=None,
                   help="score mode, NIfTI input with --prepared on a run without prepare.json: score this "
                        "half-open range START:STOP of axial indices of the RAS-reoriented volume instead")

    d = p.add_argument_group("paths and devices")
    d.add_argument("--mode", type=str, default="train", choices=MODES + tuple(MODE_ALIASES),
                   help="what to run; the reference's testAUC* names are aliases")
    d.add_argument("--image_dir", type=str, default="data/MedicalData", help="dataset root (see README, 'Data layout')")
    d.add_argument("--run_dir", type=str, default="runs/MedicalData", help="one folder per run: models, samples, logs, results")
    d.add_argument("--log_dir", type=str, default=None, help="TensorBoard logs (default RUN_DIR/logs)")
    d.add_argument("--model_save_dir", type=str, default=None, help="checkpoints (default RUN_DIR/models)")
    d.add_argument("--sample_dir", type=str, default=None, help="sample grids (default RUN_DIR/samples)")
    d.add_argument("--result_dir", type=str, default=None, help="protocol results (default RUN_DIR/results)")
    d.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto picks CUDA when present")
    d.add_argument("--num_workers", type=int, default=2, help="DataLoader workers")
    d.add_argument("--bf16", type=fast_path_selection.switch, choices=("auto", "on", "off"), default="auto",
                   help="bfloat16 autocast of the networks (weights, losses and scores stay fp32). auto: on for "
                        "CUDA; on the CPU a candidate only where it has bf16 matrix units (AMX, AVX512-BF16), "
                        "kept when a short timed probe of the run's networks finds it faster (fast_path_selection.py)")
    d.add_argument("--channels_last", type=fast_path_selection.switch, choices=("auto", "on", "off"), default="auto",
                   help="channels_last memory format for the networks (same maths). auto: off for CUDA; on the CPU "
                        "the probe keeps it when it is faster. true/false are accepted for on/off. A resume, stage 2 "
                        "and scoring keep the choice the run made (config.json, 'fast_path') unless forced")
    d.add_argument("--compile", type=str2bool, default=False,
                   help="torch.compile the generator (training and scoring), the refiner's training loss and the "
                        "critic's plain forward passes (the gradient penalty differentiates the critic twice, "
                        "which compiled graphs cannot: it stays eager; the refiner samples eagerly at scoring); "
                        "a CUDA speed option, speed unmeasured")
    d.add_argument("--compile_backend", type=str, default="inductor",
                   help="torch.compile backend with --compile (aot_eager: no code generation, for checking)")
    d.add_argument("--fused_adam", type=str2bool, default=False,
                   help="Adam with fused=True: one kernel per step instead of one per tensor (CUDA speed "
                        "option; same update up to float rounding; speed unmeasured)")
    d.add_argument("--deferred_finite_check", type=str2bool, default=False,
                   help="check for non-finite losses on the device and read the result every --log_step "
                        "iterations and before every save, not after every iteration (no per-iteration host "
                        "sync on CUDA); training still stops naming the first bad iteration and never saves "
                        "weights updated after it")
    d.add_argument("--preload_on_device", type=str2bool, default=False,
                   help="hold the preloaded training slices (--preload) on the training device and draw and flip "
                        "batches there (no host-to-device copy per iteration on CUDA; same batches)")
    d.add_argument("--keep_freed_memory", type=str2bool, default=True,
                   help="CPU (glibc): keep freed memory in the heap for reuse instead of returning it to the "
                        "kernel, so the large activations are not page-faulted in again every iteration")

    g = p.add_argument_group("logging")
    g.add_argument("--log_step", type=int, default=10, help="iterations between loss logs")
    g.add_argument("--sample_step", type=int, default=1000, help="iterations between sample grids")
    g.add_argument("--model_save_step", type=int, default=10000, help="iterations between checkpoints")
    g.add_argument("--lr_update_step", type=int, default=1000, help="iterations between learning-rate updates")
    g.add_argument("--use_tensorboard", type=str2bool, default=True, help="write TensorBoard event files")
    g.add_argument("--use_neptune", type=str2bool, default=False,
                   help="also log to neptune.ai (needs NEPTUNE_PROJECT and NEPTUNE_API_TOKEN)")
    g.add_argument("--neptune_id", type=str, default=None, help="neptune run to attach test metrics to")
    g.add_argument("--neptune_key", type=str, default=None, help="prefix of test metrics in neptune")
    return p


def explicit_flags(parser, argv):
    """Names of the flags the user actually typed (so a checkpoint's saved value can win over a default)."""
    probe = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            probe.add_argument(*action.option_strings, dest=action.dest, type=action.type,
                               default=argparse.SUPPRESS, nargs=action.nargs)
    return set(vars(probe.parse_known_args(argv)[0]))


def parse_config(argv=None):
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    config = parser.parse_args(argv)
    config.mode = MODE_ALIASES.get(config.mode, config.mode)
    config.explicit_flags = sorted(explicit_flags(parser, argv))
    for key in run_layout.RUN_FOLDERS:
        if getattr(config, key) is None:
            setattr(config, key, run_layout.default_folder(config.run_dir, key))
    return Settings(**vars(config))  # read-only from here on (brainomaly/run/settings.py)


def run(argv=None):
    config = parse_config(argv)
    started_group = distributed.init(config.device)  # under torchrun: join the other ranks (no-op for one process)
    try:
        Solver(config).run()
        distributed.barrier()  # the ranks leave together, after rank 0's last write
    except UserError as err:
        if distributed.world_size() > 1:  # every rank ends now, with this message and its rank
            distributed.end_every_rank(str(err))
        raise
    except Exception:
        # under torchrun, a collective fails on the other ranks when one has ended: end with that rank's message
        message = distributed.failure_of_another_rank() if distributed.world_size() > 1 else None
        if message is not None:
            distributed.end_with_failure_of_another_rank(message)
        raise
    finally:
        if started_group:
            distributed.close()
    return 0


def main(argv=None):
    return run_cli(run, argv)


if __name__ == "__main__":
    sys.exit(main())
