"""Alignment that tears: folds and cracks across the whole section, issue 16's benchmark.

Cases (real EM, exact truth): a section ``R`` (centre crop, normalized), the source
``warp(R', A)`` with ``A`` = :func:`emcore.synthetic.torn_fold_field` (a straight line at 30 deg,
10 % of the size off centre; beyond it the tissue moved ``width`` px across the line and ``d`` px
along it, leaving a band of ``width`` px between the sides: the defect mask, source frame), the
target ``warp(R, s)`` with a smooth 2 px elastic field ``s``; noise sigma 0.2 on both.

* ``fold d=...``: band ``size / 32`` px (16 px at 512 px), far side slid ``d`` px along the line;
  the band shows the dark, low-contrast overlay of two tissue layers that
  :mod:`emcore.synthetic_defects` draws for folds (``0.45 * mean(R'(q), A-moved R'(q)) - 2.25``,
  tissue std units).
* ``crack gap=...``: the far side pulled ``gap`` px away across the line (no slide); the gap holds
  bright resin (2.25 tissue std above the mean, + the noise), as resin-filled cracks in
  :mod:`emcore.synthetic_defects`. No pixel of the target reads the gap (the truth has no value
  there).
* ``crack gap=... empty`` (``--crack-fill zero``): the same crack whose gap holds no data (0), as
  ``crack_fill="zero"`` in :mod:`emcore.synthetic_defects`; no mask needs to mark it.

``R' = R`` for kind ``smooth``; for ``neighbour`` ``R'`` is the next section (real content
change, so its residual also holds the registered stack's own small misalignment). The truth is
``compose(s, truth_A)`` (``truth_A`` piecewise constant, exact); a pixel's side is that of
``p + s(p)``.

Methods (the first and the peers get the given mask; ``detected mask`` gets the detector's):

* ``sectionflow pieces + finetune``: :func:`emcore.coarse_pieces.coarse_align_pieces` (rigid),
  then :func:`emcore.finetune.finetune` on ``warp(src, coarse.field)`` (``src_defects`` =
  ``coarse.tear_mask(mask)``: the seam, the gap and the warped mask), composed back with
  ``coarse.compose_residual``;
* ``sectionflow pieces + finetune, detected mask``: the same, with the mask of the shipped
  detector (:func:`detected_mask`: the source downsampled to the detector's mip, chosen by
  :func:`tasks.detect.detection_mip` as the detect stage does, ``detect_defects_two_scales`` at its
  default threshold with the detect stage's length and contrast rules, repeated back to full size pixel by
  pixel as ``tasks.detect`` writes finer mips; ``--detector`` another detector's config);
* ``sectionflow pieces + finetune, no mask``: the same without a mask (only the no-data tears);
* the three above follow :mod:`tasks.coarse`: the coarse step runs ``--coarse-mips`` mips above the
  case (default 0; the images by the pyramid's mean over the data, masks by max), with the no-data
  tears of :func:`tasks.coarse.defects_with_tears` seen at :func:`tasks.coarse.tear_mip`
  (``--no-tears``: without them, the coarse stage before issue 16's no-data fix), piece by piece
  where :func:`tasks.coarse.tissue_splits` says a section splits, else one rigid
  :func:`~emcore.coarse_xcorr.coarse_align` fit upsampled and finetuned from;
* ``sectionflow rigid + finetune``: one :func:`emcore.coarse_xcorr.coarse_align` rigid fit, then
  the finetuner from it (the path for sections without a split);
* ``elastix rigid+grid32`` (:mod:`benchmarks.peers`, when itk-elastix imports): no mask input;
  the masked pixels are zeroed in the source;
* ``SOFIMA`` (:func:`benchmarks.peers.sofima_field`, when it imports): the mask is passed to its
  masked cross-correlation as the source's invalid pixels (``post_mask``); its elastic mesh
  cannot tear.

Columns (px at the case's mip):

* residual ``|field - truth|`` per side (near = kept in place, far = moved): median / p95 over the
  target pixels whose true source position is more than 16 px from the mask (distance in the
  source), 16 px border excluded, only where the truth reads source data; ``worst side`` = the
  larger median / the larger p95 of the two sides;
* ``corr near / far mask``: median Pearson of the aligned source with the target over tiles of
  ``size / 16`` px (the correlation window, 32 px at 512 px) within 3 windows of the mask (a tile's
  closest pixel, distance as above) and over the farther tiles, and their ratio (target >= 0.9);
* ``Jacobian out %``: :func:`emcore.stack_quality.jacobian_outliers` (det J < 0.5 or > 2) over the
  pixels outside the mask and the torn seam: those whose true source position is more than 4 px
  from the mask (the seam, where the truth itself jumps, lies on the mask's edge), where the truth
  reads source data;
* ``coarse``: the coarse field's per-side median; ``s``: seconds of the method (one CPU thread).

After the table, ``detected vs given``: per case the detected mask's IoU with the true band (and
its area in px against the band's) and the ratio of the detected-mask row's worst-side median and
p95 to the given-mask row's (target <= 1.5).

    .venv/bin/python -m benchmarks.bench_folds --quick   # bundled VNC, 256 px: fold d=60, crack gap=20
    .venv/bin/python -m benchmarks.bench_folds           # shared VNC (mip 1) + medulla, every case
    .venv/bin/python -m benchmarks.bench_folds --datasets vnc --slides 150 --gaps ""   # a part of it
    .venv/bin/python -m benchmarks.bench_folds --slides "" --gaps 10,40 \
        --methods "sectionflow pieces + finetune;sectionflow pieces + finetune, detected mask"  # cracks
    .venv/bin/python -m benchmarks.bench_folds --slides "" --gaps 10,20,40 --crack-fill zero \
        --coarse-mips 3   # empty cracks, the coarse step 3 mips up (add --no-tears: before the fix)
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from benchmarks.cases import NOISE_SIGMA, load_sections
from emcore.affine import rescale_matrix
from emcore.coarse_pieces import PiecewiseAlignment, coarse_align_pieces
from emcore.coarse_xcorr import coarse_align
from emcore.field import compose, resample_field, warp, warp_mask
from emcore.finetune import finetune
from emcore.models import load_model
from emcore.models.detect import MIN_BRIGHT_CONTRAST, MIN_DEFECT_LENGTH_NM, detect_defects_two_scales
from emcore.normalize import normalize, section_stats
from emcore.pyramid import downsample_image_torch, downsample_mask_torch
from emcore.quality import tile_correlation
from emcore.stack_quality import jacobian_outliers
from emcore.synthetic import smooth_field, torn_fold_field
from emcore.torn_sections import piecewise_affine_field
from tasks.coarse import defects_with_tears, tear_mip, tissue_splits
from tasks.detect import DETECTOR, detection_mip

ANGLE = 30.0
BORDER = 16
#: Residual: target pixels whose true source position is within this many px of the mask are left out.
MASK_MARGIN = 16.0
#: Jacobian: the seam, pixels whose true source position is within this many px of the mask.
SEAM_MARGIN = 4.0
#: Correlation: tiles within this many windows of the mask are "near".
NEAR_WINDOWS = 3
FOLD_CONTRAST, FOLD_DARKNESS = 0.45, 2.25
RESIN_LEVEL = 2.25
KINDS = ("smooth", "neighbour")
CRACK_FILLS = ("resin", "zero")


@dataclass(frozen=True)
class FoldCase:
    """One pair and its truth; arrays ``(S, S)`` unless said."""

    name: str
    src: torch.Tensor  # (1, 1, S, S) normalized source with the defect
    tgt: torch.Tensor  # (1, 1, S, S)
    mask: torch.Tensor  # bool, source frame: the band / gap
    truth: torch.Tensor  # (1, 2, S, S) px
    far: np.ndarray  # bool, target frame: the moved side
    dist: np.ndarray  # float, target frame: px from the true source position to the mask
    keep: np.ndarray  # bool: residual pixels
    jac: np.ndarray  # bool: Jacobian pixels
    window: int  # correlation tile, px
    resolution_nm: float  # of the case's pixels


def _normalized(section: np.ndarray) -> torch.Tensor:
    stats = section_stats(section)
    return torch.from_numpy(normalize(section.astype(np.float32), stats.mean, stats.std))[None, None]


def _noisy(image: torch.Tensor, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    out = image + NOISE_SIGMA * torch.randn(image.shape, generator=gen)
    out = torch.where(image != 0, out, torch.zeros_like(out))
    return torch.where((image != 0) & (out == 0), torch.full_like(out, 1e-6), out)


def make_fold_case(
    name: str,
    section: np.ndarray,
    moving: np.ndarray,
    *,
    defect: str = "fold",
    slide: float = 0.0,
    width: float | None = None,
    resolution_nm: float,
    seed: int = 0,
    crack_fill: str = "resin",
) -> FoldCase:
    """One case from two ``(S, S)`` sections (``moving`` = ``section`` for kind ``smooth``).

    ``defect`` ``"fold"`` (band ``width`` px, default ``S / 32``, far side slid ``slide`` px) or
    ``"crack"`` (gap ``width`` px across the line, ``slide`` along it, holding ``crack_fill``: ``"resin"``
    (bright) or ``"zero"`` (no data)).
    """
    if defect not in ("fold", "crack"):
        raise ValueError(f"defect must be 'fold' or 'crack', got {defect!r}")
    if crack_fill not in CRACK_FILLS:
        raise ValueError(f"crack_fill must be one of {CRACK_FILLS}, got {crack_fill!r}")
    size = section.shape[0]
    width = size / 32 if width is None else float(width)
    offset = 0.1 * size
    applied, mask, truth_a = torn_fold_field(
        size, size, angle_deg=ANGLE, offset_px=offset, fold_width_px=width, slide_px=slide
    )
    smooth = smooth_field(size, size, 2.0, seed=seed)
    reg, mov = _normalized(section), _normalized(moving)
    moved = warp(mov, applied)
    if defect == "fold":
        fill = FOLD_CONTRAST * 0.5 * (mov + moved) - FOLD_DARKNESS
    else:
        fill = torch.full_like(moved, RESIN_LEVEL if crack_fill == "resin" else 0.0)
    src = _noisy(torch.where(mask, fill, moved), 1000 + seed)
    tgt = _noisy(warp(reg, smooth), 2000 + seed)
    truth = compose(smooth, truth_a)
    nx, ny = math.cos(math.radians(ANGLE)), math.sin(math.radians(ANGLE))
    c = (size - 1) / 2.0
    ys, xs = np.meshgrid(np.arange(size) - c, np.arange(size) - c, indexing="ij")
    far_reg = torch.from_numpy(xs * nx + ys * ny - offset >= 0)[None, None]
    far = warp_mask(far_reg, smooth)[0, 0].numpy()
    to_mask = torch.from_numpy(ndimage.distance_transform_edt(~mask[0, 0].numpy()).astype(np.float32))
    dist = warp(to_mask[None, None], truth)[0, 0].numpy()
    reads = warp((src != 0).float(), truth)[0, 0].numpy() > 0.999
    keep = reads & (dist > MASK_MARGIN)
    keep[:BORDER] = keep[-BORDER:] = False
    keep[:, :BORDER] = keep[:, -BORDER:] = False
    jac = reads & (dist > SEAM_MARGIN)
    return FoldCase(name, src, tgt, mask[0, 0], truth, far, dist, keep, jac, max(8, size // 16),
                    resolution_nm)  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scores:
    """One method on one case (px; correlations dimensionless; ``jacobian`` a fraction)."""

    near: tuple[float, float]  # median, p95
    far: tuple[float, float]
    corr_near: float
    corr_far: float
    jacobian: float

    @property
    def worst(self) -> tuple[float, float]:
        return max(self.near[0], self.far[0]), max(self.near[1], self.far[1])


def side_stats(field: torch.Tensor, case: FoldCase) -> dict[str, tuple[float, float]]:
    """``{"near"|"far": (median, p95)}`` of ``|field - truth|`` px over ``case.keep``."""
    err = (field.double() - case.truth.double())[0].norm(dim=0).numpy()
    out = {}
    for side, sel in (("near", ~case.far), ("far", case.far)):
        values = err[sel & case.keep]
        out[side] = (float(np.median(values)), float(np.percentile(values, 95)))
    return out


def mask_correlation(field: torch.Tensor, case: FoldCase) -> tuple[float, float]:
    """Median tile correlation of ``warp(src, field)`` with the target near / far from the mask."""
    aligned = warp(case.src, field)[0, 0].numpy()
    tiles = tile_correlation(aligned, case.tgt[0, 0].numpy(), tile=case.window).tiles
    w, (h, width) = case.window, case.dist.shape
    ty, tx = tiles.shape
    padded = np.full((ty * w, tx * w), np.inf)
    padded[:h, :width] = case.dist
    closest = padded.reshape(ty, w, tx, w).min(axis=(1, 3))
    near = closest <= NEAR_WINDOWS * w
    return float(np.nanmedian(tiles[near])), float(np.nanmedian(tiles[~near]))


def score(field: torch.Tensor, case: FoldCase) -> Scores:
    stats = side_stats(field, case)
    corr_near, corr_far = mask_correlation(field, case)
    jac = jacobian_outliers(field, torch.from_numpy(case.jac)).outside
    return Scores(stats["near"], stats["far"], corr_near, corr_far, jac)


# ----------------------------------------------------------------------------------------------
# The detector's mask
# ----------------------------------------------------------------------------------------------


#: The detector bench_folds runs (``--detector``: a config path instead of the shipped one).
_DETECTOR_MODEL = {"name": DETECTOR}


def detected_mask(src: torch.Tensor, resolution_nm: float) -> torch.Tensor:
    """The shipped detector's mask ``(S, S)`` bool for a normalized ``(1, 1, S, S)`` source.

    The detect stage's recipe: the mip is :func:`tasks.detect.detection_mip` of the source's
    pyramid (2x per mip, :func:`emcore.pyramid.downsample_image_torch` as the normalized layer's
    mips are made), :func:`emcore.models.detect.detect_defects_two_scales` there (and one mip
    coarser, united) at its default threshold with the stage's length rule
    (:data:`~emcore.models.detect.MIN_DEFECT_LENGTH_NM`) and contrast rule
    (:data:`~emcore.models.detect.MIN_BRIGHT_CONTRAST`), and the mask repeated pixel by pixel back
    to the source's size.
    """
    size = src.shape[-2:]
    mip = detection_mip([resolution_nm * 2**k for k in range(10)], 0)
    if mip is None:
        raise ValueError(f"no mip of a {resolution_nm} nm/px source is in the detector's range")
    image = src
    for _ in range(mip):
        image = downsample_image_torch(image)
    small = detect_defects_two_scales(image, load_model(_DETECTOR_MODEL["name"]), resolution_nm * 2**mip,
                                      min_length_nm=MIN_DEFECT_LENGTH_NM,
                                      min_bright_contrast=MIN_BRIGHT_CONTRAST)  # fmt: skip
    f = 2**mip
    return small.repeat_interleave(f, 2).repeat_interleave(f, 3)[0, 0, : size[0], : size[1]]


_DETECTED: dict[str, torch.Tensor] = {}


def _detected(case: FoldCase) -> torch.Tensor:
    if case.name not in _DETECTED:
        _DETECTED[case.name] = detected_mask(case.src, case.resolution_nm)
    return _DETECTED[case.name]


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    union = int((a | b).sum())
    return float((a & b).sum()) / union if union else 1.0


# ----------------------------------------------------------------------------------------------
# Methods: case -> (coarse field or None, field, note)
# ----------------------------------------------------------------------------------------------

Method = Callable[[FoldCase], tuple[torch.Tensor | None, torch.Tensor, str]]


#: The coarse step (``--coarse-mips``, ``--no-tears``): how many mips above the case's the pieces
#: methods run it (the pipeline's coarse mip above its finetune mip), and whether no-data tears are
#: looked for (:func:`tasks.coarse.defects_with_tears` at :func:`tasks.coarse.tear_mip`, as the
#: coarse stage does; ``False`` = the coarse stage before issue 16's no-data fix).
_COARSE = {"mips": 0, "tears": True}


def _down(image: torch.Tensor, mips: int, *, mask: bool = False) -> torch.Tensor:
    """``image`` ``(1, 1, H, W)`` ``mips`` mips coarser by the pyramid's rules (image: mean over the
    data; mask: max)."""
    for _ in range(mips):
        image = downsample_mask_torch(image) if mask else downsample_image_torch(image)
    return image


def _coarse_defects(image: torch.Tensor, mask: torch.Tensor | None, mips: int,
                    resolution_nm: float) -> tuple[torch.Tensor | None, bool]:  # fmt: skip
    """The coarse stage's defect mask of one section ``mips`` mips above the case's: ``mask`` (case
    frame) max-downsampled, united with the no-data tears seen at :func:`tasks.coarse.tear_mip`;
    and whether no data split the section there (:func:`tasks.coarse.defects_with_tears`)."""
    coarse_mask = None if mask is None else _down(mask.float()[None, None], mips, mask=True)[0, 0]
    if not _COARSE["tears"]:
        return coarse_mask, False
    coarse = _down(image, mips)
    fine_mip = tear_mip([resolution_nm * 2**m for m in range(mips + 1)], mips, tuple(coarse.shape[-2:]))
    return defects_with_tears(_down(image, fine_mip)[0, 0], 2 ** (mips - fine_mip), coarse_mask)


def _upsampled(coarse: PiecewiseAlignment, mips: int, shape: tuple[int, int]) -> PiecewiseAlignment:
    """``coarse`` (at ``mips`` mips above the case) at the case's mip: each piece's matrix rescaled
    (:func:`emcore.affine.rescale_matrix`), the piece map repeated pixel by pixel, and the field
    evaluated exactly from them (:func:`emcore.torn_sections.piecewise_affine_field`)."""
    if mips == 0:
        return coarse
    f = 2**mips
    h, w = shape
    mats = [rescale_matrix(t.matrix, mips, 0) for t in coarse.transforms]
    assignment = np.repeat(np.repeat(coarse.assignment, f, 0), f, 1)[:h, :w]
    gap = np.repeat(np.repeat(coarse.gap, f, 0), f, 1)[:h, :w]
    seam = np.zeros((h, w), dtype=bool)
    dy, dx = assignment[1:] != assignment[:-1], assignment[:, 1:] != assignment[:, :-1]
    seam[1:] |= dy
    seam[:-1] |= dy
    seam[:, 1:] |= dx
    seam[:, :-1] |= dx
    return replace(
        coarse, field=piecewise_affine_field(mats, coarse.assignment, f, (0, 0), shape), matrix=mats[0],
        transforms=[replace(t, matrix=m) for t, m in zip(coarse.transforms, mats, strict=True)],
        assignment=assignment, gap=gap, seam=seam,
    )  # fmt: skip


def _pieces_with(case: FoldCase, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, str]:
    """The pipeline's recipe (:mod:`tasks.coarse`): piece by piece where the masks (with the no-data
    tears) split a section, else one rigid fit; then the finetuner at the case's mip."""
    k = _COARSE["mips"]
    src_c, tgt_c = _down(case.src, k), _down(case.tgt, k)
    src_mask, src_nodata = _coarse_defects(case.src, mask, k, case.resolution_nm)
    tgt_mask, tgt_nodata = _coarse_defects(case.tgt, None, k, case.resolution_nm)
    if not (tissue_splits(src_c, src_mask, src_nodata) or tissue_splits(tgt_c, tgt_mask, tgt_nodata)):
        whole = coarse_align(src_c, tgt_c, src_mask=src_mask, tgt_mask=tgt_mask, model="rigid")
        field = resample_field(whole.field, k, 0) if k else whole.field
        defects = None if mask is None else warp_mask(mask[None, None], field)
        result = finetune(warp(case.src, field), case.tgt, src_defects=defects, max_motion=8.0)
        return field, compose(result.field, field), "1 piece (no split seen)"
    coarse = coarse_align_pieces(src_c, tgt_c, src_mask, tgt_mask)
    coarse = _upsampled(coarse, k, tuple(case.src.shape[-2:]))
    moved = warp(case.src, coarse.field)
    result = finetune(moved, case.tgt, src_defects=coarse.tear_mask(mask), max_motion=8.0)
    note = f"{coarse.pieces.count} pieces" + (f"; {coarse.reason}" if coarse.reason else "")
    return coarse.field, coarse.compose_residual(result.field), note


