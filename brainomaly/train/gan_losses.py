"""Stage 1's adversarial losses and gradient penalties, as functions of the critic's outputs or of the critic itself.

--gan_loss picks the critic's and the generator's terms: wgan (the Wasserstein terms, the reference), nonsaturating
(the logistic loss of Goodfellow et al. 2014 with the generator's non-saturating form) or hinge (Lim and Ye 2017,
Miyato et al. 2018). Each term is an fp32 mean over the batch and the critic's patches (PatchGAN: one output per
patch). The penalties differentiate the critic with respect to its input (a double backward): WGAN-GP's pulls the
gradient norm to 1 on interpolates of real and fake (Gulrajani et al. 2017), R1 pulls it to 0 on the real batch
(Mescheder et al. 2018). Both differentiate the critic's output summed over its patches, per sample."""
import torch
import torch.nn.functional as F

GAN_LOSSES = ("wgan", "nonsaturating", "hinge")


def critic_terms(kind, real_output, fake_output):
    """(real term, fake term) of the critic's loss, from its outputs on the real and the fake batch:
    wgan -D(real), D(fake); nonsaturating softplus(-D(real)), softplus(D(fake)); hinge relu(1 - D(real)),
    relu(1 + D(fake)); each a mean over samples and patches, in fp32 (the outputs are bf16 under bf16 autocast)."""
    real, fake = real_output.float(), fake_output.float()
    if kind == "wgan":
        return -real.mean(), fake.mean()
    if kind == "nonsaturating":
        return F.softplus(-real).mean(), F.softplus(fake).mean()
    if kind == "hinge":
        return F.relu(1 - real).mean(), F.relu(1 + fake).mean()
    raise ValueError(f"unknown GAN loss {kind!r}: expected one of {GAN_LOSSES}")


def generator_term(kind, fake_output):
    """The generator's adversarial term from the critic's output on the fake batch: -D(fake) for wgan and hinge,
    softplus(-D(fake)) (the non-saturating form) for nonsaturating; an fp32 mean over samples and patches."""
    fake = fake_output.float()
    if kind in ("wgan", "hinge"):
        return -fake.mean()
    if kind == "nonsaturating":
        return F.softplus(-fake).mean()
    raise ValueError(f"unknown GAN loss {kind!r}: expected one of {GAN_LOSSES}")


def gradient_penalty(critic, real, fake, alpha):
    """WGAN-GP: mean over samples of (||d critic(x~) / d x~||_2 - 1)^2 on x~ = alpha*real + (1-alpha)*fake."""
    mixed = (alpha * real.detach() + (1 - alpha) * fake.detach()).requires_grad_(True)
    # fp32 sum, gradient and norm under bf16 autocast too (mixed is fp32, so its gradient comes back fp32)
    (grad,) = torch.autograd.grad(critic(mixed).float().sum(), mixed, create_graph=True)
    return ((grad.float().flatten(1).norm(2, dim=1) - 1) ** 2).mean()


def r1_penalty(critic, real):
    """R1: mean over the real samples of ||d critic(x) / d x||_2^2 (the loss adds gamma/2 times it). Zero-centred:
    it pulls the critic flat on the real data, where the WGAN-GP term pulls the norm to 1 between real and fake."""
    real = real.detach().requires_grad_(True)
    # fp32 sum, gradient and norm under bf16 autocast too, as gradient_penalty
    (grad,) = torch.autograd.grad(critic(real).float().sum(), real, create_graph=True)
    return grad.float().flatten(1).pow(2).sum(dim=1).mean()
