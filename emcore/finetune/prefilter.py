"""Gaussian pre-filter of a noisy pair before the last level's fit (issue 17, local strain).

Why: with noise of sigma 0.2 on normalized EM, a soft bending weight that follows local strain
(~40 px features) also fits the noise. A small Gaussian on both images (sigma 0.5 px at the
level's mip) removes most of the noise's gradient energy (white noise has its power at the
highest frequencies, where the EM texture has little) while the texture that carries the
displacement survives, and it evens out differences in sharpness between the two images (e.g.
the position-dependent blur of bilinear resampling). Measured in benchmarks/README.md
("Issue 17, third pass"): with it the strain pairs support a softer weight.

Blurring weakens the data term (the MSE's curvature in the displacement is proportional to the
images' gradient energy), which would make every bending weight act stiffer.
:func:`gradient_energy_ratio` measures that loss per item, so that the level multiplies its
weights by it: the weights stay in units of the unfiltered images' data term.

Shapes: images ``(N, C, H, W)`` float, 0 = no data (a pixel has no data when all its channels
are 0). The filter is a normalized convolution over data pixels, so no-data pixels stay 0 and do
not darken their neighbours.
"""

from __future__ import annotations

import math

import torch

from emcore.filters import gaussian_kernel, separable_blur

__all__ = ["gaussian_prefilter", "gradient_energy_ratio"]

#: Smallest value a filtered data pixel may take (0 would read as no data).
_TINY = 1e-6


def gaussian_prefilter(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """``images`` blurred by a Gaussian of ``sigma`` px (separable, radius ``ceil(3 sigma)``),
    averaging over data pixels only; no-data pixels stay 0, data pixels stay nonzero.
    ``sigma <= 0`` returns ``images`` itself."""
    if not (isinstance(sigma, int | float) and math.isfinite(sigma)):
        raise ValueError(f"sigma must be a finite number of px, got {sigma!r}")
    if sigma <= 0:
        return images
    kernel = gaussian_kernel(float(sigma), 3.0, images.dtype, images.device)
    data = (images != 0).any(dim=1, keepdim=True).to(images.dtype)
    weight = separable_blur(data, kernel).clamp_min(1e-12)
    out = separable_blur(images * data, kernel) / weight
    out = torch.where(data > 0, out, torch.zeros_like(out))
    tiny = torch.full_like(out, _TINY)
    return torch.where((data > 0) & (out == 0), tiny, out)


def _gradient_energy(images: torch.Tensor) -> torch.Tensor:
    """``(N,)`` mean square of the forward differences over pairs of data pixels (0 if none)."""
    data = (images != 0).all(dim=1, keepdim=True)
    total = images.new_zeros(images.shape[0])
    count = images.new_zeros(images.shape[0])
    for dim in (-1, -2):
        size = images.shape[dim]
        a, b = images.narrow(dim, 1, size - 1), images.narrow(dim, 0, size - 1)
        both = (data.narrow(dim, 1, size - 1) & data.narrow(dim, 0, size - 1)).to(images.dtype)
        total += ((a - b).square() * both).flatten(1).sum(dim=1)
        count += both.flatten(1).sum(dim=1) * images.shape[1]
    return total / count.clamp_min(1.0)


def gradient_energy_ratio(filtered: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """``(N,)`` gradient energy of ``filtered`` over that of ``images`` (both ``(N, C, H, W)``):
    how much weaker the MSE's data term is on the filtered images (1 where ``images`` is flat).
    On the benchmark's noisy 512 px crops with sigma 0.5: 0.49-0.54."""
    before = _gradient_energy(images)
    after = _gradient_energy(filtered)
    return torch.where(before > 0, after / before.clamp_min(1e-12), torch.ones_like(before))
