"""A translation start for the automatic pyramid: the motion bound applied to pure translation.

Why: the automatic depth (:func:`emcore.finetune.coarse_to_fine.pyramid_depth`) puts a motion of
``max_motion`` px at <= 2.5 px of the coarsest level, which is enough for rotations (the field
varies across the chunk, so some of it is always within reach of the loss's slope), but not for
a pure translation of that size: at mip 4-5 a 512 px crop is 32 or 16 px of blurred texture and
the descent finds no slope (a 512 px vnc pair shifted by (28, -28) px: 100 % of the interior off
by > 1 px with 5 or 6 levels; benchmarks/README.md, "Capture").

Rule, per item, before the coarsest level (:func:`translation_start`), when the motion bound is
above :data:`MIN_MOTION_BOUND` (20 px: the default 40 px, not the pipeline's 16 px):

1. downsample ``warp(src, field)`` and ``tgt`` to :data:`NCC_MIP_BELOW_TOP` mips below the top
   level's mip (mip 2 for a 512 px chunk and 40 px: 128 px images) and find the global
   translation by masked normalized cross-correlation
   (:func:`emcore.coarse_xcorr.estimate_translation`, search radius ``max_motion`` + 2 px at that
   mip);
2. adopt it only if the peak is *reliable* (correlation and margin thresholds of
   ``estimate_translation``), it is at least :data:`MIN_START_SHIFT` px of the top level (16 px
   at mip 0 for a top mip of 4: smaller shifts the descent captures by itself, so every pair
   with less motion runs bit for bit as without this rule), and it lowers the masked MSE of the
   pair at the NCC mip.

Cost: about 12 ms per 512 px item on one CPU thread (downsampling and the correlation); the
correlation runs per item on the CPU whatever the images' device (a batched on-device version is
the next step for GPU batches; benchmarks/README.md).

The adopted start is ``compose(t, field)``: warp by ``field`` first, then by the constant ``t``
(:func:`emcore.field.compose`), px at the input mip, :mod:`emcore.field` convention.
"""

from __future__ import annotations

import math

import torch

from emcore.coarse_xcorr import estimate_translation
from emcore.errors import BlankSectionError
from emcore.field import compose, warp
from emcore.pyramid import downsample_image_torch

__all__ = ["MIN_MOTION_BOUND", "MIN_START_SHIFT", "NCC_MIP_BELOW_TOP", "translation_start"]

#: The cross-correlation runs this many mips below the top level's (finer than the coarsest
#: level, where the texture is gone; never below mip 0).
NCC_MIP_BELOW_TOP = 2
#: Smallest shift adopted, in px at the top level's mip.
MIN_START_SHIFT = 1.0
#: :func:`emcore.finetune.finetune` uses the start only for a motion bound above this (px at the
#: input mip): the shallowest automatic pyramid (4 levels, mips 3..0) captures translations up to
#: ``CAPTURE_PX * 2**3`` = 20 px by descent (the ``large`` pairs: ~14 px). Below it, e.g. in the
#: pipeline (``tasks.finetune.RESIDUAL_MOTION_PX`` = 16 px after the coarse stage's affines), a
#: start would only trade the descent's result for a cross-correlation peak of a small chunk,
#: which in ``tests/flows/test_align_stack.py`` (96 px chunks) moved whole chunks by 8-18 px.
MIN_MOTION_BOUND = 20.0


def _masked_mse(a: torch.Tensor, b: torch.Tensor) -> float:
    both = (a != 0).all(dim=0) & (b != 0).all(dim=0)
    if not bool(both.any()):
        return math.inf
    return float((a - b).square().sum(dim=0)[both].mean())


@torch.no_grad()
def translation_start(
    src: torch.Tensor, tgt: torch.Tensor, field: torch.Tensor, *, top_mip: int, max_motion: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(field, adopted)``: ``field`` with a global translation composed in where the rule of this
    module adopts one, and the ``(N,)`` bool of the items that got one.

    Args:
        src, tgt: ``(N, C, H, W)`` float32 images at the input mip (0 = no data), validated.
        field: ``(N, 2, H, W)`` starting field, px at the input mip.
        top_mip: the coarsest level's mip of the schedule.
        max_motion: the motion bound of the automatic depth, px at the input mip (> 0).
    """
    mip = max(0, top_mip - NCC_MIP_BELOW_TOP)
    moved = warp(src, field) if bool(field.any()) else src
    s, t = moved, tgt
    for _ in range(mip):
        s, t = downsample_image_torch(s), downsample_image_torch(t)
    scale = 2.0**mip
    radius = math.ceil(max_motion / scale) + 2
    min_shift = MIN_START_SHIFT * 2.0**top_mip
    out = field.clone()
    adopted = torch.zeros(field.shape[0], dtype=torch.bool, device=field.device)
    for i in range(field.shape[0]):
        si, ti = s[i : i + 1].mean(dim=1, keepdim=True), t[i : i + 1].mean(dim=1, keepdim=True)
        try:
            est = estimate_translation(si.cpu(), ti.cpu(), max_shift=min(radius, min(si.shape[-2:]) // 2))
        except BlankSectionError:
            continue
        shift = (est.dx * scale, est.dy * scale)
        if not est.reliable or math.hypot(*shift) < min_shift:
            continue
        const = torch.empty_like(field[i : i + 1])
        const[:, 0], const[:, 1] = shift
        coarse = torch.empty(1, 2, *s.shape[-2:], dtype=field.dtype, device=field.device)
        coarse[:, 0], coarse[:, 1] = est.dx, est.dy
        before = _masked_mse(s[i], t[i])
        after = _masked_mse(warp(s[i : i + 1], coarse)[0], t[i])
        if after < before:
            out[i : i + 1] = compose(const, field[i : i + 1])
            adopted[i] = True
    return out, adopted
