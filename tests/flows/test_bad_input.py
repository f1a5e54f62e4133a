"""Bad input fails early and clearly (issue 14): each case names the file/section/parameter.

Validation cases need no Prefect API; the NaN and corrupt-chunk cases run real stage flows on the
session's dask cluster and check what was (not) written.
"""

from __future__ import annotations

import glob
import os
import shutil

import numpy as np
import pytest
from cloudvolume import CloudVolume
from pydantic import ValidationError

from emcore.layers import create_layer, open_layer
from emcore.models.registry import shipped_config_path
from flows.align_stack import align_stack, run_stage
from flows.layout import Layout
from flows.stages import normalize_flow
from tests.flows.conftest import tiny_params


def _local(path: str) -> str:
    return path[len("file://"):] if path.startswith("file://") else path


def _chunk_files(layer_path: str) -> list[str]:
    """Stored chunk files of a local layer (every mip), not info/provenance/markers."""
    root = _local(layer_path)
    return [f for f in glob.glob(os.path.join(root, "*", "*")) if not os.path.basename(f).startswith(".")
            and os.path.basename(os.path.dirname(f)) != ".sectionflow"]


# -- validation ------------------------------------------------------------------------------------
def test_defects_at_another_resolution_are_refused(tmp_path, tiny_stack):
    src = open_layer(tiny_stack["misaligned"])
    coarse = create_layer(tmp_path / "defects_9nm", kind="mask", resolution=(9.2, 9.2, 50.0),
                          size=(src.size(0)[0] // 2, src.size(0)[1] // 2, src.size(0)[2]),
                          chunk_size=src.chunk_size(0), num_mips=src.num_mips)
    with pytest.raises(ValidationError, match=r"defects has resolution 9\.2 x 9\.2 x 50 nm at mip 0, "
                                              r"source 4\.6 x 4\.6 x 50 nm"):
        tiny_params(tmp_path / "out", tiny_stack, defects=coarse.path)
    assert not (tmp_path / "out").exists()


def test_defects_must_be_a_mask_with_the_source_bounds(tmp_path, tiny_stack):
    with pytest.raises(ValidationError, match=r"defects .* has kind image .*a defect mask is a uint8"):
        tiny_params(tmp_path / "out", tiny_stack, defects=tiny_stack["misaligned"])
    src = open_layer(tiny_stack["misaligned"])
    small = create_layer(tmp_path / "defects_small", kind="mask", resolution=src.resolution(0),
                         size=(128, 128, src.size(0)[2]), chunk_size=src.chunk_size(0),
                         num_mips=src.num_mips)
    with pytest.raises(ValidationError, match="must have the source's bounds"):
        tiny_params(tmp_path / "out", tiny_stack, defects=small.path)


def test_corrupt_encoder_weights_are_refused_at_validation(tmp_path, tiny_stack):
    config = shipped_config_path("encoder_16_64nm")
    for suffix in (".json", ".safetensors"):
        shutil.copy(config.with_suffix(suffix), tmp_path / f"enc{suffix}")
    weights = tmp_path / "enc.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-100:] = bytes(100)  # damaged tail: same size, wrong bytes
    weights.write_bytes(bytes(raw))
    config_copy = tmp_path / "enc.json"
    config_copy.write_text(config.read_text().replace("encoder_16_64nm.safetensors", "enc.safetensors"))
    with pytest.raises(ValidationError, match=r"encoder .*sha256"):
        tiny_params(tmp_path / "out", tiny_stack, encoder=str(config_copy))
    assert not (tmp_path / "out").exists()  # refused before any stage ran


# -- stages ----------------------------------------------------------------------------------------
def test_nan_section_is_refused_by_name_and_nothing_is_written(tmp_path, tiny_stack, dask_address):
    src = open_layer(tiny_stack["misaligned"])
    floats = create_layer(tmp_path / "float_source", kind="image", resolution=src.resolution(0),
                          size=src.size(0), chunk_size=src.chunk_size(0), num_mips=src.num_mips,
                          dtype="float32")
    for mip in range(src.num_mips):
        bounds = src.bounds(mip)
        data = src.read(bounds, mip).astype(np.float32)
        data[1] = np.nan  # section 1 all NaN, as other software may write it
        (x0, y0, z0), (x1, y1, z1) = bounds.start, bounds.stop
        CloudVolume(floats.path, mip=mip, progress=False)[x0:x1, y0:y1, z0:z1] = data.transpose(3, 2, 0, 1)
    params = tiny_params(tmp_path / "run", tiny_stack, source=floats.path)
    with pytest.raises(ValueError, match=r"section 1 of .*float_source.*: \d+ NaN and 0 inf pixels") as err:
        align_stack(params, dask_address=dask_address)
    assert "NonFiniteSectionError" in type(err.value).__name__
    layout = Layout(params.output)
    assert _chunk_files(layout.normalized) == []  # refused before any chunk was written
    assert not os.path.exists(_local(layout.aligned))


def test_corrupt_source_chunk_stops_the_stage_naming_it_and_keeps_the_rest(
    tmp_path, tiny_stack, dask_address
):
    copy = tmp_path / "source"
    shutil.copytree(_local(tiny_stack["misaligned"]), copy)
    src = open_layer(str(copy))
    params = tiny_params(tmp_path / "run", tiny_stack, source=src.path, defects=None)
    mip = params.finetune_mip
    victim = next(f for f in glob.glob(os.path.join(copy, src.info["scales"][mip]["key"], "*"))
                  if os.path.basename(f).startswith("64-128_0-64_2-3"))
    with open(victim, "rb") as fh:
        good = fh.read()
    with open(victim, "wb") as fh:
        fh.write(good[: len(good) // 2])  # a gzip chunk cut in half
    with pytest.raises(ValueError, match=f"corrupt chunk file://{victim} of layer {src.path}") as err:
        run_stage(normalize_flow, params, dask_address)
    assert "re-import" in str(err.value)
    normalized = Layout(params.output).normalized
    markers = glob.glob(os.path.join(_local(normalized), ".sectionflow", "done", "normalize", "*.json"))
    total = 2 * 2 * open_layer(normalized).size(mip)[2]  # 2 x 2 chunks of 64 px per section at mip 1
    assert len(markers) == total - 1  # every other chunk finished and is kept
    with open(victim, "wb") as fh:
        fh.write(good)  # repaired: the rerun computes only the missing chunk
    summary = run_stage(normalize_flow, params, dask_address)
    assert summary["skipped"] == total - 1  # normalize chunks; the downsample ran for the first time
    assert (open_layer(normalized).read(src.bounds(mip), mip) != 0).any(axis=(1, 2, 3)).all()
