"""Fused fast path of the finetuner loss: analytic forward+backward as custom autograd Functions.

Same loss as :mod:`emcore.finetune.loss_reference` (read that docstring for the spec), computed
without an autograd graph:

* :class:`WarpMSE` - one sweep over the output pixels: the bilinear sample of every channel at
  ``p + field(p)`` and its x/y derivatives, the warped source has-data/defect masks, ``valid(p)``
  and ``w(p)``, the residual, and ``d mse / d field`` (the C++ kernel goes row by row, splitting
  each row into vectorizable passes over row buffers that stay in L1). The gradient is computed
  in the forward pass (the tap values are already loaded) and saved; backward only scales it by
  the incoming gradient. ``w`` is returned as a non-differentiable second output for the rigidity term.
* :class:`RigidityL2` - one pass over the pixels with their 8 springs: the spring energy and its
  gradient, written as a gather (each spring appears from both ends and ``d energy / d spring`` is
  odd, so ``grad(p) = -4 sum_d w(p) w(p+d) (|s| - |d|) s / |s|`` with ``s = d + field(p+d) -
  field(p)``: no scatter, no atomics), plus the field's sum of squares for ``l2``. Every backend
  computes the stretch as ``(|s|^2 - |d|^2) / (|s| + |d|)`` (no cancellation; see the reference).

Both Functions take a *kernels* object that does the per-pixel work (the :class:`LossKernels`
protocol), so the CPU kernels here and the Triton kernels of :mod:`emcore.finetune.loss_triton`
share the autograd plumbing:

* :class:`CppKernels` - C++17/OpenMP (``csrc/loss_kernels.cpp``), compiled with ``g++ -O3
  -march=native -fno-math-errno -fopenmp`` at first use (1.6 s measured: no torch headers, called
  through ctypes) into a cache directory (``$SECTIONFLOW_KERNEL_CACHE``, default
  ``~/.cache/sectionflow/kernels``), keyed by the source, flags, compiler and CPU, so later
  processes load it at once. Threads: ``torch.get_num_threads()`` (fewer on small inputs).
  Partial sums are per image row in float64, so results do not depend on the thread count.
* :class:`TorchKernels` - the same analytic formulas in vectorized torch (gathers for the four
  taps, slices for the springs). Used automatically when no C++ compiler works (with a warning)
  and for non-CPU tensors.

``$SECTIONFLOW_FUSED_IMPL`` picks the CPU implementation: ``auto`` (default: C++ if it builds,
else torch), ``cpp`` (fail if it does not build) or ``torch``.

The Functions are differentiable once (``create_graph=True`` double backward raises).

Non-differentiable points: the bilinear sample has kinks where ``p + field(p)`` crosses an integer
coordinate; like ``grid_sample`` the derivative there is taken on the side of ``floor``. A spring
of length 0 gets gradient 0.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from emcore.finetune.loss_reference import DEFECT, HAS_DATA, NEIGHBOURS, LossTerms, neighbour_pairs

__all__ = [
    "CppKernels",
    "LossKernels",
    "RigidityL2",
    "TorchKernels",
    "WarpMSE",
    "cpu_kernels",
    "fused_terms",
]

_SOURCE = Path(__file__).with_name("csrc") / "loss_kernels.cpp"
_CXX_FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fopenmp", "-shared", "-fPIC", "-std=c++17")


class LossKernels(Protocol):
    """Per-pixel work of the fused loss. All tensors contiguous, same device; flags uint8.

    ``warp_mse(src, tgt, field, src_flags, tgt_flags, need_grad, sample_offsets=None)`` returns
    ``(sse, count, weight, grad)``: per-item sum of masked squared residuals ``(N,)`` and
    valid-pixel count ``(N,)`` (any float dtype), ``w`` ``(N, 1, H, W)`` in the field's dtype, and
    ``d sse / d field`` ``(N, 2, H, W)`` (``None`` unless ``need_grad``). With ``sample_offsets``
    (``(1 or N, 2, H, W)`` px, same dtype and device, a first dimension of 1 broadcast over the
    batch) everything is computed at ``field + sample_offsets`` (the source is sampled there); the
    gradient is the same expression, so it is also ``d sse / d field``.

    ``rigidity(field, weight, need_grad)`` returns ``(energy, sumsq, grad)``: per-item spring energy
    sum (not yet divided by ``H W``) ``(N,)``, per-item ``sum field^2`` ``(N,)``, and
    ``d energy / d field`` ``(N, 2, H, W)`` (``None`` unless ``need_grad``).
    """

    def warp_mse(
        self,
        src: torch.Tensor,
        tgt: torch.Tensor,
        field: torch.Tensor,
        src_flags: torch.Tensor,
        tgt_flags: torch.Tensor,
        need_grad: bool,
        sample_offsets: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]: ...

    def rigidity(
        self, field: torch.Tensor, weight: torch.Tensor, need_grad: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]: ...


class WarpMSE(torch.autograd.Function):
    """``(mse, w) = WarpMSE.apply(field, src, tgt, src_flags, tgt_flags, kernels, sample_offsets)``.

    ``mse`` ``(N,)`` is differentiable w.r.t. ``field`` (analytic gradient from the forward pass);
    ``w`` ``(N, 1, H, W)`` is the rigidity weight (not differentiable). ``sample_offsets``: ``None``
    or ``(1 or N, 2, H, W)`` px added to ``field`` where the source is sampled, passed on to the
    kernels (a constant: no gradient).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        field: torch.Tensor,
        src: torch.Tensor,
        tgt: torch.Tensor,
        src_flags: torch.Tensor,
        tgt_flags: torch.Tensor,
        kernels: LossKernels,
        sample_offsets: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        need_grad = bool(ctx.needs_input_grad[0])
        field = field.contiguous()
        sse, count, weight, grad = kernels.warp_mse(
            src, tgt, field, src_flags, tgt_flags, need_grad, sample_offsets=sample_offsets
        )
        denom = torch.clamp(count.to(torch.float64) * src.shape[1], min=1.0)
        mse = (sse.to(torch.float64) / denom).to(field.dtype)
        if need_grad:
            assert grad is not None
            ctx.save_for_backward(grad.mul_((1.0 / denom).to(field.dtype).view(-1, 1, 1, 1)))
        ctx.mark_non_differentiable(weight)
        return mse, weight

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_mse: torch.Tensor, grad_weight: torch.Tensor) -> tuple[Any, ...]:
        (grad,) = ctx.saved_tensors
        return grad * grad_mse.view(-1, 1, 1, 1), None, None, None, None, None, None


