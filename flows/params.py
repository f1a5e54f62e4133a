"""Flow parameters as pydantic models: validated before any work starts, rendered as forms in the UI.

:class:`AlignParams` holds everything the stage flows and ``align_stack`` need; every stage flow
takes the same model and uses its part, so one parameter file (``configs/*.yaml``) drives a whole
run or any single stage. :class:`DownsampleParams` drives the stand-alone ``downsample`` flow.

Units: ``bbox_nm`` in nm (xyz, half-open); mips are pyramid levels of the source layer (mip ``m`` =
``2**m`` downsampled in x, y); ``chunk_xy``, ``pad`` in px at the mip of the stage that uses them;
``sm`` is the finetuner's rigidity weight (dimensionless).

Validation (a ``pydantic.ValidationError`` naming the field and what to do): a missing source or
defect layer, mips outside the source's pyramid or in the wrong order, a processing chunk that is
not a multiple of the storage chunk, negative ``sm``, zero iterations, an empty bbox, ...
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from emcore.affine_solve import DEFAULT_DRIFT_SECTIONS_LINEAR, DEFAULT_DRIFT_SECTIONS_TRANSLATION
from emcore.errors import SectionflowError
from emcore.geometry import BBox, VoxelBox
from emcore.layers import Layer, open_layer
from emcore.mip_plan import choose_mips
from emcore.models import load_model
from emcore.models.refine import LEARNED_METHODS
from flows.validate import check_inputs

__all__ = ["AlignParams", "DownsampleParams", "load_params"]

Mip = Annotated[int, Field(ge=0, le=12)]

#: Stack-solve anchor: 1 pair's weight = a drift length of about 1 section for residual fields
#: (benchmarks/README.md, "Stack benchmark").
DEFAULT_ANCHOR = 1.0

#: The coarse stage reads whole sections at the coarse mip: the largest side it accepts (px).
#: A coarse pair of 4096^2 px sections needs about 13 GiB on its worker (measured per px:
#: emcore/task_memory.py); the run checks that against the workers' limit (flows.plan).
MAX_COARSE_PX = 4096


class AlignParams(BaseModel):
    """Parameters of the alignment pipeline (all stages)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str = Field(description="image layer to align (cloud path or local directory)")
    output: str = Field(description="output path; layers are named as in flows/layout.py")
    defects: str | None = Field(
        None, description="optional defect mask layer (nonzero = fold/crack), source frame"
    )
    detect_defects: Literal["auto", "none"] = Field(
        "auto",
        description='without a defects layer: "auto" (default) runs the shipped fold/crack detector on '
        "the normalized sections (at the first mip of 15-50 nm/px at or above finetune_mip and one mip "
        "coarser, united; none: skipped with a warning) and uses its mask, written to "
        '<out>/masks/detected, as the defects layer; "none" aligns without a mask; a mask layer path '
        "means defects=<that layer> (your own detector's mask, or one from an earlier run's "
        "<out>/masks/detected)",
    )
    true_fields: str | None = Field(
        None,
        description="optional ground-truth field layer G[z] (for the report's residual), at finetune_mip",
    )
    bbox_nm: tuple[tuple[float, float, float], tuple[float, float, float]] | None = Field(
        None, description="region to align, ((x0, y0, z0), (x1, y1, z1)) nm; default the whole source layer"
    )
    coarse_mip: Mip = Field(
        None,  # type: ignore[assignment]  # filled in from the source by _auto_mips
        description="mip of the coarse alignment (whole sections); default chosen from the source's "
        "resolution and section size (emcore/mip_plan.py: ~256 nm/px, at least 256 px per section)",
    )
    finetune_mip: Mip = Field(
        None,  # type: ignore[assignment]
        description="mip of the finetuner, the encodings and the final fields; default chosen from the "
        "source's resolution (emcore/mip_plan.py: the finest mip at >= 16 nm/px)",
    )
    render_mip: Mip = Field(0, description="finest mip rendered; coarser mips are downsampled from it")
    chunk_xy: int = Field(
        256,
        gt=0,
        description="processing chunk, px in x and y at the finetune mip (render chunks cover the same area)",
    )
    pad: int = Field(32, ge=0, description="context (px at the finetune mip) read around each chunk")
    neighbours: int = Field(2, ge=1, le=3, description="pairs z->z-1 .. z->z-neighbours per section")
    coarse_model: Literal["translation", "rigid", "affine"] = Field(
        "rigid",
        description='model of the classical coarse aligner (coarse_method "classical", "classical+refine")',
    )
    coarse_method: Literal["classical", "learned", "classical+refine"] = Field(
        "classical",
        description='coarse aligner: "classical" (FFT cross-correlation + patch fit, no model), "learned" '
        '(the shipped pyramid_aligner network) or "classical+refine" (classical, then the shipped '
        "pyramid_refiner network); the learned ones need coarse_mip within the model's trained resolution_nm "
        "(32-80 nm/px for the shipped ones)",
    )
    encoder: str = Field("none", description='"none", "auto" (by resolution) or a model name/path')
    # 200 (the published default), not emcore.finetune.DEFAULT_SM (3): between real neighbouring
    # sections a stiff field invents less deformation. Measured on the demo stack (residual vs truth,
    # mip 2, 2026-11-26 schedule): 2.45 px at sm 200, 2.91 at sm 30, 3.16 at sm 3 (neighbour
    # correlation 0.502 / 0.514 / 0.520: a softer field matches the next section's content better
    # and the truth worse); medulla neighbour pairs 0.68 vs 1.54 px at sm 200 vs 5 (first session,
    # benchmarks/README.md). The low sm wins only on same-section known-deformation cases.
    sm: float = Field(200.0, ge=0, allow_inf_nan=False, description="finetuner rigidity weight (>= 0)")
    num_iter: int = Field(300, gt=0, description="finetuner iterations per pyramid level (> 0)")
    drift_sections_linear: float = Field(
        DEFAULT_DRIFT_SECTIONS_LINEAR, gt=0,
        description="affine stack solve: prior length (sections) of the rotation/scale/shear part; a "
        "per-pair bias moves a section by about this many pairs' worth (see emcore/affine_solve.py)",
    )
    drift_sections_translation: float = Field(
        DEFAULT_DRIFT_SECTIONS_TRANSLATION, gt=0,
        description="affine stack solve: prior length (sections) of the translation part",
    )
    anchor: float = Field(
        DEFAULT_ANCHOR, ge=0, allow_inf_nan=False,
        description="stack solve: weight pulling each section's residual field towards 0 (per pixel, "
        "relative to one pair); stops non-affine drift along z",
    )
    solve_block_z: int = Field(
        64, gt=0, description="stack solve: sections per task (the solve is local in z thanks to the anchor)"
    )
    solve_overlap_z: int = Field(
        8, ge=0, description="stack solve: sections read beyond each block on both sides (context in z)"
    )
    smoothness: float = Field(0.0, ge=0, allow_inf_nan=False, description="stack-solve membrane weight")
    robust_px: float = Field(2.0, gt=0, allow_inf_nan=False, description="stack-solve Cauchy scale (px)")

    @model_validator(mode="before")
    @classmethod
    def _mask_named_by_detect_defects(cls, data: object) -> object:
        """``detect_defects: <layer>`` is ``defects: <layer>`` (checked as a mask like any ``defects``)."""
        if not isinstance(data, dict):
            return data
        named = data.get("detect_defects")
        if not isinstance(named, str) or named in ("auto", "none"):
            return data
        try:
            open_layer(named)
        except SectionflowError as exc:
            raise ValueError(
                f'detect_defects={named!r} is neither "auto" nor "none", so it names a mask layer: {exc}'
            ) from None
        given = data.get("defects")
        if given not in (None, named):
            raise ValueError(
                f"detect_defects={named!r} and defects={given!r} each name a defect mask: give one of them"
            )
        return {**data, "defects": named, "detect_defects": "none"}

    @model_validator(mode="before")
    @classmethod
    def _auto_mips(cls, data: object) -> object:
        """Fill in ``coarse_mip`` / ``finetune_mip`` left out (or ``None``/``"auto"``) from the source."""
        if not isinstance(data, dict):
            return data
        wanted = [n for n in ("coarse_mip", "finetune_mip") if data.get(n) in (None, "auto")]
        if not wanted or not isinstance(data.get("source"), str):
            return data
        try:
            layer = open_layer(data["source"])
        except SectionflowError:
            return data  # the after-validator reports the missing source
        coarse, finetune = choose_mips(layer.resolution(0)[0], layer.size(0)[:2], layer.num_mips)
        chosen = {"coarse_mip": coarse, "finetune_mip": finetune}
        given = data.get("finetune_mip")
        if "coarse_mip" in wanted and given not in (None, "auto"):
            chosen["coarse_mip"] = max(coarse, int(given))
        return {**data, **{n: chosen[n] for n in wanted}}

    @model_validator(mode="after")
    def _check_against_source(self) -> AlignParams:
        try:
            layer = open_layer(self.source)
        except SectionflowError as exc:
            raise ValueError(f"source: {exc}. Import the stack first (`sectionflow import-stack`).") from None
        top = layer.num_mips - 1
        for name in ("coarse_mip", "finetune_mip"):
            if getattr(self, name) is None:
                raise ValueError(f"{name} is missing and could not be chosen from the source")
        for name in ("coarse_mip", "finetune_mip", "render_mip"):
            if getattr(self, name) > top:
                raise ValueError(f"{name}={getattr(self, name)} but the source has mips 0..{top}")
        if not self.render_mip <= self.finetune_mip <= self.coarse_mip:
            raise ValueError(
                f"mips must satisfy render_mip <= finetune_mip <= coarse_mip, got {self.render_mip}, "
                f"{self.finetune_mip}, {self.coarse_mip}"
            )
        for mip in sorted({self.finetune_mip, self.render_mip}):
            try:
                layer.grid(mip).check_processing_chunk((self.chunk_at(mip), self.chunk_at(mip), 1))
            except SectionflowError as exc:
                raise ValueError(f"chunk_xy={self.chunk_xy} at mip {mip}: {exc}") from None
        if self.pad > self.chunk_xy:
            raise ValueError(f"pad={self.pad} must not exceed chunk_xy={self.chunk_xy} (context per side)")
        self._check_coarse_model_resolution(layer)
        self._check_coarse_section_fits(layer)
        for name in ("defects", "true_fields"):
            path = getattr(self, name)
            if path is not None:
                try:
                    open_layer(path)
                except SectionflowError as exc:
                    raise ValueError(f"{name}: {exc}") from None
        check_inputs(self, layer)
        if self.bbox_nm is not None:
            box = self.region(layer, 0)
            if box.is_empty:
                raise ValueError(f"bbox_nm {self.bbox_nm} does not overlap the source {layer.bbox}")
        return self

    def _check_coarse_section_fits(self, layer: Layer) -> None:
        """The coarse stage holds whole sections: at most ``MAX_COARSE_PX`` px per side."""
        side = max(self.region(layer, self.coarse_mip).shape[:2])
        if side > MAX_COARSE_PX:
            fits = next((m for m in range(self.coarse_mip, layer.num_mips)
                         if max(self.region(layer, m).shape[:2]) <= MAX_COARSE_PX), None)
            hint = f"use coarse_mip={fits} or coarser" if fits is not None else (
                "add coarser mips to the source (sectionflow downsample)")
            raise ValueError(
                f"coarse_mip={self.coarse_mip} gives sections of {side} px; the coarse stage holds whole "
                f"sections in memory, up to {MAX_COARSE_PX} px per side: {hint}"
            )

    def _check_coarse_model_resolution(self, layer: Layer) -> None:
        """A learned coarse method needs ``coarse_mip`` within its model's trained resolution range."""
        if self.coarse_method not in LEARNED_METHODS:
            return
        name = LEARNED_METHODS[self.coarse_method]
        lo, hi = load_model(name).config.resolution_nm
        nm = max(layer.resolution(self.coarse_mip)[:2])
        if not lo <= nm <= hi:
            fitting = [m for m in range(layer.num_mips) if lo <= max(layer.resolution(m)[:2]) <= hi]
            hint = f"coarse_mip in {fitting}" if fitting else "a source with such a mip"
            raise ValueError(
                f"coarse_method={self.coarse_method!r} uses {name}, trained for {lo:g}-{hi:g} nm/px, but "
                f"coarse_mip={self.coarse_mip} is {nm:g} nm/px: use {hint}, or coarse_method='classical'"
            )

    def chunk_at(self, mip: int) -> int:
        """The processing chunk side at ``mip``: ``chunk_xy`` scaled from the finetune mip (same area)."""
        return self.chunk_xy * 2 ** (self.finetune_mip - mip) if mip <= self.finetune_mip else self.chunk_xy

    def source_layer(self) -> Layer:
        return open_layer(self.source)

    def region(self, layer: Layer, mip: int) -> VoxelBox:
        """The region to process, voxels at ``mip``: ``bbox_nm`` covered outward, within the bounds."""
        if self.bbox_nm is None:
            return layer.bounds(mip)
        box = BBox(*self.bbox_nm).to_voxels(layer.resolution(mip), outward=True)
        return layer.grid(mip).align(box)

    def sections(self, layer: Layer) -> range:
        region = self.region(layer, 0)
        return range(region.start[2], region.stop[2])


class DownsampleParams(BaseModel):
    """Parameters of the stand-alone ``downsample`` flow."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    layer: str = Field(description="layer to fill")
    src_mip: Mip = Field(0, description="mip holding the data")
    dst_mip: Mip | None = Field(None, description="last mip to fill (default: the layer's top mip)")

    @model_validator(mode="after")
    def _check(self) -> DownsampleParams:
        try:
            layer = open_layer(self.layer)
        except SectionflowError as exc:
            raise ValueError(f"layer: {exc}") from None
        dst = layer.num_mips - 1 if self.dst_mip is None else self.dst_mip
        if not self.src_mip < dst <= layer.num_mips - 1:
            raise ValueError(
                f"need src_mip < dst_mip <= {layer.num_mips - 1} (layer mips), got {self.src_mip}, {dst}"
            )
        return self


def load_params(path: str | Path, **overrides: object) -> AlignParams:
    """Read :class:`AlignParams` from a YAML file, with ``overrides`` (non-None values) on top."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of parameter names to values")
    data.update({k: v for k, v in overrides.items() if v is not None})
    return AlignParams(**data)
