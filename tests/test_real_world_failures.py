"""Real datasets and real machines: anomaly masks without brain masks, a small known-healthy set, a full disk,
and two training jobs on one run folder. Each ends either with complete results or with one clear message and
exit status 2, never with a traceback or debris."""
import builtins
import errno
import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import TINY_FLAGS, toy_slice
from test_protocols import Finished

import main
from brainomaly import metrics
from brainomaly.data import slice_files
from brainomaly.data.dataset_layout import slice_filename
from brainomaly.data.slice_files import save_slice_png
from brainomaly.evaluate import scoring
from brainomaly.visualize import read_png, save_sample_grid

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUBPROCESS_ENV = {**os.environ, "PYTHONPATH": REPO, "CUDA_VISIBLE_DEVICES": ""}


def train_args(root, run_dir, *extra):
    return ["--mode", "train", "--image_dir", root, "--run_dir", run_dir, *TINY_FLAGS, "--preload", "on", *extra]


def protocol_args(mode, root, run_dir, *extra):
    return ["--mode", mode, "--image_dir", root, "--run_dir", run_dir, "--num_workers", "0",
            "--use_tensorboard", "false", "--score_batch_size", "8", *extra]


def stage2_args(root, run_dir, *extra):
    return ["--mode", "train_refiner", "--image_dir", root, "--run_dir", run_dir, *TINY_FLAGS, "--preload", "on",
            *extra]


def read_json(path):
    with open(path) as f:
        return json.load(f)


def protocol_result(run_dir, iteration, name):
    """A protocol's JSON of checkpoint ITER, scored with the refiner or, where it failed its check, its fallback."""
    for reconstruction in ("refined", "calibrated", "coarse"):
        path = f"{run_dir}/results/{iteration}/{reconstruction}/{name}.json"
        if os.path.isfile(path):
            return read_json(path)
    raise AssertionError(f"no {name} result for checkpoint {iteration} in {run_dir}/results")


def leftovers(folder):
    """Temporary files (atomic writes not renamed into place) anywhere below folder."""
    return [os.path.join(d, n) for d, _, names in os.walk(folder) for n in names if ".tmp" in n]


def write_dataset(root, layout, seed=0):
    """layout: folder -> (patient prefix, patients, slices each, diseased?)."""
    rng = np.random.default_rng(seed)
    for folder, (prefix, n_patients, n_slices, diseased) in layout.items():
        for p in range(n_patients):
            for s in range(n_slices):
                save_slice_png(toy_slice(rng, diseased), os.path.join(root, folder, slice_filename(f"{prefix}{p}", s)))
    return root


def write_lesion_masks(root, folders):
    """masks/<same path> for every slice of these folders: the enlarged ventricle of a diseased toy slice
    (toy_slice), nothing on a healthy one."""
    size = 40
    yy, xx = np.mgrid[:size, :size] - size / 2
    for folder in folders:
        diseased = folder.endswith("pos")
        lesion = ((np.hypot(yy, xx) < size * 0.16) & (np.hypot(yy, xx) >= size * 0.07)) if diseased \
            else np.zeros((size, size), bool)
        for name in os.listdir(os.path.join(root, folder)):
            save_slice_png(lesion.astype(float), os.path.join(root, "masks", folder, name))


# ---------------------------------------------------------------- 1. masks without brain masks

def scored_batch(image, anomaly_map):
    x = torch.from_numpy(image).float()[None, None]
    return scoring.ScoredBatch(np.array([0]), x, x, None, torch.from_numpy(anomaly_map).float()[None],
                               np.zeros(1))


