"""The order of the last level's soft fits (``Level.candidate_order``, issue 17 fifth pass).

A pair that the held-out selection moves to the soft fit is fitted (candidate and refits) with a
fourth-order smoothness energy instead of the bending energy: a sharper low-pass, so a noisy
strained pair ends closer to the truth; a pair of different sections (fails the noise check,
keeps the stiff fit) is bit for bit the fit with the bending energy. The strained pair here has
finer strain than the benchmark's and takes the softer of the two fourth-order candidates, which a
margin between the soft candidates would never let it reach. Benchmark-scale numbers:
benchmarks/README.md, "Issue 17, fifth pass".
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from emcore.finetune import finetune
from emcore.finetune.bending import MAX_ORDER
from emcore.finetune.coarse_to_fine import (
    DEFAULT_BENDING_CANDIDATES,
    DEFAULT_CANDIDATE_ORDER,
    Level,
    default_levels,
)
from emcore.metrics import field_residual
from tests.sections import noisy_neighbours, strained_noisy_pair

#: The fourth pass's soft fits: the bending energy, weight 2e2.
BENDING_SOFT = {"candidate_order": 2, "bending_candidates": (2e2,)}


def _last(levels: list[Level], **changes: object) -> list[Level]:
    return [*levels[:-1], replace(levels[-1], **changes)]


def test_default_schedule_fits_the_soft_items_with_the_fourth_order() -> None:
    last = default_levels(512, 512, 5)[-1]
    assert last.candidate_order == DEFAULT_CANDIDATE_ORDER == 4
    assert last.bending_candidates == DEFAULT_BENDING_CANDIDATES
    for bad in (1, MAX_ORDER + 1, 2.5, True):
        with pytest.raises(ValueError, match="candidate_order"):
            Level(0, candidate_order=bad)


def test_strained_noisy_pair_fits_closer_with_the_fourth_order(vnc_sections: np.ndarray) -> None:
    size = 256
    src, tgt, true = strained_noisy_pair(vnc_sections, size)  # ~32 px features: local strain
    levels = default_levels(size, size, 4)
    fourth = finetune(src, tgt, levels=levels)
    bending = finetune(src, tgt, levels=_last(levels, **BENDING_SOFT))
    err_4 = field_residual(fourth.field, true, border=16)
    err_2 = field_residual(bending.field, true, border=16)
    assert err_4.p95 < 0.97 * err_2.p95 and err_4.median < err_2.median, (err_4, err_2)
    # Both took the soft fit and its refits: the coarser levels are the same computation.
    assert torch.equal(fourth.iterations[:-1], bending.iterations[:-1])


def test_different_sections_keep_the_stiff_fit_whatever_the_order(vnc_sections: np.ndarray) -> None:
    """Neighbouring sections fail the noise check: the soft fits' order changes nothing."""
    size = 128
    src, tgt = noisy_neighbours(vnc_sections, size)
    levels = default_levels(size, size, 4)
    fourth = finetune(src, tgt, levels=levels)
    bending = finetune(src, tgt, levels=_last(levels, **BENDING_SOFT))
    assert torch.equal(fourth.field, bending.field)
    assert torch.equal(fourth.iterations, bending.iterations)
