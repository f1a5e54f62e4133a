"""2x downsampling rules: images average data pixels, masks take the max, fields average x 0.5."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from emcore.field import resample_field, warp
from emcore.normalize import TISSUE_FLOOR
from emcore.pyramid import (
    downsample,
    downsample_field,
    downsample_image,
    downsample_image_torch,
    downsample_mask,
    downsample_mask_torch,
)


def test_image_mean_ignores_no_data_pixels():
    image = np.array([[[[10, 20, 0, 0], [30, 0, 0, 0]]]], np.uint8)
    out = downsample_image(image)
    assert out.dtype == np.uint8 and out.shape == (1, 1, 1, 2)
    assert out[0, 0, 0, 0] == 20  # (10 + 20 + 30) / 3, not / 4
    assert out[0, 0, 0, 1] == 0  # no data stays no data


def test_image_edges_do_not_darken_on_real_em(vnc_sections):
    section = vnc_sections[0, :128, :128].copy()
    section[:, 61:] = 0  # tissue ends at an odd column
    out = downsample_image(section[None, None])[0, 0]
    # the coarse column holding the edge averages its tissue pixels only
    np.testing.assert_allclose(out[:, 30], section[:, 60].reshape(64, 2).mean(1), atol=0.5)
    naive = section.reshape(64, 2, 64, 2).astype(float).mean((1, 3))
    assert (out[:, 30] > naive[:, 30] + 10).mean() > 0.9  # a plain mean would darken it


def test_uint8_rounds_half_up_and_odd_sizes_keep_the_last_row():
    image = np.array([[[[1, 2, 7], [1, 2, 9], [5, 0, 0]]]], np.uint8)
    out = downsample_image(image)
    assert out.shape == (1, 1, 2, 2)
    np.testing.assert_array_equal(out[0, 0], [[2, 8], [5, 0]])  # 1.5 -> 2, (7 + 9) / 2, 5 alone


def test_float_image_keeps_tissue_nonzero():
    image = np.array([[[[1.0, -1.0], [0.0, 0.0]]]], np.float32)
    out = downsample_image(image)
    assert out[0, 0, 0, 0] == TISSUE_FLOOR  # mean is 0.0 but there is tissue


def test_mask_is_max_of_each_block():
    mask = np.zeros((2, 1, 5, 5), np.uint8)
    mask[1, 0, 4, 4] = 1
    mask[0, 0, 1, 0] = 3
    out = downsample_mask(mask)
    assert out.shape == (2, 1, 3, 3)
    assert out[1, 0, 2, 2] == 1 and out[0, 0, 0, 0] == 3 and out.sum() == 4


def test_field_values_halve_and_match_resample_field():
    rng = np.random.default_rng(1)
    field = rng.normal(size=(2, 2, 8, 6)).astype(np.float32)
    out = downsample_field(field)
    expected = resample_field(torch.from_numpy(field), 0, 1).numpy()
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    np.testing.assert_allclose(downsample_field(np.full((1, 2, 4, 4), 4.0, np.float32)), 2.0)


def test_field_odd_edge_is_the_mean_of_existing_pixels():
    field = np.zeros((1, 2, 3, 3), np.float32)
    field[0, 0, :, 2] = [2.0, 4.0, 8.0]
    out = downsample_field(field)
    assert out.shape == (1, 2, 2, 2)
    assert out[0, 0, 0, 1] == pytest.approx(0.5 * 3.0) and out[0, 0, 1, 1] == pytest.approx(0.5 * 8.0)


def test_downsampled_translation_warps_the_same_at_both_mips():
    """A +4 px (mip 0) x translation is +2 px at mip 1: warping commutes with downsampling."""
    image = np.zeros((1, 1, 32, 32), np.float32)
    image[0, 0, 8:24, 8:24] = np.arange(256, dtype=np.float32).reshape(16, 16) + 1
    field0 = np.zeros((1, 2, 32, 32), np.float32)
    field0[:, 0] = 4.0
    warped0 = warp(torch.from_numpy(image), torch.from_numpy(field0)).numpy()
    field1 = downsample(field0, "field")
    warped1 = warp(torch.from_numpy(downsample(image, "image")), torch.from_numpy(field1)).numpy()
    np.testing.assert_allclose(downsample(warped0, "image"), warped1, rtol=1e-5)


def test_unknown_kind_and_bad_shape():
    with pytest.raises(ValueError, match="unknown layer kind"):
        downsample(np.zeros((1, 1, 2, 2)), "segmentation")
    with pytest.raises(ValueError, match=r"\(Z, C, Y, X\)"):
        downsample_image(np.zeros((2, 2)))


def test_numpy_wrappers_equal_the_torch_implementation(vnc_sections):
    """One implementation: the numpy entry points return exactly the torch functions' values."""
    section = vnc_sections[:2, :67, :90].copy()[:, None]  # uint8, odd height
    section[:, :, :20, :13] = 0
    floats = np.where(section > 0, section.astype(np.float32) / 40 - 3, np.float32(0))
    for image in (section, floats):
        torch_out = downsample_image_torch(torch.from_numpy(image))
        assert torch_out.dtype == torch.from_numpy(image).dtype
        np.testing.assert_array_equal(downsample_image(image), torch_out.numpy())
    mask = floats > 1.5
    torch_mask = downsample_mask_torch(torch.from_numpy(mask))
    np.testing.assert_array_equal(downsample_mask(mask), torch_mask.numpy())


def test_torch_image_downsampler_rules_and_gradient():
    image = torch.tensor([[[[10.0, 20.0, 0.0, 0.0, 5.0], [30.0, 0.0, 0.0, 0.0, 0.0]]]], requires_grad=True)
    out = downsample_image_torch(image)
    assert out.shape == (1, 1, 1, 3)
    assert out.detach()[0, 0, 0].tolist() == [20.0, 0.0, 5.0]  # mean over data; no data stays 0; odd edge
    out.sum().backward()
    # d mean / d pixel = 1 / (data pixels in its block); blocks without data pass no gradient
    expected = torch.tensor([[[[1 / 3, 1 / 3, 0, 0, 1], [1 / 3, 1 / 3, 0, 0, 1]]]])
    assert torch.allclose(image.grad, expected)
    mask = torch.zeros(1, 1, 3, 3, dtype=torch.bool)
    mask[0, 0, 2, 2] = True
    assert downsample_mask_torch(mask)[0, 0].tolist() == [[False, False], [False, True]]


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_torch_downsamplers_run_on_the_device_and_match_numpy(vnc_sections, device: str):
    image = torch.from_numpy(vnc_sections[:2, :128, :96].astype(np.float32))[:, None] / 50
    image[..., :30, :17] = 0
    out = downsample_image_torch(image.to(device))
    assert out.device.type == device
    assert np.array_equal(out.cpu().numpy(), downsample_image(image.numpy()))
    mask = image > 2
    assert np.array_equal(downsample_mask_torch(mask.to(device)).cpu().numpy(), downsample_mask(mask.numpy()))


def test_torch_downsamplers_reject_numpy_and_bad_shapes():
    with pytest.raises(TypeError, match="downsample_image"):
        downsample_image_torch(np.zeros((1, 1, 2, 2)))
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        downsample_mask_torch(torch.zeros(2, 2))
