"""Exact duplicates (the same decoded pixels) and near-duplicates (cosine similarity of the pre-logit
embeddings at or above a threshold), without an n x n matrix: the unit vectors are compared a block of rows
against a block of columns at a time (only columns after the rows: each pair once), and each row keeps its
`k` most similar later rows, so memory is ROWS x COLUMNS floats for the block plus n x k for the result.

On a CPU with bf16 instructions (AVX512-BF16, AMX) the blocks are multiplied in bf16, 2-3x faster than
float32; bf16 keeps 8 bits of mantissa, so its similarities are off by up to a few thousandths. They only
choose candidates (at the threshold less MARGIN), and every candidate's similarity is then computed again in
float32 from the embeddings: the pairs reported, and their similarities, are float32's."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from bitcli.runtime import bf16_supported

ROWS = 1024  # rows of a block
COLUMNS = 8192  # columns of a block: a block is ROWS x COLUMNS similarities (32 MB in float32)
TOP_K = 10  # neighbours kept per row (a near-duplicate cluster of more than k + 1 images is still linked)
MARGIN = 0.02  # how far below the threshold a bf16 similarity still makes a candidate
CHUNK = 16384  # rows normalised at a time (no float32 copy of every embedding on the bf16 path)


@dataclass(frozen=True)
class Pair:
    a: int  # example numbers, a < b
    b: int
    similarity: float
    exact: bool


def exact_groups(pixels: Sequence[bytes | None]) -> list[list[int]]:
    """Groups (of two or more) of examples with the same pixels, each in example order, by first member."""
    groups: dict[bytes, list[int]] = {}
    for i, p in enumerate(pixels):
        if p is not None:
            groups.setdefault(p, []).append(i)
    return sorted((g for g in groups.values() if len(g) > 1), key=lambda g: g[0])


def unit_rows(vectors: np.ndarray, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Each row scaled to length 1, in `dtype`, CHUNK rows at a time (an all-zero row stays zero: similar to
    nothing)."""
    out = torch.empty(vectors.shape, dtype=dtype)
    for start in range(0, len(vectors), CHUNK):
        rows = torch.from_numpy(np.ascontiguousarray(vectors[start : start + CHUNK], dtype=np.float32))
        out[start : start + CHUNK] = torch.nn.functional.normalize(rows, dim=1)
    return out


def nearest_later(
    unit: torch.Tensor, k: int = TOP_K, *, rows: int = ROWS, columns: int = COLUMNS
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row i, the (similarities, indices) of its k most similar rows j > i ([n, k] float32; -inf and -1
    where a row has fewer than k later rows), computed blockwise in unit's dtype."""
    n = unit.shape[0]
    best_sim = torch.full((n, k), -float("inf"))
    best_idx = torch.full((n, k), -1, dtype=torch.int64)
    for r0 in range(0, n, rows):
        r1 = min(r0 + rows, n)
        block = unit[r0:r1]
        sims, idx = best_sim[r0:r1], best_idx[r0:r1]
        for c0 in range(r0, n, columns):  # columns before r0 belong to earlier rows only
            c1 = min(c0 + columns, n)
            s = (block @ unit[c0:c1].T).float()
            if c0 < r1:  # the diagonal block: only j > i
                later = torch.arange(c0, c1).unsqueeze(0) > torch.arange(r0, r1).unsqueeze(1)
                s.masked_fill_(~later, -float("inf"))
            top_s, top_i = s.topk(min(k, c1 - c0), dim=1)
            merged_s = torch.cat([sims, top_s], dim=1)
            merged_i = torch.cat([idx, top_i + c0], dim=1)
            sims, order = merged_s.topk(k, dim=1)
            idx = merged_i.gather(1, order)
        best_sim[r0:r1], best_idx[r0:r1] = sims, idx
    best_idx[best_sim == -float("inf")] = -1
    return best_sim, best_idx


def find_pairs(vectors: np.ndarray, pixels: Sequence[bytes | None], threshold: float, *, k: int = TOP_K,
               fast: bool | None = None) -> list[Pair]:  # fmt: skip
    """Every duplicate pair: each exact group as its first member paired with every other member (similarity
    1), then the near-duplicates at or above `threshold` that are not exact, by example order. Examples whose
    pixels are None (undecodable) take no part. `fast`: bf16 candidates (None: where the CPU has bf16)."""
    pairs = [Pair(g[0], j, 1.0, True) for g in exact_groups(pixels) for j in g[1:]]
    ok = np.flatnonzero([p is not None for p in pixels])
    if len(ok) < 2:
        return pairs
    usable = vectors if len(ok) == len(vectors) else vectors[ok]  # (no copy when every example decoded)
    if fast is None:
        fast = bf16_supported(torch.device("cpu"))
    sims, idx = nearest_later(unit_rows(usable, torch.bfloat16 if fast else torch.float32), k)
    rows, slots = torch.nonzero((sims >= threshold - (MARGIN if fast else 0.0)) & (idx >= 0), as_tuple=True)
    near = []
    for r, s in zip(rows.tolist(), slots.tolist()):
        a, b = int(ok[r]), int(ok[int(idx[r, s])])
        similarity = _cosine(vectors[a], vectors[b]) if fast else float(sims[r, s])
        if pixels[a] != pixels[b] and similarity >= threshold:
            near.append(Pair(a, b, round(similarity, 6), False))
    return pairs + sorted(near, key=lambda p: (p.a, p.b))


def _cosine(x: np.ndarray, y: np.ndarray) -> float:
    """float32 cosine similarity, as the float32 search computes it (torch's normalize, then the dot product)."""
    u = torch.nn.functional.normalize(torch.from_numpy(np.stack([x, y]).astype(np.float32)), dim=1)
    return float(u[0] @ u[1])
