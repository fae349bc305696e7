"""Speed and memory benchmark: our training and scoring paths against the public code's way of doing them.

    python bench/benchmark.py --device cpu --image_size 192 --batch_size 16 --out bench.json

Every network/width flag of main.py passes through (--g_conv_dim, --d_conv_dim, --g_repeat_num, --d_repeat_num,
--refiner_dim, --refiner_dim_mults, --ddim_steps, ...). For each device it measures

  ceiling                 a large torch.mm (fp32; bf16 too on CUDA or with --bf16 on): a practical FLOP/s ceiling
  ours_stage1_train       stage1_gan.train_step over one cycle of the training loop's schedule: n_critic
                          iterations (the last one also steps G), lcm(n_critic, gp_every) with a lazy penalty
  ours_stage2_train       the stage-2 loop body: frozen G -> x_c, refiner loss, backward, Adam step, EMA update
  ours_score_coarse       scoring.reconstruct at --batch_size under torch.inference_mode (refiner off)
  ours_score_refined      the same with the refiner on (--ddim_steps DDIM steps)
  reference_stage1_train  the public code's iteration: 3-channel nets, G's critic-step pass with a graph it never
                          uses, G(x_M) recomputed and G(x_H) run separately in the generator step, critic weight
                          gradients computed in the generator step, fp32, no channels_last
  reference_score_batch1  the public code's scoring: 3-channel, no_grad, one slice at a time
  reference_score_batched the same at --batch_size

Our workloads run with the fast path main.py would choose (--bf16, --channels_last; auto: the CPU probe at these
sizes), resolved once and recorded, with the CPU's capability, in the JSON. Each workload runs in its own process (forked from a server that imported the solver once; `--worker NAME
--worker_out FILE` runs one alone), so its peak memory (RSS on CPU, torch.cuda.max_memory_allocated on CUDA) is
its own. Timings exclude --warmup units and report the
median of --repeats units; CUDA is synchronised before each timer read. FLOPs are counted once per unit with
torch.utils.flop_counter.FlopCounterMode, outside the timed region, on the uncompiled modules. Both modes
compute the same losses and the same scores; they differ only in how much work they do to get them.
"""
import argparse
import json
import math
import os
import platform
import resource
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from brainomaly import seeds  # noqa: E402
from brainomaly.evaluate import scoring  # noqa: E402
from brainomaly.run import networks  # noqa: E402
from brainomaly.train import fast_path_selection, stage1_gan, stage2_refiner  # noqa: E402
from brainomaly.train.ema import EMA  # noqa: E402
from brainomaly.train.training_loop import adam  # noqa: E402
from main import parse_config, str2bool  # noqa: E402
from model import Discriminator, Generator  # noqa: E402

WORKLOADS = ("ours_stage1_train", "ours_stage2_train", "ours_score_coarse", "ours_score_refined",
             "reference_stage1_train", "reference_score_batch1", "reference_score_batched")
REFERENCE_WORKLOADS = tuple(w for w in WORKLOADS if w.startswith("reference_"))
RATIO_KEYS = ("speedup_stage1_train", "speedup_scoring", "speedup_scoring_vs_reference_batched",
              "memory_ratio_stage1_train", "memory_ratio_stage1_train_above_baseline")
RATE_UNITS = {"ours_stage1_train": "it/s", "ours_stage2_train": "it/s", "reference_stage1_train": "it/s"}


# ------------------------------------------------------------------------------------------------------------
# analytic FLOPs
# ------------------------------------------------------------------------------------------------------------

def conv_flops(c_in, c_out, kernel, h_out, w_out):
    """2 * MACs of a convolution: every output pixel takes c_in * k * k products for each output channel."""
    return 2 * c_in * c_out * kernel * kernel * h_out * w_out


