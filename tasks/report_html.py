"""The report as self-contained documents: pictures inlined (``data:`` URIs), and ``report.html``.

:mod:`tasks.report` writes ``report.md`` that names its pictures by file path (relative to the
report folder, or absolute). A Prefect artifact is shown by the UI's browser, which cannot read
those files, and ``report.md`` opened elsewhere loses them too. This module rewrites the markdown
so every picture it names that exists is embedded:

* ``![alt](picture.png)`` keeps its alt text, the target becomes ``data:image/png;base64,...``;
* a picture named in backticks (```` `.../before_after.png` ````) becomes ``![before_after](data:...)``.

``report.html`` is the same content rendered (CommonMark + tables, ``markdown-it-py``) in one
standalone page with a small stylesheet, for people who do not run a Prefect server.
"""

from __future__ import annotations

import base64
import html
import os
import re
from collections.abc import Callable

from markdown_it import MarkdownIt

__all__ = ["inline_pictures", "render_html", "write_report_html"]

_MIME = {
    ".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif",
    ".svg": "image/svg+xml",
}
_EXT = r"(?:png|jpe?g|gif|svg)"
_IMAGE = re.compile(r"!\[(?P<alt>[^\]]*)\]\((?P<target>[^)\s]+\." + _EXT + r")\)", re.IGNORECASE)
_CODE_PATH = re.compile(r"`(?P<target>[^`\s]+\." + _EXT + r")`", re.IGNORECASE)

_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f3f3f3; }
code { background: #f3f3f3; padding: 0 0.2em; word-break: break-all; }
img { max-width: 100%; image-rendering: pixelated; border: 1px solid #ddd; }
"""


def _data_uri(path: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    with open(path, "rb") as fh:
        payload = base64.b64encode(fh.read()).decode("ascii")
    return f"data:{_MIME[ext]};base64,{payload}"


def _local_file(target: str, report_dir: str) -> str | None:
    path = target[len("file://") :] if target.startswith("file://") else target
    if "://" in path or path.startswith("data:"):
        return None
    if not os.path.isabs(path):
        path = os.path.join(report_dir, path)
    return path if os.path.isfile(path) else None


def _inline(markdown: str, report_dir: str, target_of: Callable[[str], str]) -> str:
    """``markdown`` with every existing picture it names pointing at ``target_of(path)``."""

    def image(match: re.Match[str]) -> str:
        path = _local_file(match["target"], report_dir)
        return match[0] if path is None else f"![{match['alt']}]({target_of(path)})"

    def code_path(match: re.Match[str]) -> str:
        path = _local_file(match["target"], report_dir)
        if path is None:
            return match[0]
        name = os.path.splitext(os.path.basename(path))[0]
        return f"\n\n![{name}]({target_of(path)})\n\n"

    return _CODE_PATH.sub(code_path, _IMAGE.sub(image, markdown))


def inline_pictures(markdown: str, report_dir: str) -> str:
    """``markdown`` with every existing picture it names embedded as a ``data:`` URI (see module doc).

    Args:
        markdown: the report's markdown.
        report_dir: the folder relative picture paths are resolved against.

    Pictures that do not exist stay as they are (so a missing file is visible, not silently gone).
    """
    return _inline(markdown, report_dir, _data_uri)


def render_html(markdown: str, report_dir: str, *, title: str = "sectionflow alignment report") -> str:
    """A standalone HTML page of ``markdown`` with its pictures inlined.

    The markdown is rendered with short placeholder targets that the ``data:`` URIs replace
    afterwards: the renderer percent-encodes every link character by character, 0.35 s for the
    ~0.7 MB of pictures of a small report.
    """
    uris: list[str] = []

    def placeholder(path: str) -> str:
        uris.append(_data_uri(path))
        return f"sectionflow-picture-{len(uris) - 1}"

    body = MarkdownIt("commonmark").enable("table").render(_inline(markdown, report_dir, placeholder))
    body = re.sub(r"sectionflow-picture-(\d+)", lambda m: uris[int(m[1])], body)
    return (
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head>\n<body>\n{body}</body></html>\n"
    )


def write_report_html(markdown: str, report_dir: str) -> str:
    """Write ``<report_dir>/report.html`` (see :func:`render_html`); returns its path."""
    path = os.path.join(report_dir, "report.html")
    with open(path, "w") as fh:
        fh.write(render_html(markdown, report_dir))
    return path
