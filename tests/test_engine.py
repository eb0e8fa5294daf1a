"""The torch engine (bitcli.torch_engine.TorchEngine, what bitcli.engine.load_engine gives for a torch checkpoint) against transformers on the same uint8 pixels: logits,
features, the model's train/eval mode, and the channels_last fast path against channels-first."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from conftest import save_hf_model
from PIL import Image

from bitcli.engine import load_engine
from bitcli.errors import BitError
from bitcli.hub import load_checkpoint
from bitcli.torch_engine import TorchEngine

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def batch(photos) -> np.ndarray:
    """Three real photos as the uint8 [B, 64, 64, 3] batch the tiny model's transform gives."""
    ckpt_size = 64
    names = ["chelsea.png", "rocket.jpg", "coffee.png"]
    return np.stack([np.asarray(Image.open(photos[n]).convert("RGB").resize((ckpt_size, ckpt_size))) for n in names])


def _pixels(batch: np.ndarray) -> torch.Tensor:
    """What transformers' BitImageProcessor makes of these pixels for the fixtures (mean = std = 0.5)."""
    return (torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5


def test_logits_equal_transformers(tiny_dir, batch):
    engine = load_engine(load_checkpoint(str(tiny_dir)), CPU, torch.float32)
    got = engine.logits(batch)
    peer = transformers.BitForImageClassification.from_pretrained(tiny_dir).eval()
    with torch.no_grad():
        expected = peer(pixel_values=_pixels(batch)).logits
    assert got.dtype == torch.float32 and got.shape == (3, 10)
    assert expected.abs().max() > 0.1  # perturbed weights: a mismatch would show
    assert torch.allclose(got, expected, atol=1e-5, rtol=0), (got - expected).abs().max()


def test_features_equal_transformers_pooler_output(tiny_dir, batch):
    engine = load_engine(load_checkpoint(str(tiny_dir)), CPU, torch.float32)
    got = engine.features(batch)
    peer = transformers.BitModel.from_pretrained(tiny_dir).eval()  # the backbone of the same checkpoint
    with torch.no_grad():
        expected = peer(pixel_values=_pixels(batch)).pooler_output.flatten(1)  # [B, D, 1, 1] -> [B, D]
    assert got.shape == expected.shape == (3, 64)
    assert torch.allclose(got, expected, atol=1e-5, rtol=0), (got - expected).abs().max()


def test_the_model_keeps_its_mode(tiny_dir, batch):
    """Inference runs in eval mode and leaves the model as it found it, also when the forward pass fails."""
    engine = load_engine(load_checkpoint(str(tiny_dir)), CPU, torch.float32)
    seen, fail = [], []

    def hook(module, args):
        seen.append(module.training)
        if fail:
            raise RuntimeError("out of memory")

    engine.model.register_forward_pre_hook(hook)
    for training in (True, False):
        engine.model.train(training)
        engine.logits(batch)
        engine.features(batch)
        assert engine.model.training is training
        fail.append(True)
        with pytest.raises(RuntimeError, match="out of memory"):
            engine.logits(batch)
        fail.clear()
        assert engine.model.training is training
    assert seen == [False] * 4  # every forward ran in eval mode, also while the model was training


def test_outputs_are_inference_tensors(tiny_dir, batch):
    engine = load_engine(load_checkpoint(str(tiny_dir)), CPU, torch.float32)
    logits = engine.logits(batch)
    assert logits.is_inference() and not logits.requires_grad
    assert all(p.grad is None for p in engine.model.parameters())


def test_channels_last_gives_channels_first_logits(tiny_dir, batch):
    ckpt = load_checkpoint(str(tiny_dir))
    fast = TorchEngine(ckpt.build_model(), ckpt.preprocess, CPU, torch.float32, channels_last=True)
    plain = TorchEngine(ckpt.build_model(), ckpt.preprocess, CPU, torch.float32, channels_last=False)
    assert fast.to_input(batch).is_contiguous(memory_format=torch.channels_last)
    assert plain.to_input(batch).is_contiguous()
    a, b = fast.logits(batch), plain.logits(batch)
    assert torch.allclose(a, b, atol=1e-5, rtol=0), (a - b).abs().max()


def test_headless_checkpoint(tmp_path, batch):
    folder = save_hf_model(
        tmp_path / "headless", embedding_size=16, hidden_sizes=[32, 64], depths=[1, 1], num_groups=8, num_labels=0
    )
    ckpt = load_checkpoint(str(folder))
    with pytest.raises(BitError, match="checkpoint has no classification head; it gives features, not labels"):
        load_engine(ckpt, CPU, torch.float32)
    engine = load_engine(ckpt, CPU, torch.float32, need_head=False)
    assert torch.equal(engine.logits(batch), engine.features(batch))  # a head-less model's output is its features
