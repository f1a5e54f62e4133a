"""The learned coarse methods in the pipeline: a real coarse_align stage run, and parameter checks."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from emcore.field import warp
from emcore.layers import open_layer
from emcore.quality import tile_correlation
from flows.align_stack import run_stage
from flows.demo import prepare_demo
from flows.layout import Layout
from flows.stages import coarse_align_flow, normalize_flow
from tasks.coarse import section_box
from tasks.io import read_tensor
from tests.flows.conftest import tiny_params

# 3 bundled sections, 512 px crop, mips 0-3: coarse and finetune mip 3 (36.8 nm/px, 64 px sections),
# inside the shipped aligners' 32-80 nm/px. The demo misaligns sections by up to 40 px at mip 0
# (5 px at mip 3) and 1 deg.
SMALL = {"coarse_mip": 3, "finetune_mip": 3, "render_mip": 3, "chunk_xy": 64, "pad": 16}


@pytest.fixture(scope="module")
def small_stack(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("learned_coarse_stack")
    return prepare_demo(root, sections=3, crop=512, fold_section=None, chunk=64, num_mips=4, truth_mip=3)


def test_learned_coarse_methods_align_neighbours(tmp_path, small_stack, dask_address):
    params = tiny_params(tmp_path / "run", small_stack, coarse_method="learned", **SMALL)
    run_stage(normalize_flow, params, dask_address)
    layout = Layout(params.output)
    normalized = open_layer(layout.normalized)
    region = params.region(normalized, 3)
    # the same output, method by method: a new method recomputes every pair, a rerun skips them
    for method in ("learned", "classical+refine"):
        params = params.model_copy(update={"coarse_method": method})
        summary = run_stage(coarse_align_flow, params, dask_address)
        assert summary["method"] == method and summary["pairs"] == 3 and summary["done"] == 3
        for z, k in ((1, 1), (2, 1), (2, 2)):
            src = read_tensor(normalized, section_box(region, z), 3)
            tgt = read_tensor(normalized, section_box(region, z - k), 3)
            field = read_tensor(open_layer(layout.pairwise(k)), section_box(region, z), 3)
            assert field.shape == (1, 2, 64, 64) and field.abs().max() > 1.0  # it moved something
            before = tile_correlation(src, tgt, tile=16).median
            after = tile_correlation(warp(src, field), tgt, tile=16).median
            assert after > before + 0.1, (method, z, k, before, after)  # P[z, k] aligns z onto z - k
    rerun = run_stage(coarse_align_flow, params, dask_address)
    assert rerun["skipped"] == 3 and rerun["done"] == 0


def test_learned_coarse_method_needs_a_coarse_mip_in_the_models_range(tmp_path, tiny_stack):
    # the tiny stack's coarse mip 2 is 18.4 nm/px: outside the shipped models' 32-80 nm/px
    with pytest.raises(ValidationError, match=r"coarse_method='learned' uses pyramid_aligner.*18\.4 nm/px"):
        tiny_params(tmp_path / "out", tiny_stack, coarse_method="learned")
    with pytest.raises(ValidationError, match="coarse_method"):
        tiny_params(tmp_path / "out", tiny_stack, coarse_method="deep")
    assert tiny_params(tmp_path / "out", tiny_stack).coarse_method == "classical"  # the default