def test_pixel_metrics_count_the_head_without_brain_masks_and_the_brain_mask_with_them(tmp_path):
    root = str(tmp_path / "data")
    # 16 x 16 slice, padded by 5 px to 26 x 26 when read (image_size 26: no resize). Head: rows 5..20 of columns
    # 5..12 (the left half of the slice, 16 x 8 = 128 px); the right half is black background.
    slice_path = os.path.join(root, "test/pos/p0__000.png")
    picture = np.zeros((16, 16))
    picture[:, :8] = 0.6
    save_slice_png(picture, slice_path)
    lesion = np.zeros((16, 16))
    lesion[4:6, 6:11] = 1.0  # 10 px: 2 x 2 = 4 inside the head (columns 6, 7), 6 on the background
    save_slice_png(lesion, os.path.join(root, "masks/test/pos/p0__000.png"))
    image = slice_files.load_slice(slice_path, 26)[0].numpy()
    assert int((image > metrics.HEAD_LEVEL).sum()) == 128
    anomaly_map = np.full((26, 26), 0.5)

    counted = metrics.PixelMetrics()
    consume = scoring.pixel_metrics_consumer(counted, [slice_path], root, 26)
    consume(scored_batch(image, anomaly_map))
    assert (int(counted.positive.sum()), int(counted.negative.sum())) == (4, 124)
    assert consume.regions() == {"brain mask": 0, "head": 1}

    brain = np.zeros((16, 16))
    brain[2:10, :] = 1.0  # 8 rows x 16 columns = 128 px; covers all 10 lesion pixels
    save_slice_png(brain, os.path.join(root, "brain_masks/test/pos/p0__000.png"))
    counted = metrics.PixelMetrics()
    consume = scoring.pixel_metrics_consumer(counted, [slice_path], root, 26)
    consume(scored_batch(image, anomaly_map))
    assert (int(counted.positive.sum()), int(counted.negative.sum())) == (10, 118)
    assert consume.regions() == {"brain mask": 1, "head": 0}


def test_masks_without_brain_masks_give_pixel_metrics_and_a_protocol_without_masks_still_writes(
        toy_dataset, tmp_path, capsys):
    write_lesion_masks(toy_dataset, ("test/pos", "test/neg"))  # a labelled test set with masks, no brain_masks/
    run_dir = str(tmp_path / "run")
    assert main.main(train_args(toy_dataset, run_dir, "--num_iters", "2")) == 0
    assert main.main(protocol_args("test_inductive", toy_dataset, run_dir, "--test_iters", "2")) == 0
    inductive = read_json(f"{run_dir}/results/2/coarse/inductive.json")
    assert 0.0 <= inductive["pixel_auroc"] <= 1.0 and 0.0 < inductive["best_dice"] <= 1.0
    assert inductive["pixel_region_slices"] == {"brain mask": 0, "head": 18}  # 3 + 3 patients x 3 slices
    assert "not_computed" not in inductive
    # masks/ exists but none of the transductive protocol's slices has one: its AUC is still written
    assert main.main(protocol_args("test_transductive", toy_dataset, run_dir, "--test_iters", "2")) == 0
    transductive = read_json(f"{run_dir}/results/2/coarse/transductive.json")
    assert 0.0 <= transductive["auc"] <= 1.0 and "pixel_auroc" not in transductive
    assert "no scored slice has an anomaly mask" in transductive["not_computed"]["pixel_metrics"]
    assert os.path.isfile(f"{run_dir}/results/2/coarse/transductive.csv")
    assert re.search(r"pixel metrics +not computed: no scored slice", capsys.readouterr().out)


def test_check_data_reports_mask_coverage_and_names_a_slice_without_its_mask(toy_dataset, capsys):
    write_lesion_masks(toy_dataset, ("test/pos", "test/neg"))
    missing = os.path.join(toy_dataset, "masks/test/pos/tpos1__002.png")
    os.remove(missing)
    assert main.main(["--mode", "check_data", "--image_dir", toy_dataset, "--batch_size", "4"]) == 0
    captured = capsys.readouterr()
    assert re.search(r"^masks/ +17 of 60 slices$", captured.out, re.M)  # 18 test slices had masks; 60 in all
    assert re.search(r"^brain_masks/ +absent: pixel metrics count the head", captured.out, re.M)
    assert f"1 of the 9 slices in {os.path.join(toy_dataset, 'test/pos')} have no mask" in captured.err
    assert missing in captured.err


# ---------------------------------------------------------------- 2. a full disk

