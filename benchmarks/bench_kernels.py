"""Speed, memory and accuracy of the finetuner loss backends (``emcore.finetune.losses``).

One iteration = forward + backward of the full loss (``alignment_loss`` with masks precomputed
by ``prepare_masks``, as the optimizer does), on real EM: bundled VNC sections
(``data/vnc_stack1``, 1024 px, normalized over tissue) as targets, the same sections warped by a
known smooth field (4 px, ``emcore.synthetic.smooth_field``) as sources, a field near the aligning
one, and a 3 px crack (target defect) across each pair. Sizes: one 512 px pair, one 1024 px pair,
a batch of 16 (``--quick``: a batch of 4) 512 px crops.

Speed table: backend, size, threads, Mpx*it/s (``N H W`` x iterations / s), ratio to the
``reference`` backend measured in the same run with the same size and threads, and peak memory
above the starting point (CPU: peak RSS, reset through ``/proc/self/clear_refs``; CUDA:
``torch.cuda.max_memory_allocated``). On CUDA also the fraction of the bandwidth roofline
(modelled bytes per pixel per iteration, see ``emcore.finetune.loss_triton``, over the bandwidth
of a large device copy).

Accuracy table (float32, 512 px pair): relative L2 error of each backend's loss terms and gradient
against the float32 reference and against the float64 reference.

Sweep (``--cuda-only --sweep``, CUDA only, instead of the tables above): the Triton kernels' knobs
(``emcore.finetune.loss_triton.TritonKernels``: ``block`` 128-2048 x ``num_warps`` 2-8 with 1 to 8
pixels per thread, x ``fast_math``: 22 configs) on 1x512^2, 16x512^2 and 64x1024^2, each row
forward+backward replayed as a CUDA graph, Mpx*it/s, ratio to the default knobs measured in the
same run on the same size, and the roofline fraction.
Every config is compiled and warmed once before any timing; the default is timed again at the
end of each size (the spread of the two is the noise). Per size also the default and the best
knobs with sample offsets (``(1, 2, H, W)`` jitter offsets of ``jittered_target``, read in the
warp kernel). Last, the knobs with the best geometric mean of the ratio over the sizes.

    .venv/bin/python -m benchmarks.bench_kernels [--quick]
    .venv/bin/python -m benchmarks.bench_kernels --cuda-only --sweep
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import itertools
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from emcore.bundled import load_vnc_sections
from emcore.field import warp
from emcore.finetune.loss_fused import cpu_kernels, fused_terms
from emcore.finetune.losses import LossMasks, alignment_loss, prepare_masks
from emcore.normalize import normalize, section_stats
from emcore.synthetic import smooth_field

if TYPE_CHECKING:  # triton is optional: imported where the Triton rows run
    from emcore.finetune.loss_triton import TritonKernels

SM, L2_WEIGHT = 200.0, 1e-4


@dataclass(frozen=True)
class Batch:
    name: str
    src: torch.Tensor
    tgt: torch.Tensor
    field: torch.Tensor
    masks: LossMasks

    @property
    def megapixels(self) -> float:
        n, _, h, w = self.src.shape
        return n * h * w / 1e6

    def to(self, device: str) -> Batch:
        masks = LossMasks(self.masks.src_flags.to(device), self.masks.tgt_flags.to(device))
        return Batch(self.name, self.src.to(device), self.tgt.to(device), self.field.to(device), masks)


def make_batch(name: str, n: int, size: int) -> Batch:
    """``n`` real pairs of ``size`` px (crops of the bundled sections, cycling through them)."""
    sections = load_vnc_sections()
    per_side = 1024 // size
    tgts, srcs, fields = [], [], []
    for i in range(n):
        section = sections[i % len(sections)]
        tile = (i // len(sections)) % (per_side * per_side)
        y, x = (tile // per_side) * size, (tile % per_side) * size
        raw = section[y : y + size, x : x + size]
        stats = section_stats(raw)
        tgt = torch.from_numpy(normalize(raw, stats.mean, stats.std)).view(1, 1, size, size)
        applied = smooth_field(size, size, 4.0, seed=i)
        srcs.append(warp(tgt, applied))
        tgts.append(tgt)
        fields.append(-0.8 * applied)
    src, tgt, field = torch.cat(srcs), torch.cat(tgts), torch.cat(fields)
    defects = torch.zeros(n, 1, size, size, dtype=torch.bool)
    defects[..., size // 3 : size // 3 + 3, :] = True
    return Batch(name, src, tgt, field, prepare_masks(src, tgt, tgt_defects=defects))


def _loss_fn(backend: str) -> Callable[[Batch, torch.Tensor], torch.Tensor]:
    """``(batch, field) -> scalar loss`` for a row label of the table."""
    if backend.startswith("fused-"):
        kernels = cpu_kernels(backend.removeprefix("fused-"))

        def fused(b: Batch, f: torch.Tensor) -> torch.Tensor:
            t = fused_terms(b.src, b.tgt, f, b.masks.src_flags, b.masks.tgt_flags, kernels=kernels)
            return (t.mse + SM * t.rigidity + L2_WEIGHT * t.l2).mean()

        return fused
    def public(b: Batch, f: torch.Tensor) -> torch.Tensor:
        return alignment_loss(b.src, b.tgt, f, masks=b.masks, sm=SM, l2_weight=L2_WEIGHT, backend=backend)

    return public


class PeakMemory:
    """Peak memory above the start of a ``with`` block, in MiB (CPU RSS or CUDA allocator)."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.mib: float | None = None

    @staticmethod
    def _status(key: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1]) * 1024
        raise KeyError(key)

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated()
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
                self._start = self._status("VmRSS")
            except OSError:
                self._start = None
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.mib = (torch.cuda.max_memory_allocated() - self._start) / 2**20
        elif self._start is not None:
            self.mib = (self._status("VmHWM") - self._start) / 2**20


