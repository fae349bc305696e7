"""Where a stage-1 iteration's time goes: torch.profiler over bench/benchmark.py's stage-1 workload (one cycle of the
training loop's schedule of train_step in brainomaly/train/stage1_gan.py, with the EMA update), grouped into the
parts of the step and into kinds of operator.

    python bench/profile_stage1.py --bf16 on --image_size 64 --batch_size 8 --g_conv_dim 64 --d_conv_dim 64 \
        --g_repeat_num 6 --d_repeat_num 5 --map_init identity --json bench/results/profile.json

Every main.py flag passes through (--gp_every, --n_critic, --bf16, --channels_last, ...). The parts are the
record_function regions of train_step ("stage1/..."); the operator kinds sum the operators' self CPU time.
Run it on a quiet machine: the shares are only as steady as the machine."""
import argparse
import json
import os
import platform
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from bench.benchmark import ours_stage1_train  # noqa: E402
from main import parse_config  # noqa: E402

# operator kinds by name: the first pattern found in an operator's name (aten::..., mkldnn::...) names its kind
KINDS = (("convolution backward", ("convolution_backward", "conv_transpose", "mkldnn_convolution_backward")),
         ("convolution", ("convolution", "conv2d", "_convolution")),
         ("normalisation", ("norm",)),
         ("casts and copies", ("copy_", "_to_copy", "to", "contiguous", "clone")),
         ("optimiser", ("_foreach", "adam", "lerp")),
         ("elementwise", ("add", "mul", "sub", "div", "tanh", "relu", "leaky", "abs", "sgn", "pow", "sqrt", "atanh",
                          "threshold", "where", "neg", "fill", "zero")),
         ("reductions", ("sum", "mean", "norm", "linalg")))


def kind_of(name):
    short = name.split("::")[-1].lower()
    for kind, patterns in KINDS:
        if any(p == short or short.startswith(p) or p in short for p in patterns):
            return kind
    return "other"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cycles", type=int, default=3, help="profiled cycles of the schedule (after one untimed)")
    p.add_argument("--json", help="write the breakdown here")
    args, passthrough = p.parse_known_args(argv)
    from solver import Solver
    c = parse_config(list(passthrough) + ["--device", "cpu", "--num_workers", "0", "--use_tensorboard", "false"])
    solver = Solver(c)
    c = solver.runtime.settle_fast_path(c)
    cycle, iterations, _ = ours_stage1_train(solver, with_ema=True)
    cycle()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.cycles):
            cycle()
    events = prof.key_averages()
    n_iterations = args.cycles * iterations
    parts = {e.key: e.cpu_time_total / 1e6 / n_iterations for e in events if e.key.startswith("stage1/")}
    kinds = {}
    for e in events:
        if not e.key.startswith("stage1/"):
            kinds[kind_of(e.key)] = kinds.get(kind_of(e.key), 0.0) + e.self_cpu_time_total / 1e6 / n_iterations
    total = sum(kinds.values())
    print(f"seconds per iteration {total:.3f} ({n_iterations} iterations, fast path {c.fast_path}, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()})")
    print("parts of the step (inclusive seconds per iteration):")
    for key, seconds in sorted(parts.items(), key=lambda kv: -kv[1]):
        print(f"  {key:<34} {seconds:7.3f}  {100 * seconds / total:5.1f}%")
    print("operator kinds (self seconds per iteration):")
    for kind, seconds in sorted(kinds.items(), key=lambda kv: -kv[1]):
        print(f"  {kind:<34} {seconds:7.3f}  {100 * seconds / total:5.1f}%")
    top = sorted((e for e in events if not e.key.startswith("stage1/")), key=lambda e: -e.self_cpu_time_total)[:12]
    print("top operators (self seconds per iteration):")
    for e in top:
        print(f"  {e.key:<40} {e.self_cpu_time_total / 1e6 / n_iterations:7.4f}  calls {e.count // args.cycles}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"seconds_per_iteration": total, "fast_path": c.fast_path, "threads": torch.get_num_threads(),
                       "flags": passthrough, "parts": parts, "operator_kinds": kinds,
                       "top_operators": {e.key: e.self_cpu_time_total / 1e6 / n_iterations for e in top}}, f,
                      indent=1)


if __name__ == "__main__":
    main()
