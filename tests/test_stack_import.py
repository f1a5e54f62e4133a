"""Importing small PNG / TIFF section stacks into image layers."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import tifffile
from PIL import Image

from emcore.errors import StackImportError
from emcore.layers import open_layer
from emcore.stack_import import import_stack, list_section_files

RES = (4.6, 4.6, 50.0)


def _write_pngs(directory, sections, names=None):
    directory.mkdir(exist_ok=True)
    names = names or [f"{i}.png" for i in range(len(sections))]
    for name, section in zip(names, sections, strict=True):
        Image.fromarray(section).save(directory / name)
    return directory


def test_png_stack_round_trips_with_natural_order_and_mips(tmp_path, layer_root, vnc_sections):
    sections = vnc_sections[:, :96, :80]  # 80 x 96: not a multiple of the chunk (bounded edge chunks)
    # names whose plain sort (10 < 2) differs from z order
    names = ["s1.png", "s2.png", "s10.png", "s11.png"]
    src = _write_pngs(tmp_path / "pngs", list(sections), names)
    assert [p.name for p in list_section_files(src)] == names
    layer = import_stack(src, f"{layer_root}/img", resolution=RES, chunk_size=(32, 32, 1), num_mips=3)
    assert layer.size(0) == (80, 96, 4) and layer.resolution(0) == RES and layer.dtype == np.uint8
    np.testing.assert_array_equal(layer.read(layer.bounds(0))[:, 0], sections)
    mip2 = open_layer(f"{layer_root}/img").read(layer.bounds(2), 2)
    assert mip2.shape == (4, 1, 24, 20)
    # tissue everywhere here: mip 2 pixel = mean of its 4x4 block within rounding of two steps
    expected = sections.reshape(4, 24, 4, 20, 4).astype(float).mean(axis=(2, 4))
    assert np.abs(mip2[:, 0] - expected).max() <= 1.0
    with open(os.path.join(layer.path.removeprefix("file://"), "provenance")) as f:
        prov = json.load(f)
    assert prov["processing"][0]["method"]["parameters"]["files"][2].endswith("s10.png")


def test_tiff_stack_with_z_chunks_and_offset(tmp_path, layer_root):
    rng = np.random.default_rng(0)
    sections = rng.integers(1, 256, size=(3, 40, 48), dtype=np.uint8)
    src = tmp_path / "tifs"
    src.mkdir()
    for i, s in enumerate(sections):
        tifffile.imwrite(src / f"{i:02d}.tif", s)
    layer = import_stack(
        src, f"{layer_root}/img", resolution=RES, chunk_size=(16, 16, 2), voxel_offset=(64, 0, 10), num_mips=2
    )
    assert layer.bounds(0).start == (64, 0, 10) and layer.bounds(0).stop == (112, 40, 13)
    np.testing.assert_array_equal(layer.read(layer.bounds(0))[:, 0], sections)
    assert layer.read(layer.bounds(1), 1).all()  # mip 1 filled for every section (3 = 2 + 1 in z)


def test_no_files_is_an_error(tmp_path, layer_root):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not a section")
    with pytest.raises(StackImportError, match="no section files"):
        import_stack(tmp_path / "empty", f"{layer_root}/img", resolution=RES)
    with pytest.raises(StackImportError, match="does not exist"):
        import_stack(tmp_path / "missing", f"{layer_root}/img", resolution=RES)


def test_mixed_sizes_and_dtypes_name_the_file(tmp_path, layer_root):
    src = _write_pngs(tmp_path / "mixed", [np.ones((32, 32), np.uint8), np.ones((32, 40), np.uint8)])
    with pytest.raises(StackImportError, match=r"1\.png is 40x32 uint8, but 0\.png is 32x32"):
        import_stack(src, f"{layer_root}/img", resolution=RES)
    assert not os.path.exists(f"{layer_root.removeprefix('file://')}/img/info")  # nothing created
    rgb = tmp_path / "rgb"
    _write_pngs(rgb, [np.ones((8, 8), np.uint8)])
    Image.fromarray(np.ones((8, 8, 3), np.uint8)).save(rgb / "1.png")
    with pytest.raises(StackImportError, match=r"1\.png has shape \(8, 8, 3\)"):
        import_stack(rgb, f"{layer_root}/img", resolution=RES)
    wide = tmp_path / "u16"
    wide.mkdir()
    tifffile.imwrite(wide / "0.tif", np.ones((8, 8), np.uint16))
    with pytest.raises(StackImportError, match=r"0\.tif has dtype uint16"):
        import_stack(wide, f"{layer_root}/img", resolution=RES)


def test_unreadable_file_is_named(tmp_path, layer_root):
    src = _write_pngs(tmp_path / "bad", [np.ones((8, 8), np.uint8)])
    (src / "1.png").write_bytes(b"this is not a png")
    with pytest.raises(StackImportError, match=r"cannot read section file .*1\.png"):
        import_stack(src, f"{layer_root}/img", resolution=RES)


def test_mask_import_is_binary_max_downsampled_and_accepted_as_defects(tmp_path, layer_root, vnc_sections):
    masks = np.zeros((2, 64, 64), dtype=np.uint8)
    masks[0, 10, 20] = 255  # a one-pixel defect: it must survive downsampling (max, not mean)
    masks[1, 30:34, :] = 7  # a band, any nonzero value
    src = _write_pngs(tmp_path / "masks", list(masks))
    layer = import_stack(src, f"{layer_root}/defects", resolution=RES, chunk_size=(32, 32, 1), num_mips=3,
                         kind="mask")
    assert layer.kind == "mask" and layer.dtype == np.uint8
    full = layer.read(layer.bounds(0))[:, 0]
    np.testing.assert_array_equal(full, (masks != 0).astype(np.uint8))
    mip2 = layer.read(layer.bounds(2), 2)[:, 0]
    assert mip2[0, 10 // 4, 20 // 4] == 1 and mip2[0].sum() == 1
    assert mip2[1, 30 // 4 : 34 // 4 + 1].all(axis=1).any()
    # the imported mask is accepted as the defects layer of a source with the same geometry
    image = import_stack(_write_pngs(tmp_path / "img", list(vnc_sections[:2, :64, :64])), f"{layer_root}/img",
                         resolution=RES, chunk_size=(32, 32, 1), num_mips=3)
    from flows.params import AlignParams

    params = AlignParams(source=image.path, defects=layer.path, output=str(tmp_path / "out"), chunk_xy=32,
                         coarse_mip=0, finetune_mip=0)
    assert params.defects == layer.path
    with pytest.raises(StackImportError, match="kind"):
        import_stack(src, f"{layer_root}/bad", resolution=RES, kind="field")
