"""The intensity-corrected score (--refiner calibrate) and the healing control (--map_init identity)."""
import json

import numpy as np
import pytest
import torch
from conftest import TINY_FLAGS
from test_protocols import read_csv
from test_stage2_training import FixedResidual

from brainomaly import decisions, metrics
from brainomaly.data import dataset_layout, healthy_split, slice_files
from brainomaly.evaluate import checkpoint_selection, intensity_correction, protocols, scoring
from brainomaly.run import checkpoint as ckpt
from brainomaly.run.networks import build_stage1, load_generator, model_path, saved_config
from brainomaly.train.stage2_refiner import holdout_check
from main import parse_config
from model import healthy_reconstruction
from solver import Runtime


def brains(rng, n, diseased, size=24):
    """n slices in [-1, 1]: a head of smooth tissue, a dark CSF disk (larger when diseased) and black background."""
    yy, xx = np.mgrid[:size, :size] - size / 2
    radius = np.hypot(yy, xx)
    images = []
    for _ in range(n):
        tissue = 0.2 + 0.5 * (xx / size + 0.5) + rng.normal(0, 0.05, (size, size))
        image = np.where(radius < size * 0.45, tissue, -1.0)
        csf = -0.8 + rng.normal(0, 0.05, (size, size))
        image = np.where(radius < size * (0.22 if diseased else 0.1), csf, image)
        images.append(image)
    return torch.tensor(np.stack(images)[:, None], dtype=torch.float32)


def patient_level_auc(x, reconstruction, labels):
    """AUC of the head score of |x - reconstruction| / 2 (one slice per patient)."""
    scores = scoring.map_and_scores(x, reconstruction, "head")[1]
    return metrics.patient_auc([f"p{i}" for i in range(len(labels))], scores, labels)


def fitted_on(x, reconstruction):
    pairs = intensity_correction.BinnedPairs()
    pairs.add(x, reconstruction)
    return pairs.fit()


def test_calibrate_removes_a_per_intensity_error_and_keeps_a_spatial_change():
    rng = np.random.default_rng(0)
    healthy_train, healthy, diseased = brains(rng, 20, False), brains(rng, 20, False), brains(rng, 20, True)
    x = torch.cat([healthy, diseased])
    labels = [0] * 20 + [1] * 20
    generator = torch.Generator().manual_seed(0)

    # A reconstruction that only gets intensities wrong, dark ones most (CSF comes out lighter), plus the same
    # pixel noise on every slice: the more CSF a slice has, the larger its error, so the coarse score tells
    # diseased from healthy without having healed anything.
    def distort(images):
        return images + 0.1 * (1 - images) + 0.005 * torch.randn(images.shape, generator=generator)
    assert patient_level_auc(x, distort(x), labels) == 1.0
    correction = fitted_on(healthy_train, distort(healthy_train))
    assert abs(patient_level_auc(x, correction(distort(x)), labels) - 0.5) <= 0.2

    # A reconstruction that heals: every slice comes back with the healthy CSF disk (a spatial change on the
    # diseased ones), with the same intensity error. The correction keeps that difference.
    healed = torch.cat([healthy, brains(np.random.default_rng(1), 20, False)])
    healed = torch.where(x > -1, healed, x)  # same head
    assert patient_level_auc(x, correction(distort(healed)), labels) >= 0.9

    # f is non-decreasing and undoes the distortion inside the head's range to within a bin
    assert bool((correction.values[1:] >= correction.values[:-1]).all())
    inside = healthy_train[healthy_train > metrics.HEAD_LEVEL]
    assert (correction(distort(inside)) - inside).abs().mean() < 2 / intensity_correction.BINS


