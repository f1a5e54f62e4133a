"""The ``sectionflow`` command line (typer + rich).

``sectionflow --help`` lists the commands: ``demo``, ``align-stack``, one command per stage
(``normalize``, ``encode``, ``coarse-align``, ``finetune``, ``solve``, ``render``, ``downsample``),
``import-stack`` and ``serve``. Stage commands take ``--config`` (a YAML file of
:class:`flows.params.AlignParams`), ``--source``/``--output`` and ``--set name=value`` overrides;
parameters are validated before anything runs. ``--dask-address`` runs the chunks on an existing
dask cluster instead of a LocalCluster; a ``cluster:`` section in the config file (or a file given
with ``--cluster-config``, see ``configs/cluster_*.yaml``) starts a cluster class instead
(:class:`flows.runtime.ClusterConfig`). Without a configured ``PREFECT_API_URL`` the commands start
Prefect's embedded temporary API for the run.

While a stage runs, a live progress bar per group of chunks (with its ETA) shows the chunks
finished; each stage's ``OK`` line gives its own duration.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Annotated, Any

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

import typer  # noqa: E402
import yaml  # noqa: E402
from pydantic import ValidationError  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from emcore.errors import SectionflowError, StorageIOError  # noqa: E402

app = typer.Typer(
    help="sectionflow: align serial-section EM stacks (normalize -> encode -> coarse align -> finetune -> "
    "solve -> render) as Prefect flows over dask chunks.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console()

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML parameter file (AlignParams)")]
SourceOpt = Annotated[str | None, typer.Option(help="source image layer (path or cloud URL)")]
OutputOpt = Annotated[str | None, typer.Option(help="output path (layers named as in flows/layout.py)")]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", help="override a parameter: name=value (YAML value)")
]
DaskOpt = Annotated[str | None, typer.Option(help="scheduler address of an existing dask cluster")]
ClusterOpt = Annotated[
    Path | None,
    typer.Option("--cluster-config", help="YAML file with the cluster section (configs/cluster_*.yaml)"),
]


class _ConfigError(SectionflowError):
    """A config file that cannot be used (named in the message)."""


def _yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise _ConfigError(f"cannot read config file {path}: {exc}") from None
    if not isinstance(data, dict):
        raise _ConfigError(f"config file {path}: expected a mapping of parameter names to values")
    return data


def _cluster_config(config: Path | None, cluster_file: Path | None, dask_address: str | None) -> Any:
    """The run's :class:`~flows.runtime.ClusterConfig`: ``--dask-address``, else the ``cluster:``
    section of ``--cluster-config`` or of ``--config``, else the default LocalCluster."""
    from flows.runtime import ClusterConfig

    if dask_address:
        return ClusterConfig(address=dask_address)
    for path in (cluster_file, config):
        if path is None:
            continue
        data = _yaml(path)
        section = data.get("cluster", data if path == cluster_file else None)
        if section is None:
            continue
        if not isinstance(section, dict):
            raise _ConfigError(f"{path}: the cluster section must be a mapping (see configs/cluster_*.yaml)")
        try:
            return ClusterConfig(**section)
        except ValidationError as exc:
            msgs = "; ".join(
                f"cluster.{'.'.join(map(str, e['loc'])) or 'section'}: "
                f"{e['msg'].removeprefix('Value error, ')}"
                for e in exc.errors()
            )
            raise _ConfigError(f"{path}: {msgs}") from None
    return ClusterConfig()


def _params(config: Path | None, source: str | None, output: str | None, overrides: list[str] | None) -> Any:
    from flows.params import AlignParams

    data: dict[str, Any] = {}
    if config is not None:
        data = _yaml(config)
        data.pop("cluster", None)  # the cluster section: _cluster_config
    for item in overrides or []:
        if "=" not in item:
            raise typer.BadParameter(f"--set expects name=value, got {item!r}")
        name, value = item.split("=", 1)
        data[name.strip()] = yaml.safe_load(value)
    if source is not None:
        data["source"] = source
    if output is not None:
        data["output"] = output
    return AlignParams(**data)


def _fail(exc: Exception) -> None:
    if isinstance(exc, ValidationError):
        console.print("[bold red]invalid parameters:[/]")
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"]) or "parameters"
            console.print(f"  [red]{where}[/]: {err['msg']}")
    else:
        console.print(f"[bold red]error:[/] {exc}")
        if isinstance(exc, StorageIOError):
            console.print("  (after retries; the chunks finished so far are kept: rerun the same command)")
    raise typer.Exit(code=2)


def _stage_table(summaries: dict[str, dict[str, Any]]) -> Table:
    table = Table(title="stages")
    for col in ("stage", "chunks computed", "chunks skipped", "notes"):
        table.add_column(col)
    for name, s in summaries.items():
        notes = []
        for key in ("blank", "unreliable", "interpolated", "encoder"):
            if s.get(key):
                notes.append(f"{key}: {s[key]}")
        table.add_row(name, str(s.get("done", "")), str(s.get("skipped", "")), "; ".join(notes))
    return table


class _ChunkBars:
    """A live rich progress bar (chunks finished, elapsed, ETA) per :func:`flows.blocks.run_chunks` call."""

    def __init__(self) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(
            TextColumn("  {task.description:<28}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("elapsed"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
        )
        self._bars: dict[str, Any] = {}

    def __call__(self, event: Any) -> None:
        bar = self._bars.get(event.label)
        if bar is None or event.done == 0:
            bar = self._bars[event.label] = self.progress.add_task(event.label, total=max(event.total, 1))
        self.progress.update(bar, completed=event.done if event.total else 1)

    def __enter__(self) -> _ChunkBars:
        from flows.blocks import progress_hook

        self._hook = progress_hook(self)
        self._hook.__enter__()
        self.progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.stop()
        self._hook.__exit__(*exc)


def _ok_line(stage: str, summary: dict[str, Any], seconds: float | None) -> str:
    took = f"  [dim]({seconds:.1f} s)[/]" if seconds is not None else ""
    return (
        f"[green]OK[/] {stage}: {summary.get('done', 0)} chunks computed, "
        f"{summary.get('skipped', 0)} skipped{took}"
    )


def _run_stages(params: Any, cluster_config: Any, names: list[str]) -> dict[str, dict[str, Any]]:
    from flows.align_stack import STAGES, run_stage
    from flows.plan import check_workers_fit
    from flows.runtime import api_and_cluster

    summaries: dict[str, dict[str, Any]] = {}
    with api_and_cluster(params.output, cluster_config) as address:
        console.print(f"chunks run on the dask cluster at {address}")
        check_workers_fit(params, address)
        for name in names:
            start = time.perf_counter()
            with _ChunkBars():
                summaries[name] = run_stage(STAGES[name], params, address)
            console.print(_ok_line(name, summaries[name], time.perf_counter() - start))
    return summaries


def _stage_command(name: str) -> None:
    def command(
        config: ConfigOpt = None,
        source: SourceOpt = None,
        output: OutputOpt = None,
        set_: SetOpt = None,
        dask_address: DaskOpt = None,
        cluster_config: ClusterOpt = None,
    ) -> None:
        try:
            params = _params(config, source, output, set_)
            clusters = _cluster_config(config, cluster_config, dask_address)
            summaries = _run_stages(params, clusters, [name])
        except (ValidationError, SectionflowError, StorageIOError) as exc:
            _fail(exc)
            return
        console.print(_stage_table(summaries))

    command.__doc__ = f"Run the {name} stage flow alone (see flows/stages.py)."
    app.command(name.replace("_", "-"))(command)


for _name in ("normalize", "detect", "encode", "coarse_align", "finetune", "solve", "render"):
    _stage_command(_name)


def _run_align_stack(params: Any, cluster_config: Any) -> dict[str, dict[str, Any]]:
    from flows.align_stack import align_stack, stage_hook
    from flows.runtime import api_and_cluster

    last = [time.perf_counter()]

    def progress(stage: str, summary: dict[str, Any]) -> None:
        now = time.perf_counter()
        seconds = summary.get("seconds", now - last[0])
        last[0] = now
        bars.progress.console.print(_ok_line(stage, summary, seconds))

    with api_and_cluster(params.output, cluster_config) as address:
        last[0] = time.perf_counter()
        with _ChunkBars() as bars, stage_hook(progress):
            return align_stack(params, dask_address=address)


def _print_plan(params: Any) -> None:
    from flows.plan import plan_lines

    lines, warnings = plan_lines(params)
    console.print("[bold]plan[/]")
    for line in lines:
        console.print(f"  {line}")
    for warning in warnings:
        console.print(f"  [yellow]warning:[/] {warning}")


@app.command("plan")
def plan_command(
    config: ConfigOpt = None,
    source: SourceOpt = None,
    output: OutputOpt = None,
    set_: SetOpt = None,
) -> None:
    """Print what align-stack would do (mips in nm/px, px per section, chunks, pairs) and warnings."""
    try:
        _print_plan(_params(config, source, output, set_))
    except (ValidationError, SectionflowError) as exc:
        _fail(exc)


@app.command("align-stack")
def align_stack_command(
    config: ConfigOpt = None,
    source: SourceOpt = None,
    output: OutputOpt = None,
    set_: SetOpt = None,
    dask_address: DaskOpt = None,
    cluster_config: ClusterOpt = None,
) -> None:
    """Align a stack end to end: every stage, then the report in <output>/report/."""
    try:
        params = _params(config, source, output, set_)
        _print_plan(params)
        summaries = _run_align_stack(params, _cluster_config(config, cluster_config, dask_address))
    except (ValidationError, SectionflowError, StorageIOError) as exc:
        _fail(exc)
        return
    console.print(_stage_table({k: v for k, v in summaries.items() if k != "report"}))
    console.print(summaries["report"]["markdown"])
    from flows.demo import residual_line, verdict_line

    summary = dict(summaries["report"]["summary"], finetune_mip=params.finetune_mip)
    console.print(residual_line(summary))
    console.print(verdict_line(summary))


@app.command("downsample")
def downsample_command(
    layer: str,
    src_mip: int = 0,
    dst_mip: Annotated[int | None, typer.Option()] = None,
    dask_address: DaskOpt = None,
    cluster_config: ClusterOpt = None,
) -> None:
    """Fill the coarser mips of a layer from src_mip."""
    from flows.align_stack import run_stage
    from flows.params import DownsampleParams
    from flows.runtime import api_and_cluster
    from flows.stages import downsample_flow

    try:
        params = DownsampleParams(layer=layer, src_mip=src_mip, dst_mip=dst_mip)
        clusters = _cluster_config(None, cluster_config, dask_address)
        with api_and_cluster(params.layer, clusters) as address, _ChunkBars():
            summary = run_stage(downsample_flow, params, address)
    except (ValidationError, SectionflowError, StorageIOError) as exc:
        _fail(exc)
        return
    console.print(_stage_table({"downsample": summary}))


@app.command("import-stack")
def import_stack_command(
    directory: Path,
    layer: str,
    resolution: Annotated[str, typer.Option(help="nm per voxel x,y,z")] = "4.6,4.6,50",
    chunk: Annotated[int, typer.Option(help="storage chunk in x and y (px)")] = 128,
    mips: Annotated[int, typer.Option(help="number of mips")] = 5,
    kind: Annotated[
        str, typer.Option(help="image, or mask: a defect mask (nonzero = fold/crack; max-downsampled)")
    ] = "image",
) -> None:
    """Import a directory of section images (TIFF/PNG, one per z) into a precomputed image or mask layer."""
    from emcore.stack_import import import_stack
    from tasks.version import code_version

    try:
        res = tuple(float(v) for v in resolution.split(","))
        out = import_stack(
            directory,
            layer,
            resolution=res,
            chunk_size=(chunk, chunk, 1),
            num_mips=mips,
            code_version=code_version(),
            kind=kind,
        )
    except (SectionflowError, ValueError) as exc:
        _fail(exc)
        return
    console.print(f"[green]imported[/] {out}")


@app.command("demo")
def demo_command(
    output: Annotated[Path, typer.Option(help="demo directory")] = Path("demo_output"),
    dask_address: DaskOpt = None,
    cluster_config: ClusterOpt = None,
) -> None:
    """Misalign the bundled real EM stack by a known deformation, align it back, print the report."""
    from flows.demo import demo_params, prepare_demo, residual_line, verdict_line

    started = time.perf_counter()
    try:
        with console.status("[bold]demo[/]: importing and misaligning the bundled EM stack ..."):
            paths = prepare_demo(output)
        console.print(f"[green]OK[/] demo input: {paths['misaligned']} (known deformation, flows/demo.py)")
        params = demo_params(output, paths)
        summaries = _run_align_stack(params, _cluster_config(None, cluster_config, dask_address))
    except (ValidationError, SectionflowError, StorageIOError) as exc:
        _fail(exc)
        return
    report = summaries["report"]
    console.print(_stage_table({k: v for k, v in summaries.items() if k != "report"}))
    console.print(report["markdown"])
    summary = dict(report["summary"], finetune_mip=params.finetune_mip)
    console.rule("demo result")
    console.print(residual_line(summary))
    console.print(f"outputs: {params.output} (aligned, fields/final, masks/aligned_defects, ...)")
    console.print(f"report and pictures: {Path(report['files']['markdown']).parent}")
    console.print(f"total {time.perf_counter() - started:.0f} s")
    console.print(verdict_line(summary))


@app.command("serve")
def serve_command() -> None:
    """Serve the deployments (stage flows + align_stack) from this process; run them from the UI."""
    from prefect import serve

    from flows.deployments import deployments

    console.print("Serving deployments; start a UI with `prefect server start` and set PREFECT_API_URL.")
    serve(*deployments())


def _z_range(text: str) -> tuple[int, int]:
    """``"3"`` -> (3, 4); ``"2:5"`` -> (2, 5) (sections 2, 3, 4)."""
    try:
        if ":" in text:
            a, b = text.split(":", 1)
            return int(a), int(b)
        return int(text), int(text) + 1
    except ValueError as exc:
        raise ValueError(f"--z expects a section (3) or a range (2:5), got {text!r}") from exc


@app.command("export-field")
def export_field_command(
    output: Annotated[str, typer.Argument(help="alignment output (its fields/final) or a field layer")],
    dest: Annotated[str, typer.Argument(help="destination: *.npy, *.zarr, or a layer path for corgie")],
    format_: Annotated[
        str | None, typer.Option("--format", help="npy, ome-zarr or corgie (default: from DEST's name)")
    ] = None,
    z: Annotated[str | None, typer.Option(help="a section (3) or a range z0:z1 (default: all)")] = None,
    xy: Annotated[
        str | None, typer.Option(help="region x0,y0,x1,y1 in px at the field's mip (default: all)")
    ] = None,
    mip: Annotated[int | None, typer.Option(help="the field's mip (default: its finetune_mip)")] = None,
) -> None:
    """Write a section's or a region's final field as .npy, OME-Zarr (NGFF 0.6) or corgie's layout."""
    from emcore.geometry import VoxelBox
    from tasks.field_io import export_field, field_mip, guess_format, resolve_field_layer

    try:
        layer = resolve_field_layer(output)
        at = mip if mip is not None else field_mip(layer)
        if at is None:
            raise ValueError(f"{layer.path} records no finetune_mip; pass --mip")
        bounds = layer.bounds(at)
        (x0, y0, z0), (x1, y1, z1) = bounds.start, bounds.stop
        if z is not None:
            z0, z1 = _z_range(z)
        if xy is not None:
            try:
                x0, y0, x1, y1 = (int(v) for v in xy.split(","))
            except ValueError as exc:
                raise ValueError(f"--xy expects x0,y0,x1,y1 (px at mip {at}), got {xy!r}") from exc
        region = VoxelBox((x0, y0, z0), (x1, y1, z1))
        if not bounds.contains(region):
            raise ValueError(f"region {region} is not inside the field's bounds {bounds} at mip {at}")
        record = export_field(layer, dest, format_ or guess_format(dest), mip=at, region=region)
    except (SectionflowError, ValueError) as exc:
        _fail(exc)
        return
    console.print(
        f"[green]exported[/] {record['layout']} field z {z0}..{z1 - 1}, {x1 - x0} x {y1 - y0} px at mip {at} "
        f"({record['units']}) -> {dest}",
        soft_wrap=True,
    )


