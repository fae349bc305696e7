"""Every speed option computes what the plain path computes: same losses and weights over a few stage-1
iterations (float rounding aside); the deferred non-finite check still stops at the first bad iteration."""
import os

import pytest
import torch
from conftest import TINY_FLAGS

import main
from brainomaly.errors import UserError
from brainomaly.train.fast_path_selection import keep_freed_memory
from brainomaly.train.training_loop import FiniteCheck

ITERATIONS = 4  # two critic-only and two critic+generator iterations (n_critic 2)


def run_stage1(*flags):
    """Losses of every iteration and the final weights of brainomaly/train/stage1_gan.py's train_step on fixed tiny
    batches."""
    from brainomaly.run.networks import build_stage1
    from brainomaly.train.stage1_gan import Stage1State, train_step
    from brainomaly.train.training_loop import adam
    from solver import Solver
    solver = Solver(main.parse_config([*TINY_FLAGS, "--device", "cpu", *flags]))
    c, runtime = solver.config, solver.runtime
    torch.manual_seed(0)
    generator, critic = build_stage1(runtime, c)
    g_opt = adam(generator.parameters(), c.g_lr, (c.beta1, c.beta2), c, runtime.device)
    d_opt = adam(critic.parameters(), c.d_lr, (c.beta1, c.beta2), c, runtime.device)
    g = torch.Generator().manual_seed(1)
    x_mixed, x_healthy = (torch.rand(c.batch_size, 1, c.image_size, c.image_size, generator=g) * 2 - 1
                          for _ in range(2))
    train_g, train_d = runtime.compiled(generator), runtime.compiled(critic)
    losses = []
    for i in range(ITERATIONS):
        alpha = torch.rand(c.batch_size, 1, 1, 1, generator=g)
        state = Stage1State(generator=train_g, critic=train_d, g_optimizer=g_opt, d_optimizer=d_opt)
        step = train_step(runtime, c, state, x_mixed, x_healthy, alpha, update_generator=(i + 1) % 2 == 0)
        losses.append({k: float(v) for k, v in step.items()})
    weights = {**{f"G.{k}": v.detach().clone() for k, v in generator.state_dict().items()},
               **{f"D.{k}": v.detach().clone() for k, v in critic.state_dict().items()}}
    return losses, weights


@pytest.fixture(scope="module")
def plain():
    return run_stage1()


@pytest.mark.parametrize("flags", [
    ["--channels_last", "true"],
    ["--fused_adam", "true"],
    # the inductor backend generates and compiles C++ (minutes on a busy 2-core CPU); aot_eager runs the same
    # graph capture and autograd split, which is what could change the maths or break the double backward
    ["--compile", "true", "--compile_backend", "aot_eager"],
], ids=["channels_last", "fused_adam", "compile_aot_eager"])
def test_speed_option_matches_the_plain_path(plain, flags):
    plain_losses, plain_weights = plain
    losses, weights = run_stage1(*flags)
    assert len(losses) == ITERATIONS and set(losses[-1]) == set(plain_losses[-1])
    for ours, theirs in zip(losses, plain_losses):
        for key in theirs:
            assert ours[key] == pytest.approx(theirs[key], rel=1e-4, abs=1e-5), key
    for name, value in plain_weights.items():
        assert torch.allclose(weights[name], value, rtol=1e-4, atol=1e-6), name


def test_weights_actually_moved(plain):
    # the comparison above would be empty if nothing trained
    from brainomaly.run.networks import build_stage1
    from solver import Solver
    solver = Solver(main.parse_config([*TINY_FLAGS, "--device", "cpu"]))
    torch.manual_seed(0)
    generator, critic = build_stage1(solver.runtime, solver.config)
    _, weights = plain
    assert not torch.equal(weights["D.patch_head.weight"], critic.state_dict()["patch_head.weight"])
    assert not torch.equal(weights["G.main.0.weight"], generator.state_dict()["main.0.weight"])


def test_training_with_every_option_saves_the_plain_weights(toy_dataset, tmp_path):
    """The whole loop (preloaded set on the device, deferred check, fused Adam, channels_last) through main."""
    def train(run_dir, *extra):
        args = ["--mode", "train", "--image_dir", toy_dataset, "--run_dir", str(tmp_path / run_dir), *TINY_FLAGS,
                "--preload", "on", "--num_iters", "4", "--log_step", "3", *extra]
        assert main.main(args) == 0
        return torch.load(tmp_path / run_dir / "models" / "4-G.ckpt", weights_only=True)["state_dict"]
    plain_g = train("plain")
    fast_g = train("fast", "--preload_on_device", "true", "--deferred_finite_check", "true",
                   "--fused_adam", "true", "--channels_last", "true")
    for name, value in plain_g.items():
        assert torch.allclose(fast_g[name], value, rtol=1e-4, atol=1e-6), name


def test_deferred_check_stops_naming_the_first_bad_iteration_and_keeps_the_last_good_checkpoint(
        toy_dataset, tmp_path, capsys):
    run_dir = str(tmp_path / "run")
    base = ["--mode", "train", "--image_dir", toy_dataset, "--run_dir", run_dir, *TINY_FLAGS, "--preload", "on",
            "--deferred_finite_check", "true", "--log_step", "100"]
    assert main.main([*base, "--num_iters", "2"]) == 0
    good = torch.load(f"{run_dir}/models/2-G.ckpt", weights_only=True)["state_dict"]
    # NaN from iteration 3 on; the check is read only before the save at iteration 6
    assert main.main([*base, "--num_iters", "6", "--resume_iters", "latest", "--lambda_gp", "nan"]) == 2
    err = capsys.readouterr().err
    assert "non-finite loss at iteration 3" in err and "last good checkpoint is 2" in err
    assert sorted(os.listdir(f"{run_dir}/models")) == ["2-D.ckpt", "2-G.ckpt", "2-state.ckpt", "config.json"]
    saved = torch.load(f"{run_dir}/models/2-G.ckpt", weights_only=True)["state_dict"]
    assert all(torch.equal(good[k], v) for k, v in saved.items())


def failure(iteration, losses):
    return UserError(f"bad at {iteration}: {losses}")


def test_finite_check_deferred_reads_only_when_asked_and_names_the_first_bad_iteration():
    check = FiniteCheck(True, failure)
    for i in range(1, 6):
        bad = i in (3, 5)
        check.add(i, {"D": torch.tensor(float("nan") if bad else 1.0), "G": None if i % 2 else torch.tensor(2.0)})
    assert len(check.pending) == 5  # nothing looked at yet
    with pytest.raises(UserError, match="bad at 3: {'D': nan}"):
        check.check()
    check.add(6, {"D": torch.tensor(1.0), "G": torch.tensor(float("inf"))})
    with pytest.raises(UserError, match="bad at 6"):
        check.check()
    check.check()  # nothing pending: no error


def test_finite_check_eager_raises_at_once():
    check = FiniteCheck(False, failure)
    check.add(1, {"R": torch.tensor(0.5)})
    with pytest.raises(UserError, match="bad at 2"):
        check.add(2, {"R": torch.tensor(float("-inf"))})


def test_keep_freed_memory_applies_on_linux_glibc():
    import platform
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert keep_freed_memory() is True
