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

Length rule (``min_length`` px of :func:`detect_defects`; the pipeline passes
``min_length_px(nm_per_px)``, i.e. :data:`MIN_DEFECT_LENGTH_NM` = 1.6 um): a fold or crack is a
long band, so a marked connected component (8-connected) whose length, its largest extent (max
Feret diameter between pixel centres, + 1 px), is under ``min_length`` px is dropped. On the real
shared stacks every component the network marks on clean sections is a dark, smooth, thick cell
profile of at most 33 px (1.3 um) at 40 nm/px; on held-out synthetic sections no whole defect is
that short (the shortest found is 46 px; only pieces of bands broken up by strong artifacts are).
A real fold shorter than 1.6 um is not reported (see the weights README).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError
from torch import nn

from emcore.models.encode import encode_tiled
from emcore.models.format import Model

__all__ = [
    "DEFAULT_THRESHOLD",
    "MIN_DEFECT_LENGTH_NM",
    "component_lengths",
    "defect_probability",
    "detect_defects",
    "drop_short_components",
    "min_length_px",
]

DEFAULT_THRESHOLD = 0.5
#: The shortest marked component the pipeline keeps, in nm (1.6 um: 40 px at 40 nm/px).
MIN_DEFECT_LENGTH_NM = 1600.0


def min_length_px(resolution_nm: float, length_nm: float = MIN_DEFECT_LENGTH_NM) -> float:
    """``length_nm`` in px at ``resolution_nm`` nm/px (the detection mip's x resolution)."""
    if not resolution_nm > 0:
        raise ValueError(f"resolution_nm must be > 0, got {resolution_nm}")
    return length_nm / resolution_nm


def _max_extent(points: np.ndarray) -> float:
    """Largest distance between two of ``points`` ``(K, 2)`` (px), via their convex hull."""
    if len(points) > 3:
        try:
            points = points[ConvexHull(points).vertices]
        except QhullError:  # all on one line: its two ends
            t = (points - points[0]) @ (points[-1] - points[0])
            points = points[[int(t.argmin()), int(t.argmax())]]
    diff = points[:, None, :] - points[None, :, :]
    return float(np.sqrt((diff**2).sum(-1)).max())


def component_lengths(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Label the 8-connected components of a 2-D bool ``mask``; their lengths (px).

    Returns ``(labels, lengths)``: ``labels`` int32 ``(H, W)``, 0 = background, ``k`` = component
    ``k``; ``lengths[k - 1]`` = the component's max Feret diameter between pixel centres + 1.
    """
    labels, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    lengths = np.zeros(count, dtype=np.float64)
    for k, box in enumerate(ndimage.find_objects(labels), start=1):
        ys, xs = np.nonzero(labels[box] == k)
        lengths[k - 1] = _max_extent(np.stack((ys, xs), 1).astype(np.float64)) + 1.0
    return labels.astype(np.int32), lengths


def drop_short_components(mask: torch.Tensor, min_length: float) -> torch.Tensor:
    """``mask`` ``(N, 1, H, W)`` bool without its components shorter than ``min_length`` px.

    Components and lengths are per section (:func:`component_lengths`); ``min_length <= 1``
    keeps everything.
    """
    if mask.ndim != 4 or mask.shape[1] != 1 or mask.dtype != torch.bool:
        raise ValueError(
            f"drop_short_components needs a bool (N, 1, H, W) mask, got {mask.dtype} {tuple(mask.shape)}"
        )
    if min_length <= 1.0 or not mask.any():
        return mask
    out = mask.clone()
    for i in range(mask.shape[0]):
        labels, lengths = component_lengths(mask[i, 0].numpy())
        short = np.concatenate(([False], lengths < min_length))
        out[i, 0] &= torch.from_numpy(~short[labels])
    return out


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
    min_length: float | None = None,
) -> torch.Tensor:
    """Boolean defect mask ``(N, 1, H, W)``: probability above ``threshold`` on tissue, without
    components shorter than ``min_length`` px.

    Args:
        image: ``(N, 1, H, W)`` float normalized sections, 0 = no data, at the model's resolution.
        model: a loaded detector (``load_model("defect_detector")``) or its network.
        threshold: probability above which a pixel is a defect (0 < threshold < 1).
        tile: output tile size in px for the tiled run (``None`` = whole image at once).
        min_length: the length rule, px at the image's resolution (the pipeline passes
            ``min_length_px(resolution_nm)``); ``None`` = no length rule, the network's mask.
    """
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    mask = defect_probability(image, model, tile=tile) > threshold
    return mask if min_length is None else drop_short_components(mask, min_length)
