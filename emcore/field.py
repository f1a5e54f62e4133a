"""Displacement fields: the one convention sectionflow uses everywhere.

The convention
--------------
A displacement field is a float32 tensor of shape ``(N, 2, H, W)``:

* ``N`` sections (or chunks) in a batch, ``H`` rows (y, second-to-last axis), ``W`` columns
  (x, last axis), exactly like an image tensor ``(N, C, H, W)``.
* Channel 0 is the displacement **along x** (the width axis, the last axis); channel 1 is the
  displacement **along y** (the height axis).
* Values are in **pixels at the field's own mip**. A field at mip 2 (4x downsampled) that says
  ``3.0`` means 3 mip-2 pixels, i.e. 12 mip-0 pixels. :func:`resample_field` rescales values
  when moving between mips (x2 per mip going finer).
* Pixel ``(y, x)`` sits at the centre of its square; pixel centres are integer coordinates.
* **Pull semantics**: warping ``src`` by ``f`` gives ``out(p) = src(p + f(p))``. The field lives in
  the output (target) frame and says where to *read* from in the source. A field that is ``+3`` in
  channel 0 everywhere therefore moves the image content 3 pixels to the left (``out[x] =
  src[x + 3]``).
* Zero means "no data" in images. Reading outside the source returns 0, so warped images are 0
  where the field points out of the source, and masks say "nothing here".
* Composition: ``compose(f, g)`` is the single field with
  ``warp(warp(x, g), f) == warp(x, compose(f, g))``, i.e. ``compose(f, g)(p) = f(p) + g(p + f(p))``
  (apply ``g`` first to the image, then ``f``).

Storage: field layers hold the same two channels in the same order (channel 0 = x) as
Neuroglancer-precomputed volumes ``(X, Y, Z, 2)`` float32, in pixels at the layer's mip. corgie
(torchfields) stores the opposite channel order: see :func:`to_corgie` / :func:`from_corgie`.

Everything here is a pure torch function; inputs are never modified in place.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "FieldInversionResult",
    "check_field",
    "compose",
    "from_corgie",
    "identity",
    "invert",
    "resample_field",
    "sampling_grid",
    "to_corgie",
    "warp",
    "warp_field",
    "warp_mask",
]


def check_field(field: torch.Tensor, name: str = "field") -> None:
    """Raise ``ValueError`` unless ``field`` is a floating ``(N, 2, H, W)`` tensor."""
    if field.ndim != 4 or field.shape[1] != 2:
        raise ValueError(f"{name} must have shape (N, 2, H, W), got {tuple(field.shape)}")
    if not field.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor, got {field.dtype}")


def identity(
    n: int,
    height: int,
    width: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The identity displacement field, all zeros: shape ``(n, 2, height, width)``."""
    return torch.zeros(n, 2, height, width, dtype=dtype, device=device)


def sampling_grid(field: torch.Tensor) -> torch.Tensor:
    """Convert a pixel displacement field to a ``grid_sample`` grid.

    Args:
        field: ``(N, 2, H, W)`` displacement in pixels (channel 0 = x).

    Returns:
        ``(N, H, W, 2)`` absolute sampling positions in ``grid_sample``'s normalized coordinates
        for ``align_corners=False``: pixel centre ``x`` maps to ``(2x + 1) / W - 1``.
    """
    check_field(field)
    _, _, h, w = field.shape
    ys = torch.arange(h, dtype=field.dtype, device=field.device)
    xs = torch.arange(w, dtype=field.dtype, device=field.device)
    x = (2.0 * (xs.view(1, 1, w) + field[:, 0]) + 1.0) / w - 1.0
    y = (2.0 * (ys.view(1, h, 1) + field[:, 1]) + 1.0) / h - 1.0
    return torch.stack((x, y), dim=-1)


