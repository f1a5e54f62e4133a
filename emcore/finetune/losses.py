"""The finetuner's alignment loss: one public entry point over three interchangeable backends.

The loss of a displacement field ``field`` that aligns ``src`` onto ``tgt`` (``warped =
emcore.field.warp(src, field)``), per batch item::

    loss = mse + sm * rigidity + l2_weight * l2

with the terms defined in :mod:`emcore.finetune.loss_reference` (masked MSE of the warped source
against the target, an 8-neighbour spring rigidity penalty that ignores defects, and a small L2 on
the field). Shapes: ``src``, ``tgt`` ``(N, C, H, W)``, ``field`` ``(N, 2, H, W)`` in px at the
images' mip (:mod:`emcore.field` convention), defect masks ``(N, 1, H, W)`` (nonzero = defect;
``src_defects`` in the source frame, ``tgt_defects`` in the target frame). 0 in an image means no
data (a pixel has no data when all its channels are 0). Only ``field`` gets a gradient.

Backends (``backend=``):

* ``"reference"`` - plain autograd (:mod:`emcore.finetune.loss_reference`), the ground truth.
* ``"fused"`` - CPU fast path (:mod:`emcore.finetune.loss_fused`): custom autograd Functions with
  an analytic forward+backward in one pass over the pixels (C++/OpenMP kernel, pure-torch
  fallback when no compiler is available; the torch fallback also runs on CUDA tensors).
* ``"triton"`` - Triton kernels (:mod:`emcore.finetune.loss_triton`) for CUDA tensors, or CPU
  tensors under ``TRITON_INTERPRET=1`` (tests only: slow).
* ``"auto"`` - ``"triton"`` for CUDA tensors when triton is importable, else ``"fused"``.

API summary
-----------
* :func:`alignment_loss` - the scalar (or per-item ``(N,)``) loss.
* :func:`alignment_loss_terms` - the three terms, each ``(N,)`` (for logging and tests).
* :func:`prepare_masks` / :class:`LossMasks` - the field-independent mask part, computed once per
  pair and reusable across optimizer iterations (pass ``masks=``).
"""

from __future__ import annotations

import importlib.util
import math
import os
from dataclasses import dataclass

import torch

from emcore.finetune.loss_reference import DEFECT, HAS_DATA, LossTerms, reference_terms

__all__ = [
    "BACKENDS",
    "LossMasks",
    "LossTerms",
    "alignment_loss",
    "alignment_loss_terms",
    "prepare_masks",
    "resolve_backend",
    "triton_available",
]

BACKENDS = ("auto", "reference", "fused", "triton")


@dataclass(frozen=True)
class LossMasks:
    """Field-independent per-pixel flags of a batch of pairs.

    Attributes:
        src_flags: ``(N, 1, H, W)`` uint8 in the source frame: bit 1 (value 1) = the source has data,
            bit 2 (value 2) = source defect.
        tgt_flags: ``(N, 1, H, W)`` uint8 in the target frame, same bits for the target.
    """

    src_flags: torch.Tensor
    tgt_flags: torch.Tensor


def _check_images(src: torch.Tensor, tgt: torch.Tensor) -> None:
    for name, t in (("src", src), ("tgt", tgt)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.ndim != 4:
            raise ValueError(f"{name} must have shape (N, C, H, W), got {tuple(t.shape)}")
        if t.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"{name} must be float32 or float64 (normalized images), got {t.dtype}")
        if min(t.shape) < 1:
            raise ValueError(f"{name} must not be empty, got shape {tuple(t.shape)}")
    if src.shape != tgt.shape:
        raise ValueError(f"src {tuple(src.shape)} and tgt {tuple(tgt.shape)} must have the same shape")
    if src.dtype != tgt.dtype or src.device != tgt.device:
        raise ValueError(
            f"src ({src.dtype}, {src.device}) and tgt ({tgt.dtype}, {tgt.device}) must share dtype and device"
        )


