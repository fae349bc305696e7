"""The fast path: bfloat16 autocast (--bf16) and the channels_last memory format (--channels_last), each auto, on
or off. Neither changes the maths beyond float rounding: autocast runs the convolutions in bf16 while weights,
optimiser states, the EMA, losses, the gradient penalty's norm, scores and anomaly maps stay fp32.

auto on CUDA: bf16 on, channels_last off. auto on the CPU: bf16 is a candidate only where the CPU has bf16 matrix
units (AMX or AVX512-BF16, as torch reports them; elsewhere bf16 is emulated and several times slower), and a short
timed probe of the run's own stage-1 networks, one candidate after another, picks the fastest; a candidate replaces
plain fp32 NCHW only when it is clearly faster, so auto never picks a slower path. The probe's timings are cached
per machine (CPU, torch version, threads) and sizes in MODEL_SAVE_DIR/fast_path_probe.json, and the choice is
written into config.json and every checkpoint's config, where a resume, stage 2 and scoring take it from.

Also here, the other speed options that do not change the maths: the CPU heap setting (--keep_freed_memory) and
torch.compile (--compile)."""
import ctypes
import ctypes.util
import json
import os
import platform
import sys
import time

import torch

from brainomaly.atomic_files import atomic_output
from brainomaly.run.networks import build_stage1
from brainomaly.train import stage1_gan

PROBE_FILE = "fast_path_probe.json"
PROBE_MAX_BATCH = 8  # slices per probe batch: the run's batch up to this (at 4 the probe missed channels_last's gain)
PROBE_ROUNDS = 2  # timed critic+generator iterations per candidate, interleaved; the fastest of each counts
PROBE_MARGIN = 0.95  # a candidate replaces fp32 NCHW only when it takes at most this share of its time
PROBE_SIZES = ("image_size", "batch_size", "in_channels", "g_conv_dim", "d_conv_dim", "g_repeat_num",
               "d_repeat_num", "map_init", "lambda_gp", "lambda_id")
SWITCHES = {"auto": "auto", "on": "on", "off": "off", "true": "on", "false": "off", "1": "on", "0": "off",
            "yes": "on", "no": "off"}


def switch(value):
    """--bf16 / --channels_last value -> 'auto', 'on' or 'off'; true/false (old commands, old config.json) are
    synonyms of on/off."""
    if isinstance(value, bool):
        return "on" if value else "off"
    normalised = SWITCHES.get(str(value).lower())
    if normalised is None:
        import argparse
        raise argparse.ArgumentTypeError(f"expected auto, on or off, got {value!r}")
    return normalised


def mode_name(bf16, channels_last):
    return f"{'bf16' if bf16 else 'fp32'} {'channels_last' if channels_last else 'NCHW'}"


def cpu_model():
    """The CPU's model name as /proc/cpuinfo gives it (platform.processor() elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _cpu_flag(name):
    query = getattr(torch.cpu, name, None)  # private helpers of torch.cpu; absent on some builds
    try:
        return bool(query()) if query is not None else False
    except RuntimeError:
        return False


def cpu_bf16_units():
    """The CPU's bf16 matrix units as torch reports them: {'amx': bool, 'avx512_bf16': bool}."""
    return {"amx": _cpu_flag("_is_amx_tile_supported"), "avx512_bf16": _cpu_flag("_is_avx512_bf16_supported")}


def machine(device):
    """What a cached probe or a run's choice depends on besides the sizes."""
    if device.type == "cuda":
        return {"device": "cuda", "gpu": torch.cuda.get_device_name(device), "torch": str(torch.__version__)}
    return {"device": "cpu", "cpu_model": cpu_model(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            **cpu_bf16_units(), "torch": str(torch.__version__), "threads": torch.get_num_threads()}


def describe_machine(m):
    if m.get("device") == "cuda":
        return f"{m.get('gpu')}, torch {m.get('torch')}"
    units = [name for name, key in (("AMX", "amx"), ("AVX512-BF16", "avx512_bf16")) if m.get(key)]
    return (f"{m.get('cpu_model')} ({m.get('cpu_capability')}{', ' + ', '.join(units) if units else ''}), "
            f"torch {m.get('torch')}, {m.get('threads')} threads")


def candidates(bf16, channels_last, bf16_hardware):
    """(bf16, channels_last) pairs the probe may choose among: forced switches are fixed, fp32 NCHW first."""
    bf16_options = {"on": [True], "off": [False], "auto": [False, True] if bf16_hardware else [False]}[bf16]
    layout_options = {"on": [True], "off": [False], "auto": [False, True]}[channels_last]
    return [(b, cl) for b in bf16_options for cl in layout_options]


class _ProbeRuntime:
    """What networks.build_stage1 and stage1_gan.train_step need of a Runtime: prepare and autocast."""

    def __init__(self, device, bf16, channels_last):
        self.device, self.bf16, self.channels_last = device, bf16, channels_last

    def prepare(self, network):
        network = network.to(self.device)
        return network.to(memory_format=torch.channels_last) if self.channels_last else network

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)


