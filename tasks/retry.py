"""Retry policy of chunk tasks: retry transient storage errors, never sectionflow's own errors.

``CHUNK_TASK_OPTIONS`` are the Prefect ``@task`` options every chunk task uses: 2 retries, 2 s
apart, only for errors that can be transient (``OSError`` such as connection resets and timeouts,
``TimeoutError``, ``ConnectionError``) and not for :class:`~emcore.errors.SectionflowError` (bad
input, missing layer, unaligned write: retrying cannot help).
"""

from __future__ import annotations

from typing import Any

from emcore.errors import SectionflowError

__all__ = ["CHUNK_TASK_OPTIONS", "is_transient"]


def is_transient(exc: BaseException) -> bool:
    """Whether retrying after ``exc`` could succeed (storage hiccup) rather than fail the same way."""
    if isinstance(exc, SectionflowError):
        return False
    return isinstance(exc, OSError | TimeoutError | ConnectionError)


def _retry_condition(task: Any, task_run: Any, state: Any) -> bool:
    try:
        state.result()
    except Exception as exc:  # noqa: BLE001 - inspect what the task raised
        return is_transient(exc)
    return False


CHUNK_TASK_OPTIONS: dict[str, Any] = {
    "retries": 2,
    "retry_delay_seconds": 2,
    "retry_condition_fn": _retry_condition,
}
