"""The run report: per-section quality before/after, pictures, Neuroglancer instructions.

Computed in the flow process on whole sections at a small *report mip* (the finest mip at or above
the finetune mip whose sections are at most ``REPORT_MAX_PX`` px wide), so it stays cheap on big
stacks. Written to ``<out>/report/`` (``report.md``, ``quality.csv``, ``run.json``, PNGs) and
returned as markdown + table for Prefect artifacts.

Quality columns, per section ``z``:

* ``corr_before`` / ``corr_after``: median tile Pearson correlation with section ``z - 1``
  (:func:`emcore.quality.neighbour_correlation`, 64 px tiles at the report mip; defect masks
  excluded), on the source and on the aligned stack;
* ``residual_before_px`` / ``residual_after_px`` (only with ``true_fields``): median and p95 of
  ``|G - G_true|`` (:func:`emcore.metrics.field_residual`) in px **at the finetune mip**, excluding
  ``RESIDUAL_BORDER`` px at the edges and the aligned defect mask dilated by ``DEFECT_MARGIN`` px
  (the field is discontinuous there by construction). "before" compares the identity field.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from emcore.geometry import VoxelBox
from emcore.layers import Layer, open_layer
from emcore.metrics import field_residual
from emcore.pictures import save_png, side_by_side, thumbnail, xz_reslice
from emcore.quality import neighbour_correlation
from tasks.report_stack import stack_section

__all__ = ["RunReport", "build_report", "neuroglancer_instructions", "report_mip"]

REPORT_MAX_PX = 1024
RESIDUAL_BORDER = 16
DEFECT_MARGIN = 4


@dataclass
class RunReport:
    """What :func:`build_report` produced: rows of the quality table, markdown, file paths."""

    rows: list[dict[str, Any]]
    markdown: str
    files: dict[str, str] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)


def report_mip(layer: Layer, min_mip: int) -> int:
    """The finest mip ``>= min_mip`` whose x/y size is at most ``REPORT_MAX_PX`` (else the top mip)."""
    for mip in range(min_mip, layer.num_mips):
        if max(layer.size(mip)[:2]) <= REPORT_MAX_PX:
            return mip
    return layer.num_mips - 1


def _stack(layer: Layer, region: VoxelBox, mip: int) -> np.ndarray:
    return layer.read(region, mip)[:, 0]


def _fmt(v: float | None, digits: int = 3) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def neuroglancer_instructions(layer_paths: dict[str, str]) -> str:
    """Markdown: the ``sectionflow view`` command showing the output's layers in a local Neuroglancer."""
    aligned, source = layer_paths["aligned"], layer_paths.get("source")
    output = aligned[: -len("/aligned")] if aligned.endswith("/aligned") else aligned
    command = f"sectionflow view {output.removeprefix('file://')}"
    if source:
        command += f" --source {source.removeprefix('file://')}"
    return (
        "See the aligned stack, the source, the defect masks and the field in a local Neuroglancer "
        "(offline; it prints one URL to open and starts at the worst flagged section):\n\n"
        f"```\n{command}\n```\n"
    )