def _pieces(case: FoldCase) -> tuple[torch.Tensor, torch.Tensor, str]:
    return _pieces_with(case, case.mask)


def _pieces_detected(case: FoldCase) -> tuple[torch.Tensor, torch.Tensor, str]:
    return _pieces_with(case, _detected(case))


def _pieces_no_mask(case: FoldCase) -> tuple[torch.Tensor, torch.Tensor, str]:
    return _pieces_with(case, None)


def _rigid(case: FoldCase) -> tuple[torch.Tensor, torch.Tensor, str]:
    coarse = coarse_align(case.src, case.tgt, src_mask=case.mask, model="rigid")
    result = finetune(case.src, case.tgt, init_field=coarse.field, src_defects=case.mask[None, None])
    return coarse.field, result.field, coarse.reason


def _elastix(case: FoldCase) -> tuple[None, torch.Tensor, str]:
    from benchmarks.peers import elastix_field

    src = case.src[0, 0].numpy().copy()
    src[case.mask.numpy()] = 0.0
    return None, elastix_field(src, case.tgt[0, 0].numpy(), parameter_map="rigid+grid32"), "mask zeroed"


def _sofima(case: FoldCase) -> tuple[None, torch.Tensor, str]:
    from benchmarks.peers import sofima_field

    field = sofima_field(case.src[0, 0].numpy(), case.tgt[0, 0].numpy(), src_mask=case.mask.numpy())
    return None, field, "mask as post_mask"