def _flags(image: torch.Tensor, defects: torch.Tensor | None, name: str) -> torch.Tensor:
    n, _, h, w = image.shape
    flags = (image != 0).any(dim=1, keepdim=True).to(torch.uint8) * HAS_DATA
    if defects is not None:
        if not isinstance(defects, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(defects).__name__}")
        if tuple(defects.shape) != (n, 1, h, w):
            raise ValueError(
                f"{name} must have shape (N, 1, H, W) = {(n, 1, h, w)} like the images, "
                f"got {tuple(defects.shape)}"
            )
        if defects.device != image.device:
            raise ValueError(f"{name} is on {defects.device} but the images are on {image.device}")
        flags = flags | ((defects != 0).to(torch.uint8) * DEFECT)
    return flags.contiguous()


def prepare_masks(
    src: torch.Tensor,
    tgt: torch.Tensor,
    *,
    src_defects: torch.Tensor | None = None,
    tgt_defects: torch.Tensor | None = None,
) -> LossMasks:
    """Precompute the field-independent mask flags of ``(src, tgt)`` pairs.

    Args:
        src, tgt: ``(N, C, H, W)`` float images (0 = no data).
        src_defects: optional ``(N, 1, H, W)`` bool/numeric, nonzero = defect, source frame.
        tgt_defects: optional ``(N, 1, H, W)``, target frame.
    """
    _check_images(src, tgt)
    return LossMasks(_flags(src, src_defects, "src_defects"), _flags(tgt, tgt_defects, "tgt_defects"))


def _check_field(field: torch.Tensor, src: torch.Tensor) -> None:
    if not isinstance(field, torch.Tensor):
        raise TypeError(f"field must be a torch.Tensor, got {type(field).__name__}")
    n, _, h, w = src.shape
    if tuple(field.shape) != (n, 2, h, w):
        raise ValueError(
            f"field must have shape (N, 2, H, W) = {(n, 2, h, w)} matching src, got {tuple(field.shape)} "
            "(resample it to the images' mip with emcore.field.resample_field)"
        )
    if field.dtype != src.dtype or field.device != src.device:
        raise ValueError(
            f"field ({field.dtype}, {field.device}) must have the images' dtype and device "
            f"({src.dtype}, {src.device})"
        )


def _check_masks(masks: LossMasks, src: torch.Tensor) -> None:
    n, _, h, w = src.shape
    for name in ("src_flags", "tgt_flags"):
        t = getattr(masks, name)
        if tuple(t.shape) != (n, 1, h, w) or t.dtype != torch.uint8 or t.device != src.device:
            raise ValueError(
                f"masks.{name} must be uint8 (N, 1, H, W) = {(n, 1, h, w)} on {src.device}, got "
                f"{t.dtype} {tuple(t.shape)} on {t.device}: build masks with prepare_masks(src, tgt)"
            )


def triton_available() -> bool:
    """Whether the ``triton`` package is importable (without importing it)."""
    return importlib.util.find_spec("triton") is not None


