"""The method's formulas, each checked against numbers worked out by hand: the WGAN-GP critic loss and the unit
gradient norm it enforces, the DDIM sampler's bound on its clean-residual estimate, the EMA update (decay warm-up
included) and the EMA generator a checkpoint holds, and the AUCp checkpoint choice. Tiny sizes, CPU, seconds."""
import copy
import math

import pytest
import torch
import torch.nn as nn
from conftest import TINY_FLAGS

import main
from brainomaly.run.networks import build_stage1
from brainomaly.train.ema import EMA
from brainomaly.train.stage1_gan import Stage1State, train_step
from diffusion_refiner import ResidualDiffusion, cosine_beta_schedule
from model import healthy_reconstruction
from solver import Runtime

CRITIC_FLAGS = ["--image_size", "16", "--g_conv_dim", "4", "--d_conv_dim", "4", "--g_repeat_num", "1",
                "--d_repeat_num", "2", "--batch_size", "8", "--device", "cpu", "--lambda_gp", "10"]


def stage1_networks(*flags):
    torch.manual_seed(0)
    config = main.parse_config([*CRITIC_FLAGS, *flags])
    runtime = Runtime(config)
    generator, critic = build_stage1(runtime, config)
    return runtime, config, generator, critic


def healthy_and_mixed(n=8, size=16):
    """Two batches a critic can tell apart: healthy in [-1, 1], mixed in [-1, 0]."""
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 1, size, size, generator=g) * 2 - 1, -torch.rand(n, 1, size, size, generator=g)


def assert_sgd_step_along(loss, before, stepped, lr):
    """Every parameter of `stepped` is its value in `before` minus lr x d loss / d parameter: a plain SGD step on
    `loss`, computed on `before`."""
    gradients = torch.autograd.grad(loss, list(before.parameters()))
    for (name, after), old, gradient in zip(stepped.named_parameters(), before.parameters(), gradients):
        torch.testing.assert_close(after, old - lr * gradient, rtol=1e-4, atol=1e-6, msg=name)


def interpolate_gradient_norms(critic, real, fake, alpha):
    """||d critic(x~) / d x~||_2 per sample on x~ = alpha*real + (1-alpha)*fake, by autograd."""
    mixed = (alpha * real + (1 - alpha) * fake).requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(mixed).sum(), mixed, create_graph=True)
    return grad.flatten(1).norm(dim=1)


# ------------------------------------------------------------------------------------------------------------
# WGAN-GP critic
# ------------------------------------------------------------------------------------------------------------

def test_critic_loss_is_real_plus_fake_plus_lambda_times_penalty_and_its_gradient_is_what_steps(one_thread):
    runtime, config, generator, critic = stage1_networks()
    x_healthy, x_mixed = healthy_and_mixed()
    alpha = torch.rand(8, 1, 1, 1, generator=torch.Generator().manual_seed(1))
    before = copy.deepcopy(critic)
    lr = 0.01
    d_optimizer = torch.optim.SGD(critic.parameters(), lr=lr)  # plain SGD: the step is -lr * gradient

    losses = train_step(runtime, config, Stage1State(generator=generator, critic=critic, d_optimizer=d_optimizer),
                        x_mixed, x_healthy, alpha, update_generator=False)

    # by hand, on the critic as it was before the step
    with torch.no_grad():
        fake = healthy_reconstruction(x_mixed, generator(x_mixed))
    real_term = -before(x_healthy).mean()
    fake_term = before(fake).mean()
    penalty = ((interpolate_gradient_norms(before, x_healthy, fake, alpha) - 1) ** 2).mean()
    expected = real_term + fake_term + 10.0 * penalty
    assert 10.0 * penalty.item() > 1.0  # an untrained critic's norm is far from 1: leaving it out shows
    torch.testing.assert_close(losses["D/loss_real"], real_term, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses["D/loss_fake"], fake_term, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses["D/loss_gp"], penalty, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses["D/loss"], expected, rtol=1e-5, atol=1e-6)
    # the step follows the gradient of that whole loss, penalty included
    assert_sgd_step_along(expected, before, critic, lr)


