"""Stage 1's stabilisers, each checked against numbers worked out by hand: the cosine and linear learning-rate
decay, the generator EMA's start and warm-up, the R1 penalty, the non-saturating and hinge losses, the critic's
differentiable augmentation (the same transformations for real and generated batches, a gradient through them, the
penalties on the untransformed batches, an exact resume), and, with every flag off, the very bits of the step
before the stabilisers existed. Tiny sizes, CPU, seconds."""
import copy
import glob
import math
import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_FLAGS
from test_method_contracts import Scalar, assert_sgd_step_along, healthy_and_mixed, set_weight, stage1_networks
from torch import nn

import main
from brainomaly import distributed
from brainomaly.run import run_config
from brainomaly.train import diff_augment, stage1_gan
from brainomaly.train.ema import EMA
from brainomaly.train.gan_losses import critic_terms, generator_term, gradient_penalty
from brainomaly.train.stage1_gan import (
    Stage1State,
    penalty_weight,
    r1_weight,
    set_learning_rates,
    train_step,
    update_generator_ema,
)
from model import healthy_reconstruction

STABILISER_FLAGS = ("lr_decay_shape", "g_ema_start", "g_ema_warmup", "r1_gamma", "gan_loss", "diffaug")


def test_every_stabiliser_is_off_by_default_and_kept_by_a_resume():
    c = main.parse_config([])
    assert (c.lr_decay, c.lr_decay_shape, c.g_ema_start, c.g_ema_warmup, c.r1_gamma, c.gan_loss, c.diffaug) == (
        False, "linear", 0, True, 0.0, "wgan", "")
    assert set(STABILISER_FLAGS) <= set(run_config.RUN_FLAGS)
    help_text = main.build_parser().format_help()
    assert all(f"--{flag}" in help_text for flag in STABILISER_FLAGS)
    assert main.parse_config(["--diffaug", "cutout, translation"]).diffaug == "translation,cutout"  # applied order


# ------------------------------------------------------------------------------------------------------------
# Learning-rate decay
# ------------------------------------------------------------------------------------------------------------

def learning_rates(shape, iterations, decay=True):
    # 100 iterations, decay over the last 40 (from iteration 60), the rate changed every 10 iterations
    c = main.parse_config(["--num_iters", "100", "--num_iters_decay", "40", "--lr_update_step", "10",
                           "--lr_decay", str(decay).lower(), "--lr_decay_shape", shape])
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    rates = []
    for i in iterations:
        set_learning_rates(c, [(optimizer, 2e-4)], i)
        rates.append(optimizer.param_groups[0]["lr"])
    return rates


ITERATIONS = [0, 59, 60, 69, 70, 75, 80, 95, 100]


def test_linear_decay_falls_in_a_straight_line_over_the_last_iterations_in_steps():
    # progress p = (iteration rounded down to a multiple of 10 - 60) / 40, clamped to [0, 1]; rate = 2e-4 (1 - p)
    #   0, 59 (50), 60, 69 (60): p = 0;  70, 75 (70): 0.25;  80: 0.5;  95 (90): 0.75;  100: 1
    hand = [2e-4, 2e-4, 2e-4, 2e-4, 1.5e-4, 1.5e-4, 1e-4, 0.5e-4, 0.0]
    assert learning_rates("linear", ITERATIONS) == pytest.approx(hand, rel=1e-12, abs=1e-18)


def test_cosine_decay_is_half_a_cosine_over_the_same_iterations_in_the_same_steps():
    # rate = 2e-4 * 0.5 (1 + cos(pi p)), p as above: cos(pi/4) = 0.70711, cos(pi/2) = 0, cos(3 pi/4) = -0.70711
    hand = [2e-4, 2e-4, 2e-4, 2e-4, 1e-4 * (1 + 0.5 ** 0.5), 1e-4 * (1 + 0.5 ** 0.5), 1e-4,
            1e-4 * (1 - 0.5 ** 0.5), 0.0]
    assert learning_rates("cosine", ITERATIONS) == pytest.approx(hand, rel=1e-12, abs=1e-18)
    assert hand[4] == pytest.approx(1.7071068e-4) and hand[7] == pytest.approx(0.2928932e-4)


