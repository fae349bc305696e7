"""What the quality machinery promises: the generator EMA is what checkpoints hold, the refiner's held-out
check holds whole patients out, the panels' colour scale is a percentile of the known-healthy maps, and
--refiner_samples averages seeded samples."""
import types

import numpy as np
import pytest
import torch
from conftest import TINY_FLAGS

import data_loader
import main
from brainomaly.data import dataset_layout, healthy_split
from brainomaly.evaluate import scoring


def load(path):
    return torch.load(path, weights_only=True)


def test_checkpoint_holds_the_generator_ema_and_the_state_holds_the_raw_generator(toy_dataset, tmp_path):
    runs = {}
    for decay in ("0.5", "0"):
        run_dir = str(tmp_path / f"run{decay}")
        assert main.main(["--mode", "train", "--image_dir", toy_dataset, "--run_dir", run_dir, *TINY_FLAGS,
                          "--num_iters", "4", "--model_save_step", "4", "--g_ema", decay]) == 0
        runs[decay] = (load(f"{run_dir}/models/4-G.ckpt"), load(f"{run_dir}/models/4-state.ckpt"))
    (ema_g, ema_state), (raw_g, raw_state) = runs["0.5"], runs["0"]
    assert ema_g["weights"] == "ema 0.5" and raw_g["weights"] == "raw"
    assert ema_state["g_ema_updates"] == 2  # G updates every n_critic = 2 iterations
    # same seed, same raw training; only what ITER-G holds differs
    for name, tensor in raw_state["generator"].items():
        assert torch.equal(tensor, ema_state["generator"][name])
        assert torch.equal(tensor, raw_g["state_dict"][name])
    assert any(not torch.equal(ema_g["state_dict"][k], raw_g["state_dict"][k]) for k in raw_g["state_dict"])


def test_hold_out_keeps_whole_patients_apart_and_never_all_of_them():
    paths = [f"/d/train/neg/p{p}__{s:03d}.png" for p in range(10) for s in range(3)]
    kept, held = healthy_split.hold_out_patients(paths, 0.2, seed=1)
    held_ids = {dataset_layout.patient_id(p) for p in held}
    assert len(held_ids) == 2 and len(held) == 6
    assert not held_ids & {dataset_layout.patient_id(p) for p in kept}
    assert sorted(kept + held) == sorted(paths)
    assert healthy_split.hold_out_patients(paths, 0.2, seed=1) == (kept, held)  # seeded
    one_patient = paths[:3]
    assert healthy_split.hold_out_patients(one_patient, 0.2, seed=1) == (one_patient, [])
    assert healthy_split.hold_out_patients(paths, 0.0, seed=1) == (paths, [])


def fake_batch(index, x, anomaly_map):
    return types.SimpleNamespace(index=np.array(index), x=x, anomaly_map=anomaly_map)


def test_map_scale_is_the_99th_percentile_of_healthy_head_pixels_only():
    labels = [0, 1]
    scale = scoring.HealthyMapScale(labels)
    x = torch.full((2, 1, 10, 10), -1.0)
    x[:, :, :, :5] = 0.5  # head: the left half
    maps = torch.zeros(2, 10, 10)
    maps[0, :, :5] = torch.linspace(0.01, 0.5, 50).view(10, 5)  # healthy head pixels: 0.01 ... 0.5
    maps[0, :, 5:] = 0.9  # background of the healthy slice: ignored
    maps[1] = 0.8  # the diseased slice: ignored
    scale(fake_batch([0, 1], x, maps))
    expected = np.percentile(np.linspace(0.01, 0.5, 50), 99, method="inverted_cdf")  # what a histogram gives
    assert abs(scale.scale() - expected) < 2 / scale.bins


def test_refiner_samples_average_seeded_samples():
    class Refiner:
        def sample_residual(self, coarse, steps, noise):
            return noise * 0.1

    config = types.SimpleNamespace(ddim_steps=1)
    runtime = types.SimpleNamespace(autocast=lambda: torch.autocast("cpu", enabled=False))
    x = torch.zeros(2, 1, 4, 4)
    noises = [torch.full_like(x, 1.0), torch.full_like(x, 3.0)]
    coarse, refined = scoring.reconstruct(runtime, config, x, lambda v: torch.zeros_like(v), Refiner(), noises)
    assert torch.allclose(refined, coarse + 0.2)  # mean of 0.1 and 0.3


def test_shift_augmentation_moves_each_slice_on_background(toy_dataset):
    images = torch.full((2, 1, 8, 8), -1.0)
    images[0, 0, 3, 4], images[1, 0, 5, 5] = 1.0, 0.5
    moved = data_loader.shifted(images, [(2, -1), (-3, 2)], 3)
    assert (moved[0, 0] == 1.0).nonzero().tolist() == [[5, 3]]  # 2 rows down, 1 column left
    assert (moved[1, 0] == 0.5).nonzero().tolist() == [[2, 7]]
    assert moved.sum().item() == images.sum().item()  # all else is background (-1), nothing wrapped round
    # the training stream applies it: same slices and flips, moved
    paths = dataset_layout.require_images(toy_dataset, "train/neg")
    plain = data_loader.training_stream(paths, 16, 4, 7, "on")
    shifting = data_loader.training_stream(paths, 16, 4, 7, "on", max_shift=2)
    for _ in range(3):
        a, b = next(plain), next(shifting)
        assert not torch.equal(a, b) and torch.allclose(a.mean(), b.mean(), atol=0.05)
    for bad in ("-0.1", "0.5", "x"):  # a brain moved by half the field of view or more would leave it
        with pytest.raises(SystemExit):
            main.parse_config(["--augment_shift", bad])
