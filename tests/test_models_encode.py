"""encode_tiled: whole == tiled, masks to tissue, fully convolutional, clear errors."""

from __future__ import annotations

import pytest
import torch

from emcore.models import encode_tiled
from emcore.models.encoder import EncoderUNet


@pytest.fixture(scope="module")
def net() -> EncoderUNet:
    torch.manual_seed(0)
    return EncoderUNet(channels=8, levels=3)


def test_context_covers_the_receptive_field(net: EncoderUNet) -> None:
    x = torch.zeros(1, 1, 160, 160, requires_grad=True)
    net(x)[0, 0, 80, 80].backward()
    rows, cols = (x.grad[0, 0] != 0).nonzero().unbind(1)
    radius = max(80 - int(rows.min()), int(rows.max()) - 80, 80 - int(cols.min()), int(cols.max()) - 80)
    assert 0 < radius <= net.context_px


@pytest.mark.parametrize(("tile", "pad"), [(24, None), (16, 40), (64, 32)])
def test_tiled_equals_whole(net: EncoderUNet, tile: int, pad: int | None) -> None:
    gen = torch.Generator().manual_seed(1)
    image = torch.randn(2, 1, 60, 44, generator=gen)
    image[:, :, :12] = 0  # no data at the top
    whole = encode_tiled(net, image)
    tiled = encode_tiled(net, image, tile=tile, pad=pad)
    assert whole.shape == image.shape
    torch.testing.assert_close(tiled, whole, atol=1e-5, rtol=1e-5)
    assert (whole[:, :, :12] == 0).all()
    assert (whole[:, :, 12:] != 0).all()


def test_a_region_cut_from_a_bigger_image_with_context_matches(net: EncoderUNet) -> None:
    gen = torch.Generator().manual_seed(2)
    image = torch.randn(1, 1, 128, 128, generator=gen)
    whole = encode_tiled(net, image, tile=32)
    ctx = net.context_px
    chunk = image[..., 32 - ctx : 64 + ctx, 64 - ctx : 96 + ctx]
    encoded_chunk = encode_tiled(net, chunk)[..., ctx:-ctx, ctx:-ctx]
    torch.testing.assert_close(encoded_chunk, whole[..., 32:64, 64:96], atol=1e-5, rtol=1e-5)


def test_bad_tiles_are_refused(net: EncoderUNet) -> None:
    image = torch.randn(1, 1, 32, 32)
    with pytest.raises(ValueError, match="pad must be a multiple of 4 and at least"):
        encode_tiled(net, image, tile=16, pad=8)
    with pytest.raises(ValueError, match="tile must be a positive multiple of 4"):
        encode_tiled(net, image, tile=18)
    with pytest.raises(ValueError, match=r"float \(N, C, H, W\)"):
        encode_tiled(net, torch.zeros(32, 32))


def test_an_untrained_residual_encoder_is_the_identity() -> None:
    torch.manual_seed(0)
    residual = EncoderUNet(channels=4, levels=3, residual=True)
    image = torch.randn(2, 1, 40, 36)
    image[..., :6, :] = 0
    torch.testing.assert_close(encode_tiled(residual, image, tile=16), image, atol=0, rtol=0)
    with torch.no_grad():
        residual.head.bias.fill_(0.5)  # a trained correction is added to the image
    torch.testing.assert_close(residual(image), image + 0.5)
