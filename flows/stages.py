"""The stage flows, each usable alone: normalize, encode, coarse_align, finetune, solve, render, downsample.

Every stage flow takes :class:`flows.params.AlignParams` (``downsample`` takes
:class:`~flows.params.DownsampleParams`), creates its output layers under ``params.output`` as
named in :mod:`flows.layout`, runs its chunk functions on the dask cluster in blocks
(:func:`flows.blocks.run_chunks`: one Prefect task per block, one dask future per chunk), adds
a provenance record to its output layers and returns a small summary dict
``{"stage", "done", "skipped", ...}`` (chunks computed now / skipped thanks to completion markers).

Stages read what earlier stages wrote; running one before its inputs exist fails at the start with
an error naming the missing layer and the stage to run first. Section bookkeeping (which sections
are blank, which pairs are used) is kept in ``<out>/normalized/sections.json`` and
``<out>/fields/pairwise/pairs.json``.
"""

from __future__ import annotations

import json
from typing import Any

from cloudfiles import CloudFiles
from prefect import flow, get_run_logger

from emcore.blend import blend_margin
from emcore.errors import LayerNotFoundError
from emcore.geometry import VoxelBox
from emcore.layers import Layer, create_layer, open_layer
from flows.blocks import absolute_params, run_chunks
from flows.layout import Layout
from flows.params import AlignParams, DownsampleParams
from tasks.affine import refine_section_affines, section_affines
from tasks.coarse import coarse_pair_task
from tasks.detect import DETECTOR, detect_chunk_px, detect_chunk_task, detection_mip
from tasks.encode import encode_chunk_task, resolve_encoder
from tasks.finetune import blend_chunk_task, finetune_chunk_task, pair_residual_affines
from tasks.markers import count
from tasks.normalize import normalize_chunk_task, section_stats_task
from tasks.pyramid import downsample_chunk_task, pyramid_chunks
from tasks.render import render_chunk_task
from tasks.solve import solve_chunk_task
from tasks.torn import torn_section_task, torn_sections
from tasks.version import code_version

__all__ = [
    "coarse_align_flow",
    "downsample_flow",
    "encode_flow",
    "finetune_flow",
    "normalize_flow",
    "render_flow",
    "solve_flow",
    "used_pairs",
]


# -- helpers ---------------------------------------------------------------------------------------
def _create_like(src: Layer, path: str, kind: str, dtype: str | None = None) -> Layer:
    """A layer with the source's geometry (resolution, bounds, chunks, mips)."""
    return create_layer(
        path,
        kind=kind,
        resolution=src.resolution(0),
        size=src.size(0),
        voxel_offset=src.voxel_offset(0),
        chunk_size=src.chunk_size(0),
        num_mips=src.num_mips,
        dtype=dtype,
    )


def _write_json(path: str, name: str, data: Any) -> None:
    CloudFiles(path).put(
        name,
        json.dumps(data, indent=1, sort_keys=True).encode(),
        compress=None,
        content_type="application/json",
    )


def _read_json(path: str, name: str, stage: str) -> Any:
    raw = CloudFiles(path).get(name)
    if raw is None:
        raise LayerNotFoundError(f"{path}/{name} is missing: run the {stage} stage first")
    return json.loads(raw)


def _require(path: str, stage: str) -> Layer:
    try:
        return open_layer(path)
    except LayerNotFoundError:
        raise LayerNotFoundError(f"no layer at {path}: run the {stage} stage first") from None


def _provenance(layer: Layer, description: str, params: AlignParams | DownsampleParams) -> None:
    layer.add_provenance(description, params.model_dump(mode="json"), code_version())


def _summary(stage: str, outcomes: list, **extra: Any) -> dict[str, Any]:
    summary = {"stage": stage, **count(outcomes), **extra}
    get_run_logger().info(
        "%s: %d chunks computed, %d skipped (an earlier run did them)",
        stage, summary["done"], summary["skipped"],
    )
    return summary


def _downsample(layer: Layer, params: AlignParams, src_mip: int, inputs: tuple[str, ...]) -> list:
    top = layer.num_mips - 1
    if src_mip >= top:
        return []
    region = params.region(layer, src_mip)
    return run_chunks(
        downsample_chunk_task,
        [dict(path=layer.path, box=box, src_mip=src_mip, dst_mip=top, inputs=inputs)
         for box in pyramid_chunks(layer, region, src_mip, top)],
        f"downsample {layer.path.rsplit('/', 1)[-1]}",
    )  # fmt: skip


