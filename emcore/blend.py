"""Blending overlapping chunk outputs into one seamless result, and cropping context pads.

Chunked processing (fields, rendered images) tiles the volume into *core* chunks (e.g. from
:meth:`emcore.geometry.ChunkGrid.chunks`). Each processing chunk reads its core plus a context
pad, and writes an *output piece*: its core grown by a blend ``margin`` on each side (clipped to
the volume bounds). Neighbouring pieces overlap by ``2 * margin`` px around every core boundary,
where their weights are smooth raised-cosine ramps that sum to exactly 1; elsewhere a piece has
weight 1. Summing ``weight * piece`` over pieces therefore reproduces a result computed in one
piece wherever each chunk's output is itself exact (i.e. its context pad covers what its
computation needs beyond ``margin``), and softens chunk seams where it is not.

Boxes are :class:`emcore.geometry.VoxelBox` (xyz voxels at the data's mip). Blending is in-plane:
only x and y of the boxes are used; arrays are ``(..., Y, X)`` (any leading axes, e.g. ``(Z, C)``
or a field's ``(N, 2)``). Sides of a core that touch ``bounds`` have no neighbour and no ramp; every
other side is assumed to have a neighbouring core that abuts it (a tiling of ``bounds``). A core
with neighbours on both sides of an axis must be at least ``2 * margin`` long in that axis.

API summary
-----------
* :func:`ramp` -> ``(n,)`` raised-cosine weights rising from 0 to 1 at pixel centres
  (``ramp(n) + ramp(n)[::-1] == 1``).
* :func:`piece_box` -> the output box of a core: ``core.padded(margin)`` clipped to ``bounds`` (xy).
* :func:`blend_weights` -> ``(piece box, (Y, X) float32 weights)`` of one core.
* :func:`blend_pieces` -> the weighted sum of pieces over a region (numpy in, numpy out; torch in,
  torch out); raises if the pieces do not cover the region with total weight 1.
* :func:`crop` -> drop a context pad from the last two axes; :func:`cut` -> the part of an array
  read at one box that lies in another box.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TypeVar

import numpy as np
import torch

from emcore.errors import GeometryError
from emcore.geometry import VoxelBox

__all__ = ["blend_margin", "blend_pieces", "blend_weights", "crop", "cut", "piece_box", "ramp"]

ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)


def ramp(n: int) -> np.ndarray:
    """``(n,)`` float64 raised cosine ``0.5 - 0.5 cos(pi t)`` at ``t = (i + 0.5) / n``: 0 -> 1.

    Symmetric: ``ramp(n) + ramp(n)[::-1] == 1`` (to float rounding), and smooth (zero slope at
    both ends).
    """
    if n < 0:
        raise ValueError(f"ramp length must be >= 0, got {n}")
    t = (np.arange(n, dtype=np.float64) + 0.5) / max(n, 1)
    return 0.5 - 0.5 * np.cos(math.pi * t)


def blend_margin(pad: int, cores: Sequence[VoxelBox]) -> int:
    """The blend margin (px) for cores tiling a region, each computed with ``pad`` px of context.

    ``min(pad // 2, full // 2)`` with ``full`` the largest core side: only the last core along an
    axis can be partial (the region's remainder), and it has a neighbour on one side only, so it
    never limits the margin (a 4 px remainder must not shrink every seam's blend to 2 px).
    """
    if not cores:
        raise ValueError("blend_margin needs at least one core")
    full = max(min(c.shape[0], c.shape[1]) for c in cores)
    return min(pad // 2, full // 2)


def _xy(box: VoxelBox) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1) of a box."""
    return box.start[1], box.stop[1], box.start[0], box.stop[0]


def piece_box(core: VoxelBox, bounds: VoxelBox, margin: int) -> VoxelBox:
    """``core`` grown by ``margin`` px in x and y, clipped to ``bounds`` in x and y (z kept)."""
    if margin < 0:
        raise ValueError(f"blend margin must be >= 0 px, got {margin}")
    grown = core.padded(margin)
    start = (max(grown.start[0], bounds.start[0]), max(grown.start[1], bounds.start[1]), core.start[2])
    stop = (min(grown.stop[0], bounds.stop[0]), min(grown.stop[1], bounds.stop[1]), core.stop[2])
    return VoxelBox(start, stop)


def _axis_weights(a: int, b: int, lo: int, hi: int, margin: int, axis: str) -> tuple[int, np.ndarray]:
    """Weights along one axis for core ``[a, b)`` within bounds ``[lo, hi)``: (piece start, weights)."""
    if not lo <= a < b <= hi:
        raise GeometryError(f"core {axis} range {a}:{b} must be non-empty and inside the bounds {lo}:{hi}")
    before, after = a > lo, b < hi
    if before and after and b - a < 2 * margin:
        raise GeometryError(
            f"core {axis} range {a}:{b} is shorter than 2 x blend margin ({2 * margin} px) while it has "
            "neighbours on both sides: use larger processing chunks or a smaller margin"
        )
    start, stop = max(a - margin, lo), min(b + margin, hi)
    pos = np.arange(start, stop)
    w = np.ones(stop - start, dtype=np.float64)
    if margin > 0:
        r = ramp(2 * margin)
        if before:
            inside = (pos >= a - margin) & (pos < a + margin)
            w[inside] *= r[pos[inside] - (a - margin)]
        if after:
            inside = (pos >= b - margin) & (pos < b + margin)
            w[inside] *= 1.0 - r[pos[inside] - (b - margin)]
    return start, w


def blend_weights(core: VoxelBox, bounds: VoxelBox, margin: int) -> tuple[VoxelBox, np.ndarray]:
    """The output box of ``core`` and its ``(Y, X)`` float32 blend weights.

    Args:
        core: the chunk's core box (its share of the tiling).
        bounds: the volume (or region) the cores tile.
        margin: blend margin in px at the boxes' mip (0 = no overlap: weights are all 1).

    Returns:
        ``(box, weights)``: ``box = piece_box(core, bounds, margin)`` and weights of its shape.
    """
    if margin < 0:
        raise ValueError(f"blend margin must be >= 0 px, got {margin}")
    y0, y1, x0, x1 = _xy(core)
    by0, by1, bx0, bx1 = _xy(bounds)
    _, wy = _axis_weights(y0, y1, by0, by1, margin, "y")
    _, wx = _axis_weights(x0, x1, bx0, bx1, margin, "x")
    return piece_box(core, bounds, margin), np.outer(wy, wx).astype(np.float32)


def blend_pieces(
    pieces: Sequence[tuple[VoxelBox, ArrayT]],
    region: VoxelBox,
    bounds: VoxelBox,
    margin: int,
    *,
    atol: float = 1e-4,
) -> ArrayT:
    """Weighted sum of chunk output pieces over ``region`` (x and y only).

    Args:
        pieces: ``(core, values)`` pairs; ``values`` is ``(..., Y, X)`` over ``piece_box(core,
            bounds, margin)`` (same leading shape and type for all pieces). Pieces that do not
            overlap ``region`` are skipped.
        region: the box to produce (e.g. one storage chunk), inside ``bounds``.
        bounds: the volume the cores tile.
        margin: blend margin in px.
        atol: allowed deviation of the total weight from 1.

    Returns:
        ``(..., Y, X)`` over ``region``, numpy float32 for numpy pieces (torch: the pieces' dtype).

    Raises:
        ValueError: no piece given, or a piece of the wrong shape, or the pieces do not cover
            ``region`` with total weight 1 (a missing neighbour chunk): nothing partial is returned.
    """
    if not pieces:
        raise ValueError("blend_pieces needs at least one piece")
    if not bounds.contains(VoxelBox((region.start[0], region.start[1], bounds.start[2]),
                                    (region.stop[0], region.stop[1], bounds.stop[2]))):  # fmt: skip
        raise GeometryError(f"region {region} is not inside the bounds {bounds} (x, y)")
    ry0, ry1, rx0, rx1 = _xy(region)
    first = pieces[0][1]
    as_torch = isinstance(first, torch.Tensor)
    lead = tuple(first.shape[:-2])
    if as_torch:
        out = torch.zeros(*lead, ry1 - ry0, rx1 - rx0, dtype=first.dtype, device=first.device)
    else:
        out = np.zeros((*lead, ry1 - ry0, rx1 - rx0), dtype=np.float32)
    total = np.zeros((ry1 - ry0, rx1 - rx0), dtype=np.float64)
    for core, values in pieces:
        box, weights = blend_weights(core, bounds, margin)
        py0, py1, px0, px1 = _xy(box)
        if tuple(values.shape[-2:]) != (py1 - py0, px1 - px0) or tuple(values.shape[:-2]) != lead:
            raise ValueError(
                f"piece of core {core} must have shape {(*lead, py1 - py0, px1 - px0)} (its output box "
                f"{box}), got {tuple(values.shape)}"
            )
        if isinstance(values, torch.Tensor) != as_torch:
            raise ValueError("pieces must all be numpy arrays or all torch tensors")
        oy0, oy1, ox0, ox1 = max(py0, ry0), min(py1, ry1), max(px0, rx0), min(px1, rx1)
        if oy0 >= oy1 or ox0 >= ox1:
            continue
        w = weights[oy0 - py0 : oy1 - py0, ox0 - px0 : ox1 - px0]
        part = values[..., oy0 - py0 : oy1 - py0, ox0 - px0 : ox1 - px0]
        target = (..., slice(oy0 - ry0, oy1 - ry0), slice(ox0 - rx0, ox1 - rx0))
        if as_torch:
            out[target] += torch.from_numpy(w).to(out.dtype).to(out.device) * part
        else:
            out[target] += w * np.asarray(part, dtype=np.float32)
        total[oy0 - ry0 : oy1 - ry0, ox0 - rx0 : ox1 - rx0] += w
    bad = np.abs(total - 1.0) > atol
    if bad.any():
        ys, xs = np.nonzero(bad)
        raise ValueError(
            f"pieces do not cover region {region} with total weight 1 (e.g. at y={ys[0] + ry0}, "
            f"x={xs[0] + rx0}: {total[ys[0], xs[0]]:.3f}); a neighbouring chunk is missing or overlaps twice"
        )
    return out  # type: ignore[return-value]


def crop(data: ArrayT, pad: int | tuple[int, int]) -> ArrayT:
    """Drop ``pad`` px (or ``(pad_y, pad_x)``) from both ends of the last two axes of ``data``.

    Undoes reading with a context pad: ``crop(read(box.padded(p)), p)`` is the data of ``box``.
    """
    py, px = (pad, pad) if isinstance(pad, int) else pad
    if py < 0 or px < 0:
        raise ValueError(f"crop pad must be >= 0, got {pad}")
    h, w = data.shape[-2:]
    if 2 * py >= h or 2 * px >= w:
        raise ValueError(f"cannot crop {pad} px from each side of a {h} x {w} array: nothing would be left")
    return data[..., py : h - py, px : w - px]


def cut(data: ArrayT, data_box: VoxelBox, box: VoxelBox) -> ArrayT:
    """The part of ``data`` (``(..., Y, X)`` covering ``data_box``) inside ``box`` (x and y only)."""
    dy0, dy1, dx0, dx1 = _xy(data_box)
    y0, y1, x0, x1 = _xy(box)
    if tuple(data.shape[-2:]) != (dy1 - dy0, dx1 - dx0):
        raise ValueError(f"data {tuple(data.shape[-2:])} (Y, X) does not match its box {data_box}")
    if not (dy0 <= y0 <= y1 <= dy1 and dx0 <= x0 <= x1 <= dx1):
        raise GeometryError(f"box {box} is not inside the data's box {data_box} (x, y)")
    return data[..., y0 - dy0 : y1 - dy0, x0 - dx0 : x1 - dx0]
