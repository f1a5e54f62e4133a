"""`sectionflow view` in a real browser: the aligned layer of a finished run shows tissue.

Starts the real command (a subprocess) on the output of the shared tiny ``align_stack`` run, reads
the one URL it prints, loads it in headless Chromium (software WebGL) and polls screenshots until
the view area shows tissue: many grey levels with a large spread in the middle of the panel, not a
blank canvas or an error page. Chromium is required: without it the test fails and says how to
install it (``.ci/run`` does), unless ``SECTIONFLOW_SKIP_BROWSER=1`` asks to skip it explicitly.
"""

from __future__ import annotations

import io
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.browser import Chromium

ROOT = Path(__file__).resolve().parents[2]
RENDER_TIMEOUT_S = 120


def tissue_stats(png: bytes) -> tuple[float, int, float]:
    """``(std, grey levels, colour)`` of the middle of the viewer panel (below the layer bar)."""
    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.float32)
    h, w = rgb.shape[:2]
    crop = rgb[int(h * 0.3) : int(h * 0.7), int(w * 0.3) : int(w * 0.7)]
    grey = crop.mean(-1)
    colour = float((crop.max(-1) - crop.min(-1)).mean())
    return float(grey.std()), int(np.unique(grey.astype(np.uint8)).size), colour


def looks_like_tissue(png: bytes) -> bool:
    std, levels, colour = tissue_stats(png)
    return std > 20 and levels > 100


def _first_line(proc: subprocess.Popen, timeout: float) -> str:
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: lines.put(proc.stdout.readline()), daemon=True).start()
    try:
        return lines.get(timeout=timeout).strip()
    except queue.Empty:
        return ""


def _chromium() -> str:
    if os.environ.get("SECTIONFLOW_SKIP_BROWSER") == "1":
        pytest.skip("SECTIONFLOW_SKIP_BROWSER=1")
    binary = Chromium.find()
    if binary is None:
        pytest.fail(
            "headless Chromium is needed for this test: `apt-get install -y chromium` "
            "(Debian; .ci/run does it) "
            "or set SECTIONFLOW_CHROMIUM=/path/to/chrome; SECTIONFLOW_SKIP_BROWSER=1 skips it explicitly"
        )
    return binary


def test_view_shows_tissue_in_headless_chromium(tiny_run, tiny_stack, tmp_path):
    binary = _chromium()
    params, _ = tiny_run
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    log = open(tmp_path / "view.stderr", "w")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen(
        [sys.executable, "-c", "from flows.cli import app; app()", "view", str(params.output),
         "--source", tiny_stack["misaligned"]],
        stdout=subprocess.PIPE, stderr=log, text=True, env=env, cwd=ROOT,
    )
    try:
        url = _first_line(proc, timeout=180)
        if not url:
            raise AssertionError(
                f"`sectionflow view` printed no URL; stderr:\n{(tmp_path / 'view.stderr').read_text()}"
            )
        assert url.startswith("http://127.0.0.1:") and " " not in url
        with Chromium(binary) as browser:
            browser.open(url)
            deadline = time.monotonic() + RENDER_TIMEOUT_S
            png = b""
            while time.monotonic() < deadline:
                time.sleep(2)
                png = browser.screenshot()
                if looks_like_tissue(png):
                    break
        shot = tmp_path / "view.png"
        shot.write_bytes(png)
        std, levels, colour = tissue_stats(png)
        assert looks_like_tissue(png), (
            f"no tissue in the viewer after {RENDER_TIMEOUT_S} s (std {std:.1f}, {levels} grey levels, "
            f"colour {colour:.1f}); screenshot {shot}"
        )
        print(f"screenshot {shot}: std {std:.1f}, {levels} grey levels")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_tissue_check_rejects_blank_and_text_pages():
    def png(arr: np.ndarray) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(arr.astype(np.uint8)).save(buf, format="PNG")
        return buf.getvalue()

    blank = np.full((768, 1024), 40)
    text = np.full((768, 1024), 230)
    text[::7, ::3] = 20  # sparse dark strokes on a light page: two grey levels
    noise = np.random.default_rng(0).normal(128, 50, (768, 1024)).clip(0, 255)
    assert not looks_like_tissue(png(blank))
    assert not looks_like_tissue(png(text))
    assert looks_like_tissue(png(noise))