def pair_image(params: AlignParams) -> str:
    """The layer the finetuner compares: encodings at the finetune mip, or the normalized images."""
    layout = Layout(params.output)
    res = open_layer(params.source).resolution(params.finetune_mip)[0]
    encoder = resolve_encoder(params.encoder, res)
    return layout.normalized if encoder == "none" else layout.encodings(params.finetune_mip)


def used_pairs(sections: list[int], blank: set[int], neighbours: int) -> list[tuple[int, int]]:
    """Pairs ``(z, k)``: ``k = 1..neighbours`` to non-blank sections; a section whose neighbours within
    reach are all blank sees through them to the nearest non-blank section below (``k`` beyond
    ``neighbours``). Blank sections get no pair (they are interpolated)."""
    z0 = sections[0]
    pairs = []
    for z in sections:
        if z in blank:
            continue
        ks = [k for k in range(1, neighbours + 1) if z - k >= z0 and z - k not in blank]
        if not ks:
            below = [zz for zz in range(z - 1, z0 - 1, -1) if zz not in blank]
            ks = [z - below[0]] if below else []
        pairs.extend((z, k) for k in ks)
    return pairs


# -- stages -----------------------------------------------------------------------------------------
@flow(name="normalize", log_prints=True)
def normalize_flow(params: AlignParams) -> dict[str, Any]:
    """Per-section tissue normalization at the finetune mip (stats at the coarse mip), then mips above.

    Writes ``<out>/normalized`` and ``<out>/normalized/sections.json`` (stats; blank sections).
    """
    params = absolute_params(params)  # workers may run in another directory
    layout = Layout(params.output)
    src = params.source_layer()
    out = _create_like(src, layout.normalized, "image", "float32")
    sections = list(params.sections(src))
    stat_list = run_chunks(
        section_stats_task,
        [dict(source=src.path, z=z, mip=params.coarse_mip, defects=params.defects, output=out.path)
         for z in sections],
        "section stats",
    )
    stats = {s["z"]: s for s in stat_list}
    blank = sorted(z for z, s in stats.items() if s["blank"])
    if blank:
        get_run_logger().warning(
            "blank sections (no usable tissue): %s - they are kept, aligned by "
            "interpolation, and their neighbours see through them",
            blank,
        )
    _write_json(
        out.path,
        "sections.json",
        {"sections": sections, "blank": blank, "stats": {str(z): s for z, s in stats.items()}},
    )
    mip = params.finetune_mip
    region = params.region(out, mip)
    chunks = list(out.grid(mip).chunks(region, (params.chunk_xy, params.chunk_xy, 1)))
    outcomes = run_chunks(
        normalize_chunk_task,
        [dict(source=src.path, output=out.path, box=box, mip=mip, stats=stats, defects=params.defects)
         for box in chunks],
        "normalize",
    )  # fmt: skip
    outcomes += _downsample(out, params, mip, (src.path, json.dumps(stats, sort_keys=True)))
    _provenance(out, "sectionflow normalize: per-section tissue mean 0 / std 1, 0 = no data", params)
    return _summary("normalize", outcomes, blank=blank, sections=sections)


def _detection_wanted(params: AlignParams) -> bool:
    """The detector runs only when asked (``detect_defects="auto"``) and no mask is given."""
    return params.defects is None and params.detect_defects == "auto"


def with_detected_defects(params: AlignParams) -> AlignParams:
    """``params`` with ``defects`` = the detector's mask when it was asked for and has been written."""
    if not _detection_wanted(params):
        return params
    path = Layout(params.output).detected_defects
    try:
        open_layer(path)
    except LayerNotFoundError:
        return params
    return params.model_copy(update={"defects": path})


