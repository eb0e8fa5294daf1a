"""Image-folder discovery, few-shot and validation sampling, per-step sampling, transforms, decoding (the
decode cache under bitcli.images.Reader). (The check that finds undecodable images: finetune/test_datasets.py.)"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bitcli import data
from bitcli.data import DecodeCache, StepSampler, augment, few_shot
from bitcli.errors import BitError
from bitcli.images import Reader
from bitcli.sources import examples
from bitcli.sources.examples import ImageFolder
from bitcli.sources.folder import find_splits, scan


def write_images(root: Path, counts: dict[str, int], size: tuple[int, int] = (12, 10)) -> None:
    rng = np.random.default_rng(0)
    for name, n in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            array = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(array).save(root / name / f"{i:03d}.png")


def test_scan_class_folders(tmp_path: Path) -> None:
    write_images(tmp_path, {"dog": 3, "cat": 2})
    (tmp_path / "cat" / "deeper").mkdir()
    Image.new("RGB", (5, 5)).save(tmp_path / "cat" / "deeper" / "x.jpg")
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    (tmp_path / ".hidden").mkdir()
    Image.new("RGB", (5, 5)).save(tmp_path / ".hidden" / "y.png")
    Image.new("RGB", (5, 5)).save(tmp_path / "cat" / ".thumb.png")
    ds = scan(tmp_path)
    assert ds.classes == ("cat", "dog")
    assert len(ds) == 6 and ds.counts() == [3, 3]
    assert [Path(p).name for p in ds.paths] == ["000.png", "001.png", "x.jpg", "000.png", "001.png", "002.png"]
    assert ds.targets == (0, 0, 0, 1, 1, 1)


def test_class_order_is_by_number_when_every_class_is_an_integer(tmp_path: Path) -> None:
    assert examples.class_order(["10", "2", "0", "1", "11", "2"]) == ("0", "1", "2", "10", "11")
    assert examples.class_order(["-1", "10", "01", "1", "9"]) == ("-1", "01", "1", "9", "10")  # "01" and "1": by name
    assert examples.class_order(["10", "2", "b"]) == ("10", "2", "b")  # not all integers: by name
    assert examples.class_order(["1.5", "10", "2"]) == ("1.5", "10", "2")
    write_images(tmp_path, {"10": 1, "9": 1, "100": 1})
    assert scan(tmp_path).classes == ("9", "10", "100")


@pytest.mark.parametrize("val_name", ["val", "valid", "validation"])
def test_find_splits(tmp_path: Path, val_name: str) -> None:
    write_images(tmp_path / "train", {"a": 2, "b": 2})
    write_images(tmp_path / val_name, {"a": 1})
    train, val = find_splits(tmp_path)
    assert (train, val) == (tmp_path / "train", tmp_path / val_name)
    train_ds = scan(train)
    val_ds = scan(val, classes=train_ds.classes)
    assert val_ds.classes == ("a", "b") and val_ds.targets == (0,)


def test_find_splits_plain_folder(tmp_path: Path) -> None:
    write_images(tmp_path, {"a": 1})
    assert find_splits(tmp_path) == (tmp_path, None)
    (tmp_path / "train").mkdir()
    assert find_splits(tmp_path) == (tmp_path / "train", None)


def test_wrong_layout_prints_expected_tree(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    Image.new("RGB", (5, 5)).save(tmp_path / "loose.png")
    with pytest.raises(BitError, match="holds images but no class sub-folders"):
        scan(tmp_path)
    err = capsys.readouterr().err
    assert "one sub-folder per class" in err and "cat/" in err and "train/cat/" in err and "val/cat/" in err


def test_missing_folder_and_empty_class(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(BitError, match="no such folder"):
        find_splits(tmp_path / "nope")
    write_images(tmp_path, {"a": 1})
    (tmp_path / "empty").mkdir()
    with pytest.raises(BitError, match="class folder 'empty' holds no images"):
        scan(tmp_path)


def test_validation_class_must_be_a_training_class(tmp_path: Path) -> None:
    write_images(tmp_path / "val", {"a": 1, "zebra": 1})
    with pytest.raises(BitError, match="class 'zebra' is not among the 2 training classes"):
        scan(tmp_path / "val", classes=("a", "b"))


# ----------------------------------------------------------------------------------------------------------
# Few-shot and validation splits


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> ImageFolder:
    root = tmp_path_factory.mktemp("folder")
    write_images(root, {"a": 9, "b": 5, "c": 14}, size=(4, 4))
    return scan(root)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_few_shot_takes_exactly_k_per_class(folder: ImageFolder, k: int) -> None:
    picked = few_shot(folder, k, seed=0)
    assert picked.counts() == [k, k, k]
    assert len(set(picked.paths)) == 3 * k
    for path, target in zip(picked.paths, picked.targets):
        assert folder.targets[folder.paths.index(path)] == target


def test_few_shot_is_deterministic_per_seed(folder: ImageFolder) -> None:
    runs = {seed: [few_shot(folder, 4, seed).paths for _ in range(3)] for seed in range(6)}
    for same in runs.values():
        assert same[0] == same[1] == same[2]
    assert len({r[0] for r in runs.values()}) > 1  # other seeds pick other images


def test_few_shot_too_few_images_names_the_class(folder: ImageFolder) -> None:
    with pytest.raises(BitError, match=r"--shots 6: class 'b' has only 5 training image\(s\)"):
        few_shot(folder, 6, seed=0)
    with pytest.raises(BitError):
        few_shot(folder, 0, seed=0)


def test_split_validation_is_stratified_disjoint_and_seeded(folder: ImageFolder) -> None:
    train, val = data.split_validation(folder, 0.2, seed=3)
    assert val.counts() == [2, 1, 3]  # round(0.2 * n) of every class
    assert train.counts() == [7, 4, 11]
    assert not set(train.paths) & set(val.paths)
    assert data.split_validation(folder, 0.2, seed=3)[1].paths == val.paths
    with pytest.raises(BitError, match="between 0 and 1"):
        data.split_validation(folder, 1.5, seed=0)


def test_fingerprint_follows_the_files(folder: ImageFolder) -> None:
    assert folder.fingerprint() == scan(folder.root).fingerprint()
    assert folder.fingerprint() != folder.subset(range(len(folder) - 1)).fingerprint()


# ----------------------------------------------------------------------------------------------------------
# Per-step sampling


def test_epochs_visit_every_example_once() -> None:
    sampler = StepSampler(num_examples=10, batch_size=4, seed=0, max_offset=3, mixup=None)
    stream = np.concatenate([sampler.indices(s) for s in range(10)])  # 40 positions = 4 epochs
    for epoch in range(4):
        assert sorted(stream[epoch * 10 : (epoch + 1) * 10].tolist()) == list(range(10))
    assert stream[:10].tolist() != stream[10:20].tolist()  # a new order every epoch


def test_small_data_sets_sample_full_batches_with_replacement() -> None:
    sampler = StepSampler(num_examples=3, batch_size=16, seed=0, max_offset=0, mixup=None)
    batch = sampler.indices(0)
    assert batch.shape == (16,) and set(batch.tolist()) <= {0, 1, 2}
    assert max(Counter(batch.tolist()).values()) > 1


def test_step_sample_is_a_function_of_seed_and_step() -> None:
    a = StepSampler(50, 8, seed=1, max_offset=4, mixup=0.1)
    warm = [a.sample(s) for s in range(7)]  # a sampler that has been used ...
    fresh = StepSampler(50, 8, seed=1, max_offset=4, mixup=0.1).sample(6)  # ... and one that starts at step 6
    for field in ("indices", "tops", "lefts", "flips", "partners"):
        assert np.array_equal(getattr(warm[6], field), getattr(fresh, field))
    assert warm[6].lam == fresh.lam and 0.0 <= fresh.lam <= 1.0
    assert sorted(fresh.partners.tolist()) == list(range(8))
    assert fresh.tops.max() <= 4 and fresh.lefts.min() >= 0
    other = StepSampler(50, 8, seed=2, max_offset=4, mixup=0.1).sample(6)
    assert not np.array_equal(other.indices, fresh.indices) or not np.array_equal(other.tops, fresh.tops)
    no_mix = StepSampler(50, 8, seed=1, max_offset=4, mixup=None).sample(6)
    assert no_mix.partners is None and no_mix.lam == 1.0


def test_augment_crops_and_flips() -> None:
    image = np.arange(5 * 6 * 3, dtype=np.uint8).reshape(5, 6, 3)
    out = augment(image, top=1, left=2, crop=3, flip=False)
    assert np.array_equal(out, image[1:4, 2:5])
    flipped = augment(image, top=1, left=2, crop=3, flip=True)
    assert np.array_equal(flipped, image[1:4, 2:5][:, ::-1]) and flipped.flags.c_contiguous


def test_transforms_follow_bit() -> None:
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 50, 3), dtype=np.uint8))
    assert data.train_transform(40).to_uint8(img).shape == (40, 40, 3)  # squashed to a square, not cropped
    ev = data.eval_transform(32, (0.5,) * 3, (0.5,) * 3)
    assert ev.to_uint8(img).shape == (32, 32, 3)
    assert ev.to_uint8(img).tobytes() == np.asarray(img.resize((32, 32), Image.Resampling.BILINEAR)).tobytes()


def decode_jobs(count: int, decode, batch_size: int):
    """(first index, decode jobs) of consecutive batches, as fine-tuning's validation reads a data set."""
    for start in range(0, count, batch_size):
        yield start, [lambda i=i: decode(i) for i in range(start, min(start + batch_size, count))]


