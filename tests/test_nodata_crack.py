"""Empty (no-data) cracks split a section at the coarse mip (issue 16): emcore.pieces.nodata_tears
on a bundled section, and the coarse pair / torn-section tasks on real file:// layers with mips."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from emcore.coarse_xcorr import coarse_align
from emcore.field import warp
from emcore.geometry import VoxelBox
from emcore.layers import create_layer, open_layer
from emcore.normalize import normalize, section_stats
from emcore.pieces import nodata_tears, split_pieces
from emcore.pyramid import downsample_image_torch
from emcore.synthetic import torn_fold_field
from tasks.coarse import TEAR_NM, coarse_pair_task, tear_mip
from tasks.torn import torn_section_task

SIZE = 512  # px at mip 0 (9.2 nm/px): the coarse mip 2 (36.8 nm) has 128 px, the tear mip is 1
GAP = 6.0  # px at mip 0: 3 px at mip 1 (open), 1.5 px at mip 2 (closed by the pyramid's mean)
SLIDE = 60.0


def _section(vnc_sections: np.ndarray, z: int) -> torch.Tensor:
    """Bundled section ``z`` at 512 px, normalized, ``(1, 1, 512, 512)``."""
    small = F.avg_pool2d(torch.from_numpy(vnc_sections[z]).float()[None, None], 2)[0, 0].numpy()
    stats = section_stats(small)
    return torch.from_numpy(normalize(small, stats.mean, stats.std))[None, None]


def _cracked(registered: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(source, gap, truth)``: the far side pulled ``GAP`` px away and slid ``SLIDE`` px, the gap
    holding no data (0)."""
    applied, gap, truth = torn_fold_field(SIZE, SIZE, angle_deg=30.0, offset_px=50.0, fold_width_px=GAP,
                                          slide_px=SLIDE)  # fmt: skip
    source = warp(registered, applied)
    return torch.where(gap, torch.zeros_like(source), source), gap, truth


def _down(image: torch.Tensor, mips: int) -> torch.Tensor:
    for _ in range(mips):
        image = downsample_image_torch(image)
    return image


def test_thin_nodata_crack_splits_at_the_coarse_mip(vnc_sections):
    source, _, _ = _cracked(_section(vnc_sections, 3))
    fine, coarse = _down(source, 1), _down(source, 2)
    assert split_pieces(fine, torch.zeros_like(fine)).count == 2  # open at the fine mip
    assert split_pieces(coarse, torch.zeros_like(coarse)).count == 1  # the pyramid closed it
    tears = nodata_tears(fine, 2)
    assert tears is not None and tears.shape == coarse.shape[-2:] and tears.any()
    pieces = split_pieces(coarse, torch.from_numpy(tears))
    assert pieces.count == 2
    # Each coarse piece lies on one side of the line (labels of the fine pieces, blockwise).
    fine_labels = split_pieces(fine, torch.zeros_like(fine)).labels
    for label in (1, 2):
        ys, xs = np.nonzero(pieces.labels == label)
        sides = set(np.unique(fine_labels[2 * ys, 2 * xs])) - {0}
        assert len(sides) == 1
    # The tear lines are thin: a few coarse px wide along the line, not the tissue.
    assert tears.sum() < 0.05 * tears.size


def test_margin_hole_and_ragged_edge_are_not_tears(vnc_sections):
    image = _section(vnc_sections, 3).clone()
    image[..., :, :40] = 0  # a margin
    image[..., 200:260, 300:350] = 0  # a hole
    rows = torch.arange(SIZE)
    ragged = 470 + (12 * torch.sin(rows / 9.0)).long()  # a ragged bottom edge with notches
    for x in range(SIZE):
        image[..., int(ragged[x]) :, x] = 0
    image[..., 480:484, 100:104] = 1.0  # a speck of data beyond the edge (a sliver, < 2 %)
    fine = _down(image, 1)
    assert nodata_tears(fine, 2) is None
    assert nodata_tears(image, 1) is None


def test_nodata_tears_argument_errors():
    with pytest.raises(ValueError, match="power of 2"):
        nodata_tears(torch.ones(8, 8), 3)
    with pytest.raises(ValueError, match="min_fraction"):
        nodata_tears(torch.ones(8, 8), 2, min_fraction=1.5)


