"""Stage 2: residual diffusion refiner.

On healthy slices the residual r0 = x - x_c is what the frozen GAN gets wrong. The refiner learns p(r | x_c)
with a DDPM objective (cosine schedule, v-prediction) and samples r_hat with deterministic DDIM (eta = 0).
It never sees the raw input x, so it cannot learn the identity and wash anomalies away.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# main.py flags that define the refiner: a checkpoint's values win, and an explicit conflicting flag is refused.
REFINER_ARCHITECTURE_FLAGS = ("refiner_dim", "refiner_dim_mults", "refiner_blocks", "refiner_attn_levels",
                              "refiner_heads", "diffusion_steps")


def cosine_beta_schedule(timesteps, s=0.008):
    """Betas of the cosine schedule (Nichol & Dhariwal 2021), float64, clipped to 0.999."""
    steps = torch.linspace(0, timesteps, timesteps + 1, dtype=torch.float64) / timesteps
    alphas_cumprod = torch.cos((steps + s) / (1 + s) * math.pi * 0.5) ** 2
    alphas_cumprod = alphas_cumprod / alphas_cumprod[0]
    betas = 1 - alphas_cumprod[1:] / alphas_cumprod[:-1]
    return betas.clamp(0, 0.999)


# ----------------------------------------------------------------------------------------------------------
# UNet blocks
# ----------------------------------------------------------------------------------------------------------

class SinusoidalTimeEmbedding(nn.Module):
    """t (B,) int -> (B, dim) sin/cos features, always computed in float32."""

    def __init__(self, dim, max_period=10000):
        super().__init__()
        assert dim % 2 == 0, f"time embedding dim must be even, got {dim}"
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, t):
        assert t.ndim == 1, f"t must be (B,), got {tuple(t.shape)}"
        with torch.autocast(device_type=t.device.type, enabled=False):
            args = t.float()[:, None] * self.freqs[None]
            return torch.cat([args.sin(), args.cos()], dim=-1)


class ResBlock(nn.Module):
    """GroupNorm, SiLU, conv3x3, time scale/shift, GroupNorm, SiLU, conv3x3; 1x1 skip when channels change."""

    def __init__(self, dim_in, dim_out, time_dim, groups):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, dim_in)
        self.conv1 = nn.Conv2d(dim_in, dim_out, 3, padding=1)
        self.time_proj = nn.Sequential(nn.SiLU(), nn.Linear(time_dim, 2 * dim_out))
        self.norm2 = nn.GroupNorm(groups, dim_out)
        self.conv2 = nn.Conv2d(dim_out, dim_out, 3, padding=1)
        self.skip = nn.Conv2d(dim_in, dim_out, 1) if dim_in != dim_out else nn.Identity()

    def forward(self, x, time_emb):
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.time_proj(time_emb)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(F.silu(h))
        return h + self.skip(x)


class AttentionBlock(nn.Module):
    """Pre-norm multi-head self-attention over the H*W positions, with a residual connection."""

    def __init__(self, dim, heads, groups):
        super().__init__()
        assert dim % heads == 0, f"attention width {dim} is not divisible by {heads} heads"
        self.heads = heads
        self.norm = nn.GroupNorm(groups, dim)
        self.to_qkv = nn.Conv2d(dim, 3 * dim, 1)
        self.to_out = nn.Conv2d(dim, dim, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        qkv = self.to_qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w)
        # contiguous (B, heads, N, d): the fused CPU/CUDA kernels need a unit stride on the head dim
        q, k, v = qkv.transpose(-1, -2).contiguous().unbind(dim=1)
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(d)) v
        return x + self.to_out(out.transpose(-1, -2).reshape(b, c, h, w))


def Downsample(dim_in, dim_out):
    # pixel-unshuffle keeps every pixel; the 1x1 conv mixes the 4 phases
    return nn.Sequential(nn.PixelUnshuffle(2), nn.Conv2d(4 * dim_in, dim_out, 1))


def Upsample(dim_in, dim_out):
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(dim_in, dim_out, 3, padding=1))


class Level(nn.Module):
    """blocks_per_level x (ResBlock, optional attention) at one resolution."""

    def __init__(self, dims_in, dim_out, time_dim, attn, attn_heads, groups):
        super().__init__()
        self.res = nn.ModuleList(ResBlock(d, dim_out, time_dim, groups) for d in dims_in)
        self.attn = nn.ModuleList(AttentionBlock(dim_out, attn_heads, groups) if attn else nn.Identity()
                                  for _ in dims_in)


class RefinerUNet(nn.Module):
    """Predicts the diffusion target from (noisy residual, coarse reconstruction, t).

    Channel widths are base_dim * dim_mults; attention sits at the `attn_levels` lowest resolutions and in the
    middle block, never at full resolution.
    """

    def __init__(self, in_channels=1, base_dim=32, dim_mults=(1, 2, 4), blocks_per_level=1,
                 attn_levels=2, attn_heads=4, groups=8):
        super().__init__()
        n_levels = len(dim_mults)
        assert n_levels >= 1 and blocks_per_level >= 1
        assert 0 <= attn_levels <= n_levels - 1, \
            f"attn_levels={attn_levels} must be in [0, {n_levels - 1}]: no attention at full resolution"
        dims = [base_dim * m for m in dim_mults]
        assert all(d % groups == 0 for d in dims), f"widths {dims} must be divisible by groups={groups}"
        self.in_channels = in_channels
        self.factor = 2 ** (n_levels - 1)
        time_dim = 4 * base_dim
        has_attn = [level >= n_levels - attn_levels for level in range(n_levels)]

        self.time_mlp = nn.Sequential(SinusoidalTimeEmbedding(base_dim), nn.Linear(base_dim, time_dim),
                                      nn.SiLU(), nn.Linear(time_dim, time_dim))
        self.init_conv = nn.Conv2d(2 * in_channels, dims[0], 3, padding=1)

        # down: every block's output is a skip; downsample between levels
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        for level, dim in enumerate(dims):
            dim_prev = dims[max(level - 1, 0)]
            self.down.append(Level([dim_prev] + [dim] * (blocks_per_level - 1), dim, time_dim,
                                   has_attn[level], attn_heads, groups))
            if level < n_levels - 1:
                self.downsample.append(Downsample(dim, dim))

        self.mid_res1 = ResBlock(dims[-1], dims[-1], time_dim, groups)
        self.mid_attn = AttentionBlock(dims[-1], attn_heads, groups) if attn_levels > 0 else nn.Identity()
        self.mid_res2 = ResBlock(dims[-1], dims[-1], time_dim, groups)

        # up: each block concatenates one skip of the same width; upsample narrows to the next level's width
        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for level in reversed(range(n_levels)):
            dim = dims[level]
            self.up.append(Level([2 * dim] * blocks_per_level, dim, time_dim, has_attn[level], attn_heads, groups))
            if level > 0:
                self.upsample.append(Upsample(dim, dims[level - 1]))

        self.final = nn.Sequential(nn.GroupNorm(groups, dims[0]), nn.SiLU(),
                                   nn.Conv2d(dims[0], in_channels, 3, padding=1))
        # an untrained refiner predicts 0 everywhere
        nn.init.zeros_(self.final[-1].weight)
        nn.init.zeros_(self.final[-1].bias)

    def forward(self, noisy_residual, coarse, t):
        assert noisy_residual.shape == coarse.shape and noisy_residual.shape[1] == self.in_channels, \
            f"noisy residual {tuple(noisy_residual.shape)} and coarse {tuple(coarse.shape)} must both be " \
            f"(B,{self.in_channels},H,W)"
        b, _, height, width = coarse.shape
        assert height % self.factor == 0 and width % self.factor == 0, \
            f"H and W ({height}x{width}) must be divisible by {self.factor} = 2**(len(dim_mults)-1)"
        assert t.shape == (b,), f"t must be ({b},), got {tuple(t.shape)}"

        emb = self.time_mlp(t)
        h = self.init_conv(torch.cat([noisy_residual, coarse], dim=1))
        skips = []
        for level, stage in enumerate(self.down):
            for res, attn in zip(stage.res, stage.attn):
                h = attn(res(h, emb))
                skips.append(h)
            if level < len(self.downsample):
                h = self.downsample[level](h)
        h = self.mid_res2(self.mid_attn(self.mid_res1(h, emb)), emb)
        for level, stage in enumerate(self.up):
            for res, attn in zip(stage.res, stage.attn):
                h = attn(res(torch.cat([h, skips.pop()], dim=1), emb))
            if level < len(self.upsample):
                h = self.upsample[level](h)
        assert not skips
        return self.final(h)


# ----------------------------------------------------------------------------------------------------------
# Diffusion wrapper: forward noising, training loss, DDIM sampler
# ----------------------------------------------------------------------------------------------------------

class ResidualDiffusion(nn.Module):
    """Diffusion over residuals r = x - x_c, conditioned on the coarse reconstruction x_c.

    Target: v = sqrt(abar) * eps - sqrt(1 - abar) * r0. The schedule buffers are a pure function of
    `timesteps` (plain config), so they are not saved in the state dict.
    """

    # v, not eps: r0 = sqrt(abar)*r_t - sqrt(1-abar)*v stays well-conditioned at both ends of the cosine
    # schedule (eps needs a division by sqrt(abar) ~ 0 at t = T-1), which matters for few-step DDIM.
    residual_bound = 2.0  # x and x_c both lie in [-1, 1], so |r0| <= 2

    def __init__(self, unet, timesteps=1000):
        super().__init__()
        self.unet = unet
        self.timesteps = timesteps
        # GAN residuals are small (std ~0.05): diffusion runs on r / residual_scale, set from the healthy
        # residuals' std before training (LDM's scale-factor trick), so the signal is not lost in unit noise.
        self.register_buffer("residual_scale", torch.ones(()))
        alphas_cumprod = torch.cumprod(1 - cosine_beta_schedule(timesteps), dim=0)
        for name, value in [("alphas_cumprod", alphas_cumprod),
                            ("sqrt_alphas_cumprod", alphas_cumprod.sqrt()),
                            ("sqrt_one_minus_alphas_cumprod", (1 - alphas_cumprod).sqrt())]:
            self.register_buffer(name, value.float(), persistent=False)

    def _coefs(self, t):
        """(sqrt(abar_t), sqrt(1 - abar_t)), each shaped (B,1,1,1) for broadcasting."""
        return self.sqrt_alphas_cumprod[t].view(-1, 1, 1, 1), self.sqrt_one_minus_alphas_cumprod[t].view(-1, 1, 1, 1)

    def q_sample(self, r0, t, noise):
        a, s = self._coefs(t)
        return a * r0 + s * noise

    def loss(self, r0, coarse, generator=None, shard=(0, 1)):
        """Training loss. shard = (rank, number of ranks): t and the noise are drawn for every rank's batch and
        this rank keeps its own rows, so the ranks' generators stay in step (N x B draws what 1 x N*B draws)."""
        assert r0.shape == coarse.shape, f"residual {tuple(r0.shape)} vs coarse {tuple(coarse.shape)}"
        r0 = r0 / self.residual_scale
        n, (rank, ranks) = r0.shape[0], shard
        rows = slice(rank * n, (rank + 1) * n)
        t = torch.randint(0, self.timesteps, (n * ranks,), generator=generator, device=r0.device)[rows]
        noise = torch.randn((n * ranks,) + tuple(r0.shape[1:]), generator=generator, device=r0.device,
                            dtype=r0.dtype)[rows]
        a, s = self._coefs(t)
        target = a * noise - s * r0
        prediction = self.unet(a * r0 + s * noise, coarse, t)
        return F.mse_loss(prediction.float(), target.float())

    def forward(self, r0, coarse, generator=None, shard=(0, 1)):
        """The training loss: the call DistributedDataParallel wraps (it synchronises gradients of forward only)."""
        return self.loss(r0, coarse, generator, shard)

    @torch.no_grad()
    def sample_residual(self, coarse, steps=10, generator=None, noise=None):
        """DDIM (eta = 0) from r_T = `noise` (or N(0, I) drawn with `generator`): deterministic given r_T."""
        assert 1 <= steps <= self.timesteps, f"steps must be in [1, {self.timesteps}], got {steps}"
        b = coarse.shape[0]
        times = torch.linspace(self.timesteps - 1, 0, steps, dtype=torch.float64).round().long().tolist()
        if noise is None:
            noise = torch.randn(coarse.shape, generator=generator, device=coarse.device, dtype=torch.float32)
        assert noise.shape == coarse.shape, f"noise {tuple(noise.shape)} vs coarse {tuple(coarse.shape)}"
        r = noise.float()
        for i, t in enumerate(times):
            abar = self.alphas_cumprod[t]
            abar_prev = self.alphas_cumprod[times[i + 1]] if i + 1 < steps else abar.new_tensor(1.0)
            v = self.unet(r, coarse, torch.full((b,), t, device=coarse.device, dtype=torch.long)).float()
            bound = self.residual_bound / self.residual_scale
            r0_hat = (abar.sqrt() * r - (1 - abar).sqrt() * v).clamp(-bound, bound)
            eps_hat = ((r - abar.sqrt() * r0_hat) / (1 - abar).sqrt())
            r = abar_prev.sqrt() * r0_hat + (1 - abar_prev).sqrt() * eps_hat  # DDIM, eta = 0
        return r * self.residual_scale

    @torch.no_grad()
    def refine(self, coarse, steps=10, generator=None, noise=None):
        return (coarse + self.sample_residual(coarse, steps, generator, noise)).clamp(-1, 1)