def test_critic_gradient_norm_on_interpolates_is_pulled_to_one(one_thread):
    # 25 critic steps take the norms from about 0.26 to 0.85-1.09; without the penalty they reach 130-190.
    runtime, config, generator, critic = stage1_networks("--d_lr", "5e-3")
    d_optimizer = torch.optim.Adam(critic.parameters(), config.d_lr, betas=(config.beta1, config.beta2))
    x_healthy, x_mixed = healthy_and_mixed()
    with torch.no_grad():
        fake = healthy_reconstruction(x_mixed, generator(x_mixed))
    probe = torch.rand(8, 1, 1, 1, generator=torch.Generator().manual_seed(9))
    assert interpolate_gradient_norms(critic, x_healthy, fake, probe).max() < 0.5  # untrained: far from 1
    g = torch.Generator().manual_seed(0)
    for _ in range(25):
        train_step(runtime, config, Stage1State(generator=generator, critic=critic, d_optimizer=d_optimizer),
                   x_mixed, x_healthy, torch.rand(8, 1, 1, 1, generator=g), update_generator=False)
    norms = interpolate_gradient_norms(critic, x_healthy, fake, probe).detach()
    assert ((norms > 0.7) & (norms < 1.3)).all(), norms
    assert abs(norms.mean().item() - 1) < 0.15, norms


# ------------------------------------------------------------------------------------------------------------
# DDIM sampler: the clean-residual estimate is bounded at every step
# ------------------------------------------------------------------------------------------------------------

class HugeV(nn.Module):
    """A diverged refiner: v = 1e6 * sign, whatever the input. It records each input r_t with its t."""

    def __init__(self, sign):
        super().__init__()
        self.sign, self.seen = sign, []

    def forward(self, noisy_residual, coarse, t):
        self.seen.append((noisy_residual.clone(), int(t[0])))
        return 1e6 * self.sign.expand_as(noisy_residual)


def signs(shape):
    """+1 and -1 pixels, so the estimate hits both ends of the bound."""
    return torch.where(torch.arange(math.prod(shape)).view(shape) % 2 == 0, 1.0, -1.0)


def test_one_ddim_step_of_a_diverged_network_gives_the_bound_itself():
    # r0_hat = sqrt(abar) r - sqrt(1 - abar) v with v = +-1e6 is far beyond the bound 2 (in image units, so
    # 2 / residual_scale in the diffused units): one step returns r0_hat clamped, i.e. -2 * sign exactly.
    sign = signs((2, 1, 4, 4))
    for scale in (1.0, 0.05):
        diffusion = ResidualDiffusion(HugeV(sign), timesteps=1000)
        diffusion.residual_scale.fill_(scale)
        residual = diffusion.sample_residual(torch.zeros(2, 1, 4, 4), steps=1,
                                             noise=torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0)))
        torch.testing.assert_close(residual, -2.0 * sign, rtol=0, atol=1e-6)


