"""Pure 2x downsampling in x and y of image, mask and field arrays (one mip step).

All functions take a numpy array ``(Z, C, Y, X)`` at mip ``m`` and return ``(Z, C, ceil(Y/2),
ceil(X/2))`` at mip ``m + 1`` (z and channels unchanged), same dtype. Odd sizes: the missing row /
column of the last 2x2 block is treated as absent (no data), which matches cloud-volume's
``size(m + 1) = ceil(size(m) / 2)``.

API summary
-----------
* ``downsample_image(image)``: mean over the **data** (nonzero) pixels of each 2x2 block, per
  channel, so that zeros ("no data") never darken tissue edges; a block without data stays 0.
  uint8 rounds half up; float results that land on exactly 0.0 are nudged to ``TISSUE_FLOOR``.
* ``downsample_mask(mask)``: max of each 2x2 block (a defect anywhere marks the coarse pixel).
* ``downsample_field(field)``: ``(Z, 2, Y, X)`` displacement in pixels at mip m -> mip m + 1: the
  mean of each block, times 0.5 (via :func:`emcore.field.resample_field`).
* ``downsample(data, kind)`` with ``kind`` in ``"image" | "mask" | "field"``.
"""

from __future__ import annotations

import numpy as np
import torch

from emcore.field import resample_field
from emcore.normalize import keep_tissue_nonzero

__all__ = ["LAYER_KINDS", "downsample", "downsample_field", "downsample_image", "downsample_mask"]

LAYER_KINDS = ("image", "mask", "field")


def _check4(data: np.ndarray, name: str) -> np.ndarray:
    data = np.asarray(data)
    if data.ndim != 4:
        raise ValueError(f"{name} must have shape (Z, C, Y, X), got {data.shape}")
    return data


def _pad_even(data: np.ndarray, mode: str) -> np.ndarray:
    py, px = data.shape[-2] % 2, data.shape[-1] % 2
    if not (py or px):
        return data
    return np.pad(data, ((0, 0), (0, 0), (0, py), (0, px)), mode=mode)


def _blocks(data: np.ndarray) -> np.ndarray:
    """``(Z, C, Y, X)`` with even Y, X -> ``(Z, C, Y/2, X/2, 4)`` 2x2 blocks."""
    z, c, y, x = data.shape
    b = data.reshape(z, c, y // 2, 2, x // 2, 2).transpose(0, 1, 2, 4, 3, 5)
    return b.reshape(z, c, y // 2, x // 2, 4)


def downsample_image(image: np.ndarray) -> np.ndarray:
    """2x mean over nonzero pixels per block (see module docstring). Integer or float dtypes."""
    image = _check4(image, "image")
    blocks = _blocks(_pad_even(image, "constant"))
    data = blocks != 0
    count = data.sum(axis=-1)
    total = blocks.sum(axis=-1, dtype=np.float64)
    has_data = count > 0
    safe = np.maximum(count, 1)
    if np.issubdtype(image.dtype, np.integer):
        mean = np.floor(total / safe + 0.5)
        return np.where(has_data, mean, 0).astype(image.dtype)
    mean = (total / safe).astype(image.dtype)
    return keep_tissue_nonzero(np.where(has_data, mean, image.dtype.type(0)), has_data)


def downsample_mask(mask: np.ndarray) -> np.ndarray:
    """2x max per block."""
    mask = _check4(mask, "mask")
    return _blocks(_pad_even(mask, "constant")).max(axis=-1)


def downsample_field(field: np.ndarray) -> np.ndarray:
    """``(Z, 2, Y, X)`` float field at mip m -> mip m + 1 (block mean x 0.5)."""
    field = _check4(field, "field")
    # Edge replication makes the mean of a cut block the mean of its existing pixels.
    padded = np.ascontiguousarray(_pad_even(field, "edge"))
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
