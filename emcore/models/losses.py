"""Training losses for the encoders (metric learning) and the learned coarse aligner.

All images are ``(N, C, H, W)`` float32, masks ``(N, 1, H, W)`` bool, fields ``(N, 2, H, W)`` px at
the images' mip (:mod:`emcore.field` convention). Everything is differentiable with respect to the
images *and* the fields (unlike :func:`emcore.finetune.losses.alignment_loss`, whose gradient goes
to the field only, as a finetuner needs).

Encoder loss (:func:`encoder_pair_loss`), as in the published metric-learning method: encodings of
two neighbouring sections must match once aligned by the true field (masked MSE after warping) and
must *not* match when misaligned by a few pixels (a low percentile of the per-tile MSE of the
misaligned pair must exceed a margin: a robust statistic, so that no region - not even the most
featureless one - looks aligned when it is not). Encodings are standardized to mean 0 / std 1 over
their data pixels first, so the loss cannot be gamed by scale: for two unrelated standardized
images the MSE is about 2.

Basin term (``basin_shifts``, for the finetuner): the finetuner descends the MSE from wherever it
is, so what matters is the *shape* of the MSE near the true alignment, not only its contrast at a
few px. For every tile and each small constant misalignment ``d`` (0.5-3 px), the log ratio
``log(MSE_d) - log(MSE_0)`` must reach ``log(1 + growth * |d|**2)`` (a steep, monotone basin around
0); the shortfall is averaged over tiles and shifts. A tile where a shifted pair matches *better*
than the aligned one (a false minimum that pulls the finetuner off) pays the most.

The learned aligners are trained with the finetuner's own loss
(:func:`emcore.finetune.losses.alignment_loss_terms`, see
:func:`emcore.models.aligner_training.aligner_training_loss`), not with a loss from this module.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from emcore.field import compose, warp, warp_mask

__all__ = [
    "EncoderLossTerms",
    "basin_shifts",
    "encoder_pair_loss",
    "masked_mse",
    "standardize",
    "tile_mse",
]


def standardize(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``(x - mean) / std`` per item over ``mask``; 0 outside ``mask``."""
    m = mask.to(x.dtype)
    count = m.sum(dim=(1, 2, 3), keepdim=True).clamp(min=1.0)
    mean = (x * m).sum(dim=(1, 2, 3), keepdim=True) / count
    var = (((x - mean) * m) ** 2).sum(dim=(1, 2, 3), keepdim=True) / count
    return (x - mean) / (var + eps).sqrt() * m