def test_without_lr_decay_the_shape_changes_nothing():
    assert learning_rates("cosine", ITERATIONS, decay=False) == [2e-4] * len(ITERATIONS)


# ------------------------------------------------------------------------------------------------------------
# Generator EMA: start and warm-up
# ------------------------------------------------------------------------------------------------------------

def ema_trajectory(flags, decay=0.9, weights=(1.0, 2.0, 3.0, 4.0, 5.0)):
    """(EMA weight, updates counted) after G updates at iterations 0, 1, 2, ... with G's weight 1, 2, 3, ..."""
    c = main.parse_config(flags)
    model = Scalar(0.0)
    ema = EMA(model, decay, warmup=c.g_ema_warmup)
    seen = []
    for i, weight in enumerate(weights):
        set_weight(model, weight, count=10.0 + i)
        update_generator_ema(c, ema, model, i)
        assert ema.model.count.item() == 10.0 + i  # buffers copied throughout
        seen.append((ema.model.weight.item(), ema.num_updates))
    return seen


def test_before_its_start_the_ema_copies_g_and_from_it_averages_with_the_full_decay():
    # --g_ema_start 3, no warm-up, decay 0.9: iterations 0-2 copy G (1, 2, 3; no update counted);
    # iteration 3: 0.9 * 3 + 0.1 * 4 = 3.1; iteration 4: 0.9 * 3.1 + 0.1 * 5 = 3.29
    seen = ema_trajectory(["--g_ema_start", "3", "--g_ema_warmup", "false"])
    assert seen[:3] == [(1.0, 0), (2.0, 0), (3.0, 0)]
    assert [n for _, n in seen[3:]] == [1, 2]
    assert [w for w, _ in seen[3:]] == pytest.approx([3.1, 3.29], abs=1e-6)


def test_with_the_warm_up_on_it_counts_from_the_start():
    # iteration 3 is the first update: decay min(0.9, 2/11) = 2/11 -> 2/11 * 3 + 9/11 * 4 = 42/11;
    # iteration 4: min(0.9, 3/12) = 0.25 -> 0.25 * 42/11 + 0.75 * 5
    seen = ema_trajectory(["--g_ema_start", "3"])
    assert [w for w, _ in seen] == pytest.approx([1, 2, 3, 42 / 11, 0.25 * 42 / 11 + 0.75 * 5], abs=1e-6)


def test_without_the_warm_up_the_first_update_already_uses_the_full_decay():
    # from the initial weight 0: 0.9 * 0 + 0.1 * 1 = 0.1 (the warm-up would take 2/11 * 0 + 9/11 * 1)
    assert ema_trajectory(["--g_ema_warmup", "false"])[0][0] == pytest.approx(0.1, abs=1e-7)
    assert ema_trajectory([])[0][0] == pytest.approx(9 / 11, abs=1e-6)  # the default: as before


