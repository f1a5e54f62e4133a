"""Separable Gaussian filtering of image batches.

Images are ``(N, C, H, W)`` float tensors; ``sigma`` is in px of the images; borders are padded
by replication. The kernel has radius ``max(1, ceil(truncate * sigma))`` px and sums to 1.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["gaussian_blur", "gaussian_kernel", "separable_blur"]


def gaussian_kernel(sigma: float, truncate: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``(2r + 1,)`` normalized 1-d Gaussian of ``sigma`` px, ``r = max(1, ceil(truncate * sigma))``."""
    radius = max(1, math.ceil(truncate * sigma))
    x = torch.arange(-radius, radius + 1, dtype=dtype, device=device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def separable_blur(images: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """``images`` ``(N, C, H, W)`` convolved with ``kernel`` along x, then along y (each channel alone)."""
    r = (kernel.numel() - 1) // 2
    n, c, h, w = images.shape
    flat = images.reshape(n * c, 1, h, w)
    flat = F.conv2d(F.pad(flat, (r, r, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    flat = F.conv2d(F.pad(flat, (0, 0, r, r), mode="replicate"), kernel.view(1, 1, -1, 1))
    return flat.reshape(n, c, h, w)


def gaussian_blur(images: torch.Tensor, sigma: float, truncate: float = 3.0) -> torch.Tensor:
    """``images`` ``(N, C, H, W)`` blurred by a Gaussian of ``sigma`` px (see the module docstring)."""
    return separable_blur(images, gaussian_kernel(sigma, truncate, images.dtype, images.device))
