"""Detect stage task: fold / crack masks from the normalized sections, by the shipped detector.

:func:`detect_chunk_task` reads one detect chunk (:func:`detect_chunk_px`: at least
:data:`DETECT_CHUNK_PX` px, so the context costs little) of ``<out>/normalized`` at the detection mip with
``pad`` px of context (at least the length rule's ``min_length`` px, so that a band crossing the
chunk is measured over at least that length), runs
:func:`emcore.models.detect.detect_defects_two_scales` (at the mip and one mip coarser, united; the
shipped ``defect_detector``, trained on normalized sections at ~20 and ~40 nm/px, for 15-50 nm/px,
with the length rule: marked components shorter than
:data:`emcore.models.detect.MIN_DEFECT_LENGTH_NM` are dropped, and with the contrast rule: bright
components less than :data:`emcore.models.detect.MIN_BRIGHT_CONTRAST` tissue std brighter than the
tissue around them are dropped), crops the context and writes the mask (uint8, 1 = defect) into
``<out>/masks/detected`` at that mip and, repeated pixel by pixel, at every finer mip down to 0
(the defects layer has the source's geometry, and stages read it at their own mips); the coarser
mips are max-downsampled by the stage. Only what the detector marks on tissue is a defect: an empty
crack gap is no data already (0 in the images), and the coarse stage splits a section along it
itself, also where the pyramid closed it at the coarse mip (:func:`tasks.coarse.section_defects`).

:func:`detection_mip` picks the mip: the finest one at or above the finetune mip whose resolution
lies in the detector's trained range (``resolution_nm`` of its config), or ``None``. The finest,
because a thin crack is wider there: a 10 px crack at 9.2 nm/px is 5 px at 18.4 nm/px (marked)
and 2.5 px at 36.8 nm/px (not marked: as thin as the knife streaks the detector learns to ignore).
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch

from emcore.geometry import VoxelBox
from emcore.layers import open_layer
from emcore.models import Model, load_model
from emcore.models.detect import (
    DEFAULT_THRESHOLD,
    MIN_BRIGHT_CONTRAST,
    MIN_DEFECT_LENGTH_NM,
    detect_defects_two_scales,
    min_length_px,
)
from tasks.io import read_tensor
from tasks.markers import ChunkMarker, ChunkOutcome

__all__ = ["DETECTOR", "DETECT_CHUNK_PX", "detect_chunk_px", "detect_chunk_task", "detection_mip"]

#: The shipped detector the stage runs.
DETECTOR = "defect_detector"

#: Smallest side of a detect chunk, px at the detection mip. A chunk reads the length rule's
#: context on every side (88 px at 18.4 nm/px): a 128 px chunk reads (128 + 2 * 88)^2 = 5.6x its
#: own pixels, a 512 px one 1.8x. Measured (one thread, both scales and the rules): a 688^2 px read
#: takes 0.86 s and +111 MiB of peak memory; the 304^2 px read of a 128 px chunk 0.28 s and +79 MiB
#: (so 16 of them, the same area, 4.5 s).
DETECT_CHUNK_PX = 512


def detect_chunk_px(chunk_xy: int) -> int:
    """The detect stage's chunk side: the smallest multiple of ``chunk_xy`` that is at least
    :data:`DETECT_CHUNK_PX` (px at the detection mip; a multiple, so it stays storage-aligned)."""
    return chunk_xy * max(1, math.ceil(DETECT_CHUNK_PX / chunk_xy))


@lru_cache(maxsize=1)
def _detector() -> Model:
    """The shipped detector, loaded once per worker process."""
    return load_model(DETECTOR)


def detection_mip(resolutions_nm: list[float], first_mip: int) -> int | None:
    """The finest mip ``>= first_mip`` whose x resolution (nm/px) is in the detector's range."""
    lo, hi = _detector().config.resolution_nm
    for mip in range(first_mip, len(resolutions_nm)):
        if lo <= resolutions_nm[mip] <= hi:
            return mip
    return None


def detect_chunk_task(
    normalized: str,
    output: str,
    box: VoxelBox,
    mip: int,
    *,
    pad: int,
    threshold: float = DEFAULT_THRESHOLD,
    min_length_nm: float = MIN_DEFECT_LENGTH_NM,
    min_bright_contrast: float | None = MIN_BRIGHT_CONTRAST,
) -> ChunkOutcome:
    """Detect defects on ``box`` (one section, voxels at ``mip``) and write the mask at ``mip`` .. 0.

    ``min_length_nm``: the length rule (0 = none); ``min_bright_contrast``: the contrast rule,
    tissue std (``None`` = none). The outcome's detail holds ``z`` and ``marked`` (defect pixels
    at ``mip``).
    """
    marker = ChunkMarker(output, "detect", f"{box}@{mip}", (normalized,),
                         {"mip": mip, "pad": pad, "threshold": threshold, "model": DETECTOR, "scales": 2,
                          "min_length_nm": min_length_nm,
                          "min_bright_contrast": min_bright_contrast})  # fmt: skip
    previous = marker.read_extra()
    if previous is not None:
        return ChunkOutcome("detect", str(box), "skipped", previous)
    layer = open_layer(normalized)
    nm = layer.resolution(mip)[0]
    # Context: at least the length rule's px (the same length in nm at both scales); even, so
    # that every chunk's 2x downsampling has the same phase.
    min_length = min_length_px(nm, min_length_nm) if min_length_nm > 0 else 0
    pad = 2 * math.ceil(max(pad, min_length) / 2)
    image = read_tensor(layer, box, mip, pad=pad)  # (1, 1, Y + 2 pad, X + 2 pad)
    mask = detect_defects_two_scales(image, _detector(), nm, threshold=threshold,
                                     min_length_nm=min_length_nm if min_length_nm > 0 else None,
                                     min_bright_contrast=min_bright_contrast)  # fmt: skip
    if pad:
        mask = mask[..., pad:-pad, pad:-pad]
    out = open_layer(output)
    data = mask.to(torch.uint8).numpy()
    out.write(box, data, mip)
    for finer in range(mip - 1, -1, -1):
        f = 2 ** (mip - finer)
        bounds = out.bounds(finer)
        start = (box.start[0] * f, box.start[1] * f, box.start[2])
        stop = (min(box.stop[0] * f, bounds.stop[0]), min(box.stop[1] * f, bounds.stop[1]), box.stop[2])
        up = np.repeat(np.repeat(data, f, axis=2), f, axis=3)[..., : stop[1] - start[1], : stop[0] - start[0]]
        out.write(VoxelBox(start, stop), np.ascontiguousarray(up), finer)
    detail = {"z": box.start[2], "marked": int(mask.sum())}
    marker.mark_done(detail)
    return ChunkOutcome("detect", str(box), "done", detail)
