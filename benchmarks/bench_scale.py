"""Scale benchmark: ``align_stack`` on growing stacks (blocks of dask futures), and the orchestration
alone on no-op chunks beside plain dask.

The design before this one (one Prefect task per chunk) ran beside it in this benchmark until both
were recorded (benchmarks/README.md, "Orchestration at scale", up to commit 4c313a8); it has been
removed since. To measure it again, check out 4c313a8 and run ``--modes blocks,tasks``.

    python -m benchmarks.bench_scale --quick            # 512^2 and 1024^2 px x 2 sections (`make bench`)
    python -m benchmarks.bench_scale                    # 1k^2, 2k^2, 4k^2 px x 8, 32, 128 sections
    python -m benchmarks.bench_scale --sizes 1024 --sections 8

Designs (``--modes``): ``blocks`` (the default: each dask task runs a group of consecutive
chunks, :func:`flows.blocks.chunks_per_task`) and ``blocks1`` (the same with one dask task per
chunk, ``$SECTIONFLOW_CHUNKS_PER_TASK=1``: the design before the groups), in the same run.

Stacks are built from the bundled real VNC sections (``data/vnc_stack1``, 1024^2 px, 4.6 nm):
section ``z`` is bundled section ``z % 10``, mirrored (``numpy.pad(mode="symmetric")``) or cropped
to the size, shifted by a seeded integer offset of up to 16 px (section 0 stays), stored in 128 px
chunks with 5 mips under ``benchmarks/results/scale/`` (built once, reused). Parameters as the demo
(coarse mip 3, finetune mip 2, 128 px chunks + 32 px context, 2 neighbours, render at mip 0) with
``--num-iter`` finetune iterations (default 20: this measures orchestration, not the finetuner).

Each stack runs in its own process with its own Prefect database (``PREFECT_HOME`` under
the results folder, the embedded temporary API) and one LocalCluster (2 workers x 1 thread), and
runs ``align_stack`` twice on it: the first run, then a rerun where every chunk is skipped. Reported:

* start-up: Prefect's API and the cluster started side by side as the CLI starts them
  (:func:`flows.runtime.api_and_cluster`; the workers import the chunk modules then, ``tasks.preload``);
* wall time of the first run (after start-up), and per Mpx of the stack (mip 0 px x sections);
* the rerun's wall time and the orchestration overhead per chunk: the rerun's stage time (the sum of
  the stages' own durations, without the report) / its chunks;
* Prefect task runs per align-stack run, counted in the run's own database (``task_run`` table);
* peak RSS of the dask worker processes (the largest) and of the client process (which holds the
  flow, the scheduler and the nannies), sampled every 0.2 s with psutil.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results" / "scale"
QUICK = {"sizes": [512, 1024], "sections": [2], "noop": 100}
FULL = {"sizes": [1024, 2048, 4096], "sections": [8, 32, 128], "noop": 2000}
MAX_SHIFT = 16


# -- the stacks --------------------------------------------------------------------------------------
def build_stack(size: int, sections: int) -> str:
    """The ``size`` x ``size`` px x ``sections`` stack (module docstring); returns its layer path."""
    from emcore.bundled import VNC_NUM_SECTIONS, VNC_RESOLUTION_NM, load_vnc_sections
    from emcore.geometry import VoxelBox
    from emcore.layers import create_layer, open_layer
    from tasks.markers import ChunkMarker

    path = f"file://{RESULTS}/stack_{size}x{sections}"
    spec = {"size": size, "sections": sections, "shift": MAX_SHIFT}
    marker = ChunkMarker(path, "bench-stack", "all", (), spec)
    if marker.is_done():
        return path
    bundled = load_vnc_sections(list(range(VNC_NUM_SECTIONS)))
    layer = create_layer(path, kind="image", resolution=VNC_RESOLUTION_NM, size=(size, size, sections),
                         chunk_size=(128, 128, 1), num_mips=5, dtype="uint8")  # fmt: skip
    gen = np.random.default_rng(7)
    for z in range(sections):
        image = bundled[z % VNC_NUM_SECTIONS]
        if size > image.shape[0]:
            image = np.pad(image, ((0, size - image.shape[0]), (0, size - image.shape[1])), mode="symmetric")
        image = image[:size, :size]
        if z:
            dy, dx = (int(v) for v in gen.integers(-MAX_SHIFT, MAX_SHIFT + 1, size=2))
            image = np.roll(image, (dy, dx), axis=(0, 1))
        layer.write(VoxelBox((0, 0, z), (size, size, z + 1)), image[None, None], 0)
    open_layer(path).downsample(layer.bounds(0), 0)
    marker.mark_done()
    return path


# -- one case, in its own process ----------------------------------------------------------------------
class _RssSampler(threading.Thread):
    """Peak RSS (bytes) of this process and of its dask worker processes."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        import psutil

        self.me = psutil.Process()
        self.client_peak = 0
        self.worker_peak = 0
        self.stop = threading.Event()

    def run(self) -> None:
        import psutil

        while not self.stop.is_set():
            try:
                self.client_peak = max(self.client_peak, self.me.memory_info().rss)
                for child in self.me.children(recursive=True):
                    try:
                        cmd = " ".join(child.cmdline())
                        if "multiprocessing" in cmd and "uvicorn" not in cmd:
                            self.worker_peak = max(self.worker_peak, child.memory_info().rss)
                    except psutil.Error:
                        continue
            except psutil.Error:
                pass
            time.sleep(0.2)


