"""Held-out selection of a level's smoothness weight: the data, not a constant, sets the stiffness.

Why: one bending weight cannot serve every pair. A stiff weight averages the image noise out of a
smooth field (2 px over 512 px: 0.038 px median with 5e3) but flattens strain that varies over
~40 px (a 12 x 12 lattice, 1.5 px: 0.343 px p95 with 5e3, 0.155 with 5e2; benchmarks/README.md);
a soft weight follows that strain and fits noise on the smooth pair.

Rule (cross-validation on pixels the fit never saw), per item:

1. the discrepancy check: only a pair whose MSE at the level's starting field (the coarser
   levels' result) is at most :data:`NOISE_FACTOR` times the noise variance the images show
   (:func:`noise_sigma` of source and target, squared and summed) takes part. Above it, the
   residual is content that differs between the images (neighbouring sections: 0.5-1.0 against
   ~0.1 of noise), not noise, and fitting it more closely invents deformation: those pairs get the
   plain stiff fit on every pixel, exactly as without a selection;
2. for the others, a fixed random set of blocks (:data:`HOLDOUT_BLOCK` px square at the level's
   mip, a fraction :data:`HOLDOUT_FRACTION` of them, seeded) is removed from the MSE of the fit
   (:func:`split_masks`: the target's has-data flag is cleared there);
3. the level is fitted with each candidate weight in turn, stiffest first, each fit starting from
   the previous one's field;
4. an item moves to a softer fit only if that fit lowers its MSE on the held-out blocks
   (:func:`heldout_mse`; springs, L2 and bending left out) by more than a relative
   :data:`MIN_GAIN` below the stiff fit's (measured on the benchmark cases: 3.6-3.7 % on the
   strain pairs, below 0.3 % on smooth, large and capture pairs, where the stiff fit is the
   better one) and below the best softer fit's so far (any margin: the soft candidates differ
   from each other by far less than 1 %, so a margin would freeze the first one; issue 17, fifth
   pass).

Blocks rather than single pixels: the jittered target is sampled bicubically (4 x 4 taps) and the
source bilinearly, so a held-out pixel shares noise with its neighbours; inside an 8 px block
most held-out pixels share none with the fitted ones.

Masks are :class:`emcore.finetune.losses.LossMasks` ``(N, 1, H, W)`` uint8 flags at the level's
mip; the held-out pattern is the same for every batch item (an item's result does not depend on
the batch) and on every device (drawn on the CPU).
"""

from __future__ import annotations

import math

import torch

from emcore.finetune.loss_reference import HAS_DATA
from emcore.finetune.losses import LossMasks, alignment_loss_terms

__all__ = [
    "HOLDOUT_BLOCK",
    "HOLDOUT_FRACTION",
    "MIN_GAIN",
    "NOISE_FACTOR",
    "heldout_blocks",
    "heldout_mse",
    "noise_sigma",
    "split_masks",
]

#: Side of a held-out block, px at the level's mip.
HOLDOUT_BLOCK = 8
#: Fraction of the blocks held out of the fit.
HOLDOUT_FRACTION = 0.125
#: Relative held-out MSE decrease a softer fit must bring to be kept.
MIN_GAIN = 0.01
#: The discrepancy check: softer fits are tried only where the MSE at the level's starting field
#: is at most this many times the images' noise variance (sum of both images' :func:`noise_sigma`
#: squared).
NOISE_FACTOR = 2.0

#: Immerkaer's noise-estimation stencil (the difference of two Laplacians): zero on any linear
#: ramp, so image gradients hardly reach it.
_STENCIL = ((1.0, -2.0, 1.0), (-2.0, 4.0, -2.0), (1.0, -2.0, 1.0))


def noise_sigma(images: torch.Tensor) -> torch.Tensor:
    """``(N,)`` noise standard deviation of ``(N, C, H, W)`` images (Immerkaer 1996:
    ``sqrt(pi / 2) / 6 * mean |images * stencil|`` over the 3 x 3 neighbourhoods that hold data in
    every channel; 0 = no data). Fine texture counts as noise too: on the benchmark's normalized
    EM, noise-free crops read 0.11-0.13 and with Gaussian noise of sigma 0.2 0.21-0.24. NaN for an
    item without a full 3 x 3 neighbourhood of data."""
    n, c, h, w = images.shape
    if h < 3 or w < 3:
        return torch.full((n,), float("nan"), dtype=images.dtype, device=images.device)
    kernel = torch.tensor(_STENCIL, dtype=images.dtype, device=images.device).view(1, 1, 3, 3)
    flat = images.reshape(n * c, 1, h, w)
    response = torch.nn.functional.conv2d(flat, kernel).reshape(n, c, h - 2, w - 2).abs()
    data = (images != 0).all(dim=1, keepdim=True).to(images.dtype)
    full = -torch.nn.functional.max_pool2d(-data, 3, stride=1) > 0.5
    count = full.flatten(1).sum(dim=1) * c
    total = (response * full).flatten(1).sum(dim=1)
    return (math.sqrt(math.pi / 2) / 6) * total / count


def heldout_blocks(
    height: int,
    width: int,
    *,
    block: int = HOLDOUT_BLOCK,
    fraction: float = HOLDOUT_FRACTION,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """``(1, 1, height, width)`` bool, True on the held-out blocks (a seeded random ``fraction`` of
    the ``block`` x ``block`` px blocks; partial blocks at the right/bottom edge count as blocks)."""
    if not (isinstance(block, int) and block >= 1):
        raise ValueError(f"block must be an int >= 1, got {block!r}")
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction!r}")
    bh, bw = -(-height // block), -(-width // block)
    gen = torch.Generator().manual_seed(seed)
    chosen = torch.rand(bh, bw, generator=gen) < fraction
    full = chosen.repeat_interleave(block, 0).repeat_interleave(block, 1)[:height, :width]
    return full.view(1, 1, height, width).to(device)


def split_masks(masks: LossMasks, held: torch.Tensor) -> tuple[LossMasks, LossMasks]:
    """``(fit, held_out)`` masks: the target's has-data flag cleared on ``held`` (the fit's MSE
    skips those pixels) and kept only there (the held-out MSE sees nothing else).

    ``held``: ``(1 or N, 1, H, W)`` bool (:func:`heldout_blocks`).
    """
    tgt = masks.tgt_flags
    keep = torch.tensor(0xFF ^ HAS_DATA, dtype=torch.uint8, device=tgt.device)
    cleared = tgt & keep
    fit = LossMasks(masks.src_flags, torch.where(held, cleared, tgt))
    out = LossMasks(masks.src_flags, torch.where(held, tgt, cleared))
    return fit, out


@torch.no_grad()
def heldout_mse(
    src: torch.Tensor,
    tgt: torch.Tensor,
    field: torch.Tensor,
    masks: LossMasks,
    *,
    backend: str = "auto",
    sample_offsets: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(N,)`` MSE of ``warp(src, field)`` against ``tgt`` on the pixels ``masks`` mark as data
    (the held-out half of :func:`split_masks`), as the fit samples it (same jitter offsets)."""
    terms = alignment_loss_terms(src, tgt, field, masks=masks, backend=backend, sample_offsets=sample_offsets)
    return terms.mse