def test_the_correction_is_fitted_on_the_known_healthy_slices_stage1_trained_on(toy_dataset, tmp_path):
    config = parse_config(["--image_dir", toy_dataset, "--run_dir", str(tmp_path / "run"), *TINY_FLAGS,
                           "--healthy_holdout", "0.5", "--map_init", "default"])
    runtime = Runtime(config)
    torch.manual_seed(0)
    generator = build_stage1(runtime, config)[0]
    ckpt.atomic_save({"state_dict": generator.state_dict(), "config": saved_config(config)},
                     model_path(config, 10, "G"))
    generator, config, trained_with = load_generator(runtime, config, 10)
    trained_on, held_out = healthy_split.run_split(toy_dataset, trained_with)
    assert len(held_out) == 9 and len(trained_on) == 9  # 3 of the 6 known-healthy patients held out

    def by_hand(paths):
        x = torch.stack([slice_files.load_slice(p, config.image_size) for p in paths])
        with torch.no_grad():
            return fitted_on(x, healthy_reconstruction(x, generator(x)))

    correction = intensity_correction.for_checkpoint(runtime, config, 10, generator, trained_with)
    expected, everything = by_hand(trained_on), by_hand(trained_on + held_out)
    grid = torch.linspace(-1, 1, 2001)
    assert (correction(grid) - expected(grid)).abs().max() < 1e-4
    assert (everything(grid) - expected(grid)).abs().max() > 1e-3  # the held-out slices would change f
    # saved beside the checkpoint and read back, not fitted again
    saved = json.load(open(intensity_correction.correction_path(config.model_save_dir, 10)))
    assert saved["values"] == pytest.approx(correction.values.tolist())
    saved["values"] = [0.0] * len(saved["values"])
    json.dump(saved, open(intensity_correction.correction_path(config.model_save_dir, 10), "w"))
    again = intensity_correction.for_checkpoint(runtime, config, 10, generator, trained_with)
    assert float(again.values.abs().max()) == 0.0


def test_calibrate_scores_with_the_corrected_reconstruction_and_reports_it_beside(toy_dataset, tmp_path):
    run_dir = str(tmp_path / "run")
    flags = ["--image_dir", toy_dataset, "--run_dir", run_dir, *TINY_FLAGS, "--map_init", "default"]
    config = parse_config([*flags, "--refiner", "off"])
    runtime = Runtime(config)
    torch.manual_seed(3)
    generator = build_stage1(runtime, config)[0]
    ckpt.atomic_save({"state_dict": generator.state_dict(), "config": saved_config(config)},
                     model_path(config, 10, "G"))
    coarse = protocols.run_protocol(runtime, config, "inductive", 10)
    calibrated = protocols.run_protocol(runtime, parse_config([*flags, "--refiner", "calibrate"]), "inductive", 10)
    assert coarse["reconstruction"] == "coarse" and calibrated["reconstruction"] == "calibrated"
    assert calibrated["auc"] == coarse["auc_by_reconstruction"]["calibrated"]
    assert coarse["auc"] == calibrated["auc_by_reconstruction"]["coarse"]
    assert json.load(open(f"{run_dir}/results/10/calibrated/inductive.json"))["auc"] == calibrated["auc"]
    # a patient's score by hand: the mean over its slices of |x - f(x_c)| / 2 inside the head
    row = read_csv(f"{run_dir}/results/10/calibrated/inductive.csv")[0]
    paths = [p for p in dataset_layout.protocol_slices(toy_dataset, "inductive")[0]
             if dataset_layout.patient_id(p) == row["pid"]]
    x = torch.stack([slice_files.load_slice(p, config.image_size) for p in paths])
    correction = intensity_correction.for_checkpoint(runtime, config, 10, generator, saved_config(config))
    with torch.no_grad():
        corrected = correction(healthy_reconstruction(x, generator(x)))
    head = x[:, 0] > metrics.HEAD_LEVEL
    by_hand = np.mean([float(((x - corrected).abs()[k, 0] / 2)[head[k]].mean()) for k in range(len(paths))])
    assert float(row["score"]) == pytest.approx(by_hand, rel=1e-5)
    coarse_row = read_csv(f"{run_dir}/results/10/coarse/inductive.csv")[0]
    assert float(row["score"]) != pytest.approx(float(coarse_row["score"]), rel=1e-3)


def recorded_aucp(iteration, coarse, calibrated, pids=("h1", "h2", "m1", "m2")):
    return {"checkpoint": iteration, "patient_scores": {"pid": list(pids), "label": [0, 0, 1, 1],
                                                        "coarse": coarse, "calibrated": calibrated}}