GIVEN = "sectionflow pieces + finetune"
DETECTED = "sectionflow pieces + finetune, detected mask"
NO_MASK = "sectionflow pieces + finetune, no mask"
SOFIMA = "SOFIMA (patch 64, step 8)"


def methods() -> dict[str, Method]:
    """The methods by name (the peers only when they import)."""
    from benchmarks.peers import sofima_available

    out: dict[str, Method] = {GIVEN: _pieces, DETECTED: _pieces_detected, NO_MASK: _pieces_no_mask}
    out["sectionflow rigid + finetune"] = _rigid
    try:
        import itk  # noqa: F401

        out["elastix rigid+grid32"] = _elastix
    except ImportError:
        print("itk-elastix not importable: elastix skipped")
    if sofima_available():
        out[SOFIMA] = _sofima
    else:
        print("sofima not importable (see benchmarks/peers.py): SOFIMA skipped")
    return out


# ----------------------------------------------------------------------------------------------
# Cases and the run
# ----------------------------------------------------------------------------------------------


def _cases(
    quick: bool, slides: list[float], gaps: list[float], datasets: list[str], kinds: list[str],
    crack_fills: tuple[str, ...] = ("resin",),
) -> list[FoldCase]:
    if quick:
        stack = load_sections("bundled", [3, 4], 1024)
        small = F.avg_pool2d(torch.from_numpy(stack).float()[:, None], 4)[:, 0].numpy()
        sets = [("bundled vnc z3 mip2", small, 18.4)]
    else:
        sets = []
        if "vnc" in datasets:
            vnc = torch.from_numpy(load_sections("vnc", [4, 5], 1024)).float()[:, None]
            sets.append(("vnc z4 mip1", F.avg_pool2d(vnc, 2)[:, 0].numpy(), 9.2))
        if "medulla" in datasets:
            sets.append(("medulla z4 mip0", load_sections("medulla", [4, 5], 512).astype(np.float32), 10.0))
    defects = [("fold", f"fold d={d:g}", d, None, "resin") for d in slides]
    defects += [("crack", f"crack gap={g:g}" + (" empty" if fill == "zero" else ""), 0.0, g, fill)
                for fill in crack_fills for g in gaps]  # fmt: skip
    cases = []
    for label, stack, res in sets:
        for defect, text, slide, width, fill in defects:
            for kind in kinds:
                moving = stack[0] if kind == "smooth" else stack[1]
                cases.append(make_fold_case(f"{label} {text} {kind}", stack[0], moving, defect=defect,
                                            slide=slide, width=width, resolution_nm=res,
                                            crack_fill=fill))  # fmt: skip
    return cases