def test_tear_mip_rule():
    res = [9.2 * 2**m for m in range(6)]
    assert tear_mip(res, 2, (128, 128)) == 1  # 9.2 nm is finer than TEAR_NM
    assert res[0] < TEAR_NM <= res[1]
    assert tear_mip(res, 5, (128, 128)) == 2  # at most 3 mips finer
    assert tear_mip(res, 5, (2048, 2048)) == 4  # the read budget
    assert tear_mip(res, 1, (128, 128)) == 1  # none finer: the coarse image itself


def _layers(root: str, sections: list[torch.Tensor]) -> str:
    geometry = {"resolution": (9.2, 9.2, 50), "size": (SIZE, SIZE, len(sections)),
                "chunk_size": (128, 128, 1)}  # fmt: skip
    image = create_layer(f"{root}/image", kind="image", dtype="float32", num_mips=3, **geometry)
    image.write(image.bounds(0), torch.cat(sections).numpy(), 0)
    image.downsample(image.bounds(0), 0)
    for name in ("pairs", "pairs_plain", "torn"):
        create_layer(f"{root}/{name}", kind="field", num_mips=3, **geometry)
    return f"{root}/image"


def test_coarse_task_splits_an_empty_crack_without_a_mask(layer_root, vnc_sections):
    registered = _section(vnc_sections, 3)
    source, _, truth = _cracked(registered)
    image = _layers(layer_root, [registered, source])
    region = VoxelBox((0, 0, 0), (SIZE // 4, SIZE // 4, 1))  # mip 2
    out = coarse_pair_task(image, f"{layer_root}/pairs", region, 1, 1, 2)
    pieces = out.detail["pieces"]
    assert out.detail["reliable"] and pieces["count"] == 2 and pieces["side"] == "source"
    assert pieces["nodata"] == ["source"]
    near, far = pieces["transforms"]
    assert not near["fallback"] and not far["fallback"]
    expected = truth[0, :, 400, 400].numpy() / 4  # a far-side pixel's motion, px at mip 2
    assert np.allclose(np.array(far["matrix"])[:, 2], expected, atol=0.75)
    assert np.abs(np.array(out.detail["matrix"])).max() < 0.5  # the near side did not move
    # The torn-section task rebuilds the same two pieces without a defects layer.
    chunk = VoxelBox((0, 0, 0), (SIZE // 4, SIZE // 4, 1))
    torn = torn_section_task(image, None, f"{layer_root}/torn", region, 1, 2, 2,
                             [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]], [near["matrix"], far["matrix"]],
                             chunk, [chunk])  # fmt: skip
    assert torn.detail["pieces"] == 2
    written = open_layer(f"{layer_root}/torn").read(VoxelBox((0, 0, 1), (SIZE // 4, SIZE // 4, 2)), 2)
    assert np.allclose(written[0, :, 100, 100], expected, atol=0.75)  # far side reads its piece


def test_section_with_margin_and_hole_is_unchanged_bit_for_bit(layer_root, vnc_sections):
    target = _section(vnc_sections, 3).clone()
    source = warp(_section(vnc_sections, 2), torch.full((1, 2, SIZE, SIZE), 3.0))
    for image in (source, target):
        image[..., :, :40] = 0  # margin
        image[..., 200:260, 300:350] = 0  # hole
    image = _layers(layer_root, [target, source])
    region = VoxelBox((0, 0, 0), (SIZE // 4, SIZE // 4, 1))
    out = coarse_pair_task(image, f"{layer_root}/pairs_plain", region, 1, 1, 2)
    assert "pieces" not in out.detail
    layer = open_layer(image)
    src = torch.from_numpy(layer.read(VoxelBox((0, 0, 1), (128, 128, 2)), 2).astype(np.float32))[0, 0]
    tgt = torch.from_numpy(layer.read(VoxelBox((0, 0, 0), (128, 128, 1)), 2).astype(np.float32))[0, 0]
    expected = coarse_align(src, tgt, model="rigid").field
    written = open_layer(f"{layer_root}/pairs_plain").read(VoxelBox((0, 0, 1), (128, 128, 2)), 2)
    assert np.array_equal(written, expected.numpy())
