"""Run the benchmarks: loss kernels (bench_kernels), finetuner vs peers (bench_finetune), stacks vs
chained elastix (bench_stack), the orchestration at scale (bench_scale: blocks of dask futures vs
one Prefect task per chunk), alignment across folds and cracks that tear (bench_folds) and the
memory of one chunk task per stage against the run's estimates (bench_memory).

    .venv/bin/python -m benchmarks.run_all --quick   # short runs (`make bench`): bundled data, and
                                                     # 3 sections per shared stack (bench_stack)
    .venv/bin/python -m benchmarks.run_all           # shared real EM data, full runs

Each benchmark runs in its own process (``python -m benchmarks.<name>``), so one's memory peaks and
thread settings don't leak into the next; the tables are printed as they come.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

BENCHMARKS = ("bench_kernels", "bench_finetune", "bench_stack", "bench_scale", "bench_folds", "bench_memory")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="bundled data, short runs (a few minutes each)")
    parser.add_argument("--only", choices=BENCHMARKS, action="append", help="run only these (repeatable)")
    args = parser.parse_args()
    failed = []
    for name in args.only or BENCHMARKS:
        start = time.perf_counter()
        print(f"\n==== {name}{' --quick' if args.quick else ''} ====", flush=True)
        cmd = [sys.executable, "-m", f"benchmarks.{name}"] + (["--quick"] if args.quick else [])
        code = subprocess.call(cmd)
        print(f"==== {name}: exit {code}, {time.perf_counter() - start:.0f} s ====", flush=True)
        if code:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
