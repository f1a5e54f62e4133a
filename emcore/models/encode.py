"""Apply an encoder to images of any size in tiles, with context, so tile seams are invisible.

Semantics: the image is taken to continue with zeros ("no data") beyond its edges. Each output
tile is computed from the tile grown by ``pad`` pixels of context (zeros outside the image) and
cropped back, so with ``pad >= network.context_px`` every output pixel sees exactly the input it
would see in one piece: encoding a region whole equals encoding it in tiles (up to float rounding).
Tile origins are multiples of ``tile`` and ``pad`` is a multiple of the network's ``size_multiple``,
so all tiles share one pooling grid.

The encoding is set to exactly 0 where the input has no data (all channels 0), and tissue values
that come out exactly 0.0 are nudged to :data:`emcore.normalize.TISSUE_FLOOR`, so 0 keeps meaning
"no data" downstream.
"""

from __future__ import annotations

import torch
from torch import nn

from emcore.models.format import Model
from emcore.normalize import TISSUE_FLOOR

__all__ = ["encode_tiled"]


def encode_tiled(
    model: Model | nn.Module,
    image: torch.Tensor,
    tile: int | None = None,
    pad: int | None = None,
) -> torch.Tensor:
    """Encode ``image`` tile by tile.

    Args:
        model: a loaded :class:`~emcore.models.format.Model` or a network with ``context_px`` and
            ``size_multiple`` attributes (e.g. :class:`~emcore.models.encoder.EncoderUNet`).
        image: ``(N, C, H, W)`` float32 normalized sections (0 = no data), C = the model's input
            channels.
        tile: output tile size in px (a multiple of ``size_multiple``); ``None`` = the whole image
            in one tile.
        pad: context in px on each side of a tile (a multiple of ``size_multiple``, at least
            ``context_px``); ``None`` = ``context_px``.

    Returns:
        ``(N, C_out, H, W)`` float32 encodings, 0 where the input has no data.
    """
    network = model.network if isinstance(model, Model) else model
    try:
        multiple, context = int(network.size_multiple), int(network.context_px)
    except AttributeError:
        raise ValueError(
            f"encode_tiled needs a network with size_multiple and context_px, got {type(network).__name__}"
        ) from None
    if image.ndim != 4 or not image.is_floating_point():
        raise ValueError(f"image must be a float (N, C, H, W) tensor, got {image.dtype} {tuple(image.shape)}")
    n, _, height, width = image.shape
    pad = context if pad is None else pad
    if pad < context or pad % multiple:
        raise ValueError(
            f"pad must be a multiple of {multiple} and at least the model's context of {context} px "
            f"for seamless tiles, got {pad}"
        )
    if tile is None:
        tile = -(-max(height, width, 1) // multiple) * multiple
    if tile <= 0 or tile % multiple:
        raise ValueError(f"tile must be a positive multiple of {multiple} px, got {tile}")

    param = next(network.parameters(), None)
    device = param.device if param is not None else image.device
    out: torch.Tensor | None = None
    was_training = network.training
    network.eval()
    try:
        with torch.no_grad():
            for y0 in range(0, height, tile):
                for x0 in range(0, width, tile):
                    y1, x1 = min(y0 + tile, height), min(x0 + tile, width)
                    # Padded input: [y0 - pad, y1 + pad) rounded up to the size multiple.
                    rows = -(-(y1 - y0 + 2 * pad) // multiple) * multiple
                    cols = -(-(x1 - x0 + 2 * pad) // multiple) * multiple
                    region = image.new_zeros(n, image.shape[1], rows, cols)
                    sy0, sx0 = max(y0 - pad, 0), max(x0 - pad, 0)
                    sy1, sx1 = min(y0 - pad + rows, height), min(x0 - pad + cols, width)
                    oy, ox = y0 - pad, x0 - pad  # region origin in image coordinates
                    region[..., sy0 - oy : sy1 - oy, sx0 - ox : sx1 - ox] = image[..., sy0:sy1, sx0:sx1]
                    encoded = network(region.to(device)).to(image.device, torch.float32)
                    if out is None:
                        out = image.new_zeros(n, encoded.shape[1], height, width, dtype=torch.float32)
                    out[..., y0:y1, x0:x1] = encoded[..., pad : pad + y1 - y0, pad : pad + x1 - x0]
    finally:
        network.train(was_training)
    if out is None:  # empty image
        return image.new_zeros(image.shape, dtype=torch.float32)
    tissue = (image != 0).any(dim=1, keepdim=True)
    out = torch.where(tissue, out, torch.zeros((), dtype=out.dtype))
    return torch.where(tissue & (out == 0), torch.full((), float(TISSUE_FLOOR)), out)
