"""Exact duplicates (the same decoded pixels) and near-duplicates (cosine similarity of the pre-logit
embeddings at or above a threshold), without an n x n matrix: vectors are compared a block of rows against a
block of columns at a time (only columns after the rows: each pair once), and each row keeps its `k` most
similar later rows, so memory is ROWS x COLUMNS floats for the block plus n x k for the result.

Candidates come from one of two searches, and every candidate's similarity is then computed again from the
embeddings (`cosines`: float64 sums rounded to float32, the same value whichever search found the pair), so
the pairs reported, and their similarities, do not depend on the search:
- up to SKETCH_ABOVE usable examples (or with `bit audit --exact-search`), the unit vectors themselves, in
  float32, or in bf16 on a CPU with bf16 instructions (AVX512-BF16, AMX: 2-3x faster; bf16 keeps 8 bits of
  mantissa, so candidates are taken down to the threshold less MARGIN);
- above it, bitcli.audit.sketch's DIMS-number sketch (7x fewer multiply-adds for 2048-dim features), whose
  scores bound the similarities from above unless the sketch errs by more than SIGMAS standard deviations. A
  row that has more than SKETCH_TOP_K candidates is searched again exactly, so the result is the exact
  search's whenever the bound holds."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from bitcli.audit import sketch
from bitcli.runtime import bf16_supported

ROWS = 1024  # rows of a block
COLUMNS = 8192  # columns of a block: a block is ROWS x COLUMNS similarities (32 MB in float32)
TOP_K = 10  # neighbours kept per row (a near-duplicate cluster of more than k + 1 images is still linked)
MARGIN = 0.02  # how far below the threshold a bf16 similarity still makes a candidate
EPS = 1e-4  # how far below it a float32 one does (summation order; the sketch's float32 arithmetic)
CHUNK = 16384  # rows normalised at a time (no float32 copy of every embedding on the bf16 path)
PAIRS = 2048  # candidates re-scored at a time
SKETCH_ABOVE = 20_000  # usable examples above which candidates come from the sketch
SKETCH_TOP_K = 64  # sketch candidates kept per row; a row with more is searched exactly
SLACK = 2  # an exact search keeps SLACK * k candidates per row, so that the k best after re-scoring are among
# them even where the similarities it ranked by are a rounding off (near-copies alike to 1e-7)


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
        out[start : start + CHUNK] = _unit(vectors[start : start + CHUNK])
    return out


def nearest_later(
    unit: torch.Tensor,
    k: int = TOP_K,
    *,
    rows: int = ROWS,
    columns: int = COLUMNS,
    right: torch.Tensor | None = None,
    row_weights: torch.Tensor | None = None,
    floor: float = -float("inf"),
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row i, the (scores, indices) of the k rows j > i with the highest (unit[i] * row_weights) .
    right[j] (right: unit itself, row_weights: ones by default) ([n, k] float32; -inf and -1 where a row has
    fewer than k later rows), computed blockwise in unit's dtype. Scores below `floor` may be left out (a row
    of a block with none at or above it skips the top-k)."""
    right = unit if right is None else right
    n = unit.shape[0]
    best_sim = torch.full((n, k), -float("inf"))
    best_idx = torch.full((n, k), -1, dtype=torch.int64)
    for r0 in range(0, n, rows):
        r1 = min(r0 + rows, n)
        block = unit[r0:r1] if row_weights is None else unit[r0:r1] * row_weights
        for c0 in range(r0, n, columns):  # columns before r0 belong to earlier rows only
            c1 = min(c0 + columns, n)
            s = (block @ right[c0:c1].T).float()
            if c0 < r1:  # the diagonal block: only j > i
                s.masked_fill_(torch.arange(c0, c1).unsqueeze(0) <= torch.arange(r0, r1).unsqueeze(1), -float("inf"))
            _keep_best(best_sim[r0:r1], best_idx[r0:r1], s, offset=c0, floor=floor)
    best_idx[best_sim == -float("inf")] = -1
    return best_sim, best_idx


