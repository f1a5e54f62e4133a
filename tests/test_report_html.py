"""The report with its pictures inlined (data: URIs) and as a standalone report.html."""

from __future__ import annotations

import base64
import re

import numpy as np

from emcore.pictures import save_png
from tasks.report_html import inline_pictures, render_html, write_report_html


def _picture(tmp_path, name="before_after.png"):
    rng = np.random.default_rng(0)
    return save_png(str(tmp_path / name), (rng.random((24, 32)) * 255).astype(np.uint8))


def test_inline_pictures_embeds_backticked_and_linked_files(tmp_path):
    path = _picture(tmp_path)
    _picture(tmp_path, "xz.png")
    md = (
        "# report\n\n"
        f"* before/after thumbnails: `{path}`\n"
        "* reslice: ![x-z reslice](xz.png)\n"
        "* gone: `missing.png`\n"
    )
    out = inline_pictures(md, str(tmp_path))
    uris = re.findall(r"!\[([^\]]*)\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", out)
    assert [alt for alt, _ in uris] == ["before_after", "x-z reslice"]
    with open(path, "rb") as fh:
        assert base64.b64decode(uris[0][1]) == fh.read()
    assert "`missing.png`" in out  # a picture that does not exist stays visible as a path
    assert str(path) not in out


def test_report_html_is_standalone(tmp_path):
    path = _picture(tmp_path)
    md = (
        "# sectionflow alignment report\n\n| z | corr before | corr after |\n|---|---|---|\n"
        f"| 1 | 0.015 | 0.505 |\n\n## Pictures\n\n* thumbnails: `{path}`\n"
    )
    html_path = write_report_html(md, str(tmp_path))
    with open(html_path) as fh:
        text = fh.read()
    assert html_path.endswith("report.html")
    assert "<table>" in text and "<td>0.505</td>" in text
    assert '<img src="data:image/png;base64,' in text
    assert str(path) not in text
    assert render_html(md, str(tmp_path)) == text
