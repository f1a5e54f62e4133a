"""Triton kernels of the finetuner loss (CUDA tensors; CPU tensors under ``TRITON_INTERPRET=1``).

Same loss and same autograd plumbing as the fused CPU path: :class:`TritonKernels` implements
:class:`emcore.finetune.loss_fused.LossKernels` and is run through the custom autograd Functions
:class:`~emcore.finetune.loss_fused.WarpMSE` and :class:`~emcore.finetune.loss_fused.RigidityL2`
(analytic gradient computed in the forward pass, scaled in backward). Spec: see
:mod:`emcore.finetune.loss_reference`.

Kernels (grid ``(N, cdiv(H W, BLOCK))``, one program = ``BLOCK`` consecutive pixels of one item,
so per-block partial sums never mix batch items and the final sums are deterministic):

* ``_warp_mse_kernel`` - per output pixel: four bilinear taps of the source flags (warped has-data
  and defect masks), ``valid`` and ``w``; then per channel the four source taps, the residual
  against the target, and ``d sse / d field`` (x and y derivative of the bilinear sample). Writes
  ``w`` and the gradient, and per-block partial sums of ``sse`` and the valid count. With
  ``HAS_OFFSETS`` it samples at ``p + field(p) + offsets(p)`` (offsets ``(1 or N, 2, H, W)``, a
  first dimension of 1 broadcast over the batch), read in the kernel instead of a separate
  ``field + offsets`` pass; the gradient w.r.t. ``field`` is the same expression.
* ``_rigidity_kernel`` - per pixel its 8 springs (gather form: ``grad(p) = -4 sum_d w(p) w(p+d)
  (|s| - |d|) s / |s|``, ``s = d + field(p+d) - field(p)``), so there is no scatter and no atomics;
  writes the gradient and per-block partial sums of the energy and of ``field^2``. The rest
  length ``|d|`` is a compile-time constant (1 or sqrt(2), rounded to the field's dtype like the
  reference's ``math.sqrt``). ``FAST_MATH`` computes ``1 / |s|`` with one ``rsqrt`` and
  ``|s| = |s|^2 / |s|`` as a product (one division per spring instead of two, and no
  correctly rounded ``sqrt``); the stretch keeps the cancellation-free form
  ``(|s|^2 - |d|^2) / (|s| + |d|)``. Its float32 error against the reference is that of the
  precise variant within the tests' tolerances (``tests/test_finetune_losses.py``, also on CUDA).

Knobs (:class:`TritonKernels`): ``block`` (pixels per program), ``num_warps`` and ``fast_math``.
``benchmarks/bench_kernels.py --cuda-only --sweep`` times the combinations on a GPU. The defaults
(:data:`BLOCK` 512, :data:`NUM_WARPS` 4, :data:`FAST_MATH` on) come from its run on an H200
(2026-11-26, CUDA graph, forward + backward): 1.04x / 1.28x / 1.36x the rate of the former
defaults (block 1024, 4 warps, precise) on 1 x 512^2 / 16 x 512^2 / 64 x 1024^2, where the best
of the 24 combinations was 1.08x / 1.28x / 1.37x; fast math alone gave 1.06x / 1.14x at block
1024, and blocks of 1024-2048 pixels with 2-4 warps (16-32 pixels per thread) ran at 0.2-0.67x.

GPU design notes (float32, C channels, bytes moved to/from DRAM per pixel per iteration, taps
and neighbours assumed to hit L1/L2 because neighbouring pixels share them; smooth fields keep
the gather local):

================================  =====================================================
warp+MSE forward                  field 8 + src 4C + tgt 4C + src flags 1 + tgt flags 1
                                  + write w 4 + write grad 8  =  22 + 8C
  with sample offsets             + offsets 8 (read in the kernel; a ``(1, 2, H, W)``
                                  offset broadcast over a batch may hit L2: 8 is the bound)
warp+MSE backward (scale grad)    read 8 + write 8  =  16
rigidity forward                  field 8 + w 4 + write grad 8  =  20
rigidity backward (scale + l2)    grad 8 + field 8 + write 8  =  24
autograd sum of the two grads     read 16 + write 8  =  24
total                             106 + 8C  (114 B/px/it for C = 1; 122 with offsets)
================================  =====================================================

The kernels themselves move ``42 + 8C`` B/px (50 for C = 1, 58 with offsets); the rest is
autograd plumbing (three elementwise passes). Before the offsets were read in the kernel, a
``field + offsets`` pass moved 24 B/px more (read 16, write 8). At ~3.3 TB/s (H100 SXM HBM3
datasheet, not measured) the bound is ~29 Gpx*it/s for C = 1 (~66 Gpx*it/s for the kernels
alone). ``benchmarks/bench_kernels.py`` reports the measured fraction of the bandwidth roofline
on CUDA (H200, replayed as a CUDA graph: 27-35 % for 16-64 pairs with the former defaults,
35 % / 45 % for 16 x 512^2 / 64 x 1024^2 with the current ones; benchmarks/README.md). CI
tests the kernels through the Triton interpreter (``tests/test_finetune_losses.py``);
``benchmarks/gpu_check.sh`` runs the same tests on a CUDA device.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from emcore.finetune.loss_fused import RigidityL2, WarpMSE
from emcore.finetune.loss_reference import LossTerms

__all__ = ["BLOCK", "FAST_MATH", "NUM_WARPS", "TritonKernels", "modelled_bytes_per_pixel", "triton_terms"]

#: Default pixels per program (a power of two; H200 sweep, see the module doc).
BLOCK = 512
#: Default warps per program (Triton's own default).
NUM_WARPS = 4
#: Default spring arithmetic: ``True`` = one ``rsqrt`` and one division per spring, ``False`` =
#: correctly rounded ``sqrt`` and two divisions.
FAST_MATH = True

_SQRT2 = tl.constexpr(1.4142135623730951)  # math.sqrt(2): the reference's diagonal rest length


def modelled_bytes_per_pixel(channels: int, itemsize: int = 4, *, offsets: bool = False) -> int:
    """DRAM bytes per pixel per iteration of the Triton path (the table in the module docstring).

    ``channels`` image channels, ``itemsize`` bytes per float (4 for float32), ``offsets``: the
    MSE is sampled at ``field + sample_offsets`` (one more field read). Flags are 1 byte.
    """
    fields = 2 * itemsize  # one (x, y) field or gradient pixel
    warp_forward = fields + 2 * channels * itemsize + 2 + itemsize + fields + (fields if offsets else 0)
    warp_backward = 2 * fields
    rigidity_forward = fields + itemsize + fields
    rigidity_backward = 3 * fields
    grad_sum = 3 * fields
    return warp_forward + warp_backward + rigidity_forward + rigidity_backward + grad_sum


@triton.jit
def _warp_mse_kernel(
    src_ptr,
    tgt_ptr,
    field_ptr,
    src_flags_ptr,
    tgt_flags_ptr,
    offsets_ptr,
    offsets_item_stride,
    grad_ptr,
    weight_ptr,
    part_sse_ptr,
    part_count_ptr,
    C,
    H,
    W,
    NEED_GRAD: tl.constexpr,
    HAS_OFFSETS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """``offsets_item_stride``: elements between batch items of the offsets (0 = broadcast)."""
    n = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    num_blocks = tl.num_programs(1)
    hw = H * W
    offs = block * BLOCK + tl.arange(0, BLOCK)
    inside = offs < hw
    y = offs // W
    x = offs % W

    fx = tl.load(field_ptr + n * 2 * hw + offs, mask=inside, other=0.0)
    fy = tl.load(field_ptr + n * 2 * hw + hw + offs, mask=inside, other=0.0)
    if HAS_OFFSETS:  # the same float additions as a separate ``field + offsets``
        offsets_item = offsets_ptr + n * offsets_item_stride
        fx = fx + tl.load(offsets_item + offs, mask=inside, other=0.0)
        fy = fy + tl.load(offsets_item + hw + offs, mask=inside, other=0.0)
    zero = tl.zeros_like(fx)
    one = zero + 1.0
    sx = x.to(fx.dtype) + fx
    sy = y.to(fy.dtype) + fy
    x0f = tl.floor(sx)
    y0f = tl.floor(sy)
    ax = sx - x0f
    ay = sy - y0f
    # Far outside (or NaN): park at -2 so that both taps are outside.
    x0 = tl.where((x0f >= -1.0) & (x0f <= W - 1.0), x0f, zero - 2.0).to(tl.int32)
    y0 = tl.where((y0f >= -1.0) & (y0f <= H - 1.0), y0f, zero - 2.0).to(tl.int32)
    in_x0 = x0 >= 0
    in_x1 = (x0 + 1 >= 0) & (x0 + 1 < W)
    in_y0 = y0 >= 0
    in_y1 = (y0 + 1 >= 0) & (y0 + 1 < H)
    m00 = inside & in_y0 & in_x0
    m01 = inside & in_y0 & in_x1
    m10 = inside & in_y1 & in_x0
    m11 = inside & in_y1 & in_x1
    o00 = y0 * W + x0
    w00 = (one - ax) * (one - ay)
    w01 = ax * (one - ay)
    w10 = (one - ax) * ay
    w11 = ax * ay

    sf = src_flags_ptr + n * hw
    f00 = tl.load(sf + o00, mask=m00, other=0)
    f01 = tl.load(sf + o00 + 1, mask=m01, other=0)
    f10 = tl.load(sf + o00 + W, mask=m10, other=0)
    f11 = tl.load(sf + o00 + W + 1, mask=m11, other=0)
    data = (
        tl.where((f00 & 1) != 0, w00, zero)
        + tl.where((f01 & 1) != 0, w01, zero)
        + tl.where((f10 & 1) != 0, w10, zero)
        + tl.where((f11 & 1) != 0, w11, zero)
    )
    src_defect = (
        (((f00 & 2) != 0) & (w00 > 0))
        | (((f01 & 2) != 0) & (w01 > 0))
        | (((f10 & 2) != 0) & (w10 > 0))
        | (((f11 & 2) != 0) & (w11 > 0))
    )
    tf = tl.load(tgt_flags_ptr + n * hw + offs, mask=inside, other=0)
    tgt_data = (tf & 1) != 0
    defect = ((tf & 2) != 0) | src_defect
    small = one / 1000.0  # 0.001 in the field's dtype
    weight = tl.where(defect, zero, tl.where(tgt_data, one, small))
    tl.store(weight_ptr + n * hw + offs, weight, mask=inside)
    valid = inside & tgt_data & (~defect) & (data >= one - small)

    sse = zero
    dx = zero
    dy = zero
    for c in range(C):
        sc = src_ptr + (n * C + c) * hw
        v00 = tl.load(sc + o00, mask=m00 & valid, other=0.0)
        v01 = tl.load(sc + o00 + 1, mask=m01 & valid, other=0.0)
        v10 = tl.load(sc + o00 + W, mask=m10 & valid, other=0.0)
        v11 = tl.load(sc + o00 + W + 1, mask=m11 & valid, other=0.0)
        t = tl.load(tgt_ptr + (n * C + c) * hw + offs, mask=valid, other=0.0)
        r = w00 * v00 + w01 * v01 + w10 * v10 + w11 * v11 - t
        r = tl.where(valid, r, zero)
        sse += r * r
        dx += r * ((one - ay) * (v01 - v00) + ay * (v11 - v10))
        dy += r * ((one - ax) * (v10 - v00) + ax * (v11 - v01))
    if NEED_GRAD:
        tl.store(grad_ptr + n * 2 * hw + offs, 2.0 * dx, mask=inside)
        tl.store(grad_ptr + n * 2 * hw + hw + offs, 2.0 * dy, mask=inside)
    tl.store(part_sse_ptr + n * num_blocks + block, tl.sum(sse, axis=0))
    tl.store(part_count_ptr + n * num_blocks + block, tl.sum(valid.to(tl.float32), axis=0))


@triton.jit
def _precise_sqrt(v):
    """IEEE round-to-nearest sqrt (``tl.sqrt`` is the fast approximate one for float32)."""
    if v.dtype == tl.float32:
        return tl.sqrt_rn(v)
    else:
        return tl.sqrt(v)


@triton.jit
def _spring(
    fx_ptr,
    fy_ptr,
    w_ptr,
    offs,
    y,
    x,
    H,
    W,
    fpx,
    fpy,
    wp,
    inside,
    DY: tl.constexpr,
    DX: tl.constexpr,
    REST: tl.constexpr,
    FAST_MATH: tl.constexpr,
):
    """Energy of the spring p -> p + (DY, DX) and ``k s`` with ``k = w w (|s| - |d|) / |s|``.

    ``REST`` = ``|d|`` as a Python float (1.0 or sqrt(2)), rounded once to the field's dtype."""
    ok = inside & (y + DY >= 0) & (y + DY < H) & (x + DX >= 0) & (x + DX < W)
    q = offs + DY * W + DX
    fqx = tl.load(fx_ptr + q, mask=ok, other=0.0)
    fqy = tl.load(fy_ptr + q, mask=ok, other=0.0)
    wq = tl.load(w_ptr + q, mask=ok, other=0.0)
    zero = tl.zeros_like(fpx)
    ww = wp * wq
    sx = fqx - fpx + DX
    sy = fqy - fpy + DY
    square = sx * sx + sy * sy
    rest = tl.full(fpx.shape, REST, fpx.dtype)  # a float64 field gets the float64 sqrt(2)
    rest_square = zero + (DX * DX + DY * DY)
    if FAST_MATH:
        positive = square > 0
        inverse = tl.where(positive, tl.rsqrt(tl.where(positive, square, zero + 1.0)), zero)  # 1/|s|, 0 at 0
        length = square * inverse
        stretch = (square - rest_square) / (length + rest)  # = length - rest
        k = ww * stretch * inverse
    else:
        length = _precise_sqrt(square)
        stretch = (square - rest_square) / (length + rest)  # = length - rest
        positive = length > 0
        k = tl.where(positive, ww * stretch / tl.where(positive, length, zero + 1.0), zero)
    return ww * stretch * stretch, k * sx, k * sy