def _task_runs(db: Path) -> int:
    """Task runs in the Prefect database (they arrive asynchronously: wait until the count is stable)."""
    last, stable = -1, 0
    for _ in range(120):
        time.sleep(0.5)
        try:
            with sqlite3.connect(db) as con:
                n = con.execute("select count(*) from task_run").fetchone()[0]
        except sqlite3.Error:
            continue
        stable = stable + 1 if n == last else 0
        if stable >= 4:
            return n
        last = n
    return last


def run_case(
    size: int, sections: int, mode: str, num_iter: int, solve_block_z: int | None = None
) -> dict[str, Any]:
    """Two ``align_stack`` runs of one case in this process (env set by :func:`main`);
    ``solve_block_z``: the stack solve's block (default AlignParams')."""
    from flows.align_stack import align_stack
    from flows.params import AlignParams
    from flows.runtime import ClusterConfig, api_and_cluster

    source = build_stack(size, sections)
    out = RESULTS / f"out_{size}x{sections}_{mode}"
    subprocess.run(["rm", "-rf", str(out)], check=True)
    params = AlignParams(source=source, output=str(out), coarse_mip=3, finetune_mip=2, render_mip=0,
                         chunk_xy=128, pad=32, neighbours=2, num_iter=num_iter,
                         **({} if solve_block_z is None else {"solve_block_z": solve_block_z}))  # fmt: skip
    db = Path(os.environ["PREFECT_HOME"]) / "prefect.db"
    sampler = _RssSampler()
    sampler.start()
    start = time.perf_counter()
    with api_and_cluster(None, ClusterConfig(n_workers=2)) as address:  # as the CLI starts them
        t0 = time.perf_counter()
        first = align_stack(params, dask_address=address)
        t1 = time.perf_counter()
        runs_first = _task_runs(db)
        t2 = time.perf_counter()
        rerun = align_stack(params, dask_address=address)
        t3 = time.perf_counter()
        runs_total = _task_runs(db)
    sampler.stop.set()
    stages = [name for name in rerun if name != "report"]
    chunks = sum(rerun[s]["done"] + rerun[s]["skipped"] for s in stages)
    return {
        "size": size, "sections": sections, "mode": mode, "num_iter": num_iter,
        "solve_block_z": params.solve_block_z,
        "mpx": size * size * sections / 1e6, "chunks": chunks,
        "startup_s": t0 - start, "first_s": t1 - t0, "rerun_s": t3 - t2,
        "rerun_stage_s": sum(rerun[s]["seconds"] for s in stages),
        "rerun_computed": sum(rerun[s]["done"] for s in stages),
        "first_stage_s": {s: first[s]["seconds"] for s in stages},
        "task_runs_first": runs_first, "task_runs_rerun": runs_total - runs_first,
        "worker_rss_mib": sampler.worker_peak / 2**20, "client_rss_mib": sampler.client_peak / 2**20,
        "residual_after_px": first["report"]["summary"].get("residual_after_median_px"),
    }  # fmt: skip