def time_backend(
    backend: str, batch: Batch, min_seconds: float, min_iters: int, *, graph: bool = False
) -> tuple[float, float | None]:
    """``(Mpx*it/s, peak MiB)`` of forward+backward iterations of ``backend`` on ``batch``.

    ``graph=True`` (CUDA): the iteration is captured once into a CUDA graph and replayed, as the
    finetuner's optimizer does on CUDA, so the rate is the kernels' and not Python's launch rate.
    """
    return time_loss(_loss_fn(backend), batch, min_seconds, min_iters, graph=graph)


def time_loss(
    fn: Callable[[Batch, torch.Tensor], torch.Tensor],
    batch: Batch,
    min_seconds: float,
    min_iters: int,
    *,
    graph: bool = False,
) -> tuple[float, float | None]:
    """:func:`time_backend` for a loss function ``fn(batch, field) -> scalar``."""
    field = batch.field.clone().requires_grad_(True)
    sync = torch.cuda.synchronize if batch.field.is_cuda else (lambda: None)

    def step() -> None:
        field.grad = None
        fn(batch, field).backward()

    run = step
    with PeakMemory("cuda" if batch.field.is_cuda else "cpu") as peak:
        if batch.field.is_cuda:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up: Triton compiles at the first launch
                for _ in range(3):
                    step()
            torch.cuda.current_stream().wait_stream(side)
            sync()
            if graph:
                cuda_graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(cuda_graph):
                    fn(batch, field).backward()  # grads accumulate into the static .grad
                run = cuda_graph.replay
        # Rounds of iterations, each sized from the rate so far and followed by a sync: launches
        # are asynchronous, and a loop that only watched the clock would queue up to ~1000
        # iterations beyond min_seconds (seconds of extra wall time per row for large batches).
        iters, start, elapsed, rounds = 0, time.perf_counter(), 0.0, max(1, min_iters)
        while iters < min_iters or elapsed < min_seconds:
            for _ in range(rounds):
                run()
            iters += rounds
            sync()
            elapsed = time.perf_counter() - start
            rounds = max(1, math.ceil((min_seconds - elapsed) * iters / max(elapsed, 1e-9)))
    field.grad = None
    return batch.megapixels * iters / elapsed, peak.mib


