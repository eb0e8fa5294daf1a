"""bitcli.labels: the packaged ImageNet names against timm's (the oracle), their generator, and folder matching."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest

from bitcli.errors import BitError
from bitcli.labels import (
    default_labels,
    imagenet21k_labels,
    imagenet_labels,
    match_class,
    match_classes,
)

ROOT = Path(__file__).resolve().parent.parent
PACKAGED = ROOT / "bitcli" / "labels"


def load_script():
    spec = importlib.util.spec_from_file_location("make_labels", ROOT / "scripts" / "make_labels.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------------------
# The names


def test_imagenet21k_names_equal_timm_goog_order_for_every_index():
    from timm.data import ImageNetInfo

    info = ImageNetInfo("imagenet-21k-goog")
    names = imagenet21k_labels()
    assert len(names) == info.num_classes() == 21843
    assert names == [info.index_to_description(i) for i in range(21843)]


def test_imagenet1k_names_equal_timm_and_google_bit50_names():
    from timm.data import ImageNetInfo

    info = ImageNetInfo("imagenet-1k")
    names = imagenet_labels()
    assert names == [info.index_to_description(i) for i in range(1000)]
    # google/bit-50's id2label (not shipped offline): the same lemma strings, duplicates included
    assert names[0] == "tench, Tinca tinca"
    assert names[281] == "tabby, tabby cat"
    assert names[134] == names[517] == "crane"
    assert names[638] == "maillot" and names[639] == "maillot, tank suit"
    assert names[999] == "toilet tissue, toilet paper, bathroom tissue"


def test_default_labels_by_head_size_and_fresh_lists():
    assert default_labels(1000) == imagenet_labels()
    assert default_labels(21843) == imagenet21k_labels()
    assert default_labels(21843)[4783] != "class_4783"
    assert default_labels(3) == ["class_0", "class_1", "class_2"]
    first = default_labels(1000)
    first[281] = "changed"
    assert default_labels(1000)[281] == imagenet_labels()[281] == "tabby, tabby cat"  # the cache is not shared


def test_packaged_files_are_one_clean_name_per_line_and_small():
    for filename, count in [("imagenet1k.txt", 1000), ("imagenet21k.txt", 21843)]:
        data = (PACKAGED / filename).read_bytes()
        assert data.endswith(b"\n") and b"\r" not in data and b"\t" not in data
        lines = data.decode("utf-8").split("\n")[:-1]
        assert len(lines) == count
        assert all(line and line == line.strip() and line.isprintable() for line in lines)
    assert (PACKAGED / "imagenet21k.txt").stat().st_size < 1_000_000  # plain text, no gzip needed


def test_importing_labels_does_not_import_torch():
    code = "import sys, bitcli.labels as L; L.imagenet21k_labels(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------------------------------------------------
# The generator


def test_generator_reproduces_packaged_files_byte_for_byte(tmp_path):
    assert load_script().main(["--out", str(tmp_path / "out")]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["imagenet1k.txt", "imagenet21k.txt"]
    for filename in ["imagenet1k.txt", "imagenet21k.txt"]:
        assert (tmp_path / "out" / filename).read_bytes() == (PACKAGED / filename).read_bytes()


@pytest.mark.parametrize("bad", ["a\tb", "line\u2028break", " padded", "", "bell\x07"])
def test_generator_refuses_a_name_that_is_not_one_clean_line(tmp_path, bad):
    script = load_script()
    (tmp_path / "list.txt").write_text("n1\nn2\n", encoding="utf-8")
    lemmas = {"n1": "fine, name", "n2": bad}
    with pytest.raises(SystemExit) as exc:
        script.label_names(tmp_path, "list.txt", 2, lemmas)
    assert str(exc.value) == (
        f"list.txt line 2 (n2): class name {bad!r} is empty, padded or holds a line break, tab or control character"
    )


def test_generator_refuses_a_wrong_count_and_a_missing_lemma(tmp_path):
    script = load_script()
    (tmp_path / "list.txt").write_text("n1\nn2\n", encoding="utf-8")
    with pytest.raises(SystemExit, match=r"list\.txt: expected 3 distinct synsets, got 2$"):
        script.label_names(tmp_path, "list.txt", 3, {"n1": "a", "n2": "b"})
    with pytest.raises(SystemExit, match=r"no lemmas for 1 synsets, e\.g\. \['n2'\]$"):
        script.label_names(tmp_path, "list.txt", 2, {"n1": "a"})


# ---------------------------------------------------------------------------------------------------------
# Folder name -> class index


def test_match_class_full_name_index_and_unique_first_name():
    names = imagenet_labels()
    assert match_class("tabby, tabby cat", names) == 281
    assert match_class("281", names) == 281
    assert match_class("0281", names) == 281  # zero-padded folders (000 ... 999) sort in class order
    assert match_class("0", names) == 0
    assert match_class("tabby", names) == 281  # first name, unique among the 1000
    assert match_class("maillot", names) == 638  # the exact full label of 638, though 639 starts with it too
    assert match_class("maillot, tank suit", names) == 639
    assert match_class("517", names) == 517  # the second crane, by index
    with pytest.raises(BitError, match=r"\(2395 'tabby, queen', 2397 'tabby, tabby cat'\)"):
        match_class("tabby", imagenet21k_labels())  # in ImageNet-21k "tabby" is also a female cat
    assert match_class("tabby, tabby cat", imagenet21k_labels()) == 2397


def test_match_class_refuses_the_two_cranes_and_lists_both():
    with pytest.raises(BitError) as exc:
        match_class("crane", imagenet_labels(), Path("val") / "crane", "google/bit-50")
    assert str(exc.value) == (
        f"{Path('val') / 'crane'}: class 'crane' is ambiguous: 2 labels of google/bit-50 match it "
        "(134 'crane', 517 'crane'); name the folder by the class index instead, e.g. '134'"
    )


def test_match_class_refuses_an_ambiguous_first_name_and_caps_the_list():
    labels = [f"apple, kind {i}" for i in range(12)] + ["pear"]
    with pytest.raises(BitError) as exc:
        match_class("apple", labels, "data/apple")
    shown = ", ".join(f"{i} 'apple, kind {i}'" for i in range(10))
    assert str(exc.value) == (
        f"data/apple: class 'apple' is ambiguous: 12 labels of the model match it ({shown} and 2 more); "
        "name the folder by the class index instead, e.g. '0'"
    )


def test_match_class_refuses_unknown_names_and_indices_out_of_range():
    names = imagenet_labels()
    with pytest.raises(BitError) as exc:
        match_class("zebra crossing", names, "val/zebra crossing", "BiT-S-R50x1-ILSVRC2012")
    assert str(exc.value) == (
        "val/zebra crossing: class 'zebra crossing' is not a label of BiT-S-R50x1-ILSVRC2012 "
        "('tench, Tinca tinca', 'goldfish, Carassius auratus', 'great white shark, white shark, man-eater, "
        "man-eating shark, Carcharodon carcharias', 'tiger shark, Galeocerdo cuvieri', "
        "'hammerhead, hammerhead shark' ... 1000 in all); name the class folders after the model's labels "
        "(the full name, or its first name when unique) or class indices"
    )
    with pytest.raises(BitError) as exc:
        match_class("1000", names, "val/1000", "m")
    assert str(exc.value) == "val/1000: class index 1000 is out of range: m has 1000 classes (0-999)"
    with pytest.raises(BitError, match="is not a label of"):
        match_class("Tabby", names)  # names are matched exactly, case included
    with pytest.raises(BitError, match="is not a label of"):
        match_class("tabby cat", names)  # only the first name is a short name


def test_numbers_are_labels_not_indices_when_the_labels_are_numbers():
    labels = ["0", "1", "10", "2"]  # a head fine-tuned on folders named by digits, sorted as text
    assert match_class("10", labels) == 2
    assert match_class("2", labels) == 3
    with pytest.raises(BitError) as exc:
        match_class("3", labels, "val/3", "run")  # read as index 3 it would silently score as class "2"
    assert str(exc.value) == (
        "val/3: class '3' is not a label of run ('0', '1', '10', '2'); name the class folders after the model's labels"
    )


def test_match_class_compares_unicode_names_in_composed_form():
    labels = ["caf\u00e9", "tea"]
    assert match_class(unicodedata.normalize("NFD", "caf\u00e9"), labels) == 0  # as macOS may list the folder


def test_match_classes_maps_every_folder_and_refuses_two_folders_for_one_class():
    names = imagenet_labels()
    root = Path("data") / "val"
    assert match_classes(["tabby", "0", "517"], names, "m", root) == [281, 0, 517]
    with pytest.raises(BitError) as exc:
        match_classes(["281", "tabby, tabby cat"], names, "m", root)
    assert str(exc.value) == (
        f"{root / 'tabby, tabby cat'}: names the same class as {root / '281'} (281 'tabby, tabby cat'); "
        "merge the two folders or remove one"
    )
