"""tasks.report_stack: the flags a reader relies on (worse, over-warped, seam, no reliable pair)."""

from __future__ import annotations

import json

import numpy as np
import torch

from tasks.report_stack import stack_section


def _write(root, name: str, data: dict) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / name).write_text(json.dumps(data))


def test_flags_name_each_reason(tmp_path):
    fields = tmp_path / "fields"
    _write(fields, "affine.json", {"fallback": [3]})
    status = {"3-1": {"reliable": False}, "2-1": {"reliable": True}}
    _write(fields / "pairwise", "pairs.json", {"status": status})
    z, size, chunk = 5, 64, 32
    final = torch.zeros(z, 2, size, size)
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    final[1, 0], final[1, 1] = 0.01 * xs, 0.01 * ys  # a smooth field ...
    final[1, 0, :, 32:] += 0.5  # ... with jumps at the chunk borders x = 32 and y = 32: seams
    final[1, 1, 32:, :] += 0.5
    final[2, 0] = 4.0 * torch.sin(xs / 3.0) * torch.cos(ys / 3.0)  # strongly warped, folded field
    final[4, 0], final[4, 1] = 0.01 * xs, 0.01 * ys  # the same smooth field with border jumps of
    final[4, 0, :, 32:] += 0.02  # 0.02 px: a high ratio, but no jump anyone could see
    final[4, 1, 32:, :] += 0.02
    rows = [{"z": i, "corr_before": 0.3, "corr_after": 0.5} for i in range(z)]
    rows[2]["corr_after"] = 0.1  # worse than before
    stack = np.random.default_rng(0).normal(size=(z, size, size)).astype(np.float32)
    out = stack_section(final=final, zs=list(range(z)), chunk_xy=chunk, fields_root=f"file://{fields}",
                        rows=rows, before=stack, after=stack, blank=[], out_dir=str(tmp_path / "report"),
                        finetune_mip=1)
    assert out.flags.get(0) is None
    assert "seam" in out.flags[1]
    assert out.flags.get(4) is None
    assert {"worse", "over-warped"} <= set(out.flags[2])
    assert out.flags[3] == ["no reliable coarse pair"]
    assert out.summary["unreliable_pairs"] == ["3-1"]
    text = "\n".join(out.lines)
    assert "**3 sections flagged**" in text and "z=2: worse, over-warped" in text
    assert (tmp_path / "report" / "drift.png").stat().st_size > 0
    assert (tmp_path / "report" / "overlay.png").stat().st_size > 0