class RigidityL2(torch.autograd.Function):
    """``(rigidity, l2) = RigidityL2.apply(field, weight, kernels)``, both ``(N,)``.

    ``rigidity`` is the 8-neighbour spring energy over ``H W``; ``l2`` the mean of ``field^2``
    over ``(2, H, W)``. Both differentiable w.r.t. ``field``; ``weight`` is a constant.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, field: torch.Tensor, weight: torch.Tensor, kernels: LossKernels
    ) -> tuple[torch.Tensor, torch.Tensor]:
        need_grad = bool(ctx.needs_input_grad[0])
        field = field.contiguous()
        _, _, h, w = field.shape
        energy, sumsq, grad = kernels.rigidity(field, weight, need_grad)
        rigidity = (energy.to(torch.float64) / (h * w)).to(field.dtype)
        l2 = (sumsq.to(torch.float64) / (2 * h * w)).to(field.dtype)
        if need_grad:
            assert grad is not None
            ctx.save_for_backward(field, grad)
        return rigidity, l2

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_rigidity: torch.Tensor, grad_l2: torch.Tensor) -> tuple[Any, ...]:
        field, grad = ctx.saved_tensors
        _, _, h, w = field.shape
        scale_r = (grad_rigidity / (h * w)).view(-1, 1, 1, 1)
        scale_l2 = (grad_l2 / (h * w)).view(-1, 1, 1, 1)  # d/df of sum f^2 / (2HW) = f / (HW)
        return torch.addcmul(grad * scale_r, field, scale_l2), None, None


# ---------------------------------------------------------------------------------------------
# Vectorized torch kernels (fallback, and any device)


class TorchKernels:
    """The analytic kernels in vectorized torch (no autograd graph). Any device."""

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
        if sample_offsets is not None:
            field = field + sample_offsets
        n, c, h, w = src.shape
        hw, row = h * w, w + 2  # images are padded by one zero pixel: every tap is a valid index
        dtype, device = field.dtype, field.device
        sx = torch.arange(w, dtype=dtype, device=device).view(1, 1, w) + field[:, 0]
        sy = torch.arange(h, dtype=dtype, device=device).view(1, h, 1) + field[:, 1]
        x0f, y0f = sx.floor(), sy.floor()
        # Positions with a tap in the image; the others (and NaN) read the padding corner with
        # weight 1 (no data: such pixels are never valid, their residual is 0).
        near = (x0f >= -1) & (x0f <= w - 1) & (y0f >= -1) & (y0f <= h - 1)
        ax = torch.where(near, sx - x0f, 0.0).view(n, 1, hw)
        ay = torch.where(near, sy - y0f, 0.0).view(n, 1, hw)
        corner = torch.where(near, (y0f + 1) * row + (x0f + 1), 0.0).long().view(n, 1, hw)
        tap_offsets = torch.tensor([0, 1, row, row + 1], device=device).view(1, 4, 1)
        index = corner + tap_offsets  # (n, 4, hw): taps 00, 01, 10, 11 (row, column)
        bx, by = 1 - ax, 1 - ay
        weights = torch.cat((bx * by, ax * by, bx * ay, ax * ay), dim=1)  # (n, 4, hw)

        padded_flags = F.pad(src_flags, (1, 1, 1, 1)).view(n, 1, -1)
        flags = torch.gather(padded_flags.expand(n, 4, -1), 2, index)
        data = (weights * (flags & HAS_DATA)).sum(dim=1)
        src_defect = (((flags & DEFECT) != 0) & (weights > 0)).any(dim=1)
        tgt_flat = tgt_flags.view(n, hw)
        tgt_data = (tgt_flat & HAS_DATA) != 0
        defect = ((tgt_flat & DEFECT) != 0) | src_defect
        no_data = torch.full_like(data, 0.001)  # in the field's dtype (a float32 0.001 would differ)
        weight_out = torch.where(defect, 0.0, torch.where(tgt_data, 1.0, no_data))
        valid = tgt_data & ~defect & (data >= 0.999)

        padded_src = F.pad(src, (1, 1, 1, 1)).view(n, c, 1, -1)
        taps = torch.gather(padded_src.expand(n, c, 4, -1), 3, index.view(n, 1, 4, hw).expand(n, c, 4, hw))
        v00, v01, v10, v11 = taps.unbind(dim=2)  # each (n, c, hw)
        warped = (taps * weights.view(n, 1, 4, hw)).sum(dim=2)
        residual = (warped - tgt.view(n, c, hw)) * valid.view(n, 1, hw)
        sse = residual.square().sum(dim=(1, 2), dtype=torch.float64)
        count = valid.sum(dim=1).to(torch.float64)
        grad = None
        if need_grad:
            d_dx = by * (v01 - v00) + ay * (v11 - v10)
            d_dy = bx * (v10 - v00) + ax * (v11 - v01)
            grad = 2 * torch.stack(((residual * d_dx).sum(1), (residual * d_dy).sum(1)), dim=1)
            grad = grad.view(n, 2, h, w)
        return sse, count, weight_out.view(n, 1, h, w), grad

    def rigidity(
        self, field: torch.Tensor, weight: torch.Tensor, need_grad: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        n = field.shape[0]
        energy = torch.zeros(n, dtype=torch.float64, device=field.device)
        grad = torch.zeros_like(field) if need_grad else None
        # Each undirected spring once (dy, dx) with dy > 0 or (dy == 0, dx > 0), counted twice.
        for dy, dx in NEIGHBOURS:
            if (dy, dx) <= (0, 0):
                continue
            f_p, f_q = neighbour_pairs(field, dy, dx)
            w_p, w_q = neighbour_pairs(weight, dy, dx)
            ww = w_p * w_q
            spring = f_q - f_p
            spring[:, 0] += dx
            spring[:, 1] += dy
            spring_x, spring_y = spring.unbind(dim=1)
            square = torch.addcmul(spring_x * spring_x, spring_y, spring_y).unsqueeze(1)
            length = square.sqrt()  # (torch.linalg.vector_norm is ~60x slower)
            rest_square = dx * dx + dy * dy
            stretch = (square - rest_square) / (length + rest_square**0.5)  # = length - rest, no cancellation
            weighted = ww * stretch
            energy += 2 * (weighted * stretch).sum(dim=(1, 2, 3), dtype=torch.float64)
            if grad is not None:
                k = (4 * weighted / torch.where(length > 0, length, 1.0)) * spring  # 0 where length is 0
                g_p, g_q = neighbour_pairs(grad, dy, dx)
                g_q += k
                g_p -= k
        sumsq = field.square().sum(dim=(1, 2, 3), dtype=torch.float64)
        return energy, sumsq, grad


# ---------------------------------------------------------------------------------------------
# C++ kernels


def _cache_dir() -> Path:
    if root := os.environ.get("SECTIONFLOW_KERNEL_CACHE"):
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "sectionflow" / "kernels"


def _cpu_signature() -> str:
    """What ``-march=native`` depends on: the CPU model and feature flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() + platform.machine()
    lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags", "Features"))]
    return "\n".join(sorted(set(lines)))


