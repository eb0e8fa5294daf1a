"""A low-dimensional sketch of the unit embeddings whose dot products bound their cosine similarities from
above, with high probability, for bit audit's near-duplicate candidates on large sets (bitcli.audit.duplicates).

Each unit row x is split as x = Q a + r: Q (D x BASIS) holds the top right singular vectors of a seeded sample
of the unit rows (uncentred, so the mean direction is among them), a = Q^T x is exact and r is what Q misses.
The residual is sketched with a seeded Gaussian matrix G (D x GAUSSIAN, entries N(0, 1 / GAUSSIAN)): s = G^T r,
so E[s . s'] = r . r', with an error whose standard deviation is |r| |r'| sqrt((1 + rho^2) / GAUSSIAN) <=
|r| |r'| sqrt(2 / GAUSSIAN) (rho: the residuals' cosine). The score of a pair,

    a . a' + s . s' + SIGMAS * sqrt(2 / GAUSSIAN) * |r| |r'|,

is one dot product of a row's [a, s, SIGMAS * sqrt(2 / GAUSSIAN) * |r|] with a column's [a, s, |r|]
(BASIS + GAUSSIAN + 1 numbers instead of D; one matrix is kept, the row side being it times `row_weights`),
and falls below the true similarity only when the sketch underestimates r . r' by more than SIGMAS of its
standard deviations (for GAUSSIAN 256 and SIGMAS 5: a chance of 1.1e-9 when r and r' are alike, less
otherwise; docs/audit.md). Q only decides how small |r| is (how few false candidates there are), never whether
a true pair can be missed."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

BASIS = 32  # exact directions (top singular vectors of the sample)
GAUSSIAN = 256  # sketch columns of the residual
SIGMAS = 5.0  # the margin, in standard deviations of the sketch's error
SAMPLE = 8192  # rows the directions are computed from
SEED = 0  # the sample and G: the same candidates run to run
CHUNK = 4096  # rows projected at a time (their float32 unit copy: 32 MB at 2048 dims)
DIMS = BASIS + GAUSSIAN + 1  # numbers per row of the sketch


@dataclass(frozen=True)
class Sketch:
    vectors: torch.Tensor  # [n, DIMS] float32: a, s, |r| (a pair's column side)
    row_weights: torch.Tensor  # [DIMS]: times a row's vector, its row side (1, ..., 1, SIGMAS * sqrt(2 / GAUSSIAN))


def sketch(vectors: np.ndarray) -> Sketch:
    """The sketch of every row of `vectors` [n, D] (D > DIMS), each row scaled to length 1 first."""
    basis = top_directions(vectors)
    gaussian = torch.randn(vectors.shape[1], GAUSSIAN, generator=torch.Generator().manual_seed(SEED))
    gaussian /= math.sqrt(GAUSSIAN)
    sketched = torch.empty(len(vectors), DIMS)
    for start in range(0, len(vectors), CHUNK):
        residual = _unit(vectors[start : start + CHUNK])
        part = sketched[start : start + CHUNK]
        part[:, :BASIS] = residual @ basis
        # r = x - Q a formed in place: |r| stays exact to 1e-7 however small (1 - |a|^2 would not)
        residual.addmm_(part[:, :BASIS], basis.T, alpha=-1)
        part[:, BASIS:-1] = residual @ gaussian
        part[:, -1] = torch.linalg.vector_norm(residual, dim=1)
    row_weights = torch.ones(DIMS)
    row_weights[-1] = SIGMAS * math.sqrt(2 / GAUSSIAN)
    return Sketch(sketched, row_weights)


def top_directions(vectors: np.ndarray, count: int = BASIS) -> torch.Tensor:
    """[D, count] orthonormal: the top right singular vectors of SAMPLE unit rows chosen with SEED, by
    randomised subspace iteration (an approximation is enough: any orthonormal basis keeps the bound)."""
    pick = np.random.default_rng(SEED).choice(len(vectors), size=min(len(vectors), SAMPLE), replace=False)
    sample = _unit(vectors[np.sort(pick)])
    width = min(count + 16, *sample.shape)  # oversampled subspace
    space = torch.randn(sample.shape[1], width, generator=torch.Generator().manual_seed(SEED))
    for _ in range(4):
        space = torch.linalg.qr(sample.T @ (sample @ space)).Q
    _, _, vh = torch.linalg.svd(sample @ space, full_matrices=False)
    return space @ vh[:count].T


def _unit(rows: np.ndarray) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32)), dim=1)