def probe_seconds(config, device, modes, rounds=PROBE_ROUNDS):
    """{mode: seconds of one critic+generator stage-1 iteration} for each (bf16, channels_last) in `modes`, with
    the run's networks at the run's sizes (at most PROBE_MAX_BATCH slices per batch); one untimed iteration each
    first (oneDNN builds its kernels then), then `rounds` timed ones, interleaved so a busy moment of the machine
    hits every candidate alike. The global random state is left as it was: a run is the same probed or cached."""
    c = config
    batch = max(1, min(c.batch_size, PROBE_MAX_BATCH))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        x_mixed, x_healthy = (torch.rand(batch, c.in_channels, c.image_size, c.image_size, device=device) * 2 - 1
                              for _ in range(2))
        alpha = torch.rand(batch, 1, 1, 1, device=device)
        setups = {}
        for bf16, channels_last in modes:
            runtime = _ProbeRuntime(device, bf16, channels_last)
            networks = build_stage1(runtime, c)
            optimizers = [torch.optim.Adam(n.parameters(), 1e-4, betas=(0.5, 0.999)) for n in networks]
            setups[(bf16, channels_last)] = (runtime, *networks, *optimizers)

        def iteration(mode):
            runtime, generator, critic, g_opt, d_opt = setups[mode]
            state = stage1_gan.Stage1State(generator=generator, critic=critic, g_optimizer=g_opt, d_optimizer=d_opt)
            stage1_gan.train_step(runtime, c, state, x_mixed, x_healthy, alpha, update_generator=True)

        for mode in modes:
            iteration(mode)
        best = {mode: float("inf") for mode in modes}
        for _ in range(rounds):
            for mode in modes:
                start = time.perf_counter()
                iteration(mode)
                best[mode] = min(best[mode], time.perf_counter() - start)
    return best


def pick(seconds):
    """The fastest mode of {mode: seconds}; fp32 NCHW, where measured, unless another takes at most PROBE_MARGIN
    of its time (timing noise must not swap it for a path that is no faster)."""
    fastest = min(seconds, key=seconds.get)
    plain = (False, False)
    if plain in seconds and fastest != plain and seconds[fastest] > PROBE_MARGIN * seconds[plain]:
        return plain
    return fastest


def _probe_key(config, this_machine, modes):
    return json.dumps({"machine": this_machine, "sizes": {k: getattr(config, k) for k in PROBE_SIZES},
                       "candidates": [mode_name(*m) for m in modes]}, sort_keys=True)


def probe_cached(config, device, modes, cache_dir, writes):
    """(probe seconds {mode: s}, True if they came from cache_dir's PROBE_FILE); a new probe is added to it."""
    this_machine = machine(device)
    key = _probe_key(config, this_machine, modes)
    path = os.path.join(cache_dir, PROBE_FILE) if cache_dir else None
    cache = {}
    if path and os.path.isfile(path):
        try:
            with open(path) as f:
                cache = json.load(f)
        except (OSError, ValueError):
            cache = {}  # a torn or foreign file: probe again and rewrite it
    if key in cache:
        return {tuple(json.loads(mode)): s for mode, s in cache[key].items()}, True
    seconds = probe_seconds(config, device, modes)
    if path and writes:
        cache[key] = {json.dumps(list(mode)): s for mode, s in seconds.items()}
        os.makedirs(cache_dir, exist_ok=True)
        with atomic_output(path, "fast-path probe cache") as tmp:
            with open(tmp, "w") as f:
                json.dump(cache, f, indent=2)
    return seconds, False


