"""Reads that chunk tasks share: images as tensors, fields at another mip, sources through a field.

Boxes are :class:`emcore.geometry.VoxelBox` (xyz voxels at the mip named in the call); arrays and
tensors are ``(Z, C, Y, X)``. Fields follow :mod:`emcore.field` (channel 0 = x, px at their mip).

API summary
-----------
* ``read_tensor(layer, box, mip, pad=0) -> float32 (Z, C, Y, X)``: zero fill outside the bounds.
* ``read_field(layer, box, mip, field_mip=None) -> (Z, 2, Y, X)`` px at ``mip``: the field stored
  at ``field_mip`` (default ``mip``), upsampled exactly as :func:`emcore.field.resample_field` does
  on the whole section (one coarse pixel of context), replicated past the layer bounds (fields
  have no "no data").
* ``read_through_field(layer, box, mip, field) -> (Z, C, Y, X)``: ``warp(source, field)`` on
  ``box``, reading only the source region the field points into (must lie within
  ``MAX_READ_FACTOR`` times the box size, else a clear error).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from emcore.field import resample_field, warp, warp_mask
from emcore.geometry import VoxelBox
from emcore.layers import Layer

__all__ = ["read_field", "read_tensor", "read_through_field"]

MAX_READ_FACTOR = 4


def read_tensor(layer: Layer, box: VoxelBox, mip: int, pad: int = 0) -> torch.Tensor:
    """``box`` grown by ``pad`` px in x and y, as float32 ``(Z, C, Y, X)`` (0 outside the bounds)."""
    return torch.from_numpy(layer.read(box, mip, pad=pad).astype(np.float32, copy=False))


def _read_replicate(layer: Layer, box: VoxelBox, mip: int) -> torch.Tensor:
    """A field cutout with values past the layer's x/y bounds replicated from the nearest edge."""
    bounds = layer.bounds(mip)
    inside = box.intersection(
        VoxelBox(
            (bounds.start[0], bounds.start[1], box.start[2]), (bounds.stop[0], bounds.stop[1], box.stop[2])
        )
    )
    if inside.is_empty:
        raise ValueError(f"{box} lies outside field layer {layer.path} (bounds {bounds} at mip {mip})")
    data = read_tensor(layer, inside, mip)
    left, top = inside.start[0] - box.start[0], inside.start[1] - box.start[1]
    right, bottom = box.stop[0] - inside.stop[0], box.stop[1] - inside.stop[1]
    if left or top or right or bottom:
        data = F.pad(data, (left, right, top, bottom), mode="replicate")
    return data


def read_field(layer: Layer, box: VoxelBox, mip: int, field_mip: int | None = None) -> torch.Tensor:
    """The field of ``layer`` on ``box`` (voxels at ``mip``), in px at ``mip``.

    The layer holds the field at ``field_mip >= mip``; it is upsampled bilinearly (pixel-centre
    aligned, values x2 per mip) from one coarse pixel of context around the box, which equals
    upsampling the whole section and cropping.
    """
    fm = mip if field_mip is None else field_mip
    if fm < mip:
        raise ValueError(f"field_mip {fm} must be >= mip {mip} (fields are only upsampled here)")
    if fm == mip:
        return _read_replicate(layer, box, mip)
    f = 2 ** (fm - mip)
    cstart = [math.floor(box.start[i] / f) - 1 for i in (0, 1)]
    cstop = [math.ceil(box.stop[i] / f) + 1 for i in (0, 1)]
    coarse = _read_replicate(
        layer, VoxelBox((cstart[0], cstart[1], box.start[2]), (cstop[0], cstop[1], box.stop[2])), fm
    )
    fine = resample_field(coarse, fm, mip)
    y0, x0 = box.start[1] - cstart[1] * f, box.start[0] - cstart[0] * f
    return fine[..., y0 : y0 + box.shape[1], x0 : x0 + box.shape[0]].contiguous()


def read_through_field(
    layer: Layer, box: VoxelBox, mip: int, field: torch.Tensor, *, is_mask: bool = False
) -> torch.Tensor:
    """``warp(source, field)`` on ``box``: the source image seen through a pull field.

    Args:
        layer: the source layer (image or mask), read at ``mip``.
        box: the output box (voxels at ``mip``).
        field: ``(Z, 2, Y, X)`` px at ``mip`` on ``box``.
        is_mask: warp as a binary mask (:func:`emcore.field.warp_mask`) instead of bilinearly.

    Returns:
        ``(Z, C, Y, X)`` float32; 0 where the field points outside the source or at no data.
    """
    z, _, h, w = field.shape
    if (h, w, z) != (box.shape[1], box.shape[0], box.shape[2]):
        raise ValueError(f"field {tuple(field.shape)} does not cover {box}")
    # integer shift that brings the median displacement to ~0, then a margin covering the rest
    shift = [int(round(float(field[:, c].median()))) for c in (0, 1)]
    rest = field.clone()
    rest[:, 0] -= shift[0]
    rest[:, 1] -= shift[1]
    margin = int(math.ceil(float(rest.abs().max()))) + 2 if rest.numel() else 2
    if margin > MAX_READ_FACTOR * max(h, w):
        raise ValueError(
            f"field on {box} varies by {margin} px, more than {MAX_READ_FACTOR}x the box: use a smaller "
            "processing chunk or check the field (it may be corrupt)"
        )
    src_box = box.translated((shift[0], shift[1], 0)).padded(margin)
    src = read_tensor(layer, src_box, mip)
    padded_field = F.pad(rest, (margin, margin, margin, margin), mode="replicate")
    out = warp_mask(src, padded_field) if is_mask else warp(src, padded_field)
    return out[..., margin : margin + h, margin : margin + w].contiguous()
