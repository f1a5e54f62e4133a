"""Finetune stage: refine a pairwise field chunk by chunk with the online finetuner.

For pair ``(z, k)`` and a processing chunk (voxels at the finetune mip) the task reads, with
``pad`` px of context on each side: the target section ``z - k``, the coarse field
``P[z, k]`` (stored at the coarse mip, upsampled exactly), and the source section ``z`` shifted by
the coarse field's median integer displacement so it overlaps the target. It runs
:func:`emcore.finetune.finetune` (coarse to fine inside the chunk) from the coarse field, crops the
context and writes the refined ``P[z, k]`` at the finetune mip into the same pair layer.

Overlaps: every chunk sees ``pad`` px of real neighbouring data, so where chunks meet both sides
solved nearly the same problem; the chunked result equals the whole-section result within a small
tolerance away from the volume edge (tested in ``tests/flows/test_chunking.py``).
"""

from __future__ import annotations

import torch
from prefect import task

from emcore.finetune import finetune
from emcore.geometry import VoxelBox
from emcore.layers import open_layer
from tasks.coarse import section_box
from tasks.io import read_field, read_tensor
from tasks.markers import ChunkMarker, ChunkOutcome
from tasks.retry import CHUNK_TASK_OPTIONS

__all__ = ["finetune_chunk_task"]


@task(name="finetune-chunk", **CHUNK_TASK_OPTIONS)
def finetune_chunk_task(
    image: str,
    pairs: str,
    box: VoxelBox,
    z: int,
    k: int,
    mip: int,
    coarse_mip: int,
    *,
    pad: int,
    sm: float,
    num_iter: int,
    defects: str | None = None,
) -> ChunkOutcome:
    """Refine ``P[z, k]`` on ``box`` (xy chunk at ``mip``, any z) and write it to ``pairs`` at ``mip``."""
    params = {
        "z": z,
        "k": k,
        "mip": mip,
        "coarse_mip": coarse_mip,
        "pad": pad,
        "sm": sm,
        "num_iter": num_iter,
    }
    chunk = section_box(box, z)
    marker = ChunkMarker(pairs, "finetune", f"{chunk}@{mip}:{z}-{k}", (image, defects or ""), params)
    previous = marker.read_extra()
    if previous is not None:
        return ChunkOutcome("finetune", f"{z}-{k} {chunk}", "skipped", previous)
    padded = chunk.padded(pad)
    pair_layer, img = open_layer(pairs), open_layer(image)
    init = read_field(pair_layer, padded, mip, field_mip=coarse_mip)
    shift = (int(round(float(init[:, 0].median()))), int(round(float(init[:, 1].median()))))
    src_box = padded.translated((shift[0], shift[1], 0))
    tgt_box = section_box(padded, z - k)
    src, tgt = read_tensor(img, src_box, mip), read_tensor(img, tgt_box, mip)
    src_def = tgt_def = None
    if defects:
        mask_layer = open_layer(defects)
        src_def = read_tensor(mask_layer, src_box, mip) != 0
        tgt_def = read_tensor(mask_layer, tgt_box, mip) != 0
    shift_t = torch.tensor(shift, dtype=torch.float32).view(1, 2, 1, 1)
    result = finetune(
        src,
        tgt,
        init_field=init - shift_t,
        src_defects=src_def,
        tgt_defects=tgt_def,
        sm=sm,
        num_iter=num_iter,
    )
    field = result.field + shift_t
    if pad:
        field = field[..., pad:-pad, pad:-pad]
    pair_layer.write(chunk, field.numpy(), mip)
    detail = {
        "z": z,
        "k": k,
        "loss": float(result.loss[0]),
        "no_data": bool(result.no_data[0]),
        "seconds": round(result.seconds, 3),
    }
    marker.mark_done(detail)
    return ChunkOutcome("finetune", f"{z}-{k} {chunk}", "done", detail)
