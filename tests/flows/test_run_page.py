"""The align_stack flow run's own page: the report with inline pictures, the quality table, stage progress."""

from __future__ import annotations

import json
import os

from flows.layout import Layout


def _align_stack_artifacts(output: str) -> list[list]:
    """The artifacts of every align_stack flow run on ``output``, one list per run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowFilter,
        FlowFilterName,
    )

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["align_stack"])))
        return [
            client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[r.id])))
            for r in runs
            if str((r.parameters.get("params") or {}).get("output")) == output
        ]


def test_report_and_progress_are_on_the_align_stack_run_page(tiny_run):
    params, result = tiny_run
    runs = _align_stack_artifacts(str(params.output))
    per_run = [arts for arts in runs if any(a.key == "alignment-report" for a in arts)]
    assert per_run, "no align_stack flow run carries the alignment-report artifact"
    arts = per_run[0]
    by_key: dict[str, list] = {}
    for a in arts:
        by_key.setdefault(a.key, []).append(a)
    (report,) = by_key["alignment-report"]
    assert report.data.count("](data:image/png;base64,") >= 2  # thumbnails and x-z reslice, inline
    assert ".png`" not in report.data  # no picture left as a path
    (quality,) = by_key["alignment-quality"]
    table = json.loads(quality.data) if isinstance(quality.data, str) else quality.data
    assert [row["z"] for row in table] == [0, 1, 2, 3]
    (progress,) = by_key["align-stack-progress"]
    assert float(progress.data) == 100.0
    stages = max(by_key["align-stack-stages"], key=lambda a: a.created)
    rows = json.loads(stages.data) if isinstance(stages.data, str) else stages.data
    assert [r["stage"] for r in rows] == [
        "normalize", "detect", "encode", "coarse_align", "finetune", "solve", "render", "report"
    ]
    html = os.path.join(Layout(params.output).report_dir, "report.html")
    with open(html) as fh:
        assert fh.read().count('<img src="data:image/png;base64,') >= 2
    assert result["report"]["files"]["html"] == html
