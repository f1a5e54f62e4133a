"""Field export/import: .npy, OME-Zarr (NGFF 0.6 displacements, nm) and corgie's layout round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest

from emcore.field_io import (
    DISPLACEMENTS_PATH,
    FieldFormatError,
    from_ngff_displacements,
    to_ngff_displacements,
)
from emcore.geometry import VoxelBox
from emcore.layers import create_layer, open_layer
from tasks.field_io import export_field, field_mip, import_field, resolve_field_layer, write_field_layer

RES = (4.0, 5.0, 40.0)  # nm at mip 0 (x != y so a swapped axis shows)
MIP = 1


@pytest.fixture()
def field_layer(tmp_path):
    """A field layer 128 x 96 x 3 at mip 1 (chunks 32) holding a random smooth-ish field."""
    layer = create_layer(
        tmp_path / "fields" / "final", kind="field", resolution=RES, size=(256, 192, 3),
        chunk_size=(32, 32, 1), num_mips=3,
    )
    rng = np.random.default_rng(0)
    data = rng.normal(0, 3, size=(3, 2, 96, 128)).astype(np.float32)
    data[:, 0] += 5.0  # x differs from y
    layer.write(layer.bounds(MIP), data, MIP)
    layer.add_provenance("test field", {"finetune_mip": MIP}, "test")
    return layer, data


def test_ngff_conversion_units_and_order():
    f = np.zeros((1, 2, 2, 3), np.float32)
    f[0, 0] = 1.5  # x px
    f[0, 1] = -2.0  # y px
    d = to_ngff_displacements(f, (8.0, 10.0, 50.0))
    assert d.shape == (1, 2, 3, 3)
    np.testing.assert_allclose(d[..., 0], 0.0)  # z
    np.testing.assert_allclose(d[..., 1], -20.0)  # y nm
    np.testing.assert_allclose(d[..., 2], 12.0)  # x nm
    np.testing.assert_array_equal(from_ngff_displacements(d, (8.0, 10.0, 50.0)), f)
    d[0, 0, 0, 0] = 1.0
    with pytest.raises(FieldFormatError, match="z displacement"):
        from_ngff_displacements(d, (8.0, 10.0, 50.0))


@pytest.mark.parametrize("fmt, name", [("npy", "f.npy"), ("ome-zarr", "f.ome.zarr"), ("corgie", "corgie")])
def test_round_trip(tmp_path, field_layer, fmt, name):
    layer, data = field_layer
    region = VoxelBox((32, 32, 1), (96, 96, 3))  # x 32..96, y 32..96, z 1..2 at mip 1
    dest = str(tmp_path / name)
    record = export_field(layer, dest, fmt, mip=MIP, region=region)
    assert record["layout"] == fmt and record["mip"] == MIP
    back, rec = import_field(dest)
    # .npy and corgie store px exactly; OME-Zarr stores nm (float32 x nm / nm: within 1 ulp).
    tol = 1e-6 if fmt == "ome-zarr" else 0.0
    np.testing.assert_allclose(back, data[1:3, :, 32:96, 32:96], rtol=tol, atol=tol)
    assert rec["mip"] == MIP
    assert rec["offset_px"] == [32, 32, 1]
    np.testing.assert_allclose(rec["resolution_nm"], [8.0, 10.0, 40.0])
    # Back into a sectionflow layer at the same place: reads equal the original region.
    out = write_field_layer(str(tmp_path / f"imported_{fmt}"), back, rec, chunk=32)
    np.testing.assert_array_equal(out.read(region, MIP), back)
    assert out.kind == "field"


def test_ome_zarr_metadata_is_ngff_displacements(tmp_path, field_layer):
    layer, data = field_layer
    dest = tmp_path / "whole.zarr"
    export_field(layer, str(dest), "ome-zarr", mip=MIP)
    root = json.loads((dest / "zarr.json").read_text())["attributes"]
    (t,) = root["ome"]["coordinateTransformations"]
    assert root["ome"]["version"] == "0.6"
    assert t == {"type": "displacements", "name": "aligned_to_source", "path": DISPLACEMENTS_PATH,
                 "input": "aligned", "output": "source", "interpolation": "linear"}
    arr = json.loads((dest / DISPLACEMENTS_PATH / "zarr.json").read_text())
    assert arr["shape"] == [3, 96, 128, 3]
    axes = arr["attributes"]["ome"]["coordinateSystems"][0]["axes"]
    assert [a["name"] for a in axes] == ["z", "y", "x", "d"]
    assert axes[3]["type"] == "displacement" and axes[0]["unit"] == "nanometer"
    # NGFF forward map: aligned point p -> p + d(p) in source, in nm; our pull: source px = p + f(p).
    import zarr

    d = np.asarray(zarr.open_array(str(dest / DISPLACEMENTS_PATH), mode="r")[...])
    z, y, x = 2, 10, 20
    np.testing.assert_allclose(d[z, y, x, 2], data[z, 0, y, x] * 8.0, rtol=1e-6)
    np.testing.assert_allclose(d[z, y, x, 1], data[z, 1, y, x] * 10.0, rtol=1e-6)


def test_corgie_layer_has_y_first_and_says_so(tmp_path, field_layer):
    layer, data = field_layer
    dest = tmp_path / "corgie"
    export_field(layer, str(dest), "corgie", mip=MIP)
    stored = open_layer(dest)
    assert "sectionflow" not in stored.info
    assert stored.info["displacement_field"]["channels"].startswith("precomputed (X, Y, Z, C); channel 0 = y")
    raw = stored.read(stored.bounds(MIP), MIP)
    np.testing.assert_array_equal(raw[:, 0], data[:, 1])
    np.testing.assert_array_equal(raw[:, 1], data[:, 0])


def test_resolve_and_mip_from_provenance(tmp_path, field_layer):
    layer, _ = field_layer
    assert resolve_field_layer(str(tmp_path)).path == layer.path
    assert field_mip(layer) == MIP


def test_clear_errors(tmp_path, field_layer):
    layer, _ = field_layer
    np.save(tmp_path / "bare.npy", np.zeros((1, 2, 4, 4), np.float32))
    with pytest.raises(FieldFormatError, match="missing its record"):
        import_field(str(tmp_path / "bare.npy"))
    with pytest.raises(FieldFormatError, match="sectionflow field layer"):
        import_field(layer.path, mip=MIP)
    with pytest.raises(FieldFormatError, match="unknown field format"):
        export_field(layer, str(tmp_path / "x"), "tiff", mip=MIP)


def test_cli_export_import(tmp_path, field_layer):
    from typer.testing import CliRunner

    from flows.cli import app

    layer, data = field_layer
    runner = CliRunner()
    result = runner.invoke(app, ["export-field", str(tmp_path), str(tmp_path / "s2.zarr"), "--z", "2"])
    assert result.exit_code == 0, result.output
    assert "ome-zarr field z 2..2, 128 x 96 px at mip 1 (nanometer)" in result.output
    args = ["import-field", str(tmp_path / "s2.zarr"), str(tmp_path / "back"), "--chunk", "32"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    back = open_layer(tmp_path / "back")
    section = back.read(VoxelBox((0, 0, 2), (128, 96, 3)), MIP)
    np.testing.assert_allclose(section, data[2:3], rtol=1e-6, atol=1e-6)
    bad = runner.invoke(app, ["export-field", str(tmp_path), str(tmp_path / "x.npy"), "--z", "7"])
    assert bad.exit_code == 2 and "error:" in bad.output and "not inside" in bad.output
