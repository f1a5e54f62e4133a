"""The learned coarse aligner: a SEAMLeSS-style multi-level network that predicts a field.

``PyramidAligner()(src, tgt)`` returns ``field`` ``(N, 2, H, W)`` float32, px at the input mip
(:mod:`emcore.field` convention, channel 0 = x), with ``warp(src, field) ~ tgt``.

How (coarse to fine, ``levels`` levels, level ``l`` = input downsampled ``2**l`` times):

1. Image pyramids of ``src`` and ``tgt`` (2x2 mean over data pixels, so 0 = no data stays 0).
2. One shared feature extractor (two 3x3 convolutions) turns every level of both pyramids into
   ``channels`` feature maps.
3. From the coarsest level down: the field so far is upsampled to the level
   (:func:`emcore.field.resample_field`, values x2 per level), the source features are warped by it
   (:func:`emcore.field.warp`), and the level's own small CNN predicts a residual field (px at that
   level) from ``[warped source features, target features]``; the total becomes
   ``compose(residual, field)`` (:func:`emcore.field.compose`: first the field so far, then the
   residual).

Each level corrects a few of its pixels, so ``levels`` = 4 captures displacements of tens of pixels
at the input mip. The last convolution of every level starts at zero, so an untrained aligner
returns the identity. Inputs: normalized float32 ``(N, 1, H, W)``, 0 = no data, ``H`` and ``W``
multiples of ``2 ** (levels - 1)``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from emcore.field import compose, resample_field, warp

__all__ = ["PyramidAligner", "downsample_data_mean"]


def downsample_data_mean(image: torch.Tensor) -> torch.Tensor:
    """2x2 mean over pixels with data (nonzero), 0 where a block has none: ``(N, C, H/2, W/2)``.

    The differentiable torch twin of :func:`emcore.pyramid.downsample_image` for even sizes.
    """
    has = (image != 0).to(image.dtype)
    count = F.avg_pool2d(has, 2)
    return F.avg_pool2d(image, 2) / count.clamp(min=0.25) * (count > 0)


class PyramidAligner(nn.Module):
    """Shared features + one residual-field CNN per level (see module docstring)."""

    def __init__(self, levels: int = 4, channels: int = 8, hidden: int = 16) -> None:
        super().__init__()
        if levels < 1 or channels < 1 or hidden < 1:
            raise ValueError(
                f"PyramidAligner needs levels, channels, hidden >= 1, got {levels}, {channels}, {hidden}"
            )
        self.levels, self.channels, self.hidden = levels, channels, hidden
        self.size_multiple = 2 ** (levels - 1)
        self.features = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1),
            nn.LeakyReLU(0.1),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.LeakyReLU(0.1),
        )
        self.residuals = nn.ModuleList()
        for _ in range(levels):
            last = nn.Conv2d(hidden, 2, 3, padding=1)
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
            self.residuals.append(
                nn.Sequential(
                    nn.Conv2d(2 * channels, hidden, 3, padding=1),
                    nn.LeakyReLU(0.1),
                    nn.Conv2d(hidden, hidden, 3, padding=2, dilation=2),
                    nn.LeakyReLU(0.1),
                    nn.Conv2d(hidden, hidden, 3, padding=4, dilation=4),
                    nn.LeakyReLU(0.1),
                    last,
                )
            )

    def config_kwargs(self) -> dict[str, Any]:
        """The kwargs that rebuild this architecture (for the model config)."""
        return {"levels": self.levels, "channels": self.channels, "hidden": self.hidden}

    def forward(self, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        if src.shape != tgt.shape or src.ndim != 4 or src.shape[1] != 1:
            raise ValueError(
                f"src and tgt must both be (N, 1, H, W), got {tuple(src.shape)} and {tuple(tgt.shape)}"
            )
        h, w = src.shape[-2:]
        if h % self.size_multiple or w % self.size_multiple:
            raise ValueError(
                f"PyramidAligner input {h}x{w} px must be a multiple of {self.size_multiple} "
                f"({self.levels} levels); crop or pad the sections"
            )
        src_pyr, tgt_pyr = [src], [tgt]
        for _ in range(self.levels - 1):
            src_pyr.append(downsample_data_mean(src_pyr[-1]))
            tgt_pyr.append(downsample_data_mean(tgt_pyr[-1]))
        field: torch.Tensor | None = None
        for level in reversed(range(self.levels)):
            s, t = src_pyr[level], tgt_pyr[level]
            if field is None:
                field = s.new_zeros(s.shape[0], 2, *s.shape[-2:])
            else:
                field = resample_field(field, 1, 0)
            feat_s = warp(self.features(s), field)
            feat_t = self.features(t)
            residual = self.residuals[level](torch.cat((feat_s, feat_t), dim=1))
            field = compose(residual, field)
        assert field is not None
        return field
