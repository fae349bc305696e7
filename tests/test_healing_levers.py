"""The stage-1 levers of the healing-speed recipe: a critic warm-up that leaves G where it started, a rising identity
weight, and the lazy gradient penalty with its k x weight; by hand on one step, and scheduled by the training loop."""
import copy
import os

import torch
from conftest import TINY_FLAGS
from test_method_contracts import assert_sgd_step_along, healthy_and_mixed, stage1_networks

import main
from brainomaly import seeds
from brainomaly.run import checkpoint as ckpt
from brainomaly.run.networks import build_stage1
from brainomaly.train import stage1_gan
from brainomaly.train.stage1_gan import Stage1State, identity_weight, train_step
from model import healthy_reconstruction
from solver import Runtime


def test_identity_weight_rises_linearly_from_its_start_to_lambda_id():
    c = main.parse_config(["--lambda_id", "10", "--lambda_id_start", "1", "--lambda_id_ramp", "100"])
    assert [identity_weight(c, i) for i in (0, 50, 100, 250)] == [1.0, 5.5, 10.0, 10.0]
    flat = main.parse_config(["--lambda_id", "10", "--lambda_id_start", "1"])  # no ramp: --lambda_id throughout
    assert identity_weight(flat, 0) == 10.0


def test_generator_step_follows_the_identity_weight_it_is_given(one_thread):
    runtime, config, generator, critic = stage1_networks("--lambda_id", "10")
    x_healthy, x_mixed = healthy_and_mixed()
    alpha = torch.rand(8, 1, 1, 1, generator=torch.Generator().manual_seed(1))
    before = copy.deepcopy(generator)
    lr = 0.01
    g_optimizer = torch.optim.SGD(generator.parameters(), lr=lr)
    d_optimizer = torch.optim.SGD(critic.parameters(), lr=lr)
    state = Stage1State(generator=generator, critic=critic, g_optimizer=g_optimizer, d_optimizer=d_optimizer)
    losses = train_step(runtime, config, state, x_mixed, x_healthy, alpha, update_generator=True, lambda_id=3.0)
    # by hand: G's loss with weight 3 (not --lambda_id 10), against the critic as its own step left it
    adversarial = -critic(healthy_reconstruction(x_mixed, before(x_mixed))).mean()
    identity = (healthy_reconstruction(x_healthy, before(x_healthy)) - x_healthy).abs().mean()
    torch.testing.assert_close(losses["G/loss"], (adversarial + 3.0 * identity).detach(), rtol=1e-5, atol=1e-6)
    assert_sgd_step_along(adversarial + 3.0 * identity, before, generator, lr)


def test_a_step_without_the_penalty_follows_the_wasserstein_terms_alone(one_thread):
    runtime, config, generator, critic = stage1_networks()
    x_healthy, x_mixed = healthy_and_mixed()
    alpha = torch.rand(8, 1, 1, 1, generator=torch.Generator().manual_seed(1))
    before = copy.deepcopy(critic)
    lr = 0.01
    d_optimizer = torch.optim.SGD(critic.parameters(), lr=lr)
    losses = train_step(runtime, config, Stage1State(generator=generator, critic=critic, d_optimizer=d_optimizer),
                        x_mixed, x_healthy, alpha, update_generator=False, gp_weight=0.0)
    assert "D/loss_gp" not in losses
    with torch.no_grad():
        fake = healthy_reconstruction(x_mixed, generator(x_mixed))
    expected = -before(x_healthy).mean() + before(fake).mean()
    torch.testing.assert_close(losses["D/loss"], expected, rtol=1e-5, atol=1e-6)
    assert_sgd_step_along(expected, before, critic, lr)


def train(toy_dataset, run_dir, *flags):
    assert main.main(["--mode", "train", "--image_dir", toy_dataset, "--run_dir", run_dir, *TINY_FLAGS,
                      "--g_ema", "0", *flags]) == 0


def test_the_loop_schedules_the_warmup_the_ramp_and_the_lazy_penalty(toy_dataset, tmp_path, monkeypatch, one_thread):
    calls, penalties = [], []
    real_step, real_penalty = stage1_gan.train_step, stage1_gan.gradient_penalty

    def recording_step(*args, **kwargs):
        calls.append((kwargs["update_generator"], kwargs["lambda_id"], kwargs["gp_weight"]))
        return real_step(*args, **kwargs)

    def counted_penalty(*args):
        penalties.append(len(calls) - 1)  # the iteration it is computed in
        return real_penalty(*args)

    monkeypatch.setattr(stage1_gan, "train_step", recording_step)
    monkeypatch.setattr(stage1_gan, "gradient_penalty", counted_penalty)
    train(toy_dataset, str(tmp_path / "run"), "--num_iters", "12", "--model_save_step", "12", "--sample_step", "12",
          "--d_warmup", "5", "--n_critic", "2", "--gp_every", "3", "--lambda_gp", "10",
          "--lambda_id", "10", "--lambda_id_start", "2", "--lambda_id_ramp", "8")
    updates, lambda_ids, gp_weights = zip(*calls)
    # G first moves 2 critic steps after the 5 critic-only iterations, then every 2nd
    assert [i for i, update in enumerate(updates) if update] == [6, 8, 10]
    assert list(lambda_ids) == [2 + 8 * min(1, i / 8) for i in range(12)]
    # the penalty on every 3rd critic step, weighted 3 x 10 so that its mean weight per step stays 10
    assert list(gp_weights) == [30.0 if i % 3 == 0 else 0.0 for i in range(12)]
    assert penalties == [0, 3, 6, 9]  # and its double backward is not run in between


def test_a_critic_warmup_leaves_the_generator_where_it_started(toy_dataset, tmp_path, one_thread):
    flags = ["--num_iters", "6", "--model_save_step", "6", "--sample_step", "6", "--map_init", "identity"]
    train(toy_dataset, str(tmp_path / "warmup"), *flags, "--d_warmup", "6")
    train(toy_dataset, str(tmp_path / "plain"), *flags)
    config = main.parse_config([*TINY_FLAGS, *flags])
    seeds.seed_weights(config.seed)  # as stage 1 builds its networks
    initial_g, initial_d = build_stage1(Runtime(config), config)

    def saved(run, part):
        return ckpt.load(ckpt.checkpoint_path(os.path.join(tmp_path, run, "models"), 6, part))

    def same(state, module):
        return all(torch.equal(state[k], v) for k, v in module.state_dict().items())

    assert same(saved("warmup", "G")["state_dict"], initial_g)
    assert same(saved("warmup", "state")["generator"], initial_g)
    assert not same(saved("warmup", "D")["state_dict"], initial_d)  # the critic did train
    assert not same(saved("plain", "G")["state_dict"], initial_g)  # without the warm-up G moves in 6 iterations
