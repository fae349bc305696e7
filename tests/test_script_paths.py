"""The scripts take any folder name: a dataset, run or repository path with a space or a quote in it is passed to
Python as an argument, never pasted into Python code (where a quote breaks the command or runs as code).

The scripts' order of work is what is checked here, not training: a stand-in interpreter runs the scripts' own
`python -c` and `python -` code with the real Python and records every other call (main.py, baseline.py, ...),
writing the pick a real run would write."""
import json
import os
import subprocess
import sys

from test_protocols import REPO

# a space, both quotes, and Python that runs where the name is pasted into Python code between single quotes
ODD = "B x'+str(__import__('os').system('touch $PWNED'))+'\""

FAKE_MAIN = r'''
import json, os, sys
args = sys.argv[1:]
with open(os.environ["STUB_LOG"], "a") as f:
    f.write(json.dumps(args) + "\n")
flag = lambda name: args[args.index(name) + 1] if name in args else None
run = flag("--run_dir")
if flag("--mode") == "train":
    os.makedirs(os.path.join(run, "models"), exist_ok=True)
    with open(os.path.join(run, "models", "config.json"), "w") as f:
        json.dump({"fast_path": None}, f)
if flag("--mode") == "train_refiner" or (flag("--mode") == "test_aucp" and flag("--test_iters") == "all"):
    os.makedirs(os.path.join(run, "results"), exist_ok=True)
    with open(os.path.join(run, "results", "aucp_selection.json"), "w") as f:
        json.dump({"best_iteration": 200}, f)
'''


def stand_in_python(tmp_path):
    """An interpreter at a path with a space and a quote: the real one for `-c CODE` and `- < CODE`, else the
    recorder above."""
    folder = tmp_path / "py th'on"
    folder.mkdir()
    (folder / "fake_main.py").write_text(FAKE_MAIN)
    python = folder / "python"
    python.write_text(f'#!/usr/bin/env bash\nif [ "$1" = -c ] || [ "$1" = - ]; then exec "{sys.executable}" "$@"; fi\n'
                      f'exec "{sys.executable}" "{folder}/fake_main.py" "$@"\n')
    python.chmod(0o755)
    return str(python)


def run_script(tmp_path, command, **env):
    log = tmp_path / "calls.jsonl"
    done = subprocess.run(command, cwd=str(tmp_path), capture_output=True, text=True, timeout=300, check=False,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "BRAINOMALY_PYTHON": stand_in_python(tmp_path),
                               "STUB_LOG": str(log), "BRAINOMALY_HOME": str(tmp_path),
                               "PWNED": str(tmp_path / "PWNED"), **env})
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return done, calls


def test_demo_reads_the_pick_of_a_dataset_whose_name_has_quotes(tmp_path):
    (tmp_path / "data" / ODD).mkdir(parents=True)
    done, calls = run_script(tmp_path, ["bash", f"{REPO}/demo.sh", "--data", ODD])
    assert done.returncode == 0, done.stderr[-2000:]
    tests = [call for call in calls if "--test_iters" in call]
    assert tests and all(call[call.index("--test_iters") + 1] == "200" for call in tests[:-1])
    assert all(call[call.index("--run_dir") + 1] == f"runs/{ODD}-demo" for call in tests)
    assert not any("--rho" in call for call in tests)  # only the demo cohort's healthy share is known
    assert not (tmp_path / "PWNED").exists()


def test_demo_on_its_cohort_passes_its_healthy_share(tmp_path):
    (tmp_path / "data" / "Demo" / "train").mkdir(parents=True)
    done, calls = run_script(tmp_path, ["bash", f"{REPO}/demo.sh"])
    assert done.returncode == 0, done.stderr[-2000:]
    with_maps = [call for call in calls if "--save_maps" in call]
    assert with_maps and all(call[call.index("--rho") + 1] == "0.6" for call in with_maps)


def test_the_selection_study_reads_each_pick_under_folders_with_quotes(tmp_path):
    data, runs = tmp_path / f"da{ODD}ta", tmp_path / f"ru{ODD}ns"
    for cohort in ("Demo", "CohortB", "CohortC"):
        (data / cohort / "train").mkdir(parents=True)
    done, calls = run_script(tmp_path, ["bash", f"{REPO}/bench/selection_runs.sh", str(data), str(runs)])
    assert done.returncode == 0, done.stderr[-2000:]
    refiners = [call for call in calls if "train_refiner" in call]
    assert len(refiners) == 8 and all(call[call.index("--refine_from") + 1] == "200" for call in refiners)
    assert not (tmp_path / "PWNED").exists()


def test_the_same_program_check_runs_from_a_repository_path_with_quotes(tmp_path):
    repo = tmp_path / f"re{ODD}po"
    repo.symlink_to(REPO)
    out = tmp_path / "out"
    done, calls = run_script(tmp_path, ["bash", f"{REPO}/bench/same_program.sh", str(repo), str(out)])
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(os.listdir(out / "data" / "Toy" / "train" / "neg")) > 0  # the toy cohort, written by the real Python
    assert calls and all(call[0] == f"{repo}/main.py" for call in calls)
    assert not (tmp_path / "PWNED").exists()


def test_the_gpu_check_reads_the_pick_of_a_run_folder_with_quotes(tmp_path):
    data = tmp_path / "data"
    (data / "train").mkdir(parents=True)
    run = tmp_path / f"ru{ODD}n"
    done, calls = run_script(tmp_path, ["bash", f"{REPO}/bench/gpu_check.sh"], GPU_CHECK_DEVICE="cpu",
                             GPU_CHECK_DATA=str(data), GPU_CHECK_RUN=str(run), GPU_CHECK_OUT=str(tmp_path / "results"))
    assert done.returncode == 0, done.stderr[-2000:]
    tests = [call for call in calls if "--test_iters" in call]
    assert len(tests) == 3 and all(call[call.index("--test_iters") + 1] == "200" for call in tests)
    assert json.loads((tmp_path / "results" / "cpu_gpu_check_recipe.json").read_text())["best_iteration"] == 200
    assert not (tmp_path / "PWNED").exists()
