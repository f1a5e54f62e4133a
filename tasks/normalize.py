"""Normalize stage tasks: per-section tissue statistics, then per-chunk normalization.

* :func:`section_stats_task` - one section's tissue mean/std at a (cheap, coarse) mip, or the
  reason it is blank. Blank sections are reported, never dropped: their normalized chunks are
  written as zeros ("no data"), and later stages skip or see through them.
* :func:`normalize_chunk_task` - ``(image - mean) / std`` on tissue (0 stays "no data") for one
  chunk at one mip, written to a float32 image layer.

A section with NaN/inf pixels is refused (:class:`~emcore.errors.NonFiniteSectionError` naming it,
not retried): by the stats task, which runs for every section before any chunk is written, and
again by the chunk task for what the coarse mip did not show.
"""

from __future__ import annotations

import numpy as np

from emcore.errors import BlankSectionError
from emcore.geometry import VoxelBox
from emcore.layers import open_layer
from emcore.normalize import normalize, require_finite, section_stats
from tasks.markers import ChunkMarker, ChunkOutcome

__all__ = ["normalize_chunk_task", "section_stats_task"]


def section_stats_task(
    source: str, z: int, mip: int, defects: str | None = None, output: str | None = None
) -> dict:
    """Tissue statistics of section ``z`` at ``mip``: ``{"z", "mean", "std", "blank", "reason"}``.

    With ``output`` (the normalized layer) the result is kept in a completion marker there, so a
    rerun reads it back instead of reading the section again (the same values, bitwise).
    """
    marker = None
    if output is not None:
        marker = ChunkMarker(output, "section-stats", f"{z}@{mip}", (source, defects or ""), {"mip": mip})
        previous = marker.read_extra()
        if previous is not None:
            return previous
    stats = _section_stats(source, z, mip, defects)
    if marker is not None:
        marker.mark_done(stats)
    return stats


def _section_stats(source: str, z: int, mip: int, defects: str | None) -> dict:
    layer = open_layer(source)
    bounds = layer.bounds(mip)
    box = VoxelBox((bounds.start[0], bounds.start[1], z), (bounds.stop[0], bounds.stop[1], z + 1))
    image = layer.read(box, mip)[0, 0]
    mask = open_layer(defects).read(box, mip)[0, 0] if defects else None
    require_finite(image, section=f"{z} of {source} (mip {mip})")
    try:
        stats = section_stats(image, mask, section=z)
    except BlankSectionError as exc:
        return {"z": z, "mean": 0.0, "std": 0.0, "blank": True, "reason": str(exc)}
    return {"z": z, "mean": stats.mean, "std": stats.std, "blank": False, "reason": ""}


def normalize_chunk_task(
    source: str, output: str, box: VoxelBox, mip: int, stats: dict[int, dict], defects: str | None = None
) -> ChunkOutcome:
    """Normalize ``box`` (voxels at ``mip``) of ``source`` into ``output`` with per-section ``stats``."""
    params = {
        "mip": mip,
        "stats": {
            z: (s["mean"], s["std"], s["blank"]) for z, s in stats.items() if box.start[2] <= z < box.stop[2]
        },
    }
    marker = ChunkMarker(output, "normalize", f"{box}@{mip}", (source, defects or ""), params)
    if marker.is_done():
        return ChunkOutcome("normalize", str(box), "skipped")
    src, out = open_layer(source), open_layer(output)
    image = src.read(box, mip)
    mask = open_layer(defects).read(box, mip) if defects else None
    result = np.zeros(image.shape, dtype=np.float32)
    for i, z in enumerate(range(box.start[2], box.stop[2])):
        s = stats[z]
        require_finite(image[i], section=f"{z} of {source} (mip {mip}, {box})")
        if s["blank"]:
            continue  # no tissue: stays 0 = no data
        result[i] = normalize(image[i], s["mean"], s["std"], None if mask is None else mask[i])
    out.write(box, result, mip)
    marker.mark_done()
    return ChunkOutcome("normalize", str(box), "done")
