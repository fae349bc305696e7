"""Several ranks (torchrun, gloo on CPU) train and score like one process; streams resume exactly."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import TINY_FLAGS, write_toy_dataset
from test_real_world_failures import small_disk  # noqa: F401 (a fixture)

import data_loader
import main
from brainomaly.data import dataset_layout


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One thread here as in each torchrun rank (OMP_NUM_THREADS=1): on a busy small CPU more threads stall."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def healthy_paths(tmp_path_factory):
    root = write_toy_dataset(str(tmp_path_factory.mktemp("data") / "Toy"))
    return dataset_layout.require_images(root, dataset_layout.HEALTHY_FOLDER)  # 18 slices


def take(stream, steps):
    return [next(stream) for _ in range(steps)]


@pytest.mark.parametrize("preload", ["on", "off"])
def test_two_rank_shards_together_are_the_one_process_batch(healthy_paths, preload):
    one = data_loader.training_stream(healthy_paths, 16, 8, seed=3, preload=preload)
    ranks = [data_loader.training_stream(healthy_paths, 16, 4, seed=3, preload=preload, rank=r, world_size=2)
             for r in range(2)]
    for step in range(5):  # 5 steps of 8 slices cross two epochs of 18
        expected = next(one)
        assert torch.equal(torch.cat([next(s) for s in ranks]), expected), f"step {step}"


@pytest.mark.parametrize("preload,num_workers,max_shift", [("on", 0, 0), ("off", 0, 0), ("off", 1, 0), ("on", 0, 2)])
def test_stream_resumes_mid_epoch_exactly_also_with_another_rank_count(healthy_paths, preload, num_workers,
                                                                       max_shift):
    def stream(batch_size, **ranks):
        return data_loader.training_stream(healthy_paths, 16, batch_size, 5, preload, num_workers=num_workers,
                                           max_shift=max_shift, **ranks)
    one = stream(4)
    first = take(one, 3)
    state = one.state_dict()
    rest = take(one, 4)
    again = stream(4)
    assert torch.equal(torch.cat(take(again, 3)), torch.cat(first))
    resumed = stream(4)
    resumed.load_state_dict(state)
    assert torch.equal(torch.cat(take(resumed, 4)), torch.cat(rest))
    # A run of 1 process x batch 4 resumed by 2 ranks x batch 2 reads the same slices (flipped and shifted alike).
    halves = [stream(2, rank=r, world_size=2) for r in range(2)]
    for half in halves:
        half.load_state_dict(state)
    assert torch.equal(torch.cat([torch.cat([next(h) for h in halves]) for _ in range(4)]), torch.cat(rest))
    end_workers(one, again, resumed, *halves)


def end_workers(*streams):
    """Stop the streams' DataLoader workers now. A stream and its loader refer to each other, so otherwise the
    garbage collector ends them during some later test, where each worker's shutdown waits out DataLoader's 5 s
    join timeout (25 s added to the next fixture's stage 2 when this test ran with a worker)."""
    for stream in streams:
        if stream._batches is not None:
            stream._batches.close()


# ---------------------------------------------------------------- torchrun, 2 ranks, gloo on CPU
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCHRUN_ENV = {**os.environ, "PYTHONPATH": REPO, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}


def torchrun_command(nproc, args):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            f"{REPO}/main.py", *args]