# -- no-op chunks: the orchestration alone -----------------------------------------------------------
def noop_chunk(i: int) -> int:
    """A chunk that does nothing (module level: the workers import it)."""
    return i


def run_overhead(n: int, mode: str) -> dict[str, Any]:
    """``n`` no-op chunks through :func:`flows.blocks.run_chunks` in a flow (env set by :func:`main`)."""
    from prefect import flow

    from flows.blocks import run_chunks
    from flows.runtime import ClusterConfig, cluster, ensure_local_api, stage_task_runner

    @flow(name="noop-chunks")
    def noop_flow(count: int) -> float:
        start = time.perf_counter()
        run_chunks(noop_chunk, [{"i": i} for i in range(count)], "noop")
        return time.perf_counter() - start

    ensure_local_api()
    with cluster(ClusterConfig(n_workers=2)) as address:
        if mode == "dask":  # the floor: plain client.map of the same per-chunk call, no Prefect
            import functools

            from distributed import Client, as_completed

            from tasks.retry import call_with_retries

            with Client(address) as client:
                client.gather(client.map(noop_chunk, range(20)))
                start = time.perf_counter()
                futures = client.map(functools.partial(call_with_retries, noop_chunk),
                                     [{"i": i} for i in range(n)], pure=False, key="noop")  # fmt: skip
                for _ in as_completed(futures, with_results=True).batches():
                    pass
                seconds = time.perf_counter() - start
        else:
            noop_flow.with_options(task_runner=stage_task_runner())(min(n, 20))  # warm the workers
            seconds = noop_flow.with_options(task_runner=stage_task_runner())(n)
    return {"mode": mode, "noop_chunks": n, "seconds": seconds, "ms_per_chunk": 1e3 * seconds / n}


NAMES = {
    "dask": "plain client.map (floor)",
    "blocks": "blocks, chunk groups per dask task",
    "blocks1": "blocks, one dask task per chunk",
}
#: Environment of a design's subprocess (``blocks1``: the grouping turned off, as before it existed).
MODE_ENV = {"blocks1": {"SECTIONFLOW_CHUNKS_PER_TASK": "1"}}


def noop_table(rows: list[dict[str, Any]]) -> str:
    """No-op chunks: wall, ms per chunk, and for two counts of one design the slope (ms per extra chunk)."""
    lines = ["| design | no-op chunks | s | ms per chunk | ms per extra chunk |", "|---|---|---|---|---|"]
    for r in rows:
        same = [o for o in rows if o["mode"] == r["mode"] and o["noop_chunks"] < r["noop_chunks"]]
        slope = ""
        if same:
            o = same[-1]
            slope = f"{1e3 * (r['seconds'] - o['seconds']) / (r['noop_chunks'] - o['noop_chunks']):.2f}"
        lines.append(f"| {NAMES[r['mode']]} | {r['noop_chunks']} | {r['seconds']:.2f} "
                     f"| {r['ms_per_chunk']:.2f} | {slope} |")  # fmt: skip
    return "\n".join(lines)


