"""Google's .npz (bitcli.formats.npz): read against timm's own npz reader at Google's eps, any depth and width
from the shapes, the head-less BiT-S layout, and the axis layout (HWIO kernels, [1, 1, C, N] head) both ways."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bitcli.errors import BitError
from bitcli.formats import npz
from bitcli.hub import load_checkpoint
from bitcli.labels import imagenet21k_labels

from .helpers import (
    BIT_WIDTHS,
    R50,
    TINY,
    bitcli_model,
    convert_ok,
    google_arrays,
    google_to_oihw,
    inputs,
    save_npz,
    timm_from_npz,
)


def test_r50x1_npz_matches_timm_and_carries_googles_eps(tmp_path):
    # Kernels of variance 1e-10, the size of Google's eps: standardising with timm's 1e-8 instead would
    # change every layer, so agreeing with timm-at-1e-10 shows that the eps travelled with the weights.
    arrays = google_arrays(R50, 1, 21843, seed=2, kernel_std=1e-5)
    npz = save_npz(tmp_path / "BiT-M-R50x1.npz", arrays)
    convert_ok(npz, tmp_path / "out.safetensors")
    ckpt = load_checkpoint(str(tmp_path / "out.safetensors"))
    assert (ckpt.config.depths, ckpt.config.hidden_sizes, ckpt.config.num_classes) == (R50, BIT_WIDTHS, 21843)
    assert ckpt.config.ws_eps == 1e-10
    assert ckpt.labels[:2] == ["organism, being", "benthos"]  # a 21843-class head gets ImageNet-21k's names
    assert ckpt.labels == imagenet21k_labels()

    x = inputs(128)
    with torch.no_grad():
        ours = ckpt.build_model()(x)
        theirs = timm_from_npz(npz, R50, 1, 21843)(x)
        timm_eps = timm_from_npz(npz, R50, 1, 21843, eps=1e-8)(x)
    assert ours.shape == (2, 21843)
    assert (ours - theirs).abs().max() < 1e-4
    assert (ours - timm_eps).abs().max() > 1e-2  # the test can tell the two eps apart


def test_r50x3_npz_matches_timm(tmp_path):
    npz = save_npz(tmp_path / "BiT-M-R50x3.npz", google_arrays(R50, 3, 1000, seed=3))
    convert_ok(npz, tmp_path / "out.safetensors")
    ours = bitcli_model(tmp_path / "out.safetensors")
    assert ours.config.hidden_sizes == (768, 1536, 3072, 6144) and ours.config.embedding_size == 192
    x = inputs(64)
    with torch.no_grad():
        diff = (ours(x) - timm_from_npz(npz, R50, 3, 1000)(x)).abs().max()
    assert diff < 1e-4


def test_headless_npz_matches_timm_features(tmp_path):
    arrays = google_arrays(R50, 1, 0, seed=4)
    assert not any(k.startswith("resnet/head") for k in arrays)
    npz = save_npz(tmp_path / "BiT-S-R50x1.npz", arrays)
    convert_ok(npz, tmp_path / "out.safetensors")
    ours = bitcli_model(tmp_path / "out.safetensors")
    assert not ours.has_head and ours.config.num_classes == 0
    x = inputs(96)
    with torch.no_grad():
        features = ours(x)
        theirs = timm_from_npz(npz, R50, 1, 0)(x)  # num_classes=0: timm returns the pooled pre-logits
    assert features.shape == theirs.shape == (2, 2048)
    assert (features - theirs).abs().max() < 1e-4

    # The head-less folder loads in transformers as a 0-label model whose "logits" are the pooled features;
    # transformers standardises with eps 1e-8, so its peer here is timm at that eps.
    import transformers

    convert_ok(tmp_path / "out.safetensors", tmp_path / "hf")
    hf = transformers.BitForImageClassification.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.num_labels == 0
    with torch.no_grad():
        pooled = hf(x).logits
        timm_1e8 = timm_from_npz(npz, R50, 1, 0, eps=1e-8)(x)
    assert (pooled - timm_1e8).abs().max() < 1e-4


def test_any_depth_and_width_from_the_shapes(tmp_path):
    """Not a published layout: depth, widths and classes come from the tensor shapes alone."""
    depths, widths = (2, 1, 3, 1), (128, 256, 256, 512)
    npz = save_npz(tmp_path / "custom.npz", google_arrays(depths, widths=widths, stem=32, num_classes=7, seed=5))
    convert_ok(npz, tmp_path / "out.safetensors")
    ours = bitcli_model(tmp_path / "out.safetensors")
    assert (ours.config.depths, ours.config.hidden_sizes, ours.config.embedding_size) == (depths, widths, 32)
    x = inputs(64)
    with torch.no_grad():
        theirs = timm_from_npz(npz, depths, 1, 7, channels=widths, stem_chs=32)(x)
        assert (ours(x) - theirs).abs().max() < 1e-4


# ----------------------------------------------------------------------------------------------------------
# The layout both ways, in process


def test_read_gives_oihw_kernels_and_a_linear_head_and_write_gives_the_arrays_back(tmp_path):
    """Every tensor against the hand-written HWIO -> OIHW oracle, then bitcli's writer back to Google's arrays,
    bit for bit (kernels, a non-square head, norms)."""
    arrays = google_arrays(TINY["depths"], widths=TINY["widths"], stem=TINY["stem"], num_classes=5, seed=11)
    ckpt = npz.read(save_npz(tmp_path / "src.npz", arrays))
    assert ckpt.format == "npz" and ckpt.config.ws_eps == 1e-10 and ckpt.config.num_classes == 5
    assert ckpt.tensors["head.weight"].shape == (5, 128)  # [1, 1, C, N] -> Linear [N, C]
    for key, array in arrays.items():
        bitcli_key = npz.bitcli_key(key)
        assert npz.npz_key(bitcli_key) == key
        ref = ckpt.tensors[bitcli_key]
        got = ref.load()
        assert tuple(got.shape) == ref.shape and got.is_contiguous(), key
        assert torch.equal(got, google_to_oihw(key, array)), key

    npz.write(ckpt, tmp_path / "back.npz")
    with np.load(tmp_path / "back.npz", allow_pickle=False) as back:
        assert sorted(back.files) == sorted(arrays)
        for key, array in arrays.items():
            assert back[key].dtype == np.float32 and np.array_equal(back[key], array), key


def test_head_kernel_that_is_not_1x1_is_named_with_the_shape_it_needs(tmp_path):
    arrays = google_arrays(TINY["depths"], widths=TINY["widths"], stem=TINY["stem"], num_classes=3)
    arrays["resnet/head/conv2d/kernel"] = np.zeros((3, 1, 128, 3), np.float32)
    path = save_npz(tmp_path / "src.npz", arrays)
    with pytest.raises(BitError) as err:
        npz.read(path)
    assert str(err.value) == f"{path}: resnet/head/conv2d/kernel has shape (3, 1, 128, 3); expected (1, 1, 128, 3)"


def test_wrong_shape_is_reported_in_googles_names_and_axes(tmp_path):
    arrays = google_arrays(TINY["depths"], widths=TINY["widths"], stem=TINY["stem"], num_classes=3)
    arrays["resnet/head/conv2d/kernel"] = np.zeros((1, 1, 64, 3), np.float32)  # the features are 128 wide
    path = save_npz(tmp_path / "src.npz", arrays)
    with pytest.raises(BitError) as err:
        npz.read(path)
    assert str(err.value) == (
        f"{path}: weights do not match the architecture: "
        "wrong shape resnet/head/conv2d/kernel (1, 1, 64, 3) (expected (1, 1, 128, 3))"
    )


def test_a_tensor_googles_layout_has_no_name_for_is_refused_before_writing(tmp_path):
    """A v1.5 (bottleneck) BiT has stem and shortcut norms; Google's .npz has no names for them."""
    from conftest import save_hf_model

    folder = save_hf_model(tmp_path / "v15", embedding_size=16, hidden_sizes=[32, 64], depths=[1, 1], num_groups=8,
                           num_labels=3, layer_type="bottleneck")  # fmt: skip
    ckpt = load_checkpoint(str(folder))
    with pytest.raises(BitError) as err:
        npz.write(ckpt, tmp_path / "out.npz")
    assert str(err.value) == (
        f"{folder}: Google's layout has no name for stages.0.units.0.downsample.norm.bias, "
        "stages.0.units.0.downsample.norm.weight, stages.1.units.0.downsample.norm.bias, "
        "stages.1.units.0.downsample.norm.weight (+2 more); convert to another format"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v15"]
