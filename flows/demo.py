"""The demo: misalign the bundled real EM stack by a known deformation and align it back.

Steps (all under ``./demo_output/`` by default, every one idempotent):

1. import the bundled VNC sections (``data/vnc_stack1``, 10 x 1024 x 1024 px, 4.6 x 4.6 x 50 nm,
   :mod:`emcore.bundled`) into ``registered`` (a ``file://`` precomputed layer, mips 0-4);
2. misalign it into ``misaligned`` by the deformation below, with the fold's defect mask in
   ``misaligned/../masks/defects`` and the exact alignment fields in ``true_fields``;
3. run ``align_stack`` on ``misaligned`` with ``configs/demo.yaml`` into ``aligned_run/``;
4. print the report (residual vs ground truth and neighbour correlation, before/after).

The deformation (mip-0 px, pull fields of :mod:`emcore.field`; ``misaligned_z = warp(registered_z,
A_z)``), seeded per section so it is the same on every run:

* section 0 is left as it is (it is the fixed section that defines the stack frame);
* every other section: a rigid motion, rotation uniform in +-1 deg about the centre and translation
  uniform in +-``MAX_SHIFT_PX`` (40) px per axis (:func:`emcore.synthetic.affine_field`), composed
  with a smooth elastic field of at most ``ELASTIC_PX`` (8) px (:func:`emcore.synthetic.smooth_field`,
  4 x 4 lattice);
* section ``FOLD_SECTION`` (6) also gets a fold-like defect (:func:`emcore.synthetic.fold_field`,
  12 px band at 30 deg), with its mask.

The truth ``G_z = invert(A_z)`` (``true_alignment_field``, computed at the finetune mip, mip 2; for
the fold section the fold part is inverted exactly: the band itself has no inverse and is excluded
from the residual).

Mip choice (2 CPU cores, a few minutes): coarse alignment at mip 3 (128 px sections, shifts <= 5 px
there), finetuning and final fields at mip 2 (256 px, chunks of 128 px + 32 px context), rendering
at mip 0 (512 px chunks) and downsampled to mip 4.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from emcore.bundled import VNC_RESOLUTION_NM, VNC_STACK_DIR
from emcore.field import compose, resample_field, warp
from emcore.geometry import VoxelBox
from emcore.layers import create_layer
from emcore.stack_import import import_stack
from emcore.synthetic import affine_field, fold_field, smooth_field, true_alignment_field
from flows.params import AlignParams, load_params
from tasks.markers import ChunkMarker
from tasks.version import code_version

__all__ = ["DEMO_CONFIG", "deformation", "prepare_demo", "demo_params"]

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
MAX_SHIFT_PX = 40.0
MAX_ROTATION_DEG = 1.0
ELASTIC_PX = 8.0
FOLD_SECTION = 6
FOLD = {"angle_deg": 30.0, "offset_px": 120.0, "fold_width_px": 12.0}
NUM_MIPS = 5
CHUNK = (128, 128, 1)


def deformation(
    z: int, height: int, width: int, *, fold_section: int | None = FOLD_SECTION, truth_mip: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(applied A_z, true G_z, defect mask or None)`` for section ``z`` (see the module docstring).

    ``A_z`` ``(1, 2, height, width)`` float32 px at mip 0 and the mask ``(1, 1, height, width)``
    bool; the truth ``G_z`` is computed directly at ``truth_mip`` (``(1, 2, height / 2**truth_mip,
    width / 2**truth_mip)``, px at that mip), which is much cheaper than inverting at mip 0.
    """
    f = 2**truth_mip
    if z == 0:
        return torch.zeros(1, 2, height, width), torch.zeros(1, 2, height // f, width // f), None
    gen = np.random.default_rng(1000 + z)
    rotation = float(gen.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG))
    shift = (float(gen.uniform(-MAX_SHIFT_PX, MAX_SHIFT_PX)), float(gen.uniform(-MAX_SHIFT_PX, MAX_SHIFT_PX)))
    rigid = affine_field(height, width, rotation_deg=rotation, translation=shift)
    elastic = smooth_field(height, width, ELASTIC_PX, grid=4, seed=z)
    applied = compose(rigid, elastic)
    truth = true_alignment_field(resample_field(applied, 0, truth_mip), border=(int(MAX_SHIFT_PX) + 16) // f)
    mask = None
    if z == fold_section:
        fold, mask = fold_field(height, width, **FOLD)
        undo = fold_field(
            height // f,
            width // f,
            angle_deg=FOLD["angle_deg"],
            offset_px=(FOLD["offset_px"] - FOLD["fold_width_px"]) / f,
            fold_width_px=-FOLD["fold_width_px"] / f,
        )[0]
        applied = compose(fold, applied)
        truth = compose(truth, undo)
    return applied, truth, mask


def prepare_demo(
    root: str | os.PathLike[str],
    *,
    sections: int | None = None,
    crop: int | None = None,
    fold_section: int | None = FOLD_SECTION,
    blank_section: int | None = None,
    chunk: int = CHUNK[0],
    num_mips: int = NUM_MIPS,
    truth_mip: int = 2,
) -> dict[str, str]:
    """Steps 1-2: the registered, misaligned, defect-mask and true-field layers under ``root``.

    Args:
        sections: use the first ``sections`` bundled sections (default all 10).
        crop: use the central ``crop`` x ``crop`` px (default the full 1024 px).
        fold_section: the section with the fold (``None``: no fold).
        blank_section: optionally blank out one section (all zero) to show it is handled.
        chunk, num_mips: storage chunk (x, y px) and mips of the layers.
        truth_mip: the mip at which ``true_fields`` is written (the run's finetune mip: the report
            compares the final fields with it there); coarser mips are downsampled.

    Returns:
        ``{"registered", "misaligned", "defects", "true_fields"}`` layer paths.
    """
    root = os.path.abspath(os.fspath(root))
    files = sorted(Path(VNC_STACK_DIR).glob("*.png"))[: sections or None]
    paths = {
        name: "file://" + os.path.join(root, name) for name in ("registered", "misaligned", "true_fields")
    }
    paths["defects"] = "file://" + os.path.join(root, "masks", "defects")
    spec = {
        "files": [f.name for f in files],
        "crop": crop,
        "fold": fold_section,
        "blank": blank_section,
        "chunk": chunk,
        "num_mips": num_mips,
        "truth_mip": truth_mip,
        "shift": MAX_SHIFT_PX,
        "rot": MAX_ROTATION_DEG,
        "elastic": ELASTIC_PX,
        "fold_spec": FOLD,
    }
    marker = ChunkMarker(paths["misaligned"], "demo-misalign", "all", (), spec)
    if marker.is_done():
        return paths
    registered = import_stack(
        files,
        paths["registered"],
        resolution=VNC_RESOLUTION_NM,
        chunk_size=(chunk, chunk, 1),
        num_mips=num_mips,
    )
    full = registered.bounds(0)
    if crop:
        x0 = (full.shape[0] - crop) // 2 // 16 * 16
        y0 = (full.shape[1] - crop) // 2 // 16 * 16
        region = VoxelBox((x0, y0, 0), (x0 + crop, y0 + crop, full.stop[2]))
    else:
        region = full
    w, h, nz = region.shape
    geometry = {
        "resolution": VNC_RESOLUTION_NM,
        "size": (w, h, nz),
        "chunk_size": (chunk, chunk, 1),
        "num_mips": num_mips,
    }
    mis = create_layer(paths["misaligned"], kind="image", **geometry)
    defects = create_layer(paths["defects"], kind="mask", **geometry)
    truth_layer = create_layer(paths["true_fields"], kind="field", **geometry)
    for z in range(nz):
        section = VoxelBox((region.start[0], region.start[1], z), (region.stop[0], region.stop[1], z + 1))
        image = torch.from_numpy(registered.read(section, 0).astype(np.float32))
        applied, truth, mask = deformation(z, h, w, fold_section=fold_section, truth_mip=truth_mip)
        warped = warp(image, applied).round().clamp(0, 255).to(torch.uint8).numpy()
        if z == blank_section:
            warped[:] = 0
        box = VoxelBox((0, 0, z), (w, h, z + 1))
        mis.write(box, warped, 0)
        defects.write(box, (mask if mask is not None else torch.zeros(1, 1, h, w)).to(torch.uint8).numpy(), 0)
        truth_layer.write(truth_layer.bounds(truth_mip).intersection(
            VoxelBox((0, 0, z), (w, h, z + 1))), truth.numpy(), truth_mip)
    for layer, mip in ((mis, 0), (defects, 0), (truth_layer, truth_mip)):
        if mip < layer.num_mips - 1:
            layer.downsample(layer.bounds(mip), mip)
        layer.add_provenance(
            "sectionflow demo: bundled VNC stack misaligned by a known deformation (flows/demo.py)",
            spec,
            code_version(),
        )
    marker.mark_done()
    return paths


def demo_params(root: str | os.PathLike[str], paths: dict[str, str], **overrides: Any) -> AlignParams:
    """``configs/demo.yaml`` with the demo's layer paths filled in."""
    return load_params(
        DEMO_CONFIG,
        source=paths["misaligned"],
        defects=paths["defects"],
        true_fields=paths["true_fields"],
        output="file://" + os.path.join(os.path.abspath(os.fspath(root)), "aligned_run"),
        **overrides,
    )


def residual_line(summary: dict[str, Any]) -> str:
    """One line: residual and correlation before/after (for the CLI)."""
    parts = []
    if "residual_after_median_px" in summary:
        parts.append(
            f"residual vs truth {summary['residual_before_median_px']:.2f} -> "
            f"{summary['residual_after_median_px']:.2f} px (mip {summary.get('finetune_mip', '?')})"
        )
    cb, ca = summary.get("corr_before_mean"), summary.get("corr_after_mean")
    if cb is not None and not math.isnan(cb):
        parts.append(f"neighbour correlation {cb:.3f} -> {ca:.3f}")
    if "rotation_drift_deg" in summary:
        parts.append(
            f"rotation range {summary['rotation_drift_deg']:.3f} deg "
            f"(trend {summary.get('rotation_trend_deg', math.nan):+.3f}), non-affine p95 "
            f"{summary['non_affine_p95_mean_px']:.2f} px, seam ratio {summary['seam_ratio_median']:.2f}"
        )
    return "; ".join(parts)


def verdict_line(summary: dict[str, Any]) -> str:
    """The run's last line: how many sections are flagged and why, or that none is (for the CLI)."""
    flagged = summary.get("flagged") or {}
    if not flagged:
        return "no section flagged (see the report's stack-trust table)"
    ordered = sorted(flagged.items(), key=lambda kv: int(kv[0]))
    reasons = "; ".join(f"z={z}: {', '.join(r)}" for z, r in ordered)
    return f"{len(flagged)} sections flagged - check them before using the stack: {reasons}"
