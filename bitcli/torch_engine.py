"""The torch engine (bitcli.engine.Engine): a BiT model on a device at a precision, turning uint8 image batches
into logits or features. predict, embed, eval and fine-tuning's validation all run a torch model through it,
so that the device placement, normalisation, memory format, allocator policy, autocast and inference mode are
decided once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from bitcli.errors import BitError
from bitcli.formats.checkpoint import Checkpoint
from bitcli.model import BitModel
from bitcli.preprocess import Preprocess
from bitcli.runtime import autocast, reuse_freed_memory


class TorchEngine:
    """`model` (a BitModel) on `device`; `preprocess` decodes images for it and normalises a uint8 [B, H, W, 3]
    batch into its input.

    channels_last: activations in NHWC. For inference it is faster on every device (weight-standardised kernels
    are computed once per load in that layout); fine-tuning passes False on a CPU, where PyTorch's
    channels_last GroupNorm backward is about 2x slower and cancels the gain of the convolutions.
    """

    def __init__(
        self,
        model: BitModel,
        preprocess: Preprocess,
        device: torch.device,
        dtype: torch.dtype,
        *,
        labels: Sequence[str] = (),
        source: str = "",
        channels_last: bool = True,
    ) -> None:
        if device.type == "cpu":
            reuse_freed_memory()  # activations re-use the heap instead of fresh, zeroed pages every batch
        self.preprocess, self.device, self.dtype, self.channels_last = preprocess, device, dtype, channels_last
        self.labels, self.source = labels, source
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model

    @classmethod
    def load(cls, ckpt: Checkpoint, device: torch.device, dtype: torch.dtype, need_head: bool = True) -> TorchEngine:
        """A checkpoint's model on `device`, for inference. need_head: refuse a features-only checkpoint."""
        model = ckpt.build_model(device=device)
        if need_head and not model.has_head:
            raise BitError(f"{ckpt.source}: checkpoint has no classification head; it gives features, not labels")
        return cls(model, ckpt.preprocess, device, dtype, labels=ckpt.labels, source=ckpt.source)

    @property
    def num_classes(self) -> int:
        return self.model.config.num_classes

    def to_input(self, batch_uint8: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 [B, H, W, 3] (numpy, or a tensor: already on the device when decoded there, bitcli.gpu_decode)
        -> the normalised float input on the device, in the engine's memory format. (Normalising permutes the
        NHWC pixels without copying them: the result is channels_last in memory until it is made contiguous.)"""
        pixels = batch_uint8 if isinstance(batch_uint8, torch.Tensor) else torch.from_numpy(batch_uint8)
        x = self.preprocess.normalize(pixels.to(self.device, non_blocking=True))
        return x.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)

    def autocast(self):
        """The precision context for a forward pass (a no-op in fp32)."""
        return autocast(self.device, self.dtype)

    @contextlib.contextmanager
    def _inference(self) -> Iterator[None]:
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode(), self.autocast():
                yield
        finally:
            self.model.train(was_training)

    def logits(self, batch_uint8: np.ndarray) -> torch.Tensor:
        """float32 logits [B, classes] (features [B, D] for a head-less model)."""
        with self._inference():
            return self.model(self.to_input(batch_uint8)).float()

    def features(self, batch_uint8: np.ndarray) -> torch.Tensor:
        """float32 pre-logits [B, D]: final GroupNorm + ReLU, then global average pooling."""
        with self._inference():
            return self.model.pre_logits(self.to_input(batch_uint8)).float()
