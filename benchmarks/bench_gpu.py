"""The finetuner end to end on a GPU: pairs per second for a batch of 512 px pairs, and accuracy.

Cases: bundled real VNC sections (``data/vnc_stack1``, centre 512 px crops), each warped by a known
smooth field (``benchmarks.cases``, kind ``smooth``: max 2 px, noise sigma 0.2 on both images),
one seed per pair. For ``N`` in (1, 16) the whole batch goes through one
:func:`emcore.finetune.finetune` call with its defaults on CUDA (Triton loss kernels), after one
warm-up call (Triton compiles at the first launch). Printed per row: backend, batch size, wall
time of the call, pairs/s, loss evaluations per level (mean over items), peak GPU memory above the
start, and the residual vs the known field (mean over pairs of the per-pair median / p95 px at
mip 0, 32 px border excluded). The same pairs on the CPU (``fused`` backend, this machine's
threads) give the ratio "vs CPU" measured in the same run.

    python -m benchmarks.bench_gpu            # needs a CUDA device
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.bench_kernels import PeakMemory
from benchmarks.cases import Case, load_sections, make_case
from emcore.finetune import finetune
from emcore.metrics import field_residual


def smooth_cases(count: int, size: int = 512) -> list[Case]:
    """``count`` smooth-field pairs on the bundled sections (cycling through them, new seed each)."""
    stack = load_sections("bundled", list(range(10)), size)
    return [make_case("smooth", stack[i % 10], None, f"bundled z{i % 10} s{i}", seed=i) for i in range(count)]


def run_batch(cases: list[Case], device: str, backend: str) -> tuple[float, float, list[float], float, float]:
    """``(seconds, peak MiB, mean iterations per level, mean median px, mean p95 px)``."""
    src = torch.cat([c.src for c in cases]).to(device)
    tgt = torch.cat([c.tgt for c in cases]).to(device)
    with PeakMemory("cuda" if device == "cuda" else "cpu") as peak:
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = finetune(src, tgt, backend=backend)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    field = result.field.cpu()
    stats = [field_residual(field[i : i + 1], c.true, border=32) for i, c in enumerate(cases)]
    iterations = result.iterations.double().mean(dim=1).tolist()
    return (
        seconds,
        peak.mib or 0.0,
        iterations,
        statistics.mean(s.median for s in stats),
        statistics.mean(s.p95 for s in stats),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1,16", help="batch sizes, comma separated")
    parser.add_argument("--cpu-threads", type=int, default=0, help="CPU threads for the CPU rows (0: all)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu needs a CUDA device (torch.cuda.is_available() is False)")
    if args.cpu_threads:
        torch.set_num_threads(args.cpu_threads)
    sizes = [int(s) for s in args.sizes.split(",")]
    cases = smooth_cases(max(sizes))
    finetune(cases[0].src.cuda(), cases[0].tgt.cuda(), backend="triton")  # compile the kernels
    finetune(cases[0].src[..., :64, :64], cases[0].tgt[..., :64, :64], backend="fused")  # build C++
    print(f"# bench_gpu: {torch.cuda.get_device_name()}, torch {torch.__version__}; CPU rows use "
          f"{torch.get_num_threads()} threads; finetune() defaults, 512 px smooth pairs")  # fmt: skip
    header = (f"{'device':<6} {'backend':<8} {'pairs':>5} {'seconds':>8} {'pairs/s':>8} {'vs CPU':>7} "
              f"{'peak MiB':>9} {'median px':>9} {'p95 px':>7}  iterations per level")  # fmt: skip
    print(header)
    print("-" * len(header))
    for n in sizes:
        batch = cases[:n]
        cpu = run_batch(batch, "cpu", "fused")
        rows = [("cpu", "fused", cpu), ("cuda", "triton", run_batch(batch, "cuda", "triton"))]
        rows.append(("cuda", "fused", run_batch(batch, "cuda", "fused")))
        for device, backend, (secs, mib, iters, med, p95) in rows:
            its = ", ".join(f"{i:.0f}" for i in iters)
            print(f"{device:<6} {backend:<8} {n:>5} {secs:8.2f} {n / secs:8.2f} {cpu[0] / secs:6.1f}x "
                  f"{mib:9.1f} {med:9.3f} {p95:7.3f}  [{its}]")  # fmt: skip


if __name__ == "__main__":
    main()
