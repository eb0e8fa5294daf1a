"""Grad-CAM in the engine (Engine.gradcam): the `grad-cam` package's GradCAM on the final GroupNorm + ReLU is the
oracle (to 1e-4), on square and non-square inputs, one target per image or several; the model is left as it was;
an ONNX engine says what it needs instead."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import perturb

from bitcli.architectures import from_name
from bitcli.errors import BitError
from bitcli.model import BitModel
from bitcli.onnx_engine import NO_GRADCAM, OnnxEngine
from bitcli.preprocess import Preprocess
from bitcli.torch_engine import TorchEngine

CLASSES = 7


def model_of(name: str) -> BitModel:
    model = BitModel(from_name(name, num_classes=CLASSES)).eval()
    perturb(model, seed=1)  # random weights and a non-zero head: every class has its own map
    return model


def oracle(model: BitModel, x: torch.Tensor, targets: list[int]) -> np.ndarray:
    """The package's maps on a copy in the default memory format (the engine's runs channels_last)."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    copy = BitModel(model.config).eval()
    copy.load_state_dict(model.state_dict())
    with GradCAM(model=copy, target_layers=[copy.norm]) as cam:
        return cam(input_tensor=x, targets=[ClassifierOutputTarget(t) for t in targets])


@pytest.mark.parametrize(("name", "shape"), [("tiny", (3, 64, 64)), ("small", (2, 48, 80))])
def test_maps_equal_the_grad_cam_package(name: str, shape: tuple[int, int, int]) -> None:
    """An uncropped model takes a non-square input (48x80): its maps are 48x80 too."""
    model = model_of(name)
    engine = TorchEngine(model, Preprocess(resize=None, crop=None), torch.device("cpu"), torch.float32)
    batch = np.random.default_rng(0).integers(0, 256, (*shape, 3), dtype=np.uint8)
    targets = np.arange(shape[0]) % CLASSES
    ours = engine.gradcam(batch, targets)
    assert ours.shape == shape and ours.dtype == np.float32
    x = engine.preprocess.normalize(torch.from_numpy(batch)).contiguous()
    expected = oracle(model, x, targets.tolist())
    np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=0)
    assert ours.min() == 0.0 and ours.max() == pytest.approx(1.0, abs=1e-6)
    # several targets per image: one trunk pass, the same maps as one target at a time
    second = (targets + 3) % CLASSES
    both = engine.gradcam(batch, np.stack([targets, second], axis=1))
    assert both.shape == (shape[0], 2, *shape[1:])
    np.testing.assert_allclose(both[:, 0], expected, atol=1e-4, rtol=0)
    np.testing.assert_allclose(both[:, 1], oracle(model, x, second.tolist()), atol=1e-4, rtol=0)


def test_the_model_is_left_as_it_was() -> None:
    """Fine-tuning's report runs Grad-CAM on the model it trains: no .grad, its mode and weights unchanged."""
    model = model_of("tiny").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    engine = TorchEngine(model, Preprocess(resize=None, crop=None), torch.device("cpu"), torch.float32,
                         channels_last=False)  # fmt: skip
    batch = np.random.default_rng(1).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    logits = engine.logits(batch)
    engine.gradcam(batch, np.array([1, 2]))
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(engine.logits(batch), logits)


def test_an_onnx_engine_says_grad_cam_needs_the_torch_checkpoint() -> None:
    engine = OnnxEngine(None, Preprocess(), CLASSES, labels=(), source="model.onnx")
    with pytest.raises(BitError) as caught:
        engine.gradcam(np.zeros((1, 8, 8, 3), dtype=np.uint8), np.zeros(1, dtype=np.int64))
    assert str(caught.value) == f"model.onnx: {NO_GRADCAM}"
    assert NO_GRADCAM == (
        "Grad-CAM needs the torch checkpoint the ONNX file was exported from (the export gives logits only)"
    )
