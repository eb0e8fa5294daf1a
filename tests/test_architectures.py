"""The registry of named architectures (bitcli.architectures): every layout under each of its names (bitcli's,
Google's published ones, timm's), the errors for other names, and that it loads without torch. That the
layouts build timm's own tensors is in tests/test_model.py. Google published, and timm builds, six of the
twelve R50/R101/R152 x1-x4 layouts; the other six have bitcli's name only."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
from conftest import run_main

from bitcli.architectures import (
    ARCHITECTURES,
    DEFAULT_MODEL,
    PRESETS,
    TIMM_LAYOUTS,
    find,
    from_name,
    is_published_name,
    timm_name,
)
from bitcli.config import BitConfig
from bitcli.errors import BitError
from bitcli.finetune.start import random_init_config

LAYOUTS = [a for a in ARCHITECTURES if a.name not in PRESETS]
KNOWN = "R50x1, R50x2, R50x3, R50x4, R101x1, R101x2, R101x3, R101x4, R152x1, R152x2, R152x3, R152x4, tiny, small"
# What Google published (storage.googleapis.com/bit_models) and timm builds (timm.list_models("resnetv2_*_bit")).
PUBLISHED = ["R50x1", "R50x3", "R101x1", "R101x3", "R152x2", "R152x4"]
UNPUBLISHED = ["R50x2", "R50x4", "R101x2", "R101x4", "R152x1", "R152x3"]


def test_the_table_holds_every_bit_layout_and_the_presets():
    assert [a.name for a in LAYOUTS] == KNOWN.split(", ")[:12]
    assert [a.name for a in LAYOUTS if a.published] == [a.name for a in LAYOUTS if a.timm] == PUBLISHED
    assert PRESETS == ("tiny", "small")
    assert from_name("R50x1") == BitConfig(
        depths=(3, 4, 6, 3), hidden_sizes=(256, 512, 1024, 2048), embedding_size=64, num_groups=32, num_classes=1000
    )
    assert from_name("R152x4", num_classes=21843) == BitConfig(
        depths=(3, 8, 36, 3), hidden_sizes=(1024, 2048, 4096, 8192), embedding_size=256, num_classes=21843
    )
    assert from_name("R101x3").depths == (3, 4, 23, 3)
    assert from_name("tiny", num_classes=3) == BitConfig(
        depths=(1, 1), hidden_sizes=(32, 64), embedding_size=16, num_groups=8, num_classes=3
    )
    assert from_name("small", num_classes=2) == BitConfig(
        depths=(1, 1, 1, 1), hidden_sizes=(32, 64, 128, 256), embedding_size=16, num_groups=8, num_classes=2
    )


@pytest.mark.parametrize("arch", [a for a in LAYOUTS if a.name in PUBLISHED], ids=lambda a: a.name)
def test_every_name_of_a_layout_gives_its_config_and_back(arch):
    """name -> config -> timm name -> config, and the same config under Google's four names and timm's tags."""
    depth, width = arch.name[1:].split("x")
    config = from_name(arch.name, num_classes=21843)
    assert timm_name(config) == arch.timm == f"resnetv2_{depth}x{width}_bit"
    assert from_name(timm_name(config), num_classes=21843) == config
    assert from_name(f"{arch.timm}.goog_in21k_ft_in1k", num_classes=21843) == config
    assert from_name(arch.name.lower(), num_classes=21843) == config  # bitcli's names in any case, as before
    assert arch.published == tuple(f"BiT-{up}-R{depth}x{width}{tuned}" for up in "SM" for tuned in ("", "-ILSVRC2012"))
    for published in arch.published:
        assert is_published_name(published)
        assert from_name(published, num_classes=21843) == config


@pytest.mark.parametrize("name", UNPUBLISHED)
def test_an_unpublished_layout_has_bitclis_name_only(name):
    """R50x2 builds for --random-init, but no BiT-M-R50x2 was published and timm has no resnetv2_50x2_bit."""
    depth, width = name[1:].split("x")
    arch = find(name)
    assert (arch.published, arch.timm) == ((), None)
    assert random_init_config(name, 2) == from_name(name, num_classes=2)
    assert from_name(name).hidden_sizes == tuple(w * int(width) for w in (256, 512, 1024, 2048))
    for published in (f"BiT-M-{name}", f"BiT-S-{name}", f"BiT-M-{name}-ILSVRC2012"):
        assert not is_published_name(published)
        assert find(published) is None
    assert find(f"resnetv2_{depth}x{width}_bit") is None
    with pytest.raises(BitError) as info:
        timm_name(from_name(name))
    assert str(info.value) == (
        "this layout has no timm name (timm's BiT models are R50x1, R50x3, R101x1, R101x3, R152x2, R152x4, eps 1e-8)"
    )


def test_timm_layouts_are_the_ones_timm_has():
    timm = pytest.importorskip("timm")
    assert sorted(timm.list_models("resnetv2_*_bit")) == sorted(find(n).timm for n in PUBLISHED)
    assert ", ".join(PUBLISHED) == TIMM_LAYOUTS


def test_timm_names_only_the_layouts_it_builds():
    """Another head size is the same timm model; anything else about the layout is not."""
    assert timm_name(from_name("R50x1", num_classes=0)) == "resnetv2_50x1_bit"
    for other in [
        from_name("tiny"),
        dataclasses.replace(from_name("R50x1"), ws_eps=1e-10),
        dataclasses.replace(from_name("R50x1"), layer_type="bottleneck"),
        dataclasses.replace(from_name("R50x1"), global_padding="SAME"),
    ]:
        with pytest.raises(BitError, match="this layout has no timm name"):
            timm_name(other)


@pytest.mark.parametrize(
    "name",
    ["BiT-M-R50x1.npz", "bit-m-r50x1", "BiT-X-R50x1", "BiT-M-R51x1", "BiT-M-R50x5", "BiT-M-R50x1-ILSVRC2013",
     "R50x1", "tiny", "resnetv2_50x1_bit", "google/bit-50", ""],
)  # fmt: skip
def test_other_names_are_not_published(name):
    assert not is_published_name(name)


@pytest.mark.parametrize(
    "name",
    ["R51x1", "R50x5", "R50", "resnetv2_50x1", "resnetv2_50x1_bit.goog-in21k", "resnetv2_50x1_bit..x",
     "bit-50", "huge", "TINY x", ""],
)  # fmt: skip
def test_an_unknown_name_is_refused_with_the_known_ones(name):
    with pytest.raises(BitError) as info:
        from_name(name)
    assert str(info.value) == (
        f"unknown architecture {name!r}; known: {KNOWN} "
        "(or Google's name, e.g. BiT-M-R50x1, or timm's, e.g. resnetv2_50x1_bit)"
    )


def test_random_init_refuses_an_unknown_name_with_the_known_ones():
    with pytest.raises(BitError) as info:
        random_init_config("R51x1", 2)
    assert str(info.value) == (
        f"--random-init --model 'R51x1': use a preset or architecture ({KNOWN}) or a JSON object of BitConfig fields"
    )
    assert random_init_config("BiT-M-R101x3", 2) == from_name("R101x3", num_classes=2)


def test_default_model_is_transformers_bit_50_and_shown_in_help():
    assert DEFAULT_MODEL == "google/bit-50"
    for command in ("predict", "embed", "eval"):
        code, out, _ = run_main(command, "--help")
        assert code == 0 and "[default: google/bit-50]" in " ".join(out.split()), command


def test_the_registry_loads_without_torch():
    """bitcli.options and bitcli.cli read it while parsing flags, before torch may load."""
    code = "import sys\nimport bitcli.architectures\nprint(sorted(m for m in ('torch', 'numpy', 'PIL') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
