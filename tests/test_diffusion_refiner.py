"""Stage 2 refiner: schedule, UNet, forward noising, v-prediction loss, DDIM sampler, EMA."""
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from brainomaly.train.ema import EMA  # noqa: E402
from diffusion_refiner import RefinerUNet, ResidualDiffusion, cosine_beta_schedule  # noqa: E402

T = 1000


def tiny_unet(**kw):
    args = dict(base_dim=8, dim_mults=(1, 2), blocks_per_level=1, attn_levels=1, attn_heads=2, groups=4)
    args.update(kw)
    return RefinerUNet(**args)


def randomise_final_conv(unet, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        unet.final[-1].weight.copy_(torch.randn(unet.final[-1].weight.shape, generator=gen) * 0.1)


class OracleV(nn.Module):
    """Returns the exact v target for a known r0: eps is recovered from r_t, then v = sqrt(abar) eps - sqrt(1-abar) r0."""

    def __init__(self, r0):
        super().__init__()
        self.r0 = r0
        self.abar = torch.cumprod(1 - cosine_beta_schedule(T), dim=0)  # float64, independent of the wrapper

    def forward(self, noisy_residual, coarse, t):
        a = self.abar[t].sqrt().view(-1, 1, 1, 1)
        s = (1 - self.abar[t]).sqrt().view(-1, 1, 1, 1)
        r_t, r0 = noisy_residual.double(), self.r0.double()
        eps = (r_t - a * r0) / s
        return (a * eps - s * r0).float()


def test_cosine_schedule_is_monotone_and_spans_signal_to_noise():
    betas = cosine_beta_schedule(T)
    assert betas.dtype == torch.float64 and betas.shape == (T,)
    assert (betas > 0).all() and (betas <= 0.999).all()
    abar = torch.cumprod(1 - betas, dim=0)
    assert (abar[1:] < abar[:-1]).all()
    assert abar[0] > 0.999
    assert abar[-1] < 1e-4


def test_timestep_embedding_changes_the_output():
    unet = tiny_unet()
    randomise_final_conv(unet)
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    coarse = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        early = unet(x, coarse, torch.tensor([10, 10]))
        late = unet(x, coarse, torch.tensor([900, 900]))
    assert (early - late).abs().max() > 1e-3


def test_untrained_unet_predicts_zero():
    unet = tiny_unet()
    out = unet(torch.randn(2, 1, 16, 16), torch.zeros(2, 1, 16, 16), torch.tensor([0, 999]))
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("size, dim_mults", [(32, (1, 2, 4)), (48, (1, 2, 4, 8)), (64, (1, 2, 4, 8))])
def test_unet_output_shape(size, dim_mults):
    unet = tiny_unet(dim_mults=dim_mults, attn_levels=2, blocks_per_level=2)
    x = torch.randn(2, 1, size, size)
    with torch.no_grad():
        out = unet(x, x, torch.tensor([3, 700]))
    assert out.shape == (2, 1, size, size)


def test_unet_rejects_size_not_divisible_by_downsampling():
    unet = tiny_unet(dim_mults=(1, 2, 4))
    x = torch.randn(1, 1, 30, 30)
    with pytest.raises(AssertionError, match="divisible by 4"):
        unet(x, x, torch.tensor([0]))


def test_unet_never_attends_at_full_resolution():
    with pytest.raises(AssertionError, match="full resolution"):
        tiny_unet(dim_mults=(1, 2), attn_levels=2)


def test_q_sample_matches_forward_marginal():
    diffusion = ResidualDiffusion(tiny_unet(), timesteps=T)
    gen = torch.Generator().manual_seed(0)
    r0 = torch.randn(1, 1, 4, 4, generator=gen).expand(20000, 1, 4, 4)
    for t_value in (50, 500, 950):
        t = torch.full((r0.shape[0],), t_value)
        r_t = diffusion.q_sample(r0, t, torch.randn(r0.shape, generator=gen))
        abar = torch.cumprod(1 - cosine_beta_schedule(T), dim=0)[t_value].float()
        # 20,000 draws: the sample mean's standard error is sqrt((1 - abar) / n), the sample variance's
        # (1 - abar) * sqrt(2 / n) = 1% of it; allow 5 of each (at t = 50, 1 - abar = 0.008: about 0.0004)
        n = r0.shape[0]
        torch.testing.assert_close(r_t.mean(0), abar.sqrt() * r0[0], atol=5 * ((1 - abar) / n).sqrt().item(), rtol=0)
        torch.testing.assert_close(r_t.var(0), (1 - abar).expand(1, 4, 4), atol=0, rtol=0.05)


def test_ddim_is_deterministic_given_the_seed():
    unet = tiny_unet()
    randomise_final_conv(unet)
    diffusion = ResidualDiffusion(unet, timesteps=T)
    coarse = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1
    a = diffusion.sample_residual(coarse, steps=5, generator=torch.Generator().manual_seed(7))
    b = diffusion.sample_residual(coarse, steps=5, generator=torch.Generator().manual_seed(7))
    c = diffusion.sample_residual(coarse, steps=5, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-3


def test_ddim_with_oracle_network_recovers_the_residual():
    gen = torch.Generator().manual_seed(0)
    r0 = (torch.randn(3, 1, 16, 16, generator=gen) * 0.5).clamp(-2, 2)
    diffusion = ResidualDiffusion(OracleV(r0), timesteps=T)
    r_hat = diffusion.sample_residual(torch.zeros_like(r0), steps=10, generator=gen)
    torch.testing.assert_close(r_hat, r0, atol=1e-4, rtol=0)


def test_loss_is_zero_for_the_oracle_target():
    r0 = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.3
    diffusion = ResidualDiffusion(OracleV(r0), timesteps=T)
    assert diffusion.loss(r0, torch.zeros_like(r0), generator=torch.Generator().manual_seed(1)) < 1e-8


def test_tiny_refiner_overfits_a_few_residuals():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    coarse = torch.rand(4, 1, 16, 16, generator=gen) * 2 - 1
    r0 = 0.5 * torch.sin(3 * coarse) + 0.2 * torch.randn(4, 1, 16, 16, generator=gen)
    diffusion = ResidualDiffusion(tiny_unet(base_dim=16), timesteps=T)

    def eval_loss():  # same (t, noise) draws before and after training
        eval_gen = torch.Generator().manual_seed(123)
        with torch.no_grad():
            return sum(diffusion.loss(r0, coarse, generator=eval_gen).item() for _ in range(8)) / 8

    before = eval_loss()
    opt = torch.optim.Adam(diffusion.parameters(), lr=3e-3)
    for _ in range(100):  # 100 Adam steps take the loss down ~10x (0.63 -> 0.055); we ask for 3x
        loss = diffusion.loss(r0.repeat(4, 1, 1, 1), coarse.repeat(4, 1, 1, 1), generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_loss()
    assert after < before / 3, f"loss {before:.4f} -> {after:.4f}"


def test_refine_clamps_into_image_range():
    unet = tiny_unet()
    randomise_final_conv(unet)
    with torch.no_grad():
        unet.final[-1].bias.fill_(5.0)  # push the residual far out of range
    diffusion = ResidualDiffusion(unet, timesteps=T)
    coarse = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    refined = diffusion.refine(coarse, steps=3, generator=torch.Generator().manual_seed(0))
    assert refined.shape == coarse.shape
    assert refined.min() >= -1 and refined.max() <= 1
    assert (refined.abs() == 1).any()


def test_refiner_under_bfloat16_autocast_matches_float32():
    # bf16 keeps 8 bits of mantissa: the loss, its gradient and the DDIM residual (up to 1.35 here) agree with
    # float32 to about 0.1%, 0.7% and 0.024; the bounds below are twice that or more.
    unet = tiny_unet()
    randomise_final_conv(unet)
    diffusion = ResidualDiffusion(unet, timesteps=T)
    gen = torch.Generator().manual_seed(0)
    coarse = torch.rand(2, 1, 16, 16, generator=gen) * 2 - 1
    r0 = torch.randn(2, 1, 16, 16, generator=gen) * 0.1
    noise = torch.randn(2, 1, 16, 16, generator=gen)

    def run(bf16):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = diffusion.loss(r0, coarse, generator=torch.Generator().manual_seed(1))
            refined = diffusion.refine(coarse, steps=2, noise=noise)
        (grad,) = torch.autograd.grad(loss, [unet.final[-1].weight])
        return loss, refined, grad

    (loss32, refined32, grad32), (loss16, refined16, grad16) = run(False), run(True)
    assert loss16.dtype == torch.float32 and refined16.dtype == torch.float32
    assert (refined32 - coarse).abs().max() > 1.0  # a residual big enough for a bf16 error to show
    assert abs(loss16.item() - loss32.item()) < 0.01 * loss32.item()
    assert (grad16 - grad32).norm() < 0.02 * grad32.norm()
    torch.testing.assert_close(refined16, refined32, atol=0.05, rtol=0)


def test_ema_tracks_the_model_and_round_trips():
    diffusion = ResidualDiffusion(tiny_unet(), timesteps=T)
    ema = EMA(diffusion, decay=0.9)
    with torch.no_grad():
        for p in diffusion.parameters():
            p.add_(1.0)
    ema.update(diffusion)
    first = next(diffusion.parameters())
    ema_first = next(ema.model.parameters())
    # first update: decay min(0.9, 2/11) = 2/11, so the EMA moves 9/11 of the way from the old to the new weights
    torch.testing.assert_close(ema_first, first - 1.0 + 9 / 11)

    restored = EMA(ResidualDiffusion(tiny_unet(), timesteps=T))
    restored.load_state_dict(ema.state_dict())
    assert restored.num_updates == 1
    target = ResidualDiffusion(tiny_unet(), timesteps=T)
    restored.copy_to(target)
    torch.testing.assert_close(next(target.parameters()), ema_first)


def test_residual_scale_diffuses_scaled_residuals_and_returns_them_unscaled():
    # With residual_scale s the network models r0 / s; an oracle for r0 / s must give back r0 itself.
    gen = torch.Generator().manual_seed(0)
    r0 = torch.randn(2, 1, 16, 16, generator=gen) * 0.05
    diffusion = ResidualDiffusion(OracleV(r0 / 0.05), timesteps=T)
    diffusion.residual_scale.fill_(0.05)
    r_hat = diffusion.sample_residual(torch.zeros_like(r0), steps=10, noise=torch.randn(r0.shape, generator=gen))
    torch.testing.assert_close(r_hat, r0, atol=1e-5, rtol=0)
    assert diffusion.loss(r0, torch.zeros_like(r0)).item() < 1e-8
    assert "residual_scale" in diffusion.state_dict()  # saved with the refiner checkpoint
