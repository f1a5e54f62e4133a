"""The learned coarse aligner: a SEAMLeSS-style multi-level network that predicts a field.

``PyramidAligner()(src, tgt)`` returns ``field`` ``(N, 2, H, W)`` float32, px at the input mip
(:mod:`emcore.field` convention, channel 0 = x), with ``warp(src, field) ~ tgt``.

How (coarse to fine, ``levels`` levels, level ``l`` = input downsampled ``2**l`` times):

1. Image pyramids of ``src`` and ``tgt`` (:func:`emcore.pyramid.downsample_image_torch`: 2x2 mean
   over data pixels, so 0 = no data stays 0).
2. One shared feature extractor (two 3x3 convolutions) turns every level of both pyramids into
   ``channels`` feature maps.
3. From the coarsest level down: the field so far is upsampled to the level
   (:func:`emcore.field.resample_field`, values x2 per level), the source features are warped by it
   (:func:`emcore.field.warp`), a local cost volume compares them with the target features at
   every shift within ``radius`` px (cosine similarity), and the level's own small CNN predicts a
   residual field (px at that level) from ``[cost volume, target features]``; the total becomes
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
from emcore.pyramid import downsample_image_torch

__all__ = ["PyramidAligner"]


class PyramidAligner(nn.Module):
    """Shared features + one residual-field CNN per level (see module docstring)."""

    def __init__(self, levels: int = 4, channels: int = 8, hidden: int = 16, radius: int = 3) -> None:
        super().__init__()
        if levels < 1 or channels < 1 or hidden < 1:
            raise ValueError(
                f"PyramidAligner needs levels, channels, hidden >= 1, got {levels}, {channels}, {hidden}"
            )
        self.levels, self.channels, self.hidden, self.radius = levels, channels, hidden, radius
        cost_channels = (2 * radius + 1) ** 2
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
                    nn.Conv2d(cost_channels + channels, hidden, 3, padding=1),
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
        kwargs = {"levels": self.levels, "channels": self.channels, "hidden": self.hidden}
        return {**kwargs, "radius": self.radius}

    def cost_volume(self, feat_src: torch.Tensor, feat_tgt: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of target features with source features shifted by every ``(dx, dy)``
        in ``[-radius, radius]^2``: ``(N, (2 radius + 1)^2, h, w)`` (0 outside the source)."""
        r = self.radius
        src = F.normalize(feat_src, dim=1)
        tgt = F.normalize(feat_tgt, dim=1)
        h, w = src.shape[-2:]
        padded = F.pad(src, (r, r, r, r))
        costs = [
            (tgt * padded[..., r + dy : r + dy + h, r + dx : r + dx + w]).sum(dim=1)
            for dy in range(-r, r + 1)
            for dx in range(-r, r + 1)
        ]
        return torch.stack(costs, dim=1)

    def forward(self, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        return self.forward_levels(src, tgt)[0][0]

    def forward_levels(
        self, src: torch.Tensor, tgt: torch.Tensor
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """``(fields, src_pyramid, tgt_pyramid)``, finest first: ``fields[l]`` is the total field
        after level ``l`` in px at that level (``fields[0]`` is the output); the pyramids are the
        images at each level (for per-level training losses)."""
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
            src_pyr.append(downsample_image_torch(src_pyr[-1]))
            tgt_pyr.append(downsample_image_torch(tgt_pyr[-1]))
        field: torch.Tensor | None = None
        fields: list[torch.Tensor] = []
        for level in reversed(range(self.levels)):
            s, t = src_pyr[level], tgt_pyr[level]
            if field is None:
                field = s.new_zeros(s.shape[0], 2, *s.shape[-2:])
            else:
                field = resample_field(field, 1, 0)
            feat_s = warp(self.features(s), field)
            feat_t = self.features(t)
            costs = self.cost_volume(feat_s, feat_t)
            residual = self.residuals[level](torch.cat((costs, feat_t), dim=1))
            # Each level corrects at most radius + 1 of its px: bounded, so training cannot explode.
            bound = self.radius + 1.0
            residual = bound * torch.tanh(residual / bound)
            field = compose(residual, field)
            fields.insert(0, field)
        return fields, src_pyr, tgt_pyr
