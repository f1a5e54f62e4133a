"""The encoder network: a small fully convolutional U-Net, image -> one-channel encoding.

Input ``(N, 1, H, W)`` float32 normalized section (tissue mean 0 / std 1, 0 = no data) at the
resolution the model is made for; output ``(N, 1, H, W)`` float32 encoding of the same size (raw
network output: masking to tissue and tiling are done by :func:`emcore.models.encode.encode_tiled`).

Architecture: ``levels`` resolution levels (full, /2, /4, ...), each a block of two 3x3
convolutions + LeakyReLU; 2x average pooling down, nearest-neighbour upsampling and skip
concatenation up, a 1x1 convolution at the end. No normalization layers, so the output at a pixel
depends only on the input within :attr:`EncoderUNet.context_px` of it (what makes tiling exact).

``residual=True`` makes the encoding ``image + correction``: the network's output is added to its
(first) input channel and the last 1x1 convolution starts at zero, so an untrained residual encoder
is exactly the identity and training can only move it away from the raw image where its loss says
the raw image is worse.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["EncoderUNet"]


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1),
        nn.LeakyReLU(0.1),
        nn.Conv2d(c_out, c_out, 3, padding=1),
        nn.LeakyReLU(0.1),
    )


class EncoderUNet(nn.Module):
    """A ``levels``-level U-Net with ``channels`` features at full resolution (``2 * channels`` below).

    ``residual``: output = input channel 0 + network output (identity at initialization).

    Attributes:
        size_multiple: input H and W must be multiples of this (``2 ** (levels - 1)``).
        context_px: an upper bound on the receptive-field radius in input pixels, rounded up to
            ``size_multiple``: a tile padded by this much context gives exact outputs inside.
    """

    def __init__(
        self,
        channels: int = 8,
        levels: int = 3,
        in_channels: int = 1,
        out_channels: int = 1,
        residual: bool = False,
    ) -> None:
        super().__init__()
        if levels < 1 or channels < 1:
            raise ValueError(f"EncoderUNet needs levels >= 1 and channels >= 1, got {levels}, {channels}")
        self.levels = levels
        self.residual = bool(residual)
        widths = [channels] + [2 * channels] * (levels - 1)
        self.down = nn.ModuleList()
        c_prev = in_channels
        for width in widths:
            self.down.append(_block(c_prev, width))
            c_prev = width
        self.up = nn.ModuleList(
            _block(widths[i + 1] + widths[i], widths[i]) for i in reversed(range(levels - 1))
        )
        self.head = nn.Conv2d(widths[0], out_channels, 1)
        if self.residual:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)
        self.size_multiple = 2 ** (levels - 1)
        radius = sum(2 * 2**lvl for lvl in range(levels))  # two 3x3 convs per level, down
        radius += sum(2**lvl for lvl in range(levels - 1))  # 2x pooling
        radius += sum(2 * 2**lvl + 2 ** (lvl + 1) for lvl in range(levels - 1))  # up blocks + upsampling
        self.context_px = -(-radius // self.size_multiple) * self.size_multiple

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[-1] % self.size_multiple or x.shape[-2] % self.size_multiple:
            raise ValueError(
                f"EncoderUNet input must be (N, C, H, W) with H and W multiples of {self.size_multiple}, "
                f"got {tuple(x.shape)} (use encode_tiled, which pads for you)"
            )
        image = x[:, :1]
        skips = []
        for i, block in enumerate(self.down):
            if i:
                x = F.avg_pool2d(x, 2)
            x = block(x)
            skips.append(x)
        for block, skip in zip(self.up, reversed(skips[:-1]), strict=True):
            x = F.interpolate(x, scale_factor=2, mode="nearest")
            x = block(torch.cat((x, skip), dim=1))
        out = self.head(x)
        return image + out if self.residual else out