def test_the_training_loop_starts_the_ema_at_g_ema_start(toy_dataset, tmp_path, one_thread):
    # n_critic 2: G updates at iterations 1 and 3. --g_ema_start 2: iteration 1 copies, iteration 3 averages.
    #   EMA(1) = raw(1) (no G update yet), EMA(2) = raw(2) (copied), EMA(3) = EMA(2),
    #   EMA(4) = 0.5 raw(2) + 0.5 raw(4) (decay 0.5, no warm-up)
    run_dir = str(tmp_path / "run")
    assert main.main(["--mode", "train", "--image_dir", toy_dataset, "--run_dir", run_dir, *TINY_FLAGS,
                      "--num_iters", "4", "--model_save_step", "1", "--sample_step", "1000", "--g_ema", "0.5",
                      "--g_ema_start", "2", "--g_ema_warmup", "false"]) == 0
    raw = {i: torch.load(f"{run_dir}/models/{i}-state.ckpt", weights_only=True) for i in range(1, 5)}
    saved = {i: torch.load(f"{run_dir}/models/{i}-G.ckpt", weights_only=True)["state_dict"] for i in range(1, 5)}
    assert [raw[i]["g_ema_updates"] for i in range(1, 5)] == [0, 0, 0, 1]
    for k in raw[1]["generator"]:
        r = {i: raw[i]["generator"][k] for i in range(1, 5)}
        hand = {1: r[1], 2: r[2], 3: r[2], 4: 0.5 * r[2] + 0.5 * r[4]}
        for i in range(1, 5):
            torch.testing.assert_close(saved[i][k], hand[i], rtol=1e-6, atol=1e-7, msg=f"{i}-G.ckpt {k}")


# ------------------------------------------------------------------------------------------------------------
# R1 and the adversarial losses
# ------------------------------------------------------------------------------------------------------------

class QuadraticCritic(nn.Module):
    """A critic with a closed-form input gradient: each 4x4 patch's output is the patch's sum of a * x^2 / 2, so
    d (sum of the patches) / dx = a * x and ||grad||^2 = sum of (a * x)^2 per slice."""

    def __init__(self, size=16):
        super().__init__()
        self.a = nn.Parameter(torch.linspace(0.5, 2.0, size * size).view(1, 1, size, size))

    def forward(self, x):
        return F.avg_pool2d(self.a * x * x / 2, 4) * 16


def test_r1_is_gamma_over_two_times_the_mean_squared_input_gradient_on_the_real_batch(one_thread):
    runtime, config, generator, _ = stage1_networks("--r1_gamma", "4", "--lambda_gp", "0")
    critic = QuadraticCritic()
    x_healthy, x_mixed = healthy_and_mixed()
    alpha = torch.rand(8, 1, 1, 1, generator=torch.Generator().manual_seed(1))
    before = copy.deepcopy(critic)
    lr = 0.01
    d_optimizer = torch.optim.SGD(critic.parameters(), lr=lr)
    losses = train_step(runtime, config, Stage1State(generator=generator, critic=critic, d_optimizer=d_optimizer),
                        x_mixed, x_healthy, alpha, update_generator=False)
    with torch.no_grad():
        fake = healthy_reconstruction(x_mixed, generator(x_mixed))
    r1 = ((before.a * x_healthy) ** 2).flatten(1).sum(dim=1).mean()  # by hand: the gradient is a * x on the reals
    expected = -before(x_healthy).mean() + before(fake).mean() + 4 / 2 * r1
    assert "D/loss_gp" not in losses
    torch.testing.assert_close(losses["D/loss_r1"], r1.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses["D/loss"], expected.detach(), rtol=1e-5, atol=1e-6)
    assert_sgd_step_along(expected, before, critic, lr)  # the penalty's gradient with respect to a steps too


def test_r1_beside_wgan_gp_and_its_lazy_schedule(one_thread):
    runtime, config, generator, critic = stage1_networks("--r1_gamma", "2")
    x_healthy, x_mixed = healthy_and_mixed()
    alpha = torch.rand(8, 1, 1, 1, generator=torch.Generator().manual_seed(1))
    before = copy.deepcopy(critic)
    d_optimizer = torch.optim.SGD(critic.parameters(), lr=0.01)
    losses = train_step(runtime, config, Stage1State(generator=generator, critic=critic, d_optimizer=d_optimizer),
                        x_mixed, x_healthy, alpha, update_generator=False)
    with torch.no_grad():
        fake = healthy_reconstruction(x_mixed, generator(x_mixed))
    x = x_healthy.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(before(x).sum(), x)
    r1 = grad.flatten(1).pow(2).sum(dim=1).mean()
    gp = gradient_penalty(before, x_healthy, fake, alpha)
    expected = -before(x_healthy).mean() + before(fake).mean() + 10 * gp + 2 / 2 * r1
    torch.testing.assert_close(losses["D/loss_r1"], r1, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses["D/loss"], expected.detach(), rtol=1e-5, atol=1e-6)
    # --gp_every 3: both penalties on every 3rd critic step at 3 x their weight
    lazy = main.parse_config(["--r1_gamma", "5", "--gp_every", "3"])
    assert [r1_weight(lazy, i) for i in range(6)] == [15.0, 0.0, 0.0, 15.0, 0.0, 0.0]
    assert [penalty_weight(lazy, i) for i in range(6)] == [30.0, 0.0, 0.0, 30.0, 0.0, 0.0]
    assert [r1_weight(main.parse_config([]), i) for i in range(3)] == [0.0, 0.0, 0.0]  # off by default