def _floats(text: str) -> list[float]:
    return [float(s) for s in text.split(",") if s.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="bundled VNC at 256 px: fold d=60, crack gap=20")
    parser.add_argument("--slides", default=None, help="comma-separated fold slides d px (default 20,60,150)")
    parser.add_argument("--gaps", default=None, help="comma-separated crack gaps px (default 10,40)")
    parser.add_argument("--kinds", default=",".join(KINDS), help="comma-separated smooth, neighbour")
    parser.add_argument("--methods", default=None, help="';'-separated subset of the method names")
    parser.add_argument("--datasets", default="vnc,medulla", help="full mode: comma-separated vnc, medulla")
    parser.add_argument("--detector", default=DETECTOR, help="detector: shipped name or config path")
    parser.add_argument("--crack-fill", default="resin",
                        help="comma-separated crack gap fills: resin (bright), zero (no data, 'empty')")
    parser.add_argument("--coarse-mips", type=int, default=0,
                        help="run the pieces methods' coarse step this many mips above the case's")
    parser.add_argument("--no-tears", action="store_true",
                        help="coarse step without the no-data tears (the coarse stage before the fix)")
    args = parser.parse_args()
    _DETECTOR_MODEL["name"] = args.detector
    fills = tuple(f.strip() for f in args.crack_fill.split(",") if f.strip())
    if not fills or any(f not in CRACK_FILLS for f in fills):
        parser.error(f"--crack-fill: expected some of {CRACK_FILLS}, got {args.crack_fill!r}")
    if args.coarse_mips < 0:
        parser.error(f"--coarse-mips must be >= 0, got {args.coarse_mips}")
    _COARSE.update(mips=args.coarse_mips, tears=not args.no_tears)
    torch.set_num_threads(1)
    slides = _floats(args.slides if args.slides is not None else ("60" if args.quick else "20,60,150"))
    gaps = _floats(args.gaps if args.gaps is not None else ("20" if args.quick else "10,40"))
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        parser.error(f"--kinds: unknown {bad}; expected some of {KINDS}")
    table = methods()
    if args.methods:
        wanted = [m.strip() for m in args.methods.split(";") if m.strip()]
        unknown = [m for m in wanted if m not in table]
        if unknown:
            parser.error(f"--methods: unknown or unavailable {unknown}; available: {list(table)}")
        table = {k: v for k, v in table.items() if k in wanted}
    columns = ["case", "method", "coarse near / far median", "near median / p95", "far median / p95",
               "worst side median / p95", "corr near / far mask (ratio)", "Jacobian out %", "s"]  # fmt: skip
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    summary = []
    for case in _cases(args.quick, slides, gaps, args.datasets.split(","), kinds, fills):
        rows: dict[str, Scores] = {}
        for name, method in table.items():
            start = time.perf_counter()
            coarse, field, _ = method(case)
            seconds = time.perf_counter() - start
            s = rows[name] = score(field, case)
            coarse_text = "-"
            if coarse is not None:
                c = side_stats(coarse, case)
                coarse_text = f"{c['near'][0]:.2f} / {c['far'][0]:.2f}"
            ratio = s.corr_near / s.corr_far if s.corr_far > 0 else float("nan")
            print(
                f"| {case.name} | {name} | {coarse_text} | {s.near[0]:.2f} / {s.near[1]:.2f} | "
                f"{s.far[0]:.2f} / {s.far[1]:.2f} | {s.worst[0]:.2f} / {s.worst[1]:.2f} | "
                f"{s.corr_near:.3f} / {s.corr_far:.3f} ({ratio:.2f}) | {100 * s.jacobian:.2f} | "
                f"{seconds:.1f} |",
                flush=True,
            )
        if DETECTED in rows or NO_MASK in rows:
            det = _detected(case) if DETECTED in rows else None
            summary.append((case.name, det, case.mask, rows.get(GIVEN), rows.get(DETECTED),
                            rows.get(NO_MASK)))  # fmt: skip
    if summary:
        print("\ndetected / no mask vs given mask (ratio = the row's worst side / the given mask's)\n")
        print("| case | IoU with the band | detected / band px | worst median given -> detected (x) "
              "| worst p95 given -> detected (x) | worst median / p95 no mask (x) |")  # fmt: skip
        print("|---|---|---|---|---|---|")

        def cell(given: Scores | None, other: Scores | None, i: int) -> str:
            if other is None:
                return "-"
            if given is None:
                return f"- -> {other.worst[i]:.2f}"
            x = other.worst[i] / given.worst[i] if given.worst[i] > 0 else float("nan")
            return f"{given.worst[i]:.2f} -> {other.worst[i]:.2f} ({x:.2f})"

        for name, det, band, given, detected, plain in summary:
            overlap = f"{iou(det, band):.3f}" if det is not None else "-"
            marked = f"{int(det.sum())} / {int(band.sum())}" if det is not None else "-"
            nomask = "-"
            if plain is not None:
                ratios = [plain.worst[i] / given.worst[i] if given is not None and given.worst[i] > 0
                          else float("nan") for i in (0, 1)]  # fmt: skip
                nomask = f"{plain.worst[0]:.2f} / {plain.worst[1]:.2f} ({ratios[0]:.2f} / {ratios[1]:.2f})"
            cells = f"{cell(given, detected, 0)} | {cell(given, detected, 1)}"
            print(f"| {name} | {overlap} | {marked} | {cells} | {nomask} |", flush=True)

if __name__ == "__main__":
    main()
