"""What the ``align_stack`` flow run's page in the Prefect UI shows: stage progress and the report.

Artifacts belong to the run that creates them. The stage flows create their chunk-progress
artifacts on their own (sub)flow runs; these helpers are called from the ``align_stack`` flow
itself, so their artifacts sit on the page the README points to:

* ``StageProgress``: a progress artifact (percent of the stages finished, the report counting as
  one) and a table artifact ``align-stack-stages`` (stage, chunks computed, skipped, seconds),
  both updated after every stage;
* ``publish_report``: the report markdown with its pictures inlined (``data:`` URIs,
  :mod:`tasks.report_html`) as a markdown artifact, the per-section quality rows as a table
  artifact, and ``report.html`` in the report folder.

Artifacts are a convenience (the files are the record): failing to publish one logs a warning.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from tasks.report_html import inline_pictures, write_report_html

__all__ = ["StageProgress", "publish_report"]


def _warn(what: str, exc: Exception) -> None:
    try:
        from prefect import get_run_logger

        get_run_logger().warning("could not publish %s: %s", what, exc)
    except Exception:  # noqa: BLE001 - outside a run there is no run logger
        pass


class StageProgress:
    """Stage-level progress of one ``align_stack`` run, on that run's page (see the module doc)."""

    def __init__(self, stages: Sequence[str]) -> None:
        self.stages = [*stages, "report"]
        self.rows: list[dict[str, Any]] = []
        self._started = time.perf_counter()
        self._artifact = None
        try:
            from prefect.artifacts import create_progress_artifact

            self._artifact = create_progress_artifact(
                0.0, key="align-stack-progress", description="align_stack: stages finished"
            )
        except Exception as exc:  # noqa: BLE001
            _warn("the stage progress artifact", exc)

    def stage_done(self, stage: str, summary: Mapping[str, Any]) -> None:
        """Record ``stage`` as finished (its summary's ``done``/``skipped`` counts) and update the page."""
        now = time.perf_counter()
        self.rows.append(
            {
                "stage": stage,
                "chunks computed": summary.get("done", 0),
                "chunks skipped": summary.get("skipped", 0),
                "finished at (s)": round(now - self._started, 1),
            }
        )
        try:
            from prefect.artifacts import create_table_artifact, update_progress_artifact

            if self._artifact is not None:
                update_progress_artifact(self._artifact, 100.0 * len(self.rows) / len(self.stages))
            create_table_artifact(
                self.rows, key="align-stack-stages", description="align_stack: stages finished so far"
            )
        except Exception as exc:  # noqa: BLE001
            _warn("the stage progress", exc)


def publish_report(markdown: str, rows: list[dict[str, Any]], report_dir: str) -> str:
    """Write ``report.html``, publish the report (pictures inlined) and quality table; return html path."""
    path = write_report_html(markdown, report_dir)
    try:
        from prefect.artifacts import create_markdown_artifact, create_table_artifact

        create_markdown_artifact(
            inline_pictures(markdown, report_dir), key="alignment-report", description="sectionflow report"
        )
        create_table_artifact(rows, key="alignment-quality", description="per-section quality")
    except Exception as exc:  # noqa: BLE001
        _warn("the report artifacts", exc)
    return path
