"""Stack solve stage: pairwise fields -> one field per section, chunk by chunk in x and y.

For one xy chunk (voxels at the field mip, padded by ``pad`` px of context) and all sections of
the region, the task reads every used residual ``Q[z, k]`` less its affine part ``R[z, k]`` (taken
into the section affines, :func:`tasks.affine.refine_section_affines`), then

1. **vector voting** (when at least 3 neighbours per section are used,
   :func:`emcore.vector_vote.vector_vote`): for section ``z`` the candidates
   ``compose(S[z - k], P[z, k])`` (``S`` = the sequential composition) should agree; each pair's
   per-pixel share of the consensus (times the number of candidates) becomes its weight, so a bad
   pairwise estimate is voted down where it disagrees;
2. **global solve** (:func:`emcore.stack_solve.solve_stack`): robust relaxation of the residual
   fields ``H[z]`` with an ``anchor`` pulling every section towards 0 and the region's first
   non-blank section pinned at 0 in the block that holds it (other z-blocks rely on the anchor:
   a block solves like the whole stack inside its core; the pairs are
   residuals in the affinely aligned stack frame, :mod:`tasks.affine`, so
   content differences between neighbours cannot accumulate along z); blank sections are
   interpolated and reported;

then crops the context and writes ``G[z] = compose(H[z], G_affine[z])`` (exact,
:func:`emcore.affine.compose_with_affine`: no context needed for the affine part, however large)
for every section into ``<out>/fields/final``. A torn section (:mod:`tasks.torn`) is composed with
its coarse field ``S[z]`` instead, brought to the refined affine: ``G[z] = compose(compose(H[z],
R_z), S[z])`` with ``T_R_z = T_A^-1 o T_A'`` (``A`` the coarse-stage affine ``S`` was built on,
``A'`` the refined one), ``S`` read on the padded box and the result cropped.
"""

from __future__ import annotations

import torch

from emcore.affine import (
    affine_displacement_field,
    compose_matrices,
    compose_with_affine,
    invert_matrix,
    shift_origin,
)
from emcore.field import compose
from emcore.geometry import VoxelBox
from emcore.layers import open_layer
from emcore.stack_solve import sequential_composition, solve_stack
from emcore.vector_vote import vector_vote
from tasks.io import read_field
from tasks.markers import ChunkMarker, ChunkOutcome

__all__ = ["SOLVE_MAX_SWEEPS", "SOLVE_TOL_PX", "solve_chunk_task", "vote_weights"]

#: Converge every chunk to the same tight tolerance: the stopping sweep differs between chunks
#: (it is the chunk's largest update), and a loose tolerance (1e-3 px) left jumps of that size at
#: chunk borders: a seam ratio of 1.4-1.7 on the medulla although the jumps were ~0.002 px.
#: (1e-5 px made the demo's solve the slowest stage, 52 s; 1e-4 px leaves jumps 30x below the
#: fields' natural gradient.)
SOLVE_TOL_PX = 1e-4
SOLVE_MAX_SWEEPS = 100


def vote_weights(
    pairs: dict[tuple[int, int], torch.Tensor], num_sections: int, blank: list[int], temperature: float = 1.0
) -> dict[tuple[int, int], torch.Tensor]:
    """Per-pixel weights ``(1, 1, H, W)`` of each pair from vector voting (1 = agrees with the others).

    Sections with fewer than 3 candidate pairs keep weight 1 for theirs (no majority to find).
    """
    start = sequential_composition(pairs, num_sections, blank=blank)
    weights: dict[tuple[int, int], torch.Tensor] = {}
    for z in range(num_sections):
        keys = sorted(key for key in pairs if key[0] == z)
        if len(keys) < 3:
            continue
        candidates = torch.cat(
            [
                compose(start[z - k : z - k + 1], pairs[(z, k)].view(1, 2, *pairs[(z, k)].shape[-2:]))
                for z, k in keys
            ]
        )
        vote = vector_vote(candidates, temperature=temperature)
        for i, key in enumerate(keys):
            weights[key] = (vote.weights[i : i + 1] * len(keys)).clamp(max=1.0)
    return weights


