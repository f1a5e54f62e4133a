"""Learned coarse alignment of whole sections: the stand-alone aligner, or the classical one + a refiner.

Two ways to use the shipped learned models (:mod:`emcore.models.pyramid_aligner` networks), both
returning a field ``(1, 2, H, W)`` float32 in px at the images' mip (:mod:`emcore.field`
convention) with ``warp(moving, field) ~ fixed``:

* ``learned_align(moving, fixed, aligner)``: one forward pass of ``pyramid_aligner``.
* ``coarse_then_refine(moving, fixed, refiner)``:

  1. ``classical = emcore.coarse_xcorr.coarse_align(moving, fixed, model=...)`` (FFT patch
     correlation + a global affine fit: large rotations and translations);
  2. ``residual = refiner(warp(moving, classical), fixed)``: the learned network corrects what an
     affine map cannot (smooth non-affine distortion, folds, a small affine error);
  3. ``field = compose(residual, classical)`` (:func:`emcore.field.compose`: first the classical
     field, then the residual).

``learned_coarse_align(moving, fixed, method=..., network=...)`` wraps both for a pipeline: masks
(defects, nonzero = ignore) become "no data", blank sections raise
:class:`~emcore.errors.BlankSectionError` like the classical aligner, and the result carries a
``confidence`` (the median tile Pearson correlation of ``warp(moving, field)`` with ``fixed``,
:func:`emcore.quality.tile_correlation`) and ``reliable`` flag.

Inputs: single sections ``(H, W)`` or ``(1, 1, H, W)`` normalized float32 (0 = no data) at the
model's resolution (``resolution_nm`` in its config, 32-80 nm/px for the shipped ones), any size:
they are zero-padded (no data) to the network's size multiple and the field is cropped back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from emcore.coarse_xcorr import check_has_data, coarse_align
from emcore.field import compose, warp
from emcore.models.format import Model
from emcore.quality import tile_correlation

__all__ = [
    "LEARNED_METHODS",
    "LearnedAlignment",
    "coarse_then_refine",
    "learned_align",
    "learned_coarse_align",
    "run_aligner",
]

#: Coarse methods that use a shipped model, with that model's name.
LEARNED_METHODS = {"learned": "pyramid_aligner", "classical+refine": "pyramid_refiner"}


def _section(image: torch.Tensor, name: str) -> torch.Tensor:
    """``(1, 1, H, W)`` float32 view of an ``(H, W)`` or ``(1, 1, H, W)`` section."""
    if not isinstance(image, torch.Tensor) or image.ndim not in (2, 4) or (
        image.ndim == 4 and image.shape[:2] != (1, 1)
    ):
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"{name} must be one (H, W) or (1, 1, H, W) section, got {shape}")
    return image.reshape(1, 1, *image.shape[-2:]).to(torch.float32)


def run_aligner(model: Model, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
    """``model.network(moving, fixed)`` on ``(1, 1, H, W)`` sections of any size: zero-padded at the
    bottom / right to the network's ``size_multiple``, the field cropped back to ``(1, 2, H, W)``."""
    if moving.shape != fixed.shape:
        raise ValueError(
            f"moving and fixed must both be (1, 1, H, W) sections, got {tuple(moving.shape)} and "
            f"{tuple(fixed.shape)}"
        )
    h, w = moving.shape[-2:]
    multiple = int(getattr(model.network, "size_multiple", 1))
    pad = (0, -w % multiple, 0, -h % multiple)
    with torch.no_grad():
        field = model.network(F.pad(moving, pad), F.pad(fixed, pad))
    return field[..., :h, :w].contiguous()


def learned_align(moving: torch.Tensor, fixed: torch.Tensor, aligner: Model) -> torch.Tensor:
    """The stand-alone learned aligner's field ``(1, 2, H, W)`` (see the module docstring)."""
    return run_aligner(aligner, _section(moving, "moving"), _section(fixed, "fixed"))


