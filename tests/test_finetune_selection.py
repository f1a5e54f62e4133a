"""Stiffness chosen by the data (emcore.finetune.selection) and pyramid depth from a motion bound.

Held-out blocks, the masks split, the noise estimate, the selection rule on small real-EM crops
(a locally strained pair goes soft and gets closer to the truth; a pair of different sections
keeps the stiff fit whatever the candidates), batch independence, and
``coarse_to_fine.pyramid_depth``. Benchmark-scale numbers: benchmarks/README.md.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from emcore.field import warp
from emcore.finetune import finetune
from emcore.finetune.coarse_to_fine import default_levels, pyramid_depth
from emcore.finetune.loss_reference import HAS_DATA
from emcore.finetune.losses import prepare_masks
from emcore.finetune.selection import heldout_blocks, noise_sigma, split_masks
from emcore.metrics import field_residual
from emcore.synthetic import smooth_field, true_alignment_field
from tests.sections import noisy as _noisy
from tests.sections import noisy_neighbours
from tests.sections import normalized_crop as _section


def test_heldout_blocks_are_seeded_blocks_of_the_asked_fraction() -> None:
    held = heldout_blocks(256, 200, block=8, fraction=0.125)
    assert held.shape == (1, 1, 256, 200) and held.dtype == torch.bool
    assert torch.equal(held, heldout_blocks(256, 200, block=8, fraction=0.125))
    assert not torch.equal(held, heldout_blocks(256, 200, block=8, fraction=0.125, seed=1))
    assert 0.08 < held.double().mean().item() < 0.17
    cells = held[0, 0, :256, :200].reshape(32, 8, 25, 8)
    assert torch.equal(cells.all(dim=(1, 3)), cells.any(dim=(1, 3)))  # whole blocks only
    with pytest.raises(ValueError, match="fraction"):
        heldout_blocks(64, 64, fraction=1.0)


def test_split_masks_partition_the_target_data() -> None:
    tgt = torch.randn(2, 1, 32, 32)
    tgt[1, :, :, :5] = 0  # no data on a strip of item 1
    masks = prepare_masks(torch.randn(2, 1, 32, 32), tgt)
    held = heldout_blocks(32, 32, block=4, fraction=0.25)
    fit, out = split_masks(masks, held)
    data = (masks.tgt_flags & HAS_DATA) != 0
    fit_data, out_data = (fit.tgt_flags & HAS_DATA) != 0, (out.tgt_flags & HAS_DATA) != 0
    assert torch.equal(fit_data | out_data, data)
    assert not bool((fit_data & out_data).any())
    assert torch.equal(out_data, data & held)
    assert torch.equal(fit.src_flags, masks.src_flags)


def test_noise_sigma_reads_added_noise_and_ignores_ramps() -> None:
    gen = torch.Generator().manual_seed(0)
    ramp = torch.linspace(-2, 2, 128).view(1, 1, 1, 128).expand(1, 1, 128, 128)
    noisy = ramp + 0.3 * torch.randn(1, 1, 128, 128, generator=gen)
    both = torch.cat([ramp.clone(), noisy])
    sigma = noise_sigma(both)
    assert sigma[0].item() < 1e-4
    assert abs(sigma[1].item() - 0.3) < 0.015
    holes = noisy.clone()
    holes[..., :40, :] = 0  # no data: left out, the estimate stays
    assert abs(noise_sigma(holes).item() - sigma[1].item()) < 0.02


def _strain_pair(vnc_sections: np.ndarray, size: int = 128) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(3)
    clean = _section(vnc_sections, 0, size)
    applied = smooth_field(size, size, 1.5, grid=6, seed=2)  # features of ~25 px: local strain
    src = _noisy(warp(clean, applied), gen)
    return src, _noisy(clean, gen), true_alignment_field(applied, border=8)


def test_strained_pair_goes_soft_and_gets_closer(vnc_sections: np.ndarray) -> None:
    src, tgt, true = _strain_pair(vnc_sections)
    size = src.shape[-1]
    chosen = finetune(src, tgt, levels=4)
    fixed = [replace(lv, bending_candidates=()) for lv in default_levels(size, size, 4)]
    stiff = finetune(src, tgt, levels=fixed)
    err_chosen = field_residual(chosen.field, true, border=16)
    err_stiff = field_residual(stiff.field, true, border=16)
    assert err_chosen.p95 < 0.8 * err_stiff.p95, (err_chosen, err_stiff)
    assert chosen.iterations[-1, 0] > stiff.iterations[-1, 0]  # the softer fit ran


def test_different_sections_keep_the_stiff_fit(vnc_sections: np.ndarray) -> None:
    """Neighbouring sections differ in content far beyond the noise: the discrepancy check skips
    the softer fits, so the result does not depend on the candidates at all."""
    size = 128
    src, tgt = noisy_neighbours(vnc_sections, size)
    fields = []
    for candidates in ((500.0,), (5.0, 50.0)):
        levels = default_levels(size, size, 4)
        levels[-1] = replace(levels[-1], bending_candidates=candidates)
        fields.append(finetune(src, tgt, levels=levels))
    assert torch.equal(fields[0].field, fields[1].field)
    assert torch.equal(fields[0].iterations, fields[1].iterations)


def test_selection_is_per_item_in_a_batch(vnc_sections: np.ndarray) -> None:
    """A strained pair (soft fit chosen) and a pair of different sections (stiff fit kept) in one
    batch: each gets bit for bit its single-run result (CPU)."""
    gen = torch.Generator().manual_seed(5)
    clean = _section(vnc_sections, 0, 64)
    src0, tgt0 = _noisy(warp(clean, smooth_field(64, 64, 1.0, grid=4, seed=2)), gen), _noisy(clean, gen)
    src1, tgt1 = _noisy(_section(vnc_sections, 2, 64), gen), _noisy(_section(vnc_sections, 0, 64), gen)
    src, tgt = torch.cat([src0, src1]), torch.cat([tgt0, tgt1])
    batch = finetune(src, tgt, levels=3, num_iter=200)
    for i in range(2):
        single = finetune(src[i : i + 1], tgt[i : i + 1], levels=3, num_iter=200)
        assert torch.equal(batch.field[i : i + 1], single.field)
        assert torch.equal(batch.iterations[:, i], single.iterations[:, 0])


@pytest.mark.parametrize(
    ("size", "motion", "levels"),
    [(512, 40.0, 5), (512, 20.0, 4), (512, 5.0, 4), (512, 80.0, 6), (1024, 100.0, 7), (128, 80.0, 4)],
)
def test_pyramid_depth_follows_motion_and_size(size: int, motion: float, levels: int) -> None:
    assert pyramid_depth(size, size, motion) == levels


def test_default_depth_comes_from_the_motion_bound(vnc_sections: np.ndarray) -> None:
    img = _section(vnc_sections, 0, 64)
    assert finetune(img, img.clone(), num_iter=3).mips == (2, 0)  # 64 px: 16 px at mip 2
    big = torch.zeros(1, 1, 256, 256)
    big[..., :64, :64] = img
    assert len(finetune(big, big.clone(), num_iter=3).mips) == 4  # mips 4..2 per pixel + the grid
    assert len(finetune(big, big.clone(), num_iter=3, max_motion=10.0).mips) == 3
    with pytest.raises(ValueError, match="max_motion"):
        finetune(img, img, max_motion=0.0)
