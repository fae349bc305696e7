"""Stage-1 networks: shapes, the reference's parameter counts, the tanh head, the gradient penalty."""
import torch
import torch.nn as nn

from brainomaly.train.stage1_gan import gradient_penalty
from model import Discriminator, Generator, count_parameters, healthy_reconstruction


def test_reference_parameter_counts_with_three_channels():
    # reference-behaviour.md section 2: 8,408,576 (G) and 44,721,088 (D) at the default widths, 3-channel input
    assert count_parameters(Generator(3, 64, 6)) == 8_408_576
    assert count_parameters(Discriminator(3, 64, 6)) == 44_721_088


def test_generator_outputs_one_channel_map_of_input_size():
    generator = Generator(in_channels=1, conv_dim=8, repeat_num=2)
    x = torch.rand(2, 1, 32, 48) * 2 - 1
    assert generator(x).shape == (2, 1, 32, 48)


def test_critic_gives_patch_scores():
    critic = Discriminator(in_channels=1, conv_dim=8, repeat_num=3)
    assert critic(torch.zeros(2, 1, 32, 32)).shape == (2, 1, 4, 4)  # 32 / 2**3
    assert Discriminator(1, 4, 6)(torch.zeros(1, 1, 192, 192)).shape == (1, 1, 3, 3)  # the reference's 3x3 patches


def test_healthy_reconstruction_is_tanh_of_input_plus_map():
    x = torch.tensor([[[[-1.0, 0.0, 0.5]]]])
    anomaly_map = torch.tensor([[[[0.0, 0.2, -0.5]]]])
    expected = torch.tensor([[[[-0.7615942, 0.1973753, 0.0]]]])
    assert torch.allclose(healthy_reconstruction(x, anomaly_map), expected, atol=1e-6)


def test_eval_mode_does_not_change_the_generator():
    # InstanceNorm without running statistics: inference uses per-instance statistics in both modes.
    generator = Generator(1, 8, 1, zero_map=False)
    x = torch.randn(2, 1, 16, 16)
    train_out = generator.train()(x)
    assert torch.allclose(generator.eval()(x), train_out)


def test_gradient_penalty_matches_hand_computation():
    # Critic = one 1x1 conv with weight w: d(sum critic(x))/dx = w at every pixel, so ||g|| = |w| * sqrt(H*W)
    # for every sample whatever alpha is, and GP = (|w| sqrt(HW) - 1)^2.
    critic = nn.Conv2d(1, 1, 1, bias=False)
    with torch.no_grad():
        critic.weight.fill_(0.3)
    real, fake = torch.rand(3, 1, 4, 4), torch.rand(3, 1, 4, 4)
    alpha = torch.rand(3, 1, 1, 1)
    expected = (0.3 * 4 - 1) ** 2
    assert abs(gradient_penalty(critic, real, fake, alpha).item() - expected) < 1e-6


def test_gradient_penalty_is_differentiable_for_the_critic():
    critic = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.LeakyReLU(0.01), nn.Conv2d(2, 1, 1))
    penalty = gradient_penalty(critic, torch.rand(2, 1, 8, 8), torch.rand(2, 1, 8, 8), torch.rand(2, 1, 1, 1))
    penalty.backward()
    assert critic[0].weight.grad is not None and critic[0].weight.grad.abs().sum() > 0


def test_zero_map_init_starts_from_tanh_of_the_input():
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    generator = Generator(1, 8, 1)  # default: zero map
    assert torch.equal(healthy_reconstruction(x, generator(x)), torch.tanh(x))
    assert generator(x).abs().sum() == 0 and Generator(1, 8, 1, zero_map=False)(x).abs().sum() > 0


def test_reflect_padding_keeps_the_map_from_following_where_the_head_sits():
    # the same head 8 px lower (twice the total stride): a map that only looks at the head moves with it; zero
    # padding shows the network the frame, and its map changes with the head's distance to it
    size = 64
    yy, xx = torch.meshgrid(torch.arange(size * 1.0), torch.arange(size * 1.0), indexing="ij")

    def head(row):
        return torch.where((yy - row) ** 2 + (xx - size / 2) ** 2 < 100, 0.5, -1.0)[None, None]

    def change_with_position(padding_mode):
        torch.manual_seed(0)
        generator = Generator(1, 8, 2, zero_map=False, padding_mode=padding_mode)
        with torch.no_grad():
            upper, lower = generator(head(28))[0, 0], generator(head(36))[0, 0]
        return (lower[8:] - upper[:-8])[10:50].abs().max().item()  # rows away from the frame's edge

    zeros, reflect = change_with_position("zeros"), change_with_position("reflect")
    assert zeros > 0.3  # the reference's padding: the map depends on the position
    assert reflect < 0.2 * zeros
