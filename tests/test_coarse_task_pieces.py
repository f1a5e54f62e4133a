"""The coarse pair task on a torn section: piecewise path with a splitting defects layer, today's
path otherwise (tasks.coarse.coarse_pair_task on real file:// layers, bundled VNC at 256 px)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from emcore.field import warp
from emcore.geometry import VoxelBox
from emcore.layers import create_layer, open_layer
from emcore.normalize import normalize, section_stats
from emcore.synthetic import torn_fold_field
from tasks.coarse import coarse_pair_task

SIZE = 256
SLIDE = 60.0


@pytest.fixture
def torn_layers(layer_root, vnc_sections):
    small = F.avg_pool2d(torch.from_numpy(vnc_sections[3]).float()[None, None], 4)[0, 0].numpy()
    stats = section_stats(small)
    registered = torch.from_numpy(normalize(small, stats.mean, stats.std))[None, None]
    applied, mask, truth = torn_fold_field(SIZE, SIZE, angle_deg=30.0, offset_px=25.0, fold_width_px=6.0,
                                           slide_px=SLIDE)  # fmt: skip
    source = warp(registered, applied)
    geometry = {"resolution": (18.4, 18.4, 50), "size": (SIZE, SIZE, 2), "chunk_size": (128, 128, 1)}
    image = create_layer(f"{layer_root}/image", kind="image", dtype="float32", **geometry)
    image.write(image.bounds(0), torch.cat((registered, source)).numpy(), 0)
    defects = create_layer(f"{layer_root}/defects", kind="mask", **geometry)
    masks = np.zeros((2, 1, SIZE, SIZE), np.uint8)
    masks[1, 0] = mask[0, 0].numpy()
    defects.write(defects.bounds(0), masks, 0)
    for name in ("pairs", "pairs_plain"):
        create_layer(f"{layer_root}/{name}", kind="field", **geometry)
    return layer_root, truth


def test_splitting_defects_take_the_piecewise_path(torn_layers):
    root, truth = torn_layers
    region = VoxelBox((0, 0, 0), (SIZE, SIZE, 1))
    out = coarse_pair_task(f"{root}/image", f"{root}/pairs", region, 1, 1, 0, defects=f"{root}/defects")
    detail = out.detail
    assert detail["reliable"] and detail["pieces"]["side"] == "source" and detail["pieces"]["count"] == 2
    near, far = detail["pieces"]["transforms"]
    assert not near["fallback"] and not far["fallback"]
    # The section affine follows the largest piece (near side: no motion), not a blend of both.
    assert np.abs(np.array(detail["matrix"])).max() < 0.5
    expected = truth[0, :, 200, 200].numpy()  # a far-side pixel: the slid side's translation
    assert np.allclose(np.array(far["matrix"])[:, 2], expected, atol=0.5)
    written = open_layer(f"{root}/pairs").read(VoxelBox((0, 0, 1), (SIZE, SIZE, 2)), 0)
    assert np.allclose(written[0, :, 200, 200], expected, atol=0.5)  # the torn field is stored
    assert np.abs(written[0, :, 20, 20]).max() < 0.5
    # A rerun reads the marker: the same detail.
    again = coarse_pair_task(f"{root}/image", f"{root}/pairs", region, 1, 1, 0, defects=f"{root}/defects")
    assert again.status == "skipped" and again.detail == detail


def test_without_defects_today_path_is_unchanged(torn_layers):
    root, _ = torn_layers
    region = VoxelBox((0, 0, 0), (SIZE, SIZE, 1))
    out = coarse_pair_task(f"{root}/image", f"{root}/pairs_plain", region, 1, 1, 0)
    assert "pieces" not in out.detail
    written = open_layer(f"{root}/pairs_plain").read(VoxelBox((0, 0, 1), (SIZE, SIZE, 2)), 0)
    assert np.abs(written[0, :, 200, 200]).max() < 5  # one rigid fit: the slid side is not followed
