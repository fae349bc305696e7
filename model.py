"""Stage 1 networks (Brainomaly, after StarGAN): the generator of the additive map and the PatchGAN critic."""
import torch
import torch.nn as nn

# main.py flags that define these networks: a checkpoint's values win, and an explicit conflicting flag is refused.
ARCHITECTURE_FLAGS = ("image_size", "in_channels", "g_conv_dim", "g_repeat_num", "d_conv_dim", "d_repeat_num",
                      "map_init", "g_padding")
IDENTITY_CLAMP = 1 - 1e-6  # atanh is infinite at +-1: the black background (-1) is taken just inside


class InstanceNorm(nn.InstanceNorm2d):
    """InstanceNorm2d that keeps a channels_last input channels_last.

    torch's instance norm views the input as one NCHW batch, so a channels_last activation comes out NCHW and the
    next channels_last convolution converts it back: two copies of the activation per norm, forward and backward.
    group_norm with one group per channel is the same normalisation (per sample and channel over H x W, biased
    variance, the same eps and affine weight and bias) and keeps the format. NCHW inputs take the stock path."""

    def forward(self, x):
        if x.dim() == 4 and x.shape[1] > 1 and x.is_contiguous(memory_format=torch.channels_last):
            return nn.functional.group_norm(x, self.num_features, self.weight, self.bias, self.eps)
        return super().forward(x)


def instance_norm(channels):
    # No running statistics: inference uses per-instance statistics, as the reference does by never calling
    # eval(), and eval() then changes nothing.
    return InstanceNorm(channels, affine=True, track_running_stats=False)


class ResidualBlock(nn.Module):
    def __init__(self, channels, padding_mode="zeros"):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, 1, 1, bias=False, padding_mode=padding_mode), instance_norm(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, 1, 1, bias=False, padding_mode=padding_mode), instance_norm(channels))

    def forward(self, x):
        return x + self.body(x)


class Generator(nn.Module):
    """Encoder (2 downsamplings), residual blocks, decoder; outputs an unbounded one-channel additive map.

    padding_mode "reflect" (--g_padding; CycleGAN's ResNet generator pads so) pads every convolution with the image's
    own border instead of zeros: a zero border is a value the image never has there, from which the network can
    read where the frame is, and learn maps that depend on where the head sits in it. The transposed convolutions
    crop rather than pad, and keep zeros."""

    def __init__(self, in_channels=1, conv_dim=64, repeat_num=6, zero_map=True, identity_map=False,
                 padding_mode="zeros"):
        super().__init__()
        self.identity_map = identity_map
        pad = padding_mode
        layers = [nn.Conv2d(in_channels, conv_dim, 7, 1, 3, bias=False, padding_mode=pad), instance_norm(conv_dim),
                  nn.ReLU(inplace=True)]
        width = conv_dim
        for _ in range(2):
            layers += [nn.Conv2d(width, width * 2, 4, 2, 1, bias=False, padding_mode=pad), instance_norm(width * 2),
                       nn.ReLU(inplace=True)]
            width *= 2
        layers += [ResidualBlock(width, pad) for _ in range(repeat_num)]
        for _ in range(2):
            layers += [nn.ConvTranspose2d(width, width // 2, 4, 2, 1, bias=False), instance_norm(width // 2),
                       nn.ReLU(inplace=True)]
            width //= 2
        layers.append(nn.Conv2d(width, 1, 7, 1, 3, bias=False, padding_mode=pad))
        self.main = nn.Sequential(*layers)
        if zero_map:
            # Start from map = 0, i.e. x_c = tanh(x), a near-identity reconstruction: the default random map
            # starts from a noisy checkerboard that the identity loss takes thousands of iterations to undo.
            nn.init.zeros_(layers[-1].weight)

    def forward(self, x):
        assert x.shape[-1] % 4 == 0 and x.shape[-2] % 4 == 0, "image height and width must be divisible by 4"
        learned = self.main(x)
        return learned + identity_offset(x) if self.identity_map else learned


def identity_offset(x):
    """The map that makes tanh(x + map) = x: atanh(x) - x (channels averaged, x just inside +-1). Added to a
    zero-initialised learned map (--map_init identity), x_c = x at iteration 0: no tanh error and no blur to
    score, so whatever AUC the run reaches is the generator changing anatomy."""
    x = x.mean(dim=1, keepdim=True).float().clamp(-IDENTITY_CLAMP, IDENTITY_CLAMP)
    return torch.atanh(x) - x


def healthy_reconstruction(x, anomaly_map):
    """Brainomaly's output head: tanh(x + map). The map broadcasts over input channels."""
    return torch.tanh(x + anomaly_map)


class Discriminator(nn.Module):
    """PatchGAN critic for WGAN-GP: strided 4x4 convs with LeakyReLU(0.01), no normalisation, 3x3 patch head."""

    def __init__(self, in_channels=1, conv_dim=64, repeat_num=6):
        super().__init__()
        layers = [nn.Conv2d(in_channels, conv_dim, 4, 2, 1), nn.LeakyReLU(0.01)]
        width = conv_dim
        for _ in range(1, repeat_num):
            layers += [nn.Conv2d(width, width * 2, 4, 2, 1), nn.LeakyReLU(0.01)]
            width *= 2
        self.main = nn.Sequential(*layers)
        self.patch_head = nn.Conv2d(width, 1, 3, 1, 1, bias=False)

    def forward(self, x):
        return self.patch_head(self.main(x))


def count_parameters(module):
    return sum(p.numel() for p in module.parameters())