# -- the table -------------------------------------------------------------------------------------------
def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| stack (px x sections) | design | chunks | start-up s | first run s | s / Mpx | rerun s "
        "| overhead ms / chunk | Prefect task runs (first / rerun) | peak RSS worker / client MiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        design = NAMES[r["mode"]]
        lines.append(
            f"| {r['size']}^2 x {r['sections']} | {design} | {r['chunks']} "
            f"| {r.get('startup_s', float('nan')):.1f} | {r['first_s']:.1f} "
            f"| {r['first_s'] / r['mpx']:.2f} | {r['rerun_s']:.1f} "
            f"| {1e3 * r['rerun_stage_s'] / max(r['chunks'], 1):.1f} "
            f"| {r['task_runs_first']} / {r['task_runs_rerun']} "
            f"| {r['worker_rss_mib']:.0f} / {r['client_rss_mib']:.0f} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small: see QUICK")
    parser.add_argument("--sizes", type=lambda s: [int(v) for v in s.split(",")])
    parser.add_argument("--sections", type=lambda s: [int(v) for v in s.split(",")])
    parser.add_argument("--num-iter", type=int, default=20)
    parser.add_argument("--solve-block-z", type=int, help="the stack solve's block (default AlignParams')")
    parser.add_argument("--modes", type=lambda s: s.split(","), default=["blocks", "blocks1"],
                        help="designs: blocks (chunk groups), blocks1 (one dask task per chunk)")
    parser.add_argument("--noop-chunks", type=int, help="no-op chunks (default 100 / 2000; 0: skip them)")
    parser.add_argument("--case", nargs=3, metavar=("SIZE", "SECTIONS", "MODE"), help=argparse.SUPPRESS)
    parser.add_argument("--overhead-case", nargs=2, metavar=("N", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.overhead_case:
        print(json.dumps(run_overhead(int(args.overhead_case[0]), args.overhead_case[1])))
        return 0
    if args.case:
        size, sections, mode = int(args.case[0]), int(args.case[1]), args.case[2]
        print(json.dumps(run_case(size, sections, mode, args.num_iter, args.solve_block_z)))
        return 0
    base = QUICK if args.quick else FULL
    sizes, sections = args.sizes or base["sizes"], args.sections or base["sections"]
    RESULTS.mkdir(parents=True, exist_ok=True)
    modes = args.modes
    noop = base["noop"] if args.noop_chunks is None else args.noop_chunks
    # fixed cost + per-chunk cost: the fast designs also at 10x the chunks (the slope is the per-chunk cost)
    overhead = [_subprocess(["--overhead-case", str(count), mode], f"noop{count}_{mode}", mode)
                for mode in ["dask", *modes]
                for count in [noop, 10 * noop]] if noop else []  # fmt: skip
    rows = [
        _subprocess(["--case", str(size), str(n), mode, "--num-iter", str(args.num_iter),
                     *([] if args.solve_block_z is None else ["--solve-block-z", str(args.solve_block_z)])],
                    f"{size}x{n}_{mode}", mode)
        for size in sizes
        for n in sections
        for mode in modes
    ]
    (RESULTS / "scale.json").write_text(json.dumps({"noop": overhead, "stacks": rows}, indent=1))
    if overhead:
        print()
        print(noop_table(overhead))
    print()
    print(table(rows))
    return 0


def _subprocess(case: list[str], name: str, mode: str) -> dict[str, Any]:
    """Run one case (``--case ...`` / ``--overhead-case ...``) in its own process and database."""
    home = RESULTS / f"prefect_{name}"
    subprocess.run(["rm", "-rf", str(home)], check=True)
    home.mkdir(parents=True)
    env = dict(os.environ, PREFECT_HOME=str(home),
               PREFECT_LOGGING_LEVEL="WARNING", PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="600", OMP_NUM_THREADS="1",
               # the database the task runs are counted in (flows.runtime keeps a configured one;
               # otherwise each run gets a fresh temporary database, which this would not see)
               PREFECT_SERVER_DATABASE_CONNECTION_URL="sqlite+aiosqlite:///" + str(home / "prefect.db"))
    env.pop("PREFECT_API_URL", None)
    env.update(MODE_ENV.get(mode, {}))
    print(f"-- {name} ...", flush=True)
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_scale", *case], env=env,
                          capture_output=True, text=True)  # fmt: skip
    if proc.returncode:
        print(proc.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"bench_scale case {name} failed (exit {proc.returncode})")
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    print(json.dumps(row), flush=True)
    return row


if __name__ == "__main__":
    sys.exit(main())
