"""Realistic EM imaging artifacts for training and benchmarks (applied to normalized sections).

Serial-section EM images carry artifacts that an encoder must see through: uneven illumination
and section thickness (smooth brightness/contrast gradients), detector noise, defocus (blur),
knife scratches and charging streaks (thin bright or dark lines), and missing data (zeroed
regions: cracks, debris, out-of-field). :func:`add_artifacts` draws a random combination.

Input/output: ``(N, 1, H, W)`` float32 normalized sections (tissue mean 0 / std 1; 0 = no data);
all amplitudes are in those std units, lengths in pixels at the image's mip. Pixels without data
stay 0, tissue pixels stay nonzero (exact zeros become :data:`emcore.normalize.TISSUE_FLOOR`), and
zeroed regions become 0 (no data). Randomness comes only from the ``generator`` given, so a seed
reproduces the artifacts exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from emcore.filters import gaussian_blur
from emcore.normalize import TISSUE_FLOOR

__all__ = ["ArtifactSettings", "add_artifacts"]


@dataclass(frozen=True)
class ArtifactSettings:
    """Largest strength of each artifact; each is applied with probability ``probability``.

    Attributes:
        gradient: brightness offset and relative contrast change at the image edge (std units).
        noise: largest Gaussian noise sigma (std units).
        blur: largest Gaussian blur sigma (px).
        streaks: most streaks/scratches per image; each is 1-3 px wide, +-2..4 std.
        zeroed: largest fraction of the image's area set to 0 (up to two rectangles).
        probability: chance that each kind of artifact is applied to an image.
    """

    gradient: float = 0.5
    noise: float = 0.4
    blur: float = 1.5
    streaks: int = 3
    zeroed: float = 0.15
    probability: float = 0.5


def _uniform(gen: torch.Generator, lo: float = 0.0, hi: float = 1.0) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=gen))


def _one(image: torch.Tensor, gen: torch.Generator, s: ArtifactSettings) -> torch.Tensor:
    """Artifacts on one ``(1, 1, H, W)`` image; returns the new image (0 outside data)."""
    _, _, h, w = image.shape
    out = image.clone()
    ys = torch.arange(h, dtype=image.dtype).view(h, 1) - (h - 1) / 2
    xs = torch.arange(w, dtype=image.dtype).view(1, w) - (w - 1) / 2
    scale = max(h, w) / 2

    def happens() -> bool:
        return _uniform(gen) < s.probability

    if s.blur > 0 and happens():
        out = gaussian_blur(out, _uniform(gen, 0.5, s.blur), truncate=2.5)
    if s.gradient > 0 and happens():
        angle = _uniform(gen, 0, 2 * math.pi)
        ramp = (xs * math.cos(angle) + ys * math.sin(angle)) / scale  # about -1..1
        contrast = _uniform(gen, -s.gradient, s.gradient)
        brightness = _uniform(gen, -s.gradient, s.gradient)
        out = out * (1 + contrast * ramp) + brightness * ramp
    if s.streaks > 0 and happens():
        for _ in range(int(torch.randint(1, s.streaks + 1, (), generator=gen))):
            angle = _uniform(gen, 0, math.pi)
            offset = _uniform(gen, -0.8, 0.8) * scale
            width = _uniform(gen, 0.5, 1.5)
            value = _uniform(gen, 2.0, 4.0) * (1 if _uniform(gen) < 0.5 else -1)
            dist = (xs * math.cos(angle) + ys * math.sin(angle) - offset).abs()
            out = torch.where(dist < width, torch.full_like(out, value), out)
    if s.noise > 0 and happens():
        out = out + _uniform(gen, 0.05, s.noise) * torch.randn(out.shape, generator=gen, dtype=out.dtype)
    data = image != 0
    if s.zeroed > 0 and happens():
        for _ in range(int(torch.randint(1, 3, (), generator=gen))):
            area = _uniform(gen, 0.02, s.zeroed / 2) * h * w
            aspect = _uniform(gen, 0.2, 5.0)
            rh = max(1, min(h, round(math.sqrt(area / aspect))))
            rw = max(1, min(w, round(math.sqrt(area * aspect))))
            y0 = int(torch.randint(0, h - rh + 1, (), generator=gen))
            x0 = int(torch.randint(0, w - rw + 1, (), generator=gen))
            data[..., y0 : y0 + rh, x0 : x0 + rw] = False
    out = torch.where(data, out, torch.zeros((), dtype=out.dtype))
    return torch.where(data & (out == 0), torch.full((), float(TISSUE_FLOOR), dtype=out.dtype), out)


def add_artifacts(
    image: torch.Tensor, generator: torch.Generator, settings: ArtifactSettings | None = None
) -> torch.Tensor:
    """A copy of ``image`` ``(N, 1, H, W)`` with random artifacts drawn independently per item.

    Args:
        image: float normalized sections, 0 = no data.
        generator: the only source of randomness (seed it for reproducible artifacts).
        settings: strengths (default :class:`ArtifactSettings`).

    Returns:
        ``(N, 1, H, W)`` same dtype; 0 where the input has no data or a region was zeroed.
    """
    if image.ndim != 4 or image.shape[1] != 1 or not image.is_floating_point():
        raise ValueError(
            f"add_artifacts needs a float (N, 1, H, W) image, got {image.dtype} {tuple(image.shape)}"
        )
    settings = settings or ArtifactSettings()
    return torch.cat([_one(image[i : i + 1], generator, settings) for i in range(image.shape[0])])
