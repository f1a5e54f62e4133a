"""The report's stack-trust section: what the final fields do to the stack, and which sections to check.

Measured on the final fields ``G`` (px at the finetune mip, :mod:`emcore.stack_quality`) and the
run's bookkeeping (``<out>/fields/affine.json``, ``<out>/fields/pairwise/pairs.json``):

* per section: the affine part of ``G`` (rotation deg, scale, translation px) and its drift
  along z, the non-affine magnitude (median / p95 px), Jacobian-determinant outliers (``det``
  outside [0.5, 2]; ``< 0`` = folded field), the seam ratio at processing-chunk borders
  (1.0 = no seam), and the coarse pairs that were unreliable or had to fall back;
* **flags** (:data:`FLAG_RULES`): a section that got worse (neighbour correlation down by more than
  ``WORSE_CORR``, or residual vs truth up by more than ``WORSE_PX``), looks over-warped (non-affine p95 above
  ``OVERWARP_PX`` px or Jacobian outliers above ``JACOBIAN_FRACTION``), shows a seam (ratio above
  ``SEAM_RATIO`` with border jumps ``SEAM_MIN_EXCESS_PX`` px above those elsewhere), or has no
  reliable coarse pair. A run with flagged sections does not claim
  success: the CLI's last line names them with the reasons.
* pictures: the rotation / translation drift along z (``drift.png``) and a red-cyan overlay of
  sections ``z`` and ``z - 1`` before and after (``overlay.png``; aligned structure looks grey).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np
import torch
from cloudfiles import CloudFiles

from emcore.pictures import line_plot, red_cyan, save_png, side_by_side, thumbnail
from emcore.stack_quality import rotation_series_drift, section_metrics

__all__ = ["FLAG_RULES", "StackSection", "stack_section"]

WORSE_CORR = 0.02
WORSE_PX = 0.25
OVERWARP_PX = 2.0
JACOBIAN_FRACTION = 0.005
SEAM_RATIO = 1.3
#: A seam is also a visible jump: the median jump across chunk borders must exceed the median jump
#: elsewhere by this much (px at the finetune mip). The bundled demo's chunk borders score ratios of
#: 1.4-2.0 on jumps of 0.010-0.019 px against 0.007-0.010 elsewhere (mip 2): at most 0.04 mip-0 px more.
SEAM_MIN_EXCESS_PX = 0.05
FLAG_RULES = {
    "worse": f"neighbour correlation down by more than {WORSE_CORR}, or residual vs truth up by more "
    f"than {WORSE_PX} px",
    "over-warped": f"non-affine p95 > {OVERWARP_PX} px or Jacobian outliers > {JACOBIAN_FRACTION:.1%}",
    "seam": f"seam ratio at chunk borders > {SEAM_RATIO} and the border jumps at least "
    f"{SEAM_MIN_EXCESS_PX} px above those elsewhere",
    "no reliable coarse pair": "affine interpolated from neighbours",
}


def _read_json(path: str, name: str) -> dict[str, Any]:
    raw = CloudFiles(path).get(name)
    return json.loads(raw) if raw else {}


class StackSection:
    """What :func:`stack_section` found: per-z metrics, flags, markdown lines, files, summary."""

    def __init__(self) -> None:
        self.metrics: dict[int, dict[str, float]] = {}
        self.flags: dict[int, list[str]] = {}
        self.lines: list[str] = []
        self.files: dict[str, str] = {}
        self.summary: dict[str, Any] = {}


def stack_section(
    *,
    final: torch.Tensor,
    zs: list[int],
    chunk_xy: int,
    fields_root: str,
    rows: list[dict[str, Any]],
    before: np.ndarray,
    after: np.ndarray,
    blank: list[int],
    out_dir: str,
    finetune_mip: int,
) -> StackSection:
    """Measure the final fields ``(Z, 2, H, W)`` (px at the finetune mip, the processing region from its
    first pixel, so chunk borders lie at multiples of ``chunk_xy``), flag sections, draw pictures.

    ``rows`` are the report's quality rows (``corr_before`` / ``corr_after`` and, with truth,
    ``residual_*``), ``before`` / ``after`` the ``(Z, Y, X)`` source and aligned stacks at the
    report mip.
    """
    out = StackSection()
    metrics = section_metrics(final, chunk_xy=chunk_xy)
    affine = _read_json(fields_root, "affine.json")
    pairs = _read_json(fields_root + "/pairwise", "pairs.json")
    fallback = set(affine.get("fallback", []))
    unreliable = sorted(k for k, s in pairs.get("status", {}).items() if not s.get("reliable"))
    for i, z in enumerate(zs):
        m = metrics[i]
        out.metrics[z] = m
        if z in blank:
            continue
        row = rows[i]
        reasons = []
        corr_drop = row["corr_before"] - row["corr_after"]
        before_px = row.get("residual_before_median", math.inf)
        res_up = row.get("residual_after_median", 0.0) > before_px + WORSE_PX
        if (not math.isnan(corr_drop) and corr_drop > WORSE_CORR) or res_up:
            reasons.append("worse")
        if m["non_affine_p95"] > OVERWARP_PX or m["jacobian_outside"] > JACOBIAN_FRACTION:
            reasons.append("over-warped")
        if m.get("seam_ratio", math.nan) > SEAM_RATIO and m["seam_excess_px"] >= SEAM_MIN_EXCESS_PX:
            reasons.append("seam")
        if z in fallback:
            reasons.append("no reliable coarse pair")
        if reasons:
            out.flags[z] = reasons
    solid = [i for i, z in enumerate(zs) if z not in blank]
    na95 = [metrics[i]["non_affine_p95"] for i in solid]
    seams = [metrics[i].get("seam_ratio", math.nan) for i in solid]
    seams = [v for v in seams if not math.isnan(v)]
    rotations = [metrics[i]["rotation_deg"] for i in solid]
    drift = rotation_series_drift(rotations, [zs[i] for i in solid]) if rotations else None
    out.summary = {
        "rotation_drift_deg": drift.drift_deg if drift else math.nan,
        "rotation_trend_deg": drift.trend_deg if drift else math.nan,
        "non_affine_p95_mean_px": float(np.mean(na95)) if na95 else math.nan,
        "seam_ratio_median": float(np.median(seams)) if seams else math.nan,
        "jacobian_outside_max": max((metrics[i]["jacobian_outside"] for i in solid), default=0.0),
        "unreliable_pairs": unreliable,
        "fallback_sections": sorted(fallback),
        "flagged": {str(z): r for z, r in out.flags.items()},
    }
    os.makedirs(out_dir, exist_ok=True)
    out.files["drift"] = str(save_png(os.path.join(out_dir, "drift.png"), side_by_side([
        line_plot({"rotation (deg)": [m["rotation_deg"] for m in metrics]}, x=zs,
                  title="rotation of G's affine part along z"),
        line_plot({"tx (px)": [m["tx"] for m in metrics], "ty (px)": [m["ty"] for m in metrics]}, x=zs,
                  title=f"translation at the centre (px, mip {finetune_mip})"),
    ])))  # fmt: skip
    worst = max(out.flags, key=lambda z: len(out.flags[z]), default=None)
    z_show = worst if worst is not None and worst != zs[0] else zs[len(zs) // 2]
    i = zs.index(z_show)
    if i > 0:
        out.files["overlay"] = str(save_png(os.path.join(out_dir, "overlay.png"), side_by_side(
            [red_cyan(thumbnail(before[i]), thumbnail(before[i - 1])),
             red_cyan(thumbnail(after[i]), thumbnail(after[i - 1]))],
            labels=[f"before: z={z_show} red, z={zs[i - 1]} cyan", "after"],
        )))  # fmt: skip
    out.lines = _markdown(out, zs, blank, finetune_mip)
    return out


def _markdown(out: StackSection, zs: list[int], blank: list[int], mip: int) -> list[str]:
    s = out.summary
    lines = [
        "## Stack trust",
        "",
        f"Rotation range of the final fields over the stack: **{s['rotation_drift_deg']:.3f} deg** "
        f"(max - min of the affine part's rotation: on a registered stack this is invented drift; on a "
        f"misaligned one it is the correction); its linear trend along z: "
        f"**{s['rotation_trend_deg']:+.3f} deg** (what a line through the rotations changes by from the "
        f"first section to the last: drift that bends the stack, where one turned section only widens "
        f"the range); non-affine p95, mean over sections: "
        f"**{s['non_affine_p95_mean_px']:.2f} px** (mip {mip}); seam ratio at chunk borders, median: "
        f"**{s['seam_ratio_median']:.2f}** (1.0 = no seam).",
        "",
        "| z | rotation (deg) | scale x / y | translation (px) | non-affine median / p95 (px) | "
        "Jacobian outliers | seam ratio | flags |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for z in zs:
        m = out.metrics[z]
        flags = "blank" if z in blank else ", ".join(out.flags.get(z, [])) or "-"
        lines.append(
            f"| {z} | {m['rotation_deg']:.3f} | {m['scale_x']:.4f} / {m['scale_y']:.4f} | "
            f"{m['tx']:.2f}, {m['ty']:.2f} | {m['non_affine_median']:.2f} / {m['non_affine_p95']:.2f} | "
            f"{m['jacobian_outside']:.2%} | {m.get('seam_ratio', math.nan):.2f} | {flags} |"
        )
    lines.append("")
    if s["unreliable_pairs"]:
        lines.append(f"Unreliable coarse pairs (z-k, not used where a reliable path exists): "
                     f"{', '.join(s['unreliable_pairs'])}.")
    if s["fallback_sections"]:
        lines.append(f"Sections without any reliable coarse pair (affine interpolated from neighbours): "
                     f"{s['fallback_sections']}.")
    if out.flags:
        lines.append(f"**{len(out.flags)} sections flagged**: " + "; ".join(
            f"z={z}: {', '.join(r)}" for z, r in sorted(out.flags.items())) + ".")
    else:
        lines.append("No section flagged.")
    lines += ["", "Flag rules: " + "; ".join(f"*{k}*: {v}" for k, v in FLAG_RULES.items()) + ".", ""]
    return lines
