"""CPU fast path of the finetuner loss (interim: delegates to the reference until the fused kernels land)."""

from __future__ import annotations

import torch

from emcore.finetune.loss_reference import LossTerms, reference_terms

__all__ = ["fused_terms"]


def fused_terms(
    src: torch.Tensor,
    tgt: torch.Tensor,
    field: torch.Tensor,
    src_flags: torch.Tensor,
    tgt_flags: torch.Tensor,
) -> LossTerms:
    """Interim: the reference terms (same signature as the fused kernels will have)."""
    return reference_terms(src, tgt, field, src_flags, tgt_flags)