def exact_later(vectors: np.ndarray, chosen: np.ndarray, k: int, floor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """nearest_later's float32 result for the rows `chosen` (ascending) only, against every later row, each
    block of columns normalised as it is needed (no unit copy of every embedding)."""
    best_sim = torch.full((len(chosen), k), -float("inf"))
    best_idx = torch.full((len(chosen), k), -1, dtype=torch.int64)
    for r0 in range(0, len(chosen), ROWS):
        ids = torch.from_numpy(chosen[r0 : r0 + ROWS])
        block = _unit(vectors[chosen[r0 : r0 + ROWS]])
        for c0 in range(int(ids[0]) + 1, len(vectors), COLUMNS):
            c1 = min(c0 + COLUMNS, len(vectors))
            s = block @ _unit(vectors[c0:c1]).T
            s.masked_fill_(torch.arange(c0, c1).unsqueeze(0) <= ids.unsqueeze(1), -float("inf"))
            _keep_best(best_sim[r0 : r0 + ROWS], best_idx[r0 : r0 + ROWS], s, offset=c0, floor=floor)
    best_idx[best_sim == -float("inf")] = -1
    return best_sim, best_idx


def _keep_best(sims: torch.Tensor, idx: torch.Tensor, s: torch.Tensor, *, offset: int, floor: float) -> None:
    """Merges block `s` (its column 0 is row `offset`) into the running top-k (sims, idx: views, updated in
    place). With a floor, only the rows of the block with a score at or above it are looked at, and when they
    have at most k such scores each on average, just those scores are merged (no top-k of a whole row)."""
    k = sims.shape[1]
    rows = torch.arange(len(s))
    if floor > -float("inf"):
        rows = torch.nonzero(s.amax(dim=1) >= floor).squeeze(1)
        if not len(rows):
            return
        if len(rows) < len(s):
            s = s.index_select(0, rows)
        above = s >= floor
        if int(torch.count_nonzero(above)) <= k * len(s):
            sims[rows], idx[rows] = _merged(sims[rows], idx[rows], s, above, offset=offset)
            return
    top_s, top_i = s.topk(min(k, s.shape[1]), dim=1)
    merged_s, order = torch.cat([sims[rows], top_s], dim=1).topk(k, dim=1)
    idx[rows] = torch.cat([idx[rows], top_i + offset], dim=1).gather(1, order)
    sims[rows] = merged_s


def _merged(
    sims: torch.Tensor, idx: torch.Tensor, s: torch.Tensor, above: torch.Tensor, *, offset: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k highest of each row's kept (sims, idx) and its new scores where `above`, the kept first among
    equal scores."""
    k = sims.shape[1]
    rows, cols = torch.nonzero(above, as_tuple=True)
    pool_row = torch.cat([torch.arange(len(sims)).repeat_interleave(k), rows])
    pool_s = torch.cat([sims.flatten(), s[rows, cols]])
    pool_i = torch.cat([idx.flatten(), cols + offset])
    order = torch.sort(pool_s, descending=True, stable=True).indices
    order = order[torch.sort(pool_row[order], stable=True).indices]  # by row, highest score first
    pool_row, pool_s, pool_i = pool_row[order], pool_s[order], pool_i[order]
    rank = torch.arange(len(pool_row)) - torch.searchsorted(pool_row, pool_row)
    keep = rank < k
    new_s = torch.full_like(sims, -float("inf"))
    new_i = torch.full_like(idx, -1)
    new_s[pool_row[keep], rank[keep]] = pool_s[keep]
    new_i[pool_row[keep], rank[keep]] = pool_i[keep]
    return new_s, new_i


def find_pairs(vectors: np.ndarray, pixels: Sequence[bytes | None], threshold: float, *, k: int = TOP_K,
               fast: bool | None = None, sketch_above: int | None = SKETCH_ABOVE) -> list[Pair]:  # fmt: skip
    """Every duplicate pair: each exact group as its first member paired with every other member (similarity
    1), then the near-duplicates at or above `threshold` that are not exact, by example order. Examples whose
    pixels are None (undecodable) take no part. `fast`: bf16 candidates on the exact search (None: where the
    CPU has bf16); `sketch_above`: candidates from the sketch above that many usable examples (None: never)."""
    pairs = [Pair(g[0], j, 1.0, True) for g in exact_groups(pixels) for j in g[1:]]
    ok = np.flatnonzero([p is not None for p in pixels])
    if len(ok) < 2:
        return pairs
    usable = vectors if len(ok) == len(vectors) else vectors[ok]  # (no copy when every example decoded)
    if sketch_above is not None and len(ok) > max(sketch_above, sketch.DIMS) and usable.shape[1] > 2 * sketch.DIMS:
        rows, cols = _sketch_candidates(usable, threshold, k)
    else:
        rows, cols = _exact_candidates(usable, threshold, k, fast)
    sims = cosines(usable, rows, cols)
    near = []
    for r, c, s in _best_per_row(rows, cols, sims, threshold=threshold, k=k):
        a, b = int(ok[r]), int(ok[c])
        if pixels[a] != pixels[b]:
            near.append(Pair(a, b, round(float(s), 6), False))
    return pairs + sorted(near, key=lambda p: (p.a, p.b))


def _exact_candidates(usable: np.ndarray, threshold: float, k: int, fast: bool | None) -> tuple[np.ndarray, ...]:
    if fast is None:
        fast = bf16_supported(torch.device("cpu"))
    floor = threshold - (MARGIN if fast else EPS)
    unit = unit_rows(usable, torch.bfloat16 if fast else torch.float32)
    sims, idx = nearest_later(unit, SLACK * k, rows=ROWS, columns=COLUMNS, floor=floor)
    rows, slots = torch.nonzero((sims >= floor) & (idx >= 0), as_tuple=True)
    return rows.numpy(), idx[rows, slots].numpy()


def _sketch_candidates(usable: np.ndarray, threshold: float, k: int) -> tuple[np.ndarray, ...]:
    """Candidates from the sketch's scores; the rows whose SKETCH_TOP_K candidates may have left some out get
    the exact search's instead."""
    floor = threshold - EPS
    projected = sketch.sketch(usable)
    sims, idx = nearest_later(
        projected.vectors, SKETCH_TOP_K, rows=ROWS, columns=COLUMNS, row_weights=projected.row_weights, floor=floor
    )
    del projected
    full = sims[:, -1] >= floor
    rows, slots = torch.nonzero((sims >= floor) & (idx >= 0) & ~full.unsqueeze(1), as_tuple=True)
    cols = idx[rows, slots]
    again = torch.nonzero(full).squeeze(1).numpy()
    if not len(again):
        return rows.numpy(), cols.numpy()
    exact_sims, exact_idx = exact_later(usable, again, SLACK * k, floor)
    r, s = torch.nonzero((exact_sims >= floor) & (exact_idx >= 0), as_tuple=True)
    return np.concatenate([rows.numpy(), again[r.numpy()]]), np.concatenate([cols.numpy(), exact_idx[r, s].numpy()])


def cosines(vectors: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """float32 cosine similarity of rows a[i] and b[i] of `vectors`, summed in float64 and rounded once, so
    that it does not depend on the order of the sums (an all-zero row is similar to nothing)."""
    out = np.zeros(len(a), dtype=np.float32)
    for start in range(0, len(a), PAIRS):
        x = np.asarray(vectors[a[start : start + PAIRS]], dtype=np.float32)
        y = np.asarray(vectors[b[start : start + PAIRS]], dtype=np.float32)
        dot = np.einsum("ij,ij->i", x, y, dtype=np.float64)  # (float64 sums without a float64 copy)
        norms = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64) * np.einsum("ij,ij->i", y, y, dtype=np.float64))
        np.divide(dot, norms, out=dot, where=norms > 0)
        out[start : start + PAIRS] = np.where(norms > 0, dot, 0.0)
    return out


def _best_per_row(
    rows: np.ndarray, cols: np.ndarray, sims: np.ndarray, *, threshold: float, k: int
) -> list[tuple[int, int, float]]:
    """(row, column, similarity) of each row's k most similar candidates at or above the threshold."""
    keep = sims >= threshold
    rows, cols, sims = rows[keep], cols[keep], sims[keep]
    order = np.lexsort((cols, -sims, rows))
    rows, cols, sims = rows[order], cols[order], sims[order]
    starts = np.searchsorted(rows, rows)  # each candidate's row's first position
    rank = np.arange(len(rows)) - starts
    chosen = rank < k
    return list(zip(rows[chosen].tolist(), cols[chosen].tolist(), sims[chosen].tolist()))


def _unit(rows: np.ndarray) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32)), dim=1)