def test_the_aucp_sweep_offers_the_pick_both_the_coarse_and_the_calibrated_score_of_every_checkpoint():
    results = [recorded_aucp(200, [1, 2, 3, 4], [1, 3, 2, 4]), recorded_aucp(400, [1, 3, 2, 4], [1, 2, 3, 4])]
    candidates = checkpoint_selection.sweep_candidates(results, seed=0)
    assert [(c.iteration, c.reconstruction, c.aucp) for c in candidates] == [
        (200, "coarse", 1.0), (200, "calibrated", 0.75), (400, "coarse", 0.75), (400, "calibrated", 1.0)]
    assert decisions.pick(candidates, "max").reconstruction == "coarse"  # the tie goes to the earlier checkpoint
    assert decisions.pick(candidates, "last").reconstruction == "calibrated"
    with pytest.raises(ValueError, match="other patients"):
        checkpoint_selection.sweep_candidates(results + [recorded_aucp(600, [1, 2, 3, 4], [1, 2, 3, 4], ("h1", "h9", "m1", "m2"))],
                                   seed=0)


def test_the_refiner_check_bar_is_the_reconstruction_the_pick_chose(toy_dataset, tmp_path):
    config = parse_config(["--image_dir", toy_dataset, "--run_dir", str(tmp_path / "run"), *TINY_FLAGS])
    runtime = Runtime(config)
    generator = lambda x: torch.zeros_like(x)  # noqa: E731  x_c = tanh(x): its error is per intensity alone
    trained_on, held_out = healthy_split.draw_split(toy_dataset, 0.5, config.seed)
    x = torch.stack([slice_files.load_slice(p, config.image_size) for p in trained_on])
    correction = fitted_on(x, torch.tanh(x))
    # Halving x_c's residual passes a coarse bar (test_stage2_training) but not a calibrated one: f(x_c) undoes
    # the whole per-intensity error, so a refiner of a checkpoint picked with f(x_c) must beat that.
    half = FixedResidual(lambda coarse: (torch.atanh(coarse) - coarse) / 2)
    check = holdout_check(runtime, config, 0, generator, half, held_out, correction, bar="calibrated")
    assert check["bar"] == "calibrated" and check["calibrated_error"] < 0.2 * check["coarse_error"]
    assert check["refined_error"] > check["calibrated_error"] and not check["refiner_helps"]
    assert check["fallback"] == "calibrated"  # --refiner auto then scores as the pick chose
    # a pick of x_c keeps x_c as the fallback, and the refiner must still beat f(x_c)'s error
    coarse_pick = holdout_check(runtime, config, 0, generator, half, held_out, correction, bar="coarse")
    assert coarse_pick["refined_error"] < coarse_pick["coarse_error"] and not coarse_pick["refiner_helps"]
    assert coarse_pick["fallback"] == "coarse"
    # a checkpoint no sweep picked: the bar is whichever reconstruction without the refiner separates best
    unpicked = holdout_check(runtime, config, 0, generator, half, held_out, correction)
    assert unpicked["bar"] == ("calibrated" if unpicked["aucp_calibrated"] > unpicked["aucp_coarse"] else "coarse")


def test_identity_map_init_reconstructs_the_input_at_iteration_zero(toy_dataset, tmp_path):
    config = parse_config(["--image_dir", toy_dataset, "--run_dir", str(tmp_path / "run"), *TINY_FLAGS,
                           "--map_init", "identity"])
    runtime = Runtime(config)
    generator = build_stage1(runtime, config)[0]
    paths = dataset_layout.protocol_slices(toy_dataset, "aucp")[0]
    x = torch.stack([slice_files.load_slice(p, config.image_size) for p in paths])
    assert bool((x == -1).any())  # the black background, where atanh is infinite, is covered
    with torch.no_grad():
        assert (healthy_reconstruction(x, generator(x)) - x).abs().max() < 1e-5
    # a saved checkpoint is rebuilt with the same head: scoring sees x_c = x too
    ckpt.atomic_save({"state_dict": generator.state_dict(), "config": saved_config(config)},
                     model_path(config, 0, "G"))
    loaded = load_generator(runtime, parse_config(["--image_dir", toy_dataset, "--run_dir", str(tmp_path / "run"),
                                                   *TINY_FLAGS]), 0)[0]
    with torch.no_grad():
        assert (healthy_reconstruction(x, loaded(x)) - x).abs().max() < 1e-5
        zero = build_stage1(runtime, parse_config(["--image_dir", toy_dataset, *TINY_FLAGS]))[0]
        assert (healthy_reconstruction(x, zero(x)) - x).abs().max() > 0.05  # tanh(x): not the identity