@flow(name="detect_defects", log_prints=True)
def detect_flow(params: AlignParams) -> dict[str, Any]:
    """Fold / crack masks by the shipped detector (:mod:`tasks.detect`) into ``<out>/masks/detected``,
    when ``detect_defects="auto"`` and no ``defects`` layer is given; later stages use it as the
    defects layer (:func:`with_detected_defects`)."""
    params = absolute_params(params)  # workers may run in another directory
    if not _detection_wanted(params):
        return {"stage": "detect", "done": 0, "skipped": 0, "defects": params.defects}
    layout = Layout(params.output)
    normalized = _require(layout.normalized, "normalize")
    resolutions = [normalized.resolution(m)[0] for m in range(normalized.num_mips)]
    mip = detection_mip(resolutions, params.finetune_mip)
    if mip is None:
        get_run_logger().warning(
            "detect_defects: no mip of %s at or above the finetune mip is within the detector's 15-50 "
            "nm/px (mips: %s nm/px): aligned without a defect mask", normalized.path, resolutions,
        )
        return {"stage": "detect", "done": 0, "skipped": 0, "defects": None}
    out = _create_like(params.source_layer(), layout.detected_defects, "mask", "uint8")
    region = params.region(out, mip)
    side = detect_chunk_px(params.chunk_xy)
    outcomes = run_chunks(
        detect_chunk_task,
        [dict(normalized=normalized.path, output=out.path, box=box, mip=mip, pad=params.pad)
         for box in out.grid(mip).chunks(region, (side, side, 1))],
        "detect",
    )  # fmt: skip
    marked: dict[int, int] = {}
    for o in outcomes:
        marked[o.detail["z"]] = marked.get(o.detail["z"], 0) + o.detail["marked"]
    outcomes += _downsample(out, params, mip, (normalized.path, "detect"))
    _provenance(out, f"sectionflow detect_defects: {DETECTOR} at mip {mip}", params)
    area = region.shape[0] * region.shape[1]
    fraction = {z: round(n / area, 6) for z, n in sorted(marked.items()) if n}
    if fraction:
        get_run_logger().info("detect_defects: sections with a defect (fraction marked): %s", fraction)
    return _summary("detect", outcomes, defects=out.path, mip=mip, marked_fraction=fraction)


@flow(name="encode", log_prints=True)
def encode_flow(params: AlignParams) -> dict[str, Any]:
    """Encode the normalized sections at the finetune mip with the encoder for that resolution.

    With ``encoder="none"`` (or ``"auto"`` and no shipped encoder for the resolution) nothing is
    written and later stages use ``<out>/normalized``.
    """
    params = absolute_params(params)  # workers may run in another directory
    layout = Layout(params.output)
    normalized = _require(layout.normalized, "normalize")
    mip = params.finetune_mip
    encoder = resolve_encoder(params.encoder, normalized.resolution(mip)[0])
    if encoder == "none":
        get_run_logger().info("encode: no encoder (encoder=%r): using the normalized images", params.encoder)
        return {"stage": "encode", "done": 0, "skipped": 0, "encoder": "none"}
    out = _create_like(normalized, layout.encodings(mip), "image", "float32")
    region = params.region(out, mip)
    outcomes = run_chunks(
        encode_chunk_task,
        [dict(source=normalized.path, output=out.path, box=box, mip=mip, encoder=encoder)
         for box in out.grid(mip).chunks(region, (params.chunk_xy, params.chunk_xy, 1))],
        "encode",
    )  # fmt: skip
    _provenance(out, f"sectionflow encode with {encoder} at mip {mip}", params)
    return _summary("encode", outcomes, encoder=encoder)


