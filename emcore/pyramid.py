"""Pure 2x downsampling in x and y of image, mask and field arrays (one mip step).

One implementation per rule, in torch (:func:`downsample_image_torch`,
:func:`downsample_mask_torch`): ``(N, C, H, W)`` tensors on any device (CPU or CUDA; the result
stays on the input's device), differentiable for float images (the aligner's pyramid, the
finetuner's pyramid). The numpy functions (``(Z, C, Y, X)`` arrays, for the layers and renders that
hold numpy) are thin wrappers over them and return exactly the same values.

Every function maps mip ``m`` to mip ``m + 1``: ``(N, C, H, W)`` -> ``(N, C, ceil(H/2), ceil(W/2))``
(batch and channels unchanged), same dtype. Odd sizes: the missing row / column of the last 2x2
block is treated as absent (no data), which matches cloud-volume's ``size(m + 1) = ceil(size(m) /
2)``.

API summary
-----------
* ``downsample_image_torch(image)`` / ``downsample_image(array)``: mean over the **data** (nonzero)
  pixels of each 2x2 block, per channel, so that zeros ("no data") never darken tissue edges; a
  block without data stays 0. Sums and means are computed in float64; integer dtypes round half
  up; float results that land on exactly 0.0 where the block has data are nudged to
  ``TISSUE_FLOOR`` (so tissue never becomes "no data").
* ``downsample_mask_torch(mask)`` / ``downsample_mask(array)``: max of each 2x2 block (a defect
  anywhere marks the coarse pixel).
* ``downsample_field(field)``: ``(Z, 2, Y, X)`` displacement in pixels at mip m -> mip m + 1: the
  mean of each block, times 0.5 (via :func:`emcore.field.resample_field`).
* ``downsample(data, kind)`` with ``kind`` in ``"image" | "mask" | "field"`` (numpy).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from emcore.field import resample_field
from emcore.normalize import TISSUE_FLOOR

__all__ = [
    "LAYER_KINDS",
    "downsample",
    "downsample_field",
    "downsample_image",
    "downsample_image_torch",
    "downsample_mask",
    "downsample_mask_torch",
]

LAYER_KINDS = ("image", "mask", "field")


def _check4(data: np.ndarray, name: str) -> np.ndarray:
    data = np.asarray(data)
    if data.ndim != 4:
        raise ValueError(f"{name} must have shape (Z, C, Y, X), got {data.shape}")
    return data


def _as_tensor(data: np.ndarray) -> torch.Tensor:
    """A tensor sharing ``data``'s memory (a copy when ``data`` is read-only or not contiguous)."""
    if not data.flags.writeable:
        data = data.copy()
    return torch.from_numpy(np.ascontiguousarray(data))


def _check_tensor(data: torch.Tensor, name: str) -> None:
    if not isinstance(data, torch.Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor (numpy arrays: use downsample_{name}), got {type(data).__name__}"
        )
    if data.ndim != 4:
        raise ValueError(f"{name} must have shape (N, C, H, W), got {tuple(data.shape)}")


def _pad_even_torch(data: torch.Tensor) -> torch.Tensor:
    """Zero-pad the last row / column of odd-sized ``(N, C, H, W)`` data (zero = absent)."""
    py, px = data.shape[-2] % 2, data.shape[-1] % 2
    return F.pad(data, (0, px, 0, py)) if py or px else data


def _corners(data: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The four pixels of every 2x2 block of even-sized data, in row-major block order."""
    return data[..., 0::2, 0::2], data[..., 0::2, 1::2], data[..., 1::2, 0::2], data[..., 1::2, 1::2]


def downsample_image_torch(image: torch.Tensor) -> torch.Tensor:
    """2x mean over the nonzero pixels of each block: ``(N, C, H, W)`` -> ``(N, C, ceil(H/2), ceil(W/2))``.

    Any dtype (float or integer) and device; same dtype and device out. Differentiable w.r.t. a
    float ``image``. See the module docstring for the rule.
    """
    _check_tensor(image, "image")
    a, b, c, d = _corners(_pad_even_torch(image))
    count = (a != 0).to(torch.int32) + (b != 0).to(torch.int32) + (c != 0).to(torch.int32)
    count = count + (d != 0).to(torch.int32)
    wide = torch.float64
    total = a.to(wide) + b.to(wide) + c.to(wide) + d.to(wide)
    has_data = count > 0
    mean = total / count.clamp(min=1).to(wide)
    if not image.is_floating_point():
        return torch.where(has_data, torch.floor(mean + 0.5), 0.0).to(image.dtype)
    out = torch.where(has_data, mean.to(image.dtype), 0.0)
    return torch.where(has_data & (out == 0), out.new_tensor(float(TISSUE_FLOOR)), out)


def downsample_mask_torch(mask: torch.Tensor) -> torch.Tensor:
    """2x max of each block: ``(N, C, H, W)`` -> ``(N, C, ceil(H/2), ceil(W/2))``, same dtype (bool too)."""
    _check_tensor(mask, "mask")
    a, b, c, d = _corners(_pad_even_torch(mask))
    return torch.maximum(torch.maximum(a, b), torch.maximum(c, d))


def downsample_image(image: np.ndarray) -> np.ndarray:
    """:func:`downsample_image_torch` for a numpy ``(Z, C, Y, X)`` array (integer or float dtypes)."""
    image = _check4(image, "image")
    return downsample_image_torch(_as_tensor(image)).numpy()


def downsample_mask(mask: np.ndarray) -> np.ndarray:
    """:func:`downsample_mask_torch` for a numpy ``(Z, C, Y, X)`` array."""
    mask = _check4(mask, "mask")
    return downsample_mask_torch(_as_tensor(mask)).numpy()


def downsample_field(field: np.ndarray) -> np.ndarray:
    """``(Z, 2, Y, X)`` float field at mip m -> mip m + 1 (block mean x 0.5)."""
    field = _check4(field, "field")
    # Edge replication makes the mean of a cut block the mean of its existing pixels.
    pad = ((0, 0), (0, 0), (0, field.shape[-2] % 2), (0, field.shape[-1] % 2))
    padded = np.ascontiguousarray(np.pad(field, pad, mode="edge"))
    out = resample_field(torch.from_numpy(padded), 0, 1)
    return out.numpy().astype(field.dtype, copy=False)


def downsample(data: np.ndarray, kind: str) -> np.ndarray:
    """Downsample one mip with the rule of a layer ``kind`` (``"image"``, ``"mask"``, ``"field"``)."""
    if kind == "image":
        return downsample_image(data)
    if kind == "mask":
        return downsample_mask(data)
    if kind == "field":
        return downsample_field(data)
    raise ValueError(f"unknown layer kind {kind!r}; expected one of {LAYER_KINDS}")
