"""Bounding boxes (nm / voxels), the storage chunk grid, processing chunks and xarray cutouts."""

from __future__ import annotations

import numpy as np
import pytest

from emcore.cutout import as_dataarray
from emcore.errors import GeometryError, UnalignedWriteError
from emcore.geometry import BBox, ChunkGrid, VoxelBox

RES0 = (4.6, 4.6, 50.0)


def test_bbox_voxel_round_trip_at_several_mips():
    box = VoxelBox((64, 128, 3), (1088, 640, 7))
    bbox = box.to_nm(RES0)
    assert bbox.start_nm == pytest.approx((64 * 4.6, 128 * 4.6, 150.0))
    assert bbox.to_voxels(RES0) == box
    # mip 2: 4x coarser in x and y, z unchanged
    res2 = (18.4, 18.4, 50.0)
    assert bbox.to_voxels(res2) == VoxelBox((16, 32, 3), (272, 160, 7))


def test_bbox_off_grid_is_an_error_unless_outward():
    bbox = VoxelBox((2, 0, 0), (9, 8, 1)).to_nm(RES0)
    res2 = (18.4, 18.4, 50.0)
    with pytest.raises(GeometryError, match="not on the voxel grid"):
        bbox.to_voxels(res2)
    assert bbox.to_voxels(res2, outward=True) == VoxelBox((0, 0, 0), (3, 2, 1))


def test_pad_and_crop_are_inverse_and_z_is_separate():
    box = VoxelBox((10, 20, 5), (30, 40, 6))
    padded = box.padded(8)
    assert padded == VoxelBox((2, 12, 5), (38, 48, 6))
    assert padded.cropped(8) == box
    assert box.padded(0, 1) == VoxelBox((10, 20, 4), (30, 40, 7))
    assert BBox((0, 0, 0), (10, 10, 50)).padded(5) == BBox((-5, -5, 0), (15, 15, 50))


def test_boxes_are_hashable_and_readable():
    a = VoxelBox((0, 0, 0), (4, 4, 1))
    assert len({a, VoxelBox((0, 0, 0), (4, 4, 1)), a.padded(1)}) == 2
    assert str(a) == "VoxelBox[x 0:4, y 0:4, z 0:1]"
    assert str(BBox((0, 0, 0), (9.2, 4.6, 50))) == "BBox[x 0-9.2, y 0-4.6, z 0-50 nm]"
    assert hash(ChunkGrid((0, 0, 0), (8, 8, 1), (4, 4, 1)))
    # the same box computed two ways is one cache key
    computed = VoxelBox((64, 3, 1), (128, 7, 2)).to_nm(RES0)
    typed = BBox((294.4, 13.8, 50.0), (588.8, 32.2, 100.0))
    assert computed == typed and hash(computed) == hash(typed)


def test_invalid_boxes_are_rejected():
    with pytest.raises(GeometryError, match="before its start"):
        VoxelBox((5, 0, 0), (4, 4, 1))
    with pytest.raises(GeometryError, match="integers"):
        VoxelBox((0.5, 0, 0), (4, 4, 1))  # type: ignore[arg-type]


def test_slices_select_the_inner_box_of_a_padded_read():
    inner = VoxelBox((10, 20, 0), (14, 23, 1))
    outer = inner.padded(2)
    arr = np.zeros((1, 1, *outer.shape_zyx[1:]))
    z, y, x = inner.slices_zyx(outer.start)
    arr[z, :, y, x] = 1
    assert arr.sum() == 12 and arr[0, 0, 2, 2] == 1 and arr[0, 0, 1, 2] == 0


def test_grid_align_expands_to_chunks_and_clips_to_bounds():
    grid = ChunkGrid(voxel_offset=(100, 0, 0), size=(1000, 500, 10), chunk_size=(128, 128, 1))
    assert grid.align(VoxelBox((130, 5, 2), (300, 200, 4))) == VoxelBox((100, 0, 2), (356, 256, 4))
    # beyond the bound: clipped to it (the bound is a valid write end)
    assert grid.align(VoxelBox((900, 400, 0), (2000, 600, 1))) == VoxelBox((868, 384, 0), (1100, 500, 1))


def test_check_aligned_names_coordinates_and_chunk_size():
    grid = ChunkGrid((0, 0, 0), (1000, 1000, 4), (128, 128, 1))
    grid.check_aligned(VoxelBox((128, 0, 0), (256, 1000, 4)))  # stops at the bound: fine
    with pytest.raises(UnalignedWriteError) as err:
        grid.check_aligned(VoxelBox((10, 0, 0), (138, 128, 1)))
    msg = str(err.value)
    assert "x start 10" in msg and "x stop 138" in msg and "(128, 128, 1)" in msg
    with pytest.raises(UnalignedWriteError, match="not inside the layer bounds"):
        grid.check_aligned(VoxelBox((0, 0, 0), (128, 128, 5)))


def test_processing_chunks_tile_the_aligned_box_exactly():
    grid = ChunkGrid((0, 0, 0), (1000, 700, 3), (128, 128, 1))
    chunks = list(grid.chunks(VoxelBox((0, 0, 0), (1000, 700, 3)), (512, 512, 1)))
    assert len(chunks) == 2 * 2 * 3
    assert chunks[0] == VoxelBox((0, 0, 0), (512, 512, 1))
    assert chunks[1] == VoxelBox((512, 0, 0), (1000, 512, 1))  # x fastest, cut at the bound
    covered = np.zeros((3, 700, 1000), int)
    for c in chunks:
        grid.check_aligned(c)
        z, y, x = c.slices_zyx()
        covered[z, y, x] += 1
    assert (covered == 1).all()


def test_processing_chunk_must_be_a_multiple_of_the_storage_chunk():
    grid = ChunkGrid((0, 0, 0), (1000, 700, 3), (128, 128, 1))
    with pytest.raises(GeometryError, match=r"multiple of the storage chunk size \(128, 128, 1\).*x, y"):
        list(grid.chunks(grid.bounds, (500, 500, 1)))


def test_dataarray_coordinates_are_voxel_centres_in_nm():
    box = VoxelBox((10, 20, 3), (13, 22, 5))
    data = np.arange(2 * 1 * 2 * 3).reshape(2, 1, 2, 3)
    da = as_dataarray(data, box, (9.2, 9.2, 50.0), mip=1, layer_path="file:///x")
    assert da.dims == ("z", "c", "y", "x")
    np.testing.assert_allclose(da.x.values, [96.6, 105.8, 115.0])
    np.testing.assert_allclose(da.z.values, [175.0, 225.0])
    assert da.attrs["mip"] == 1 and da.attrs["layer_path"] == "file:///x"
    np.testing.assert_allclose(da.y.values, [188.6, 197.8])
    assert int(da.sel(z=225.0, y=197.8, x=105.8, c=0, method="nearest")) == data[1, 0, 1, 1]
    with pytest.raises(ValueError, match="does not match"):
        as_dataarray(data[:, 0], VoxelBox((0, 0, 0), (3, 3, 2)), (1, 1, 1), mip=0)
