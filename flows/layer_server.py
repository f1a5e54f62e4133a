"""A local HTTP server for precomputed layers on disk, as Neuroglancer's client reads them.

Serves a few local layer directories under ``http://<bind>:<port>/<key>/...`` from a background
thread (stdlib ``ThreadingHTTPServer``), with what Neuroglancer needs and a plain static server
lacks:

* CORS headers (the viewer client is served from another port);
* cloud-volume's gzip-compressed chunks: a request for ``<chunk>`` is answered with ``<chunk>.gz``
  and ``Content-Encoding: gzip`` (the browser inflates it), as on GCS;
* missing chunks answer 404 (Neuroglancer shows them as empty);
* an optional filter on a layer's ``info``: keep only the scales listed (a field layer has mips
  0..n but values at one mip only, so the viewer must not pick the empty ones).

Only files below the registered directories are served; nothing is written.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterable
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

__all__ = ["LayerServer"]


class _Handler(SimpleHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass  # quiet: the viewer fetches hundreds of chunks

    def end_headers(self) -> None:
        self.send_header("Access-Control-Allow-Origin", "*")
        self.send_header("Access-Control-Allow-Headers", "x-requested-with, range")
        self.send_header("Access-Control-Expose-Headers", "content-range")
        super().end_headers()

    def do_OPTIONS(self) -> None:  # noqa: N802 - stdlib naming
        self.send_response(204)
        self.end_headers()

    def _resolve(self) -> tuple[str, str, str] | None:
        """``(key, local file, relative path)`` for the request, or None outside the layers."""
        path = unquote(urlsplit(self.path).path).lstrip("/")
        key, _, rest = path.partition("/")
        root = self.server.roots.get(key)
        if root is None or ".." in rest.split("/"):
            return None
        return key, os.path.join(root, rest), rest

    def _send(self, body: bytes, content_type: str, encoding: str | None = None) -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        if encoding:
            self.send_header("Content-Encoding", encoding)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_HEAD(self) -> None:  # noqa: N802 - stdlib naming
        self.do_GET()

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        found = self._resolve()
        if found is None:
            self.send_error(404)
            return
        key, local, rest = found
        if rest == "info" and key in self.server.scale_filters and os.path.isfile(local):
            with open(local) as fh:
                info = json.load(fh)
            keep = self.server.scale_filters[key]
            info["scales"] = [s for s in info.get("scales", []) if s.get("key") in keep]
            self._send(json.dumps(info).encode(), "application/json")
        elif os.path.isfile(local):
            with open(local, "rb") as fh:
                self._send(fh.read(), "application/json" if rest == "info" else "application/octet-stream")
        elif os.path.isfile(local + ".gz"):
            with open(local + ".gz", "rb") as fh:
                self._send(fh.read(), "application/octet-stream", encoding="gzip")
        else:
            self.send_error(404)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    roots: dict[str, str]
    scale_filters: dict[str, set[str]]


class LayerServer:
    """Serve local layer directories; ``url(key)`` is what a ``precomputed://`` source points at."""

    def __init__(self, bind: str = "127.0.0.1", port: int = 0) -> None:
        self._server = _Server((bind, port), _Handler)
        self._server.roots = {}
        self._server.scale_filters = {}
        host, actual = self._server.server_address[:2]
        self.base_url = f"http://{host}:{actual}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="layer-server", daemon=True)
        self._thread.start()

    def add(self, key: str, directory: str, *, scales: Iterable[str] | None = None) -> str:
        """Serve ``directory`` under ``/<key>``; ``scales``: keep only these scale keys in its info."""
        if "/" in key or not key:
            raise ValueError(f"layer key must be a non-empty name without '/', got {key!r}")
        self._server.roots[key] = os.path.abspath(directory)
        if scales is not None:
            self._server.scale_filters[key] = set(scales)
        return self.url(key)

    def url(self, key: str) -> str:
        return f"{self.base_url}/{key}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
