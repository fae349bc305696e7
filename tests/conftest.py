"""Shared fixtures: a toy dataset in the reference layout, and tiny training flags."""
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from brainomaly.data.dataset_layout import slice_filename
from brainomaly.data.slice_files import save_slice_png  # noqa: E402

# One thread for torch in the test process and in every process it starts (they inherit OMP_NUM_THREADS): the tiny
# networks gain nothing from a second thread, and two threads stall each other on a busy 2-core CPU (a 2-thread run
# there took several times as long). An OMP_NUM_THREADS set from outside wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# Tiny networks so a whole train/test cycle takes seconds on a 2-core CPU.
TINY_FLAGS = ["--image_size", "32", "--g_conv_dim", "8", "--d_conv_dim", "8", "--g_repeat_num", "1",
              "--d_repeat_num", "3", "--batch_size", "4", "--num_workers", "0", "--use_tensorboard", "false",
              "--refiner_dim", "8", "--refiner_dim_mults", "1,2", "--refiner_attn_levels", "1", "--refiner_heads", "2",
              "--refiner_batch_size", "4", "--score_batch_size", "8", "--ddim_steps", "2",
              # fp32 NCHW fixed: --bf16/--channels_last auto time a probe, whose pick would follow the machine's
              # load and make runs differ in rounding; tests/test_fast_path.py tests auto itself
              "--bf16", "off", "--channels_last", "off"]

# folder -> (patient prefix, number of patients, diseased?)
TOY_LAYOUT = {"train/pos": ("mpos", 4, True), "train/neg_mixed": ("mneg", 4, False), "train/neg": ("hea", 6, False),
              "test/pos": ("tpos", 3, True), "test/neg": ("tneg", 3, False)}
SLICES_PER_PATIENT = 3


def toy_slice(rng, diseased, size=40):
    """A bright disk 'brain' with a dark 'ventricle'; disease enlarges the dark part."""
    yy, xx = np.mgrid[:size, :size] - size / 2
    radius = np.hypot(yy, xx)
    image = np.where(radius < size * 0.4, 0.7, 0.0)
    image = np.where(radius < size * (0.16 if diseased else 0.07), 0.15, image)
    return np.clip(image + rng.normal(0, 0.03, image.shape), 0, 1)


def write_toy_dataset(root, seed=0):
    rng = np.random.default_rng(seed)
    for folder, (prefix, n_patients, diseased) in TOY_LAYOUT.items():
        for p in range(n_patients):
            for s in range(SLICES_PER_PATIENT):
                save_slice_png(toy_slice(rng, diseased), os.path.join(root, folder, slice_filename(f"{prefix}{p}", s)))
    return root


@pytest.fixture
def toy_dataset(tmp_path):
    return write_toy_dataset(str(tmp_path / "data" / "Toy"))


@pytest.fixture
def one_thread():
    """Tiny networks run fastest on one thread (two fight over a loaded 2-core CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
