"""The translation start of the automatic pyramid (emcore.finetune.translation_start).

A pure translation near the motion bound (which descent from the coarsest level does not capture
on real EM) is recovered; a pair with less motion, or a call with a motion bound of at most
20 px, runs bit for bit as the same schedule without the rule. Benchmark-scale numbers: benchmarks/README.md,
"Capture".
"""

from __future__ import annotations

import numpy as np
import torch

from emcore.field import compose, warp
from emcore.finetune import finetune
from emcore.finetune.coarse_to_fine import default_levels, pyramid_depth
from emcore.finetune.translation_start import translation_start
from emcore.metrics import field_residual
from emcore.normalize import normalize, section_stats
from emcore.synthetic import affine_field, smooth_field, true_alignment_field

SIZE = 256


def _pair(vnc_sections: np.ndarray, applied: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    size = applied.shape[-1]
    crop = vnc_sections[0, 300 : 300 + size, 300 : 300 + size]
    stats = section_stats(crop)
    tgt = torch.from_numpy(normalize(crop, stats.mean, stats.std)).view(1, 1, size, size)
    gen = torch.Generator().manual_seed(0)
    src = warp(tgt, applied) + 0.2 * torch.randn(tgt.shape, generator=gen)
    return src, tgt + 0.2 * torch.randn(tgt.shape, generator=gen)


def test_a_pure_translation_at_the_motion_bound_is_captured(vnc_sections: np.ndarray) -> None:
    shift = affine_field(SIZE, SIZE, translation=(26.0, -27.0))  # 37.5 px everywhere
    applied = compose(shift, smooth_field(SIZE, SIZE, 2.0, seed=3))
    src, tgt = _pair(vnc_sections, applied)
    true = true_alignment_field(applied, border=32)
    result = finetune(src, tgt)
    assert result.translated.tolist() == [True]
    res = field_residual(result.field, true, border=40)
    assert res.p95 < 0.5, res
    # A motion bound the 4-level pyramid covers (the pipeline's 16 px) never gets a start.
    assert finetune(src, tgt, max_motion=16.0).translated.tolist() == [False]


def test_small_motion_runs_as_without_the_rule(vnc_sections: np.ndarray) -> None:
    applied = smooth_field(128, 128, 3.0, seed=1)
    src, tgt = _pair(vnc_sections, applied)
    result = finetune(src, tgt)
    levels = default_levels(128, 128, pyramid_depth(128, 128, 40.0))
    assert result.translated.tolist() == [False]
    assert torch.equal(result.field, finetune(src, tgt, levels=levels).field)


def test_start_composes_with_the_init_field_and_skips_blank_items(vnc_sections: np.ndarray) -> None:
    applied = affine_field(SIZE, SIZE, translation=(-30.0, 12.0))
    src, tgt = _pair(vnc_sections, applied)
    src = torch.cat([src, torch.zeros_like(src)])
    tgt = torch.cat([tgt, tgt])
    init = torch.zeros(2, 2, SIZE, SIZE)
    init[:, 0] = 10.0  # part of the way already
    field, adopted = translation_start(src, tgt, init, top_mip=4, max_motion=40.0)
    assert adopted.tolist() == [True, False]
    inner = field[0, :, 40:-40, 40:-40]
    assert abs(float(inner[0].mean()) - 30.0) < 1.0 and abs(float(inner[1].mean()) + 12.0) < 1.0
    assert torch.equal(field[1], init[1])