@app.command("import-field")
def import_field_command(
    src: Annotated[str, typer.Argument(help="a field from export-field: *.npy, *.zarr or a corgie layer")],
    dest: Annotated[str, typer.Argument(help="sectionflow field layer to write (channel 0 = x, px)")],
    mip: Annotated[int | None, typer.Option(help="only for a corgie layer without a record: its mip")] = None,
    chunk: Annotated[int, typer.Option(help="storage chunk in x and y (px)")] = 128,
) -> None:
    """Read a field in any export-field format back into a sectionflow field layer."""
    from tasks.field_io import import_field, write_field_layer

    try:
        field, record = import_field(src, mip=mip)
        layer = write_field_layer(dest, field, record, chunk=chunk)
    except (SectionflowError, ValueError) as exc:
        _fail(exc)
        return
    console.print(
        f"[green]imported[/] {record['layout']} field {tuple(field.shape)} at mip {record['mip']} "
        f"-> {layer.path}",
        soft_wrap=True,
    )


@app.command("view")
def view_command(
    output: Annotated[str, typer.Argument(help="alignment output (local path, file://, gs://, s3://)")],
    source: Annotated[str | None, typer.Option(help="source layer (default: the run's provenance)")] = None,
    bind: Annotated[str, typer.Option(help="address to serve on (127.0.0.1: this host only)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="viewer port (0: any free port)")] = 0,
    data_port: Annotated[int, typer.Option(help="port serving the local layers (0: any free port)")] = 0,
    open_browser: Annotated[bool, typer.Option("--open", help="also open the URL in a browser")] = False,
) -> None:
    """Show the output's layers in a local Neuroglancer (offline); prints the viewer URL on one line."""
    from flows.view import start_view

    try:
        session = start_view(output, source, bind=bind, port=port, data_port=data_port)
    except (SectionflowError, ValueError, OSError) as exc:
        _fail(exc)
        return
    names = ", ".join(layer.name for layer in session.layers)
    print(f"layers: {names} (local ones served at {session.server.base_url}); start: {session.start_reason}",
          file=sys.stderr, flush=True)
    print(session.url, flush=True)  # plain print: one line, never wrapped
    if open_browser:
        import webbrowser

        webbrowser.open(session.url)
    print("serving until Ctrl-C", file=sys.stderr, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        session.close()


def main() -> None:  # pragma: no cover - console entry point
    sys.exit(app())
