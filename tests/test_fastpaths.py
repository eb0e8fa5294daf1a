"""The fast paths give the plain path's answers: the inference Engine (channels_last, cached kernels, reused
allocator memory) against eager channels-first BitModel, and channels_last training against channels-first."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TINY_LABELS, perturb, run_main, save_hf_model, write_folder

from bitcli import runtime
from bitcli.config import BitConfig
from bitcli.hub import load_checkpoint
from bitcli.model import BitModel, StdConv2d, standardize
from bitcli.torch_engine import TorchEngine


@pytest.fixture(scope="module")
def r50_dir(tmp_path_factory):
    return save_hf_model(tmp_path_factory.mktemp("r50") / "r50", num_labels=1000)


def _photos_uint8(photos, size: int) -> np.ndarray:
    from PIL import Image

    names = ["chelsea.png", "rocket.jpg", "coffee.png"]
    return np.stack([np.asarray(Image.open(photos[n]).convert("RGB").resize((size, size))) for n in names])


def _plain(model: BitModel, batch: np.ndarray, preprocess) -> torch.Tensor:
    """Channels-first eager forward with the kernels standardised afresh (gradients on: no cache)."""
    x = preprocess.normalize(torch.from_numpy(batch))
    with torch.enable_grad():
        return model(x).detach()


def test_engine_matches_plain_eager_path(r50_dir, photos):
    ckpt = load_checkpoint(str(r50_dir))
    fast = TorchEngine.load(ckpt, torch.device("cpu"), torch.float32)
    assert fast.channels_last
    batch = _photos_uint8(photos, 160)
    expected = _plain(ckpt.build_model(), batch, ckpt.preprocess)
    got = fast.logits(batch)
    again = fast.logits(batch)  # second call: every kernel comes from the cache
    assert expected.abs().max() > 0.1
    assert torch.allclose(got, expected, atol=1e-4, rtol=0), (got - expected).abs().max()
    assert torch.equal(got, again)
    # batching is invisible: one image at a time gives the same logits
    singles = torch.cat([fast.logits(batch[i : i + 1]) for i in range(len(batch))])
    assert torch.allclose(singles, got, atol=1e-4, rtol=0)


def test_channels_last_kernel_is_cached_in_channels_last():
    """A channels_last model keeps its cached kernels channels_last: no per-call copy into that layout."""
    conv = StdConv2d(16, 32, 3).to(memory_format=torch.channels_last)
    with torch.no_grad():
        kernel = conv.standardized_weight()
        assert conv.standardized_weight() is kernel  # cached
    assert kernel.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(kernel, standardize(conv.weight.detach().contiguous(), conv.eps))
    flat = kernel.reshape(32, -1)
    assert torch.allclose(flat.mean(1), torch.zeros(32), atol=1e-6)
    assert torch.allclose(flat.var(1, unbiased=False), torch.ones(32), atol=1e-4)


def test_channels_last_training_matches_channels_first():
    """Gradients and the optimizer step agree between layouts (the residual add in place is autograd-safe)."""
    cfg = BitConfig(depths=(1, 2), hidden_sizes=(32, 64), embedding_size=16, num_groups=8, num_classes=5)
    models = [BitModel(cfg), BitModel(cfg)]
    perturb(models[0])
    models[1].load_state_dict(models[0].state_dict())
    models[1].to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 3])
    losses = []
    for model, inp in zip(models, [x, x.contiguous(memory_format=torch.channels_last)]):
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for _ in range(2):
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(inp), y)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    assert losses[:2] == pytest.approx(losses[2:], abs=1e-5)
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        assert torch.allclose(a, b, atol=1e-5, rtol=0), name


def test_bf16_autocast_path_gives_float_logits_near_fp32(tmp_path, photos):
    folder = save_hf_model(
        tmp_path / "small", embedding_size=16, hidden_sizes=[32, 64], depths=[1, 2], num_groups=8, num_labels=10
    )
    ckpt = load_checkpoint(str(folder))
    batch = _photos_uint8(photos, 96)
    fp32 = TorchEngine.load(ckpt, torch.device("cpu"), torch.float32).logits(batch)
    bf16 = TorchEngine.load(ckpt, torch.device("cpu"), torch.bfloat16).logits(batch)
    assert bf16.dtype == torch.float32 and torch.isfinite(bf16).all()
    assert (bf16 - fp32).abs().max() < 0.05 * fp32.abs().max()


@pytest.mark.parametrize("has_bf16", [False, True])
@pytest.mark.parametrize("command", ["predict", "eval"])
def test_bf16_on_a_cpu_without_bf16_says_it_is_emulated(command, has_bf16, tiny_dir, photos, tmp_path, monkeypatch):
    monkeypatch.setattr(runtime, "bf16_supported", lambda device: has_bf16)  # this CPU, as either kind
    if command == "predict":
        target = photos["chelsea.png"]
    else:
        target = tmp_path / "labelled"
        write_folder(target, {TINY_LABELS[0]: 1, TINY_LABELS[1]: 1})
    code, out, err = run_main(
        command, target, "--model", tiny_dir, "--device", "cpu", "--precision", "bf16", "--format", "json"
    )
    assert code == 0, err
    warning = "warning: this CPU has no bf16 instructions, so --precision bf16 is emulated and slower than fp32\n"
    assert err.endswith(warning) if not has_bf16 else warning not in err
    assert out.lstrip().startswith(("[", "{"))  # the warning stays off stdout


def test_cpu_bf16_support_is_read_from_the_cpu_flags(monkeypatch, tmp_path):
    """bf16 on a CPU needs oneDNN and the avx512_bf16 or amx_bf16 instructions, as /proc/cpuinfo lists them."""
    cpuinfo = tmp_path / "cpuinfo"
    monkeypatch.setattr(runtime, "CPUINFO", cpuinfo)
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: True)
    cases = [
        ("flags\t\t: fpu avx2 avx512f\nbugs\t\t: avx512_bf16_bug\n", False),  # a flag named elsewhere does not count
        ("model name\t: x\nflags\t\t: fpu avx512f avx512_bf16\n", True),
        ("flags\t\t: amx_bf16 amx_tile\n", True),
    ]
    for text, expected in cases:
        cpuinfo.write_text(text)
        assert runtime.bf16_supported(torch.device("cpu")) is expected, text
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    assert runtime.bf16_supported(torch.device("cpu")) is False
    cpuinfo.unlink()  # no /proc (not Linux): no bf16 claimed
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: True)
    assert runtime.bf16_supported(torch.device("cpu")) is False
