"""timm's layout (bitcli.formats.timm): names both ways for every published BiT, the head a 1x1 conv, and
errors in timm's own names and shapes. Logit agreement with timm is in tests/test_model.py."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import save_file

from bitcli.architectures import from_name
from bitcli.errors import BitError
from bitcli.formats import expected_shapes, hf, timm
from bitcli.formats.tensors import TensorRef


@pytest.mark.parametrize("layout", [timm.LAYOUT, hf.LAYOUT], ids=["timm", "hf"])
def test_key_maps_invert_each_other_for_every_tensor(layout):
    shapes = expected_shapes(dataclasses.replace(from_name("R152x4", num_classes=10), layer_type="bottleneck"))
    names = {layout.source_key(k) for k in shapes}
    assert len(names) == len(shapes) and None not in names
    assert all(layout.bitcli_key(layout.source_key(k)) == k for k in shapes)


def test_head_is_a_1x1_conv_in_timm_and_a_linear_in_bitcli():
    head = torch.arange(12.0).reshape(3, 4)
    ref = TensorRef((3, 4), torch.float32, lambda: head)
    conv = timm.LAYOUT.ref_from_bitcli("head.weight", ref)
    assert conv.shape == (3, 4, 1, 1) and torch.equal(conv.load(), head[:, :, None, None])
    back = timm.LAYOUT.ref_to_bitcli("head.weight", conv)
    assert back.shape == (3, 4) and torch.equal(back.load(), head)
    bias = TensorRef((3,), torch.float32, lambda: head[0])
    assert timm.LAYOUT.ref_from_bitcli("head.bias", bias) is bias  # nothing to move: the same reference
    assert hf.LAYOUT.ref_from_bitcli("head.weight", ref) is ref


def test_wrong_head_is_reported_in_timms_names_and_shapes(tmp_path):
    import timm as timm_lib

    state = timm_lib.create_model("resnetv2_50x1_bit", num_classes=4).state_dict()
    state["head.fc.weight"] = torch.zeros(4, 1024, 1, 1)  # the features are 2048 wide
    save_file(state, tmp_path / "model.safetensors")  # a bare timm state dict
    with pytest.raises(BitError) as err:
        timm.read(tmp_path / "model.safetensors")
    assert str(err.value) == (
        f"{tmp_path / 'model.safetensors'}: weights do not match the architecture: "
        "wrong shape head.fc.weight (4, 1024, 1, 1) (expected (4, 2048, 1, 1))"
    )


def _refs(state: dict[str, torch.Tensor]) -> dict[str, TensorRef]:
    return {k: TensorRef(tuple(t.shape), t.dtype, (lambda t=t: t)) for k, t in state.items()}


def test_unknown_names_are_listed_at_once(tmp_path):
    refs = _refs(
        {"stem.conv.weight": torch.zeros(16, 3, 7, 7), "fc.weight": torch.zeros(2, 2), "pos_embed": torch.zeros(1)}
    )
    with pytest.raises(BitError) as err:
        timm.read_weights(tmp_path / "m.pth", refs)
    assert str(err.value) == (
        f"{tmp_path / 'm.pth'}: unknown tensor name(s) fc.weight, pos_embed; not a BiT checkpoint in "
        "timm's BiT layout (stem.conv.weight, stages.N.blocks.N.*, head.fc.*)"
    )