@flow(name="coarse_align", log_prints=True)
def coarse_align_flow(params: AlignParams) -> dict[str, Any]:
    """Pairwise coarse fields ``P[z, k]`` at the coarse mip, by ``params.coarse_method``
    (:mod:`tasks.coarse`: the classical cross-correlation aligner, the learned aligner, or the
    classical one + the learned refiner).

    Writes ``<out>/fields/pairwise/z-<k>`` and ``pairs.json`` (each pair's status: blank,
    reliable, confidence, reason, matrix; and the pairs used downstream), then solves the section
    affines from the reliable pairs (:mod:`tasks.affine`) into ``<out>/fields/affine.json``; then
    the coarse fields ``S[z]`` of the sections that their own defect mask or an empty (no-data)
    crack split (:func:`tasks.coarse.section_defects`)
    (``<out>/fields/sections_coarse`` and ``<out>/fields/torn.json``, :mod:`tasks.torn`).
    """
    params = with_detected_defects(absolute_params(params))  # workers may run elsewhere
    layout = Layout(params.output)
    normalized = _require(layout.normalized, "normalize")
    info = _read_json(normalized.path, "sections.json", "normalize")
    sections, blank = info["sections"], set(info["blank"])
    pairs = used_pairs(sections, blank, params.neighbours)
    for k in sorted({k for _, k in pairs}):
        _create_like(normalized, layout.pairwise(k), "field")
    mip = params.coarse_mip
    region = params.region(normalized, mip)
    defects = params.defects
    outcomes = run_chunks(
        coarse_pair_task,
        [dict(image=normalized.path, output=layout.pairwise(k), region=region, z=z, k=k, mip=mip,
              model=params.coarse_model, defects=defects, method=params.coarse_method)
         for z, k in pairs],
        "coarse_align",
    )  # fmt: skip
    status = {f"{o.detail['z']}-{o.detail['k']}": o.detail for o in outcomes}
    # an unreliable pair is kept only when its section has no reliable one (never drop a section)
    used = []
    for z in sorted({z for z, _ in pairs}):
        mine = [(zz, k) for zz, k in pairs if zz == z and not status[f"{zz}-{k}"]["blank"]]
        reliable = [p for p in mine if status[f"{p[0]}-{p[1]}"]["reliable"]]
        used.extend(reliable or mine)
    unreliable = sorted(key for key, s in status.items() if not s["reliable"])
    if unreliable:
        get_run_logger().warning("unreliable coarse pairs (z-k): %s", unreliable)
    root = layout.pairwise(1).rsplit("/", 1)[0]
    _write_json(root, "pairs.json", {"status": status, "used": used, "blank": sorted(blank)})
    affines = section_affines(
        status, sections, sorted(blank), (region.shape[1], region.shape[0]), mip, params.finetune_mip,
        drift_sections_linear=params.drift_sections_linear,
        drift_sections_translation=params.drift_sections_translation,
    )  # fmt: skip
    _write_json(layout.fields_root, "affine.json", affines)
    if affines["fallback"]:
        get_run_logger().warning(
            "sections without a reliable coarse pair (affine interpolated from their neighbours): %s",
            affines["fallback"],
        )
    outcomes += _torn_fields(params, layout, normalized, status, used, affines, region)
    for k in sorted({k for _, k in pairs}):
        _provenance(open_layer(layout.pairwise(k)), f"sectionflow pairwise fields z -> z-{k}", params)
    torn = sorted(int(z) for z in _read_torn(layout)["sections"])
    return _summary(
        "coarse_align", outcomes, pairs=len(pairs), used=len(used), unreliable=unreliable,
        method=params.coarse_method, fallback=affines["fallback"], torn=torn,
    )  # fmt: skip


def _read_torn(layout: Layout) -> dict[str, Any]:
    """``<out>/fields/torn.json`` (``{"sections": {z: {...}}}``); no sections when it is absent."""
    raw = CloudFiles(layout.fields_root).get("torn.json")
    return json.loads(raw) if raw is not None else {"sections": {}}


def _torn_fields(
    params: AlignParams, layout: Layout, normalized: Layer, status: dict[str, dict[str, Any]],
    used: list[tuple[int, int]], affines: dict[str, Any], region: VoxelBox,
) -> list:
    """The torn sections' coarse fields ``S[z]`` (:mod:`tasks.torn`) and ``torn.json``."""
    torn = torn_sections(status, [tuple(p) for p in used])  # no-data tears split without a mask too
    outcomes: list = []
    if torn:
        out = _create_like(normalized, layout.sections_coarse, "field")
        mip = params.finetune_mip
        fine_region = params.region(out, mip)
        chunks = [c for c in out.grid(mip).chunks(fine_region, (params.chunk_xy, params.chunk_xy, 1))
                  if c.start[2] == fine_region.start[2]]
        outcomes = run_chunks(
            torn_section_task,
            [dict(image=normalized.path, defects=params.defects, output=out.path, region=region, z=z,
                  coarse_mip=params.coarse_mip, finetune_mip=mip,
                  section_affine=affines["matrices_coarse"][str(z)], piece_matrices=info["pair_matrices"],
                  fine_region=fine_region, chunks=chunks)
             for z, info in sorted(torn.items())],
            "torn sections",
        )
        _provenance(out, "sectionflow torn sections' coarse fields S[z] (one affine per piece)", params)
        get_run_logger().info("torn sections (read through their piecewise coarse field): %s", sorted(torn))
    record = {"sections": {str(o.detail["z"]): {**torn[o.detail["z"]], **o.detail} for o in outcomes},
              "finetune_mip": params.finetune_mip}
    _write_json(layout.fields_root, "torn.json", record)
    return outcomes


