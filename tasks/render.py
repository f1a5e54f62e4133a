"""Render stage: images and masks warped through the final fields, chunk by chunk.

For a chunk (voxels at the render mip) the task reads ``G[z]`` from ``<out>/fields/final`` (stored
at the field mip, upsampled exactly to the render mip), reads only the source region the field
points into (:func:`tasks.io.read_through_field`) and writes ``warp(source, G)`` (images: bilinear,
rounded back to the layer's dtype; masks: :func:`emcore.field.warp_mask`). Coarser mips are filled
afterwards by the downsample task.
"""

from __future__ import annotations

import numpy as np

from emcore.geometry import VoxelBox
from emcore.layers import open_layer
from tasks.io import read_field, read_through_field
from tasks.markers import ChunkMarker, ChunkOutcome

__all__ = ["render_chunk_task"]


def render_chunk_task(
    source: str, fields: str, output: str, box: VoxelBox, mip: int, field_mip: int
) -> ChunkOutcome:
    """Write ``warp(source, G)`` on ``box`` (voxels at ``mip``) to ``output``."""
    params = {"mip": mip, "field_mip": field_mip}
    marker = ChunkMarker(output, "render", f"{box}@{mip}", (source, fields), params)
    if marker.is_done():
        return ChunkOutcome("render", str(box), "skipped")
    src, out = open_layer(source), open_layer(output)
    field = read_field(open_layer(fields), box, mip, field_mip=field_mip)
    warped = read_through_field(src, box, mip, field, is_mask=src.kind == "mask").numpy()
    if np.issubdtype(out.dtype, np.integer):
        info = np.iinfo(out.dtype)
        warped = np.clip(np.rint(warped), info.min, info.max).astype(out.dtype)
    out.write(box, warped, mip)
    marker.mark_done()
    return ChunkOutcome("render", str(box), "done")
