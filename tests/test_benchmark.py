"""bench/benchmark.py: the report has every figure, the ratios agree with the rates, and the analytic generator
FLOPs agree with a hand count and with FlopCounterMode. No timing is asserted."""
import json
import math
import os

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from bench import benchmark
from bench.benchmark import RATIO_KEYS, WORKLOADS, count_flops, generator_forward_flops, transposed_conv_flops
from model import Generator

TINY = ["--device", "cpu", "--image_size", "32", "--batch_size", "2", "--g_conv_dim", "4", "--d_conv_dim", "4",
        "--g_repeat_num", "1", "--d_repeat_num", "3", "--refiner_dim", "8", "--refiner_dim_mults", "1,2",
        "--refiner_attn_levels", "1", "--refiner_heads", "2", "--ddim_steps", "2", "--repeats", "1",
        "--warmup", "1", "--matmul_size", "128"]


class Done:
    """What a run of bench/benchmark.py returned and printed."""

    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


@pytest.fixture
def run_benchmark(tmp_path, monkeypatch, capsys):
    """bench/benchmark.py with these flags, from folder tmp_path, through its main() in this process: every workload
    still runs in a fresh worker process, forked from the benchmark's import server (started once per pytest
    session), so only the script's own start is saved. One thread, as OMP_NUM_THREADS=1 (tests/conftest.py) gives the
    import server and its workers."""
    monkeypatch.chdir(tmp_path)
    # worker_context() puts the repository on PYTHONPATH for the import server: restored after the test
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))

    def run(*flags):
        capsys.readouterr()
        status = benchmark.main([*TINY, *flags])
        out, err = capsys.readouterr()
        return Done(status, out, err)
    return run


def hand_count_tiny_generator():
    """Generator(in_channels=1, conv_dim=2, repeat_num=1) on an 8x8 image, 2 * Cin * Cout * k * k * spatial."""
    return sum([
        2 * 1 * 2 * 7 * 7 * 8 * 8,   # stem conv 1->2, 7x7, out 8x8
        2 * 2 * 4 * 4 * 4 * 4 * 4,   # down conv 2->4, 4x4 stride 2, out 4x4
        2 * 4 * 8 * 4 * 4 * 2 * 2,   # down conv 4->8, 4x4 stride 2, out 2x2
        2 * 8 * 8 * 3 * 3 * 2 * 2,   # residual block conv 1, 3x3, out 2x2
        2 * 8 * 8 * 3 * 3 * 2 * 2,   # residual block conv 2
        2 * 8 * 4 * 4 * 4 * 2 * 2,   # transposed conv 8->4, 4x4 stride 2, over its 2x2 input (out 4x4)
        2 * 4 * 2 * 4 * 4 * 4 * 4,   # transposed conv 4->2, over its 4x4 input (out 8x8)
        2 * 2 * 1 * 7 * 7 * 8 * 8,   # head conv 2->1, 7x7, out 8x8
    ])


def test_generator_flops_match_hand_count_and_flop_counter():
    assert hand_count_tiny_generator() == 50688
    assert generator_forward_flops(1, 2, 1, 8) == 50688
    generator = Generator(1, 2, 1)
    with torch.no_grad():
        assert count_flops(lambda: generator(torch.zeros(1, 1, 8, 8))) == 50688
        with FlopCounterMode(display=False) as counter:  # the stock counter, module tracking included
            generator(torch.zeros(3, 1, 8, 8))
        assert counter.get_total_flops() == 3 * 50688


@pytest.mark.parametrize("in_channels,conv_dim,repeat_num,size", [(3, 4, 2, 16), (1, 8, 3, 32)])
def test_generator_flops_match_flop_counter_at_other_sizes(in_channels, conv_dim, repeat_num, size):
    generator = Generator(in_channels, conv_dim, repeat_num)
    with torch.no_grad():
        counted = count_flops(lambda: generator(torch.zeros(2, in_channels, size, size)))
    assert counted == 2 * generator_forward_flops(in_channels, conv_dim, repeat_num, size)


def test_transposed_conv_counts_input_pixels():
    # a 4x4 stride-2 transposed conv from 2x2 to 4x4: every input pixel scatters a 4x4 kernel per channel pair
    assert transposed_conv_flops(8, 4, 4, 2, 2) == 2 * 8 * 4 * 16 * 4


