"""Small real-EM inputs shared by the finetuner tests (crops of the bundled VNC sections)."""

from __future__ import annotations

import numpy as np
import torch

from emcore.field import warp
from emcore.normalize import normalize, section_stats
from emcore.synthetic import smooth_field, true_alignment_field


def normalized_crop(vnc_sections: np.ndarray, z: int, size: int, y: int = 400, x: int = 400) -> torch.Tensor:
    """A normalized ``(1, 1, size, size)`` float32 crop of bundled section ``z`` at ``(y, x)`` (px)."""
    crop = vnc_sections[z, y : y + size, x : x + size]
    stats = section_stats(crop)
    return torch.from_numpy(normalize(crop, stats.mean, stats.std)).view(1, 1, size, size)


def noisy(image: torch.Tensor, gen: torch.Generator, sigma: float = 0.2) -> torch.Tensor:
    """``image`` plus Gaussian noise of ``sigma`` drawn from ``gen`` (on every pixel)."""
    return image + sigma * torch.randn(image.shape, generator=gen)


def noisy_neighbours(
    vnc_sections: np.ndarray, size: int = 128, seed: int = 4, y: int = 400, x: int = 400
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(src, tgt)``: :func:`normalized_crop` of bundled sections 1 and 0 at ``(y, x)``, each with
    :func:`noisy` noise from one generator seeded ``seed`` (the target's drawn first). Neighbouring
    sections: their content differs far beyond the noise (the finetuner's noise check fails)."""
    gen = torch.Generator().manual_seed(seed)
    tgt = noisy(normalized_crop(vnc_sections, 0, size, y, x), gen)
    src = noisy(normalized_crop(vnc_sections, 1, size, y, x), gen)
    return src, tgt


def strained_noisy_pair(
    vnc_sections: np.ndarray, size: int = 256
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(src, tgt, true)``: bundled section 0 at ``(300, 300)`` warped by a locally varying strain
    (a smooth field from an 8 x 8 lattice, 1.5 px: ~32 px features at 256 px) as the source, the
    same crop as the target, each with :func:`noisy` noise (generator seeded 3, the source's drawn
    first), and the true alignment field (px, 8 px border)."""
    gen = torch.Generator().manual_seed(3)
    clean = normalized_crop(vnc_sections, 0, size, y=300, x=300)
    applied = smooth_field(size, size, 1.5, grid=8, seed=2)
    src, tgt = noisy(warp(clean, applied), gen), noisy(clean, gen)
    return src, tgt, true_alignment_field(applied, border=8)