def resolve(config, device, cache_dir=None, writes=True):
    """The fast path for a new run: {'bf16', 'channels_last' (the choice), 'bf16_flag', 'channels_last_flag' (the
    switches), 'reason', 'machine', 'source', 'probe_seconds'} from --bf16 and --channels_last on `device`."""
    bf16, channels_last = switch(config.bf16), switch(config.channels_last)
    this_machine = machine(device)
    probe = None
    if device.type != "cpu":
        chosen = (bf16 != "off", channels_last == "on")
        reason = f"{device.type}: auto is bf16 on, channels_last off"
    else:
        hardware = this_machine["amx"] or this_machine["avx512_bf16"]
        modes = candidates(bf16, channels_last, hardware)
        if bf16 == "auto" and not hardware:
            why_bf16 = f"no bf16 matrix units on this CPU ({this_machine['cpu_capability']}; bf16 would be emulated)"
        elif bf16 == "auto":
            why_bf16 = "the CPU has bf16 matrix units (" + ", ".join(
                name for name, key in (("AMX", "amx"), ("AVX512-BF16", "avx512_bf16")) if this_machine[key]) + ")"
        else:
            why_bf16 = f"--bf16 {bf16}"
        if len(modes) == 1:
            chosen, reason = modes[0], f"{why_bf16}, --channels_last {channels_last}"
        else:
            probe, cached = probe_cached(config, device, modes, cache_dir, writes)
            chosen = pick(probe)
            timings = ", ".join(f"{mode_name(*m)} {s:.3g} s" for m, s in probe.items())
            reason = (f"{why_bf16}; {'cached probe' if cached else 'probe'} of one stage-1 iteration at "
                      f"{config.image_size} px, batch {max(1, min(config.batch_size, PROBE_MAX_BATCH))}: {timings}")
    return {"bf16": chosen[0], "channels_last": chosen[1], "bf16_flag": bf16, "channels_last_flag": channels_last,
            "reason": reason, "machine": this_machine, "source": "resolved",
            "probe_seconds": None if probe is None else {mode_name(*m): s for m, s in probe.items()}}


def adopt(config, device, saved):
    """The fast path a run already chose (`saved`, from its config.json or checkpoint), for a resume, stage 2 or
    scoring: a switch left at auto takes the saved value, an on/off flag wins; 'machine' and 'reason' stay those of
    the choice, 'used_on' is this machine. Returns (fast path, note), the note a line saying the machine differs
    from the one the choice was made on (else None)."""
    bf16, channels_last = switch(config.bf16), switch(config.channels_last)
    chosen = {"bf16": saved["bf16"] if bf16 == "auto" else bf16 == "on",
              "channels_last": saved["channels_last"] if channels_last == "auto" else channels_last == "on"}
    this_machine = machine(device)
    note = None
    if saved.get("machine") != this_machine:
        where = (f"This run's fast path ({mode_name(saved['bf16'], saved['channels_last'])}) was chosen on "
                 f"{describe_machine(saved.get('machine') or {})}; this machine is {describe_machine(this_machine)}.")
        if chosen["bf16"] and bf16 == "auto" and device.type == "cpu" and not (
                this_machine["amx"] or this_machine["avx512_bf16"]):
            chosen["bf16"] = False  # emulated bf16 is several times slower and only rounds differently
            note = f"{where} It has no bf16 matrix units, so bf16 is off here (--bf16 on forces it)."
        else:
            note = f"{where} Keeping the choice; --bf16 and --channels_last on/off choose another."
    return {**saved, **chosen, "bf16_flag": bf16, "channels_last_flag": channels_last, "source": "run",
            "used_on": this_machine}, note


def summary(fast_path):
    """One line for the log: the mode and why."""
    why = fast_path["reason"]
    if fast_path.get("source") == "run":
        forced = [f"--{k} {fast_path[k + '_flag']}" for k in ("bf16", "channels_last")
                  if fast_path[k + "_flag"] != "auto"]
        why = f"the run's choice: {why}" + (f"; now {', '.join(forced)}" if forced else "")
    return f"Fast path: {mode_name(fast_path['bf16'], fast_path['channels_last'])} ({why})."


# glibc mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4


def keep_freed_memory():
    """Make glibc malloc keep freed memory for reuse instead of handing it back to the kernel.

    By default glibc serves every allocation above its mmap threshold (at most 32 MiB) with a fresh mmap and
    unmaps it on free, and trims the heap top once more than twice that threshold is free. A training step
    allocates and frees the same large activations every iteration (a 64-channel 192 px batch of 16 is 151 MB),
    so every iteration page-faults them in again: millions of minor faults, each zeroing a 4 KiB page in the
    kernel, whose cost swings with what the rest of the machine does. With no mmap'd chunks and no trimming,
    the heap grows to the step's peak once and is reused. Returns True when applied (glibc only)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def compile_module(network, config):
    """torch.compile(network) with --compile (backend --compile_backend); the network itself otherwise."""
    return torch.compile(network, backend=config.compile_backend) if config.compile else network