def test_gradient_penalty_step_is_countable():
    # FlopCounterMode's stock module tracker breaks torch.autograd.grad; count_flops must not
    from brainomaly.train.stage1_gan import gradient_penalty
    from model import Discriminator
    critic = Discriminator(1, 4, 2)
    real, fake = torch.randn(2, 1, 16, 16), torch.randn(2, 1, 16, 16)
    assert count_flops(lambda: gradient_penalty(critic, real, fake, torch.rand(2, 1, 1, 1)).backward()) > 0


def test_benchmark_report_has_every_figure(tmp_path, run_benchmark):
    out = tmp_path / "bench.json"
    done = run_benchmark("--out", str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "speedup_stage1_train" in done.stdout and "reference_score_batch1" in done.stdout
    report = json.loads(out.read_text())

    machine = report["machine"]
    assert machine["cpu_model"] and machine["cpu_cores"] >= 1 and machine["torch_version"] == torch.__version__
    assert "cuda_device_name" in machine
    assert machine["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert set(machine["cpu_bf16_units"]) == {"amx", "avx512_bf16"}
    config = report["config"]
    assert (config["image_size"], config["batch_size"], config["g_conv_dim"], config["ddim_steps"]) == (32, 2, 4, 2)
    assert config["devices"] == ["cpu"] and report["primary_device"] == "cpu"

    cpu = report["results"]["cpu"]
    assert cpu["ceiling"]["fp32"]["flops_per_s"] > 0
    # auto on the CPU: the probe's timings of each candidate and what it resolved to
    assert (cpu["fast_path"]["bf16_flag"], cpu["fast_path"]["channels_last_flag"]) == ("auto", "auto")
    assert "fp32 NCHW" in cpu["fast_path"]["probe_seconds"] and "Fast path: " in done.stdout
    assert set(cpu["workloads"]) == set(WORKLOADS)
    for name, w in cpu["workloads"].items():
        for key in ("rate", "seconds_median", "flops_per_unit", "achieved_flops_per_s", "fraction_of_ceiling",
                    "peak_memory_bytes", "peak_rss_bytes", "rss_before_workload_bytes"):
            assert w[key] > 0, (name, key, w[key])
        assert w["peak_memory_above_baseline_bytes"] >= 0
        assert len(w["seconds"]) == 1 and w["seconds_median"] == w["seconds"][0]
        assert math.isclose(w["rate"], w["units_per_step"] / w["seconds_median"], rel_tol=1e-9)
        assert math.isclose(w["achieved_flops_per_s"], w["flops_per_unit"] * w["rate"], rel_tol=1e-9)
        assert math.isclose(w["fraction_of_ceiling"], w["achieved_flops_per_s"] / cpu["ceiling"]["fp32"]["flops_per_s"],
                            rel_tol=1e-9)
        assert w["rate_unit"] == ("it/s" if name.endswith("_train") else "slices/s")
        if name.startswith("reference_"):  # the reference is always fp32 NCHW
            assert (w["precision"], w["channels_last"]) == ("fp32", False)
        else:  # ours run with the fast path resolved once for the device
            assert w["precision"] == ("bf16 autocast" if cpu["fast_path"]["bf16"] else "fp32")
            assert w["channels_last"] == cpu["fast_path"]["channels_last"]

    wl = cpu["workloads"]
    # a stage-1 unit is a critic-only + critic-and-generator pair; scoring units are slices
    assert wl["ours_stage1_train"]["units_per_step"] == 2 and wl["reference_stage1_train"]["units_per_step"] == 2
    assert wl["ours_score_coarse"]["units_per_step"] == 2 and wl["reference_score_batch1"]["units_per_step"] == 2
    # same work counted per slice, whatever the batching
    assert math.isclose(wl["reference_score_batch1"]["flops_per_unit"], wl["reference_score_batched"]["flops_per_unit"])
    # the reference's 3-channel input triples the generator's stem and head costs...
    g1, g3 = generator_forward_flops(1, 4, 1, 32), generator_forward_flops(3, 4, 1, 32)
    assert math.isclose(wl["ours_score_coarse"]["flops_per_unit"], g1, rel_tol=0.01)
    assert math.isclose(wl["reference_score_batch1"]["flops_per_unit"], g3, rel_tol=0.01)
    # ...and its training iteration does more work than ours (redundant generator passes, 3 channels)
    assert wl["reference_stage1_train"]["flops_per_unit"] > wl["ours_stage1_train"]["flops_per_unit"]
    # the refiner adds work on top of the coarse reconstruction
    assert wl["ours_score_refined"]["flops_per_unit"] > wl["ours_score_coarse"]["flops_per_unit"]

    assert math.isclose(cpu["speedup_stage1_train"],
                        wl["ours_stage1_train"]["rate"] / wl["reference_stage1_train"]["rate"], rel_tol=1e-9)
    assert math.isclose(cpu["speedup_scoring"],
                        wl["ours_score_coarse"]["rate"] / wl["reference_score_batch1"]["rate"], rel_tol=1e-9)
    assert math.isclose(cpu["memory_ratio_stage1_train"], wl["ours_stage1_train"]["peak_memory_bytes"]
                        / wl["reference_stage1_train"]["peak_memory_bytes"], rel_tol=1e-9)
    for key in RATIO_KEYS:
        assert report[key] == cpu[key]
    for key in ("speedup_stage1_train", "speedup_scoring", "memory_ratio_stage1_train"):
        assert report[key] > 0


def test_workloads_flag_runs_exactly_the_named_ones(tmp_path, run_benchmark):
    out = tmp_path / "bench.json"
    named = ["reference_score_batch1", "ours_score_coarse"]
    done = run_benchmark("--out", str(out), "--workloads", ",".join(named), "--bf16", "off", "--channels_last", "on")
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(out.read_text())
    assert set(report["results"]["cpu"]["workloads"]) == set(named)
    assert report["config"]["workloads"] == ["ours_score_coarse", "reference_score_batch1"]
    # a forced mode: no probe, and our workload ran channels_last while the reference did not
    fast_path = report["results"]["cpu"]["fast_path"]
    assert (fast_path["bf16"], fast_path["channels_last"], fast_path["probe_seconds"]) == (False, True, None)
    assert report["results"]["cpu"]["workloads"]["ours_score_coarse"]["channels_last"] is True
    assert report["results"]["cpu"]["workloads"]["reference_score_batch1"]["channels_last"] is False
    assert math.isclose(report["speedup_scoring"], report["results"]["cpu"]["workloads"]["ours_score_coarse"]["rate"]
                        / report["results"]["cpu"]["workloads"]["reference_score_batch1"]["rate"], rel_tol=1e-9)
    assert report["speedup_stage1_train"] is None  # neither stage-1 workload ran
    assert "every timed unit:" in done.stdout


@pytest.mark.parametrize("value", ["ours_stage1_train,ours_stage3_train", "nonsense", ","])
def test_workloads_flag_rejects_unknown_names(value, capsys):
    from bench.benchmark import parse_args
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--workloads", value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "unknown workload(s)" in err and "choose from ours_stage1_train" in err
    if "stage3" in value:
        assert "ours_stage3_train" in err.split("choose from")[0]  # the unknown one is named


def test_a_lazy_penalty_is_timed_over_its_whole_cycle_with_less_work(tmp_path, run_benchmark):
    def stage1_workload(*flags):
        out = tmp_path / f"bench{len(flags)}.json"
        done = run_benchmark("--out", str(out), "--workloads", "ours_stage1_train", "--bf16", "off",
                             "--channels_last", "off", *flags)
        assert done.returncode == 0, done.stdout + done.stderr
        return json.loads(out.read_text())["results"]["cpu"]["workloads"]["ours_stage1_train"]

    every_step, lazy = stage1_workload(), stage1_workload("--gp_every", "4")
    # one unit is the schedule's whole cycle: 4 iterations, 2 of them with a generator step, 1 with the penalty
    assert (every_step["units_per_step"], lazy["units_per_step"]) == (2, 4)
    # the penalty's double backward skipped on 3 of 4 critic steps: less work per iteration (7% at these tiny
    # widths, where the generator's passes are most of it)
    assert lazy["flops_per_unit"] < 0.98 * every_step["flops_per_unit"]