@flow(name="finetune", log_prints=True)
def finetune_flow(params: AlignParams) -> dict[str, Any]:
    """Refine every used pairwise field at the finetune mip, chunk by chunk, from the coarse field."""
    params = with_detected_defects(absolute_params(params))  # workers may run elsewhere
    layout = Layout(params.output)
    root = layout.pairwise(1).rsplit("/", 1)[0]
    used = [tuple(p) for p in _read_json(root, "pairs.json", "coarse_align")["used"]]
    affines = _read_json(layout.fields_root, "affine.json", "coarse_align")["matrices"]
    image = _require(pair_image(params), "encode")
    mip = params.finetune_mip
    region = params.region(image, mip)
    chunks = list(image.grid(mip).chunks(region, (params.chunk_xy, params.chunk_xy, 1)))
    xy_chunks = [c for c in chunks if c.start[2] == region.start[2]]
    margin = blend_margin(params.pad, xy_chunks)
    options = {"pad": params.pad, "margin": margin, "bounds": region, "sm": params.sm,
               "num_iter": params.num_iter, "defects": params.defects}
    torn = {int(z) for z in _read_torn(layout)["sections"]}

    def torn_options(z: int, k: int) -> dict[str, Any]:  # unsplit pairs: exactly today's call
        mine = sorted(torn & {z, z - k})
        return {"coarse_fields": layout.sections_coarse, "torn": mine} if mine else {}

    outcomes = run_chunks(
        finetune_chunk_task,
        [dict(image=image.path, pairs=layout.pairwise(k), box=box, z=z, k=k, mip=mip,
              affines={str(z): affines[str(z)], str(z - k): affines[str(z - k)]}, **options,
              **torn_options(z, k))
         for z, k in used for box in xy_chunks],
        "finetune",
    )  # fmt: skip
    residual = pair_residual_affines(
        [o.detail for o in outcomes], region.shape[0] * region.shape[1]
    )
    _write_json(root, "residual_affines.json", {"mip": mip, "region": str(region), "residual": residual})
    run_key = json.dumps(
        {**options, "bounds": str(region), "image": image.path, "affines": affines,
         **({"torn": sorted(torn)} if torn else {})},
        sort_keys=True, default=str,
    )
    outcomes += run_chunks(
        blend_chunk_task,
        [dict(pairs=layout.pairwise(k), box=box, z=z, k=k, mip=mip, margin=margin, bounds=region,
              cores=xy_chunks, inputs=run_key)
         for z, k in used for box in xy_chunks],
        "finetune blend",
    )  # fmt: skip
    for k in sorted({k for _, k in used}):
        _provenance(
            open_layer(layout.pairwise(k)), f"sectionflow finetuned pairwise fields z -> z-{k}", params
        )
    return _summary("finetune", outcomes, pairs=len(used))