def device_bandwidth(device: str) -> float:
    """Bytes/s of a large device-to-device copy (read + write)."""
    x = torch.empty(2**28, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    torch.cuda.synchronize()
    start, reps = time.perf_counter(), 20
    for _ in range(reps):
        y.copy_(x)
    torch.cuda.synchronize()
    return 2 * x.numel() * reps / (time.perf_counter() - start)


SWEEP_SHAPES = (("1x512^2", 1, 512), ("16x512^2", 16, 512), ("64x1024^2", 64, 1024))
SWEEP_BLOCKS = (128, 256, 512, 1024, 2048)
SWEEP_WARPS = (2, 4, 8)
#: Pixels per thread (``block / (32 num_warps)``) kept in the sweep. The H200 sweep of 2026-11-26
#: measured 16 and 32 (1024/2, 2048/2, 2048/4) at 0.2-0.67x the default on every size (spills),
#: and fewer than 1 leaves threads idle; dropping them saves their compilation.
SWEEP_PIXELS_PER_THREAD = (1, 8)
SWEEP_SECONDS = 0.3  # per timed row (graph replays: ~50-4000 iterations)


def _triton_loss_fn(
    kernels: TritonKernels, offsets: torch.Tensor | None = None
) -> Callable[[Batch, torch.Tensor], torch.Tensor]:
    """``(batch, field) -> scalar loss`` through the Triton kernels with the given knobs."""
    from emcore.finetune.loss_triton import triton_terms

    def fn(b: Batch, f: torch.Tensor) -> torch.Tensor:
        t = triton_terms(
            b.src, b.tgt, f, b.masks.src_flags, b.masks.tgt_flags, kernels=kernels, sample_offsets=offsets
        )
        return (t.mse + SM * t.rigidity + L2_WEIGHT * t.l2).mean()

    return fn


def sweep(
    batches: dict[str, Batch], bandwidth: float | None, *, graph: bool = True, seconds: float = SWEEP_SECONDS
) -> None:
    """Print the knob sweep table (see the module doc) for ``batches`` (already on the device).

    ``bandwidth``: bytes/s for the roofline column (``None``: not shown). ``graph=False`` and a
    CPU batch under ``TRITON_INTERPRET=1`` run the same code without a GPU (a smoke test only).
    """
    from emcore.finetune import loss_triton
    from emcore.finetune.coarse_to_fine import jittered_target

    low, high = SWEEP_PIXELS_PER_THREAD
    knobs = [
        (block, warps, fast)
        for block, warps, fast in itertools.product(SWEEP_BLOCKS, SWEEP_WARPS, (False, True))
        if low <= block // (32 * warps) <= high
    ]
    if (loss_triton.BLOCK, loss_triton.NUM_WARPS, loss_triton.FAST_MATH) not in knobs:
        knobs.insert(0, (loss_triton.BLOCK, loss_triton.NUM_WARPS, loss_triton.FAST_MATH))
    configs = [loss_triton.TritonKernels(block, warps, fast) for block, warps, fast in knobs]
    default = knobs.index((loss_triton.BLOCK, loss_triton.NUM_WARPS, loss_triton.FAST_MATH))

    def roof(rate: float, offsets: bool) -> str:
        if bandwidth is None:
            return f"{'n/a':>9}"
        return f"{rate * 1e6 * loss_triton.modelled_bytes_per_pixel(1, offsets=offsets) / bandwidth:9.1%}"

    def row(name: str, k: TritonKernels, offsets: bool, rate: float, ref: float, note: str = "") -> None:
        cols = f"{k.block:>5} {k.num_warps:>5} {int(k.fast_math):>4} {'yes' if offsets else 'no':>7}"
        print(f"{name:<10} {cols} {rate:10.1f} {rate / ref:7.2f}x {roof(rate, offsets)}{note}", flush=True)

    def timed(kernels: TritonKernels, offsets: torch.Tensor | None = None) -> float:
        return time_loss(_triton_loss_fn(kernels, offsets), batch, seconds, 3, graph=graph)[0]

    header = f"{'size':<10} {'block':>5} {'warps':>5} {'fast':>4} {'offsets':>7} {'Mpx*it/s':>10}"
    header += f" {'vs dflt':>8} {'roofline':>9}"
    print(header)
    print("-" * len(header))
    log_ratios = [0.0] * len(configs)
    for name, batch in batches.items():
        start = time.perf_counter()
        # Warm every config before any timing; the first size also compiles them (the kernels
        # specialize on neither N nor H, W, all multiples of 16 here). The offsets variant of the
        # warp kernel is compiled by the warm-up of its two rows, before their timing.
        offsets = jittered_target(batch.tgt, 1.0)[0]
        for kernels in configs:
            f = batch.field.clone().requires_grad_(True)
            _triton_loss_fn(kernels)(batch, f).backward()
        if batch.field.is_cuda:
            torch.cuda.synchronize()
        print(f"# {name}: {len(configs)} configs compiled and warmed in {time.perf_counter() - start:.1f} s",
              flush=True)  # fmt: skip
        # Rows are printed as they are timed (a timeout keeps what was measured).
        ref = timed(configs[default])
        row(name, configs[default], False, ref, ref, "  (default)")
        rates = {default: ref}
        for i, kernels in enumerate(configs):
            if i != default:
                rates[i] = timed(kernels)
                row(name, kernels, False, rates[i], ref)
        row(name, configs[default], False, timed(configs[default]), ref, "  (default, timed again)")
        best = max(rates, key=rates.__getitem__)
        for i in dict.fromkeys((default, best)):
            rate = timed(configs[i], offsets)
            row(name, configs[i], True, rate, ref, f"  ({rate / rates[i]:.2f}x these knobs without offsets)")
        for i, rate in rates.items():
            log_ratios[i] += math.log(rate / ref)
        k = configs[best]
        print(f"# {name}: best block={k.block} num_warps={k.num_warps} fast_math={k.fast_math}: "
              f"{rates[best]:.1f} Mpx*it/s, {rates[best] / ref:.2f}x the default, roofline "
              f"{roof(rates[best], False).strip()}; {time.perf_counter() - start:.1f} s")  # fmt: skip
    overall = max(range(len(configs)), key=log_ratios.__getitem__)
    k = configs[overall]
    gain = math.exp(log_ratios[overall] / len(batches))
    print(f"# best over the sizes (geometric mean of the ratio to the default): block={k.block} "
          f"num_warps={k.num_warps} fast_math={k.fast_math}: {gain:.2f}x the default")  # fmt: skip


def accuracy_rows(batch: Batch, backends: list[str]) -> list[tuple[str, float, float, float, float]]:
    """``(backend, terms rel err vs f32 ref, grad vs f32 ref, terms vs f64 ref, grad vs f64 ref)``."""
    from emcore.finetune.losses import alignment_loss_terms

    def run(backend: str, b: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        f = b.field.clone().requires_grad_(True)
        if backend.startswith("fused-"):
            kernels = cpu_kernels(backend.removeprefix("fused-"))
            terms = fused_terms(b.src, b.tgt, f, b.masks.src_flags, b.masks.tgt_flags, kernels=kernels)
        else:
            terms = alignment_loss_terms(b.src, b.tgt, f, masks=b.masks, backend=backend)
        stacked = torch.stack(tuple(terms))
        (stacked[0] + SM * stacked[1] + L2_WEIGHT * stacked[2]).sum().backward()
        return stacked.detach().double().cpu(), f.grad.double().cpu()

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).norm() / b.norm())

    b64 = Batch(batch.name, batch.src.double(), batch.tgt.double(), batch.field.double(), batch.masks)
    ref32, ref64 = run("reference", batch), run("reference", b64)
    rows = [("reference", 0.0, 0.0, rel(ref32[0], ref64[0]), rel(ref32[1], ref64[1]))]
    for backend in backends:
        terms, grad = run(backend, batch)
        errors = (rel(terms, ref32[0]), rel(grad, ref32[1]), rel(terms, ref64[0]), rel(grad, ref64[1]))
        rows.append((backend, *errors))
    return rows