def coarse_then_refine(
    moving: torch.Tensor, fixed: torch.Tensor, refiner: Model, *, model: str = "affine"
) -> torch.Tensor:
    """``compose(refiner(warp(moving, classical), fixed), classical)`` (see the module docstring)."""
    if moving.ndim != 4 or moving.shape[:2] != (1, 1) or moving.shape != fixed.shape:
        raise ValueError(
            f"moving and fixed must both be (1, 1, H, W) sections, got {tuple(moving.shape)} and "
            f"{tuple(fixed.shape)}"
        )
    classical = coarse_align(moving, fixed, model=model).field
    return compose(run_aligner(refiner, warp(moving, classical), fixed), classical)


@dataclass(frozen=True)
class LearnedAlignment:
    """Result of :func:`learned_coarse_align`.

    Attributes:
        field: ``(1, 2, H, W)`` float32 px, ``warp(moving, field) ~ fixed``.
        confidence: median tile Pearson correlation of the aligned pair, clamped to ``[0, 1]``
            (0 when no tile has enough common data).
        reliable: ``confidence >= min_confidence`` (and, for ``"classical+refine"``, the classical
            step was reliable).
        reason: why it is not reliable ("" when it is).
    """

    field: torch.Tensor
    confidence: float
    reliable: bool
    reason: str


def learned_coarse_align(
    moving: torch.Tensor,
    fixed: torch.Tensor,
    *,
    method: str,
    network: Model,
    moving_mask: torch.Tensor | None = None,
    fixed_mask: torch.Tensor | None = None,
    model: str = "affine",
    min_confidence: float = 0.15,
) -> LearnedAlignment:
    """Align ``moving`` onto ``fixed`` with a learned ``method`` (a key of :data:`LEARNED_METHODS`).

    Args:
        moving, fixed: ``(H, W)`` or ``(1, 1, H, W)`` normalized sections, 0 = no data.
        method: ``"learned"`` (``network`` = the stand-alone ``pyramid_aligner``) or
            ``"classical+refine"`` (``network`` = ``pyramid_refiner``, after the classical aligner).
        moving_mask, fixed_mask: optional defect masks (nonzero = ignore) in each image's frame:
            those pixels count as no data.
        model: the classical aligner's model for ``"classical+refine"``.
        min_confidence: confidence below which the result is flagged unreliable.

    Raises:
        BlankSectionError: either section has (almost) no data or constant data.
    """
    if method not in LEARNED_METHODS:
        raise ValueError(f"method must be one of {sorted(LEARNED_METHODS)}, got {method!r}")
    moving, fixed = _section(moving, "moving"), _section(fixed, "fixed")
    if moving.shape != fixed.shape:
        raise ValueError(
            f"moving {tuple(moving.shape)} and fixed {tuple(fixed.shape)} must have the same shape"
        )
    check_has_data(moving, moving_mask, "moving")
    check_has_data(fixed, fixed_mask, "fixed")
    if moving_mask is not None:
        moving = torch.where(_section(moving_mask, "moving_mask") != 0, 0.0, moving)
    if fixed_mask is not None:
        fixed = torch.where(_section(fixed_mask, "fixed_mask") != 0, 0.0, fixed)
    reason = ""
    if method == "learned":
        field = run_aligner(network, moving, fixed)
    else:
        classical = coarse_align(moving, fixed, model=model)
        reason = "" if classical.reliable else f"classical step: {classical.reason}"
        field = compose(run_aligner(network, warp(moving, classical.field), fixed), classical.field)
    h, w = moving.shape[-2:]
    quality = tile_correlation(warp(moving, field), fixed, tile=max(16, min(h, w) // 4))
    confidence = 0.0 if math.isnan(quality.median) else min(1.0, max(0.0, quality.median))
    if not reason and confidence < min_confidence:
        reason = f"aligned tile correlation {confidence:.3f} < {min_confidence}"
    return LearnedAlignment(field=field, confidence=confidence, reliable=not reason, reason=reason)