def _match_batch(image: torch.Tensor, field: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if image.ndim != 4:
        raise ValueError(f"image must have shape (N, C, H, W), got {tuple(image.shape)}")
    check_field(field)
    if image.shape[-2:] != field.shape[-2:]:
        raise ValueError(
            f"image {tuple(image.shape[-2:])} and field {tuple(field.shape[-2:])} must have the "
            "same height and width (resample the field to the image's mip first)"
        )
    n = max(image.shape[0], field.shape[0])
    if image.shape[0] not in (1, n) or field.shape[0] not in (1, n):
        raise ValueError(f"batch sizes differ: image {image.shape[0]}, field {field.shape[0]}")
    return image.expand(n, *image.shape[1:]), field.expand(n, *field.shape[1:])


def warp(image: torch.Tensor, field: torch.Tensor, *, mode: str = "bilinear") -> torch.Tensor:
    """Warp an image by a field (pull): ``out(p) = image(p + field(p))``.

    Args:
        image: ``(N, C, H, W)`` float tensor; 0 means no data.
        field: ``(N, 2, H, W)`` displacement in pixels at the image's mip. ``N`` may be 1 on
            either side (broadcast).
        mode: ``"bilinear"``, ``"nearest"`` or ``"bicubic"`` (``grid_sample``'s cubic convolution,
            a = -0.75: sharper, may overshoot, and reads 2 px around each position, so values
            within 2 px of no-data pixels mix in zeros).

    Returns:
        ``(N, C, H, W)`` warped image, 0 wherever the field reads outside ``image``.
    """
    image, field = _match_batch(image, field)
    grid = sampling_grid(field.to(image.dtype))
    return F.grid_sample(image, grid, mode=mode, padding_mode="zeros", align_corners=False)


def warp_mask(mask: torch.Tensor, field: torch.Tensor, *, threshold: float | None = None) -> torch.Tensor:
    """Warp a binary mask ``(N, C, H, W)`` (any dtype, nonzero = set) by ``field``.

    The mask is sampled bilinearly and an output pixel is set where the interpolated value is at
    least ``threshold``. ``threshold=None`` means 0.5 with ties set: nearest-neighbour-like, but a
    1-px defect never vanishes at a half-pixel shift (``grid_sample``'s nearest mode rounds half
    to even and would drop it). A small threshold dilates (any touch of a defect counts); 1.0 keeps
    only pixels whose four bilinear taps are all set. Returns the input dtype (bool stays bool).
    """
    if threshold is None:
        threshold = 0.5
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    as_float = (mask != 0).to(torch.float32)
    out = warp(as_float, field.to(torch.float32), mode="bilinear") >= threshold - 1e-6
    return out.to(mask.dtype)


def warp_field(g: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Resample field ``g`` at ``p + f(p)`` (bilinear, border extrapolation outside ``g``).

    Fields have no "no data" value, so positions outside ``g`` take the nearest border value
    instead of 0. Used by :func:`compose` and :func:`invert`.
    """
    g, f = _match_batch(g, f)
    grid = sampling_grid(f.to(g.dtype))
    return F.grid_sample(g, grid, mode="bilinear", padding_mode="border", align_corners=False)


def compose(f: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The field equivalent to warping by ``g`` then by ``f``.

    ``warp(warp(x, g), f) ~= warp(x, compose(f, g))``, with
    ``compose(f, g)(p) = f(p) + g(p + f(p))``. Both fields ``(N, 2, H, W)``, same mip.
    """
    return f + warp_field(g, f)


class FieldInversionResult(tuple):
    """``(inverse, residual)``: the inverse field and ``max |compose(field, inverse)|`` in px."""

    __slots__ = ()

    def __new__(cls, inverse: torch.Tensor, residual: float) -> FieldInversionResult:
        return super().__new__(cls, (inverse, residual))

    @property
    def inverse(self) -> torch.Tensor:
        return self[0]

    @property
    def residual(self) -> float:
        return self[1]


def invert(
    field: torch.Tensor, *, num_iter: int = 50, tol: float = 1e-3, border: int = 0
) -> FieldInversionResult:
    """Invert a field by fixed-point iteration ``h <- -field(p + h(p))``.

    The result ``h`` satisfies ``compose(h, field) ~= 0`` (and, for fields whose Jacobian is
    invertible, ``compose(field, h) ~= 0``). Iteration stops when the update is below ``tol`` px
    or after ``num_iter`` steps.

    Args:
        field: ``(N, 2, H, W)`` displacement in pixels.
        num_iter: maximum fixed-point iterations.
        tol: stop when the largest update is below this (px).
        border: pixels at the image edge excluded from the reported residual (the inverse is
            extrapolated there).

    Returns:
        :class:`FieldInversionResult` ``(inverse, residual)``, residual = max over the interior of
        ``|compose(field, inverse)|`` in px. Callers decide whether it is good enough.
    """
    check_field(field)
    h = -field
    for _ in range(num_iter):
        new = -warp_field(field, h)
        step = (new - h).abs().max().item() if h.numel() else 0.0
        h = new
        if step < tol:
            break
    err = compose(field, h)
    if border:
        err = err[..., border:-border, border:-border]
    residual = float(err.abs().max().item()) if err.numel() else 0.0
    return FieldInversionResult(h, residual)


def resample_field(field: torch.Tensor, src_mip: int, dst_mip: int) -> torch.Tensor:
    """Move a field from ``src_mip`` to ``dst_mip`` (sizes and values change by 2 per mip).

    Going finer (``dst_mip < src_mip``) upsamples bilinearly (pixel-centre aligned) and multiplies
    values by ``2 ** (src_mip - dst_mip)``; going coarser averages 2x2 blocks per mip and halves the
    values per mip. ``H`` and ``W`` must be divisible by ``2 ** (dst_mip - src_mip)`` when
    downsampling.
    """
    check_field(field)
    if dst_mip == src_mip:
        return field
    factor = 2 ** abs(dst_mip - src_mip)
    if dst_mip < src_mip:
        out = F.interpolate(field, scale_factor=factor, mode="bilinear", align_corners=False)
        return out * factor
    h, w = field.shape[-2:]
    if h % factor or w % factor:
        raise ValueError(f"field {h}x{w} is not divisible by {factor} to go from mip {src_mip} to {dst_mip}")
    return F.avg_pool2d(field, factor) / factor


def to_corgie(field: torch.Tensor) -> torch.Tensor:
    """Our ``(N, 2, H, W)`` field -> corgie/torchfields' stored channel layout.

    corgie reads a precomputed cutout ``(X, Y, Z, 2)`` and transposes it to ``(Z, 2, X, Y)``, so its
    tensors have x on the second-to-last and y on the last axis; torchfields' channel 0 moves along
    the last tensor axis. Stored channel 0 is therefore the **y** displacement and channel 1 the
    **x** displacement (pixels at the layer's mip, float32). In our ``(N, 2, H, W)`` layout the
    conversion is a swap of the two channels; both directions are the same operation.
    """
    check_field(field)
    return field.flip(1)


def from_corgie(field: torch.Tensor) -> torch.Tensor:
    """corgie/torchfields' channel layout -> ours (the inverse of :func:`to_corgie`)."""
    return to_corgie(field)
