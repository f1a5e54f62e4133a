"""Vector voting: per-pixel consensus of several candidate fields for the same section.

A section's alignment can be estimated several ways (through its neighbours ``z - 1``,
``z - 2``, ``z - 3``, ...). Near a defect or next to a blank neighbour one of them is wrong. Vector
voting keeps, at every pixel, the candidates that agree with each other and averages them.

Definition
----------
Candidates ``f_1 .. f_K`` (``(K, 2, H, W)``, px at one mip, :mod:`emcore.field` convention) and
an optional validity mask ``(K, 1, H, W)`` or ``(K,)`` (False = this candidate does not vote here).
At a pixel with ``n`` valid candidates, every subset ``S`` of ``m = n // 2 + 1`` valid candidates (a
strict majority; all of them when ``n <= 2``) gets a score, the mean pairwise distance (px)
``d(S) = mean_{i < j in S} |f_i - f_j|`` (0 for a single candidate). Subsets are weighted by a softmin
``exp(-d(S) / T)`` with temperature ``T`` px (``T -> 0`` keeps only the best subset), and the result is
the weighted mean over subsets of each subset's average field. A candidate far from the others is
in no low-scoring subset and gets (almost) no weight. Pixels with no valid candidate get 0 and are
marked invalid in the result.

Cost: ``2^K`` subsets per pixel; ``K`` is small (3-6). ``K > 8`` is refused.

API summary
-----------
* :func:`vector_vote` -> :class:`VoteResult` ``(field (1, 2, H, W), valid (1, 1, H, W) bool,
  weights (K, 1, H, W))``: ``weights`` is each candidate's share of the result (sums to 1 where
  valid), useful to see which estimate was rejected where.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from emcore.field import check_field

__all__ = ["MAX_CANDIDATES", "VoteResult", "vector_vote"]

MAX_CANDIDATES = 8


@dataclass(frozen=True)
class VoteResult:
    """Consensus field ``(1, 2, H, W)``, its validity ``(1, 1, H, W)`` bool, and the per-candidate
    weights ``(K, 1, H, W)`` (summing to 1 over candidates at valid pixels, 0 elsewhere)."""

    field: torch.Tensor
    valid: torch.Tensor
    weights: torch.Tensor


def _validity(valid: torch.Tensor | None, k: int, h: int, w: int, device: torch.device) -> torch.Tensor:
    if valid is None:
        return torch.ones(k, 1, h, w, dtype=torch.bool, device=device)
    valid = torch.as_tensor(valid, device=device).bool()
    if valid.shape == (k,):
        return valid.view(k, 1, 1, 1).expand(k, 1, h, w)
    if valid.shape == (k, 1, h, w):
        return valid
    raise ValueError(f"valid must have shape ({k},) or ({k}, 1, {h}, {w}), got {tuple(valid.shape)}")


def vector_vote(
    candidates: torch.Tensor,
    valid: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
) -> VoteResult:
    """Per-pixel consensus of ``K`` candidate fields (see the module docstring).

    Args:
        candidates: ``(K, 2, H, W)`` fields in px at one mip, ``2 <= K <= 8`` (with ``K = 2`` the
            two are simply averaged where both are valid: there is no majority to find).
        valid: optional ``(K,)`` or ``(K, 1, H, W)`` bool; False = the candidate does not vote
            there (e.g. estimated through a blank section or across a defect).
        temperature: softmin temperature in px (> 0). Subsets whose mean disagreement is a few
            temperatures worse than the best one get negligible weight.

    Returns:
        :class:`VoteResult`.
    """
    check_field(candidates, "candidates")
    k, _, h, w = candidates.shape
    if not 2 <= k <= MAX_CANDIDATES:
        raise ValueError(f"vector_vote needs 2..{MAX_CANDIDATES} candidates, got {k}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 px, got {temperature}")
    if not torch.isfinite(candidates).all():
        raise ValueError("candidates contain NaN or inf; mark such candidates invalid and set them to 0")
    ok = _validity(valid, k, h, w, candidates.device)
    count = ok.sum(dim=0)  # (1, H, W)
    subset_size = torch.where(count <= 2, count, count // 2 + 1)

    # Pairwise distances (K, K, 1, H, W), computed once.
    dist = (candidates[:, None] - candidates[None, :]).norm(dim=2, keepdim=True)

    scores, members = [], []
    for size in range(1, k + 1):
        for subset in itertools.combinations(range(k), size):
            idx = list(subset)
            eligible = ok[idx].all(dim=0) & (subset_size == size)
            if size == 1:
                score = torch.zeros(1, h, w, dtype=candidates.dtype, device=candidates.device)
            else:
                pairs = list(itertools.combinations(idx, 2))
                score = sum(dist[i, j] for i, j in pairs) / len(pairs)
            scores.append(torch.where(eligible, score, torch.full_like(score, torch.inf)))
            members.append(idx)
    score_t = torch.stack(scores)  # (S, 1, H, W)
    any_valid = count > 0
    # Softmin over eligible subsets; pixels without valid candidates get uniform junk, masked below.
    logits = -(score_t - score_t.amin(dim=0, keepdim=True).nan_to_num(0.0, posinf=0.0)) / temperature
    logits = torch.where(torch.isfinite(score_t), logits, torch.full_like(logits, -torch.inf))
    logits = torch.where(any_valid[None], logits, torch.zeros_like(logits))
    subset_weight = torch.softmax(logits, dim=0)

    weights = torch.zeros(k, 1, h, w, dtype=candidates.dtype, device=candidates.device)
    for s, idx in enumerate(members):
        share = subset_weight[s] / len(idx)
        for i in idx:
            weights[i] += share
    weights = torch.where(any_valid[None], weights, torch.zeros_like(weights))
    field = (weights * candidates).sum(dim=0, keepdim=True)
    return VoteResult(field=field, valid=any_valid[None], weights=weights)