def solve_chunk_task(
    pair_layers: dict[int, str],
    output: str,
    box: VoxelBox,
    mip: int,
    *,
    pad: int,
    used_pairs: list[tuple[int, int]],
    blank: list[int],
    affines: dict[str, list[list[float]]],
    region: VoxelBox,
    pair_affines: dict[str, list[list[float]]] | None = None,
    core_z: tuple[int, int] | None = None,
    smoothness: float = 0.0,
    anchor: float = 0.0,
    robust_px: float = 2.0,
    torn: dict[str, list[list[float]]] | None = None,
    coarse_fields: str | None = None,
) -> ChunkOutcome:
    """Solve the stack on ``box`` (xy chunk at ``mip``, all sections of the region in z).

    Args:
        pair_layers: ``{k: path}`` of the pairwise field layers.
        output: the final field layer.
        box: the chunk; ``z`` spans the whole region (section indices are absolute).
        used_pairs: ``(z, k)`` absolute pairs to use (blank and unreliable ones left out).
        blank: absolute indices of blank sections (interpolated).
        affines: ``{str(z): 2 x 3}`` section affines at ``mip`` (origin = ``region.start``).
        region: the region the chunks tile (voxels at ``mip``).
        pair_affines: ``{"z-k": 2 x 3}`` affine parts ``R[z, k]`` of the residuals (same mip and
            origin), subtracted before the solve: they are in ``affines`` already
            (:func:`tasks.affine.refine_section_affines`). A pair without one is used as it is.
        core_z: the sections ``[lo, hi)`` this task writes (default all of ``box``); the others
            are z context.
        torn: ``{str(z): 2 x 3}`` torn sections (:mod:`tasks.torn`) with the affine ``A[z]`` their
            coarse field ``S[z]`` (layer ``coarse_fields``, same mip) was built on. Their final field
            is ``G = compose(compose_with_affine(H, R_z), S)`` with ``T_R_z = T_A^-1 o T_A'`` (``A'`` =
            ``affines[z]``), on the padded box, then cropped; every other section takes
            ``compose_with_affine(H, A')`` as before.
    """
    lo, hi = (box.start[2], box.stop[2]) if core_z is None else core_z
    if not box.start[2] <= lo < hi <= box.stop[2]:
        raise ValueError(f"core_z {core_z} must lie inside the box's z range {box.start[2]}:{box.stop[2]}")
    params = {
        "mip": mip,
        "pad": pad,
        "pairs": sorted(used_pairs),
        "blank": sorted(blank),
        "smoothness": smoothness,
        "anchor": anchor,
        "robust_px": robust_px,
        "affines": {z: affines[z] for z in sorted(affines)},
        "pair_affines": {key: (pair_affines or {})[key] for key in sorted(pair_affines or {})},
        "region": str(region),
        "core_z": [lo, hi],
    }
    if torn:
        if coarse_fields is None:
            raise ValueError(f"torn sections {sorted(torn)} need the coarse_fields layer")
        params.update(torn={z: torn[z] for z in sorted(torn)}, coarse_fields=coarse_fields)
    marker = ChunkMarker(
        output, "solve", f"{box}@{mip}", tuple(pair_layers[k] for k in sorted(pair_layers)), params
    )
    previous = marker.read_extra()
    if previous is not None:
        return ChunkOutcome("solve", str(box), "skipped", previous)
    z0, num = box.start[2], box.shape[2]
    padded = box.padded(pad)
    pairs: dict[tuple[int, int], torch.Tensor] = {}
    origin = (padded.start[0] - region.start[0], padded.start[1] - region.start[1])
    for k, path in pair_layers.items():
        layer = open_layer(path)
        fields = read_field(layer, padded, mip)
        for z, kk in used_pairs:
            if kk == k and z0 <= z < z0 + num and z - k >= z0:
                q = fields[z - z0 : z - z0 + 1]  # a view: the layer's block is held once
                r = (pair_affines or {}).get(f"{z}-{k}")
                if r is not None:
                    local = shift_origin(torch.tensor(r, dtype=torch.float64), origin)
                    q -= affine_displacement_field(local, q.shape[-2], q.shape[-1])
                pairs[(z - z0, k)] = q
    rel_blank = [z - z0 for z in blank if z0 <= z < z0 + num]
    weights = vote_weights(pairs, num, rel_blank) if pairs else {}
    # The stack frame is the first non-blank section of the region (G = G_affine = 0 there): the
    # block that holds it pins it; other blocks rely on the anchor alone (the pin's influence
    # decays by about 0.65 per section, so blocks agree with the whole-stack solve in their cores).
    blank_set = set(blank)
    first = min((z for z in range(region.start[2], region.stop[2]) if z not in blank_set), default=None)
    pinned = first - z0 if first is not None and z0 <= first < z0 + num else None
    solution = solve_stack(
        pairs, num, weights=weights or None, blank=rel_blank, fixed=pinned, smoothness=smoothness,
        anchor=anchor, robust_px=robust_px, max_sweeps=SOLVE_MAX_SWEEPS, tol=SOLVE_TOL_PX,
    )
    padded_fields = solution.fields
    fields = padded_fields[..., pad:-pad, pad:-pad] if pad else padded_fields
    offset = (box.start[0] - region.start[0], box.start[1] - region.start[1])

    def final_field(i: int) -> torch.Tensor:
        z = z0 + i
        if not torn or str(z) not in torn:
            return compose_with_affine(fields[i : i + 1], shift_origin(torch.tensor(affines[str(z)]), offset))
        refine = compose_matrices(torch.tensor(affines[str(z)]), invert_matrix(torch.tensor(torn[str(z)])))
        h = compose_with_affine(padded_fields[i : i + 1], shift_origin(refine, origin))
        g = compose(h, read_field(open_layer(coarse_fields), VoxelBox(
            (padded.start[0], padded.start[1], z), (padded.stop[0], padded.stop[1], z + 1)), mip))
        return g[..., pad:-pad, pad:-pad] if pad else g

    final = torch.cat([final_field(i) for i in range(lo - z0, hi - z0)])
    core = VoxelBox((box.start[0], box.start[1], lo), (box.stop[0], box.stop[1], hi))
    open_layer(output).write(core, final.numpy(), mip)
    detail = {
        "fixed": solution.fixed + z0 if solution.fixed >= 0 else None,
        "interpolated": [z + z0 for z in solution.interpolated if lo <= z + z0 < hi],
        "pair_weight": {f"{z + z0}-{k}": round(float(w), 3) for (z, k), w in solution.pair_weight.items()},
        "converged": bool(solution.converged),
        "sweeps": int(solution.sweeps),
    }
    marker.mark_done(detail)
    return ChunkOutcome("solve", str(box), "done", detail)