def build_cpp_library(*, verbose: bool = False) -> Path:
    """Compile ``csrc/loss_kernels.cpp`` into the cache (once per source/compiler/CPU) and return it.

    Raises:
        RuntimeError: no C++ compiler (``$CXX`` or ``g++``) or the compilation failed.
    """
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        raise RuntimeError(f"no C++ compiler: {cxx!r} is not on PATH (set $CXX)")
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=False).stdout
    key = hashlib.sha256(
        "\0".join([_SOURCE.read_text(), " ".join(_CXX_FLAGS), version, _cpu_signature()]).encode()
    ).hexdigest()[:16]
    target = _cache_dir() / f"loss_kernels_{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".so", delete=False) as tmp:
        tmp_path = Path(tmp.name)
    try:
        cmd = [cxx, *_CXX_FLAGS, str(_SOURCE), "-o", str(tmp_path)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"compiling {_SOURCE.name} failed ({' '.join(cmd)}):\n{done.stderr[-2000:]}")
        if verbose:
            print(" ".join(cmd))
        os.replace(tmp_path, target)  # atomic: concurrent builders each write their own temp file
    finally:
        tmp_path.unlink(missing_ok=True)
    return target


_CTYPES = {torch.float32: ("f32", ctypes.c_float), torch.float64: ("f64", ctypes.c_double)}


