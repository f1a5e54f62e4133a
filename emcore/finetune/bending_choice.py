"""The last level's bending weight, chosen per item on held-out pixels, and the soft items' refits.

:mod:`emcore.finetune.selection` holds the rule's parts (noise level, held-out blocks, held-out MSE);
this module runs it for one level of :func:`emcore.finetune.coarse_to_fine.coarse_to_fine`
(:func:`select_bending`): the discrepancy check, the pre-filter of the items that pass it
(:mod:`emcore.finetune.prefilter`), the stiff fit and each softer candidate, the choice, and the
refits of the items that took a softer weight (``Level.refits``). Fields are ``(N, 2, H, W)`` px at
the level's mip; images ``(N, C, H, W)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from functools import partial
from typing import TYPE_CHECKING

import torch

from emcore.finetune.jitter import jittered_target
from emcore.finetune.losses import LossMasks
from emcore.finetune.optimizer import AdamSchedule, LevelOutcome
from emcore.finetune.prefilter import gaussian_prefilter, gradient_energy_ratio
from emcore.finetune.selection import (
    MIN_GAIN,
    NOISE_FACTOR,
    heldout_blocks,
    heldout_mse,
    noise_sigma,
    split_masks,
)

if TYPE_CHECKING:
    from emcore.finetune.coarse_to_fine import Level

__all__ = ["CANDIDATE_PATIENCE", "select_bending"]


#: Patience of the softer fits of a held-out selection (they start next to their optimum).
CANDIDATE_PATIENCE = 5


def select_bending(
    src: torch.Tensor,
    tgt: torch.Tensor,
    raw_tgt: torch.Tensor,
    field: torch.Tensor,
    masks: LossMasks,
    level: Level,
    base: AdamSchedule,
    fit: Callable[..., LevelOutcome],
    offsets: torch.Tensor | None,
    backend: str,
) -> LevelOutcome:
    """The rule of :mod:`emcore.finetune.selection` for one level. Items failing its discrepancy
    check (the MSE at the level's starting ``field`` above ``NOISE_FACTOR`` x the images' noise
    variance) get the plain fit with ``level.bending`` on every pixel, exactly as without
    candidates; the others are fitted with ``level.bending`` outside the held-out blocks, then with
    each of ``level.bending_candidates`` (each fit starting from the previous one's field), and keep
    the fit with the lowest held-out MSE (a softer one only if > ``MIN_GAIN`` lower than the stiff
    fit's; between softer ones the lower wins). With
    ``level.prefilter``, those items' fits and held-out MSEs run on both images pre-filtered
    (:mod:`emcore.finetune.prefilter`; ``raw_tgt`` is the target before the jitter, which is
    filtered and then sampled at the same ``offsets``), their weights scaled by the gradient
    energy ratio. With ``level.refits`` (and jitter), the items that took a softer weight are
    refitted and averaged (:func:`_refit_soft`). If no item passes the check, nothing else runs.
    ``iterations`` adds up over the fits an item took part in (as if run alone), ``seconds`` over
    all; ``halvings`` is the chosen fit's."""
    noise = noise_sigma(src).square() + noise_sigma(tgt).square()
    start = heldout_mse(src, tgt, field, masks, backend=backend, sample_offsets=offsets)
    eligible = start <= NOISE_FACTOR * noise
    held = heldout_blocks(src.shape[-2], src.shape[-1], device=src.device) & eligible.view(-1, 1, 1, 1)
    fit_masks, held_masks = split_masks(masks, held)  # fit_masks = masks for the other items
    if not bool(eligible.any()):
        return fit(src, tgt, field, masks=fit_masks, bending=level.bending)
    scale: float | torch.Tensor = 1.0
    if level.prefilter > 0:
        filtered_src = gaussian_prefilter(src, level.prefilter)
        filtered_raw = gaussian_prefilter(raw_tgt, level.prefilter)
        ratio = gradient_energy_ratio(
            torch.cat([filtered_src, filtered_raw], dim=1), torch.cat([src, raw_tgt], dim=1)
        )
        filtered_tgt = filtered_raw if offsets is None else jittered_target(filtered_raw, level.jitter)[1]
        chosen = eligible.view(-1, 1, 1, 1)
        raw_tgt = torch.where(chosen, filtered_raw, raw_tgt)
        src = torch.where(chosen, filtered_src, src)
        tgt = torch.where(chosen, filtered_tgt, tgt)
        scale = torch.where(eligible, ratio, torch.ones_like(ratio))
    best = fit(src, tgt, field, masks=fit_masks, bending=level.bending * scale)
    score = heldout_mse(src, tgt, best.field, held_masks, backend=backend, sample_offsets=offsets)
    iterations, seconds, previous = best.iterations.clone(), best.seconds, best.field
    stiff, stiff_score = best.field, score
    soft = torch.zeros_like(eligible)
    chosen_weight = torch.full_like(score, float(level.bending))
    again = replace(level.schedule(base), patience=CANDIDATE_PATIENCE)
    soft_fit = partial(fit, bending_order=level.candidate_order)
    for weight in level.bending_candidates:
        out = soft_fit(src, tgt, previous, masks=fit_masks, bending=float(weight) * scale, schedule=again)
        new = heldout_mse(src, tgt, out.field, held_masks, backend=backend, sample_offsets=offsets)
        better = eligible & (new < stiff_score * (1.0 - MIN_GAIN)) & (new < score)
        best = replace(
            best,
            field=torch.where(better.view(-1, 1, 1, 1), out.field, best.field),
            loss=torch.where(better, out.loss, best.loss),
            halvings=torch.where(better, out.halvings, best.halvings),
        )
        score = torch.where(better, new, score)
        soft |= better
        chosen_weight = torch.where(better, torch.full_like(chosen_weight, float(weight)), chosen_weight)
        iterations = iterations + torch.where(eligible, out.iterations, torch.zeros_like(out.iterations))
        seconds += out.seconds
        previous = out.field
    best = replace(best, iterations=iterations, seconds=seconds)
    if level.refits and offsets is not None and bool(soft.any()):
        refit = partial(soft_fit, bending=chosen_weight * scale, schedule=again)
        best = _refit_soft(src, raw_tgt, stiff, best, soft, masks, level, refit)
    return best


def _refit_soft(
    src: torch.Tensor,
    raw_tgt: torch.Tensor,
    stiff: torch.Tensor,
    selected: LevelOutcome,
    soft: torch.Tensor,
    masks: LossMasks,
    level: Level,
    fit: Callable[..., LevelOutcome],
) -> LevelOutcome:
    """The ``soft`` items of ``selected`` (a held-out selection's outcome) refitted
    ``level.refits`` times on every pixel of ``masks`` from the ``stiff`` field, each refit on the
    target sampled with the jitter offsets of its own seed (1, 2, ...) from ``raw_tgt`` (the
    images the selection fitted, before the jitter); their field is the mean of ``selected``'s
    and the refits', their ``loss`` the refits' mean loss, their ``iterations`` include the
    refits'. Other items are returned as they are.

    Why: the selected fit never saw the held-out blocks (1/8 of the pixels), and each jitter
    pattern (fixed random offsets per pixel) leaves its own error pattern in the field; a mean
    over fits with independent patterns and all the pixels has less of both (issue 17, fourth
    pass, benchmarks/README.md)."""
    fields, losses, iterations, seconds = selected.field.clone(), torch.zeros_like(selected.loss), 0, 0.0
    for seed in range(1, level.refits + 1):
        offsets, tgt = jittered_target(raw_tgt, level.jitter, seed=seed)
        lost = (tgt == 0).all(dim=1, keepdim=True)  # this sampling has no data there
        refit_masks = split_masks(masks, lost)[0]
        out = fit(src, tgt, stiff, masks=refit_masks, sample_offsets=offsets)
        fields += out.field
        losses += out.loss
        iterations = iterations + out.iterations
        seconds += out.seconds
    pick = soft.view(-1, 1, 1, 1)
    return replace(
        selected,
        field=torch.where(pick, fields / (level.refits + 1), selected.field),
        loss=torch.where(soft, losses / level.refits, selected.loss),
        iterations=selected.iterations + torch.where(soft, iterations, torch.zeros_like(iterations)),
        seconds=selected.seconds + seconds,
    )