def test_every_ddim_step_moves_towards_the_bounded_clean_estimate():
    # DDIM (eta = 0) by hand, in float64: r0_hat = clamp(sqrt(a) r - sqrt(1-a) v, -B, B) with B = 2 / scale,
    # eps_hat = (r - sqrt(a) r0_hat) / sqrt(1-a), next r = sqrt(a_next) r0_hat + sqrt(1-a_next) eps_hat.
    # With v = 1e6 * sign the bounded estimate is -B * sign at every step; each input the network sees next
    # must be the one built from it (an unbounded estimate would put inputs of size ~1e6 there).
    scale = 0.5
    bound = 2.0 / scale
    sign = signs((1, 1, 4, 4))
    network = HugeV(sign)
    diffusion = ResidualDiffusion(network, timesteps=1000)
    diffusion.residual_scale.fill_(scale)
    noise = torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    residual = diffusion.sample_residual(torch.zeros(1, 1, 4, 4), steps=4, noise=noise)

    abar = torch.cumprod(1 - cosine_beta_schedule(1000), dim=0)
    assert [t for _, t in network.seen] == [999, 666, 333, 0]  # 4 steps spread evenly from T-1 to 0
    torch.testing.assert_close(network.seen[0][0], noise)
    r0_hat = -bound * sign.double()
    for (r, t), (r_next_seen, t_next) in zip(network.seen, network.seen[1:]):
        a, a_next = abar[t], abar[t_next]
        eps_hat = (r.double() - a.sqrt() * r0_hat) / (1 - a).sqrt()
        expected = a_next.sqrt() * r0_hat + (1 - a_next).sqrt() * eps_hat
        torch.testing.assert_close(r_next_seen.double(), expected, rtol=1e-4, atol=1e-4)
        assert r_next_seen.abs().max() < bound + 5 * (1 - a_next).sqrt()
    # the last step lands on the estimate itself (abar_prev = 1), returned in image units
    torch.testing.assert_close(residual, -2.0 * sign, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------------------------
# Exponential moving average of the weights
# ------------------------------------------------------------------------------------------------------------

class Scalar(nn.Module):
    def __init__(self, value):
        super().__init__()
        self.weight = nn.Parameter(torch.tensor([value]))
        self.register_buffer("count", torch.tensor([0.0]))


def set_weight(module, value, count=0.0):
    with torch.no_grad():
        module.weight.fill_(value)
        module.count.fill_(count)


@pytest.mark.parametrize("decay, second", [(0.2, 2.6), (0.999, 3.0)])
def test_ema_update_is_the_hand_formula_with_the_decay_warm_up(decay, second):
    # decay_n = min(decay, (1 + n) / (10 + n)); ema <- decay_n * ema + (1 - decay_n) * weight.
    # update 1: decay_1 = min(decay, 2/11) = 2/11 for both: 2/11 * 0 + 9/11 * 11 = 9.
    # update 2: decay_2 = min(decay, 3/12): 0.2 -> 0.2 * 9 + 0.8 * 1 = 2.6; 0.999 -> 0.25 * 9 + 0.75 * 1 = 3.0.
    model = Scalar(0.0)
    ema = EMA(model, decay)
    set_weight(model, 11.0, count=5.0)
    ema.update(model)
    assert ema.num_updates == 1
    assert ema.model.weight.item() == pytest.approx(9.0, abs=1e-6)
    assert ema.model.count.item() == 5.0  # buffers are copied, not averaged
    set_weight(model, 1.0)
    ema.update(model)
    assert ema.model.weight.item() == pytest.approx(second, abs=1e-6)
    assert model.weight.item() == 1.0  # the trained weights are left alone


def test_saved_generator_is_the_ema_of_the_raw_generator_snapshots(toy_dataset, tmp_path, one_thread):
    # --g_ema 0.2, n_critic 2: G (and its EMA) updates at iterations 2 and 4; every iteration is saved.
    # ITER-state holds the raw G, ITER-G the EMA. By hand (decay_n = min(0.2, (1+n)/(10+n))):
    #   EMA(1) = raw(1) (no update yet: the EMA starts as a copy of G, unchanged by iteration 1's critic step)
    #   EMA(2) = 2/11 raw(1) + 9/11 raw(2),  EMA(3) = EMA(2),  EMA(4) = 0.2 EMA(2) + 0.8 raw(4).
    run_dir = str(tmp_path / "run")
    assert main.main(["--mode", "train", "--image_dir", toy_dataset, "--run_dir", run_dir, *TINY_FLAGS,
                      "--num_iters", "4", "--model_save_step", "1", "--sample_step", "1000", "--g_ema", "0.2"]) == 0
    raw = {i: torch.load(f"{run_dir}/models/{i}-state.ckpt", weights_only=True)["generator"] for i in range(1, 5)}
    saved = {i: torch.load(f"{run_dir}/models/{i}-G.ckpt", weights_only=True) for i in range(1, 5)}
    assert [saved[i]["weights"] for i in range(1, 5)] == ["ema 0.2"] * 4
    names = list(raw[1])
    assert any(not torch.equal(raw[4][k], raw[1][k]) for k in names)  # G did train
    for k in names:
        hand = {1: raw[1][k], 2: 2 / 11 * raw[1][k] + 9 / 11 * raw[2][k]}
        hand[3] = hand[2]
        hand[4] = 0.2 * hand[2] + 0.8 * raw[4][k]
        for i in range(1, 5):
            torch.testing.assert_close(saved[i]["state_dict"][k], hand[i], rtol=1e-5, atol=1e-6,
                                       msg=f"{i}-G.ckpt {k}")
