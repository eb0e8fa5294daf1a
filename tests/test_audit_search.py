"""bit audit's near-duplicate search on large sets (issue 23): the sketch's candidates, re-scored exactly, give
the exact search's pairs and similarities on structured data with pairs planted at and around the threshold;
the result does not change run to run; no n x n matrix is made; `--exact-search` turns the sketch off."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_main

from bitcli.audit import duplicates, sketch
from bitcli.audit.duplicates import Pair, cosines, find_pairs, nearest_later, unit_rows

THRESHOLD = 0.95
# planted pair similarities: at the threshold, 0.001 and 0.01 either side, and clear copies
TARGETS = (THRESHOLD - 0.01, THRESHOLD - 0.001, THRESHOLD, THRESHOLD + 0.001, THRESHOLD + 0.01, 0.99)
PER_TARGET = 8
CLUSTER = duplicates.SKETCH_TOP_K + 6  # near-copies of one image: their first rows overflow the sketch's top-k


def structured(n: int = 3000, dim: int = 1024, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features like pooled ReLU activations: ReLU(0.5 + z W), z in 256 latent dimensions with variances
    decaying as i^-1.4, in classes of 20 (so some distinct images are similar); then pairs planted at TARGETS
    (y = t x + sqrt(1 - t^2) z, z another example's direction made orthogonal to x) and a CLUSTER of
    near-copies. Returns (vectors, planted pairs [a, b], their targets)."""
    rng = np.random.default_rng(seed)
    scale = np.arange(1, 257, dtype=np.float32) ** -0.7
    scale /= np.sqrt((scale**2).sum() * 2)
    centres = rng.standard_normal((n // 20, 256), dtype=np.float32) * scale
    latent = centres[rng.integers(0, len(centres), n)] + rng.standard_normal((n, 256), dtype=np.float32) * scale
    vectors = np.maximum(0.5 + latent @ rng.standard_normal((256, dim), dtype=np.float32), 0)
    picked = rng.permutation(n)
    targets = np.repeat(TARGETS, PER_TARGET)
    originals, copies, others = np.split(picked[: 3 * len(targets)], 3)
    x = vectors[originals] / np.linalg.norm(vectors[originals], axis=1, keepdims=True)
    z = vectors[others] - np.sum(vectors[others] * x, axis=1, keepdims=True) * x
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    vectors[copies] = targets[:, None] * x + np.sqrt(1 - targets[:, None] ** 2) * z
    cluster = picked[3 * len(targets) : 3 * len(targets) + CLUSTER]
    vectors[cluster] = vectors[cluster[0]] + 0.02 * rng.standard_normal((CLUSTER, dim), dtype=np.float32)
    planted = np.sort(np.stack([originals, copies], axis=1), axis=1)
    return vectors, planted, targets


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return structured()


@pytest.fixture(scope="module")
def exact(data) -> list[Pair]:
    vectors, _, _ = data
    return find_pairs(vectors, pixels(len(vectors)), THRESHOLD, fast=False, sketch_above=None)


def pixels(n: int) -> list[bytes]:
    return [i.to_bytes(4, "little") for i in range(n)]  # all distinct: no exact duplicates


class Calls:
    """Counts the sketches made and the rows searched again exactly inside find_pairs."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.sketches, self.searched_again = 0, 0
        make, again = sketch.sketch, duplicates.exact_later

        def counted_sketch(vectors: np.ndarray) -> sketch.Sketch:
            self.sketches += 1
            return make(vectors)

        def counted_again(vectors: np.ndarray, chosen: np.ndarray, k: int, floor: float):
            self.searched_again += len(chosen)
            return again(vectors, chosen, k, floor)

        monkeypatch.setattr(sketch, "sketch", counted_sketch)
        monkeypatch.setattr(duplicates, "exact_later", counted_again)


def test_the_sketch_gives_the_exact_search_pairs(data, exact: list[Pair], monkeypatch: pytest.MonkeyPatch) -> None:
    """Forced on 3,000 x 1024 structured vectors: the same pairs with the same similarities as the float32
    exact search, planted pairs 0.001 above the threshold found and 0.001 below not, and the cluster's rows
    whose candidates overflowed searched again exactly."""
    vectors, planted, targets = data
    calls = Calls(monkeypatch)
    sketched = find_pairs(vectors, pixels(len(vectors)), THRESHOLD, sketch_above=0)
    assert calls.sketches == 1 and 0 < calls.searched_again < CLUSTER
    assert sketched == exact
    got = {(p.a, p.b) for p in sketched}
    found = np.array([(int(a), int(b)) in got for a, b in planted])
    assert found[targets > THRESHOLD].all() and not found[targets < THRESHOLD].any()
    at = targets == THRESHOLD  # found exactly when its float32 similarity rounds to the threshold or above
    assert (found[at] == (cosines(vectors, planted[at, 0], planted[at, 1]) >= THRESHOLD)).all()
    unplanted = got - {(int(a), int(b)) for a, b in planted}
    assert len(unplanted) > CLUSTER * 5  # the cluster's pairs (10 per row), and some natural ones


def test_without_its_margin_the_sketch_misses_pairs(data, exact: list[Pair], monkeypatch: pytest.MonkeyPatch) -> None:
    """The margin is what makes the previous test pass: with SIGMAS 0 the sketch's scores are unbiased, and
    pairs at the threshold whose sketch errs low are missed."""
    vectors, _, _ = data
    monkeypatch.setattr(sketch, "SIGMAS", 0.0)
    sketched = find_pairs(vectors, pixels(len(vectors)), THRESHOLD, sketch_above=0)
    missed = {(p.a, p.b): p.similarity for p in exact if p not in sketched}
    assert missed and max(missed.values()) < THRESHOLD + 0.02, missed


def test_the_sketch_search_is_deterministic(data) -> None:
    """The same pairs and similarities whatever the global random state."""
    vectors, _, _ = data
    runs = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        np.random.seed(seed)
        runs.append(find_pairs(vectors[:1500], pixels(1500), THRESHOLD, sketch_above=0))
    assert runs[0] == runs[1] and len(runs[0]) > 20


def test_no_n_by_n_matrix(data, monkeypatch: pytest.MonkeyPatch) -> None:
    """With 256 x 512 blocks, no product on the way is bigger than the sketch itself (n x DIMS), far below
    n x n, and the pairs are still the exact search's."""
    vectors, _, _ = data
    n = len(vectors)
    monkeypatch.setattr(duplicates, "ROWS", 256)
    monkeypatch.setattr(duplicates, "COLUMNS", 512)
    sizes = []
    matmul = torch.Tensor.__matmul__

    def spy(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        out = matmul(a, b)
        sizes.append(out.numel())
        return out

    monkeypatch.setattr(torch.Tensor, "__matmul__", spy)
    small = find_pairs(vectors, pixels(n), THRESHOLD, sketch_above=0)
    blocks = find_pairs(vectors, pixels(n), THRESHOLD, fast=False, sketch_above=None)
    assert small == blocks
    assert len(sizes) > 100 and max(sizes) <= n * sketch.DIMS < n * n / 10


def test_a_floor_keeps_what_the_full_matrix_has_above_it() -> None:
    """nearest_later with a floor, blocks of 7 x 11: each row's kept scores at or above the floor are the full
    matrix's top-k ones, whether a block has a few such scores per row (merged one by one) or many (top-k)."""
    rng = np.random.default_rng(2)
    vectors = rng.normal(size=(60, 8)).astype(np.float32)
    vectors[40:] = vectors[40] + 0.05 * rng.normal(size=(20, 8)).astype(np.float32)  # 20 alike: many above
    unit = unit_rows(vectors)
    full = unit @ unit.T
    for floor in (0.3, 0.9):
        sims, idx = nearest_later(unit, 4, rows=7, columns=11, floor=floor)
        for i in range(60):
            want = full[i, i + 1 :].topk(min(4, 59 - i)) if i < 59 else None
            kept = sims[i] >= floor
            if want is None:
                assert not kept.any()
                continue
            above = want.values >= floor
            torch.testing.assert_close(sims[i][kept], want.values[above])
            assert (idx[i][kept] == want.indices[above] + i + 1).all()


def test_exact_search_flag_turns_the_sketch_off(
    tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`bit audit --exact-search` asks find_pairs for no sketch; without it, the sketch above SKETCH_ABOVE."""
    from PIL import Image

    from bitcli.commands import audit

    monkeypatch.setenv("BITCLI_CACHE", str(tmp_path / "cache"))
    for c in ("a", "b"):
        (tmp_path / "data" / c).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (32, 32), (80 * i, 200 * (c == "a"), 40)).save(tmp_path / "data" / c / f"{i}.png")
    asked = []

    def spy(vectors: np.ndarray, pixels: list, threshold: float, *, sketch_above: int | None) -> list[Pair]:
        asked.append(sketch_above)
        return find_pairs(vectors, pixels, threshold, sketch_above=sketch_above)

    monkeypatch.setattr(audit, "find_pairs", spy)
    for flags in (["--exact-search"], []):
        code, _, err = run_main("audit", tmp_path / "data", "-m", tiny_dir, "--workers", "0", *flags)
        assert code == 0, err
    assert asked == [None, duplicates.SKETCH_ABOVE]
