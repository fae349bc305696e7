"""Per-unit wall time, user/sys CPU time, minor page faults and RSS of one stage-1 workload, for finding where
the time goes (not a benchmark: bench/benchmark.py is). Any main.py flag passes through.

    python bench/probe_stage1.py --workload ours_stage1_train --units 4 --image_size 96 --keep_freed_memory false

Minor faults and system time do not depend on how busy the machine is, so they can be compared on a shared one.
"""
import argparse
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench.benchmark import build_workload, parse_args, solver_config  # noqa: E402


def main():
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--workload", default="ours_stage1_train")
    p.add_argument("--units", type=int, default=4)
    p.add_argument("--profile", default=None, help="write a torch.profiler op table of one unit here")
    own, rest = p.parse_known_args()
    args, passthrough = parse_args(rest)
    from solver import Solver
    solver = Solver(solver_config(args, passthrough, "cpu"))  # applies --keep_freed_memory (default true)
    step, _, _ = build_workload(own.workload, solver)
    print(f"{own.workload} threads={torch.get_num_threads()} size={solver.config.image_size} "
          f"keep_freed_memory={solver.config.keep_freed_memory}", flush=True)
    for unit in range(own.units):
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        step()
        r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        print(f"unit {unit}: wall {t1 - t0:7.2f} s  user {r1.ru_utime - r0.ru_utime:7.2f}  sys "
              f"{r1.ru_stime - r0.ru_stime:6.2f}  minflt {r1.ru_minflt - r0.ru_minflt:9d}  "
              f"maxrss {r1.ru_maxrss / 2**20:5.2f} GiB", flush=True)
    if own.profile:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            step()
        with open(own.profile, "w") as f:
            f.write(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40))


if __name__ == "__main__":
    main()
