"""Deployments served by ``sectionflow serve`` (the same flows ``prefect.yaml`` declares for a work pool).

One deployment per stage flow and one for ``align_stack`` (with an example nightly schedule that is
created paused... see README "Deployments"). Parameters come from the UI form (pydantic
:class:`flows.params.AlignParams`) or ``prefect deployment run ... --params``.
"""

from __future__ import annotations

from typing import Any

from flows.align_stack import align_stack
from flows.stages import (
    coarse_align_flow,
    detect_flow,
    downsample_flow,
    encode_flow,
    finetune_flow,
    normalize_flow,
    render_flow,
    solve_flow,
)

__all__ = ["deployments"]


def deployments() -> list[Any]:
    """``RunnerDeployment``s of every flow, for ``prefect.serve``."""
    stages = [
        normalize_flow,
        detect_flow,
        encode_flow,
        coarse_align_flow,
        finetune_flow,
        solve_flow,
        render_flow,
        downsample_flow,
    ]
    out = [f.to_deployment(name=f"{f.name}-local", tags=["sectionflow", "stage"]) for f in stages]
    out.append(
        align_stack.to_deployment(
            name="align_stack-local", tags=["sectionflow"], cron="0 3 * * *", paused=True
        )
    )
    return out
