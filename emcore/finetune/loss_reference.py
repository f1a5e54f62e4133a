"""The finetuner loss in plain autograd: the ground truth the fast backends are tested against.

Spec (shared with :mod:`emcore.finetune.losses`, which validates the inputs and dispatches here):
``src``, ``tgt`` ``(N, C, H, W)`` float images or encodings (a pixel has no data when all its
channels are 0), ``field`` ``(N, 2, H, W)`` px at the images' mip (:mod:`emcore.field`
convention: ``warped = warp(src, field)``, bilinear, zeros outside). Per batch item:

* ``valid(p)`` = tgt has data at p, the bilinearly warped source has-data mask is ``>= 0.999``,
  no target defect at p and the bilinearly warped source defect mask is ``== 0``
  (a constant: no gradient flows through it).
* ``mse = sum_p valid(p) sum_c (warped(p, c) - tgt(p, c))^2 / max(C * sum_p valid(p), 1)``.
* ``w(p)`` = 0 at a defect (target defect or warped source defect > 0), 0.001 where tgt has no
  data, else 1 (a constant).
* ``rigidity = sum_p sum_{d in 8 neighbours} w(p) w(p+d) (|d + field(p+d) - field(p)| - |d|)^2
  / (H W)``: springs leaving the image are absent; each spring is counted from both ends.
* ``l2 = mean over (2, H, W) of field^2``.

Known difference from the fast backends: ``grid_sample``'s normalized coordinates are rounded in
float32, so for widths/heights that are not powers of two a position that is exactly on a pixel
(e.g. the identity field) is read ~1e-5 px off. A neighbouring source defect then gets a tiny
positive bilinear weight and ``warp(src_defect) > 0`` marks the pixel as a defect here, while the
fused/Triton kernels (exact ``p + field(p)``) do not: at the identity field on 520 px wide
sections this reference dilates source defects by one pixel on one side (measured: 411 warped
defect pixels for 339 set). Values and gradients agree everywhere else.

Everything here is written the obvious way (``emcore.field.warp`` = ``grid_sample``, eight
shifted slices for the springs) and differentiated by autograd.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from emcore.field import warp

__all__ = ["NEIGHBOURS", "LossTerms", "neighbour_pairs", "reference_terms"]

#: The 8 spring directions ``(dy, dx)`` in px.
NEIGHBOURS: tuple[tuple[int, int], ...] = (
    (-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1),
)

#: Flag bits of the per-pixel uint8 masks built by :func:`emcore.finetune.losses.prepare_masks`.
HAS_DATA = 1
DEFECT = 2


class LossTerms(NamedTuple):
    """The three loss terms, each ``(N,)`` (one value per batch item), in the field's dtype."""

    mse: torch.Tensor
    rigidity: torch.Tensor
    l2: torch.Tensor


def neighbour_pairs(t: torch.Tensor, dy: int, dx: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(t at p, t at p + (dy, dx))`` over the pixels ``p`` whose neighbour is in the image."""
    h, w = t.shape[-2:]
    p = t[..., max(0, -dy) : h - max(0, dy), max(0, -dx) : w - max(0, dx)]
    q = t[..., max(0, dy) : h - max(0, -dy), max(0, dx) : w - max(0, -dx)]
    return p, q


def _stretch(x: torch.Tensor, y: torch.Tensor, rest_square: int) -> torch.Tensor:
    """``|s| - |d|`` of springs ``s = (x, y)`` with rest length ``|d| = sqrt(rest_square)``.

    Written ``(|s|^2 - |d|^2) / (|s| + |d|)``: the same value without the cancellation of two
    nearly equal square roots (exactly 0 for an unstretched spring, ~1 ulp of the stretch instead
    of ~1 ulp of the length in float32). The length has gradient 0 (not NaN) at 0, and is not
    ``torch.linalg.vector_norm`` over a size-2 axis: that gives the same values but is ~60x slower
    on CPU than these elementwise ops, which would flatter every fast backend.
    """
    square = x.square() + y.square()
    positive = square > 0
    length = torch.where(positive, torch.where(positive, square, 1.0).sqrt(), 0.0)
    return (square - rest_square) / (length + math.sqrt(rest_square))


def reference_terms(
    src: torch.Tensor,
    tgt: torch.Tensor,
    field: torch.Tensor,
    src_flags: torch.Tensor,
    tgt_flags: torch.Tensor,
    *,
    sample_offsets: torch.Tensor | None = None,
) -> LossTerms:
    """The loss terms by plain autograd (differentiable w.r.t. ``field`` only).

    Args:
        src, tgt: ``(N, C, H, W)`` images, same dtype as ``field``.
        field: ``(N, 2, H, W)`` px.
        src_flags, tgt_flags: ``(N, 1, H, W)`` uint8, bit 1 = has data, bit 2 = defect
            (source and target frame), from ``prepare_masks``.
        sample_offsets: optional ``(1 or N, 2, H, W)`` px added to ``field`` for the MSE part only
            (the warp, its masks and ``w``); the rigidity and L2 see ``field`` itself.
    """
    n, c, h, w = src.shape
    src, tgt = src.detach(), tgt.detach()
    sampled = field if sample_offsets is None else field + sample_offsets
    with torch.no_grad():
        fixed = sampled.detach()
        src_data = ((src_flags & HAS_DATA) != 0).to(field.dtype)
        src_defect = ((src_flags & DEFECT) != 0).to(field.dtype)
        tgt_data = (tgt_flags & HAS_DATA) != 0
        defect = ((tgt_flags & DEFECT) != 0) | (warp(src_defect, fixed) > 0)
        valid = tgt_data & ~defect & (warp(src_data, fixed) >= 0.999)
        no_data = torch.full_like(src_data, 0.001)  # built in the field's dtype: 0.001 exactly
        weight = torch.where(defect, 0.0, torch.where(tgt_data, 1.0, no_data))
        count = valid.sum(dim=(1, 2, 3)).to(field.dtype)

    warped = warp(src, sampled)
    sse = ((warped - tgt).square() * valid).sum(dim=(1, 2, 3))
    mse = sse / torch.clamp(c * count, min=1.0)

    energy = field.new_zeros(n)
    for dy, dx in NEIGHBOURS:
        f_p, f_q = neighbour_pairs(field, dy, dx)
        w_p, w_q = neighbour_pairs(weight, dy, dx)
        spring_x = dx + f_q[:, 0] - f_p[:, 0]
        spring_y = dy + f_q[:, 1] - f_p[:, 1]
        stretch = _stretch(spring_x, spring_y, dx * dx + dy * dy)
        energy = energy + (w_p[:, 0] * w_q[:, 0] * stretch.square()).sum(dim=(1, 2))
    rigidity = energy / (h * w)

    l2 = field.square().mean(dim=(1, 2, 3))
    return LossTerms(mse, rigidity, l2)
