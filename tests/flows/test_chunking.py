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


def test_chunked_finetune_and_render_equal_whole(tmp_path, tiny_stack, dask_address):
    runs = {}
    for name, chunk in (("chunked", 64), ("whole", 128)):  # 2 x 2 chunks vs one chunk at mip 1
        params = tiny_params(tmp_path / name, tiny_stack, chunk_xy=chunk, num_iter=60)
        for stage in (normalize_flow, coarse_align_flow, finetune_flow, solve_flow, render_flow):
            run_stage(stage, params, dask_address)
        runs[name] = Layout(params.output)
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
    # rendered images agree too (within a grey level or two where fields differ slightly)
    ra, rb = open_layer(runs["chunked"].aligned), open_layer(runs["whole"].aligned)
    ia = ra.read(ra.bounds(0), 0)[1:, :, 32:-32, 32:-32].astype(int)
    ib = rb.read(rb.bounds(0), 0)[1:, :, 32:-32, 32:-32].astype(int)
    assert np.median(np.abs(ia - ib)) <= 2