#: Below this many pixels the C++ kernels run on one thread (waking OpenMP threads costs more).
MIN_PIXELS_PER_EXTRA_THREAD = 1 << 15


def _num_threads(pixels: int) -> int:
    return max(1, min(torch.get_num_threads(), pixels // MIN_PIXELS_PER_EXTRA_THREAD))


class CppKernels:
    """The C++/OpenMP kernels, for contiguous CPU float32/float64 tensors.

    Threads: ``torch.get_num_threads()``, fewer on small inputs (one per 32768 pixels).
    """

    def __init__(self, library: Path) -> None:
        self.library = library
        self._lib = ctypes.CDLL(str(library))
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        for suffix in ("f32", "f64"):
            fn = getattr(self._lib, f"warp_mse_{suffix}")
            fn.argtypes = [ptr] * 5 + [i64] * 4 + [ctypes.c_int] * 2 + [ptr] * 4
            fn.restype = None
            fn = getattr(self._lib, f"rigidity_{suffix}")
            fn.argtypes = [ptr] * 2 + [i64] * 3 + [ctypes.c_int] * 2 + [ptr] * 3
            fn.restype = None

    @staticmethod
    def _check(*tensors: torch.Tensor) -> None:
        for t in tensors:
            if t.device.type != "cpu" or not t.is_contiguous():
                raise ValueError("CppKernels need contiguous CPU tensors")

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
        if sample_offsets is not None:
            field = (field + sample_offsets).contiguous()
        self._check(src, tgt, field, src_flags, tgt_flags)
        n, c, h, w = src.shape
        suffix, _ = _CTYPES[field.dtype]
        weight = torch.empty(n, 1, h, w, dtype=field.dtype)
        grad = torch.empty_like(field) if need_grad else None
        row_sse = torch.empty(n, h, dtype=torch.float64)
        row_count = torch.empty(n, h, dtype=torch.float64)
        getattr(self._lib, f"warp_mse_{suffix}")(
            src.data_ptr(), tgt.data_ptr(), field.data_ptr(), src_flags.data_ptr(), tgt_flags.data_ptr(),
            n, c, h, w, int(need_grad), _num_threads(n * h * w),
            grad.data_ptr() if grad is not None else None, weight.data_ptr(),
            row_sse.data_ptr(), row_count.data_ptr(),
        )  # fmt: skip
        return row_sse.sum(1), row_count.sum(1), weight, grad

    def rigidity(
        self, field: torch.Tensor, weight: torch.Tensor, need_grad: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        self._check(field, weight)
        n, _, h, w = field.shape
        suffix, _ = _CTYPES[field.dtype]
        grad = torch.empty_like(field) if need_grad else None
        row_energy = torch.empty(n, h, dtype=torch.float64)
        row_sumsq = torch.empty(n, h, dtype=torch.float64)
        getattr(self._lib, f"rigidity_{suffix}")(
            field.data_ptr(), weight.data_ptr(), n, h, w, int(need_grad), _num_threads(n * h * w),
            grad.data_ptr() if grad is not None else None, row_energy.data_ptr(), row_sumsq.data_ptr(),
        )  # fmt: skip
        return row_energy.sum(1), row_sumsq.sum(1), grad


@functools.cache
def _cpp_kernels_or_error() -> CppKernels | str:
    try:
        return CppKernels(build_cpp_library())
    except (RuntimeError, OSError) as err:
        return str(err)


def cpu_kernels(impl: str | None = None) -> LossKernels:
    """The CPU kernels to use: ``impl`` (or ``$SECTIONFLOW_FUSED_IMPL``) ``auto``/``cpp``/``torch``."""
    impl = impl or os.environ.get("SECTIONFLOW_FUSED_IMPL", "auto")
    if impl not in ("auto", "cpp", "torch"):
        raise ValueError(f"fused implementation must be 'auto', 'cpp' or 'torch', got {impl!r}")
    if impl == "torch":
        return TorchKernels()
    kernels = _cpp_kernels_or_error()
    if isinstance(kernels, CppKernels):
        return kernels
    if impl == "cpp":
        raise RuntimeError(f"the C++ loss kernels are not available: {kernels}")
    warnings.warn(
        f"C++ loss kernels unavailable ({kernels.splitlines()[0]}); using the slower torch fallback",
        RuntimeWarning,
        stacklevel=3,
    )
    return TorchKernels()


def fused_terms(
    src: torch.Tensor,
    tgt: torch.Tensor,
    field: torch.Tensor,
    src_flags: torch.Tensor,
    tgt_flags: torch.Tensor,
    *,
    kernels: LossKernels | None = None,
    sample_offsets: torch.Tensor | None = None,
) -> LossTerms:
    """The loss terms through the fused Functions (inputs validated by ``emcore.finetune.losses``).

    ``kernels`` defaults to :func:`cpu_kernels` for CPU tensors and :class:`TorchKernels` otherwise.
    ``sample_offsets``: optional px added to ``field`` for the MSE part only (see
    :func:`emcore.finetune.loss_reference.reference_terms`).
    """
    if kernels is None:
        kernels = cpu_kernels() if field.device.type == "cpu" else TorchKernels()
    mse, weight = WarpMSE.apply(field, src, tgt, src_flags, tgt_flags, kernels, sample_offsets)
    rigidity, l2 = RigidityL2.apply(field, weight, kernels)
    return LossTerms(mse, rigidity, l2)
