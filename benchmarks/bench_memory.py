"""Peak memory of one chunk task per stage kernel, measured, beside :mod:`emcore.task_memory`'s estimate.

Each case runs in a fresh process (one torch thread) on bundled real sections
(:func:`emcore.bundled.load_vnc_sections`, normalized): the peak RSS (``ru_maxrss``) after the call
minus the RSS right before it, i.e. what the kernel adds to a worker that already holds its inputs.
Kernels and sizes: ``coarse_align`` on 512^2 / 1024^2 px sections, ``finetune`` (the pipeline's
call: ``sm`` 200, ``max_motion`` 16, 30 iterations per level) on 192^2 / 384^2 / 768^2 px chunks,
``solve_stack`` (anchor 1, 6 sweeps) on 8 x 192^2, 16 x 192^2 and 8 x 384^2 px with 2 neighbours.
The estimate must not be below the measurement (ratio >= 1): the run's memory check
(:func:`flows.plan.check_task_memory`) relies on it.

    .venv/bin/python -m benchmarks.bench_memory    # (``--quick`` is accepted: the run is short already)
"""

from __future__ import annotations

import json
import subprocess
import sys

CASES = [("coarse", 512, 0), ("coarse", 1024, 0), ("finetune", 192, 0), ("finetune", 384, 0),
         ("finetune", 768, 0), ("solve", 8, 192), ("solve", 16, 192), ("solve", 8, 384)]  # fmt: skip
NEIGHBOURS = 2


def _measure(kind: str, a: int, b: int) -> float:
    """Bytes the kernel adds at its peak (in this process; call it in a fresh one)."""
    import resource

    import torch

    from emcore.bundled import load_vnc_sections

    torch.set_num_threads(1)
    sections = load_vnc_sections()

    def image(z: int, side: int) -> torch.Tensor:
        x = torch.as_tensor(sections[z][:side, :side], dtype=torch.float32)
        return ((x - x.mean()) / x.std())[None, None].contiguous()

    if kind == "coarse":
        from emcore.coarse_xcorr import coarse_align

        src, tgt = image(0, a), image(1, a)
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        coarse_align(src, tgt)
    elif kind == "finetune":
        from emcore.finetune import finetune

        src, tgt = image(0, a), image(1, a)
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        finetune(src, tgt, sm=200.0, num_iter=30, max_motion=16.0)
    else:
        from emcore.stack_solve import solve_stack

        generator = torch.Generator().manual_seed(0)
        pairs = {(z, k): 0.3 * torch.randn(1, 2, b, b, generator=generator)
                 for z in range(a) for k in range(1, NEIGHBOURS + 1) if z - k >= 0}  # fmt: skip
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        solve_stack(pairs, a, anchor=1.0, max_sweeps=6, tol=1e-4)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024.0  # KiB on Linux


def _estimate(kind: str, a: int, b: int) -> int:
    from emcore.task_memory import coarse_task_bytes, finetune_task_bytes, solve_task_bytes

    if kind == "coarse":
        return coarse_task_bytes(a, a)
    if kind == "finetune":
        return finetune_task_bytes(a)
    return solve_task_bytes(b, a, NEIGHBOURS)


def main() -> int:
    if len(sys.argv) == 5 and sys.argv[1] == "--case":  # one case, in its own process
        kind, a, b = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
        print(json.dumps({"bytes": _measure(kind, a, b)}))
        return 0
    mib = 2.0**20
    print("| kernel | size | measured MiB | estimate MiB | estimate / measured |")
    print("|---|---|---|---|---|")
    worst = float("inf")
    for kind, a, b in CASES:
        command = [sys.executable, "-m", "benchmarks.bench_memory", "--case", kind, str(a), str(b)]
        out = subprocess.run(command, capture_output=True, text=True, check=True)
        measured = json.loads(out.stdout.strip().splitlines()[-1])["bytes"]
        estimate = _estimate(kind, a, b)
        size = f"{a}^2 px" if kind != "solve" else f"{a} sections x {b}^2 px"
        ratio = estimate / measured if measured > 0 else float("inf")
        worst = min(worst, ratio)
        print(f"| {kind} | {size} | {measured / mib:.1f} | {estimate / mib:.1f} | {ratio:.2f} |", flush=True)
    print(f"\nlowest estimate / measured: {worst:.2f} (must be >= 1)")
    return 0 if worst >= 1.0 else 1


if __name__ == "__main__":
    sys.exit(main())
