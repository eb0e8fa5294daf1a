"""The model core against the peers: same weights in, same logits out (transformers and timm)."""

from __future__ import annotations

import pytest
import timm
import torch
import transformers
from conftest import perturb, save_hf_model

from bitcli.architectures import from_name
from bitcli.config import BitConfig
from bitcli.formats import expected_shapes
from bitcli.formats.hf import config_from_hf, config_to_hf
from bitcli.formats.timm import LAYOUT as TIMM
from bitcli.hub import load_checkpoint
from bitcli.model import BitModel

LAYOUTS = {
    "bit-50": dict(num_labels=1000),
    "tiny": dict(embedding_size=16, hidden_sizes=[32, 64], depths=[1, 2], num_groups=8, num_labels=5),
    "bottleneck-same": dict(
        embedding_size=16, hidden_sizes=[32, 64, 128], depths=[1, 1, 2], num_groups=8, num_labels=7,
        layer_type="bottleneck", global_padding="SAME", embedding_dynamic_padding=True,
    ),
    "bottleneck-same-os8": dict(
        embedding_size=16, hidden_sizes=[32, 64, 128, 128], depths=[1, 1, 1, 1], num_groups=8, num_labels=3,
        layer_type="bottleneck", global_padding="SAME", embedding_dynamic_padding=True, output_stride=8,
    ),
    "preact-same": dict(embedding_size=16, hidden_sizes=[32, 64], depths=[2, 1], num_groups=4, global_padding="SAME", num_labels=4),
}  # fmt: skip


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_logits_match_transformers(layout, tmp_path):
    folder = save_hf_model(tmp_path / layout, **LAYOUTS[layout])
    reference = transformers.BitForImageClassification.from_pretrained(folder).eval()
    ours = load_checkpoint(str(folder)).build_model()
    gen = torch.Generator().manual_seed(1)
    for shape in [(2, 3, 224, 224), (1, 3, 97, 131)]:  # odd sizes exercise the dynamic SAME padding
        x = torch.randn(shape, generator=gen)
        with torch.no_grad():
            expected = reference(x).logits
            got = ours(x)
            features = ours.pre_logits(x)
            expected_features = reference.bit(x).pooler_output.flatten(1)
        assert got.shape == expected.shape
        assert torch.allclose(got, expected, atol=1e-4, rtol=0), (got - expected).abs().max()
        assert torch.allclose(features, expected_features, atol=1e-4, rtol=0)
        assert expected.abs().max() > 0.1  # a real signal, not a zero head


def test_logits_match_timm_resnetv2_50x1_bit(tmp_path):
    reference = timm.create_model("resnetv2_50x1_bit", num_classes=1000).eval()
    perturb(reference)
    from timm.models._hub import save_for_hf

    save_for_hf(reference, tmp_path / "timm", safe_serialization=True)
    ckpt = load_checkpoint(str(tmp_path / "timm"))
    assert ckpt.format == "timm" and ckpt.config == from_name("R50x1")
    ours = ckpt.build_model()
    x = torch.randn(2, 3, 160, 160, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected, got = reference(x), ours(x)
    assert torch.allclose(got, expected, atol=1e-4, rtol=0), (got - expected).abs().max()
    assert expected.abs().max() > 0.1


@pytest.mark.parametrize("name", ["R50x1", "R50x3", "R101x1", "R101x3", "R152x2", "R152x4"])
def test_every_published_variant_has_timms_tensors(name):
    """Key names and shapes of all six published BiT layouts, against timm's own models (built on meta): what
    bitcli's timm layout (names and its 1x1-conv head) turns bitcli's tensors into."""
    depth, width = name[1:].split("x")
    with torch.device("meta"):
        reference = timm.create_model(f"resnetv2_{depth}x{width}_bit", num_classes=21843)
    want = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    ours = expected_shapes(from_name(name, num_classes=21843))
    mapped = {TIMM.key(k): TIMM.shape(k, s) for k, s in ours.items()}
    assert mapped == want
    assert mapped["head.fc.weight"] == (21843, 2048 * int(width), 1, 1)


def test_parameter_counts_of_published_variants():
    counts = {}
    for name in ["R50x1", "R152x4"]:
        with torch.device("meta"):
            model = BitModel(from_name(name, num_classes=1000))
        counts[name] = sum(p.numel() for p in model.parameters())
    assert counts == {"R50x1": 25_549_352, "R152x4": 936_533_224}


def test_standardized_kernel_cache_follows_weight_updates():
    """Inference caches the standardised kernels; an optimizer step or .to() must invalidate them."""
    torch.manual_seed(0)
    model = BitModel(BitConfig(depths=(1, 1), hidden_sizes=(32, 64), embedding_size=16, num_groups=8, num_classes=3))
    perturb(model)
    x = torch.randn(2, 3, 64, 64)

    def fresh(m: BitModel, inp: torch.Tensor) -> torch.Tensor:  # the uncached path: gradients on
        with torch.enable_grad():
            return m(inp).detach()

    model.eval()
    with torch.no_grad():
        cached = model(x)
        again = model(x)
    assert torch.equal(cached, again)
    assert torch.allclose(cached, fresh(model, x), atol=1e-5, rtol=0)

    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model(x).sum().backward()
    optimizer.step()
    with torch.no_grad():
        after_step = model(x)
    assert not torch.allclose(after_step, cached)
    assert torch.allclose(after_step, fresh(model, x), atol=1e-5, rtol=0)

    model.to(torch.float64)
    with torch.no_grad():
        as_double = model(x.double())
    assert as_double.dtype == torch.float64
    assert torch.allclose(as_double.float(), after_step, atol=1e-4, rtol=0)


def test_config_round_trips():
    cfg = BitConfig(depths=(1, 2), hidden_sizes=(32, 64), embedding_size=16, num_groups=8, num_classes=5,
                    layer_type="bottleneck", global_padding="SAME", embedding_dynamic_padding=True, output_stride=16)  # fmt: skip
    assert BitConfig.from_dict(cfg.to_dict()) == cfg
    assert config_from_hf(config_to_hf(cfg), num_classes=5) == cfg
    hf = transformers.BitConfig(**config_to_hf(cfg))  # transformers accepts what we write
    assert list(hf.hidden_sizes) == [32, 64] and hf.global_padding == "SAME"


def test_width_factor_in_transformers_config_is_applied():
    cfg = config_from_hf(
        {"model_type": "bit", "hidden_sizes": [256, 512, 1024, 2048], "embedding_size": 192, "width_factor": 3}, 10
    )
    assert cfg.hidden_sizes == (768, 1536, 3072, 6144)


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(depths=(1, 1), hidden_sizes=(32,)), "differ in length"),
        (dict(layer_type="v3"), "layer_type"),
        (dict(global_padding="same-ish"), "global_padding"),
        (dict(hidden_sizes=(256, 512, 1024, 2050)), "groups"),
    ],
)
def test_config_rejects_impossible_layouts(bad, message):
    from bitcli.errors import BitError

    with pytest.raises(BitError, match=message):
        BitConfig(**bad)
