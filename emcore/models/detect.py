"""Fold / crack detection with a learned model: section -> boolean defect mask.

:func:`detect_defects` runs a detector (the shipped ``defect_detector``, see
``emcore/models/weights/README.md``) over a normalized section, tile by tile with full context
(:func:`emcore.models.encode.encode_tiled`: the image continues with zeros beyond its edges, and
the result does not depend on the tile size), and thresholds the defect probability.

Input: ``(N, 1, H, W)`` float32 sections normalized to tissue mean 0 / std 1
(:mod:`emcore.normalize`), 0 = no data, at the model's resolution (``config.resolution_nm``,
30-50 nm/px for ``defect_detector``: resample first, e.g. with :mod:`emcore.pyramid`). The shipped
detector was trained on normalized images, not on encodings.

Output: ``(N, 1, H, W)`` bool, True on fold bands and resin-filled cracks. No-data pixels (0) are
never marked: an empty crack gap is no data already, which every consumer treats as "nothing
here".
"""

from __future__ import annotations

import torch
from torch import nn

from emcore.models.encode import encode_tiled
from emcore.models.format import Model

__all__ = ["DEFAULT_THRESHOLD", "defect_probability", "detect_defects"]

DEFAULT_THRESHOLD = 0.5


def defect_probability(
    image: torch.Tensor, model: Model | nn.Module, *, tile: int | None = 256
) -> torch.Tensor:
    """The detector's defect probability ``(N, 1, H, W)`` float32 in [0, 1]; 0 where no data."""
    if image.ndim != 4 or image.shape[1] != 1 or not image.is_floating_point():
        raise ValueError(
            f"detect_defects needs a float (N, 1, H, W) normalized section tensor, got {image.dtype} "
            f"{tuple(image.shape)}"
        )
    network = model.network if isinstance(model, Model) else model
    if tile is not None:
        multiple = int(getattr(network, "size_multiple", 1))
        tile = -(-tile // multiple) * multiple
    logits = encode_tiled(model, image, tile=tile)
    return torch.where(image != 0, torch.sigmoid(logits), torch.zeros((), dtype=logits.dtype))


def detect_defects(
    image: torch.Tensor,
    model: Model | nn.Module,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    tile: int | None = 256,
) -> torch.Tensor:
    """Boolean defect mask ``(N, 1, H, W)``: probability above ``threshold`` on tissue.

    Args:
        image: ``(N, 1, H, W)`` float normalized sections, 0 = no data, at the model's resolution.
        model: a loaded detector (``load_model("defect_detector")``) or its network.
        threshold: probability above which a pixel is a defect (0 < threshold < 1).
        tile: output tile size in px for the tiled run (``None`` = whole image at once).
    """
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    return defect_probability(image, model, tile=tile) > threshold
