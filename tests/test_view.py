"""`sectionflow view` without a browser: layers, start section, the state, the local layer server."""

from __future__ import annotations

import gzip
import json
import urllib.error
import urllib.request

import numpy as np

from emcore.layers import create_layer
from flows.layer_server import LayerServer
from flows.view import neuroglancer_state, start_view, view_layers, worst_flagged_section


def _write_run_json(path, rows, summary=None):
    path.mkdir(parents=True, exist_ok=True)
    (path / "run.json").write_text(json.dumps({"rows": rows, "summary": summary or {}}))


def test_worst_flagged_section(tmp_path):
    rows = [
        {"z": 1, "corr_after": 0.5},
        {"z": 2, "corr_after": 0.3, "flagged": True},
        {"z": 3, "corr_after": 0.1, "flags": ["fold"]},
        {"z": 4, "corr_after": 0.05},  # worst, but not flagged
    ]
    _write_run_json(tmp_path / "a", rows)
    assert worst_flagged_section(str(tmp_path / "a")) == (3, "worst flagged section z=3: ['fold']")
    rows = [{"z": 1, "corr_after": 0.5}, {"z": 2, "corr_after": 0.4}]
    _write_run_json(tmp_path / "b", rows, {"flagged": [2]})
    assert worst_flagged_section(str(tmp_path / "b"))[0] == 2
    _write_run_json(tmp_path / "c", [{"z": 1, "corr_after": 0.5}])
    assert worst_flagged_section(str(tmp_path / "c")) is None
    assert worst_flagged_section(str(tmp_path / "missing")) is None


def test_remote_output_is_passed_as_text():
    layers = view_layers("gs://bucket/run", source="s3://other/raw")
    assert [(v.name, v.path) for v in layers] == [
        ("aligned", "gs://bucket/run/aligned"),
        ("source", "s3://other/raw"),
        ("aligned defects", "gs://bucket/run/masks/aligned_defects"),
        ("field", "gs://bucket/run/fields/final"),
    ]
    session = start_view("gs://bucket/run", source="s3://other/raw")
    try:
        assert session.url.startswith("http://127.0.0.1:") and "\n" not in session.url
        sources = [layer.source[0].url for layer in session.viewer.state.layers]
        assert sources[:2] == ["precomputed://gs://bucket/run/aligned", "precomputed://s3://other/raw"]
    finally:
        session.close()


def test_state_starts_on_the_section(tmp_path):
    layer = create_layer(tmp_path / "aligned", kind="image", resolution=(4, 4, 40), size=(512, 256, 6),
                         chunk_size=(64, 64, 1), num_mips=2)
    views = view_layers(str(tmp_path))
    assert [v.name for v in views] == ["aligned"]
    state = neuroglancer_state([(views[0], "precomputed://http://x/l0")], aligned=layer, start_z=4)
    assert state["position"] == [256.0, 128.0, 4.5]
    assert state["dimensions"]["x"] == [4e-9, "m"]
    assert state["crossSectionScale"] == 512 / 700


def test_layer_server_gzip_chunks_and_scale_filter(tmp_path):
    layer = create_layer(tmp_path / "f", kind="field", resolution=(4, 4, 40), size=(128, 128, 1),
                         chunk_size=(64, 64, 1), num_mips=2)
    data = np.arange(2 * 64 * 64, dtype=np.float32).reshape(1, 2, 64, 64)
    layer.write(layer.bounds(1), data, 1)
    server = LayerServer()
    try:
        base = server.add("f", str(tmp_path / "f"), scales=["8_8_40"])
        with urllib.request.urlopen(base + "/info") as r:
            info = json.load(r)
            assert r.headers["Access-Control-Allow-Origin"] == "*"
        assert [s["key"] for s in info["scales"]] == ["8_8_40"]
        with urllib.request.urlopen(base + "/8_8_40/0-64_0-64_0-1") as r:
            assert r.headers["Content-Encoding"] == "gzip"
            raw = np.frombuffer(gzip.decompress(r.read()), dtype=np.float32)
        np.testing.assert_array_equal(raw.reshape(2, 1, 64, 64)[:, 0], data[0])  # (X, Y, Z, C) Fortran
        for missing in ("/4_4_40/0-64_0-64_0-1", "/../f/info"):
            try:
                urllib.request.urlopen(base + missing)
                raise AssertionError(f"{missing} should be 404")
            except urllib.error.HTTPError as exc:
                assert exc.code == 404
    finally:
        server.close()


def test_report_gives_the_view_command():
    from tasks.report import neuroglancer_instructions

    text = neuroglancer_instructions({"aligned": "file:///data/run/aligned", "source": "gs://b/raw"})
    assert "```\nsectionflow view /data/run --source gs://b/raw\n```" in text
    assert "npx" not in text and "appspot" not in text


def test_view_of_a_folder_without_a_run_says_so(tmp_path):
    from typer.testing import CliRunner

    from flows.cli import app

    result = CliRunner().invoke(app, ["view", str(tmp_path / "nothing")])
    assert result.exit_code == 2
    assert "error:" in result.output and "no aligned layer" in result.output
