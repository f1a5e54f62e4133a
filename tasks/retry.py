"""Retry policy of chunk functions: retry transient storage errors, never sectionflow's own errors.

The policy: up to ``RETRIES`` (2) retries, ``RETRY_DELAY_S`` (2 s) apart, only for errors that can
be transient (``OSError`` such as connection resets and timeouts, ``TimeoutError``,
``ConnectionError``) and never for :class:`~emcore.errors.SectionflowError` (bad input, missing
layer, unaligned write: retrying cannot help).

:func:`call_with_retries` applies it to one chunk call, on the dask worker, without Prefect
(:mod:`flows.blocks`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from emcore.errors import SectionflowError

__all__ = ["RETRIES", "RETRY_DELAY_S", "call_with_retries", "is_transient"]

RETRIES = 2
RETRY_DELAY_S = 2.0

R = TypeVar("R")


def is_transient(exc: BaseException) -> bool:
    """Whether retrying after ``exc`` could succeed (storage hiccup) rather than fail the same way."""
    if isinstance(exc, SectionflowError):
        return False
    return isinstance(exc, OSError | TimeoutError | ConnectionError)


def call_with_retries(
    fn: Callable[..., R],
    kwargs: Mapping[str, Any],
    *,
    retries: int = RETRIES,
    delay_s: float = RETRY_DELAY_S,
) -> R:
    """``fn(**kwargs)``, called again (up to ``retries`` times, ``delay_s`` apart) after a transient error.

    A non-transient error, or the last transient one, propagates unchanged.
    """
    attempt = 0
    while True:
        try:
            return fn(**kwargs)
        except Exception as exc:
            if attempt >= retries or not is_transient(exc):
                raise
            attempt += 1
            time.sleep(delay_s)
