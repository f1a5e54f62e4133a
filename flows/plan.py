"""The run plan: what each stage will do, in physical units, printed before anything runs.

:func:`plan_lines` turns validated :class:`flows.params.AlignParams` into one line per stage (mip,
nm/px, px per section, chunks and pairs) plus the warnings of :func:`emcore.mip_plan.plan_warnings`
(settings outside what was measured). ``sectionflow plan`` prints them; ``align-stack`` prints
them first and logs them to the run.

:func:`task_memory` estimates the peak memory of one chunk task of the stages whose tasks grow with
the settings (coarse: a whole section; finetune: a padded chunk; solve: a padded chunk x a z-block),
from the kernels' measured costs (:mod:`emcore.task_memory`); :func:`check_task_memory` refuses a
run, before any stage, whose largest task would not fit a worker's memory limit, and says which
setting to change; :func:`check_workers_fit` applies it to a running cluster.
"""

from __future__ import annotations

import math

from emcore.errors import SectionflowError
from emcore.mip_plan import plan_warnings
from emcore.task_memory import (
    WORKER_BASE_BYTES,
    coarse_task_bytes,
    finetune_task_bytes,
    solve_task_bytes,
)
from flows.params import AlignParams
from flows.runtime import use_cluster, worker_memory_limit

__all__ = ["TaskMemoryError", "check_task_memory", "check_workers_fit", "plan_lines", "task_memory"]

#: A task may use up to this fraction of a worker's limit above the worker's resting size
#: (dask pauses a worker at 80 % of its limit and restarts it at 95 %).
WORKER_USABLE_FRACTION = 0.8


class TaskMemoryError(SectionflowError):
    """A chunk task would need more memory than a dask worker may use."""


def task_memory(params: AlignParams) -> dict[str, int]:
    """Estimated peak bytes of one task of ``coarse_align``, ``finetune`` and ``solve``."""
    src = params.source_layer()
    sections = len(params.sections(src))
    coarse = params.region(src, params.coarse_mip)
    side = params.chunk_xy + 2 * params.pad
    solve_sections = min(sections, params.solve_block_z + 2 * params.solve_overlap_z)
    return {
        "coarse_align": coarse_task_bytes(coarse.shape[1], coarse.shape[0]),
        "finetune": finetune_task_bytes(side),
        "solve": solve_task_bytes(side, max(1, solve_sections), max(1, params.neighbours)),
    }


_ADVICE = {
    "coarse_align": "a coarser coarse_mip",
    "finetune": "a smaller chunk_xy or pad",
    "solve": "a smaller chunk_xy, pad or solve_block_z",
}


def check_task_memory(params: AlignParams, worker_limit: int | None) -> None:
    """Raise :class:`TaskMemoryError` when a task would not fit a worker of ``worker_limit`` bytes.

    ``None`` or 0 means the workers have no limit (nothing to check).
    """
    if not worker_limit:
        return
    usable = WORKER_USABLE_FRACTION * worker_limit - WORKER_BASE_BYTES
    gib = 2.0**30
    for stage, need in task_memory(params).items():
        if need > usable:
            raise TaskMemoryError(
                f"a {stage} task needs about {need / gib:.1f} GiB, but a dask worker may use "
                f"{max(usable, 0) / gib:.1f} GiB ({WORKER_USABLE_FRACTION:.0%} of its "
                f"{worker_limit / gib:.1f} GiB limit, less {WORKER_BASE_BYTES / gib:.1f} GiB for "
                f"torch and the models): use {_ADVICE[stage]}, or give the workers more memory "
                "(cluster.memory_limit, dask worker --memory-limit)"
            )


def check_workers_fit(params: AlignParams, address: str) -> None:
    """:func:`check_task_memory` against the workers of the cluster at ``address``."""
    with use_cluster(address):
        check_task_memory(params, worker_memory_limit())


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
    mib = 2.0**20
    memory = task_memory(params)
    lines.append(
        "memory per task (estimated, emcore/task_memory.py): "
        + ", ".join(f"{stage} {need / mib:.0f} MiB" for stage, need in memory.items())
        + f", plus about {WORKER_BASE_BYTES / mib:.0f} MiB per worker"
    )
    warnings = plan_warnings(
        src.resolution(0), src.size(0)[:2], params.coarse_mip, params.finetune_mip, params.neighbours
    )
    return lines, warnings
