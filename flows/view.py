"""``sectionflow view OUTPUT``: the run's layers in a local Neuroglancer, offline.

The ``neuroglancer`` Python package serves the web client (its wheel ships it) and holds the viewer
state; :class:`flows.layer_server.LayerServer` serves the local layers to it over HTTP on the same
host. Remote layers (``gs://``, ``s3://``, ``https://``) go to the viewer as they are (the browser
reads them itself).

Layers (those that exist, for a local output; all of them, unchecked, for a remote one):

=====================  ========================================================================
``aligned``            ``<out>/aligned``, visible
``source``             ``--source``, else the ``source`` recorded in the aligned layer's provenance (hidden)
``aligned defects``    ``<out>/masks/aligned_defects`` in red (visible)
``defects (source)``   the ``defects`` of the provenance, in the source frame (hidden)
``field``              ``<out>/fields/final``: two channels shown by a shader, hue = direction of the
                       displacement, brightness = its magnitude (px at the field's mip, full at the
                       ``max_px`` slider); only the scale holding values is offered (hidden)
=====================  ========================================================================

Start position: x/y centre of the aligned layer, z = the worst flagged section of the report
(``<out>/report/run.json`` rows with a truthy ``flagged``/``flags``, or the z's listed in
``summary["flagged"]``; worst = lowest ``corr_after``), else the middle section; zoom fits the section.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any

from cloudfiles import CloudFiles

from emcore.errors import LayerNotFoundError, SectionflowError
from emcore.layers import Layer, normalize_path, open_layer
from flows.layer_server import LayerServer
from flows.layout import Layout
from tasks.field_io import field_mip

__all__ = [
    "FIELD_SHADER",
    "ViewLayer",
    "ViewSession",
    "neuroglancer_state",
    "start_view",
    "view_layers",
    "worst_flagged_section",
]

FIELD_SHADER = """#uicontrol float max_px slider(min=0.5, max=50, default=10, step=0.5)
vec3 hsv2rgb(float h, float s, float v) {
  vec3 k = mod(vec3(5.0, 3.0, 1.0) + h * 6.0, 6.0);
  return v - v * s * clamp(min(k, 4.0 - k), 0.0, 1.0);
}
void main() {
  vec2 d = vec2(getDataValue(0), getDataValue(1));
  float hue = atan(d.y, d.x) / 6.28318530718 + 0.5;
  emitRGB(hsv2rgb(hue, 1.0, clamp(length(d) / max_px, 0.0, 1.0)));
}
"""
MASK_SHADER = """void main() {
  float v = toNormalized(getDataValue());
  emitRGBA(vec4(1.0, 0.15, 0.15, v > 0.0 ? 0.6 : 0.0));
}
"""
VIEWPORT_PX = 700  # the section's longer side fills about this many screen px at the start


@dataclass(frozen=True)
class ViewLayer:
    """One layer to show: ``path`` a cloud path (``file://`` local), ``kind`` image / mask / field."""

    name: str
    path: str
    kind: str
    visible: bool = True


@dataclass
class ViewSession:
    """A running viewer: ``url`` (one line), the start section and why, the servers to close."""

    url: str
    layers: list[ViewLayer]
    start_z: int | None
    start_reason: str
    viewer: Any
    server: LayerServer

    def close(self) -> None:
        import neuroglancer

        self.server.close()
        neuroglancer.stop()


def _is_local(path: str) -> bool:
    return path.startswith("file://")


def _provenance_params(path: str) -> dict[str, Any]:
    """The parameters of the last provenance record of a local layer ({} if none)."""
    try:
        raw = CloudFiles(path).get("provenance")
        records = json.loads(raw).get("processing", []) if raw else []
    except (OSError, ValueError):
        return {}
    for rec in reversed(records):
        params = (rec.get("method") or {}).get("parameters")
        if params:
            return dict(params)
    return {}


def view_layers(output: str, source: str | None = None) -> list[ViewLayer]:
    """The layers of an alignment output to show (see the module docstring)."""
    root = normalize_path(output)
    layout = Layout(root)
    local = _is_local(root)
    params = _provenance_params(layout.aligned) if local else {}
    src = normalize_path(source) if source else params.get("source")
    defects = params.get("defects")
    wanted = [
        ViewLayer("aligned", layout.aligned, "image"),
        *([ViewLayer("source", normalize_path(src), "image", visible=False)] if src else []),
        ViewLayer("aligned defects", layout.aligned_defects, "mask"),
        *([ViewLayer("defects (source)", normalize_path(defects), "mask", visible=False)] if defects else []),
        ViewLayer("field", layout.final_fields, "field", visible=False),
    ]
    if not local:
        return wanted
    layers = []
    for layer in wanted:
        if not _is_local(layer.path) or CloudFiles(layer.path).exists("info"):
            layers.append(layer)
    if not layers or layers[0].name != "aligned":
        raise LayerNotFoundError(
            f"no aligned layer at {layout.aligned}: run `sectionflow align-stack` first, "
            "or check the output path"
        )
    return layers


def _rows(report_dir: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    path = os.path.join(report_dir, "run.json")
    if not os.path.isfile(path):
        return [], {}
    try:
        with open(path) as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return [], {}
    return list(data.get("rows") or []), dict(data.get("summary") or {})


def worst_flagged_section(report_dir: str) -> tuple[int, str] | None:
    """``(z, why)`` of the worst flagged section in the report's ``run.json``, or None if none is flagged."""
    rows, summary = _rows(report_dir)
    listed = {int(z) for z in summary.get("flagged") or []}
    flagged = [r for r in rows if r.get("flagged") or r.get("flags") or int(r.get("z", -1)) in listed]
    if not flagged and listed:
        z = min(listed)
        return z, f"flagged in the report (section {z})"
    if not flagged:
        return None

    def badness(row: dict[str, Any]) -> float:
        corr = row.get("corr_after")
        return -float(corr) if isinstance(corr, int | float) and not math.isnan(corr) else -math.inf

    worst = max(flagged, key=badness)
    flags = worst.get("flags")
    detail = f": {flags}" if isinstance(flags, str | list) and flags else ""
    return int(worst["z"]), f"worst flagged section z={worst['z']}{detail}"


def _dimensions(resolution: tuple[float, float, float]) -> dict[str, list[Any]]:
    return {axis: [r * 1e-9, "m"] for axis, r in zip("xyz", resolution, strict=True)}


def _layer_json(layer: ViewLayer, source_url: str) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "image", "source": source_url, "name": layer.name}
    out["visible"] = layer.visible
    if layer.kind == "image":
        out["opacity"] = 1.0
    elif layer.kind == "mask":
        out["shader"] = MASK_SHADER
    else:
        out["shader"] = FIELD_SHADER
        out["opacity"] = 1.0
        out["channelDimensions"] = {"c^": [1, ""]}
    return out


def neuroglancer_state(
    layers: list[tuple[ViewLayer, str]],
    *,
    aligned: Layer | None,
    start_z: int | None,
) -> dict[str, Any]:
    """The viewer state: ``layers`` as ``(layer, precomputed:// source URL)``; position from ``aligned``."""
    state: dict[str, Any] = {
        "layers": [_layer_json(layer, url) for layer, url in layers],
        "layout": "xy",
        "showDefaultAnnotations": False,
    }
    if aligned is not None:
        bounds = aligned.bounds(0)
        z = start_z if start_z is not None else (bounds.start[2] + bounds.stop[2]) // 2
        state["dimensions"] = _dimensions(aligned.resolution(0))
        state["position"] = [
            (bounds.start[0] + bounds.stop[0]) / 2,
            (bounds.start[1] + bounds.stop[1]) / 2,
            z + 0.5,
        ]
        state["crossSectionScale"] = max(bounds.shape[0], bounds.shape[1]) / VIEWPORT_PX
    return state


def start_view(
    output: str, source: str | None = None, *, bind: str = "127.0.0.1", port: int = 0, data_port: int = 0
) -> ViewSession:
    """Start the data server and the Neuroglancer viewer for ``output``; returns the running session.

    ``port`` is the viewer's (the URL's) port, ``data_port`` the local layers' (0: any free port);
    a browser on another machine needs both (e.g. two SSH tunnels).

    Raises:
        LayerNotFoundError: a local output without an aligned layer.
    """
    import neuroglancer

    layers = view_layers(output, source)
    root = normalize_path(output)
    server = LayerServer(bind, data_port)
    sources: list[tuple[ViewLayer, str]] = []
    aligned: Layer | None = None
    for i, layer in enumerate(layers):
        if not _is_local(layer.path):
            sources.append((layer, f"precomputed://{layer.path}"))
            continue
        scales = None
        try:
            opened = open_layer(layer.path)
        except SectionflowError:
            continue
        if layer.name == "aligned":
            aligned = opened
        if layer.kind == "field":
            mip = field_mip(opened)
            scales = None if mip is None else [opened.info["scales"][mip]["key"]]
        url = server.add(f"l{i}", layer.path[len("file://") :], scales=scales)
        sources.append((layer, f"precomputed://{url}"))
    start_z: int | None = None
    reason = "no report"
    if _is_local(root):
        found = worst_flagged_section(Layout(root).report_dir)
        if found is not None:
            start_z, reason = found
        else:
            reason = "no flagged section in the report; middle section"
    neuroglancer.set_server_bind_address(bind, port)
    viewer = neuroglancer.Viewer()
    viewer.set_state(neuroglancer.ViewerState(neuroglancer_state(sources, aligned=aligned, start_z=start_z)))
    return ViewSession(viewer.get_viewer_url(), layers, start_z, reason, viewer, server)