def return_freed_memory_to_the_os() -> None:
    """Make glibc ``mmap`` every block >= 64 KiB, so freed tensors leave the RSS at once.

    Without this glibc raises its mmap threshold after the first large free and keeps later
    tensors in the heap, and the RSS peak of one measurement hides in the previous one's.
    """
    with contextlib.suppress(OSError, AttributeError):  # not glibc: peak memory only indicative
        ctypes.CDLL(None).mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="512 px and a batch of 4 x 512 px, short runs")
    parser.add_argument("--cuda-only", action="store_true", help="skip the CPU speed table (GPU machines)")
    parser.add_argument(
        "--sweep", action="store_true", help="with --cuda-only: only the Triton knob sweep"
    )
    args = parser.parse_args()
    return_freed_memory_to_the_os()
    if args.sweep:
        if not (args.cuda_only and torch.cuda.is_available()):
            sys.exit("--sweep times the Triton kernels on CUDA: run it with --cuda-only on a GPU machine")
        print(f"# bench_kernels --cuda-only --sweep: forward+backward of the Triton loss (sm={SM}, "
              f"l2_weight={L2_WEIGHT}), float32, C=1, CUDA graph, {SWEEP_SECONDS} s per row")  # fmt: skip
        bandwidth = device_bandwidth("cuda")
        print(f"# CUDA {torch.cuda.get_device_name()}: copy bandwidth {bandwidth / 1e9:.0f} GB/s; torch "
              f"{torch.__version__}")  # fmt: skip
        sweep({name: make_batch(name, n, size).to("cuda") for name, n, size in SWEEP_SHAPES}, bandwidth)
        return

    shapes = [("1x512^2", 1, 512), ("4x512^2", 4, 512)] if args.quick else [
        ("1x512^2", 1, 512), ("1x1024^2", 1, 1024), ("16x512^2", 16, 512),
    ]  # fmt: skip
    if args.cuda_only:  # a GPU is filled by many pairs: add a large batch
        shapes.append(("64x1024^2", 64, 1024))
    min_seconds, min_iters = (0.2, 1) if args.quick else (1.5, 2)
    cuda = torch.cuda.is_available()
    backends = ["reference", "fused-cpp", "fused-torch"]
    print(f"# bench_kernels{' --quick' if args.quick else ''}: forward+backward of alignment_loss "
          f"(sm={SM}, l2_weight={L2_WEIGHT}), float32, C=1")  # fmt: skip
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    print(f"# CPU: {os.cpu_count()} cores visible, load average {load}; torch {torch.__version__}; "
          f"CUDA: {cuda}")  # fmt: skip
    header = f"{'backend':<12} {'device':<6} {'size':<9} {'threads':>7} {'Mpx*it/s':>10} {'vs ref':>8}"
    header += f" {'peak MiB':>9}"
    print(header)
    print("-" * len(header))
    batches = {name: make_batch(name, n, size) for name, n, size in shapes}
    for name, batch in batches.items() if not args.cuda_only else ():
        for threads in (1, 2):
            torch.set_num_threads(threads)
            ref_rate = None
            for backend in backends:
                rate, mib = time_backend(backend, batch, min_seconds, min_iters)
                ref_rate = rate if backend == "reference" else ref_rate
                mem = f"{mib:9.1f}" if mib is not None else f"{'n/a':>9}"
                ratio = rate / ref_rate
                print(f"{backend:<12} {'cpu':<6} {name:<9} {threads:>7} {rate:10.2f} {ratio:7.1f}x {mem}")
    if cuda:
        from emcore.finetune.loss_triton import modelled_bytes_per_pixel

        bandwidth = device_bandwidth("cuda")
        print(f"\n# CUDA {torch.cuda.get_device_name()}: copy bandwidth {bandwidth / 1e9:.0f} GB/s; "
              f"modelled {modelled_bytes_per_pixel(1)} B/px/it (triton, C=1)")  # fmt: skip
        print(f"{'backend':<12} {'size':<9} {'Mpx*it/s':>10} {'vs ref':>8} {'peak MiB':>9} {'roofline':>9}")
        for name, batch in batches.items():
            gpu = batch.to("cuda")
            ref_rate = None
            rows = [("reference", False), ("fused-torch", False), ("triton", False), ("triton", True)]
            for backend, graph in rows:
                label = "fused" if backend == "fused-torch" else backend
                rate, mib = time_backend(label, gpu, min_seconds, min_iters, graph=graph)
                ref_rate = rate if backend == "reference" else ref_rate
                moved = rate * 1e6 * modelled_bytes_per_pixel(1)
                roof = moved / bandwidth if backend == "triton" else float("nan")
                shown = backend + (" graph" if graph else "")
                print(f"{shown:<12} {name:<9} {rate:10.1f} {rate / ref_rate:7.1f}x {mib:9.1f} {roof:9.1%}")

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    acc_backends = ["fused-cpp", "fused-torch"]
    acc_batch = make_batch("acc", 1, 256) if args.quick else batches["1x512^2"]
    size = acc_batch.src.shape[-1]
    print(f"\n# float32 relative L2 error on a real {size}^2 pair (terms = [mse, rigidity, l2] of each item)")
    print(f"{'backend':<12} {'terms/f32':>10} {'grad/f32':>10} {'terms/f64':>10} {'grad/f64':>10}")
    for row in accuracy_rows(acc_batch, acc_backends):
        print(f"{row[0]:<12} {row[1]:10.2e} {row[2]:10.2e} {row[3]:10.2e} {row[4]:10.2e}")
    if cuda:
        for row in accuracy_rows(acc_batch.to("cuda"), ["triton"])[1:]:
            print(f"{row[0]:<12} {row[1]:10.2e} {row[2]:10.2e} {row[3]:10.2e} {row[4]:10.2e}")


if __name__ == "__main__":
    main()