@pytest.mark.parametrize("workers", [0, 1, 3])
def test_cached_decoding_does_not_depend_on_workers(folder: ImageFolder, workers: int) -> None:
    cache = DecodeCache(folder, data.train_transform(6), budget_bytes=200)  # caches only a couple of images
    with Reader(workers) as reader:
        batches = list(reader.run(decode_jobs(len(folder), cache.get, 5)))
    assert 0 < len(cache._arrays) < len(folder) and cache._used <= 200
    uncached = DecodeCache(folder, data.train_transform(6), 0)
    reference = [(start, np.stack([uncached.get(i) for i in range(start, min(start + 5, len(folder)))]))
                 for start in range(0, len(folder), 5)]  # fmt: skip
    assert [s for s, _ in batches] == [s for s, _ in reference] == list(range(0, len(folder), 5))
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(batches, reference))
    assert batches[-1][1].shape == (len(folder) % 5 or 5, 6, 6, 3)


def test_bad_image_is_an_error_naming_the_file(tmp_path: Path) -> None:
    write_images(tmp_path, {"a": 1})
    (tmp_path / "a" / "broken.png").write_bytes(b"not a png")
    ds = scan(tmp_path)
    with Reader(2) as reader, pytest.raises(BitError, match=r"broken\.png"):
        list(reader.run(decode_jobs(len(ds), DecodeCache(ds, data.train_transform(4), 0).get, 2)))


# ----------------------------------------------------------------------------------------------------------
# Images that do not decode


def test_few_shot_decodes_only_candidates_and_picks_as_if_bad_files_were_gone(tmp_path: Path) -> None:
    write_images(tmp_path, {"a": 6, "b": 6})
    ds = scan(tmp_path)
    bad = few_shot(ds, 3, seed=4).paths[1]  # one of the images the seed picks
    decoded: list[int] = []

    def undecodable(indices: list[int]) -> set[int]:
        decoded.extend(indices)
        return {i for i in indices if ds.paths[i] == bad}

    picked = few_shot(ds, 3, 4, undecodable)
    assert picked.counts() == [3, 3] and bad not in picked.paths
    assert len(decoded) == 7  # the six candidates, then one replacement: not the whole folder
    Path(bad).unlink()
    after = scan(tmp_path)
    assert few_shot(after, 3, seed=4).paths == picked.paths  # deleting the file changes nothing else ...
    assert few_shot(after, 3, seed=4).fingerprint() == picked.fingerprint()  # ... so --resume accepts it
    with pytest.raises(
        BitError, match=r"class 'a' has only 5 training image\(s\) that decode \(1 could not be decoded\)"
    ):
        few_shot(ds, 6, 4, undecodable)