def masked_mse(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-item mean of ``(a - b)**2`` over ``mask`` (mean over channels too): ``(N,)``."""
    m = mask.to(a.dtype)
    err = ((a - b) ** 2).mean(dim=1, keepdim=True) * m
    return err.sum(dim=(1, 2, 3)) / m.sum(dim=(1, 2, 3)).clamp(min=1.0)


def tile_mse(
    a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor, tile: int, min_fill: float = 0.5
) -> torch.Tensor:
    """Masked MSE per ``tile x tile`` tile: ``(N, T)``; NaN for tiles under ``min_fill`` masked."""
    m = mask.to(a.dtype)
    err = ((a - b) ** 2).mean(dim=1, keepdim=True) * m
    fill = F.avg_pool2d(m, tile)
    mse = F.avg_pool2d(err, tile) / fill.clamp(min=1e-6)
    mse = torch.where(fill >= min_fill, mse, torch.full_like(mse, float("nan")))
    return mse.flatten(1)


@dataclass(frozen=True)
class EncoderLossTerms:
    """``(N,)`` terms: ``aligned`` MSE, ``misaligned_low`` (low percentile of per-tile MSE),
    ``collapse`` (1 - variance kept by the standardization: > 0 only for near-constant encodings),
    ``basin`` (mean shortfall of the small-shift log MSE ratios; 0 when not asked for) and the
    total ``loss``."""

    aligned: torch.Tensor
    misaligned_low: torch.Tensor
    collapse: torch.Tensor
    basin: torch.Tensor
    loss: torch.Tensor


def basin_shifts(magnitudes: tuple[float, ...], directions: int = 4) -> list[tuple[float, float]]:
    """Constant misalignments ``(dx, dy)`` px: ``directions`` evenly spread per magnitude, each
    magnitude's set turned by a further ``pi / (2 * directions)`` so the shifts cover many angles."""
    shifts = []
    for k, size in enumerate(magnitudes):
        for j in range(directions):
            angle = 2 * math.pi * j / directions + k * math.pi / (2 * directions)
            shifts.append((size * math.cos(angle), size * math.sin(angle)))
    return shifts


def encoder_pair_loss(
    enc_src: torch.Tensor,
    enc_tgt: torch.Tensor,
    applied: torch.Tensor,
    shift: torch.Tensor,
    src_data: torch.Tensor,
    tgt_data: torch.Tensor,
    *,
    tile: int,
    percentile: float = 0.1,
    margin: float = 1.5,
    border: int = 4,
    collapse_weight: float = 10.0,
    eps: float = 1e-3,
    contrast_weight: float = 1.0,
    basin: Sequence[tuple[float, float]] = (),
    basin_weight: float = 0.0,
    basin_growth: float = 0.5,
    basin_floor: float = 1e-3,
    basin_tile: int | None = None,
) -> EncoderLossTerms:
    """Metric-learning loss of encodings of a pair ``(src, tgt)`` with ``tgt = warp(., applied)``.

    Args:
        enc_src: ``(N, C, H, W)`` encodings of the (undeformed) source sections.
        enc_tgt: encodings of the neighbouring sections deformed by ``applied``.
        applied: ``(N, 2, H, W)`` the known field: ``warp(enc_src, applied)`` is aligned to
            ``enc_tgt``.
        shift: ``(N, 2, H, W)`` a misalignment (e.g. constant, a few px) applied on top of
            ``applied`` for the "must not match" term.
        src_data, tgt_data: ``(N, 1, H, W)`` bool, pixels with data.
        tile: tile size (px) of the robust misaligned statistic.
        percentile: which low quantile of the per-tile MSE must exceed ``margin``.
        margin: misaligned MSE beyond which there is no further reward (standardized units; 2 =
            unrelated images).
        border: px at the edge not counted (convolution edge effects).
        collapse_weight: weight of the term that keeps standardized encodings at variance 1.
        eps: added to both MSEs inside the logs.
        contrast_weight: weight of the aligned/misaligned contrast term.
        basin: constant misalignments ``(dx, dy)`` px (e.g. :func:`basin_shifts`) of the basin term
            (module doc), per tile of ``tile`` px; empty = no basin term.
        basin_weight: its weight.
        basin_growth: the required log ratio at shift ``d`` is ``log(1 + basin_growth * |d|**2)``.
        basin_floor: added to both MSEs of the basin ratio: with a floor near the MSE of unrelated
            standardized images' scale (e.g. 0.5) the ratio can only be met by a larger MSE at
            ``d``, not by a tiny aligned MSE (blurring everything away).
        basin_tile: tile size (px) of the basin term; ``None`` = ``tile``.

    Returns:
        :class:`EncoderLossTerms`; ``loss = contrast_weight * (log(aligned + eps) -
        log(min(low, margin) + eps)) + basin_weight * basin + collapse_weight * collapse``.
    """
    inner = torch.zeros_like(tgt_data)
    inner[..., border : inner.shape[-2] - border, border : inner.shape[-1] - border] = True
    src_n = standardize(enc_src, src_data)
    tgt_n = standardize(enc_tgt, tgt_data)
    # A constant encoding standardizes to 0 and would match everywhere: keep its variance at 1.
    collapse = 2.0 - masked_mse(src_n, torch.zeros_like(src_n), src_data) - masked_mse(
        tgt_n, torch.zeros_like(tgt_n), tgt_data
    )
    aligned_mask = warp_mask(src_data, applied) & tgt_data & inner
    aligned = masked_mse(warp(src_n, applied), tgt_n, aligned_mask)
    wrong = compose(shift, applied)
    wrong_mask = warp_mask(src_data, wrong) & tgt_data & inner
    tiles = tile_mse(warp(src_n, wrong), tgt_n, wrong_mask, tile)
    low = torch.nanquantile(tiles, percentile, dim=1)
    low = torch.nan_to_num(low, nan=margin)  # no usable tile: no penalty
    # Log of the contrast aligned / misaligned: scale-free, and a smooth encoding (both terms ~0)
    # gets no credit for a small aligned MSE unless misaligned tiles stay distinguishable.
    contrast = torch.log(aligned + eps) - torch.log(torch.clamp(low, max=margin) + eps)
    shortfall = torch.zeros_like(contrast)
    if basin:
        aligned_src = warp(src_n, applied)
        shortfalls = []
        for dx, dy in basin:
            shift_d = torch.tensor([dx, dy], dtype=applied.dtype).view(1, 2, 1, 1).expand_as(applied)
            moved = compose(shift_d, applied)
            mask = aligned_mask & warp_mask(src_data, moved)
            mse_0 = tile_mse(aligned_src, tgt_n, mask, basin_tile or tile)
            mse_d = tile_mse(warp(src_n, moved), tgt_n, mask, basin_tile or tile)
            wanted = math.log1p(basin_growth * (dx * dx + dy * dy))
            gap = torch.relu(wanted - (torch.log(mse_d + basin_floor) - torch.log(mse_0 + basin_floor)))
            shortfalls.append(gap)
        per_tile = torch.cat(shortfalls, dim=1)
        shortfall = torch.nan_to_num(torch.nanmean(per_tile, dim=1), nan=0.0)
    loss = contrast_weight * contrast + basin_weight * shortfall + collapse_weight * collapse
    return EncoderLossTerms(
        aligned=aligned, misaligned_low=low, collapse=collapse, basin=shortfall, loss=loss
    )
