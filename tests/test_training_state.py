"""The training state objects: a stage's state saved, loaded into fresh objects (other weights, other random
streams) and stepped once more gives what the run would have given without the interruption."""
import torch
from conftest import TINY_FLAGS

import data_loader
import main
from brainomaly import seeds
from brainomaly.data import dataset_layout
from brainomaly.run.checkpoint import load
from brainomaly.run.networks import build_refiner, build_stage1, model_path
from brainomaly.train.ema import EMA
from brainomaly.train.stage1_gan import Stage1State, restore_stage1, save_stage1, train_step
from brainomaly.train.stage2_refiner import Stage2State, refiner_step, restore_stage2, save_stage2
from brainomaly.train.training_loop import adam
from solver import Runtime


def stage1_state(config, runtime, weight_seed):
    """A fresh stage-1 state whose weights come from weight_seed and whose streams and noise from the run's seed."""
    torch.manual_seed(weight_seed)
    generator, critic = build_stage1(runtime, config)
    streams = [data_loader.training_stream(paths, config.image_size, config.batch_size, seeds.seed(config.seed, name),
                                           "on")
               for paths, name in ((dataset_layout.mixed_set_paths(config.image_dir), "mixed_set"),
                                   (dataset_layout.require_images(config.image_dir, dataset_layout.HEALTHY_FOLDER),
                                    "healthy_set"))]
    return Stage1State(generator=generator, critic=critic, g_ema=EMA(generator, 0.9),
                       g_optimizer=adam(generator.parameters(), 1e-3, (0.5, 0.999), config, runtime.device),
                       d_optimizer=adam(critic.parameters(), 1e-3, (0.5, 0.999), config, runtime.device),
                       streams=streams, noise_generator=torch.Generator().manual_seed(seeds.seed(config.seed, "gradient_penalty")))


def stage1_iteration(runtime, config, state):
    """One iteration as the training loop runs it: batches and alpha from the state's streams, G every 2nd."""
    mixed, healthy = state.streams
    alpha = torch.rand(config.batch_size, 1, 1, 1, generator=state.noise_generator)
    update = state.iteration % 2 == 1
    train_step(runtime, config, state, next(mixed), next(healthy), alpha, update_generator=update)
    if update:
        state.g_ema.update(state.generator)
    state.iteration += 1


def assert_same_weights(a, b):
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-6, msg=name)


def test_stage1_state_saved_and_loaded_into_fresh_objects_continues_as_the_uninterrupted_run(toy_dataset, tmp_path,
                                                                                             one_thread):
    config = main.parse_config(["--image_dir", toy_dataset, "--run_dir", str(tmp_path / "run"), *TINY_FLAGS])
    runtime = Runtime(config)
    running = stage1_state(config, runtime, weight_seed=0)
    for _ in range(3):
        stage1_iteration(runtime, config, running)
    save_stage1(config, running)
    assert load(model_path(config, 3, "state"))["iteration"] == 3

    fresh = stage1_state(config, runtime, weight_seed=1)  # other weights, streams at their start
    restore_stage1(config, fresh, 3, load(model_path(config, 3, "G")))
    assert fresh.iteration == 3
    assert_same_weights(fresh.g_ema.model, running.g_ema.model)
    for state in (running, fresh):  # the uninterrupted run and the resumed one: iteration 4, a G step
        stage1_iteration(runtime, config, state)
    for part in ("generator", "critic"):
        assert_same_weights(getattr(fresh, part), getattr(running, part))
    assert_same_weights(fresh.g_ema.model, running.g_ema.model)
    assert fresh.g_ema.num_updates == running.g_ema.num_updates == 2


def stage2_state(config, runtime, weight_seed):
    torch.manual_seed(weight_seed)
    diffusion = build_refiner(runtime, config)
    stream = data_loader.training_stream(dataset_layout.require_images(config.image_dir, dataset_layout.HEALTHY_FOLDER),
                                         config.image_size, config.refiner_batch_size, 5, "on")
    return Stage2State(diffusion=diffusion, ema=EMA(diffusion, 0.9),
                       optimizer=torch.optim.Adam(diffusion.parameters(), 1e-3), stream=stream,
                       noise_generator=torch.Generator().manual_seed(7))


def stage2_iteration(runtime, state):
    frozen_generator = lambda x: torch.zeros_like(x)  # noqa: E731  x_c = tanh(x)
    refiner_step(runtime, frozen_generator, state.diffusion, state.optimizer, next(state.stream),
                 state.noise_generator)
    state.ema.update(state.diffusion)
    state.step += 1


def test_stage2_state_saved_and_loaded_into_fresh_objects_continues_as_the_uninterrupted_run(toy_dataset, tmp_path,
                                                                                             one_thread):
    config = main.parse_config(["--image_dir", toy_dataset, "--run_dir", str(tmp_path / "run"), *TINY_FLAGS])
    runtime = Runtime(config)
    running = stage2_state(config, runtime, weight_seed=0)
    for _ in range(3):
        stage2_iteration(runtime, running)
    save_stage2(config, 10, running)

    fresh = stage2_state(config, runtime, weight_seed=1)
    assert restore_stage2(config, 10, fresh) == 3 == fresh.step
    for state in (running, fresh):
        stage2_iteration(runtime, state)
    assert_same_weights(fresh.diffusion, running.diffusion)
    assert_same_weights(fresh.ema.model, running.ema.model)
    assert torch.equal(next(fresh.stream), next(running.stream))