def build_report(
    *,
    source: str,
    aligned: str,
    final_fields: str,
    finetune_mip: int,
    region: VoxelBox,
    out_dir: str,
    defects: str | None = None,
    aligned_defects: str | None = None,
    true_fields: str | None = None,
    blank: list[int] | None = None,
    extra: dict[str, Any] | None = None,
    chunk_xy: int | None = None,
    fields_root: str | None = None,
) -> RunReport:
    """Measure before/after quality, write pictures and the markdown report to ``out_dir``.

    Args:
        region: the aligned region, voxels at mip 0 (xy is scaled to the report mip).
        chunk_xy, fields_root: the processing chunk (px at the finetune mip) and ``<out>/fields``:
            with both, the stack-trust section (:mod:`tasks.report_stack`) is added.
    """
    src = open_layer(source)
    out = open_layer(aligned)
    mip = report_mip(src, finetune_mip)
    f = 2**mip
    box = VoxelBox(
        (region.start[0] // f, region.start[1] // f, region.start[2]),
        (-(-region.stop[0] // f), -(-region.stop[1] // f), region.stop[2]),
    )
    before, after = _stack(src, box, mip), _stack(out, box, mip)
    mask_before = _stack(open_layer(defects), box, mip) if defects else None
    mask_after = _stack(open_layer(aligned_defects), box, mip) if aligned_defects else None
    corr_before = neighbour_correlation(before, masks=mask_before)
    corr_after = neighbour_correlation(after, masks=mask_after)
    zs = list(range(box.start[2], box.stop[2]))
    blank = blank or []
    rows: list[dict[str, Any]] = []
    res_before: list[float] = []
    res_after: list[float] = []
    truth = None
    exclude = None
    fm = 2**finetune_mip
    fbox = VoxelBox(
        (region.start[0] // fm, region.start[1] // fm, region.start[2]),
        (-(-region.stop[0] // fm), -(-region.stop[1] // fm), region.stop[2]),
    )
    final = torch.from_numpy(open_layer(final_fields).read(fbox, finetune_mip))
    if true_fields:
        truth = torch.from_numpy(open_layer(true_fields).read(fbox, finetune_mip))
        if aligned_defects:
            m = torch.from_numpy(open_layer(aligned_defects).read(fbox, finetune_mip)).float()
            exclude = F.max_pool2d(m, 2 * DEFECT_MARGIN + 1, stride=1, padding=DEFECT_MARGIN) > 0
    for i, z in enumerate(zs):
        row: dict[str, Any] = {
            "z": z,
            "blank": z in blank,
            "corr_before": float(corr_before[i]),
            "corr_after": float(corr_after[i]),
        }
        if truth is not None and final is not None:
            keep = None if exclude is None else ~exclude[i : i + 1]
            try:
                rb = field_residual(
                    torch.zeros_like(truth[i : i + 1]), truth[i : i + 1], border=RESIDUAL_BORDER, mask=keep
                )
                ra = field_residual(final[i : i + 1], truth[i : i + 1], border=RESIDUAL_BORDER, mask=keep)
                row.update(
                    residual_before_median=rb.median,
                    residual_before_p95=rb.p95,
                    residual_after_median=ra.median,
                    residual_after_p95=ra.p95,
                )
                if z not in blank:
                    res_before.append(rb.median)
                    res_after.append(ra.median)
            except ValueError:
                pass
        rows.append(row)

    os.makedirs(out_dir, exist_ok=True)
    files: dict[str, str] = {}
    mid = len(zs) // 2
    files["thumbnails"] = str(
        save_png(
            os.path.join(out_dir, "before_after.png"),
            side_by_side(
                [thumbnail(before[mid]), thumbnail(after[mid])],
                labels=[f"before z={zs[mid]}", f"after z={zs[mid]}"],
            ),
        )
    )
    # True aspect (z nm / xy nm), but at least ~128 px tall so a short stack stays readable.
    z_scale = max(1, round(src.resolution(mip)[2] / src.resolution(mip)[0]), -(-128 // max(1, len(zs))))
    z_scale = min(z_scale, max(1, 256 // max(1, len(zs))))
    y = before.shape[1] // 2
    files["xz_reslice"] = str(
        save_png(
            os.path.join(out_dir, "xz_reslice.png"),
            side_by_side(
                [xz_reslice(before, y, z_scale=z_scale), xz_reslice(after, y, z_scale=z_scale)],
                labels=["before (x-z)", "after (x-z)"],
            ),
        )
    )

    stack = None
    if chunk_xy is not None and fields_root is not None:
        stack = stack_section(
            final=final, zs=zs, chunk_xy=chunk_xy, fields_root=fields_root, rows=rows, before=before,
            after=after, blank=blank, out_dir=out_dir, finetune_mip=finetune_mip,
        )  # fmt: skip
        files.update(stack.files)
        for row in rows:
            row.update({f"g_{k}": v for k, v in stack.metrics[row["z"]].items()})
            row["flags"] = ";".join(stack.flags.get(row["z"], []))

    def _mean(key: str) -> float:
        vals = [r[key] for r in rows if not math.isnan(r[key]) and not r["blank"]]
        return float(np.mean(vals)) if vals else float("nan")

    summary = {
        "report_mip": mip,
        "corr_before_mean": _mean("corr_before"),
        "corr_after_mean": _mean("corr_after"),
        "blank_sections": blank,
    }
    if res_after:
        summary.update(
            residual_before_median_px=float(np.median(res_before)),
            residual_after_median_px=float(np.median(res_after)),
            residual_after_worst_section_px=float(np.max(res_after)),
        )
    if stack is not None:
        summary.update(stack.summary)
    summary.update(extra or {})

    lines = [
        "# sectionflow alignment report",
        "",
        f"Source `{source}`, aligned `{aligned}`, final fields `{final_fields}` "
        f"(finetune mip {finetune_mip}).",
        f"Quality at mip {mip}: median 64-px-tile Pearson correlation with the previous section.",
        "",
    ]
    if blank:
        lines += [
            f"**Blank sections** (no tissue; kept, fields interpolated, neighbours see through): {blank}",
            "",
        ]
    header = "| z | corr before | corr after |" + (
        " residual before (median/p95 px) | residual after (median/p95 px) |" if truth is not None else ""
    )
    lines += [header, "|" + "---|" * (header.count("|") - 1)]
    for r in rows:
        name = f"{r['z']} (blank)" if r["blank"] else str(r["z"])
        line = f"| {name} | {_fmt(r['corr_before'])} | {_fmt(r['corr_after'])} |"
        if truth is not None:
            line += (
                f" {_fmt(r.get('residual_before_median'), 2)} / {_fmt(r.get('residual_before_p95'), 2)} |"
                f" {_fmt(r.get('residual_after_median'), 2)} / {_fmt(r.get('residual_after_p95'), 2)} |"
            )
        lines.append(line)
    lines += [
        "",
        f"Mean correlation (non-blank): before {_fmt(summary['corr_before_mean'])}, "
        f"after {_fmt(summary['corr_after_mean'])}.",
    ]
    if res_after:
        lines.append(
            f"Residual vs ground truth (median over sections of per-section median, px at mip "
            f"{finetune_mip}): before {summary['residual_before_median_px']:.2f}, after "
            f"{summary['residual_after_median_px']:.2f} "
            f"(worst section {summary['residual_after_worst_section_px']:.2f})."
        )
    if stack is not None:
        lines += ["", *stack.lines]
    lines += [
        "",
        "## Pictures",
        "",
        f"* before/after thumbnails: `{files['thumbnails']}`",
        f"* x-z reslice before/after: `{files['xz_reslice']}`",
        *(f"* {name}: `{files[name]}`" for name in ("overlay", "drift") if name in files),
        "",
        "## Neuroglancer",
        "",
        neuroglancer_instructions({"aligned": aligned, "source": source}),
    ]
    markdown = "\n".join(lines)
    with open(os.path.join(out_dir, "report.md"), "w") as fh:
        fh.write(markdown)
    keys = sorted({k for r in rows for k in r}, key=lambda k: (k != "z", k))
    with open(os.path.join(out_dir, "quality.csv"), "w") as fh:
        fh.write(",".join(keys) + "\n")
        for r in rows:
            fh.write(",".join(str(r.get(k, "")) for k in keys) + "\n")
    files["markdown"] = os.path.join(out_dir, "report.md")
    files["csv"] = os.path.join(out_dir, "quality.csv")
    with open(os.path.join(out_dir, "run.json"), "w") as fh:
        json.dump({"summary": summary, "rows": rows, "files": files}, fh, indent=1, default=str)
    files["json"] = os.path.join(out_dir, "run.json")
    return RunReport(rows, markdown, files, summary)