REAL = torch.tensor([[[[2.0, 0.5], [-1.0, 0.0]]]])
FAKE = torch.tensor([[[[-2.0, -0.5], [1.0, 0.3]]]])


def softplus(v):
    return math.log(1 + math.exp(v))


def test_the_adversarial_losses_by_hand_on_given_critic_outputs():
    real, fake = REAL.flatten().tolist(), FAKE.flatten().tolist()
    def mean(values):
        return sum(values) / len(values)

    hand = {  # (critic's real term, critic's fake term, generator's term)
        "wgan": (-mean(real), mean(fake), -mean(fake)),  # -0.375, -0.3, 0.3
        "hinge": (mean([max(0, 1 - r) for r in real]), mean([max(0, 1 + f) for f in fake]), -mean(fake)),
        "nonsaturating": (mean([softplus(-r) for r in real]), mean([softplus(f) for f in fake]),
                          mean([softplus(-f) for f in fake])),
    }
    assert hand["hinge"][:2] == pytest.approx((0.875, 0.95))  # relu(1 - r): 0, 0.5, 2, 1; relu(1 + f): 0, 0.5, 2, 1.3
    assert hand["nonsaturating"][0] == pytest.approx((0.126928 + 0.474077 + 1.313262 + 0.693147) / 4, abs=1e-6)
    for kind, (real_term, fake_term, g_term) in hand.items():
        d_real, d_fake = critic_terms(kind, REAL, FAKE)
        assert (d_real.item(), d_fake.item(), generator_term(kind, FAKE).item()) == pytest.approx(
            (real_term, fake_term, g_term), abs=1e-6), kind


@pytest.mark.parametrize("kind", ["nonsaturating", "hinge"])
def test_the_step_trains_with_the_chosen_loss(kind, one_thread):
    runtime, config, generator, critic = stage1_networks("--gan_loss", kind, "--lambda_gp", "0")
    x_healthy, x_mixed = healthy_and_mixed()
    alpha = torch.rand(8, 1, 1, 1, generator=torch.Generator().manual_seed(1))
    before_d, before_g = copy.deepcopy(critic), copy.deepcopy(generator)
    lr = 0.01
    state = Stage1State(generator=generator, critic=critic, g_optimizer=torch.optim.SGD(generator.parameters(), lr=lr),
                        d_optimizer=torch.optim.SGD(critic.parameters(), lr=lr))
    losses = train_step(runtime, config, state, x_mixed, x_healthy, alpha, update_generator=True)
    fake = healthy_reconstruction(x_mixed, before_g(x_mixed))
    real_out, fake_out = before_d(x_healthy), before_d(fake.detach())
    if kind == "hinge":
        d_real, d_fake = F.relu(1 - real_out).mean(), F.relu(1 + fake_out).mean()
    else:
        d_real, d_fake = torch.log1p(torch.exp(-real_out)).mean(), torch.log1p(torch.exp(fake_out)).mean()
    torch.testing.assert_close(losses["D/loss_real"], d_real.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses["D/loss_fake"], d_fake.detach(), rtol=1e-5, atol=1e-6)
    assert_sgd_step_along(d_real + d_fake, before_d, critic, lr)
    # G against the critic as its own step left it
    out = critic(fake)
    adversarial = -out.mean() if kind == "hinge" else torch.log1p(torch.exp(-out)).mean()
    identity = (healthy_reconstruction(x_healthy, before_g(x_healthy)) - x_healthy).abs().mean()
    torch.testing.assert_close(losses["G/loss_fake"], adversarial.detach(), rtol=1e-5, atol=1e-6)
    assert_sgd_step_along(adversarial + config.lambda_id * identity, before_g, generator, lr)


