"""benchmarks.bench_folds: its cases' truth and its metrics, on real EM (bundled VNC, mip 2, 256 px).

The truth field itself must score a perfect row (no residual, no Jacobian outlier, aligned images
that correlate), the identity must be off by the applied motion on the far side, and the evaluated
pixels must keep the margins the benchmark states.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from benchmarks.bench_folds import (
    MASK_MARGIN,
    SEAM_MARGIN,
    detected_mask,
    iou,
    make_fold_case,
    mask_correlation,
    score,
    side_stats,
)
from benchmarks.cases import load_sections
from tasks.detect import detection_mip


@pytest.fixture(scope="module")
def sections() -> np.ndarray:
    stack = load_sections("bundled", [3, 4], 1024)
    return F.avg_pool2d(torch.from_numpy(stack).float()[:, None], 4)[:, 0].numpy()  # mip 2, 18.4 nm


@pytest.fixture(scope="module", params=[("fold", 60.0, None), ("crack", 0.0, 20.0)], ids=["fold", "crack"])
def case(request, sections):
    defect, slide, width = request.param
    return make_fold_case(defect, sections[0], sections[0], defect=defect, slide=slide, width=width,
                          resolution_nm=18.4)  # fmt: skip


def _reads_mask(case, field: torch.Tensor) -> np.ndarray:
    """Whether each target pixel's position ``p + field(p)`` rounds onto a mask pixel."""
    h, w = case.mask.shape
    ys, xs = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    f = field[0].numpy()
    qx = np.clip(np.rint(xs + f[0]), 0, w - 1).astype(int)
    qy = np.clip(np.rint(ys + f[1]), 0, h - 1).astype(int)
    return case.mask.numpy()[qy, qx]


def test_truth_scores_a_perfect_row(case):
    s = score(case.truth, case)
    assert s.worst[0] == 0.0 and s.worst[1] == 0.0
    assert s.jacobian == 0.0
    assert s.corr_near > 0.9 and s.corr_far > 0.9  # same section on both sides, noise 0.2


def test_identity_is_off_by_the_motion_on_the_far_side_only(case):
    stats = side_stats(torch.zeros_like(case.truth), case)
    slide, width = (60.0, 256 / 32) if case.name == "fold" else (0.0, 20.0)
    motion = math.hypot(slide, width)
    assert stats["near"][0] < 2.5  # the 2 px elastic part of the target
    assert abs(stats["far"][0] - motion) < 2.5
    # A rigid-looking field that follows the near side only tears nowhere: no Jacobian outlier.
    assert score(torch.zeros_like(case.truth), case).jacobian == 0.0


def test_margins_of_the_evaluated_pixels(case):
    assert case.keep.any() and case.jac.any()
    assert not (case.keep & (case.dist <= MASK_MARGIN)).any()
    assert not (case.jac & (case.dist <= SEAM_MARGIN)).any()
    assert (case.dist[case.keep] > MASK_MARGIN).all()
    # No evaluated pixel's true source position is in the band / gap (the truth has no value there).
    assert not (_reads_mask(case, case.truth) & case.jac).any()
    keep = case.keep
    assert not keep[:16].any() and not keep[:, -16:].any()
    assert keep[~case.far].any() and keep[case.far].any()


def test_correlation_drops_near_the_mask_when_the_far_side_is_not_followed(case):
    near, far = mask_correlation(torch.zeros_like(case.truth), case)
    good_near, good_far = mask_correlation(case.truth, case)
    assert near < good_near - 0.1
    assert far <= good_far + 1e-9


def test_detected_mask_is_the_detect_stage_mask_repeated_to_full_size(case):
    mask = detected_mask(case.src, 9.2)  # as if at 9.2 nm/px: detected one mip coarser
    assert mask.shape == case.mask.shape and mask.dtype == torch.bool
    f = 2 ** detection_mip([9.2 * 2**k for k in range(10)], 0)
    assert f == 2  # 9.2 nm/px -> 18.4 nm/px, the finest mip in the detector's 15-50 nm range
    blocks = mask.reshape(128, f, 128, f)
    assert (blocks == blocks[:, :1, :, :1]).all()  # pixel repetition, as tasks.detect writes finer mips
    assert 0.0 <= iou(mask, case.mask) <= 1.0
    assert iou(case.mask, case.mask) == 1.0


def test_unknown_defect_is_refused(sections):
    with pytest.raises(ValueError, match="defect must be"):
        make_fold_case("x", sections[0], sections[0], defect="tear", resolution_nm=18.4)