def resolve_backend(backend: str, field: torch.Tensor) -> str:
    """The backend ``alignment_loss`` uses for ``backend`` and a field on ``field.device``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if field.is_cuda and triton_available() else "fused"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' needs the triton package (pip install '.[gpu]')")
        if not field.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                "backend='triton' runs on CUDA tensors; for CPU tensors set TRITON_INTERPRET=1 (slow, "
                "for tests) or use backend='fused'"
            )
    return backend


def alignment_loss_terms(
    src: torch.Tensor,
    tgt: torch.Tensor,
    field: torch.Tensor,
    *,
    src_defects: torch.Tensor | None = None,
    tgt_defects: torch.Tensor | None = None,
    masks: LossMasks | None = None,
    backend: str = "auto",
    sample_offsets: torch.Tensor | None = None,
) -> LossTerms:
    """The loss terms ``(mse, rigidity, l2)``, each ``(N,)``, differentiable w.r.t. ``field``.

    Pass either the defect masks or ``masks=prepare_masks(...)`` (not both). See
    :func:`alignment_loss` for the arguments.
    """
    _check_images(src, tgt)
    _check_field(field, src)
    if masks is None:
        masks = prepare_masks(src, tgt, src_defects=src_defects, tgt_defects=tgt_defects)
    elif src_defects is not None or tgt_defects is not None:
        raise ValueError("pass the defect masks either to prepare_masks or to the loss, not both")
    _check_masks(masks, src)
    backend = resolve_backend(backend, field)
    if sample_offsets is not None:
        n, _, h, w = field.shape
        if (
            not isinstance(sample_offsets, torch.Tensor)
            or sample_offsets.ndim != 4
            or tuple(sample_offsets.shape[1:]) != (2, h, w)
            or sample_offsets.shape[0] not in (1, n)
            or sample_offsets.dtype != field.dtype
            or sample_offsets.device != field.device
        ):
            raise ValueError(
                f"sample_offsets must be a (1 or N, 2, H, W) = (1 or {n}, 2, {h}, {w}) tensor with the "
                f"field's dtype and device, got {getattr(sample_offsets, 'shape', type(sample_offsets))}"
            )
    flags = (masks.src_flags.contiguous(), masks.tgt_flags.contiguous())
    args = (src.contiguous(), tgt.contiguous(), field, *flags)
    if backend == "reference":
        return reference_terms(*args, sample_offsets=sample_offsets)
    if backend == "fused":
        from emcore.finetune.loss_fused import fused_terms

        return fused_terms(*args, sample_offsets=sample_offsets)
    from emcore.finetune.loss_triton import triton_terms

    return triton_terms(*args, sample_offsets=sample_offsets)


def alignment_loss(
    src: torch.Tensor,
    tgt: torch.Tensor,
    field: torch.Tensor,
    *,
    src_defects: torch.Tensor | None = None,
    tgt_defects: torch.Tensor | None = None,
    masks: LossMasks | None = None,
    sm: float = 200.0,
    l2_weight: float = 1e-4,
    backend: str = "auto",
    reduction: str = "mean",
    sample_offsets: torch.Tensor | None = None,
) -> torch.Tensor:
    """The finetuner loss ``mse + sm * rigidity + l2_weight * l2`` of ``field``.

    Args:
        src: ``(N, C, H, W)`` float32/float64 source images or encodings (0 = no data).
        tgt: ``(N, C, H, W)`` target, same dtype and device.
        field: ``(N, 2, H, W)`` px (channel 0 = x), the field that aligns ``src`` onto ``tgt``
            (``warp(src, field)`` ~ ``tgt``); same dtype and device.
        src_defects: optional ``(N, 1, H, W)`` defect mask in the source frame (nonzero = defect).
        tgt_defects: optional ``(N, 1, H, W)`` defect mask in the target frame.
        masks: precomputed :func:`prepare_masks` result (instead of the defect masks).
        sm: rigidity weight (>= 0).
        l2_weight: weight of the field's mean square (>= 0).
        backend: ``"auto"``, ``"reference"``, ``"fused"`` or ``"triton"`` (see module doc).
        reduction: ``"mean"`` (scalar, mean over the batch) or ``"none"`` (``(N,)`` per-item losses).
        sample_offsets: optional ``(1 or N, 2, H, W)`` px added to ``field`` for the MSE term only
            (where the source is sampled); the rigidity and L2 terms see ``field``. The finetuner
            uses fixed random sub-pixel offsets with a target pre-sampled at the same offsets
            (see :mod:`emcore.finetune.coarse_to_fine`, "sampling jitter").

    Returns:
        A scalar or ``(N,)`` tensor in the field's dtype, differentiable w.r.t. ``field`` only.
    """
    for name, value in (("sm", sm), ("l2_weight", l2_weight)):
        if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    terms = alignment_loss_terms(
        src,
        tgt,
        field,
        src_defects=src_defects,
        tgt_defects=tgt_defects,
        masks=masks,
        backend=backend,
        sample_offsets=sample_offsets,
    )
    per_item = terms.mse + sm * terms.rigidity + l2_weight * terms.l2
    return per_item.mean() if reduction == "mean" else per_item
