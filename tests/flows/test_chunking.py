"""Chunked processing equals whole-section processing away from the volume edge."""

from __future__ import annotations

import numpy as np
import torch

from emcore.layers import open_layer
from flows.align_stack import run_stage
from flows.layout import Layout
from flows.stages import coarse_align_flow, finetune_flow, normalize_flow, render_flow, solve_flow
from tests.flows.conftest import tiny_params

BORDER = 16  # px at the finetune mip excluded at the volume edge


def test_chunked_finetune_solve_and_render_equal_whole(tmp_path, tiny_stack, tiny_run, dask_address):
    chunked_params, _ = tiny_run  # 2 x 2 chunks of 64 px at mip 1
    assert chunked_params.chunk_xy == 64
    params_whole = tiny_params(tmp_path / "whole", tiny_stack, chunk_xy=128)  # one chunk at mip 1
    for stage in (normalize_flow, coarse_align_flow, finetune_flow, solve_flow, render_flow):
        run_stage(stage, params_whole, dask_address)
    runs = {"chunked": Layout(chunked_params.output), "whole": Layout(params_whole.output)}
    a = open_layer(runs["chunked"].pairwise(1))
    b = open_layer(runs["whole"].pairwise(1))
    box = a.bounds(1)
    fa = torch.from_numpy(a.read(box, 1))[1:, :, BORDER:-BORDER, BORDER:-BORDER]
    fb = torch.from_numpy(b.read(box, 1))[1:, :, BORDER:-BORDER, BORDER:-BORDER]
    diff = (fa - fb).norm(dim=1)
    assert float(diff.median()) < 0.25, float(diff.median())
    assert float(diff.max()) < 1.5, float(diff.max())
    # the normalized images are identical however they are chunked
    na, nb = open_layer(runs["chunked"].normalized), open_layer(runs["whole"].normalized)
    assert np.array_equal(na.read(na.bounds(1), 1), nb.read(nb.bounds(1), 1))
    # final fields (per-chunk stack solve with context) agree too
    ga, gb = open_layer(runs["chunked"].final_fields), open_layer(runs["whole"].final_fields)
    da = torch.from_numpy(ga.read(ga.bounds(1), 1))[1:, :, BORDER:-BORDER, BORDER:-BORDER]
    db = torch.from_numpy(gb.read(gb.bounds(1), 1))[1:, :, BORDER:-BORDER, BORDER:-BORDER]
    assert float((da - db).norm(dim=1).median()) < 0.3
    # rendering through the same fields in 2 x 2 chunks (128 px at mip 0) instead of one gives the same image
    aligned = open_layer(runs["whole"].aligned)
    before = aligned.read(aligned.bounds(0), 0).astype(int)
    run_stage(render_flow, params_whole.model_copy(update={"chunk_xy": 64}), dask_address)
    after = aligned.read(aligned.bounds(0), 0).astype(int)
    assert np.abs(after - before).max() <= 1
    assert np.mean(after != before) < 0.01


def test_solve_in_z_blocks_equals_the_whole_stack_solve(tiny_run, dask_address):
    """Blocks of 2 sections, each written from its own task (the tiny stack's 4 sections are all in
    every block's z context here: the result must equal the one-block solve; the locality of the
    anchored solve itself is tested in tests/test_stack_solve.py)."""
    params, _ = tiny_run
    layout = Layout(params.output)
    fields = open_layer(layout.final_fields)
    whole = torch.from_numpy(fields.read(fields.bounds(1), 1))
    blocked = params.model_copy(update={"solve_block_z": 2, "solve_overlap_z": 3})
    try:
        run_stage(solve_flow, blocked, dask_address)
        parts = torch.from_numpy(fields.read(fields.bounds(1), 1))
    finally:
        run_stage(solve_flow, params, dask_address)  # leave the shared run as it was
    diff = (parts - whole).norm(dim=1)
    assert float(diff.max()) < 1e-3, float(diff.max())