def transposed_conv_flops(c_in, c_out, kernel, h_in, w_in):
    """2 * MACs of a transposed convolution: every *input* pixel scatters c_out * k * k products per channel."""
    return 2 * c_in * c_out * kernel * kernel * h_in * w_in


def generator_forward_flops(in_channels, conv_dim, repeat_num, image_size):
    """Forward FLOPs of one image through model.Generator (2 * MACs of its convolutions; norms, activations and
    the residual additions are ignored). Matches FlopCounterMode's count for a batch of one."""
    s = image_size
    assert s % 4 == 0, "image_size must be divisible by 4"
    c = conv_dim
    flops = conv_flops(in_channels, c, 7, s, s)                  # 7x7 stem
    flops += conv_flops(c, 2 * c, 4, s // 2, s // 2)             # down 1
    flops += conv_flops(2 * c, 4 * c, 4, s // 4, s // 4)         # down 2
    flops += repeat_num * 2 * conv_flops(4 * c, 4 * c, 3, s // 4, s // 4)  # residual blocks, 2 convs each
    flops += transposed_conv_flops(4 * c, 2 * c, 4, s // 4, s // 4)        # up 1
    flops += transposed_conv_flops(2 * c, c, 4, s // 2, s // 2)            # up 2
    flops += conv_flops(c, 1, 7, s, s)                           # 7x7 head -> 1-channel map
    return flops


class _GlobalOnlyTracker:
    """Stands in for FlopCounterMode's per-module tracker: its backward hooks make torch.autograd.grad (the
    gradient penalty) fail with 'A leaf node was passed to _will_engine_execute_node'. We only need the total."""
    parents = ("Global",)

    def __enter__(self):
        return self

    def __exit__(self, *args):
        return None


def count_flops(fn):
    """Total FLOPs of fn() as torch.utils.flop_counter.FlopCounterMode counts them (forward and backward)."""
    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _GlobalOnlyTracker()
    with counter:
        fn()
    return counter.get_total_flops()


# ------------------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------------------

def build_parser():
    p = argparse.ArgumentParser(
        description="Benchmark Brainomaly-Diff's training and scoring against the public code's way of doing them. "
                    "Any other flag is a main.py flag (network widths, --ddim_steps, --bf16, ...).",
        allow_abbrev=False)
    p.add_argument("--device", choices=("auto", "cpu", "cuda", "both"), default="auto",
                   help="auto: CPU, and CUDA too when present; both: CPU and CUDA (CUDA required)")
    p.add_argument("--out", default="bench.json", help="JSON file to write")
    p.add_argument("--repeats", type=int, default=5, help="timed units per workload (the median is reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed units before timing (use >= 1 with --compile)")
    p.add_argument("--channels_last", type=fast_path_selection.switch, nargs="?", const="on", default="auto",
                   help="channels_last networks for OUR workloads (the reference never uses it): auto (as main.py: "
                        "the probe decides on the CPU), on or off; with --bf16 auto/on/off this picks the mode: "
                        "fp32 NCHW = --bf16 off --channels_last off, channels_last = --bf16 off --channels_last on, "
                        "bf16+channels_last = --bf16 on --channels_last on, auto = the defaults")
    p.add_argument("--compile", type=str2bool, nargs="?", const=True, default=False,
                   help="torch.compile OUR networks (the reference never compiles)")
    p.add_argument("--skip_reference", action="store_true", help="measure our workloads only")
    p.add_argument("--reference_keep_freed_memory", type=str2bool, nargs="?", const=True, default=False,
                   help="give the reference workloads our CPU heap setting too (--keep_freed_memory; the public "
                        "code does not have it, so by default they run with glibc's default)")
    p.add_argument("--workloads", type=workload_list, default=None, metavar="NAME[,NAME...]",
                   help="measure only these workloads, comma-separated (default: all): " + ", ".join(WORKLOADS))
    p.add_argument("--matmul_size", type=int, default=None,
                   help="square matmul size for the ceiling (default 2048 on CPU, 8192 on CUDA)")
    p.add_argument("--worker", choices=WORKLOADS, default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker_out", default=None, help=argparse.SUPPRESS)
    return p


def workload_list(value):
    """'a,b' -> ['a', 'b'] in WORKLOADS order, or an argparse error naming the unknown names and the valid ones."""
    names = [n.strip() for n in value.split(",") if n.strip()]
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown workload(s) {', '.join(unknown) or repr(value)}; "
                                         f"choose from {', '.join(WORKLOADS)}")
    return [w for w in WORKLOADS if w in names]


def parse_args(argv):
    args, passthrough = build_parser().parse_known_args(argv)
    return args, passthrough


def solver_config(args, passthrough, device, reference=False):
    """main.py's config for DEVICE: the pass-through flags plus ours (no data loading, no logging). The
    reference workloads get glibc's default heap unless --reference_keep_freed_memory."""
    heap = ["--keep_freed_memory", str(args.reference_keep_freed_memory)] if reference else []
    return parse_config(list(passthrough) + ["--device", device, "--channels_last", str(args.channels_last),
                                             "--compile", str(args.compile), "--num_workers", "0",
                                             "--use_tensorboard", "false"] + heap)


def devices_for(choice):
    cuda = torch.cuda.is_available()
    if choice in ("cuda", "both") and not cuda:
        sys.exit(f"error: --device {choice} needs CUDA, but PyTorch sees no CUDA device.")
    return {"auto": ["cpu"] + (["cuda"] if cuda else []), "cpu": ["cpu"], "cuda": ["cuda"],
            "both": ["cpu", "cuda"]}[choice]


# ------------------------------------------------------------------------------------------------------------
# timing and memory
# ------------------------------------------------------------------------------------------------------------

def synchronizer(device):
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def time_units(step, warmup, repeats, sync):
    """Seconds of each of `repeats` calls of step(), after `warmup` untimed calls; CUDA synchronised around each."""
    for _ in range(warmup):
        step()
    sync()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    return times


def max_rss_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def matmul_ceiling(device, dtype, size, warmup, repeats):
    """FLOP/s of a square torch.mm: a practical ceiling for the convolutions (median of repeats)."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    times = time_units(lambda: torch.mm(a, b), max(warmup, 1), max(repeats, 1), synchronizer(device))
    return {"flops_per_s": 2 * size ** 3 / statistics.median(times), "matmul_size": size,
            "seconds": times}


# ------------------------------------------------------------------------------------------------------------
# workloads: each returns (step, units_per_step, flop_step); flop_step repeats step on uncompiled modules
# ------------------------------------------------------------------------------------------------------------

def random_slices(n, channels, size, device, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, size, size, generator=g) * 2 - 1
    return x.repeat(1, channels, 1, 1).to(device)  # grayscale copied to `channels` identical channels


def ours_stage1_train(solver, with_ema=False):
    """(step, iterations per step, flop step) of stage-1 training; with_ema also updates the generator's EMA after
    each G step, as the training loop does (bench/profile_stage1.py profiles it so)."""
    c = solver.config
    generator, critic = networks.build_stage1(solver.runtime, c)
    g_opt = adam(generator.parameters(), c.g_lr, (c.beta1, c.beta2), c, solver.runtime.device)
    d_opt = adam(critic.parameters(), c.d_lr, (c.beta1, c.beta2), c, solver.runtime.device)
    x_mixed = random_slices(c.batch_size, c.in_channels, c.image_size, solver.runtime.device, 1)
    x_healthy = random_slices(c.batch_size, c.in_channels, c.image_size, solver.runtime.device, 2)
    alpha = torch.rand(c.batch_size, 1, 1, 1, generator=torch.Generator().manual_seed(3)).to(solver.runtime.device)
    train_g, train_d = solver.runtime.compiled(generator), solver.runtime.compiled(critic)
    g_ema = EMA(generator, c.g_ema) if with_ema and c.g_ema > 0 else None

    # one unit: a whole cycle of the schedule the training loop runs after any --d_warmup, G every n_critic-th
    # iteration and, with --gp_every k (lazy regularisation), the penalty on every k-th at k x its weight
    iterations = math.lcm(c.n_critic, c.gp_every)

    def cycle(g, d):
        for i in range(iterations):
            update_generator = (i + 1) % c.n_critic == 0
            state = stage1_gan.Stage1State(generator=g, critic=d, g_optimizer=g_opt, d_optimizer=d_opt)
            stage1_gan.train_step(solver.runtime, c, state, x_mixed, x_healthy, alpha, update_generator=update_generator,
                                  lambda_id=c.lambda_id, gp_weight=stage1_gan.penalty_weight(c, i))
            if update_generator and g_ema is not None:
                with torch.profiler.record_function("stage1/ema"):
                    g_ema.update(generator)

    return lambda: cycle(train_g, train_d), iterations, lambda: cycle(generator, critic)


def ours_stage2_train(solver):
    c = solver.config
    generator, _ = networks.build_stage1(solver.runtime, c)
    generator = solver.runtime.compiled(generator.eval().requires_grad_(False))
    diffusion = networks.build_refiner(solver.runtime, c)
    ema = EMA(diffusion, c.refiner_ema)
    optimizer = adam(diffusion.parameters(), c.refiner_lr, (0.9, 0.999), c, solver.runtime.device)
    noise_generator = torch.Generator(solver.runtime.device).manual_seed(seeds.seed(c.seed, "refiner_noise"))
    train_diffusion = solver.runtime.compiled(diffusion)
    x = random_slices(c.batch_size, c.in_channels, c.image_size, solver.runtime.device, 4)

    def step(model):
        stage2_refiner.refiner_step(solver.runtime, generator, model, optimizer, x, noise_generator)
        ema.update(diffusion)

    return lambda: step(train_diffusion), 1, lambda: step(diffusion)


def ours_scoring(solver, refined):
    c = solver.config
    raw, _ = networks.build_stage1(solver.runtime, c)
    raw = raw.eval().requires_grad_(False)
    generator = solver.runtime.compiled(raw)
    diffusion = networks.build_refiner(solver.runtime, c).eval().requires_grad_(False) if refined else None
    x = random_slices(c.batch_size, c.in_channels, c.image_size, solver.runtime.device, 5)
    noises = [torch.randn(x.shape, generator=torch.Generator().manual_seed(6 + k))
              for k in range(c.refiner_samples)] if refined else ()

    @torch.inference_mode()
    def step(g):
        coarse, refined_x = scoring.reconstruct(solver.runtime, c, x, g, diffusion, noises)
        reconstruction = coarse if refined_x is None else refined_x
        return ((x - reconstruction).abs().mean(dim=1) / 2).mean(dim=(1, 2)).cpu()

    return lambda: step(generator), c.batch_size, lambda: step(raw)


def reference_stage1_train(solver):
    """The public code's stage-1 iteration, written from its description (reference-behaviour.md 3.1)."""
    c = solver.config
    device = solver.runtime.device
    generator = Generator(3, c.g_conv_dim, c.g_repeat_num).to(device)
    critic = Discriminator(3, c.d_conv_dim, c.d_repeat_num).to(device)
    g_opt = torch.optim.Adam(generator.parameters(), c.g_lr, betas=(c.beta1, c.beta2))
    d_opt = torch.optim.Adam(critic.parameters(), c.d_lr, betas=(c.beta1, c.beta2))
    x_mixed = random_slices(c.batch_size, 3, c.image_size, device, 1)
    x_healthy = random_slices(c.batch_size, 3, c.image_size, device, 2)
    alpha = torch.rand(c.batch_size, 1, 1, 1, generator=torch.Generator().manual_seed(3)).to(device)

    def reset_grad():
        g_opt.zero_grad()
        d_opt.zero_grad()

    def iteration(update_generator):
        # critic step: G(x_M) runs with autograd on, building a graph nobody back-propagates through
        fake = torch.tanh(x_mixed + generator(x_mixed))
        d_loss_real = -critic(x_healthy).mean()
        d_loss_fake = critic(fake.detach()).mean()
        mixed = (alpha * x_healthy.detach() + (1 - alpha) * fake.detach()).requires_grad_(True)
        out = critic(mixed)
        (grad,) = torch.autograd.grad(out, mixed, grad_outputs=torch.ones_like(out), retain_graph=True,
                                      create_graph=True)
        d_loss_gp = ((grad.reshape(grad.shape[0], -1).norm(2, dim=1) - 1) ** 2).mean()
        d_loss = d_loss_real + d_loss_fake + c.lambda_gp * d_loss_gp
        reset_grad()
        d_loss.backward()
        d_opt.step()
        if update_generator:
            # generator step: G(x_M) recomputed (the old graph is still alive while it runs), G(x_H) separately,
            # and the critic keeps requires_grad, so its weight gradients are computed and thrown away
            fake = torch.tanh(x_mixed + generator(x_mixed))
            g_loss_fake = -critic(fake).mean()
            reconstruction = torch.tanh(x_healthy + generator(x_healthy))
            g_loss_id = (x_healthy - reconstruction).abs().mean()
            g_loss = g_loss_fake + c.lambda_id * g_loss_id
            reset_grad()
            g_loss.backward()
            g_opt.step()

    def pair():
        iteration(False)
        iteration(True)

    return pair, 2, pair


def reference_scoring(solver, batch):
    """The public code's scoring (reference-behaviour.md 5.1): 3-channel input, no_grad, G in train mode."""
    c = solver.config
    generator = Generator(3, c.g_conv_dim, c.g_repeat_num).to(solver.runtime.device)
    x = random_slices(c.batch_size, 3, c.image_size, solver.runtime.device, 5)
    chunks = x.split(batch)

    @torch.no_grad()
    def step():
        scores = []
        for chunk in chunks:
            reconstruction = torch.tanh(chunk + generator(chunk))
            scores += ((chunk - reconstruction).abs() / 2).mean(dim=(1, 2, 3)).tolist()
        return scores

    return step, c.batch_size, step


def build_workload(name, solver):
    if name == "ours_stage1_train":
        return ours_stage1_train(solver)
    if name == "ours_stage2_train":
        return ours_stage2_train(solver)
    if name == "ours_score_coarse":
        return ours_scoring(solver, refined=False)
    if name == "ours_score_refined":
        return ours_scoring(solver, refined=True)
    if name == "reference_stage1_train":
        return reference_stage1_train(solver)
    if name == "reference_score_batch1":
        return reference_scoring(solver, 1)
    if name == "reference_score_batched":
        return reference_scoring(solver, solver.config.batch_size)
    raise ValueError(name)


def run_worker(args, passthrough):
    """Child process: build one workload, time it, read its peak memory, then count its FLOPs."""
    from solver import Solver
    device = args.device
    reference = args.worker.startswith("reference_")
    solver = Solver(solver_config(args, passthrough, device, reference))
    rss_before = max_rss_bytes()
    if solver.runtime.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(solver.runtime.device)
    step, units, flop_step = build_workload(args.worker, solver)
    times = time_units(step, args.warmup, args.repeats, synchronizer(solver.runtime.device))
    result = {"seconds": times, "seconds_median": statistics.median(times), "units_per_step": units,
              "rate": units / statistics.median(times),
              "rate_unit": RATE_UNITS.get(args.worker, "slices/s"),
              "precision": "fp32" if reference or solver.runtime.autocast_dtype is None else "bf16 autocast",
              "channels_last": False if reference else bool(solver.runtime.channels_last),
              "peak_rss_bytes": max_rss_bytes(), "rss_before_workload_bytes": rss_before,
              "keep_freed_memory": bool(solver.config.keep_freed_memory) and solver.runtime.device.type == "cpu"}
    if solver.runtime.device.type == "cuda":
        # allocations of this workload only (the counter was reset before it was built)
        result["peak_memory_bytes"] = torch.cuda.max_memory_allocated(solver.runtime.device)
        result["peak_memory_above_baseline_bytes"] = result["peak_memory_bytes"]
        result["peak_memory_kind"] = "torch.cuda.max_memory_allocated"
    else:
        result["peak_memory_bytes"] = result["peak_rss_bytes"]
        # the same imports in every worker, so the part above the pre-build RSS is the workload's own
        result["peak_memory_above_baseline_bytes"] = result["peak_rss_bytes"] - rss_before
        result["peak_memory_kind"] = ("peak RSS of the worker process (ru_maxrss; a worker forked from the import "
                                      "server counts shared-library pages only once it touches them)")
    result["flops_per_unit"] = count_flops(flop_step) / units
    with open(args.worker_out, "w") as f:
        json.dump(result, f)


def _worker_entry(argv):
    run_worker(*parse_args(argv))


_FORKSERVER = None


def worker_context():
    """Workers are forked from a server process that has imported the solver once (and has never computed
    anything or touched CUDA): each worker is a fresh process with its own peak memory, without paying the
    imports again. Every worker starts from the same post-import RSS, and reports the RSS it started from."""
    global _FORKSERVER
    if _FORKSERVER is None:
        import multiprocessing
        # Python 3.11's fork server does not apply the parent's sys.path before its preload: give it the repo
        paths = [REPO] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        os.environ["PYTHONPATH"] = os.pathsep.join(paths)
        _FORKSERVER = multiprocessing.get_context("forkserver")
        _FORKSERVER.set_forkserver_preload(["solver"])
    return _FORKSERVER


def launch_worker(name, device, argv):
    """Run one workload in a fresh worker; its result dict, or {"error": ...} when it failed."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        worker_argv = [*argv, "--device", device, "--worker", name, "--worker_out", out]
        process = worker_context().Process(target=_worker_entry, args=(worker_argv,))
        process.start()
        process.join()
        if process.exitcode == 0 and os.path.isfile(out):
            with open(out) as f:
                return json.load(f)
    command = " ".join([sys.executable, os.path.abspath(__file__), *worker_argv[:-2], "--worker_out", "result.json"])
    message = f"worker exited with status {process.exitcode} (traceback above); rerun it alone with: {command}"
    print(f"error: {name} on {device}: {message}", file=sys.stderr)
    return {"error": message}


# ------------------------------------------------------------------------------------------------------------
# the whole run
# ------------------------------------------------------------------------------------------------------------

def machine_info():
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {"cpu_model": cpu, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpu_bf16_units": fast_path_selection.cpu_bf16_units(), "cpu_cores": os.cpu_count(),
            "cpu_cores_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "torch_threads": torch.get_num_threads(), "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
            "torch_version": torch.__version__,
            "python_version": platform.python_version(), "platform": platform.platform(),
            "cuda_available": torch.cuda.is_available(), "cuda_device_name": None}
    if torch.cuda.is_available():
        info["cuda_device_name"] = torch.cuda.get_device_name(0)
        info["cuda_version"] = torch.version.cuda
    return info


def resolve_fast_path(args, passthrough, device):
    """The fast path OUR workloads run with on `device`: --bf16 / --channels_last resolved as main.py resolves them
    (auto: the probe at these sizes, not cached), once here, then forced in every worker."""
    return fast_path_selection.resolve(solver_config(args, passthrough, device), torch.device(device))


def measure_device(device, args, argv, passthrough=()):
    dev = torch.device(device)
    fast_path = resolve_fast_path(args, passthrough, device)
    print(f"[{device}] {fast_path_selection.summary(fast_path)}", file=sys.stderr, flush=True)
    argv = [*argv, "--bf16", "on" if fast_path["bf16"] else "off",
            "--channels_last", "on" if fast_path["channels_last"] else "off"]
    names = [w for w in (args.workloads or WORKLOADS) if not (args.skip_reference and w in REFERENCE_WORKLOADS)]
    workloads = {}
    for name in names:
        print(f"[{device}] {name} ...", file=sys.stderr, flush=True)
        workloads[name] = launch_worker(name, device, argv)
    # the ceiling, measured after the workloads (in this process, which builds no network)
    size = args.matmul_size or (8192 if dev.type == "cuda" else 2048)
    ceiling = {}
    tf32 = torch.backends.cuda.matmul.allow_tf32
    if dev.type == "cuda":
        # cuDNN convolutions use TF32 for fp32 by default, so the fp32 ceiling is the matmul under the same rule
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32
    ceiling["fp32"] = matmul_ceiling(dev, torch.float32, size, args.warmup, args.repeats)
    torch.backends.cuda.matmul.allow_tf32 = tf32
    if dev.type == "cuda":
        ceiling["fp32"]["note"] = f"TF32 allowed: {torch.backends.cudnn.allow_tf32} (as for cuDNN convolutions)"
    if dev.type == "cuda" or any(w.get("precision", "").startswith("bf16") for w in workloads.values()):
        ceiling["bf16"] = matmul_ceiling(dev, torch.bfloat16, size, args.warmup, args.repeats)
    for result in workloads.values():
        if "error" in result:
            continue
        dtype = "bf16" if result["precision"].startswith("bf16") else "fp32"
        result["ceiling_dtype"] = dtype
        result["achieved_flops_per_s"] = result["flops_per_unit"] * result["rate"]
        result["fraction_of_ceiling"] = result["achieved_flops_per_s"] / ceiling[dtype]["flops_per_s"]
    out = {"device": device, "fast_path": fast_path, "ceiling": ceiling, "workloads": workloads}
    out.update(ratios(workloads))
    return out


def ratios(workloads):
    def ratio(a, b, key):
        if key in workloads.get(a, {}) and key in workloads.get(b, {}):
            return workloads[a][key] / workloads[b][key]
        return None
    return {"speedup_stage1_train": ratio("ours_stage1_train", "reference_stage1_train", "rate"),
            "speedup_scoring": ratio("ours_score_coarse", "reference_score_batch1", "rate"),
            "speedup_scoring_vs_reference_batched": ratio("ours_score_coarse", "reference_score_batched", "rate"),
            "memory_ratio_stage1_train": ratio("ours_stage1_train", "reference_stage1_train", "peak_memory_bytes"),
            "memory_ratio_stage1_train_above_baseline": ratio("ours_stage1_train", "reference_stage1_train",
                                                              "peak_memory_above_baseline_bytes")}


def print_table(report):
    c = report["config"]
    print(f"\nBrainomaly-Diff benchmark: image {c['image_size']} px, batch {c['batch_size']}, G {c['g_conv_dim']}x"
          f"{c['g_repeat_num']}, D {c['d_conv_dim']}x{c['d_repeat_num']}, refiner {c['refiner_dim']} "
          f"{c['refiner_dim_mults']}, DDIM {c['ddim_steps']}; median of {c['repeats']} after {c['warmup']} warm-up")
    m = report["machine"]
    print(f"machine: {m['cpu_model']}, {m['cpu_cores']} cores ({m['torch_threads']} torch threads), torch "
          f"{m['torch_version']}" + (f", {m['cuda_device_name']}" if m["cuda_device_name"] else ""))
    for device, result in report["results"].items():
        ceil = ", ".join(f"{k} {v['flops_per_s'] / 1e9:.1f} GFLOP/s" for k, v in result["ceiling"].items())
        print(f"\n[{device}] matmul ceiling: {ceil}")
        print(f"[{device}] {fast_path_selection.summary(result['fast_path'])}")
        header = f"{'workload':<24} {'rate':>10} {'unit':<8} {'ms/unit':>9} {'GFLOP/unit':>10} " \
                 f"{'GFLOP/s':>8} {'% ceil':>7} {'precision':<13} {'peak MiB':>9} {'+MiB':>7}"
        print(header)
        print("-" * len(header))
        for name, w in result["workloads"].items():
            if "error" in w:
                print(f"{name:<24} FAILED: {w['error']}")
                continue
            print(f"{name:<24} {w['rate']:>10.3f} {w['rate_unit']:<8} {1000 / w['rate']:>9.1f} "
                  f"{w['flops_per_unit'] / 1e9:>10.3f} {w['achieved_flops_per_s'] / 1e9:>8.2f} "
                  f"{100 * w['fraction_of_ceiling']:>6.1f}% {w['precision']:<13} "
                  f"{w['peak_memory_bytes'] / 2 ** 20:>9.0f} "
                  f"{w['peak_memory_above_baseline_bytes'] / 2 ** 20:>7.0f}")
            print(f"{'':<24} every timed unit: {', '.join(f'{t:.2f}' for t in w['seconds'])} s")
        for key in RATIO_KEYS:
            if result[key] is not None:
                print(f"  {key:<38} {result[key]:.2f}x")
        kind = next((w["peak_memory_kind"] for w in result["workloads"].values() if "error" not in w), "")
        print(f"  peak memory: {kind}; +MiB = above the worker's RSS before it built the workload")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args, passthrough = parse_args(argv)
    if args.worker:
        run_worker(args, passthrough)
        return 0
    # the workers get the same flags, minus --device (each gets its own)
    child_argv = strip_flag(argv, "--device")
    config = solver_config(args, passthrough, "cpu")
    keys = ("image_size", "batch_size", "in_channels", "g_conv_dim", "d_conv_dim", "g_repeat_num", "d_repeat_num",
            "refiner_dim", "refiner_dim_mults", "refiner_blocks", "refiner_attn_levels", "refiner_heads",
            "diffusion_steps", "ddim_steps", "bf16", "channels_last", "compile", "compile_backend", "fused_adam",
            "keep_freed_memory", "lambda_gp", "lambda_id",
            "g_lr", "d_lr", "refiner_lr", "refiner_ema", "seed")
    report = {"machine": machine_info(),
              "config": {**{k: getattr(config, k) for k in keys}, "repeats": args.repeats, "warmup": args.warmup,
                         "skip_reference": args.skip_reference,
                         "reference_keep_freed_memory": args.reference_keep_freed_memory,
                         "workloads": args.workloads or list(WORKLOADS),
                         "devices": devices_for(args.device),
                         "command": " ".join([os.path.relpath(__file__)] + argv)},
              "results": {}}
    for device in report["config"]["devices"]:
        report["results"][device] = measure_device(device, args, child_argv, passthrough)
    primary = "cuda" if "cuda" in report["results"] else "cpu"
    report["primary_device"] = primary
    for key in RATIO_KEYS:
        report[key] = report["results"][primary][key]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print_table(report)
    print(f"\nWrote {args.out}")
    failed = [f"{device}/{name}" for device, result in report["results"].items()
              for name, w in result["workloads"].items() if "error" in w]
    if failed:
        print(f"error: {len(failed)} workload(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def strip_flag(argv, flag):
    """argv without `flag VALUE` / `flag=VALUE`."""
    out, skip = [], False
    for token in argv:
        if skip:
            skip = False
        elif token == flag:
            skip = True
        elif not token.startswith(flag + "="):
            out.append(token)
    return out


if __name__ == "__main__":
    sys.exit(main())
