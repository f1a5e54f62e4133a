"""Checks of the input layers and models that :class:`flows.params.AlignParams` runs before any work.

Called from the parameters' validator (one hook), so a bad input stops the run at the start with
a ``pydantic.ValidationError`` naming the parameter, before anything is read or written:

* ``defects``: must be a mask (uint8, 1 channel; ``kind`` "mask", or no sectionflow kind at all for
  a layer written by other software) in the source frame: the same mip-0 resolution and bounds as
  the source (it is used pixel for pixel with the source at every mip, never resampled), mips up
  to ``coarse_mip``, and a storage chunk the render chunk is a multiple of.
* ``encoder``: the model that ``encoder`` resolves to at the finetune mip (``"auto"`` included) is
  loaded once here, so a missing or corrupt weights file (sha256 mismatch) is reported now, not
  after the normalize stage.

API summary
-----------
* ``check_inputs(params, source) -> None``: raises ``ValueError`` with the message to show.
* ``check_defects(params, source) -> None`` and ``check_encoder(params, source) -> None``: the parts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from emcore.errors import SectionflowError
from emcore.layers import Layer, open_layer

if TYPE_CHECKING:
    from flows.params import AlignParams

__all__ = ["check_defects", "check_encoder", "check_inputs"]


def _nm(resolution: tuple[float, float, float]) -> str:
    return " x ".join(f"{r:g}" for r in resolution) + " nm"


def check_inputs(params: AlignParams, source: Layer) -> None:
    """Every check of this module (see the module docstring)."""
    check_defects(params, source)
    check_encoder(params, source)


def check_defects(params: AlignParams, source: Layer) -> None:
    """The defect mask must be a uint8 mask in the source frame (see the module docstring)."""
    if params.defects is None:
        return
    mask = open_layer(params.defects)
    declared = mask.info.get("sectionflow", {}).get("kind")
    if declared not in (None, "mask") or mask.dtype != np.uint8 or mask.num_channels != 1:
        raise ValueError(
            f"defects {mask.path} has kind {declared or 'unknown'} ({mask.dtype.name}, {mask.num_channels} "
            "channel(s)); a defect mask is a uint8 1-channel mask layer (nonzero = fold/crack)"
        )
    if not np.allclose(mask.resolution(0), source.resolution(0), rtol=1e-6, atol=0):
        raise ValueError(
            f"defects has resolution {_nm(mask.resolution(0))} at mip 0, source {_nm(source.resolution(0))}: "
            f"the mask must be in the source frame (same resolution and bounds); resample {mask.path} "
            "to the source's resolution first (sectionflow does not resample masks)"
        )
    if mask.bounds(0) != source.bounds(0):
        raise ValueError(
            f"defects {mask.path} covers {mask.bounds(0)} at mip 0, the source {source.bounds(0)}: the mask "
            "must have the source's bounds (voxel offset and size)"
        )
    if mask.num_mips <= params.coarse_mip:
        raise ValueError(
            f"defects {mask.path} has mips 0..{mask.num_mips - 1}, the run needs mips up to coarse_mip="
            f"{params.coarse_mip}: downsample it (`sectionflow downsample {mask.path}`)"
        )
    mip = params.render_mip
    side = params.chunk_at(mip)
    try:
        mask.grid(mip).check_processing_chunk((side, side, 1))
    except SectionflowError as exc:
        raise ValueError(f"defects {mask.path} at render_mip {mip}: {exc}") from None


def check_encoder(params: AlignParams, source: Layer) -> None:
    """Load (and so verify the sha256 of) the encoder ``params.encoder`` resolves to."""
    from emcore.models import load_model
    from tasks.encode import resolve_encoder

    name = resolve_encoder(params.encoder, source.resolution(params.finetune_mip)[0])
    if name == "none":
        return
    try:
        load_model(name)
    except SectionflowError as exc:
        raise ValueError(f"encoder {params.encoder!r} ({name}): {exc}") from None
