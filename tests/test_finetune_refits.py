"""The last level's refits of the soft items (``Level.refits``, issue 17 fourth pass).

Items that the held-out selection moves to a softer bending weight are refitted with that weight
on every pixel, each refit with its own jitter seed, and their field is the mean of the selected
fit and the refits: a noisy strained pair ends closer to the truth; a pair of different sections
(fails the noise check, keeps the stiff fit) is bit for bit the fit without refits.
Benchmark-scale numbers: benchmarks/README.md, "Issue 17, fourth pass".
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from emcore.finetune import finetune
from emcore.finetune.coarse_to_fine import DEFAULT_REFITS, MAX_REFITS, Level, default_levels
from emcore.metrics import field_residual
from tests.sections import noisy_neighbours, strained_noisy_pair


def _with_refits(levels: list[Level], refits: int) -> list[Level]:
    return [*levels[:-1], replace(levels[-1], refits=refits)]


def test_default_schedule_refits_the_soft_items() -> None:
    assert default_levels(512, 512, 5)[-1].refits == DEFAULT_REFITS >= 1
    for bad in (-1, MAX_REFITS + 1, 1.5):
        with pytest.raises(ValueError, match="refits"):
            Level(0, refits=bad)


def test_strained_noisy_pair_fits_closer_with_refits(vnc_sections: np.ndarray) -> None:
    size = 256
    src, tgt, true = strained_noisy_pair(vnc_sections, size)  # ~32 px features: local strain
    levels = default_levels(size, size, 4)
    refitted = finetune(src, tgt, levels=_with_refits(levels, DEFAULT_REFITS))
    single = finetune(src, tgt, levels=_with_refits(levels, 0))
    err_r = field_residual(refitted.field, true, border=16)
    err_s = field_residual(single.field, true, border=16)
    assert err_r.p95 < 0.97 * err_s.p95 and err_r.median < err_s.median, (err_r, err_s)
    # The refits ran (the pair took the soft fit): the last level counts their iterations too.
    assert refitted.iterations[-1, 0] > single.iterations[-1, 0]
    assert torch.equal(refitted.iterations[:-1], single.iterations[:-1])


def test_different_sections_are_not_refitted(vnc_sections: np.ndarray) -> None:
    """Neighbouring sections fail the noise check and keep the stiff fit: refits change nothing."""
    size = 128
    src, tgt = noisy_neighbours(vnc_sections, size)
    levels = default_levels(size, size, 4)
    with_refits = finetune(src, tgt, levels=_with_refits(levels, DEFAULT_REFITS))
    without = finetune(src, tgt, levels=_with_refits(levels, 0))
    assert torch.equal(with_refits.field, without.field)
    assert torch.equal(with_refits.iterations, without.iterations)
