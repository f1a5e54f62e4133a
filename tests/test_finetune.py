"""The online finetuner (emcore.finetune): recovery of known deformations of real EM crops, the
coarse-to-fine pyramid, defects, batching, early stop, input validation and determinism.

Small crops (64-128 px) of the bundled VNC sections, few iterations: the whole module runs in
seconds. Accuracy at benchmark scale is measured in benchmarks/bench_finetune.py.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from emcore.field import warp
from emcore.finetune import FinetuneResult, Level, finetune
from emcore.finetune.coarse_to_fine import (
    DEFAULT_BENDING,
    DEFAULT_BENDING_CANDIDATES,
    DEFAULT_CANDIDATE_ORDER,
    DEFAULT_GRID_LR,
    DEFAULT_GRID_SM_FACTOR,
    DEFAULT_PREFILTER,
    DEFAULT_REFITS,
    default_levels,
    jittered_target,
    pyramid_mips,
)
from emcore.metrics import field_residual
from emcore.synthetic import affine_field, fold_field, smooth_field, true_alignment_field
from tests.sections import normalized_crop as _section

# The production path (fused C++ kernels on CPU); the kernels' own tests check it against the reference.
BACKEND = "auto"
#: Devices every behaviour test runs on: the CPU always, and CUDA (Triton kernels) where present.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _pair(tgt: torch.Tensor, applied: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(src, tgt, true)``: ``src = warp(tgt, applied)``, ``true`` aligns src back onto tgt."""
    return warp(tgt, applied), tgt, true_alignment_field(applied, border=8)


@pytest.mark.parametrize("device", DEVICES)
def test_recovers_small_smooth_deformation(vnc_sections: np.ndarray, device: str) -> None:
    size = 128
    tgt = _section(vnc_sections, 0, size)
    src, tgt, true = _pair(tgt, smooth_field(size, size, 1.5, grid=3, seed=1))
    before = field_residual(torch.zeros_like(true), true, border=16)
    result = finetune(src.to(device), tgt.to(device), levels=2, num_iter=300, backend=BACKEND)
    assert result.field.device.type == device
    after = field_residual(result.field.cpu(), true, border=16)
    assert isinstance(result, FinetuneResult)
    assert result.field.shape == (1, 2, size, size) and result.field.dtype == torch.float32
    assert before.median > 0.5
    assert after.median < 0.15 and after.p95 < 0.3, after


@pytest.mark.parametrize("device", DEVICES)
def test_coarse_to_fine_recovers_10px_shift(vnc_sections: np.ndarray, device: str) -> None:
    size = 128
    tgt = _section(vnc_sections, 1, size)
    src, tgt, true = _pair(tgt, affine_field(size, size, translation=(10.0, -6.0)))
    result = finetune(src.to(device), tgt.to(device), num_iter=300, backend=BACKEND)
    assert result.mips == (3, 2, 0)  # default_levels: mips 3, 2 per pixel, then mip 0 on a grid
    assert result.iterations.shape == (3, 1)
    err = field_residual(result.field.cpu(), true, border=16)
    assert err.median < 0.2 and err.p95 < 0.4, err


def test_single_level_cannot_recover_10px_shift(vnc_sections: np.ndarray) -> None:
    """Why the pyramid exists: without it the same shift is not found."""
    size = 64
    tgt = _section(vnc_sections, 1, size)
    src, tgt, true = _pair(tgt, affine_field(size, size, translation=(10.0, -6.0)))
    result = finetune(src, tgt, levels=1, num_iter=100, backend=BACKEND)
    assert field_residual(result.field, true, border=12).median > 3.0


@pytest.mark.parametrize("device", DEVICES)
def test_defects_let_the_field_tear_at_a_fold(vnc_sections: np.ndarray, device: str) -> None:
    size = 128
    tgt = _section(vnc_sections, 2, size)
    applied, fold_mask = fold_field(size, size, angle_deg=30.0, fold_width_px=6.0)
    src = warp(tgt, applied)
    src_defects = fold_mask  # the repeated band, in the deformed (source) frame
    moved = [t.to(device) for t in (src, tgt, src_defects)]
    result = finetune(moved[0], moved[1], src_defects=moved[2], backend=BACKEND)
    # The aligning field: 0 before the fold line, +6 px along its normal beyond the band.
    theta = np.radians(30.0)
    normal = torch.tensor([np.cos(theta), np.sin(theta)], dtype=torch.float32).view(1, 2, 1, 1)
    centred = torch.arange(size) - (size - 1) / 2
    ys, xs = torch.meshgrid(centred, centred, indexing="ij")
    d = (xs * normal[0, 0] + ys * normal[0, 1]).view(1, 1, size, size)
    expected = torch.where(d >= 0, 6.0 * normal, torch.zeros_like(normal))
    near = d < -8
    far = d > 6 + 8
    err_near = field_residual(result.field.cpu(), expected, border=12, mask=near)
    err_far = field_residual(result.field.cpu(), expected, border=12, mask=far)
    assert err_near.median < 0.3 and err_near.p95 < 0.6, err_near
    assert err_far.median < 0.3 and err_far.p95 < 0.6, err_far