class FullDisk:
    """builtins.open for files whose name contains `trigger`: the write stops half-way with ENOSPC, as on a
    disk that fills up during it."""

    def __init__(self, trigger):
        self.trigger, self.real_open, self.hits = trigger, builtins.open, 0

    def __call__(self, file, mode="r", *args, **kwargs):
        handle = self.real_open(file, mode, *args, **kwargs)
        if self.trigger in os.path.basename(str(file)) and "w" in mode:
            self.hits += 1
            real_write = handle.write

            def write(data):
                real_write(data[:len(data) // 2])
                raise OSError(errno.ENOSPC, "No space left on device")
            handle.write = write
        return handle


def test_disk_full_during_a_checkpoint_stops_cleanly_and_resume_continues_from_the_last_complete_one(
        toy_dataset, tmp_path, capsys, monkeypatch):
    run_dir = str(tmp_path / "run")
    models = f"{run_dir}/models"
    full_disk = FullDisk("4-G.ckpt")  # D and the training state of checkpoint 4 are written, G is not
    monkeypatch.setattr(builtins, "open", full_disk)
    assert main.main(train_args(toy_dataset, run_dir, "--num_iters", "6", "--model_save_step", "2")) == 2
    monkeypatch.setattr(builtins, "open", full_disk.real_open)
    err = capsys.readouterr().err
    assert full_disk.hits == 1
    assert f"cannot write the stage-1 checkpoint {models}/4-G.ckpt: No space left on device (ENOSPC)" in err
    assert "free space" in err and "--resume_iters latest" in err and "Traceback" not in err
    assert sorted(os.listdir(models)) == ["2-D.ckpt", "2-G.ckpt", "2-state.ckpt", "config.json"]  # no half set 4
    assert leftovers(run_dir) == []
    assert main.main(protocol_args("test_aucp", toy_dataset, run_dir, "--test_iters", "all")) == 0
    assert [row["iteration"] for row in read_json(f"{run_dir}/results/aucp_selection.json")["table"]] == [2]
    assert main.main(train_args(toy_dataset, run_dir, "--num_iters", "6", "--model_save_step", "2",
                                "--resume_iters", "latest")) == 0
    assert f"Resumed stage 1 from iteration 2 in {models}." in capsys.readouterr().out
    assert {"4-G.ckpt", "6-G.ckpt", "6-D.ckpt", "6-state.ckpt"} <= set(os.listdir(models))


def test_disk_full_while_writing_a_sample_grid_or_a_result_is_one_message(toy_dataset, tmp_path, capsys,
                                                                         monkeypatch):
    run_dir = str(tmp_path / "run")
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", FullDisk("2-images.png"))
    assert main.main(train_args(toy_dataset, run_dir, "--num_iters", "2", "--sample_step", "2")) == 2
    monkeypatch.setattr(builtins, "open", real_open)
    err = capsys.readouterr().err
    assert f"cannot write the sample grid {run_dir}/samples/2-images.png: No space left on device" in err
    assert leftovers(run_dir) == [] and not os.listdir(f"{run_dir}/samples")

    assert main.main(train_args(toy_dataset, run_dir, "--num_iters", "2", "--sample_step", "2",
                                "--resume_iters", "latest")) == 0
    monkeypatch.setattr(builtins, "open", FullDisk("aucp.json"))
    assert main.main(protocol_args("test_aucp", toy_dataset, run_dir, "--test_iters", "2")) == 2
    monkeypatch.setattr(builtins, "open", real_open)
    err = capsys.readouterr().err
    assert f"cannot write the result {run_dir}/results/2/coarse/aucp.json: No space left on device" in err
    assert leftovers(run_dir) == []
    assert not os.path.exists(f"{run_dir}/results/2/coarse/aucp.json")


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MiB tmpfs (needs root and permission to mount; skipped otherwise), unmounted afterwards."""
    folder = tmp_path / "small_disk"
    folder.mkdir()
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    yield str(folder)
    subprocess.run(["umount", str(folder)], check=True)


def test_training_into_a_disk_that_fills_up(toy_dataset, tmp_path, small_disk, capsys):
    # one complete checkpoint set, measured on the normal disk: the second one (the generator's optimiser state
    # exists from its first update, at iteration 2; every later set has this size, the first is smaller)
    probe = str(tmp_path / "probe")
    assert main.main(train_args(toy_dataset, probe, "--num_iters", "2", "--model_save_step", "2")) == 0
    set_bytes = sum(os.path.getsize(f"{probe}/models/2-{part}.ckpt") for part in ("G", "D", "state"))
    # leave room for about 2.5 sets: the third checkpoint (or the last sample grid) runs out of space
    filler = os.path.join(small_disk, "filler")
    free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
    with open(filler, "wb") as f:
        f.write(b"\0" * (free - int(2.5 * set_bytes) - 64 * 1024))
    run_dir = os.path.join(small_disk, "run")
    command = train_args(toy_dataset, run_dir, "--num_iters", "3", "--model_save_step", "1", "--sample_step", "1000",
                         "--resume_iters", "latest")

    def train(argv):
        """main.py ARGV in this process (a real full disk all the same): exit status and captured stdout/stderr as a
        subprocess's; an exception main.main let out (a traceback) fails the test."""
        capsys.readouterr()
        status = main.main(argv)
        out, err = capsys.readouterr()
        return Finished(status, out, err)

    failed = train(command)
    assert failed.returncode == 2, failed.stderr[-2000:]
    assert "No space left on device" in failed.stderr and "Traceback" not in failed.stderr
    assert "free space" in failed.stderr and "--resume_iters latest" in failed.stderr
    assert leftovers(small_disk) == []
    names = set(os.listdir(f"{run_dir}/models"))
    complete = sorted(int(n.split("-")[0]) for n in names if n.endswith("-G.ckpt"))
    assert complete == [1, 2]
    for name in names - {"config.json"}:  # no part of an incomplete checkpoint, every part loads
        assert int(name.split("-")[0]) in complete
        torch.load(f"{run_dir}/models/{name}", weights_only=True)
    os.remove(filler)  # space freed: the same command continues from checkpoint 2
    resumed = train(command)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"Resumed stage 1 from iteration 2 in {run_dir}/models." in resumed.stdout
    assert os.path.isfile(f"{run_dir}/models/3-G.ckpt")


# ---------------------------------------------------------------- 3. two training jobs on one run folder

def lock_holder(run_dir):
    path = os.path.join(run_dir, "training.lock")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return f.read().strip() or None


def test_a_second_trainer_on_the_run_folder_is_refused_and_a_killed_one_leaves_no_lock(toy_dataset, tmp_path,
                                                                                      capsys):
    run_dir = str(tmp_path / "run")
    first = subprocess.Popen([sys.executable, f"{REPO}/main.py",
                              *train_args(toy_dataset, run_dir, "--num_iters", "100000", "--model_save_step", "2",
                                          "--sample_step", "100000", "--resume_iters", "latest")],
                             env=SUBPROCESS_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 400
        while not os.path.isfile(f"{run_dir}/models/2-G.ckpt") and first.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert first.poll() is None and lock_holder(run_dir) == str(first.pid)
        # the second trainer is this process (the first is another one, as two jobs are)
        capsys.readouterr()
        second = Finished(main.main(train_args(toy_dataset, run_dir, "--num_iters", "4", "--resume_iters", "latest")),
                          *capsys.readouterr())
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"another training job (process id {first.pid}) is training in the run folder {run_dir}" \
            in second.stderr
        assert "Traceback" not in second.stderr
        stage2 = stage2_args(toy_dataset, run_dir, "--refine_from", "2", "--refiner_iters", "1")
        assert main.main(stage2) == 2  # stage 2 on the same folder waits its turn as well
        assert f"process id {first.pid}" in capsys.readouterr().err
        # a protocol reads finished checkpoints beside the training job
        assert main.main(protocol_args("test_aucp", toy_dataset, run_dir, "--test_iters", "2")) == 0
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    with open(os.path.join(run_dir, "training.lock")) as f:  # the kernel dropped the killed job's lock
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(f, fcntl.LOCK_UN)
    latest = max(int(n.split("-")[0]) for n in os.listdir(f"{run_dir}/models") if n.endswith("-G.ckpt"))
    assert main.main(train_args(toy_dataset, run_dir, "--num_iters", str(latest + 2), "--model_save_step", "2",
                                "--resume_iters", "latest")) == 0
    assert f"Resumed stage 1 from iteration {latest} in {run_dir}/models." in capsys.readouterr().out
    assert os.path.isfile(f"{run_dir}/models/{latest + 2}-G.ckpt")


def test_a_failed_first_start_leaves_no_run_folder(tmp_path):
    run_dir = str(tmp_path / "run")
    assert main.main(train_args(str(tmp_path / "nowhere"), run_dir)) == 2
    assert not os.path.exists(run_dir)


# ---------------------------------------------------------------- 4. small sets

def test_sample_grid_pairs_as_many_healthy_rows_as_mixed_ones(tmp_path):
    mixed, healthy = -torch.ones(8, 1, 4, 4), torch.ones(6, 1, 4, 4)  # black mixed samples, white healthy ones
    path = str(tmp_path / "grid.png")
    picture = save_sample_grid([mixed, mixed, mixed, healthy, healthy, healthy], path)
    written = read_png(path)
    assert written.shape == (3, 6 * 4, 6 * 4)  # 6 complete rows of 6 columns
    assert np.allclose(written[:, :, :12], 0.0) and np.allclose(written[:, :, 12:], 1.0)
    assert tuple(picture.shape[-2:]) == (24, 24)  # what TensorBoard gets: the same 6 rows


def test_small_known_healthy_set_trains_samples_and_scores_to_the_end(tmp_path, capsys):
    # 4 patients per folder x 2 slices: stage 1 holds 1 of the 4 known-healthy patients out (--healthy_holdout
    # 0.2), so 6 healthy training slices against 8 mixed ones
    root = write_dataset(str(tmp_path / "data"), {
        "train/pos": ("mpos", 4, 2, True), "train/neg_mixed": ("mneg", 4, 2, False),
        "train/neg": ("hea", 4, 2, False), "test/pos": ("tpos", 4, 2, True), "test/neg": ("tneg", 4, 2, False)})
    run_dir = str(tmp_path / "run")
    assert main.main(["--mode", "check_data", "--image_dir", root, "--batch_size", "4"]) == 0
    assert main.main(train_args(root, run_dir, "--num_iters", "4", "--model_save_step", "2",
                                "--sample_step", "2")) == 0
    grid = read_png(f"{run_dir}/samples/4-images.png")
    assert grid.shape == (3, 6 * 32, 6 * 32)  # 6 rows: as many mixed as healthy samples, 3 columns each
    assert main.main(stage2_args(root, run_dir, "--refiner_iters", "2", "--model_save_step", "2")) == 0
    for mode in ("test_inductive", "test_transductive"):
        assert main.main(protocol_args(mode, root, run_dir, "--test_iters", "latest")) == 0
    sweep = read_json(f"{run_dir}/results/aucp_selection.json")
    assert [row["iteration"] for row in sweep["table"]] == [2, 4]
    assert read_json(f"{run_dir}/results/{sweep['best_iteration']}/coarse/aucp.json")["n_patients"] == 9  # 1 + 8
    for name in ("inductive", "transductive"):
        assert protocol_result(run_dir, 4, name)["n_patients"] == 8


def test_smallest_dataset_check_data_accepts_trains_samples_and_scores(tmp_path, capsys):
    layout = {"train/pos": ("mpos", 1, 2, True), "train/neg_mixed": ("mneg", 1, 2, False),
              "train/neg": ("hea", 2, 4, False)}  # batch 4: 4 mixed slices, 4 healthy left after one held out
    root = write_dataset(str(tmp_path / "data"), layout)
    too_small = write_dataset(str(tmp_path / "too_small"), {**layout, "train/neg": ("hea", 2, 3, False)})
    assert main.main(["--mode", "check_data", "--image_dir", too_small, "--batch_size", "4"]) == 2
    err = capsys.readouterr().err
    assert (f"only 3 of the 6 slices in {os.path.join(too_small, 'train/neg')} are trained on (1 patient(s) held "
            f"out by --healthy_holdout 0.2) for a batch of 4") in err and "--healthy_holdout." in err
    assert main.main(["--mode", "check_data", "--image_dir", root, "--batch_size", "4"]) == 0
    run_dir = str(tmp_path / "run")
    assert main.main(train_args(root, run_dir, "--num_iters", "2", "--sample_step", "2")) == 0
    assert read_png(f"{run_dir}/samples/2-images.png").shape == (3, 4 * 32, 6 * 32)
    assert main.main(stage2_args(root, run_dir, "--refiner_iters", "2")) == 0
    assert main.main(protocol_args("test_transductive", root, run_dir, "--test_iters", "2")) == 0
    transductive = protocol_result(run_dir, 2, "transductive")
    assert transductive["n_patients"] == 2 and transductive["n_slices"] == 4
    assert read_json(f"{run_dir}/results/2/coarse/aucp.json")["n_patients"] == 3  # 1 held out + 2 mixed
