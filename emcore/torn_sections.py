"""A torn section's coarse field in the stack frame: each piece its own affine, beside the section affine.

A fold or crack that splits section ``z`` into pieces (:mod:`emcore.pieces`) lets the pieces move
apart by far more than the finetuner's residual range. The pair ``z -> z - k`` estimated piece by
piece (:func:`emcore.coarse_pieces.coarse_align_pieces`, source side) gives one displacement matrix
``M_p`` per piece ``p`` (raw ``z - k`` frame -> raw ``z`` frame, label order, ``p = 0`` the largest
piece); the section affine ``A[z]`` (stack frame -> raw ``z``) follows the largest piece. In position
maps ``T``, a stack-frame pixel that belongs to piece ``p`` reads raw ``z`` at

    ``T_S_p = T_M_p o T_M_0^-1 o T_A``     (displacement matrix ``compose_matrices(compose_matrices(A,
    invert_matrix(M_0)), M_p)``; :func:`section_piece_matrices`)

because ``T_A ~= T_M_0 o T_A[z - k]``. ``S_0 = A`` exactly.

Which stack-frame pixels belong to which piece (:func:`stack_piece_assignment`) is decided as
:func:`emcore.coarse_pieces.coarse_align_pieces` decides it in the target frame: pixel ``s`` belongs
to piece ``p`` when ``T_S_p(s)`` falls inside piece ``p`` (the deepest wins), pixels no piece lands
on take the nearest piece that does not read another piece's tissue.

The field itself (:func:`piecewise_affine_field`) is evaluated exactly on any box at a finer mip
from the per-piece matrices and the piece map at the coarse mip (nearest coarse pixel; outside the
map the nearest edge pixel's piece), so a task holds one box at the fine mip, never a whole section.

Conventions: :mod:`emcore.field` (pull, ``(1, 2, H, W)`` px, channel 0 = x); matrices are
:mod:`emcore.affine` displacement matrices ``(2, 3)`` float64.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from emcore.affine import affine_displacement_field, compose_matrices, invert_matrix
from emcore.coarse_pieces import _assign_source_pieces
from emcore.pieces import Pieces

__all__ = ["piecewise_affine_field", "section_piece_matrices", "stack_piece_assignment"]


def _apply(matrix: torch.Tensor, point: torch.Tensor) -> torch.Tensor:
    """``T_matrix(point)``: the position map of a displacement matrix at ``(x, y)``."""
    return point + matrix[:, :2] @ point + matrix[:, 2]


def section_piece_matrices(
    section_affine: torch.Tensor | Sequence,
    piece_matrices: Sequence[torch.Tensor | Sequence],
    centroids: Sequence[tuple[float, float]] | None = None,
) -> list[torch.Tensor]:
    """``S_p`` for every piece (stack frame -> raw ``z``); the first equals ``A``.

    Args:
        section_affine: ``A[z]`` ``(2, 3)`` (stack frame -> raw ``z``).
        piece_matrices: ``M_p`` ``(2, 3)`` each (raw ``z - k`` -> raw ``z``), the largest piece first.
            All matrices in px at one mip with one origin.
        centroids: ``(x, y)`` of each piece in raw ``z`` (px, same origin). Without them the piece
            motion relative to piece 0 is the full affine ``D_p = M_p o M_0^-1`` and ``S_p =
            compose_matrices(compose_matrices(A, invert_matrix(M_0)), M_p)``. With them it is only
            the translation ``D_p`` has at piece ``p`` (``S_p = D_p o A`` keeps ``A``'s linear part):
            the pieces of a torn section slide rigidly against each other, and a small piece's own
            linear part is poorly constrained (a translation-only fit of a 1 deg rotated section put
            the far side's end 1-2 px off); the finetuner takes what is left.

    Returns:
        One ``(2, 3)`` float64 matrix per piece.
    """
    if not piece_matrices:
        raise ValueError("piece_matrices must hold at least one matrix (the largest piece's)")
    if centroids is not None and len(centroids) != len(piece_matrices):
        raise ValueError(f"{len(centroids)} centroids for {len(piece_matrices)} pieces")
    a = torch.as_tensor(section_affine, dtype=torch.float64)
    mats = [torch.as_tensor(m, dtype=torch.float64) for m in piece_matrices]
    inverse0 = invert_matrix(mats[0])
    base = compose_matrices(a, inverse0)
    out = [a.clone()]
    for i, m in enumerate(mats[1:], start=1):
        if centroids is None:
            out.append(compose_matrices(base, m))
            continue
        c = torch.tensor([float(centroids[i][0]), float(centroids[i][1])], dtype=torch.float64)
        x = _apply(mats[0], _apply(invert_matrix(m), c))  # where piece 0's placement puts it
        shift = torch.zeros(2, 3, dtype=torch.float64)
        shift[:, 2] = c - x  # T_D(x) = c: D's translation at the piece
        out.append(compose_matrices(a, shift))
    return out


def stack_piece_assignment(pieces: Pieces, matrices: Sequence[torch.Tensor]) -> np.ndarray:
    """``(H, W)`` int32 labels ``1..n``, stack frame: the piece whose ``S_p`` each pixel uses.

    ``pieces`` are the section's pieces (raw frame, ``(H, W)``, at the matrices' mip and origin);
    ``matrices`` the ``S_p`` of :func:`section_piece_matrices` (label order).
    """
    if len(matrices) != pieces.count:
        raise ValueError(f"{len(matrices)} matrices for {pieces.count} pieces")
    h, w = pieces.labels.shape
    fields = [affine_displacement_field(m, h, w) for m in matrices]
    assignment, _, _ = _assign_source_pieces(pieces, fields)
    return assignment


def piecewise_affine_field(
    matrices: Sequence[torch.Tensor],
    assignment: np.ndarray,
    scale: int,
    origin: tuple[int, int],
    shape: tuple[int, int],
) -> torch.Tensor:
    """``(1, 2, h, w)`` float32: the torn field on a box at a finer mip.

    Args:
        matrices: ``S_p`` ``(2, 3)`` per piece, px at the fine mip, origin = the fine pixel at the
            top-left of ``assignment[0, 0]`` (:func:`emcore.affine.rescale_matrix` of the coarse
            matrices keeps that origin).
        assignment: ``(Hc, Wc)`` labels ``1..n`` at the coarse mip (:func:`stack_piece_assignment`).
        scale: ``2 ** (coarse_mip - fine_mip)`` (fine pixel ``x`` lies in coarse pixel ``x // scale``).
        origin: ``(x, y)`` of the box's first pixel, fine px relative to that origin (may be < 0).
        shape: ``(h, w)`` of the box.
    """
    if scale < 1:
        raise ValueError(f"scale must be >= 1, got {scale}")
    h, w = shape
    hc, wc = assignment.shape
    xs = torch.arange(w, dtype=torch.int64) + int(origin[0])
    ys = torch.arange(h, dtype=torch.int64) + int(origin[1])
    cx = torch.div(xs, scale, rounding_mode="floor").clamp(0, wc - 1)
    cy = torch.div(ys, scale, rounding_mode="floor").clamp(0, hc - 1)
    labels = torch.from_numpy(assignment.astype(np.int64))[cy[:, None], cx[None, :]]
    index = (labels.clamp(1, len(matrices)) - 1)
    mats = torch.stack([torch.as_tensor(m, dtype=torch.float64) for m in matrices])[index]  # (h, w, 2, 3)
    gx, gy = xs.to(torch.float64)[None, :], ys.to(torch.float64)[:, None]
    fx = mats[..., 0, 0] * gx + mats[..., 0, 1] * gy + mats[..., 0, 2]
    fy = mats[..., 1, 0] * gx + mats[..., 1, 1] * gy + mats[..., 1, 2]
    return torch.stack((fx, fy))[None].to(torch.float32)