def torchrun_commands(nproc, commands):
    """Several main.py commands in one launch (starting the ranks is the slow part on a small CPU)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               f"{REPO}/tests/torchrun_commands.py", json.dumps(commands)]
    done = subprocess.run(command, env=TORCHRUN_ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def train_args(root, run_dir, *extra):
    return ["--mode", "train", "--image_dir", root, "--run_dir", run_dir, *TINY_FLAGS, "--preload", "off",
            "--num_iters", "2", *extra]


def refiner_args(root, run_dir, *extra):
    return ["--mode", "train_refiner", "--image_dir", root, "--run_dir", run_dir, *TINY_FLAGS, "--preload", "off",
            "--refine_from", "2", "--refiner_iters", "1", *extra]


def score_args(root, run_dir, result_dir):
    return ["--mode", "score", "--image_dir", os.path.join(root, "test"), "--run_dir", run_dir, "--test_iters", "2",
            *TINY_FLAGS, "--score_batch_size", "5", "--save_maps", "8", "--result_dir", result_dir,
            "--refiner", "on"]


def weights(path, key="state_dict"):
    return torch.load(path, weights_only=True)[key]


def assert_same_weights(ours_path, theirs_path, atol=1e-5, key="state_dict"):
    ours, theirs = weights(ours_path, key), weights(theirs_path, key)
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.allclose(ours[name].float(), theirs[name].float(), atol=atol), f"{name} differs ({ours_path})"


def listing(run_dir):
    return sorted(os.path.relpath(os.path.join(d, n), run_dir) for d, _, names in os.walk(run_dir) for n in names)


@pytest.fixture(scope="module")
def one_and_two_ranks(tmp_path_factory):
    """The same jobs from the same initial state, 1 process x batch 4 and 2 ranks x batch 2, the 2-rank ones in
    one torchrun launch: stage 1; stage 2 of the 1-process stage-1 generator (a copy of that run, so both refine
    the very same G); scoring new scans with the 1-process checkpoints (which first scores the AUCp protocol for
    the known-healthy reference)."""
    base = tmp_path_factory.mktemp("ddp")
    root = write_toy_dataset(str(base / "Toy"))
    one, two, two_refine = str(base / "one"), str(base / "two"), str(base / "two_refine")
    assert main.main(train_args(root, one, "--batch_size", "4")) == 0
    listings = {"stage1": listing(one)}
    shutil.copytree(one, two_refine)
    assert main.main(refiner_args(root, one, "--refiner_batch_size", "4")) == 0
    listings["stage2"] = listing(one)
    assert main.main(score_args(root, one, str(base / "scores_one"))) == 0
    done = torchrun_commands(2, [train_args(root, two, "--batch_size", "2"),
                                 refiner_args(root, two_refine, "--refiner_batch_size", "2"),
                                 score_args(root, one, str(base / "scores_two"))])
    return {"root": root, "one": one, "two": two, "two_refine": two_refine, "listings": listings, "base": str(base),
            "output": done.stdout + done.stderr}


def test_two_ranks_train_stage1_like_one_process_with_twice_the_batch(one_and_two_ranks):
    one, two = one_and_two_ranks["one"], one_and_two_ranks["two"]  # 2 iterations: D twice, G once (n_critic 2)
    assert_same_weights(f"{one}/models/2-D.ckpt", f"{two}/models/2-D.ckpt")
    assert_same_weights(f"{one}/models/2-G.ckpt", f"{two}/models/2-G.ckpt")  # the generator EMA
    assert_same_weights(f"{one}/models/2-state.ckpt", f"{two}/models/2-state.ckpt", key="generator")  # the raw G
    assert "Stage 1: 2 ranks x batch 2 = global batch 4" in one_and_two_ranks["output"]


def test_two_ranks_train_the_refiner_like_one_process_with_twice_the_batch(one_and_two_ranks):
    one, two = one_and_two_ranks["one"], one_and_two_ranks["two_refine"]
    assert_same_weights(f"{one}/models/2-R-state.ckpt", f"{two}/models/2-R-state.ckpt")
    assert_same_weights(f"{one}/models/2-R.ckpt", f"{two}/models/2-R.ckpt")  # the EMA scoring uses
    ours, theirs = (weights(f"{run}/models/2-R-state.ckpt", "stream") for run in (one, two))
    assert (ours["epoch"], ours["position"]) == (theirs["epoch"], theirs["position"])
    assert torch.equal(ours["generator"], theirs["generator"])
    # the held-out check, scored in shards and summed, written once by rank 0
    with open(f"{one}/results/2/refiner_check.json") as a, open(f"{two}/results/2/refiner_check.json") as b:
        ours, theirs = json.load(a), json.load(b)
    assert ours.keys() == theirs.keys() and ours["held_out_slices"] == theirs["held_out_slices"]
    for key in ("coarse_error", "refined_error", "aucp_coarse", "aucp_refined"):
        assert abs(ours[key] - theirs[key]) < 1e-5, key


def test_only_rank_zero_writes_the_files_one_process_writes(one_and_two_ranks):
    listings = one_and_two_ranks["listings"]
    assert listings["stage1"] == listing(one_and_two_ranks["two"])
    assert listings["stage2"] == listing(one_and_two_ranks["two_refine"])
    assert not [name for name in listings["stage2"] if ".tmp" in name]


def test_one_process_resumes_a_two_rank_run(one_and_two_ranks, tmp_path):
    root, one, two = one_and_two_ranks["root"], one_and_two_ranks["one"], one_and_two_ranks["two"]
    resumed_one, resumed_two = str(tmp_path / "one"), str(tmp_path / "two")
    shutil.copytree(f"{one}/models", f"{resumed_one}/models")
    shutil.copytree(f"{two}/models", f"{resumed_two}/models")
    for name in os.listdir(f"{resumed_one}/models"):  # stage 1 only
        if "-R" in name:
            os.remove(f"{resumed_one}/models/{name}")
    for run in (resumed_one, resumed_two):
        assert main.main(train_args(root, run, "--batch_size", "4", "--num_iters", "4", "--resume_iters", "latest")) == 0
    for part in ("G", "D"):
        assert_same_weights(f"{resumed_one}/models/4-{part}.ckpt", f"{resumed_two}/models/4-{part}.ckpt")


def test_sharded_scoring_writes_the_same_files_as_one_process(one_and_two_ranks):
    base = one_and_two_ranks["base"]
    results_one, results_two = f"{base}/scores_one", f"{base}/scores_two"
    files = listing(results_one)
    assert files == listing(results_two)
    panels = [name for name in files if "/maps_score_test/" in name]
    assert len(panels) == 8  # slices 0-4 are scored by rank 0, 5-7 by rank 1 (batches of 5): rank 0 draws them all
    for name in files:  # CSVs, the healthy reference (map scale summed over ranks), the panels and plots
        if name.endswith("aucp.json"):
            continue
        with open(f"{results_one}/{name}", "rb") as a, open(f"{results_two}/{name}", "rb") as b:
            assert a.read() == b.read(), f"{name} differs"
    with open(f"{results_one}/2/refined/aucp.json") as a, open(f"{results_two}/2/refined/aucp.json") as b:
        ours, theirs = json.load(a), json.load(b)
    assert {k: v for k, v in ours.items() if k != "seconds"} == {k: v for k, v in theirs.items() if k != "seconds"}


def worker_of_rank(torchrun_pid, rank):
    """The pid of the torchrun worker process with RANK=rank, or None while it is not started."""
    with open(f"/proc/{torchrun_pid}/task/{torchrun_pid}/children") as f:
        children = f.read().split()
    for pid in children:
        with open(f"/proc/{pid}/environ", "rb") as f:
            if f"RANK={rank}".encode() in f.read().split(b"\0"):
                return int(pid)
    return None


def test_a_killed_rank_stops_the_job_and_one_process_resumes_from_what_was_saved(tmp_path):
    root = write_toy_dataset(str(tmp_path / "Toy"))
    run_dir = str(tmp_path / "run")
    models = f"{run_dir}/models"
    process = subprocess.Popen(torchrun_command(2, train_args(root, run_dir, "--batch_size", "2", "--num_iters", "500",
                                                              "--model_save_step", "1", "--sample_step", "1000")),
                               env=TORCHRUN_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    def saved_a_state():
        return os.path.isdir(models) and any(n.endswith("-state.ckpt") for n in os.listdir(models))

    deadline = time.time() + 400  # a busy 2-core machine needs minutes to start two ranks
    while process.poll() is None and time.time() < deadline and not saved_a_state():
        time.sleep(0.1)
    assert process.poll() is None and saved_a_state(), "no checkpoint before the deadline, or training ended"
    os.kill(worker_of_rank(process.pid, 1), signal.SIGKILL)
    _, err = process.communicate(timeout=120)
    assert process.returncode != 0
    assert "ChildFailedError" in err and "rank      : 1" in err and "SIGKILL" in err, err[-2000:]
    saved = [n for n in os.listdir(models) if n.endswith(".ckpt")]
    for name in saved:
        torch.load(f"{models}/{name}", weights_only=True)  # every checkpoint left behind loads
    last = max(int(n.split("-")[0]) for n in saved if n.endswith("-state.ckpt"))
    assert main.main(train_args(root, run_dir, "--batch_size", "4", "--num_iters", str(last + 1),
                                "--resume_iters", "latest")) == 0
    assert os.path.isfile(f"{models}/{last + 1}-G.ckpt")


def test_a_failed_write_on_rank_0_ends_every_rank_with_its_message(tmp_path, small_disk):
    root = write_toy_dataset(str(tmp_path / "Toy"))
    probe = str(tmp_path / "probe")  # one complete checkpoint set, measured on the normal disk
    assert main.main(train_args(root, probe, "--batch_size", "2", "--model_save_step", "2")) == 0
    set_bytes = sum(os.path.getsize(f"{probe}/models/2-{part}.ckpt") for part in ("G", "D", "state"))
    free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
    with open(os.path.join(small_disk, "filler"), "wb") as f:  # room for about 2.5 sets
        f.write(b"\0" * (free - int(2.5 * set_bytes) - 64 * 1024))
    run_dir = os.path.join(small_disk, "run")
    started = time.time()
    failed = subprocess.run(torchrun_command(2, train_args(root, run_dir, "--batch_size", "2", "--num_iters", "50",
                                                           "--model_save_step", "1", "--sample_step", "1000")),
                            env=TORCHRUN_ENV, capture_output=True, text=True, timeout=400)
    assert failed.returncode != 0
    # every rank prints rank 0's message and ends (not a traceback of a broken collective, nor a timeout)
    messages = [line for line in failed.stderr.splitlines() if line.startswith("error: [rank 0]")]
    assert len(messages) == 2 and messages[0] == messages[1], failed.stderr[-3000:]
    assert "No space left on device" in messages[0] and "Connection closed by peer" not in failed.stderr
    assert time.time() - started < 300  # starting the ranks takes most of it; the collective timeout is 30 min
