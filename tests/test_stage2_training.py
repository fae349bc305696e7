"""Stage 2's checkpoint pair (save_stage2 then restore_stage2 gives back the exact training state) and its
label-free held-out check."""
import os

import torch
from conftest import TINY_FLAGS

import data_loader
import main
from brainomaly.data import dataset_layout, healthy_split
from brainomaly.run.cache_keys import file_fingerprint
from brainomaly.run.networks import build_refiner, model_path
from brainomaly.train.ema import EMA
from brainomaly.train.stage2_refiner import (
    Stage2State,
    holdout_check,
    refiner_step,
    restore_stage2,
    save_stage2,
    unfinished_refiners,
)
from main import parse_config
from solver import Runtime


def stage2_state(config, runtime, seed):
    """A refiner, its EMA, optimiser, healthy stream and noise generator, trained a few steps from `seed`."""
    torch.manual_seed(seed)
    diffusion = build_refiner(runtime, config)
    ema = EMA(diffusion, config.refiner_ema)
    optimizer = torch.optim.Adam(diffusion.parameters(), config.refiner_lr)
    stream = data_loader.training_stream(dataset_layout.require_images(config.image_dir, dataset_layout.HEALTHY_FOLDER),
                                         config.image_size, config.refiner_batch_size, seed, "on")
    noise_generator = torch.Generator().manual_seed(seed)
    generator = lambda x: torch.zeros_like(x)  # noqa: E731  a frozen G whose x_c is tanh(x)
    for _ in range(seed):
        refiner_step(runtime, generator, diffusion, optimizer, next(stream), noise_generator)
        ema.update(diffusion)
    return Stage2State(diffusion=diffusion, ema=ema, optimizer=optimizer, stream=stream,
                       noise_generator=noise_generator, step=7)


def test_stage2_checkpoint_round_trip_restores_weights_ema_optimiser_stream_and_noise(toy_dataset, tmp_path):
    config = parse_config(["--image_dir", toy_dataset, "--run_dir", str(tmp_path / "run"), *TINY_FLAGS])
    runtime = Runtime(config)
    saved = stage2_state(config, runtime, seed=3)
    save_stage2(config, 40, saved)  # a periodic save: the training state only, nothing scoring would load
    assert os.path.isfile(model_path(config, 40, "R-state")) and not os.path.isfile(model_path(config, 40, "R"))
    assert unfinished_refiners(config) == [40]

    restored = stage2_state(config, runtime, seed=1)  # another state, overwritten by the restore
    restored.step = 0
    assert restore_stage2(config, 40, restored) == 7
    (diffusion, ema, optimizer, stream, noise), (diffusion2, ema2, optimizer2, stream2, noise2) = (
        (s.diffusion, s.ema, s.optimizer, s.stream, s.noise_generator) for s in (saved, restored))
    for name, value in diffusion.state_dict().items():
        assert torch.equal(value, diffusion2.state_dict()[name]), name
    for name, value in ema.model.state_dict().items():
        assert torch.equal(value, ema2.model.state_dict()[name]), name
    assert ema2.num_updates == ema.num_updates == 3
    state, state2 = optimizer.state_dict()["state"], optimizer2.state_dict()["state"]
    assert state.keys() == state2.keys() and all(torch.equal(state[k]["exp_avg"], state2[k]["exp_avg"]) for k in state)
    assert torch.equal(next(stream2), next(stream))  # same position in the same shuffled order
    assert torch.equal(torch.randn(4, generator=noise2), torch.randn(4, generator=noise))

    # The final save adds ITER-R: the EMA weights (what scoring loads), naming the stage-1 checkpoint it refines.
    save_stage2(config, 40, saved, final=True)
    assert unfinished_refiners(config) == []
    scoring_checkpoint = torch.load(model_path(config, 40, "R"), weights_only=True)
    assert scoring_checkpoint["refines"] == 40 and scoring_checkpoint["refiner_iteration"] == 7
    for name, value in ema.model.state_dict().items():
        assert torch.equal(scoring_checkpoint["state_dict"][name], value), name


class FixedResidual:
    """A refiner stand-in whose residual is a fixed function of x_c."""

    def __init__(self, residual_of):
        self.residual_of = residual_of

    def sample_residual(self, coarse, steps, noise=None):
        return self.residual_of(coarse)


