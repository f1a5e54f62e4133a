"""What one pyramid level optimizes: a control grid, plus optional local detail near defects.

Adam (:mod:`emcore.finetune.optimizer`) runs on one packed tensor ``(N, P)`` per batch; this
module maps it to the displacement field the loss sees (``(N, 2, H, W)`` px at the level's mip,
:mod:`emcore.field` convention) and back:

    field = up(grid) + up(detail * mask)

* ``grid`` - ``(N, 2, H / 2**grid_mip, W / 2**grid_mip)`` px at ``grid_mip`` (relative to the
  level's images; 0 = one vector per pixel), upsampled bilinearly by
  :func:`emcore.field.resample_field` (values x ``2**grid_mip``).
* ``detail`` (optional) - ``(N, 2, H / 2**detail_mip, W / 2**detail_mip)`` (finer than the grid),
  stored in px at ``grid_mip`` (so one Adam step moves grid and detail by the same distance at the
  images' mip) and used in px at ``detail_mip``, multiplied by a fixed 0/1 ``mask`` at that mip: 1
  near defects. A coarse
  grid is smooth and cannot tear within a few px; the detail lets the field tear at folds and
  cracks while the grid keeps everything else smooth. Where ``mask`` is 0 the detail gets no
  gradient, so with an empty mask the level is exactly the grid alone.

:func:`defect_neighbourhood` builds the mask from the defect masks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from emcore.field import resample_field, warp_mask

__all__ = ["FieldParameters", "defect_neighbourhood"]


class FieldParameters:
    """The packing of one level's parameters (see the module docstring).

    Args:
        shape: ``(N, 2, H, W)`` of the level's field; ``H`` and ``W`` divisible by
            ``2**grid_mip`` (and ``2**detail_mip``).
        grid_mip: mip of the grid relative to the level's images (>= 0).
        detail_mask: optional ``(N, 1, H / 2**detail_mip, W / 2**detail_mip)`` 0/1 mask of the
            detail field (1 near defects), with ``detail_mip``.
        detail_mip: mip of the detail field (< ``grid_mip``), required with ``detail_mask``.
    """

    def __init__(
        self,
        shape: tuple[int, int, int, int],
        grid_mip: int,
        detail_mask: torch.Tensor | None = None,
        detail_mip: int | None = None,
    ) -> None:
        n, _, h, w = shape
        self.grid_mip, self.detail_mip = grid_mip, detail_mip
        self.grid_shape = (n, 2, h >> grid_mip, w >> grid_mip)
        self.detail_mask = detail_mask
        self.detail_shape: tuple[int, int, int, int] | None = None
        if detail_mask is not None:
            if detail_mip is None or not 0 <= detail_mip < grid_mip:
                raise ValueError(f"detail_mip must be an int in [0, grid_mip={grid_mip}), got {detail_mip!r}")
            self.detail_shape = (n, 2, h >> detail_mip, w >> detail_mip)
            # Stored in px at the grid's mip, so that one Adam step moves grid and detail alike.
            self.detail_scale = float(2 ** (grid_mip - detail_mip))
            if tuple(detail_mask.shape) != (n, 1, *self.detail_shape[2:]):
                raise ValueError(
                    f"detail_mask must be {(n, 1, *self.detail_shape[2:])}, got {tuple(detail_mask.shape)}"
                )

    def _split(self, packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        size = self.grid_shape[1] * self.grid_shape[2] * self.grid_shape[3]
        grid = packed[:, :size].reshape(self.grid_shape)
        if self.detail_shape is None:
            return grid, None
        return grid, packed[:, size:].reshape(self.detail_shape)

    def grid(self, packed: torch.Tensor) -> torch.Tensor:
        """The grid part ``(N, 2, h, w)`` of a packed tensor (a view without detail, else a copy)."""
        return self._split(packed)[0]

    def expand(self, packed: torch.Tensor) -> torch.Tensor:
        """The field ``(N, 2, H, W)`` at the level's mip of a packed tensor."""
        grid, detail = self._split(packed)
        field = resample_field(grid, self.grid_mip, 0)
        if detail is not None:
            assert self.detail_mip is not None and self.detail_mask is not None
            scaled = detail * (self.detail_scale * self.detail_mask)
            field = field + resample_field(scaled, self.detail_mip, 0)
        return field

    def pack(self, field: torch.Tensor) -> torch.Tensor:
        """A packed ``(N, P)`` tensor whose :meth:`expand` approximates ``field``: the grid is
        ``field`` averaged to ``grid_mip``, the detail (where the mask is 1) what the grid misses of
        ``field`` averaged to ``detail_mip``."""
        grid = resample_field(field, 0, self.grid_mip)
        parts = [grid.flatten(1)]
        if self.detail_shape is not None:
            assert self.detail_mip is not None and self.detail_mask is not None
            smooth = resample_field(grid, self.grid_mip, self.detail_mip)
            missed = resample_field(field, 0, self.detail_mip) - smooth
            detail = missed * self.detail_mask / self.detail_scale
            parts.append(detail.flatten(1))
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0].clone()


def defect_neighbourhood(
    src_defects: torch.Tensor | None,
    tgt_defects: torch.Tensor | None,
    field: torch.Tensor,
    mip: int,
    radius: int,
) -> torch.Tensor:
    """``(N, 1, H / 2**mip, W / 2**mip)`` float 0/1: cells within ``radius`` cells of a defect.

    Defects in the target frame: ``tgt_defects`` and ``src_defects`` pulled through ``field``
    (``(N, 2, H, W)`` px, the level's starting field), like the loss's masks. Inputs ``(N, 1, H,
    W)`` nonzero = defect, at the level's mip; either may be ``None``.
    """
    n, _, h, w = field.shape
    defects = torch.zeros(n, 1, h, w, dtype=torch.bool, device=field.device)
    if tgt_defects is not None:
        defects |= tgt_defects != 0
    if src_defects is not None:
        defects |= warp_mask(src_defects != 0, field)
    cells = F.max_pool2d(defects.to(field.dtype), 2**mip) if mip > 0 else defects.to(field.dtype)
    if radius > 0:
        cells = F.max_pool2d(cells, 2 * radius + 1, stride=1, padding=radius)
    return cells
