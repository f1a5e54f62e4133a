"""Headless Chromium driven over the DevTools protocol, for the browser tests (no selenium needed).

``Chromium.find()`` returns the browser binary (Debian's ``chromium``; ``$SECTIONFLOW_CHROMIUM``
overrides) or None. ``with Chromium(binary) as browser: browser.open(url); png =
browser.screenshot()`` starts a fresh headless browser (software WebGL through SwiftShader, so it
runs without a GPU or a display), drives its first page with the ``websockets`` client and stops
it afterwards.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from typing import Any

from websockets.sync.client import connect

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--use-angle=swiftshader",
    "--enable-unsafe-swiftshader",
    "--ignore-gpu-blocklist",
    "--no-first-run",
    "--disable-extensions",
    "--disable-dev-shm-usage",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Chromium:
    def __init__(self, binary: str, width: int = 1024, height: int = 768) -> None:
        self.binary, self.width, self.height = binary, width, height
        self._ids = itertools.count(1)

    @staticmethod
    def find() -> str | None:
        env = os.environ.get("SECTIONFLOW_CHROMIUM")
        if env:
            return env
        for name in ("chromium", "chromium-browser", "google-chrome"):
            path = shutil.which(name)
            if path:
                return path
        return None

    def __enter__(self) -> Chromium:
        self._profile = tempfile.mkdtemp(prefix="sectionflow-chromium-")
        port = _free_port()
        self._proc = subprocess.Popen(
            [self.binary, *FLAGS, f"--remote-debugging-port={port}", f"--user-data-dir={self._profile}",
             f"--window-size={self.width},{self.height}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        pages: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json", timeout=2) as r:
                    pages = [p for p in json.load(r) if p.get("type") == "page"]
                if pages:
                    break
            except OSError:
                pass
            if self._proc.poll() is not None:
                raise RuntimeError(f"{self.binary} exited with code {self._proc.returncode} at start")
            time.sleep(0.5)
        if not pages:
            self.__exit__(None, None, None)
            raise RuntimeError(f"{self.binary} did not open its DevTools port within 60 s")
        self._ws = connect(pages[0]["webSocketDebuggerUrl"], max_size=64 * 2**20, open_timeout=30)
        self.call("Page.enable")
        self.call("Emulation.setDeviceMetricsOverride", width=self.width, height=self.height,
                  deviceScaleFactor=1, mobile=False)
        return self

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """Send one DevTools command and return its result (events in between are skipped)."""
        msg_id = next(self._ids)
        self._ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            reply = json.loads(self._ws.recv(timeout=120))
            if reply.get("id") == msg_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def open(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def evaluate(self, expression: str) -> Any:
        reply = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return reply.get("result", {}).get("value")

    def screenshot(self) -> bytes:
        return base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])

    def __exit__(self, *exc: object) -> None:
        ws = getattr(self, "_ws", None)
        if ws is not None:
            ws.close()
        self._proc.terminate()
        try:
            self._proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        shutil.rmtree(self._profile, ignore_errors=True)
