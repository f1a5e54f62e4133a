"""Encode stage: choose an encoder for a resolution and apply it to chunks with context.

``encoder`` values understood everywhere (CLI, parameters):

* ``"none"`` - no model: the normalized images are used as they are (the encode stage writes
  nothing and later stages read ``<out>/normalized``).
* ``"auto"`` - the shipped encoder whose ``resolution_nm`` range holds the mip's x resolution
  (:func:`pick_encoder`); ``"none"`` when no shipped encoder fits.
* a shipped model name or a model config path/URL (:func:`emcore.models.format.load_model`).

Models are loaded once per worker process (:func:`cached_model`), never sent with the task.
"""

from __future__ import annotations

import functools
import json

import torch

from emcore.geometry import VoxelBox
from emcore.layers import open_layer
from emcore.models.encode import encode_tiled
from emcore.models.format import Model, load_model
from emcore.models.registry import AUTO_ENCODERS, shipped_config_path
from tasks.io import read_tensor
from tasks.markers import ChunkMarker, ChunkOutcome

__all__ = ["cached_model", "encode_chunk_task", "pick_encoder", "resolve_encoder"]


def pick_encoder(resolution_nm: float) -> str | None:
    """The shipped encoder meant for sections at ``resolution_nm`` nm/px, or ``None``.

    Only encoders measured to help the finetuner are picked (``AUTO_ENCODERS``: on held-out pairs
    with artifacts ``encoder_64_256nm`` and ``encoder_256_2048nm`` beat raw images, see
    emcore/models/weights/README.md);
    at other resolutions "auto" means no encoder.
    """
    for name in AUTO_ENCODERS:
        try:
            lo, hi = json.loads(shipped_config_path(name).read_text())["resolution_nm"]
        except (FileNotFoundError, KeyError, ValueError):
            continue
        if float(lo) <= resolution_nm <= float(hi):
            return name
    return None


def resolve_encoder(encoder: str, resolution_nm: float) -> str:
    """``"auto"`` -> a shipped encoder name or ``"none"``; anything else is returned unchanged."""
    if encoder == "auto":
        return pick_encoder(resolution_nm) or "none"
    return encoder


@functools.cache
def cached_model(name: str) -> Model:
    """Load ``name`` once per process (workers keep it for all their chunks)."""
    return load_model(name)


def encode_chunk_task(source: str, output: str, box: VoxelBox, mip: int, encoder: str) -> ChunkOutcome:
    """Encode ``box`` (voxels at ``mip``) of the normalized layer ``source`` into ``output``.

    The chunk is read with the network's context (``context_px``) of real neighbouring data, so
    chunked output equals encoding the whole section (up to float rounding).
    """
    marker = ChunkMarker(output, "encode", f"{box}@{mip}", (source,), {"encoder": encoder, "mip": mip})
    if marker.is_done():
        return ChunkOutcome("encode", str(box), "skipped")
    model = cached_model(encoder)
    pad = int(getattr(model.network, "context_px", 0))
    image = read_tensor(open_layer(source), box, mip, pad=pad)
    with torch.no_grad():
        encoded = encode_tiled(model, image, tile=None)
    if pad:
        encoded = encoded[..., pad:-pad, pad:-pad]
    open_layer(output).write(box, encoded.numpy(), mip)
    marker.mark_done()
    return ChunkOutcome("encode", str(box), "done")
