"""Differentiable augmentation of the batches the stage-1 critic sees (DiffAugment, Zhao et al., NeurIPS 2020).

A critic trained on few real slices memorises them and its feedback to G turns into noise. DiffAugment transforms
every batch the critic sees, real and generated alike, with the same random transformations, so the critic cannot
tell them apart by the augmentation and cannot memorise the real slices; the transformations are differentiable, so
G still learns through them. --diffaug names them (comma list, applied in this order whatever the order typed):
  brightness   adds one value per slice, uniform in [-0.5, 0.5) (slices are in [-1, 1])
  translation  moves each slice by up to 1/8 of its size in each direction (whole pixels), filling with the
               background (-1)
  cutout       sets a square of half the slice's size at a random place (partly outside the frame at the edges)
               to the background (-1)

Each call draws its own random numbers (one draw per slice) from the generator it is given: stage 1 keeps a
dedicated one, seeded from --seed, in its state, so a resume draws what the uninterrupted run would have drawn. The
draws are made for the global batch and this rank's rows kept (distributed.rank_slice), as for the penalty's alpha."""
import torch
import torch.nn.functional as F

from brainomaly import distributed

POLICIES = ("brightness", "translation", "cutout")
TRANSLATION_RATIO = 0.125
CUTOUT_RATIO = 0.5
BACKGROUND = -1.0  # the value of the black background in [-1, 1]


def parse_policy(text):
    """The transformations of a --diffaug value, in the order they are applied ('' or 'none': none).
    Raises ValueError naming an unknown one."""
    names = {name.strip() for name in text.split(",") if name.strip()} - {"none"}
    unknown = sorted(names - set(POLICIES))
    if unknown:
        raise ValueError(f"unknown augmentation {', '.join(unknown)}: expected a comma list of {', '.join(POLICIES)}")
    return tuple(name for name in POLICIES if name in names)


def _draw(batch, draw):
    """draw(n) for the global batch (batch x ranks rows), this rank's rows kept."""
    return distributed.rank_slice(draw(batch * distributed.world_size()))


def brightness(x, generator):
    shift = _draw(x.shape[0], lambda n: torch.rand(n, 1, 1, 1, generator=generator)).to(x.device, x.dtype)
    return x + (shift - 0.5)


def translation(x, generator):
    b, c, h, w = x.shape
    max_y, max_x = int(h * TRANSLATION_RATIO + 0.5), int(w * TRANSLATION_RATIO + 0.5)
    ty = _draw(b, lambda n: torch.randint(-max_y, max_y + 1, (n, 1), generator=generator)).to(x.device)
    tx = _draw(b, lambda n: torch.randint(-max_x, max_x + 1, (n, 1), generator=generator)).to(x.device)
    padded = F.pad(x, [max_x, max_x, max_y, max_y], value=BACKGROUND)
    # out[.., i, j] = x[.., i - ty, j - tx]: row i - ty + max_y and column j - tx + max_x of the padded slice
    rows = (torch.arange(h, device=x.device) + max_y - ty).view(b, 1, h, 1).expand(b, c, h, w + 2 * max_x)
    cols = (torch.arange(w, device=x.device) + max_x - tx).view(b, 1, 1, w).expand(b, c, h, w)
    return padded.gather(2, rows).gather(3, cols)


def cutout(x, generator):
    b, _, h, w = x.shape
    size_y, size_x = int(h * CUTOUT_RATIO + 0.5), int(w * CUTOUT_RATIO + 0.5)
    # the square's centre anywhere in the frame, as Zhao et al.'s code places it
    cy = _draw(b, lambda n: torch.randint(0, h + (1 - size_y % 2), (n, 1), generator=generator)).to(x.device)
    cx = _draw(b, lambda n: torch.randint(0, w + (1 - size_x % 2), (n, 1), generator=generator)).to(x.device)
    top, left = cy - size_y // 2, cx - size_x // 2
    rows, cols = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
    in_rows = (rows >= top) & (rows < top + size_y)  # (b, h)
    in_cols = (cols >= left) & (cols < left + size_x)  # (b, w)
    cut = (in_rows[:, :, None] & in_cols[:, None, :]).unsqueeze(1)  # (b, 1, h, w)
    keep = (~cut).to(x.dtype)
    return x * keep + BACKGROUND * (1 - keep)


TRANSFORMS = {"brightness": brightness, "translation": translation, "cutout": cutout}


def augment(x, policy, generator=None):
    """x transformed by each transformation of `policy` (parse_policy's tuple, or a --diffaug string), each slice its
    own random draw from `generator` (None: torch's global generator); x itself when the policy is empty."""
    if isinstance(policy, str):
        policy = parse_policy(policy)
    for name in policy:
        x = TRANSFORMS[name](x, generator)
    return x
