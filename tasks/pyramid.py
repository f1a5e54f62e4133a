"""Downsample stage task: fill the coarser mips of a layer region from a finer one.

The region (voxels at ``src_mip``) must be a whole "pyramid chunk": a multiple of
``chunk_size * 2**(dst_mip - src_mip)`` in x and y (or reaching the layer bound), so that its footprint
is chunk aligned at every target mip (see :func:`pyramid_chunks`).
"""

from __future__ import annotations

from collections.abc import Iterator

from emcore.geometry import VoxelBox
from emcore.layers import Layer, open_layer
from tasks.markers import ChunkMarker, ChunkOutcome

__all__ = ["downsample_chunk_task", "pyramid_chunks"]


def pyramid_chunks(layer: Layer, region: VoxelBox, src_mip: int, dst_mip: int) -> Iterator[VoxelBox]:
    """Chunks of ``region`` (voxels at ``src_mip``) that downsample to aligned boxes up to ``dst_mip``.

    One section per chunk in z; in x, y the storage chunk times ``2**(dst_mip - src_mip)``.
    """
    grid = layer.grid(src_mip)
    f = 2 ** (dst_mip - src_mip)
    cx, cy, _ = grid.chunk_size
    yield from grid.chunks(region, (cx * f, cy * f, 1))


def downsample_chunk_task(
    path: str, box: VoxelBox, src_mip: int, dst_mip: int, inputs: tuple[str, ...] = ()
) -> ChunkOutcome:
    """Downsample ``box`` of layer ``path`` from ``src_mip`` into mips ``src_mip + 1 .. dst_mip``.

    ``inputs`` identifies what produced the source data (its key goes into the marker) so a
    recomputed source chunk is downsampled again.
    """
    marker = ChunkMarker(path, f"downsample-{src_mip}-{dst_mip}", str(box), inputs, {})
    if marker.is_done():
        return ChunkOutcome("downsample", str(box), "skipped")
    open_layer(path).downsample(box, src_mip, dst_mip)
    marker.mark_done()
    return ChunkOutcome("downsample", str(box), "done")
