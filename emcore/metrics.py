"""Alignment quality measures.

Field residuals are in pixels at the fields' mip; fields follow :mod:`emcore.field`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from emcore.field import check_field

__all__ = ["ResidualStats", "field_residual"]


@dataclass(frozen=True)
class ResidualStats:
    """Distribution of ``|recovered - true|`` over the evaluated pixels, in px."""

    median: float
    p95: float
    max: float
    mean: float

    def __str__(self) -> str:
        return f"median {self.median:.3f} / p95 {self.p95:.3f} / max {self.max:.3f} px"


def field_residual(
    recovered: torch.Tensor,
    true: torch.Tensor,
    *,
    border: int = 32,
    mask: torch.Tensor | None = None,
) -> ResidualStats:
    """Residual ``|recovered - true|`` (Euclidean, px) over the interior.

    Args:
        recovered, true: ``(N, 2, H, W)`` fields in px at the same mip.
        border: pixels at each edge excluded.
        mask: optional ``(N, 1, H, W)`` bool; only set pixels are evaluated (e.g. tissue, or
            outside defects).
    """
    check_field(recovered, "recovered")
    check_field(true, "true")
    err = (recovered.double() - true.double()).norm(dim=1, keepdim=True)
    keep = torch.ones_like(err, dtype=torch.bool)
    if mask is not None:
        keep &= mask.bool()
    if border:
        inner = torch.zeros_like(keep)
        inner[..., border:-border, border:-border] = True
        keep &= inner
    values = err[keep]
    if values.numel() == 0:
        raise ValueError("no pixels left to evaluate the residual (border/mask cover everything)")
    q = torch.quantile(values, torch.tensor([0.5, 0.95], dtype=values.dtype))
    return ResidualStats(float(q[0]), float(q[1]), float(values.max()), float(values.mean()))
