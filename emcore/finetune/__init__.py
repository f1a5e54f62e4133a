"""The online finetuner: gradient descent on a displacement field, coarse to fine.

``finetune(src, tgt)`` returns the field ``f`` (``(N, 2, H, W)`` float32, px at the input mip,
:mod:`emcore.field` convention, channel 0 = x) with ``warp(src, f) ~ tgt``, by minimizing
:func:`emcore.finetune.losses.alignment_loss` (masked MSE + ``sm`` * spring rigidity + tiny L2)
with Adam (:mod:`emcore.finetune.optimizer`) over a mip pyramid
(:mod:`emcore.finetune.coarse_to_fine`).

API summary
-----------
* :func:`finetune` -> :class:`FinetuneResult` (field, per-item loss, iterations per level, time).
* :class:`Level` - one level of an explicit schedule (``levels=[Level(3, lr=...), ...]``).
* :func:`alignment_loss`, :func:`prepare_masks` - the loss (re-exported from ``losses``).
* ``DEFAULT_LR``, ``DEFAULT_PATIENCE``, ``DEFAULT_MAX_HALVINGS``, ``DEFAULT_LEVELS``,
  ``DEFAULT_MAX_MOTION``: the measured defaults (see ``benchmarks/README.md``, "Accuracy and speed
  vs peers", for the sweeps). The pyramid depth follows the chunk size and ``max_motion``
  (:func:`emcore.finetune.coarse_to_fine.pyramid_depth`); the last level's bending weight is
  chosen per item on held-out pixels (:mod:`emcore.finetune.selection`), on images pre-filtered
  by a small Gaussian where the residual is at the noise level (:mod:`emcore.finetune.prefilter`;
  such an item's ``loss`` is then that of the filtered images); an item that takes the softer
  weight is refitted with it on every pixel with two more jitter seeds and gets the mean field
  (``Level.refits``; its ``loss`` is then the refits' mean). With the automatic
  depth and ``max_motion`` > 20 px, a pure translation of up to ``max_motion`` is found by
  cross-correlation before the coarsest level (:mod:`emcore.finetune.translation_start`; smaller
  motions run as without it).

Batches: ``N`` pairs are optimized in one call, each with its own lr schedule and early stop;
the result for an item does not depend on the other items. CPU runs are deterministic (bitwise
equal reruns for the same inputs and backend).

Items without data: an item whose ``src`` or ``tgt`` is all zero (no data at all) is not
optimized; its ``init_field`` is returned unchanged, ``no_data[i]`` is ``True``, its loss is NaN
and its iteration counts are 0. Everything else that is malformed raises ``ValueError`` naming the
input.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from emcore.field import identity
from emcore.finetune.coarse_to_fine import Level, coarse_to_fine, default_levels, pyramid_depth
from emcore.finetune.losses import alignment_loss, prepare_masks
from emcore.finetune.optimizer import AdamSchedule
from emcore.finetune.translation_start import MIN_MOTION_BOUND, translation_start

__all__ = [
    "DEFAULT_LEVELS",
    "DEFAULT_LR",
    "DEFAULT_MAX_HALVINGS",
    "DEFAULT_MAX_MOTION",
    "DEFAULT_PATIENCE",
    "DEFAULT_REL_TOL",
    "DEFAULT_SM",
    "FinetuneResult",
    "Level",
    "alignment_loss",
    "finetune",
    "prepare_masks",
]

# The defaults below were chosen by the sweeps in benchmarks/README.md ("Accuracy and speed vs
# peers"), on real EM with known deformations, not per case.

#: Rigidity weight of the per-pixel levels (the default schedule's last level uses a tenth of it
#: next to the bending energy, with or without defects). The published 200 penalizes real strain
#: (1-5 %) so much with this loss that the true field costs more than no field at all (measured).
#: With a spring-only control-grid last level, 3 balanced the smooth (lower sm fits noise) and
#: large (higher sm biases strained fields) cases: sm 2 / 3 / 5 gave smooth 0.063 / 0.057 / 0.054
#: px and large 0.075 / 0.083 / 0.110 px median (benchmarks/README.md).
DEFAULT_SM = 3.0
#: Initial Adam step at mip 0 in px; a level at mip ``k`` starts at ``lr * 2**k`` (its own px).
DEFAULT_LR: float = AdamSchedule.lr
#: Iterations without a ``rel_tol`` relative improvement before an item's lr halves.
DEFAULT_PATIENCE: int = AdamSchedule.patience
#: Relative improvement that counts as progress for the plateau rule.
DEFAULT_REL_TOL: float = AdamSchedule.rel_tol
#: Halvings before an item stops.
DEFAULT_MAX_HALVINGS: int = AdamSchedule.max_halvings
#: Pyramid depth: ``None`` = from the chunk size and ``max_motion``
#: (:func:`emcore.finetune.coarse_to_fine.pyramid_depth`: 5 levels, mips 4..0, for a 512 px chunk
#: and 40 px), turned into a schedule by :func:`emcore.finetune.coarse_to_fine.default_levels`:
#: per-pixel levels from the top mip down to mip 2, then the loss at mip 0 with sampling jitter and
#: the field as a control grid at mip 4 with the bending energy (its weight chosen per item on
#: held-out pixels), and a detail field at mip 2 near defects.
DEFAULT_LEVELS: int | None = None
#: The largest motion (px at the input mip, after ``init_field``) the automatic depth is sized
#: for: a 512 px pair whose corners move 40 px is captured (benchmarks/README.md, ``capture``).
DEFAULT_MAX_MOTION = 40.0


@dataclass(frozen=True)
class FinetuneResult:
    """What :func:`finetune` returns.

    Attributes:
        field: ``(N, 2, H, W)`` float32 field in px at the input mip (channel 0 = x), aligning
            ``src`` onto ``tgt``: ``warp(src, field) ~ tgt``.
        loss: ``(N,)`` final loss per item (at the last level's mip); NaN where ``no_data``.
        iterations: ``(L, N)`` int64 loss evaluations per level (coarsest first) and item.
        mips: the ``L`` level mips relative to the input, coarsest first.
        seconds: wall time of the call.
        level_seconds: wall time of each level's optimization, coarsest first (``L`` floats).
        no_data: ``(N,)`` bool, items returned unchanged because ``src`` or ``tgt`` is all zero.
        translated: ``(N,)`` bool, items whose start got a global translation
            (:mod:`emcore.finetune.translation_start`; automatic schedule only, else all False).
    """

    field: torch.Tensor
    loss: torch.Tensor
    iterations: torch.Tensor
    mips: tuple[int, ...]
    seconds: float
    no_data: torch.Tensor
    level_seconds: tuple[float, ...] = ()
    translated: torch.Tensor | None = None


def _check_finite(name: str, t: torch.Tensor) -> None:
    bad = ~torch.isfinite(t).flatten(1).all(dim=1)
    if bool(bad.any()):
        items = torch.nonzero(bad).flatten().tolist()
        raise ValueError(f"{name} contains NaN or inf (batch items {items}); clean the input first")


def _check_inputs(
    src: torch.Tensor,
    tgt: torch.Tensor,
    init_field: torch.Tensor | None,
    src_defects: torch.Tensor | None,
    tgt_defects: torch.Tensor | None,
) -> None:
    for name, t in (("src", src), ("tgt", tgt)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.ndim != 4 or min(t.shape) < 1:
            raise ValueError(f"{name} must have shape (N, C, H, W) with no empty axis, got {tuple(t.shape)}")
        if t.dtype != torch.float32:
            raise ValueError(f"{name} must be float32 (normalized images or encodings), got {t.dtype}")
    if src.shape != tgt.shape:
        raise ValueError(f"src {tuple(src.shape)} and tgt {tuple(tgt.shape)} must have the same shape")
    if src.device != tgt.device:
        raise ValueError(f"src is on {src.device} but tgt is on {tgt.device}")
    _check_finite("src", src)
    _check_finite("tgt", tgt)
    n, _, h, w = src.shape
    if init_field is not None:
        if not isinstance(init_field, torch.Tensor) or tuple(init_field.shape) != (n, 2, h, w):
            got = (
                tuple(init_field.shape) if isinstance(init_field, torch.Tensor) else type(init_field).__name__
            )
            raise ValueError(
                f"init_field must be an (N, 2, H, W) = {(n, 2, h, w)} tensor at the images' mip, got {got} "
                "(resample it with emcore.field.resample_field)"
            )
        if not init_field.is_floating_point() or init_field.device != src.device:
            raise ValueError(
                f"init_field must be a float tensor on {src.device}, "
                f"got {init_field.dtype} on {init_field.device}"
            )
        _check_finite("init_field", init_field)
    for name, d in (("src_defects", src_defects), ("tgt_defects", tgt_defects)):
        if d is None:
            continue
        if not isinstance(d, torch.Tensor) or tuple(d.shape) != (n, 1, h, w):
            got = tuple(d.shape) if isinstance(d, torch.Tensor) else type(d).__name__
            raise ValueError(f"{name} must be an (N, 1, H, W) = {(n, 1, h, w)} tensor, got {got}")
        if d.device != src.device:
            raise ValueError(f"{name} is on {d.device} but the images are on {src.device}")


def finetune(
    src: torch.Tensor,
    tgt: torch.Tensor,
    *,
    init_field: torch.Tensor | None = None,
    src_defects: torch.Tensor | None = None,
    tgt_defects: torch.Tensor | None = None,
    sm: float = DEFAULT_SM,
    num_iter: int = 2000,
    lr: float = DEFAULT_LR,
    patience: int = DEFAULT_PATIENCE,
    max_halvings: int = DEFAULT_MAX_HALVINGS,
    rel_tol: float = DEFAULT_REL_TOL,
    levels: int | Sequence[Level] | None = DEFAULT_LEVELS,
    l2_weight: float = 1e-4,
    backend: str = "auto",
    check_every: int | None = None,
    max_motion: float = DEFAULT_MAX_MOTION,
) -> FinetuneResult:
    """Find the fields that align each ``src`` onto its ``tgt`` (batched, coarse to fine).

    Args:
        src: ``(N, C, H, W)`` float32 normalized images or encodings to be moved (0 = no data; a
            pixel has no data when all its channels are 0).
        tgt: ``(N, C, H, W)`` float32 targets, same shape and device.
        init_field: optional ``(N, 2, H, W)`` starting field in px at the input mip (e.g. the
            coarse alignment's residual); default identity (zeros).
        src_defects: optional ``(N, 1, H, W)`` defect mask (folds, cracks; nonzero = defect) in
            the source frame; tgt_defects: the same in the target frame. Springs at defects are
            cut, so the field may tear there, and defect pixels don't count in the MSE; the
            default schedule's last level adds a finer detail field near defects.
        sm: rigidity weight (default :data:`DEFAULT_SM` = 3; the published 200 over-penalizes
            real strain with this loss, see ``DEFAULT_SM``): at every per-pixel level; the
            default schedule's bending grid level uses ``sm / 10``.
        num_iter: most iterations per level and item (published default 2000; early stop usually
            ends a level after 20-300 on the benchmark cases).
        lr: initial Adam step in px at mip 0; a level at mip ``k`` starts at ``lr * 2**k`` of its
            own px unless the :class:`Level` sets ``lr``.
        patience: iterations without a relative improvement of ``rel_tol`` before an item's lr
            halves.
        max_halvings: halvings before an item stops.
        rel_tol: relative loss decrease that counts as an improvement.
        levels: ``None`` (default): the depth :func:`~emcore.finetune.coarse_to_fine.pyramid_depth`
            gives for the chunk size and ``max_motion``; or the pyramid depth (an int: the schedule of
            :func:`~emcore.finetune.coarse_to_fine.default_levels` for the mips
            :func:`~emcore.finetune.coarse_to_fine.pyramid_mips` allows for the chunk size; 1 = one
            per-pixel level at the input mip) or an explicit list of :class:`Level` (coarsest first, per-level
            ``num_iter``/``lr``/``patience``/``max_halvings``/``sm``/``field_mip``/``jitter``/``bending``/
            ``detail_mip``/``bending_candidates``).
        l2_weight: weight of the field's mean square in the loss.
        backend: loss backend, ``"auto"`` | ``"reference"`` | ``"fused"`` | ``"triton"``.
        check_every: iterations between host checks for "all items stopped" (default 1 on CPU,
            50 on GPU); does not change the result.
        max_motion: with ``levels=None``, the largest displacement (px at the input mip) between
            ``warp(src, init_field)`` and ``tgt`` that the pyramid must capture (default
            :data:`DEFAULT_MAX_MOTION` = 40 px), and, above 20 px, the search radius of the
            translation start (:mod:`emcore.finetune.translation_start`); ignored when ``levels``
            is given.

    Returns:
        :class:`FinetuneResult`.

    Raises:
        ValueError: malformed input (wrong shape/dtype/device, NaN or inf), naming it.
    """
    start = time.perf_counter()
    _check_inputs(src, tgt, init_field, src_defects, tgt_defects)
    if not (isinstance(sm, int | float) and math.isfinite(sm) and sm >= 0):
        raise ValueError(f"sm must be a finite number >= 0, got {sm!r}")
    base = AdamSchedule(
        num_iter=num_iter, lr=lr, patience=patience, max_halvings=max_halvings, rel_tol=rel_tol
    )
    n, _, h, w = src.shape
    automatic = levels is None
    if levels is None:
        levels = pyramid_depth(h, w, max_motion)
    if isinstance(levels, int):
        schedule = default_levels(h, w, levels, sm=float(sm))
    else:
        schedule = list(levels)
        if not all(isinstance(lv, Level) for lv in schedule):
            raise ValueError("levels must be None, an int or a sequence of emcore.finetune.Level")
        for lv in schedule:  # validate the per-level settings before any work
            lv.schedule(base)
    field0 = (
        identity(n, h, w, device=src.device) if init_field is None else init_field.to(torch.float32).clone()
    )

    has_data = (src != 0).flatten(1).any(dim=1) & (tgt != 0).flatten(1).any(dim=1)
    keep = torch.nonzero(has_data).flatten()
    field = field0.clone()
    loss = torch.full((n,), math.nan, dtype=torch.float32, device=src.device)
    iterations = torch.zeros(len(schedule), n, dtype=torch.int64, device=src.device)
    level_seconds = tuple(0.0 for _ in schedule)
    translated = torch.zeros(n, dtype=torch.bool, device=src.device)
    if keep.numel():
        everything = keep.numel() == n

        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return t if t is None or everything else t[keep]

        start_field = pick(field0)
        if automatic and max_motion > MIN_MOTION_BOUND:  # the motion bound, for translation too
            start_field, moved = translation_start(
                pick(src), pick(tgt), start_field, top_mip=schedule[0].mip, max_motion=float(max_motion)
            )
            translated[keep] = moved
        out, outcomes = coarse_to_fine(
            pick(src),
            pick(tgt),
            start_field,
            levels=schedule,
            base=base,
            sm=float(sm),
            l2_weight=l2_weight,
            src_defects=pick(src_defects),
            tgt_defects=pick(tgt_defects),
            backend=backend,
            check_every=check_every,
        )
        field[keep] = out
        loss[keep] = outcomes[-1].loss
        iterations[:, keep] = torch.stack([o.iterations for o in outcomes])
        level_seconds = tuple(o.seconds for o in outcomes)
    return FinetuneResult(
        field=field,
        loss=loss,
        iterations=iterations,
        mips=tuple(lv.mip for lv in schedule),
        seconds=time.perf_counter() - start,
        no_data=~has_data,
        level_seconds=level_seconds,
        translated=translated,
    )