def test_the_held_out_check_fails_a_refiner_that_erases_the_disease_with_the_gans_residual(toy_dataset, tmp_path):
    config = parse_config(["--image_dir", toy_dataset, "--run_dir", str(tmp_path / "run"), *TINY_FLAGS])
    runtime = Runtime(config)
    generator = lambda x: torch.zeros_like(x)  # noqa: E731  x_c = tanh(x): a residual that tracks the toy disease
    held_out = healthy_split.draw_split(toy_dataset, 0.5, config.seed)[1]
    # Undoing tanh exactly takes every slice's error, healthy or diseased, to zero: the held-out healthy error
    # falls, and the separation from the mixed set goes with it, so the refiner must not be used.
    undo_tanh = FixedResidual(lambda coarse: torch.atanh(coarse) - coarse)
    check = holdout_check(runtime, config, 0, generator, undo_tanh, held_out)
    assert check["held_out_patients"] == 3 and check["refined_error"] < 0.01 * check["coarse_error"]
    assert check["aucp_coarse"] > 0.7 and check["aucp_refined"] < check["aucp_coarse"]  # mixed set: half healthy
    assert not check["refiner_helps"]
    # Removing half of it from every slice lowers the error and keeps the patients' order: it passes.
    half = FixedResidual(lambda coarse: (torch.atanh(coarse) - coarse) / 2)
    check = holdout_check(runtime, config, 0, generator, half, held_out)
    assert check["refined_error"] < 0.6 * check["coarse_error"]
    assert check["aucp_refined"] == check["aucp_coarse"] and check["refiner_helps"]


def test_a_refiner_whose_generator_was_trained_again_is_not_used(toy_dataset, tmp_path, capsys):
    """ITER-R.ckpt refines the ITER-G.ckpt it was trained on: after G is replaced (trained again), --refiner auto
    scores without it and says so, --refiner on refuses; a refiner saved before refiners recorded their G is used
    as before, with a note."""
    run_dir = str(tmp_path / "run")
    models = f"{run_dir}/models"
    base = ["--image_dir", toy_dataset, "--run_dir", run_dir, *TINY_FLAGS]
    assert main.main(["--mode", "train", *base, "--num_iters", "2", "--model_save_step", "2"]) == 0
    assert main.main(["--mode", "train_refiner", *base, "--refine_from", "2", "--refiner_iters", "2"]) == 0
    test = ["--mode", "test_inductive", *base, "--test_iters", "2"]
    g_path, r_path = f"{models}/2-G.ckpt", f"{models}/2-R.ckpt"
    refiner = torch.load(r_path, weights_only=True)
    assert refiner["refines_weights"] == file_fingerprint(g_path)
    assert torch.load(f"{models}/2-R-state.ckpt", weights_only=True)["refines_weights"] == refiner["refines_weights"]

    generator = torch.load(g_path, weights_only=True)  # G trained again: other weights in the same file
    for value in generator["state_dict"].values():
        if value.is_floating_point():
            value.add_(0.01)
    torch.save(generator, g_path)
    capsys.readouterr()
    assert main.main([*test, "--refiner", "auto"]) == 0
    out = capsys.readouterr().out
    assert (f"WARNING: the refiner {r_path} was trained on another {g_path} than the one there now (the generator "
            f"was trained again since), so --refiner auto scores checkpoint 2 without it") in out
    assert "checkpoint 2 (coarse reconstruction)" in out
    assert main.main([*test, "--refiner", "on"]) == 2
    err = capsys.readouterr().err
    assert f"--refiner on, but the refiner {r_path} was trained on another {g_path}" in err and "Traceback" not in err
    assert main.main(["--mode", "train_refiner", *base, "--refine_from", "2", "--refiner_iters", "2",
                      "--resume_iters", "latest"]) == 2  # nor is its training state continued on the new G
    assert f"{models}/2-R-state.ckpt continues a refiner trained on another {g_path}" in capsys.readouterr().err

    del refiner["refines_weights"]  # a refiner saved before the fingerprint: used as before, with a note
    torch.save(refiner, r_path)
    assert main.main([*test, "--refiner", "on"]) == 0
    out = capsys.readouterr().out
    assert f"note: {r_path} does not record which generator weights it refines" in out
    assert "checkpoint 2 (refined reconstruction)" in out