@triton.jit
def _rigidity_kernel(
    field_ptr,
    weight_ptr,
    grad_ptr,
    part_energy_ptr,
    part_sumsq_ptr,
    H,
    W,
    NEED_GRAD: tl.constexpr,
    FAST_MATH: tl.constexpr,
    BLOCK: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    num_blocks = tl.num_programs(1)
    hw = H * W
    offs = block * BLOCK + tl.arange(0, BLOCK)
    inside = offs < hw
    y = offs // W
    x = offs % W
    fx_ptr = field_ptr + n * 2 * hw
    fy_ptr = fx_ptr + hw
    w_ptr = weight_ptr + n * hw
    fpx = tl.load(fx_ptr + offs, mask=inside, other=0.0)
    fpy = tl.load(fy_ptr + offs, mask=inside, other=0.0)
    wp = tl.load(w_ptr + offs, mask=inside, other=0.0)

    e0, ax0, ay0 = _spring(
        fx_ptr, fy_ptr, w_ptr, offs, y, x, H, W, fpx, fpy, wp, inside, -1, -1, _SQRT2, FAST_MATH)
    e1, ax1, ay1 = _spring(
        fx_ptr, fy_ptr, w_ptr, offs, y, x, H, W, fpx, fpy, wp, inside, -1, 0, 1.0, FAST_MATH)
    e2, ax2, ay2 = _spring(
        fx_ptr, fy_ptr, w_ptr, offs, y, x, H, W, fpx, fpy, wp, inside, -1, 1, _SQRT2, FAST_MATH)
    e3, ax3, ay3 = _spring(
        fx_ptr, fy_ptr, w_ptr, offs, y, x, H, W, fpx, fpy, wp, inside, 0, -1, 1.0, FAST_MATH)
    e4, ax4, ay4 = _spring(
        fx_ptr, fy_ptr, w_ptr, offs, y, x, H, W, fpx, fpy, wp, inside, 0, 1, 1.0, FAST_MATH)
    e5, ax5, ay5 = _spring(
        fx_ptr, fy_ptr, w_ptr, offs, y, x, H, W, fpx, fpy, wp, inside, 1, -1, _SQRT2, FAST_MATH)
    e6, ax6, ay6 = _spring(
        fx_ptr, fy_ptr, w_ptr, offs, y, x, H, W, fpx, fpy, wp, inside, 1, 0, 1.0, FAST_MATH)
    e7, ax7, ay7 = _spring(
        fx_ptr, fy_ptr, w_ptr, offs, y, x, H, W, fpx, fpy, wp, inside, 1, 1, _SQRT2, FAST_MATH)
    energy = e0 + e1 + e2 + e3 + e4 + e5 + e6 + e7
    if NEED_GRAD:
        gx = -4.0 * (ax0 + ax1 + ax2 + ax3 + ax4 + ax5 + ax6 + ax7)
        gy = -4.0 * (ay0 + ay1 + ay2 + ay3 + ay4 + ay5 + ay6 + ay7)
        tl.store(grad_ptr + n * 2 * hw + offs, gx, mask=inside)
        tl.store(grad_ptr + n * 2 * hw + hw + offs, gy, mask=inside)
    tl.store(part_energy_ptr + n * num_blocks + block, tl.sum(energy, axis=0))
    tl.store(part_sumsq_ptr + n * num_blocks + block, tl.sum(fpx * fpx + fpy * fpy, axis=0))


class TritonKernels:
    """:class:`~emcore.finetune.loss_fused.LossKernels` in Triton (contiguous tensors, one device).

    Args:
        block: pixels per program, a power of two >= 16 (default :data:`BLOCK`).
        num_warps: warps per program, a power of two from 1 to 32 (default :data:`NUM_WARPS`).
        fast_math: ``rsqrt`` spring arithmetic, ``False`` = precise (default :data:`FAST_MATH`;
            see the module doc).
    """

    def __init__(self, block: int = BLOCK, num_warps: int = NUM_WARPS, fast_math: bool = FAST_MATH) -> None:
        if not isinstance(block, int) or block < 16 or block & (block - 1):
            raise ValueError(f"block must be a power of two >= 16, got {block!r}")
        if num_warps not in (1, 2, 4, 8, 16, 32):
            raise ValueError(f"num_warps must be a power of two from 1 to 32, got {num_warps!r}")
        self.block = block
        self.num_warps = num_warps
        self.fast_math = bool(fast_math)

    def __repr__(self) -> str:
        return f"TritonKernels(block={self.block}, num_warps={self.num_warps}, fast_math={self.fast_math})"

    def warp_mse(
        self,
        src: torch.Tensor,
        tgt: torch.Tensor,
        field: torch.Tensor,
        src_flags: torch.Tensor,
        tgt_flags: torch.Tensor,
        need_grad: bool,
        sample_offsets: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        n, c, h, w = src.shape
        num_blocks = triton.cdiv(h * w, self.block)
        weight = torch.empty(n, 1, h, w, dtype=field.dtype, device=field.device)
        grad = torch.empty_like(field) if need_grad else None
        part_sse = torch.empty(n, num_blocks, dtype=field.dtype, device=field.device)
        part_count = torch.empty(n, num_blocks, dtype=torch.float32, device=field.device)
        if sample_offsets is None:
            offsets, offsets_item_stride = field, 0  # not read (HAS_OFFSETS=False)
        else:
            offsets = sample_offsets.contiguous()
            offsets_item_stride = 0 if offsets.shape[0] == 1 else 2 * h * w
        _warp_mse_kernel[(n, num_blocks)](
            src, tgt, field, src_flags, tgt_flags, offsets, offsets_item_stride,
            grad if grad is not None else weight, weight, part_sse, part_count, c, h, w,
            NEED_GRAD=need_grad, HAS_OFFSETS=sample_offsets is not None, BLOCK=self.block,
            num_warps=self.num_warps,
        )  # fmt: skip
        return part_sse.sum(1, dtype=torch.float64), part_count.sum(1, dtype=torch.float64), weight, grad

    def rigidity(
        self, field: torch.Tensor, weight: torch.Tensor, need_grad: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        n, _, h, w = field.shape
        num_blocks = triton.cdiv(h * w, self.block)
        grad = torch.empty_like(field) if need_grad else None
        part_energy = torch.empty(n, num_blocks, dtype=field.dtype, device=field.device)
        part_sumsq = torch.empty(n, num_blocks, dtype=field.dtype, device=field.device)
        _rigidity_kernel[(n, num_blocks)](
            field, weight, grad if grad is not None else field, part_energy, part_sumsq, h, w,
            NEED_GRAD=need_grad, FAST_MATH=self.fast_math, BLOCK=self.block, num_warps=self.num_warps,
        )  # fmt: skip
        return part_energy.sum(1, dtype=torch.float64), part_sumsq.sum(1, dtype=torch.float64), grad


def triton_terms(
    src: torch.Tensor,
    tgt: torch.Tensor,
    field: torch.Tensor,
    src_flags: torch.Tensor,
    tgt_flags: torch.Tensor,
    *,
    kernels: TritonKernels | None = None,
    sample_offsets: torch.Tensor | None = None,
) -> LossTerms:
    """The loss terms through the Triton kernels (inputs validated by ``emcore.finetune.losses``).

    ``kernels``: the knobs (default ``TritonKernels()``: :data:`BLOCK`, :data:`NUM_WARPS`,
    :data:`FAST_MATH`). ``sample_offsets``: optional ``(1 or N, 2, H, W)`` px added to ``field``
    for the MSE part only, inside the warp kernel (no extra pass over the field)."""
    kernels = kernels if kernels is not None else TritonKernels()
    mse, weight = WarpMSE.apply(field, src, tgt, src_flags, tgt_flags, kernels, sample_offsets)
    rigidity, l2 = RigidityL2.apply(field, weight, kernels)
    return LossTerms(mse, rigidity, l2)
