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

Aligner loss (:func:`aligner_loss`): masked MSE of the warped source against the target plus a
rigidity penalty (squared deviation of the field's finite differences from 0, i.e. of the local
Jacobian from identity), not counted across defects (fold masks), so the field may tear there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from emcore.field import compose, warp, warp_mask

__all__ = [
    "EncoderLossTerms",
    "aligner_loss",
    "encoder_pair_loss",
    "masked_mse",
    "rigidity",
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
    ``collapse`` (1 - variance kept by the standardization: > 0 only for near-constant encodings)
    and the total ``loss``."""

    aligned: torch.Tensor
    misaligned_low: torch.Tensor
    collapse: torch.Tensor
    loss: torch.Tensor


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

    Returns:
        :class:`EncoderLossTerms`; ``loss = log(aligned + eps) - log(min(low, margin) + eps) +
        collapse_weight * collapse``.
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
    loss = contrast + collapse_weight * collapse
    return EncoderLossTerms(aligned=aligned, misaligned_low=low, collapse=collapse, loss=loss)


def rigidity(field: torch.Tensor, defects: torch.Tensor | None = None) -> torch.Tensor:
    """Per-item mean squared finite difference of the field (px^2), skipping pairs that touch defects.

    Args:
        field: ``(N, 2, H, W)`` px.
        defects: optional ``(N, 1, H, W)`` bool in the field's frame; a difference between two
            pixels is ignored when either is a defect.
    """
    dx = field[..., :, 1:] - field[..., :, :-1]
    dy = field[..., 1:, :] - field[..., :-1, :]
    ex, ey = (dx**2).sum(1, keepdim=True), (dy**2).sum(1, keepdim=True)
    if defects is None:
        return ex.mean(dim=(1, 2, 3)) + ey.mean(dim=(1, 2, 3))
    ok = (~defects.bool()).to(field.dtype)
    okx = ok[..., :, 1:] * ok[..., :, :-1]
    oky = ok[..., 1:, :] * ok[..., :-1, :]
    return (ex * okx).sum(dim=(1, 2, 3)) / okx.sum(dim=(1, 2, 3)).clamp(min=1) + (ey * oky).sum(
        dim=(1, 2, 3)
    ) / oky.sum(dim=(1, 2, 3)).clamp(min=1)


def aligner_loss(
    src: torch.Tensor,
    tgt: torch.Tensor,
    field: torch.Tensor,
    *,
    tgt_defects: torch.Tensor | None = None,
    rigidity_weight: float = 1.0,
    border: int = 4,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Self-supervised loss of a field aligning ``src`` onto ``tgt``: ``(loss, mse, rigidity)``, ``(N,)``.

    The MSE counts pixels where both ``warp(src, field)`` and ``tgt`` have data and ``tgt_defects``
    (target frame) is not set; the rigidity ignores differences touching ``tgt_defects``.
    """
    src_data = (src != 0).any(dim=1, keepdim=True)
    tgt_data = (tgt != 0).any(dim=1, keepdim=True)
    mask = warp_mask(src_data, field) & tgt_data
    if tgt_defects is not None:
        mask &= ~tgt_defects.bool()
    inner = torch.zeros_like(mask)
    inner[..., border : mask.shape[-2] - border, border : mask.shape[-1] - border] = True
    mse = masked_mse(warp(src, field), tgt, mask & inner)
    rig = rigidity(field, tgt_defects)
    return mse + rigidity_weight * rig, mse, rig