def _two_pairs(vnc_sections: np.ndarray, size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    easy_tgt = _section(vnc_sections, 0, size)
    hard_tgt = _section(vnc_sections, 3, size, y=200, x=600)
    easy_src = warp(easy_tgt, affine_field(size, size, translation=(0.5, 0.0)))
    hard_src = warp(hard_tgt, smooth_field(size, size, 2.0, seed=3))
    return torch.cat([easy_src, hard_src]), torch.cat([easy_tgt, hard_tgt])


@pytest.mark.parametrize("device", DEVICES)
def test_batch_equals_single_runs(vnc_sections: np.ndarray, device: str) -> None:
    src, tgt = (t.to(device) for t in _two_pairs(vnc_sections))
    kwargs = dict(levels=2, num_iter=150, patience=10, max_halvings=2, backend=BACKEND)
    batch = finetune(src, tgt, **kwargs)
    singles = [finetune(src[i : i + 1], tgt[i : i + 1], **kwargs) for i in range(2)]
    # CPU: bitwise, every per-item computation (loss kernels, Adam state, schedule) ignores the
    # others. CUDA: equal up to float rounding (a reduction's order may depend on the batch size).
    for i, single in enumerate(singles):
        if device == "cpu":
            assert torch.equal(batch.iterations[:, i], single.iterations[:, 0])
            assert torch.equal(batch.field[i : i + 1], single.field)
            assert torch.equal(batch.loss[i : i + 1], single.loss)
        else:
            torch.testing.assert_close(batch.field[i : i + 1], single.field, rtol=0, atol=0.01)
    # Per-item schedules: the two items did not run the same number of iterations.
    assert not torch.equal(batch.iterations[:, 0], batch.iterations[:, 1])


def test_early_stop_on_identical_pair(vnc_sections: np.ndarray) -> None:
    img = _section(vnc_sections, 0, 64)
    result = finetune(img, img.clone(), levels=2, num_iter=500, patience=5, max_halvings=1, backend=BACKEND)
    assert int(result.iterations.max()) < 50, result.iterations
    assert float(result.field.abs().max()) < 0.05


def test_deterministic_reruns(vnc_sections: np.ndarray) -> None:
    src, tgt = _two_pairs(vnc_sections)
    runs = [finetune(src, tgt, levels=2, num_iter=40, backend=BACKEND) for _ in range(2)]
    assert torch.equal(runs[0].field, runs[1].field)
    assert torch.equal(runs[0].loss, runs[1].loss)
    assert torch.equal(runs[0].iterations, runs[1].iterations)


def test_all_zero_item_is_returned_unchanged_and_flagged(vnc_sections: np.ndarray) -> None:
    src, tgt = _two_pairs(vnc_sections, size=32)
    src[1] = 0.0
    init = torch.full((2, 2, 32, 32), 0.25)
    result = finetune(src, tgt, init_field=init, levels=1, num_iter=20, backend=BACKEND)
    assert result.no_data.tolist() == [False, True]
    assert torch.equal(result.field[1], init[1])
    assert torch.isnan(result.loss[1]) and not torch.isnan(result.loss[0])
    assert result.iterations[:, 1].tolist() == [0]
    assert int(result.iterations[0, 0]) > 0


def test_explicit_levels_and_pyramid_mips() -> None:
    assert pyramid_mips(512, 512, 4) == (3, 2, 1, 0)
    assert pyramid_mips(96, 96, 4) == (2, 1, 0)  # 24 px at mip 2; mip 3 would be 12 < 16 px
    assert pyramid_mips(100, 64, 4) == (2, 1, 0)  # 100 is not divisible by 8
    assert pyramid_mips(512, 512, 1) == (0,)
    img = torch.rand(1, 1, 64, 64) + 0.1
    result = finetune(img, img, levels=[Level(1, num_iter=3), Level(0, num_iter=2)], backend=BACKEND)
    assert result.mips == (1, 0)
    assert result.iterations[:, 0].tolist() == [3, 2]
    assert len(result.level_seconds) == 2 and all(s > 0 for s in result.level_seconds)


def test_default_levels_end_on_a_control_grid_with_jitter() -> None:
    grid_sm = 3.0 * DEFAULT_GRID_SM_FACTOR
    last = Level(
        0,
        field_mip=4,
        jitter=1.0,
        lr=DEFAULT_GRID_LR,
        sm=grid_sm,
        bending=DEFAULT_BENDING,
        detail_mip=2,
        bending_candidates=DEFAULT_BENDING_CANDIDATES,
        prefilter=DEFAULT_PREFILTER,
        refits=DEFAULT_REFITS,
        candidate_order=DEFAULT_CANDIDATE_ORDER,
    )
    assert default_levels(512, 512, 4) == [Level(3), Level(2), last]
    assert default_levels(512, 512, 4, sm=200.0)[-1].sm == pytest.approx(20.0)
    assert default_levels(96, 96, 4) == [Level(2), last]  # 6 cells of 16 px
    assert default_levels(48, 48, 4)[-1].field_mip == 3  # 16 px cells would leave 3 per side
    assert default_levels(64, 64, 2) == [Level(1), replace(last, detail_mip=1)]
    assert default_levels(512, 512, 1) == [Level(0, jitter=1.0)]
    with pytest.raises(ValueError, match="detail_mip must be an int in"):
        Level(0, field_mip=2, detail_mip=2)
    with pytest.raises(ValueError, match="field_mip must be an int >= mip"):
        Level(2, field_mip=1)
    with pytest.raises(ValueError, match="jitter must be in"):
        Level(0, jitter=2.0)
    with pytest.raises(ValueError, match="bending_candidates must be a tuple"):
        Level(0, bending_candidates=[500.0])
    with pytest.raises(ValueError, match="prefilter must be a Gaussian sigma"):
        Level(0, prefilter=-0.5)
    img = torch.rand(1, 1, 36, 36) + 0.1
    with pytest.raises(ValueError, match="not divisible by 8"):
        finetune(img, img, levels=[Level(0, field_mip=3)])


def test_control_grid_level_cannot_fit_noise_pixel_by_pixel(vnc_sections: np.ndarray) -> None:
    """A last level whose field lives at mip 2 is much smoother than a per-pixel one (same sm,
    noisy images) and still recovers the deformation."""
    size = 128
    gen = torch.Generator().manual_seed(1)
    tgt = _section(vnc_sections, 0, size)
    src, tgt, true = _pair(tgt, smooth_field(size, size, 1.5, grid=3, seed=4))
    src = src + 0.3 * torch.randn(src.shape, generator=gen)
    roughness, error = {}, {}
    for grid in (None, 2):
        levels = [Level(2), Level(0, field_mip=grid)]
        field = finetune(src, tgt, levels=levels, num_iter=300, sm=1.0, backend=BACKEND).field
        second = field[..., 2:, 1:-1] + field[..., :-2, 1:-1] + field[..., 1:-1, 2:] + field[..., 1:-1, :-2]
        roughness[grid] = float((second - 4 * field[..., 1:-1, 1:-1]).abs().mean())
        error[grid] = field_residual(field, true, border=16).median
    assert roughness[2] < 0.5 * roughness[None], roughness
    assert error[2] < 0.15, error


def test_empty_defect_masks_change_nothing(vnc_sections: np.ndarray) -> None:
    """The detail field near defects only exists where there is a defect: a chunk whose defect
    masks are empty gets bit for bit the field of a call without masks (so a run does not depend
    on how its sections are cut into chunks)."""
    size = 64
    tgt = _section(vnc_sections, 1, size)
    src, tgt, _ = _pair(tgt, smooth_field(size, size, 1.5, grid=3, seed=5))
    empty = torch.zeros(1, 1, size, size, dtype=torch.bool)
    plain = finetune(src, tgt, num_iter=200, backend=BACKEND)
    masked = finetune(src, tgt, src_defects=empty, tgt_defects=empty, num_iter=200, backend=BACKEND)
    assert torch.equal(plain.field, masked.field)
    assert torch.equal(plain.iterations, masked.iterations)


def test_bending_grid_recovers_strain_that_springs_bias(vnc_sections: np.ndarray) -> None:
    """4 % stretch + 2 deg rotation under noise: the default last level (16 px grid, bending
    energy, weak springs) leaves half the error of the second session's spring-only 4 px grid,
    whose springs pull the stretched section towards a rigid one."""
    size = 128
    gen = torch.Generator().manual_seed(2)
    tgt = _section(vnc_sections, 0, size)
    src, tgt, true = _pair(tgt, affine_field(size, size, scale=1.04, rotation_deg=2.0))
    src = torch.where(src != 0, src + 0.2 * torch.randn(src.shape, generator=gen), src)
    tgt = tgt + 0.2 * torch.randn(tgt.shape, generator=gen)
    error = {}
    springs_only = [Level(3), Level(2), Level(0, field_mip=2, jitter=1.0)]
    for name, levels in (("bending", default_levels(size, size, 4)), ("springs", springs_only)):
        error[name] = field_residual(finetune(src, tgt, levels=levels, num_iter=300).field, true, border=16)
    assert error["bending"].median < 0.04 and error["bending"].p95 < 0.08, error
    assert error["bending"].median < 0.6 * error["springs"].median, error


def test_jitter_removes_the_noise_bias_towards_fractional_positions(vnc_sections: np.ndarray) -> None:
    """Two noisy copies of one section (true field 0, on the pixel grid). Bilinear sampling at a
    fractional position averages the source's noise, so without jitter the MSE rewards moving
    off the grid and the field drifts; with jitter that reward averages out."""
    size = 128
    gen = torch.Generator().manual_seed(0)
    clean = _section(vnc_sections, 1, size)
    src = clean + 0.5 * torch.randn(clean.shape, generator=gen)
    tgt = clean + 0.5 * torch.randn(clean.shape, generator=gen)
    zero = torch.zeros(1, 2, size, size)
    drift = {}
    for jitter in (0.0, 1.0):
        level = [Level(0, field_mip=2, jitter=jitter, num_iter=300)]
        result = finetune(src, tgt, levels=level, sm=3.0, backend=BACKEND)
        drift[jitter] = field_residual(result.field, zero, border=16).median
    assert drift[1.0] < 0.6 * drift[0.0], drift


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s, t, k: k.update(src=s.double()), "src must be float32"),
        (lambda s, t, k: k.update(tgt=t[:, :, :16]), "same shape"),
        (lambda s, t, k: k.update(src=s[0]), r"src must have shape \(N, C, H, W\)"),
        (lambda s, t, k: s.__setitem__((0, 0, 3, 3), float("nan")), "src contains NaN or inf"),
        (lambda s, t, k: t.__setitem__((0, 0, 3, 3), float("inf")), "tgt contains NaN or inf"),
        (lambda s, t, k: k.update(init_field=torch.zeros(1, 2, 16, 16)), "init_field must be"),
        (lambda s, t, k: k.update(init_field=torch.full((1, 2, 32, 32), float("nan"))), "init_field cont"),
        (lambda s, t, k: k.update(src_defects=torch.zeros(1, 2, 32, 32)), "src_defects must be"),
        (lambda s, t, k: k.update(levels=[Level(0), Level(1)]), "strictly decreasing"),
        (lambda s, t, k: k.update(levels=[Level(6)]), "not divisible by 64"),
        (lambda s, t, k: k.update(lr=-1.0), "lr must be"),
        (lambda s, t, k: k.update(num_iter=0), "num_iter must be"),
        (lambda s, t, k: k.update(sm=float("nan")), "sm must be"),
        (lambda s, t, k: k.update(backend="gpu"), "backend must be one of"),
    ],
)
def test_invalid_inputs_raise_clear_errors(change, message: str) -> None:
    src = torch.rand(1, 1, 32, 32) + 0.1
    tgt = torch.rand(1, 1, 32, 32) + 0.1
    kwargs: dict = {"src": src, "tgt": tgt}
    change(src, tgt, kwargs)
    with pytest.raises(ValueError, match=message):
        finetune(kwargs.pop("src"), kwargs.pop("tgt"), num_iter=kwargs.pop("num_iter", 2), **kwargs)


def test_jittered_target_is_seeded_and_keeps_no_data_away(vnc_sections: np.ndarray) -> None:
    tgt = _section(vnc_sections, 2, 64)
    tgt[..., :, :20] = 0  # no data on the left
    offsets, sampled = jittered_target(tgt, 1.0)
    again, _ = jittered_target(tgt, 1.0)
    assert torch.equal(offsets, again) and offsets.shape == (1, 2, 64, 64)
    assert float(offsets.abs().max()) <= 0.5
    assert bool((sampled[..., :, :21] == 0).all())  # within 2 px of no data: no value
    inner = sampled[..., 4:-4, 26:-4]
    assert bool((inner != 0).all())
    # Bicubic at offsets of at most half a pixel stays close to the image (normalized units).
    assert float((inner - tgt[..., 4:-4, 26:-4]).abs().median()) < 0.5