# ------------------------------------------------------------------------------------------------------------
# Differentiable augmentation
# ------------------------------------------------------------------------------------------------------------

class Recorder(nn.Module):
    """A critic that records every batch it sees (its inner critic is not `module`, so distributed.unwrap keeps
    the recorder: the penalties and the generator's term are recorded too)."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.seen = inner, []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return self.inner(x)


def replay_of(generator):
    replay = torch.Generator()
    replay.set_state(generator.get_state())
    return replay


def test_augmentation_off_is_the_batch_itself_and_draws_nothing():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 1, 8, 8)
    state = g.get_state()
    assert diff_augment.augment(x, "", g) is x and diff_augment.augment(x, (), g) is x
    assert torch.equal(g.get_state(), state)


def test_each_transformation_changes_the_batch_by_hand():
    x = torch.arange(2 * 64, dtype=torch.float32).view(2, 1, 8, 8) / 128
    g = torch.Generator().manual_seed(3)
    # translation: each slice moved by whole pixels, the background (-1) coming in
    replay = replay_of(g)
    ty = torch.randint(-1, 2, (2, 1), generator=replay)  # 8 / 8 = 1 pixel at most
    tx = torch.randint(-1, 2, (2, 1), generator=replay)
    moved = diff_augment.augment(x, "translation", g)
    for b in range(2):
        dy, dx = int(ty[b]), int(tx[b])
        hand = torch.full((8, 8), -1.0)
        for i in range(8):
            for j in range(8):
                if 0 <= i - dy < 8 and 0 <= j - dx < 8:
                    hand[i, j] = x[b, 0, i - dy, j - dx]
        assert torch.equal(moved[b, 0], hand), (b, dy, dx)
    # cutout: a 4 x 4 square (half the size), centred anywhere, set to the background
    cut = diff_augment.augment(x, "cutout", torch.Generator().manual_seed(1))
    assert cut.shape == x.shape
    for b in range(2):
        changed = cut[b, 0] != x[b, 0]
        assert (cut[b, 0][changed] == -1).all() and 1 <= changed.sum() <= 16
        rows, cols = changed.nonzero(as_tuple=True)
        assert rows.max() - rows.min() < 4 and cols.max() - cols.min() < 4
    # brightness: one value per slice in [-0.5, 0.5)
    shifted = diff_augment.augment(x, "brightness", torch.Generator().manual_seed(2)) - x
    for b in range(2):
        assert torch.allclose(shifted[b], shifted[b].flatten()[0].expand_as(shifted[b]), atol=1e-6)
        assert -0.5 <= shifted[b].flatten()[0] < 0.5
    with pytest.raises(ValueError, match="unknown augmentation"):
        diff_augment.parse_policy("translation,colour")


@pytest.mark.parametrize("policy", ["brightness", "translation", "cutout", "translation,cutout,brightness"])
def test_augmentation_is_differentiable(policy):
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64, requires_grad=True)
    # the same draw on every call (gradcheck calls it many times): the gradient of the transformation itself
    assert torch.autograd.gradcheck(lambda v: diff_augment.augment(v, policy, torch.Generator().manual_seed(4)), (x,))
    diff_augment.augment(x, policy, torch.Generator().manual_seed(4)).pow(2).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def augmented_step(*flags, update_generator=True):
    runtime, config, generator, critic = stage1_networks("--diffaug", "translation,cutout", *flags)
    x_healthy, x_mixed = healthy_and_mixed()
    alpha = torch.rand(8, 1, 1, 1, generator=torch.Generator().manual_seed(1))
    recorder = Recorder(critic)
    before_g = copy.deepcopy(generator)
    augment_generator = torch.Generator().manual_seed(5)
    replay = replay_of(augment_generator)
    lr = 0.01
    state = Stage1State(generator=generator, critic=recorder,
                        g_optimizer=torch.optim.SGD(generator.parameters(), lr=lr),
                        d_optimizer=torch.optim.SGD(recorder.parameters(), lr=lr), augment_generator=augment_generator)
    train_step(runtime, config, state, x_mixed, x_healthy, alpha, update_generator=update_generator)
    return config, x_healthy, x_mixed, alpha, recorder, before_g, generator, replay, lr


def test_the_critic_sees_real_and_generated_batches_augmented_alike_and_g_learns_through_it(one_thread):
    config, x_healthy, x_mixed, _, recorder, before_g, generator, replay, lr = augmented_step("--lambda_gp", "0")
    real_seen, fake_seen, g_seen = recorder.seen  # the critic step's real and fake, then the generator's term
    fake = healthy_reconstruction(x_mixed, before_g(x_mixed))
    # each batch its own draw of the same policy, in this order, from the state's generator
    torch.testing.assert_close(real_seen, diff_augment.augment(x_healthy, config.diffaug, replay), rtol=0, atol=0)
    torch.testing.assert_close(fake_seen, diff_augment.augment(fake.detach(), config.diffaug, replay),
                               rtol=1e-6, atol=1e-6)
    for seen, plain in ((real_seen, x_healthy), (fake_seen, fake), (g_seen, fake)):
        assert seen.shape == plain.shape and not torch.allclose(seen, plain)  # the content changed
    assert not torch.allclose(real_seen - x_healthy, fake_seen - fake)  # not one draw shared by both
    # G's step: the gradient of its adversarial term through the augmentation (third draw), plus identity
    critic = recorder.inner
    adversarial = -critic(diff_augment.augment(fake, config.diffaug, replay)).mean()
    identity = (healthy_reconstruction(x_healthy, before_g(x_healthy)) - x_healthy).abs().mean()
    assert_sgd_step_along(adversarial + config.lambda_id * identity, before_g, generator, lr)


def test_the_penalties_see_the_batches_untransformed(one_thread):
    _, x_healthy, x_mixed, alpha, recorder, before_g, _, _, _ = augmented_step("--r1_gamma", "1",
                                                                               update_generator=False)
    real_seen, _, interpolates, r1_reals = recorder.seen
    with torch.no_grad():
        fake = healthy_reconstruction(x_mixed, before_g(x_mixed))
    torch.testing.assert_close(interpolates, alpha * x_healthy + (1 - alpha) * fake, rtol=1e-6, atol=1e-6)
    assert torch.equal(r1_reals, x_healthy)
    assert not torch.allclose(real_seen, x_healthy)


def test_the_augmentation_draws_for_the_global_batch_and_keeps_this_ranks_rows(monkeypatch):
    # two ranks of batch 2 see exactly the rows one process with batch 4 would see
    x = torch.rand(4, 1, 8, 8)
    whole = diff_augment.augment(x, "translation,cutout,brightness", torch.Generator().manual_seed(6))
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    for rank in (0, 1):
        monkeypatch.setattr(distributed, "rank", lambda rank=rank: rank)
        part = diff_augment.augment(x[2 * rank:2 * rank + 2], "translation,cutout,brightness",
                                    torch.Generator().manual_seed(6))
        assert torch.equal(part, whole[2 * rank:2 * rank + 2])


def stabilised_flags(toy_dataset, run_dir):
    return ["--mode", "train", "--image_dir", toy_dataset, "--run_dir", run_dir, *TINY_FLAGS,
            "--num_iters", "6", "--model_save_step", "3", "--sample_step", "1000",
            "--diffaug", "translation,cutout,brightness", "--r1_gamma", "1", "--gp_every", "2",
            "--gan_loss", "hinge", "--g_ema", "0.5", "--g_ema_start", "2", "--g_ema_warmup", "false",
            "--lr_decay", "true", "--lr_decay_shape", "cosine", "--num_iters_decay", "4", "--lr_update_step", "1"]


def test_a_resume_with_every_stabiliser_continues_the_run_exactly(toy_dataset, tmp_path, one_thread):
    run_dir, killed = str(tmp_path / "run"), str(tmp_path / "killed")
    assert main.main(stabilised_flags(toy_dataset, run_dir)) == 0
    state = torch.load(f"{run_dir}/models/3-state.ckpt", weights_only=True)
    assert "augment_generator" in state
    shutil.copytree(run_dir, killed)
    for path in glob.glob(f"{killed}/models/6-*"):  # what a kill leaves between the two checkpoints
        os.remove(path)
    # the documented resume: none of the run's flags repeated
    assert main.main(["--mode", "train", "--image_dir", toy_dataset, "--run_dir", killed, "--resume_iters", "latest",
                      "--num_workers", "0", "--use_tensorboard", "false"]) == 0
    for part in ("G", "D"):
        ours = torch.load(f"{run_dir}/models/6-{part}.ckpt", weights_only=True)["state_dict"]
        theirs = torch.load(f"{killed}/models/6-{part}.ckpt", weights_only=True)["state_dict"]
        for key in ours:
            assert torch.equal(ours[key], theirs[key]), f"6-{part}.ckpt {key} differs after the resume"
    ours, theirs = (torch.load(f"{d}/models/6-state.ckpt", weights_only=True) for d in (run_dir, killed))
    assert torch.equal(ours["augment_generator"], theirs["augment_generator"])
    assert ours["g_ema_updates"] == theirs["g_ema_updates"] == 2  # G steps at 3 and 5, after the start at 2


def test_a_checkpoint_without_an_augmentation_generator_still_loads(one_thread):
    _, _, generator, critic = stage1_networks()
    def adam(module):
        return torch.optim.Adam(module.parameters(), 1e-3)

    def state(seed):
        return Stage1State(generator=generator, critic=critic, g_optimizer=adam(generator), d_optimizer=adam(critic),
                           noise_generator=torch.Generator().manual_seed(0),
                           augment_generator=torch.Generator().manual_seed(seed))

    saved = state(1).state_dict()
    del saved["training"]["augment_generator"]  # as written before --diffaug existed
    fresh = state(2)
    fresh.load_state_dict(saved)
    assert torch.equal(fresh.augment_generator.get_state(), torch.Generator().manual_seed(2).get_state())


# ------------------------------------------------------------------------------------------------------------
# Every flag off: the step as it was
# ------------------------------------------------------------------------------------------------------------

def step_before_the_stabilisers(c, state, x_mixed, x_healthy, alpha, update_generator):
    """train_step as it was before the stabilisers (the profiler regions and autocast left out: fp32 here)."""
    generator, critic, g_optimizer, d_optimizer = state.generator, state.critic, state.g_optimizer, state.d_optimizer
    if update_generator:
        fake = healthy_reconstruction(x_mixed, generator(x_mixed))
    else:
        with torch.no_grad():
            fake = healthy_reconstruction(x_mixed, generator(x_mixed))
    d_loss_real = -critic(x_healthy).float().mean()
    d_loss_fake = critic(fake.detach()).float().mean()
    d_loss_gp = gradient_penalty(critic, x_healthy, fake, alpha)
    d_loss = d_loss_real + d_loss_fake + c.lambda_gp * d_loss_gp
    d_optimizer.zero_grad(set_to_none=True)
    d_loss.backward()
    d_optimizer.step()
    losses = {"D/loss_real": d_loss_real, "D/loss_fake": d_loss_fake, "D/loss": d_loss, "D/loss_gp": d_loss_gp}
    if update_generator:
        critic.requires_grad_(False)
        g_optimizer.zero_grad(set_to_none=True)
        g_loss_fake = -critic(fake).float().mean()
        g_loss_fake.backward()
        g_loss_id = (healthy_reconstruction(x_healthy, generator(x_healthy)) - x_healthy).abs().mean()
        (c.lambda_id * g_loss_id).backward()
        g_optimizer.step()
        critic.requires_grad_(True)
        losses.update({"G/loss_fake": g_loss_fake, "G/loss_id": g_loss_id,
                       "G/loss": g_loss_fake.detach() + c.lambda_id * g_loss_id.detach()})
    return losses


def learning_rate_before_the_stabilisers(c, base_lr, iteration):
    stepped = (iteration // c.lr_update_step) * c.lr_update_step
    return base_lr * min(1.0, max(0.0, (c.num_iters - stepped) / c.num_iters_decay)) if c.lr_decay else base_lr


def ema_before_the_stabilisers(ema_model, model, n):
    decay = min(0.999, (1 + n) / (10 + n))
    with torch.no_grad():
        for e, p in zip(ema_model.parameters(), model.parameters()):
            e.lerp_(p, 1 - decay)


def test_with_every_stabiliser_off_the_step_is_bit_identical_to_the_step_before_them(one_thread):
    # the existing linear decay on, to compare its rates too (sixths: 1 - 2/6 and 4/6 differ in the last bit)
    runtime, config, generator, critic = stage1_networks("--lr_decay", "true", "--num_iters", "8",
                                                         "--num_iters_decay", "6", "--lr_update_step", "1")
    x_healthy, x_mixed = healthy_and_mixed()
    noise = torch.Generator().manual_seed(1)
    alphas = [torch.rand(8, 1, 1, 1, generator=noise) for _ in range(6)]

    def networks():
        g, d = copy.deepcopy(generator), copy.deepcopy(critic)
        return Stage1State(generator=g, critic=d, g_ema=EMA(g, 0.999),
                           g_optimizer=torch.optim.Adam(g.parameters(), 1e-3, betas=(0.5, 0.999)),
                           d_optimizer=torch.optim.Adam(d.parameters(), 1e-3, betas=(0.5, 0.999)),
                           augment_generator=torch.Generator().manual_seed(9))

    now, before = networks(), networks()
    augment_state = now.augment_generator.get_state()
    for i in range(6):
        update = i % 2 == 1
        set_learning_rates(config, ((now.g_optimizer, 1e-3), (now.d_optimizer, 1e-3)), i)
        for optimizer in (before.g_optimizer, before.d_optimizer):
            optimizer.param_groups[0]["lr"] = learning_rate_before_the_stabilisers(config, 1e-3, i)
        assert now.g_optimizer.param_groups[0]["lr"] == before.g_optimizer.param_groups[0]["lr"]
        ours = train_step(runtime, config, now, x_mixed, x_healthy, alphas[i], update_generator=update,
                          lambda_id=stage1_gan.identity_weight(config, i), gp_weight=penalty_weight(config, i),
                          r1_weight=r1_weight(config, i))
        theirs = step_before_the_stabilisers(config, before, x_mixed, x_healthy, alphas[i], update)
        assert ours.keys() == theirs.keys()
        for name in ours:
            assert torch.equal(ours[name], theirs[name]), (i, name)
        if update:
            update_generator_ema(config, now.g_ema, now.generator, i)
            ema_before_the_stabilisers(before.g_ema.model, before.generator, before.g_ema.num_updates + 1)
            before.g_ema.num_updates += 1
    for a, b in ((now.generator, before.generator), (now.critic, before.critic), (now.g_ema.model, before.g_ema.model)):
        for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(x, y), name
    assert torch.equal(now.augment_generator.get_state(), augment_state)  # --diffaug off draws nothing
