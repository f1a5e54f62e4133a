"""The run plan: what each stage will do, in physical units, printed before anything runs.

:func:`plan_lines` turns validated :class:`flows.params.AlignParams` into one line per stage (mip,
nm/px, px per section, chunks and pairs) plus the warnings of :func:`emcore.mip_plan.plan_warnings`
(settings outside what was measured). ``sectionflow plan`` prints them; ``align-stack`` prints
them first and logs them to the run.
"""

from __future__ import annotations

import math

from emcore.mip_plan import plan_warnings
from flows.params import AlignParams

__all__ = ["plan_lines"]


def plan_lines(params: AlignParams) -> tuple[list[str], list[str]]:
    """``(lines, warnings)``: one line per stage and plain-language warnings."""
    src = params.source_layer()
    sections = len(params.sections(src))
    pairs = sum(min(params.neighbours, z) for z in range(sections))

    def where(mip: int) -> tuple[str, int, int]:
        region = params.region(src, mip)
        nm = src.resolution(mip)[0]
        return f"mip {mip} ({nm:g} nm/px)", region.shape[0], region.shape[1]

    def chunks(mip: int) -> int:
        _, w, h = where(mip)
        side = params.chunk_at(mip)
        return math.ceil(w / side) * math.ceil(h / side)

    cm, cw, ch = where(params.coarse_mip)
    fm, fw, fh = where(params.finetune_mip)
    rm, rw, rh = where(params.render_mip)
    n_fine = chunks(params.finetune_mip)
    lines = [
        f"source: {sections} sections, {src.resolution(0)[0]:g} x {src.resolution(0)[1]:g} x "
        f"{src.resolution(0)[2]:g} nm/voxel at mip 0",
        f"normalize: {fm}, {fw} x {fh} px per section, {n_fine} chunks per section",
        f"coarse_align: {cm}, whole sections of {cw} x {ch} px, {pairs} pairs "
        f"(neighbours {params.neighbours}), method {params.coarse_method}/{params.coarse_model}; "
        f"global affine solve (drift lengths {params.drift_sections_linear:g} / "
        f"{params.drift_sections_translation:g} sections)",
        f"finetune: {fm}, {n_fine} chunks of {params.chunk_xy} px + {params.pad} px context per pair, "
        f"{pairs * n_fine} chunk runs (sm {params.sm:g}, {params.num_iter} iterations per level)",
        f"solve: {fm}, {n_fine} xy chunks over all {sections} sections (anchor {params.anchor:g})",
        f"render: {rm}, {rw} x {rh} px per section, {chunks(params.render_mip)} chunks per section, "
        f"then mips up to {src.num_mips - 1}",
    ]
    warnings = plan_warnings(
        src.resolution(0), src.size(0)[:2], params.coarse_mip, params.finetune_mip, params.neighbours
    )
    return lines, warnings
