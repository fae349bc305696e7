"""bench/gpu_check.sh end to end on the CPU at tiny sizes (the GPU run takes its sizes from the same variables):
both benchmark JSONs and the recipe's JSON with all three protocols; a missing cohort is refused with the fix."""
import json
import os
import subprocess

from conftest import TINY_FLAGS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = ("--image_size 16 --batch_size 2 --g_conv_dim 4 --d_conv_dim 4 --g_repeat_num 1 --d_repeat_num 2 "
         "--refiner_dim 8 --refiner_dim_mults 1,2 --refiner_attn_levels 1 --refiner_heads 2 --repeats 1 --warmup 0 "
         "--matmul_size 64 --workloads ours_stage1_train,reference_stage1_train")


def gpu_check(tmp_path, data):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "GPU_CHECK_DEVICE": "cpu",
           "GPU_CHECK_DATA": data, "GPU_CHECK_OUT": str(tmp_path / "results"), "GPU_CHECK_RUN": str(tmp_path / "run"),
           "GPU_CHECK_BENCH_FLAGS": BENCH, "GPU_CHECK_RECIPE_FLAGS": " ".join(TINY_FLAGS),
           "GPU_CHECK_ITERS": "2", "GPU_CHECK_REFINER_ITERS": "1", "PYTHONPATH": REPO}
    return subprocess.run(["bash", os.path.join(REPO, "bench", "gpu_check.sh")], env=env, capture_output=True,
                          text=True, timeout=900)


def test_gpu_check_writes_both_benchmarks_and_the_recipe_with_its_three_protocols(toy_dataset, tmp_path):
    done = gpu_check(tmp_path, toy_dataset)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    results = tmp_path / "results"
    on = json.loads((results / "cpu_192_fast_path_on.json").read_text())
    off = json.loads((results / "cpu_192_fast_path_off.json").read_text())
    assert on["results"]["cpu"]["workloads"]["ours_stage1_train"]["precision"] == "bf16 autocast"
    assert on["results"]["cpu"]["workloads"]["ours_stage1_train"]["channels_last"] is True
    assert on["speedup_stage1_train"] > 0  # the reference mode measured beside the fast path
    assert off["results"]["cpu"]["workloads"]["ours_stage1_train"]["precision"] == "fp32"
    assert off["results"]["cpu"]["workloads"]["ours_stage1_train"]["channels_last"] is False
    recipe = json.loads((results / "cpu_gpu_check_recipe.json").read_text())
    assert recipe["num_iters"] == 2 and recipe["best_iteration"] in (1, 2)
    assert (recipe["fast_path"]["bf16"], recipe["fast_path"]["channels_last"]) == (False, False)  # TINY_FLAGS
    names = " ".join(recipe["results"])
    for protocol in ("aucp", "transductive", "inductive"):
        assert protocol in names, names
    assert set(recipe["seconds"]) == {"benchmark", "stage1", "stage2", "protocols"}


def test_gpu_check_refuses_a_missing_cohort_naming_the_fix(tmp_path):
    done = gpu_check(tmp_path, str(tmp_path / "no-such-cohort"))
    assert done.returncode == 2
    assert f"missing dataset {tmp_path / 'no-such-cohort'}" in done.stderr
    assert "python make_cohort.py" in done.stderr and "Traceback" not in done.stderr
