"""``align_stack``: the whole pipeline, normalize -> detect -> encode -> coarse_align -> finetune ->
solve -> render (``detect`` runs the fold/crack detector only with ``detect_defects="auto"`` and no
``defects`` layer; its mask is then the run's defects layer).

Each stage is a sub-flow (see :mod:`flows.stages`) running its chunk tasks on one shared dask
cluster (an existing one at ``dask_address`` or a LocalCluster started for the run); then the
report (:mod:`tasks.report`) is written to ``<out>/report/`` and published as Prefect artifacts.
Layers are named as in :mod:`flows.layout`. Every chunk task is idempotent, so a rerun after a
crash (or a second ``make demo``) does only the missing work.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

from prefect import flow, get_run_logger

from flows.layout import Layout
from flows.lock import output_lock
from flows.params import AlignParams
from flows.plan import check_workers_fit
from flows.runtime import ClusterConfig, cluster, stage_settings, stage_task_runner, use_cluster
from flows.stages import (
    coarse_align_flow,
    detect_flow,
    encode_flow,
    finetune_flow,
    normalize_flow,
    render_flow,
    solve_flow,
    with_detected_defects,
)
from tasks.report import build_report
from tasks.run_page import StageProgress, publish_report

__all__ = ["STAGES", "align_stack", "run_stage", "stage_hook"]

_HOOKS: list[Callable[[str, dict[str, Any]], None]] = []


@contextlib.contextmanager
def stage_hook(hook: Callable[[str, dict[str, Any]], None]) -> Iterator[None]:
    """Call ``hook(stage, summary)`` after each ``align_stack`` stage in this process (CLI progress)."""
    _HOOKS.append(hook)
    try:
        yield
    finally:
        _HOOKS.remove(hook)


def _notify(stage: str, summary: dict[str, Any]) -> None:
    for hook in list(_HOOKS):
        hook(stage, summary)


STAGES: dict[str, Any] = {
    "normalize": normalize_flow,
    "detect": detect_flow,
    "encode": encode_flow,
    "coarse_align": coarse_align_flow,
    "finetune": finetune_flow,
    "solve": solve_flow,
    "render": render_flow,
}


def run_stage(stage_flow: Any, params: Any, dask_address: str) -> dict[str, Any]:
    """Run one stage flow with its chunks on the cluster at ``dask_address``, holding the output's
    lock (:mod:`flows.lock`: a second run into the same output refuses).

    The summary gets ``"seconds"``: the stage's own wall time.
    """
    start = time.perf_counter()
    target = getattr(params, "output", None) or params.layer  # DownsampleParams writes into its layer
    with output_lock(target), use_cluster(dask_address), stage_settings():
        summary = stage_flow.with_options(task_runner=stage_task_runner())(params)
    if isinstance(summary, dict):
        summary["seconds"] = round(time.perf_counter() - start, 2)
    return summary


def report_stage(params: AlignParams, summaries: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Write the report for a finished run and publish it as Prefect artifacts."""
    layout = Layout(params.output)
    src = params.source_layer()
    blank = summaries.get("normalize", {}).get("blank", [])
    report = build_report(
        source=params.source,
        aligned=layout.aligned,
        final_fields=layout.final_fields,
        finetune_mip=params.finetune_mip,
        region=params.region(src, 0),
        out_dir=layout.report_dir,
        defects=params.defects,
        aligned_defects=layout.aligned_defects if params.defects else None,
        true_fields=params.true_fields,
        blank=blank,
        chunk_xy=params.chunk_xy,
        fields_root=layout.fields_root,
        extra={
            "chunks": {name: {"done": s["done"], "skipped": s["skipped"]} for name, s in summaries.items()}
        },
    )
    report.files["html"] = publish_report(report.markdown, report.rows, layout.report_dir)
    return {
        "stage": "report",
        "done": 1,
        "skipped": 0,
        "summary": report.summary,
        "files": report.files,
        "markdown": report.markdown,
        "rows": report.rows,
    }


@flow(name="align_stack", log_prints=True)
def align_stack(
    params: AlignParams,
    dask_address: str | None = None,
    cluster_config: ClusterConfig | None = None,
) -> dict[str, Any]:
    """Align a stack end to end (see the module docstring).

    Args:
        params: the pipeline parameters (validated before anything runs).
        dask_address: scheduler of an existing dask cluster; default a LocalCluster for this run.
        cluster_config: the cluster otherwise (:class:`flows.runtime.ClusterConfig`: a cluster class
            such as ``dask_jobqueue.SLURMCluster`` with its kwargs and adaptive scaling).

    Returns:
        ``{stage: summary}`` for every stage plus ``"report"``.
    """
    logger = get_run_logger()
    summaries: dict[str, dict[str, Any]] = {}
    config = ClusterConfig(address=dask_address) if dask_address else cluster_config
    with output_lock(params.output), cluster(config) as address:
        logger.info("align_stack: chunk tasks run on the dask cluster at %s", address)
        check_workers_fit(params, address)  # before any stage writes
        progress = StageProgress(list(STAGES))
        for name, stage_flow in STAGES.items():
            logger.info("align_stack: stage %s", name)
            summaries[name] = run_stage(stage_flow, params, address)
            progress.stage_done(name, summaries[name])
            _notify(name, summaries[name])
    with output_lock(params.output):
        summaries["report"] = report_stage(with_detected_defects(params), summaries)
    progress.stage_done("report", summaries["report"])
    _notify("report", summaries["report"])
    logger.info("align_stack finished: %s", summaries["report"]["summary"])
    return summaries
