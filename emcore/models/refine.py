"""Classical affine coarse alignment followed by the learned refiner (``pyramid_refiner``).

``coarse_then_refine(moving, fixed, refiner)`` returns one field ``(N, 2, H, W)`` float32, px at the
images' mip (:mod:`emcore.field` convention), with ``warp(moving, field) ~ fixed``:

1. ``classical = emcore.coarse_xcorr.coarse_align(moving, fixed, model=...)`` (FFT patch
   correlation + a global affine fit: large rotations and translations);
2. ``residual = refiner(warp(moving, classical), fixed)``: the learned network corrects what an
   affine map cannot (smooth non-affine distortion, folds, a small affine error);
3. ``field = compose(residual, classical)`` (:func:`emcore.field.compose`: first the classical
   field, then the residual).

Inputs: single sections ``(1, 1, H, W)`` normalized float32 (0 = no data) at the refiner's
resolution (``resolution_nm`` in its config, about 32-80 nm/px), ``H`` and ``W`` multiples of
``2 ** (levels - 1)`` of the refiner (4 for the shipped one).
"""

from __future__ import annotations

import torch

from emcore.coarse_xcorr import coarse_align
from emcore.field import compose, warp
from emcore.models.format import Model

__all__ = ["coarse_then_refine"]


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
    with torch.no_grad():
        residual = refiner.network(warp(moving, classical), fixed)
    return compose(residual, classical)
