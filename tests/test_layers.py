"""Layers on real cloud-volume ``file://`` storage under tmp_path."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
from cloudvolume import CloudVolume

from emcore.errors import IncompatibleLayerError, LayerNotFoundError, UnalignedWriteError
from emcore.geometry import BBox, VoxelBox
from emcore.layers import create_layer, open_layer, require_same_resolution

RES = (4.6, 4.6, 50.0)


def _image_layer(layer_root: str, **kw):
    args = dict(kind="image", resolution=RES, size=(96, 64, 2), chunk_size=(32, 32, 1), num_mips=3)
    args.update(kw)
    return create_layer(f"{layer_root}/image", **args)


def _local(path: str) -> str:
    return path.removeprefix("file://")


def test_write_read_round_trip_and_reopen(layer_root, vnc_sections):
    layer = _image_layer(layer_root)
    data = vnc_sections[:2, :64, :96]
    layer.write(layer.bounds(0), data)
    again = open_layer(f"{layer_root}/image")
    out = again.read(layer.bounds(0))
    assert out.shape == (2, 1, 64, 96) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[:, 0], data)
    # a BBox in nm reads the same voxels
    np.testing.assert_array_equal(again.read(BBox.from_voxels(VoxelBox((32, 0, 1), (64, 32, 2)), RES))[0, 0],
                                  data[1, :32, 32:64])
    # pickled (as for dask workers) it still reads, and is the same layer
    unpickled = pickle.loads(pickle.dumps(again))
    np.testing.assert_array_equal(unpickled.read(layer.bounds(0))[:, 0], data)
    assert unpickled == layer and len({unpickled, layer, again}) == 1


def test_info_records_resolution_per_mip(layer_root):
    layer = _image_layer(layer_root, size=(95, 63, 2))
    assert layer.resolution(0) == RES
    assert layer.resolution(2) == pytest.approx((18.4, 18.4, 50.0))
    assert layer.size(1) == (48, 32, 2) and layer.size(2) == (24, 16, 2)
    with open(os.path.join(_local(layer.path), "info")) as f:
        info = json.load(f)
    assert [s["resolution"] for s in info["scales"]][1] == pytest.approx([9.2, 9.2, 50.0])
    other = create_layer(f"{layer_root}/other", kind="mask", resolution=(4.0, 4.0, 50.0), size=(8, 8, 1))
    assert require_same_resolution([layer, layer], 0) == RES
    with pytest.raises(IncompatibleLayerError, match="differ in resolution at mip 0"):
        require_same_resolution([layer, other], 0)
    with pytest.raises(ValueError, match="mips 0..2"):
        layer.resolution(3)


def test_padded_read_zero_fills_outside_the_bounds(layer_root):
    layer = _image_layer(layer_root)
    data = np.full((2, 64, 96), 7, np.uint8)
    layer.write(layer.bounds(0), data)
    out = layer.read(VoxelBox((0, 0, 0), (32, 32, 1)), pad=4)
    assert out.shape == (1, 1, 40, 40)
    assert (out[0, 0, 4:, 4:] == 7).all()
    assert (out[0, 0, :4] == 0).all() and (out[0, 0, :, :4] == 0).all()
    # entirely outside, and with z padding past the last section
    assert not layer.read(VoxelBox((200, 200, 0), (210, 210, 1))).any()
    zpad = layer.read(VoxelBox((0, 0, 1), (8, 8, 2)), pad_z=1)
    assert zpad.shape == (3, 1, 8, 8) and (zpad[:2] == 7).all() and not zpad[2].any()


def test_never_written_chunks_read_as_zero(layer_root):
    layer = _image_layer(layer_root)
    assert not layer.read(layer.bounds(0)).any()


def test_unaligned_write_is_refused_and_writes_nothing(layer_root):
    layer = _image_layer(layer_root)
    with pytest.raises(UnalignedWriteError, match=r"x start 8.*\(32, 32, 1\)"):
        layer.write(VoxelBox((8, 0, 0), (40, 32, 1)), np.ones((1, 32, 32), np.uint8))
    with pytest.raises(UnalignedWriteError, match="y stop 40"):
        layer.write(VoxelBox((0, 0, 0), (32, 40, 1)), np.ones((1, 40, 32), np.uint8))
    assert not layer.read(layer.bounds(0)).any()
    chunk_files = [f for _, _, files in os.walk(_local(layer.path)) for f in files if f != "info"]
    assert chunk_files == []


def test_write_ending_at_the_bound_is_allowed(layer_root):
    layer = _image_layer(layer_root, size=(80, 40, 1))
    layer.write(VoxelBox((64, 32, 0), (80, 40, 1)), np.full((1, 8, 16), 3, np.uint8))
    assert layer.read(layer.bounds(0)).sum() == 3 * 8 * 16


def test_write_checks_shape_and_dtype(layer_root):
    layer = _image_layer(layer_root)
    box = VoxelBox((0, 0, 0), (32, 32, 1))
    with pytest.raises(ValueError, match="expected"):
        layer.write(box, np.ones((1, 32, 31), np.uint8))
    with pytest.raises(ValueError, match="do not fit"):
        layer.write(box, np.full((1, 32, 32), 300, np.int32))
    with pytest.raises(ValueError, match="without losing"):
        layer.write(box, np.ones((1, 32, 32), np.float32))
    field = create_layer(
        f"{layer_root}/f", kind="field", resolution=RES, size=(32, 32, 1), chunk_size=(32, 32, 1)
    )
    with pytest.raises(ValueError, match="NaN"):
        field.write(box, np.full((1, 2, 32, 32), np.nan, np.float32))


def test_create_over_existing_layer(layer_root):
    layer = _image_layer(layer_root)
    layer.write(layer.bounds(0), np.ones((2, 64, 96), np.uint8))
    same = _image_layer(layer_root)  # identical info: opened, data kept
    assert same.read(layer.bounds(0)).all()
    for change, pattern in [
        ({"resolution": (4.0, 4.0, 50.0)}, "mip 0 resolution"),
        ({"dtype": "float32"}, "data_type"),
        ({"chunk_size": (64, 64, 1)}, "chunk_sizes"),
        ({"num_channels": 3}, "num_channels"),
    ]:
        with pytest.raises(IncompatibleLayerError, match=pattern):
            _image_layer(layer_root, **change)
    with pytest.raises(IncompatibleLayerError, match="kind"):
        create_layer(f"{layer_root}/image", kind="mask", resolution=RES, size=(96, 64, 2),
                     chunk_size=(32, 32, 1), num_mips=3)


def test_open_missing_layer_is_a_clear_error(tmp_path):
    with pytest.raises(LayerNotFoundError, match=r"no layer at file://.*nowhere \(missing info file\)"):
        open_layer(tmp_path / "nowhere")


def test_bad_layer_parameters_are_rejected(layer_root):
    with pytest.raises(ValueError, match="field layer has 2 channel"):
        create_layer(f"{layer_root}/f", kind="field", resolution=RES, size=(8, 8, 1), num_channels=1)
    with pytest.raises(ValueError, match="mask layer must have dtype"):
        create_layer(f"{layer_root}/m", kind="mask", resolution=RES, size=(8, 8, 1), dtype="float32")
    with pytest.raises(ValueError, match="divisible by 2"):
        create_layer(f"{layer_root}/o", kind="image", resolution=RES, size=(8, 8, 1), voxel_offset=(2, 0, 0),
                     num_mips=3)


def test_image_downsample_averages_data_pixels_only(layer_root):
    layer = _image_layer(layer_root, size=(64, 64, 1), num_mips=3)
    data = np.zeros((1, 64, 64), np.uint8)
    data[0, :, :33] = 100  # tissue up to x=32 (an odd edge), no data beyond
    data[0, 0, 0], data[0, 0, 1], data[0, 1, 0] = 101, 0, 102  # a block with one hole
    layer.write(layer.bounds(0), data)
    written = layer.downsample(layer.bounds(0))
    assert written == [VoxelBox((0, 0, 0), (32, 32, 1)), VoxelBox((0, 0, 0), (16, 16, 1))]
    mip1 = layer.read(layer.bounds(1), 1)[0, 0]
    assert mip1[0, 0] == 101  # (101 + 102 + 100) / 3, the hole ignored
    assert (mip1[:, 16] == 100).all()  # the half-empty edge block keeps the tissue value
    assert (mip1[:, 17:] == 0).all()
    mip2 = layer.read(layer.bounds(2), 2)[0, 0]
    assert (mip2[1:, :8] == 100).all() and (mip2[:, 8] == 100).all() and (mip2[:, 9:] == 0).all()


def test_mask_downsample_is_max(layer_root):
    mask = create_layer(f"{layer_root}/mask", kind="mask", resolution=RES, size=(32, 32, 1),
                        chunk_size=(16, 16, 1), num_mips=2)
    data = np.zeros((1, 32, 32), np.uint8)
    data[0, 5, 7] = 1
    mask.write(mask.bounds(0), data)
    mask.downsample(mask.bounds(0))
    mip1 = mask.read(mask.bounds(1), 1)[0, 0]
    assert mip1[2, 3] == 1 and mip1.sum() == 1


def test_field_layer_stores_x_in_channel_0_and_downsamples_by_half(layer_root):
    field = create_layer(f"{layer_root}/field", kind="field", resolution=RES, size=(32, 32, 1),
                         chunk_size=(16, 16, 1), num_mips=2)
    assert field.num_channels == 2 and field.dtype == np.float32
    data = np.zeros((1, 2, 32, 32), np.float32)
    data[:, 0] = 3.0  # x displacement
    data[:, 1] = -1.0  # y displacement
    data[0, 0, 0, 0] = 7.0
    field.write(field.bounds(0), data)
    raw = np.asarray(CloudVolume(field.path, progress=False)[0:32, 0:32, 0:1])  # (X, Y, Z, C)
    assert raw[5, 6, 0, 0] == 3.0 and raw[5, 6, 0, 1] == -1.0 and raw[0, 0, 0, 0] == 7.0
    field.downsample(field.bounds(0))
    mip1 = field.read(field.bounds(1), 1)
    assert mip1[0, 0, 0, 0] == pytest.approx(0.5 * (7 + 3 * 3) / 4)
    np.testing.assert_allclose(mip1[0, 0, 1:, 1:], 1.5)
    np.testing.assert_allclose(mip1[0, 1], -0.5)


def test_downsample_refuses_regions_that_land_off_the_grid(layer_root):
    layer = _image_layer(layer_root, size=(128, 128, 1), chunk_size=(16, 16, 1), num_mips=3)
    # a 16-px chunk at mip 0 covers 8 px at mip 1: not a whole chunk and not at the bound
    with pytest.raises(UnalignedWriteError, match="downsample target at mip 1"):
        layer.downsample(VoxelBox((16, 0, 0), (32, 16, 1)))
    assert not layer.read(layer.bounds(1), 1).any()


def test_read_xarray_has_nm_coordinates(layer_root):
    layer = _image_layer(layer_root)
    da = layer.read_xarray(VoxelBox((32, 0, 1), (64, 32, 2)), mip=1)
    assert da.dims == ("z", "c", "y", "x") and da.shape == (1, 1, 32, 32)
    assert da.x.values[0] == pytest.approx(32.5 * 9.2)
    assert da.attrs["mip"] == 1 and da.attrs["resolution_nm"] == pytest.approx((9.2, 9.2, 50.0))


def test_provenance_file_is_written(layer_root):
    layer = _image_layer(layer_root)
    layer.add_provenance("normalized", {"mip": 2}, "abc123")
    layer.add_provenance("downsampled", {"mips": [1, 2]}, "abc124")
    with open(os.path.join(_local(layer.path), "provenance")) as f:
        prov = json.load(f)
    assert prov["description"] == "downsampled"
    assert [p["code_version"] for p in prov["processing"]] == ["abc123", "abc124"]
    assert prov["processing"][0]["method"]["parameters"] == {"mip": 2}
