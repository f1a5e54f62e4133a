"""Coarse-to-fine schedule: run the Adam finetuner over a mip pyramid, coarsest level first.

Why: Adam moves a field by about ``lr`` px per step and the loss only sees misalignments within
the bilinear footprint, so a single run at full resolution needs many steps and can't capture shifts
much beyond ~2 px. On a pyramid (e.g. mips 3, 2, 1, 0 relative to the input: 8x, 4x, 2x, 1x
downsampled) a 30 px shift is ~4 px at the coarsest level, and most iterations run on small
images.

Per level (all in px at that level's mip):

1. images: ``emcore.pyramid.downsample_image_torch`` (2x2 mean over data pixels, 0 = no data kept,
   on the images' device), defect masks: ``emcore.pyramid.downsample_mask_torch`` (max), both
   applied once per mip step;
2. the starting field is the previous level's result upsampled with
   :func:`emcore.field.resample_field` (values x2 per mip) - or, at the first level, ``init_field``
   downsampled with it (2x2 mean, values halved per mip);
3. :func:`emcore.finetune.optimizer.adam_finetune` with that level's settings: a per-pixel field,
   or (``Level.field_mip``) a control grid upsampled to the level's mip for the loss, and
   optionally (``Level.jitter``) a target pre-sampled at fixed random sub-pixel offsets
   (:func:`emcore.finetune.jitter.jittered_target`).

The default schedule (:func:`default_levels`, measured in benchmarks/README.md) is per-pixel levels
from the top mip down to mip 2, then the loss at mip 0 with jitter 1 px and the field on a control
grid at mip 4 (16 px cells) smoothed by the bending energy (:mod:`emcore.finetune.bending`), plus
a detail field at mip 2 near defects so the field can tear at folds and cracks. The bending
weight of that level is chosen per item on held-out pixels (``Level.bending_candidates``,
:mod:`emcore.finetune.selection`): stiff (5e3) unless a softer fit predicts the held-out
blocks better and the residual is at the images' noise level (the softer fits penalize the
fourth derivatives instead of the second, weights 3e6 or 1e6, ``Level.candidate_order``); such
pairs (the residual is noise) are fitted on both images pre-filtered by a Gaussian of 0.5 px
(``Level.prefilter``,
:mod:`emcore.finetune.prefilter`), pairs whose content differs on the images as they are; the
pairs that take the soft weight are refitted with it on every pixel under two more jitter seeds
and get the mean field (``Level.refits``). The
depth (top mip) follows the chunk size and the motion to capture (:func:`pyramid_depth`).

The last level's field is resampled to the input mip (mip 0) if the last level is coarser.

Shapes: ``H`` and ``W`` must be divisible by ``2 ** max(mip)``; :func:`pyramid_mips` picks the
mips that fit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import partial

import torch

from emcore.field import resample_field
from emcore.finetune.bending import MAX_ORDER
from emcore.finetune.bending_choice import select_bending
from emcore.finetune.jitter import jittered_target
from emcore.finetune.losses import prepare_masks
from emcore.finetune.optimizer import AdamSchedule, LevelOutcome, adam_finetune
from emcore.finetune.parameters import defect_neighbourhood
from emcore.pyramid import downsample_image_torch, downsample_mask_torch

__all__ = [
    "CAPTURE_PX",
    "DEFAULT_BENDING",
    "DEFAULT_BENDING_CANDIDATES",
    "DEFAULT_CANDIDATE_ORDER",
    "DEFAULT_FIELD_MIP",
    "DEFAULT_GRID_LR",
    "DEFAULT_GRID_SM_FACTOR",
    "DEFAULT_JITTER",
    "DEFAULT_PREFILTER",
    "DEFAULT_REFITS",
    "DEFAULT_SMOOTH_FIELD_MIP",
    "DETAIL_RADIUS",
    "MAX_PREFILTER",
    "MAX_REFITS",
    "MIN_AUTO_LEVELS",
    "Level",
    "coarse_to_fine",
    "default_levels",
    "downsample_images",
    "downsample_masks",
    "jittered_target",
    "pyramid_depth",
    "pyramid_mips",
]


#: Largest accepted :attr:`Level.prefilter` sigma, px (beyond ~1 px the blur removes the texture
#: that carries the displacement: sigma 1.0 lost on every strain pair, benchmarks/README.md).
MAX_PREFILTER = 2.0
#: Most accepted :attr:`Level.refits` (each is one more fit of the soft items).
MAX_REFITS = 8


@dataclass(frozen=True)
class Level:
    """One pyramid level of the schedule; ``None`` settings take the call's defaults.

    Attributes:
        mip: downsampling relative to the input (0 = input resolution, ``k`` = ``2**k`` times
            smaller).
        num_iter, lr, patience, max_halvings: :class:`~emcore.finetune.optimizer.AdamSchedule`
            settings for this level (``lr`` in px at this level's mip; ``None``: the base lr
            times ``2**mip``, i.e. the base lr is the step at mip 0).
        sm: rigidity weight for this level.
        field_mip: the mip at which this level's field is parametrized (``None``: ``mip``, one
            vector per pixel). ``field_mip > mip`` optimizes a control grid ``2**(field_mip - mip)``
            times coarser, upsampled bilinearly to ``mip`` where the loss is evaluated: the loss
            sees every pixel, but the field cannot fit the noise pixel by pixel.
        jitter: sampling jitter in px at ``mip`` (0 = off, at most 1): the MSE compares the source
            at ``p + d(p) + field(p)`` with the target pre-sampled at ``p + d(p)``, ``d`` a fixed
            random offset per pixel, uniform in ``[-jitter/2, jitter/2]^2``. Without it, bilinear
            sampling of a noisy source at a fractional position averages the noise (its variance
            drops to 1/4 at a half pixel), so the MSE prefers fractional positions and biases the
            field by a smooth pattern that follows ``frac(field)``; with random offsets on both
            sides that preference averages out (measured on real EM, benchmarks/README.md).
        bending: weight of the bending energy of the optimized field (control grid or per-pixel
            field; :func:`emcore.finetune.bending.bending_energy` in px at ``mip``), 0 = off. It
            smooths without penalizing affine motion; a stiff term for Adam, so pair it with a small
            ``lr`` (see :data:`DEFAULT_GRID_LR`).
        detail_mip: with a control grid, the mip of a local detail field that is active within
            :data:`DETAIL_RADIUS` grid cells of a defect (target defects and the source defects pulled
            through the level's starting field), so the field can tear there
            (:mod:`emcore.finetune.parameters`); ``None`` or no defect masks in the call: off.
            ``mip <= detail_mip < field_mip``.
        bending_candidates: softer bending weights tried after ``bending`` (each fit starting from
            the previous one); each item keeps the fit with the lowest MSE on held-out blocks
            (:mod:`emcore.finetune.selection`). Empty: one fit with ``bending`` on every pixel.
        prefilter: with ``bending_candidates``, the sigma (px at ``mip``, 0 = off) of a Gaussian
            applied to both images of the items that pass the selection's discrepancy check
            (:mod:`emcore.finetune.prefilter`), before all of that item's fits at this level; their
            bending weights are multiplied by the loss of gradient energy this causes
            (:func:`emcore.finetune.prefilter.gradient_energy_ratio`), so ``bending`` and
            ``bending_candidates`` stay in units of the unfiltered images. Items failing the
            check are fitted on the images as they are.
        refits: with ``bending_candidates`` and ``jitter``, the items that move to a softer fit
            are fitted ``refits`` more times with the chosen weight on every pixel (the held-out
            blocks included), each from the stiff fit's field and with the jitter offsets of its
            own seed (1, 2, ...; :func:`jittered_target`); their field is the mean of the selected
            fit and the refits (:mod:`emcore.finetune.bending_choice`). 0 = off; items that keep
            the stiff fit, or fail the discrepancy check, are not affected.
        candidate_order: derivative order of the smoothness energy in the fits with
            ``bending_candidates`` and in the refits (2 = the bending energy, as ``bending``; 3 or
            4: :func:`emcore.finetune.bending.smoothness_energy`, the candidates then being weights
            of that energy). The stiff fit with ``bending`` always uses the bending energy.
    """

    mip: int
    num_iter: int | None = None
    lr: float | None = None
    patience: int | None = None
    max_halvings: int | None = None
    sm: float | None = None
    field_mip: int | None = None
    jitter: float = 0.0
    bending: float = 0.0
    detail_mip: int | None = None
    bending_candidates: tuple[float, ...] = ()
    prefilter: float = 0.0
    refits: int = 0
    candidate_order: int = 2

    def __post_init__(self) -> None:
        grid = self.field_mip
        if grid is not None and not (isinstance(grid, int) and grid >= self.mip):
            raise ValueError(f"Level.field_mip must be an int >= mip ({self.mip}), got {self.field_mip!r}")
        if not (isinstance(self.jitter, int | float) and 0.0 <= self.jitter <= 1.0):
            raise ValueError(f"Level.jitter must be in [0, 1] px, got {self.jitter!r}")
        if not (isinstance(self.bending, int | float) and math.isfinite(self.bending) and self.bending >= 0):
            raise ValueError(f"Level.bending must be a finite number >= 0, got {self.bending!r}")
        cands = self.bending_candidates
        if not (
            isinstance(cands, tuple)
            and all(isinstance(b, int | float) and math.isfinite(b) and b >= 0 for b in cands)
        ):
            raise ValueError(f"Level.bending_candidates must be a tuple of numbers >= 0, got {cands!r}")
        pre = self.prefilter
        if not (isinstance(pre, int | float) and math.isfinite(pre) and 0.0 <= pre <= MAX_PREFILTER):
            raise ValueError(
                f"Level.prefilter must be a Gaussian sigma in [0, {MAX_PREFILTER}] px, got {pre!r}"
            )
        if not (isinstance(self.refits, int) and 0 <= self.refits <= MAX_REFITS):
            raise ValueError(f"Level.refits must be an int in [0, {MAX_REFITS}], got {self.refits!r}")
        order = self.candidate_order
        if not (isinstance(order, int) and not isinstance(order, bool) and 2 <= order <= MAX_ORDER):
            raise ValueError(f"Level.candidate_order must be an int in [2, {MAX_ORDER}], got {order!r}")
        detail = self.detail_mip
        if detail is not None and not (isinstance(detail, int) and self.mip <= detail < self.parameter_mip):
            raise ValueError(
                f"Level.detail_mip must be an int in [mip, field_mip) = [{self.mip}, {self.parameter_mip}), "
                f"got {detail!r}"
            )

    @property
    def parameter_mip(self) -> int:
        """The mip the field is optimized at (``field_mip``, or ``mip`` for a per-pixel field)."""
        return self.mip if self.field_mip is None else self.field_mip

    def schedule(self, base: AdamSchedule) -> AdamSchedule:
        """``base`` with this level's non-``None`` settings (lr: ``base.lr * 2**parameter_mip`` if
        ``None``: the base lr is a step in px at mip 0, converted to the parameter's px)."""
        names = ("num_iter", "patience", "max_halvings")
        changes: dict[str, float] = {k: getattr(self, k) for k in names if getattr(self, k) is not None}
        changes["lr"] = base.lr * 2**self.parameter_mip if self.lr is None else self.lr
        return replace(base, **changes)


def pyramid_mips(height: int, width: int, levels: int, *, min_size: int = 16) -> tuple[int, ...]:
    """Mips ``(k, ..., 1, 0)`` for ``levels`` levels, fewer if the image can't be halved that often.

    A mip ``k`` is used only if ``height`` and ``width`` are divisible by ``2**k`` and the level is
    at least ``min_size`` px on its shorter side (16 px: a 10 px shift of a 128 px crop is
    recovered from mip 3, not from mip 2, where it is still 2.5 px). Always includes mip 0.
    """
    if not (isinstance(levels, int) and levels >= 1):
        raise ValueError(f"levels must be an int >= 1, got {levels!r}")
    top = 0
    while (
        top + 1 < levels
        and height % 2 ** (top + 1) == 0
        and width % 2 ** (top + 1) == 0
        and min(height, width) // 2 ** (top + 1) >= min_size
    ):
        top += 1
    return tuple(range(top, -1, -1))


#: Motion (px at the coarsest level) that level is trusted to capture: the loss sees a shift only
#: within its bilinear footprint and the per-pixel levels' springs, so a level recovers about
#: 2-4 px (measured: a 512 px pair whose corners moved ~28 px failed with 4 levels, mip 3 = 3.5 px,
#: and passed with 5; issue 17 / benchmarks/README.md).
CAPTURE_PX = 2.5
#: The shallowest automatic depth (mips 3..0): coarse levels also make the fine ones converge in
#: fewer iterations, whatever the motion.
MIN_AUTO_LEVELS = 4


def pyramid_depth(height: int, width: int, max_motion: float) -> int:
    """Pyramid depth (number of levels) for a chunk whose content may move up to ``max_motion`` px.

    The coarsest mip ``k`` is the smallest with ``max_motion / 2**k <= CAPTURE_PX`` (but at least
    :data:`MIN_AUTO_LEVELS` levels), then capped by what the chunk size allows
    (:func:`pyramid_mips`: divisibility, >= 16 px at the top). E.g. 512 px, 40 px: mip 4 (2.5 px
    there), 5 levels; 20 px: 4 levels; a 128 px chunk: at most 4 levels whatever the motion.

    Args:
        height, width: chunk size, px at the input mip.
        max_motion: the largest displacement expected between the pair (after ``init_field``),
            px at the input mip, > 0.
    """
    if not (isinstance(max_motion, int | float) and math.isfinite(max_motion) and max_motion > 0):
        raise ValueError(f"max_motion must be a finite number of px > 0, got {max_motion!r}")
    top = max(MIN_AUTO_LEVELS - 1, math.ceil(math.log2(max_motion / CAPTURE_PX) - 1e-9))
    return len(pyramid_mips(height, width, top + 1))


def downsample_images(images: torch.Tensor) -> torch.Tensor:
    """``(N, C, H, W)`` float images -> one mip coarser, on their device
    (``emcore.pyramid.downsample_image_torch``: 2x2 mean over data pixels, 0 = no data kept)."""
    return downsample_image_torch(images.detach())


def downsample_masks(masks: torch.Tensor) -> torch.Tensor:
    """``(N, 1, H, W)`` defect masks -> one mip coarser, bool (max of each 2x2 block)."""
    return downsample_mask_torch(masks.detach() != 0)


def _check_levels(levels: Sequence[Level], height: int, width: int) -> None:
    if not levels:
        raise ValueError("levels must hold at least one Level")
    mips = [lv.mip for lv in levels]
    decreasing = all(a > b for a, b in zip(mips, mips[1:], strict=False))
    if any(not isinstance(m, int) or m < 0 for m in mips) or not decreasing:
        raise ValueError(f"level mips must be ints >= 0, strictly decreasing (coarse to fine), got {mips}")
    top = max(max(mips), *(lv.parameter_mip for lv in levels))
    factor = 2**top
    if height % factor or width % factor:
        raise ValueError(
            f"images {height}x{width} are not divisible by {factor} for a level (or its field) at mip {top}: "
            "use fewer levels (see pyramid_mips) or pad the chunk"
        )


#: Mip of the per-pixel levels' finest level and of the last level's detail field near defects in
#: :func:`default_levels` (4x4 px cells at the input mip: fine enough for a tear).
DEFAULT_FIELD_MIP = 2
#: Mip of the last level's control grid in :func:`default_levels` (16x16 px cells at the input
#: mip, smoothed by the bending energy).
DEFAULT_SMOOTH_FIELD_MIP = 4
#: Sampling jitter of the last level in :func:`default_levels`, px at the input mip.
DEFAULT_JITTER = 1.0
#: Weight of the bending energy (:mod:`emcore.finetune.bending`, mip-0 units) on the last level's
#: grid: the stiffest candidate, fitted first.
DEFAULT_BENDING = 5e3
#: Softer weights the last level tries after :data:`DEFAULT_BENDING`, each item keeping the fit
#: with the lowest held-out MSE (:mod:`emcore.finetune.selection`; measured in
#: benchmarks/README.md, "Stiffness chosen by held-out pixels" and "Issue 17, third pass": with
#: the pre-filter, on the 4 strain pairs, mean p95 px: 5e2 -> 1e2 0.150, 1e2 0.149, 1.5e2 0.143,
#: 2e2 0.142, 3e2 0.141; weights in units of the unfiltered images' data term). Since the fifth
#: pass a weight of the fourth-order energy (:data:`DEFAULT_CANDIDATE_ORDER`; with 2 refits, mean
#: p95: bending 2e2 0.132; order 4: 6e5 0.129, 1.2e6 0.122, 2e6 0.119, 3e6 0.117, 4e6 0.122, 6e6
#: 0.134; order 3: 5e3 0.134, 1e4 0.129, 2e4 0.124, 2.8e4 0.124, 4e4 0.126, 8e4 0.139).
#: Two of them, 3e6 then 1e6: finer strain than the benchmark's (a 256 px pair with ~32 px
#: features, tests/test_finetune_order.py) wants the softer one, and the held-out blocks choose.
DEFAULT_BENDING_CANDIDATES: tuple[float, ...] = (3e6, 1e6)
#: Derivative order of the smoothness energy of the soft candidate's fit and its refits
#: (:attr:`Level.candidate_order`; benchmarks/README.md, "Issue 17, fifth pass").
DEFAULT_CANDIDATE_ORDER = 4
#: Gaussian pre-filter of the last level, px at mip 0, for the items that pass the selection's
#: discrepancy check (:attr:`Level.prefilter`; benchmarks/README.md, "Issue 17, third pass").
DEFAULT_PREFILTER = 0.5
#: Refits of the last level's soft items (:attr:`Level.refits`), each with its own jitter seed,
#: averaged with the selected fit (benchmarks/README.md, "Issue 17, fourth pass": on the 4 strain
#: pairs, mean p95 px: 0 refits 0.142, 1 0.135, 2 0.132, 3 0.131).
DEFAULT_REFITS = 2
#: Spring weight of that level relative to the call's ``sm``: with the bending energy doing the
#: smoothing, the springs only keep the grid from folding over, and a low weight does not pull
#: a strained section towards a rigid one.
DEFAULT_GRID_SM_FACTOR = 0.1
#: Reach of the detail field around a defect, in grid cells (2 cells of 16 px = 32 px: every grid
#: cell whose bilinear support touches the defect, and one more; measured on the fold test of
#: tests/test_finetune.py with the detail stepping in its own px: 1 grid cell left 0.70 px p95
#: error beside the fold, 1.5 cells 0.48 px, 2 cells 0.25 px, 3 cells 0.07 px at 1.4x the
#: iterations; stepping in grid px as now, 2 cells: 0.16 px; benchmarks/README.md).
DETAIL_RADIUS = 2
#: Initial Adam step of that level, px at its grid mip (0.032 px at mip 0 for a mip-4 grid):
#: Adam's steps of ~lr per value oscillate against the stiff bending term when larger.
DEFAULT_GRID_LR = 2e-3


def _smooth_grid_mip(height: int, width: int) -> int:
    """The coarsest mip <= :data:`DEFAULT_SMOOTH_FIELD_MIP` that leaves >= 4 whole cells per side."""
    k = DEFAULT_SMOOTH_FIELD_MIP
    while k > 0 and (height % 2**k or width % 2**k or min(height, width) // 2**k < 4):
        k -= 1
    return k


def default_levels(height: int, width: int, levels: int, *, sm: float = 3.0) -> list[Level]:
    """The default schedule for ``levels`` pyramid levels (measured, benchmarks/README.md).

    Per-pixel levels at the mips of :func:`pyramid_mips` down to :data:`DEFAULT_FIELD_MIP`, then a
    last level whose loss runs at mip 0 (every pixel, sampling jitter :data:`DEFAULT_JITTER`) while
    its field is a control grid at :data:`DEFAULT_SMOOTH_FIELD_MIP` (16 px cells, or the coarsest
    mip that leaves >= 4 cells) with the bending energy (:data:`DEFAULT_BENDING`) as the smoothness
    term, springs at ``sm *`` :data:`DEFAULT_GRID_SM_FACTOR` and a small first step
    (:data:`DEFAULT_GRID_LR`): affine motion costs nothing, so neither noise nor true strain
    biases the field. Near defects (when the call has defect masks) a detail field at
    :data:`DEFAULT_FIELD_MIP` (4 px cells) lets the field tear (``Level.detail_mip``).

    E.g. a 512 px chunk, 4 levels: mips 3 and 2 per pixel, then mip 0 with the field at mip 4
    (and detail at mip 2 near defects). ``levels=1``: one per-pixel level at mip 0 with jitter.

    Args:
        height, width: chunk size in px at the input mip.
        levels: pyramid depth (see :func:`pyramid_mips`).
        sm: the call's rigidity weight (the per-pixel levels use it as is).
    """
    mips = pyramid_mips(height, width, levels)
    if len(mips) == 1:
        return [Level(0, jitter=DEFAULT_JITTER)]
    fine = min(DEFAULT_FIELD_MIP, mips[0])
    coarse = [Level(m) for m in mips if m >= fine]
    grid = max(fine, _smooth_grid_mip(height, width))
    last = Level(
        0,
        field_mip=grid,
        jitter=DEFAULT_JITTER,
        lr=DEFAULT_GRID_LR,
        sm=sm * DEFAULT_GRID_SM_FACTOR,
        bending=DEFAULT_BENDING,
        detail_mip=fine if fine < grid else None,
        bending_candidates=DEFAULT_BENDING_CANDIDATES,
        prefilter=DEFAULT_PREFILTER,
        refits=DEFAULT_REFITS,
        candidate_order=DEFAULT_CANDIDATE_ORDER,
    )
    return [*coarse, last]


def coarse_to_fine(
    src: torch.Tensor,
    tgt: torch.Tensor,
    init_field: torch.Tensor,
    *,
    levels: Sequence[Level],
    base: AdamSchedule,
    sm: float,
    l2_weight: float = 1e-4,
    src_defects: torch.Tensor | None = None,
    tgt_defects: torch.Tensor | None = None,
    backend: str = "auto",
    check_every: int | None = None,
) -> tuple[torch.Tensor, list[LevelOutcome]]:
    """Run :func:`~emcore.finetune.optimizer.adam_finetune` over ``levels`` (coarsest first).

    Args:
        src, tgt: ``(N, C, H, W)`` float images at the input mip (0 = no data), validated.
        init_field: ``(N, 2, H, W)`` starting field, px at the input mip.
        levels: the schedule, mips strictly decreasing.
        base: Adam settings used where a level leaves them ``None``.
        sm: rigidity weight where a level leaves ``sm`` ``None``.
        src_defects, tgt_defects: optional ``(N, 1, H, W)`` defect masks (nonzero = defect).

    Returns:
        ``(field, outcomes)``: the ``(N, 2, H, W)`` field in px at the input mip and one
        :class:`~emcore.finetune.optimizer.LevelOutcome` per level (fields at the level's mip).
    """
    _check_levels(levels, src.shape[-2], src.shape[-1])
    # Pyramid: one entry per mip 0..top.
    pyramid = [(src, tgt, src_defects, tgt_defects)]
    for _ in range(levels[0].mip):
        s, t, sd, td = pyramid[-1]
        pyramid.append(
            (
                downsample_images(s),
                downsample_images(t),
                None if sd is None else downsample_masks(sd),
                None if td is None else downsample_masks(td),
            )
        )

    field = resample_field(init_field, 0, levels[0].mip)
    outcomes: list[LevelOutcome] = []
    mip = levels[0].mip
    for level in levels:
        field = resample_field(field, mip, level.mip)
        mip = level.mip
        s, t, sd, td = pyramid[mip]
        raw_t = t
        offsets = None
        if level.jitter > 0:
            offsets, t = jittered_target(t, level.jitter)
        masks = prepare_masks(s, t, src_defects=sd, tgt_defects=td)
        detail_mask = detail_mip = None
        if level.detail_mip is not None and (sd is not None or td is not None):
            detail_mip = level.detail_mip - level.mip
            radius = DETAIL_RADIUS * 2 ** (level.parameter_mip - level.detail_mip)
            detail_mask = defect_neighbourhood(sd, td, field, detail_mip, radius)
        fit = partial(
            adam_finetune,
            sm=sm if level.sm is None else level.sm,
            l2_weight=l2_weight,
            schedule=level.schedule(base),
            backend=backend,
            check_every=check_every,
            field_mip=level.parameter_mip - level.mip,
            sample_offsets=offsets,
            detail_mask=detail_mask,
            detail_mip=detail_mip,
        )
        if level.bending_candidates:
            outcome = select_bending(s, t, raw_t, field, masks, level, base, fit, offsets, backend)
        else:
            outcome = fit(s, t, field, masks=masks, bending=level.bending)
        outcomes.append(outcome)
        field = outcome.field
    return resample_field(field, mip, 0), outcomes
