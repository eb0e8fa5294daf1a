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
import torch.nn.functional as F

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
        temperature: float = 1.0,
        thresholds: list[float] | None = None,
    ) -> None:
        if device.type == "cpu":
            reuse_freed_memory()  # activations re-use the heap instead of fresh, zeroed pages every batch
        self.preprocess, self.device, self.dtype, self.channels_last = preprocess, device, dtype, channels_last
        self.labels, self.source, self.temperature = labels, source, temperature
        self.thresholds = thresholds  # a multi-label model's (sigmoid scores); None: single-label
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model

    @classmethod
    def load(cls, ckpt: Checkpoint, device: torch.device, dtype: torch.dtype, need_head: bool = True) -> TorchEngine:
        """A checkpoint's model on `device`, for inference. need_head: refuse a features-only checkpoint."""
        model = ckpt.build_model(device=device)
        if need_head and not model.has_head:
            raise BitError(f"{ckpt.source}: checkpoint has no classification head; it gives features, not labels")
        return cls(model, ckpt.preprocess, device, dtype, labels=ckpt.labels, source=ckpt.source,
                   temperature=ckpt.temperature, thresholds=ckpt.thresholds)  # fmt: skip

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

    def gradcam(self, batch_uint8: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """Grad-CAM maps, float32 in [0, 1] at the input's size: [B, H, W] for targets [B] (a class index per
        image), [B, T, H, W] for targets [B, T] (T classes per image, one trunk pass).

        The layer is what the head pools: forward_features' output (the final GroupNorm + ReLU). A class's
        channel weights are the spatial mean of d(logit)/d(activation), the map is ReLU(sum_k w_k A_k),
        min-max scaled, resized bilinearly (half-pixel centres) and min-max scaled again: the `grad-cam`
        package's GradCAM, to 1e-4. The trunk runs without autograd (the gradient of a logit with respect
        to these activations goes through the pooling and the head alone) and in float32 whatever the
        engine's precision: a few images, and maps comparable across devices. The model is left as it was
        (no parameter gets a .grad; its train/eval mode is restored)."""
        index = torch.as_tensor(np.asarray(targets, dtype=np.int64), device=self.device)
        many = index.ndim == 2
        index = index if many else index[:, None]
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                x = self.to_input(batch_uint8)
                features = self.model.forward_features(x).float()  # [B, C, h, w]
            with torch.enable_grad():
                activations = features.detach().requires_grad_()
                logits = self.model.forward_head(activations).float()
                maps = [self._cam(activations, logits, index[:, t]) for t in range(index.shape[1])]
        finally:
            self.model.train(was_training)
        out = torch.stack(maps, dim=1)  # [B, T, h, w]
        out = scale_maps(F.interpolate(out, size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False))
        maps_np = out.cpu().numpy()
        return maps_np if many else maps_np[:, 0]

    @staticmethod
    def _cam(activations: torch.Tensor, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """One target per image: its min-max scaled map at the activations' size, [B, h, w]."""
        (grads,) = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), activations, retain_graph=True)
        weights = grads.mean(dim=(2, 3), keepdim=True)  # [B, C, 1, 1]
        return scale_maps(torch.relu((weights * activations.detach()).sum(dim=1)))


def scale_maps(maps: torch.Tensor) -> torch.Tensor:
    """Each map (the last two axes) ReLU'd, minus its minimum, over its maximum + 1e-7: the `grad-cam`
    package's scale_cam_image."""
    maps = torch.relu(maps)
    maps = maps - maps.amin(dim=(-2, -1), keepdim=True)
    return maps / (maps.amax(dim=(-2, -1), keepdim=True) + 1e-7)