@flow(name="solve", log_prints=True)
def solve_flow(params: AlignParams) -> dict[str, Any]:
    """Section affines refined by the residuals' affine parts (``<out>/fields/affine_refined.json``,
    :func:`tasks.affine.refine_section_affines`), then vector voting + anchored stack solve of the
    residuals less their affine parts, composed with the refined affines -> ``<out>/fields/final``
    (:mod:`tasks.solve`)."""
    params = absolute_params(params)  # workers may run in another directory
    layout = Layout(params.output)
    root = layout.pairwise(1).rsplit("/", 1)[0]
    pairs_info = _read_json(root, "pairs.json", "coarse_align")
    used = [tuple(p) for p in pairs_info["used"]]
    blank = pairs_info["blank"]
    ks = sorted({k for _, k in used})
    pair_layers = {k: _require(layout.pairwise(k), "coarse_align").path for k in ks}
    normalized = _require(layout.normalized, "normalize")
    coarse_affines = _read_json(layout.fields_root, "affine.json", "coarse_align")
    residual = _read_json(root, "residual_affines.json", "finetune")["residual"]
    out = _create_like(normalized, layout.final_fields, "field")
    mip = params.finetune_mip
    region = params.region(out, mip)
    sections = _read_json(normalized.path, "sections.json", "normalize")["sections"]
    refined = refine_section_affines(
        coarse_affines, residual, sections, blank, (region.shape[1], region.shape[0])
    )
    _write_json(layout.fields_root, "affine_refined.json", refined)
    affines = refined["matrices"]
    torn_ids = sorted(int(z) for z in _read_torn(layout)["sections"])
    torn = {"torn": {str(z): coarse_affines["matrices"][str(z)] for z in torn_ids},
            "coarse_fields": layout.sections_coarse} if torn_ids else {}
    xy = list(out.grid(mip).chunks(region, (params.chunk_xy, params.chunk_xy, region.shape[2])))
    # z-blocks with overlap: the anchored residual solve is local in z, so a block of
    # ``solve_block_z`` sections read with ``solve_overlap_z`` sections on each side equals the
    # whole-stack solve inside its core (tested), and a task's memory does not grow with the stack.
    z_start, z_stop = region.start[2], region.stop[2]
    step, over = params.solve_block_z, params.solve_overlap_z
    blocks = [(z, min(z + step, z_stop)) for z in range(z_start, z_stop, step)]
    outcomes = run_chunks(
        solve_chunk_task,
        [dict(pair_layers=pair_layers, output=out.path,
              box=VoxelBox((box.start[0], box.start[1], max(z_start, lo - over)),
                           (box.stop[0], box.stop[1], min(z_stop, hi + over))),
              mip=mip, pad=params.pad, used_pairs=used, blank=blank, affines=affines, region=region,
              pair_affines=residual, core_z=(lo, hi), smoothness=params.smoothness, anchor=params.anchor,
              robust_px=params.robust_px, **torn)
         for box in xy for lo, hi in blocks],
        "solve",
    )  # fmt: skip
    _provenance(out, "sectionflow final fields (vector voting + global stack solve)", params)
    details = [o.detail for o in outcomes]
    fixed = details[0]["fixed"] if details else None
    interpolated = sorted({z for d in details for z in d["interpolated"]})
    return _summary("solve", outcomes, fixed=fixed, interpolated=interpolated)


@flow(name="render", log_prints=True)
def render_flow(params: AlignParams) -> dict[str, Any]:
    """Render the source (and the defect mask) through the final fields at the render mip, then mips above."""
    params = with_detected_defects(absolute_params(params))  # workers may run elsewhere
    layout = Layout(params.output)
    fields = _require(layout.final_fields, "solve")
    src = params.source_layer()
    jobs = [(src, _create_like(src, layout.aligned, "image", src.dtype.name))]
    if params.defects:
        mask = open_layer(params.defects)
        jobs.append((mask, _create_like(mask, layout.aligned_defects, "mask")))
    mip = params.render_mip
    outcomes: list = []
    for source, out in jobs:
        region = params.region(out, mip)
        outcomes += run_chunks(
            render_chunk_task,
            [dict(source=source.path, fields=fields.path, output=out.path, box=box, mip=mip,
                  field_mip=params.finetune_mip)
             for box in out.grid(mip).chunks(region, (params.chunk_at(mip), params.chunk_at(mip), 1))],
            f"render {out.path.rsplit('/', 1)[-1]}",
        )  # fmt: skip
        outcomes += _downsample(out, params, mip, (source.path, fields.path, code_version()))
        _provenance(out, f"sectionflow render of {source.path} through {fields.path}", params)
    return _summary("render", outcomes)


@flow(name="downsample", log_prints=True)
def downsample_flow(params: DownsampleParams) -> dict[str, Any]:
    """Fill mips ``src_mip + 1 .. dst_mip`` of a layer from ``src_mip``, chunk by chunk."""
    params = absolute_params(params)  # workers may run in another directory
    layer = open_layer(params.layer)
    top = layer.num_mips - 1 if params.dst_mip is None else params.dst_mip
    outcomes = run_chunks(
        downsample_chunk_task,
        [dict(path=layer.path, box=box, src_mip=params.src_mip, dst_mip=top, inputs=())
         for box in pyramid_chunks(layer, layer.bounds(params.src_mip), params.src_mip, top)],
        "downsample",
    )  # fmt: skip
    _provenance(layer, f"sectionflow downsample mip {params.src_mip} -> {top}", params)
    return _summary("downsample", outcomes)
