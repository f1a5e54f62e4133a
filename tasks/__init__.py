"""Chunk-level Prefect tasks over :mod:`emcore`.

Every task takes layer *paths* and boxes (never big arrays or models), reads its input with context
pad, calls emcore, crops, writes a chunk-aligned output, and then writes a completion marker (see
:mod:`tasks.markers`) so a rerun skips it. Tasks return a small :class:`tasks.markers.ChunkOutcome`
(``"done"`` or ``"skipped"``) that flows count and report.

Modules: ``markers`` (idempotency), ``version`` (code version), ``retry`` (transient storage errors),
``io`` (reads through a field), ``normalize``, ``encode``, ``pyramid`` (downsample), ``coarse``,
``finetune``, ``solve``, ``render``, ``report``; ``report_html`` (the report with inline pictures,
``report.html``), ``run_page`` (artifacts on the ``align_stack`` run), ``field_io`` (export/import fields).
"""
