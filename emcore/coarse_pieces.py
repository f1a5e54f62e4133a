"""Coarse alignment that tears: one transform per tissue piece, one discontinuous field.

A fold or crack across a whole section (:mod:`emcore.pieces`) lets its two sides move apart by far
more than a single rigid model or the patch search of :func:`emcore.coarse_xcorr.coarse_align` can
follow (a real 50 nm/px pair: one side ~175 px from where the rigid fit puts it). Here each piece
is aligned on its own, with the classical masked cross-correlation, and the per-piece transforms
are assembled into one pull field with a discontinuity along the defect.

Conventions: images ``(H, W)`` or ``(1, 1, H, W)`` at one coarse mip, 0 = no data; defect masks
nonzero = defect; fields ``(1, 2, H, W)`` float32 px at that mip, :mod:`emcore.field` convention
(``warp(source, field) ~= target``, the field lives in the *target* frame). Matrices are
:mod:`emcore.affine` displacement matrices, origin = the image's top-left pixel.

Method
------
1. **Pieces** of the section whose defect mask splits its tissue (:func:`emcore.pieces.split_pieces`):
   the source's, else the target's (if both split, the source's; said in ``reason``).
2. **Whole-section estimate**: :func:`emcore.coarse_xcorr.coarse_align` with the defect masks, as
   the unsplit path does. It is the fallback transform.
3. **Per piece** (area at least ``min_piece_fraction`` of the tissue): everything but the piece is
   masked out; a translation search at half resolution over the *whole* section (radius = the
   half-resolution image size - 1, never clamped; a peak at that limit is unreliable) places the
   piece, the source is shifted by that integer translation, and
   :func:`~emcore.coarse_xcorr.coarse_align` (``model``) refines it with a search radius of
   ``refine_shift`` px (a peak at that limit is unreliable too). A piece too small or unreliable
   takes the whole-section transform, with the reason in its :class:`PieceTransform`.
4. **Field**: every target pixel takes the transform of the piece it reads from.
   *Source pieces*: target pixel ``p`` belongs to piece ``i`` when ``p + f_i(p)`` falls inside
   piece ``i`` (bilinear sample of the piece's inside distance >= 0.5 px; the deepest wins where
   several do). Pixels no piece lands on (``gap``: where the target shows tissue the source lost in
   the fold, or background) take the transform of the nearest piece (distance in the target frame)
   among those that read them from the fold band or from no data, never from another piece's
   tissue; if every piece would read another's tissue, the nearest one, and ``gap_conflicts`` counts
   those pixels. *Target pieces*: the pieces are already in the target frame; defect/background
   pixels take the nearest piece's transform. Inside each piece's region the field is that piece's
   affine, so its Jacobian is the affine's (physical for rigid fits); the jumps are confined to the
   region borders (``seam``).

API summary
-----------
* :func:`coarse_align_pieces` -> :class:`PiecewiseAlignment` ``(field, matrix, pieces, side,
  transforms, whole, assignment, gap, seam, gap_conflicts, reliable, reason)``; then
  ``.tear_mask(source_mask)`` (defects for a finetuner run on ``warp(source, field)``) and
  ``.compose_residual(residual)`` (that finetuner's result composed with the torn field without
  blurring the tear). Finetuning from the torn field as ``init_field`` instead does not keep the
  tear: the finetuner's pyramid averages the init field down to its coarsest level (measured in
  ``benchmarks/bench_folds.py``'s first version: far side 9.7 px median on a neighbour pair).
* :class:`PieceTransform` ``(label, area, matrix, estimated, reliable, fallback, peak, reason)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from emcore.affine import affine_displacement_field, compose_matrices
from emcore.coarse_xcorr import (
    CoarseAlignment,
    _as_2d,
    _half,
    coarse_align,
    estimate_translation,
    warp_mask_2d,
)
from emcore.field import warp
from emcore.pieces import Pieces, split_pieces

__all__ = ["PieceTransform", "PiecewiseAlignment", "coarse_align_pieces"]


@dataclass(frozen=True)
class PieceTransform:
    """The transform of one piece.

    Attributes:
        label: the piece's label in :attr:`PiecewiseAlignment.pieces`.
        area: its area (px).
        matrix: ``(2, 3)`` float64 displacement matrix used for the piece (its own estimate, or the
            whole-section one when ``fallback``).
        estimated: the piece's own estimate (``None`` if the piece was too small to try).
        reliable: the piece's own estimate is reliable.
        fallback: the whole-section transform is used instead.
        peak: correlation peak of the piece's estimate (-1 if not tried).
        reason: why it fell back ("" when its own estimate is used).
    """

    label: int
    area: int
    matrix: torch.Tensor
    estimated: torch.Tensor | None
    reliable: bool
    fallback: bool
    peak: float
    reason: str


@dataclass(frozen=True)
class PiecewiseAlignment:
    """Result of :func:`coarse_align_pieces`.

    Attributes:
        field: ``(1, 2, H, W)`` float32 px, ``warp(source, field) ~= target``, torn along the defect.
        matrix: ``(2, 3)`` of the largest piece (the transform a single affine should follow).
        pieces: the :class:`~emcore.pieces.Pieces` used (of the source, or of the target).
        side: ``"source"`` or ``"target"``: whose pieces.
        transforms: one :class:`PieceTransform` per piece (label order).
        whole: the whole-section :class:`~emcore.coarse_xcorr.CoarseAlignment` (the fallback).
        assignment: ``(H, W)`` int32, target frame: the piece whose transform each pixel uses.
        gap: ``(H, W)`` bool, target frame: pixels no piece lands on (they read the fold band or no
            data; always False for target pieces' tissue).
        seam: ``(H, W)`` bool, target frame: pixels next to a change of ``assignment`` (the tear).
        gap_conflicts: gap pixels whose chosen transform reads another piece's tissue.
        reliable: the largest piece's transform is reliable (its own or the whole-section one).
        reason: what fell back and why ("" when every piece has its own reliable estimate).
    """

    field: torch.Tensor
    matrix: torch.Tensor
    pieces: Pieces
    side: str
    transforms: list[PieceTransform]
    whole: CoarseAlignment
    assignment: np.ndarray
    gap: np.ndarray
    seam: np.ndarray
    gap_conflicts: int
    reliable: bool
    reason: str

    def tear_mask(self, source_mask: torch.Tensor | None = None, *, dilate: int = 1) -> torch.Tensor:
        """``(1, 1, H, W)`` bool, target frame: where a finetuner working on ``warp(source,
        field)`` must not trust the data nor keep springs: the seam and the gap (grown by
        ``dilate`` px), and ``source_mask`` (source frame, nonzero = defect) warped by the field."""
        tear = self.seam | self.gap
        if dilate:
            tear = ndimage.binary_dilation(tear, iterations=dilate)
        out = torch.from_numpy(tear)[None, None]
        if source_mask is not None:
            moved = warp_mask_2d(_as_2d(source_mask.to(torch.float32), "source_mask"), self.field)
            out = out | moved[None, None]
        return out

    def compose_residual(self, residual: torch.Tensor) -> torch.Tensor:
        """``compose(residual, field)`` without blurring the tear: the field that warps ``source``
        as ``warp(warp(source, field), residual)`` does.

        ``residual`` ``(1, 2, H, W)`` px (e.g. the finetuner's result on ``warp(source, field)``).
        Each pixel ``p`` reads ``q = p + residual(p)``; the piece is ``assignment`` at the pixel
        nearest ``q`` and its affine is evaluated exactly at ``q`` (no interpolation across pieces).
        """
        if residual.shape != self.field.shape:
            raise ValueError(
                f"residual {tuple(residual.shape)} must match the field {tuple(self.field.shape)}"
            )
        _, _, h, w = residual.shape
        r = residual[0].double()
        ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                                indexing="ij")  # fmt: skip
        qx, qy = xs + r[0], ys + r[1]
        iy = qy.round().clamp(0, h - 1).long()
        ix = qx.round().clamp(0, w - 1).long()
        label = torch.from_numpy(self.assignment.astype(np.int64))[iy, ix].clamp_min(1) - 1
        mats = torch.stack([t.matrix for t in self.transforms])[label]  # (H, W, 2, 3)
        fx = mats[..., 0, 0] * qx + mats[..., 0, 1] * qy + mats[..., 0, 2]
        fy = mats[..., 1, 0] * qx + mats[..., 1, 1] * qy + mats[..., 1, 2]
        return (residual.double() + torch.stack((fx, fy))[None]).to(residual.dtype)


def _shift_matrix(dx: float, dy: float) -> torch.Tensor:
    return torch.tensor([[0.0, 0.0, dx], [0.0, 0.0, dy]], dtype=torch.float64)


def _estimate_piece(
    src: torch.Tensor,
    tgt: torch.Tensor,
    src_ignore: torch.Tensor,
    tgt_ignore: torch.Tensor,
    model: str,
    refine_shift: int,
    min_peak: float,
    min_margin: float,
) -> tuple[torch.Tensor, bool, float, str]:
    """(matrix, reliable, peak, reason) of one piece: half-resolution full search, then refine."""
    h, w = src.shape
    small_src, small_tgt = _half(src, src_ignore), _half(tgt, tgt_ignore)
    reach = min(small_src.shape) - 1
    first = estimate_translation(
        small_src, small_tgt, max_shift=reach, min_peak=min_peak, min_margin=min_margin
    )
    if not first.reliable:
        return _shift_matrix(2 * first.dx, 2 * first.dy), False, first.peak, f"coarse search: {first.reason}"
    dx, dy = float(round(2 * first.dx)), float(round(2 * first.dy))
    start = _shift_matrix(dx, dy)
    shift = affine_displacement_field(start, h, w)
    moved = warp(src[None, None], shift)[0, 0]
    lost = warp((src != 0).float()[None, None], shift)[0, 0] < 0.999  # shifted in from outside
    moved_ignore = warp_mask_2d(src_ignore, shift) | lost
    result = coarse_align(
        moved, tgt, src_mask=moved_ignore, tgt_mask=tgt_ignore, model=model, max_shift=refine_shift,
        min_peak=min_peak, min_margin=min_margin,
    )  # fmt: skip
    matrix = compose_matrices(result.matrix, start)
    reason = "" if result.reliable else f"refine: {result.reason}"  # includes a peak at the limit
    return matrix, not reason, float(result.translation.peak), reason


def _inside_depth(mask: np.ndarray) -> torch.Tensor:
    """``(1, 1, H, W)`` float32: distance (px) to the nearest pixel outside ``mask`` (0 outside)."""
    return torch.from_numpy(ndimage.distance_transform_edt(mask).astype(np.float32))[None, None]


def _assign_source_pieces(pieces: Pieces, fields: list[torch.Tensor]) -> tuple[np.ndarray, np.ndarray, int]:
    """Target-frame assignment for source pieces: (assignment, gap, gap_conflicts)."""
    n = pieces.count
    h, w = pieces.labels.shape
    depth = torch.stack([warp(_inside_depth(pieces.mask(i + 1)), fields[i])[0, 0] for i in range(n)])
    best = depth.argmax(0)
    inside = depth.max(0).values >= 0.5
    assignment = np.where(inside.numpy(), best.numpy() + 1, 0).astype(np.int32)
    gap = assignment == 0
    if not gap.any():
        return assignment, gap, 0
    tissue = pieces.labels > 0
    cost = np.full((n, h, w), np.inf)
    clash = np.zeros((n, h, w), dtype=bool)
    for i in range(n):
        other = torch.from_numpy((tissue & (pieces.labels != i + 1)).astype(np.float32))[None, None]
        clash[i] = warp(other, fields[i])[0, 0].numpy() >= 0.5
        region = assignment == i + 1
        if region.any():
            cost[i] = ndimage.distance_transform_edt(~region)
    penalty = np.where(clash, 1e9, 0.0)
    choice = np.argmin(cost + penalty, axis=0)
    conflicts = int((gap & np.take_along_axis(clash, choice[None], 0)[0]).sum())
    assignment = np.where(gap, choice + 1, assignment).astype(np.int32)
    return assignment, gap, conflicts


def _assign_target_pieces(pieces: Pieces) -> np.ndarray:
    """Target-frame assignment for target pieces: each pixel's nearest piece."""
    labels = pieces.labels
    if (labels > 0).all():
        return labels.copy()
    _, (iy, ix) = ndimage.distance_transform_edt(labels == 0, return_indices=True)
    return labels[iy, ix].astype(np.int32)


def _seam(assignment: np.ndarray) -> np.ndarray:
    change = np.zeros(assignment.shape, dtype=bool)
    dy = assignment[1:] != assignment[:-1]
    dx = assignment[:, 1:] != assignment[:, :-1]
    change[1:] |= dy
    change[:-1] |= dy
    change[:, 1:] |= dx
    change[:, :-1] |= dx
    return change


def coarse_align_pieces(
    source: torch.Tensor,
    target: torch.Tensor,
    source_mask: torch.Tensor | None = None,
    target_mask: torch.Tensor | None = None,
    *,
    model: str = "rigid",
    min_piece_fraction: float = 0.05,
    sliver_fraction: float = 0.02,
    refine_shift: int | None = None,
    min_peak: float = 0.15,
    min_margin: float = 0.05,
) -> PiecewiseAlignment:
    """Align ``source`` onto ``target`` piece by piece (see the module docstring).

    Args:
        source, target: ``(H, W)`` or ``(1, 1, H, W)`` normalized float images, 0 = no data.
        source_mask, target_mask: defect masks (nonzero = fold band / crack gap), each in its own
            image's frame; the one that splits its section into >= 2 pieces defines the pieces.
        model: the per-piece (and whole-section) model of :func:`~emcore.coarse_xcorr.coarse_align`.
        min_piece_fraction: pieces below this fraction of the tissue area are not estimated (they
            take the whole-section transform).
        sliver_fraction: :func:`~emcore.pieces.split_pieces`'s ``min_fraction``.
        refine_shift: search radius (px) of the refinement after the half-resolution search
            (default ``max(8, min(H, W) // 16)``).
        min_peak, min_margin: reliability thresholds of every correlation.

    Returns:
        :class:`PiecewiseAlignment`. Without a split (< 2 pieces on both sides) it is the whole-section
        estimate as one piece.

    Raises:
        BlankSectionError: ``source`` or ``target`` has no usable data.
    """
    src, tgt = _as_2d(source, "source"), _as_2d(target, "target")
    if src.shape != tgt.shape:
        raise ValueError(f"source {tuple(src.shape)} and target {tuple(tgt.shape)} must have the same shape")
    h, w = src.shape
    zeros = torch.zeros(h, w, dtype=torch.bool)
    src_def = zeros if source_mask is None else _as_2d(source_mask.to(torch.float32), "source_mask") != 0
    tgt_def = zeros if target_mask is None else _as_2d(target_mask.to(torch.float32), "target_mask") != 0
    whole = coarse_align(src, tgt, src_mask=src_def, tgt_mask=tgt_def, model=model,
                         min_peak=min_peak, min_margin=min_margin)  # fmt: skip
    src_pieces = split_pieces(src, src_def, min_fraction=sliver_fraction)
    tgt_pieces = split_pieces(tgt, tgt_def, min_fraction=sliver_fraction)
    notes = []
    if src_pieces.count >= 2:
        side, pieces = "source", src_pieces
        if tgt_pieces.count >= 2:
            notes.append(f"the target also splits into {tgt_pieces.count} pieces (not modelled)")
    elif tgt_pieces.count >= 2:
        side, pieces = "target", tgt_pieces
    else:
        side, pieces = "source", src_pieces
    shift = max(8, min(h, w) // 16) if refine_shift is None else int(refine_shift)
    tissue = max(1, sum(pieces.areas))
    transforms = []
    for label, area in enumerate(pieces.areas, start=1):
        if pieces.count < 2:
            transforms.append(PieceTransform(label, area, whole.matrix, whole.matrix, whole.reliable, False,
                                             whole.translation.peak, whole.reason))  # fmt: skip
            continue
        if area < min_piece_fraction * tissue:
            reason = f"piece {label}: {area} px is below {min_piece_fraction:.0%} of the tissue"
            transforms.append(PieceTransform(label, area, whole.matrix, None, False, True, -1.0, reason))
            continue
        ignore = torch.from_numpy(~pieces.mask(label))
        src_ignore, tgt_ignore = (ignore, tgt_def) if side == "source" else (src_def, ignore)
        matrix, ok, peak, why = _estimate_piece(
            src, tgt, src_ignore, tgt_ignore, model, shift, min_peak, min_margin
        )
        if ok:
            transforms.append(PieceTransform(label, area, matrix, matrix, True, False, peak, ""))
        else:
            reason = f"piece {label}: {why}; using the whole-section transform"
            transforms.append(PieceTransform(label, area, whole.matrix, matrix, False, True, peak, reason))
    if not transforms:  # no tissue at all: coarse_align would have raised; keep the types honest
        transforms.append(PieceTransform(1, 0, whole.matrix, whole.matrix, whole.reliable, False, -1.0, ""))
    fields = [affine_displacement_field(t.matrix, h, w) for t in transforms]
    if pieces.count < 2:
        assignment = np.ones((h, w), dtype=np.int32)
        gap, conflicts = np.zeros((h, w), dtype=bool), 0
    elif side == "source":
        assignment, gap, conflicts = _assign_source_pieces(pieces, fields)
    else:
        assignment = _assign_target_pieces(pieces)
        gap, conflicts = np.zeros((h, w), dtype=bool), 0
    stacked = torch.cat(fields)  # (n, 2, H, W)
    index = torch.from_numpy(assignment.astype(np.int64) - 1).clamp_min(0)
    field = stacked.gather(0, index[None, None].expand(1, 2, h, w))
    first = transforms[0]
    reliable = first.reliable or (first.fallback and whole.reliable)
    notes += [t.reason for t in transforms if t.reason and pieces.count >= 2]
    if conflicts:
        notes.append(f"{conflicts} gap px read another piece's tissue")
    if not math.isfinite(float(field.abs().max())):
        raise ValueError("piecewise field is not finite")  # cannot happen for finite matrices
    return PiecewiseAlignment(
        field=field.contiguous(), matrix=first.matrix, pieces=pieces, side=side, transforms=transforms,
        whole=whole, assignment=assignment, gap=gap, seam=_seam(assignment), gap_conflicts=conflicts,
        reliable=bool(reliable), reason="; ".join(notes),
    )  # fmt: skip
