"""Image loading (any file PIL can decode, any mode, EXIF orientation) and the checkpoint's eval transform."""

from __future__ import annotations

import dataclasses
import math
import os
import stat
import warnings
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageOps

from bitcli.errors import BitError

# Decompression bombs: images above this many pixels are refused before they are decoded.
MAX_IMAGE_PIXELS = 100_000_000
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".jfif"}
)

Interpolation = Literal["nearest", "bilinear", "bicubic", "lanczos", "box", "hamming"]
_PIL_FILTERS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
# transformers stores PIL's resampling enum values.
_PIL_CODES = {int(v): k for k, v in _PIL_FILTERS.items()}


@dataclass(frozen=True)
class Preprocess:
    """Eval transform: resize, centre crop, scale to [0, 1], normalise. Travels with the weights."""

    resize: tuple[int, int] | int | None = 448  # int: shortest edge; (h, w): exact size; None: keep
    crop: tuple[int, int] | None = (448, 448)  # centre crop (h, w); None: no crop
    interpolation: Interpolation = "bilinear"
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def __post_init__(self) -> None:
        if self.interpolation not in _PIL_FILTERS:
            raise BitError(f"preprocessing: unknown interpolation {self.interpolation!r}")

    @classmethod
    def square(cls, resize: int, crop: int, **kw: Any) -> Preprocess:
        """Google's fine-tuning eval transform: resize to a square, then (optionally) crop."""
        return cls(resize=(resize, resize), crop=(crop, crop), **kw)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocess:
        def pair(v: Any) -> Any:
            return tuple(int(x) for x in v) if isinstance(v, (list, tuple)) else v

        return cls(
            resize=pair(d.get("resize")),
            crop=pair(d.get("crop")),
            interpolation=d.get("interpolation", "bilinear"),
            mean=tuple(float(x) for x in d.get("mean", (0.5,) * 3)),
            std=tuple(float(x) for x in d.get("std", (0.5,) * 3)),
        )

    @classmethod
    def from_hf(cls, p: dict[str, Any]) -> Preprocess:
        """A transformers preprocessor_config.json (defaults are BitImageProcessor's)."""
        size = p.get("size", {"shortest_edge": 224})
        if isinstance(size, int):
            size = {"shortest_edge": size}
        if "shortest_edge" in size:
            resize: Any = int(size["shortest_edge"])
        elif "height" in size and "width" in size:
            resize = (int(size["height"]), int(size["width"]))
        else:
            raise BitError(f"preprocessor_config.json: unsupported size {size}")
        crop = p.get("crop_size", {"height": 224, "width": 224})
        if isinstance(crop, int):
            crop = {"height": crop, "width": crop}
        if p.get("do_rescale", True) and abs(float(p.get("rescale_factor", 1 / 255)) - 1 / 255) > 1e-9:
            raise BitError("preprocessor_config.json: only rescale_factor 1/255 is supported")
        normalize = p.get("do_normalize", True)
        return cls(
            resize=resize if p.get("do_resize", True) else None,
            crop=(int(crop["height"]), int(crop["width"])) if p.get("do_center_crop", True) else None,
            interpolation=_PIL_CODES.get(int(p.get("resample", 3)), "bicubic"),
            mean=tuple(p.get("image_mean", (0.48145466, 0.4578275, 0.40821073))) if normalize else (0.0,) * 3,
            std=tuple(p.get("image_std", (0.26862954, 0.26130258, 0.27577711))) if normalize else (1.0,) * 3,
        )

    def to_hf(self) -> dict[str, Any]:
        if isinstance(self.resize, int):
            size: dict[str, int] = {"shortest_edge": self.resize}
        elif self.resize is not None:
            size = {"height": self.resize[0], "width": self.resize[1]}
        else:
            size = {"shortest_edge": 224}
        crop = self.crop or (224, 224)
        return {
            "image_processor_type": "BitImageProcessor",
            "do_resize": self.resize is not None,
            "size": size,
            "resample": int(_PIL_FILTERS[self.interpolation]),
            "do_center_crop": self.crop is not None,
            "crop_size": {"height": crop[0], "width": crop[1]},
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": list(self.mean),
            "image_std": list(self.std),
            "do_convert_rgb": True,
        }

    @classmethod
    def from_timm(cls, cfg: dict[str, Any]) -> Preprocess:
        """timm's pretrained_cfg: resize shortest edge to input/crop_pct, centre crop input_size."""
        _, h, w = cfg.get("input_size", (3, 224, 224))
        crop_pct = float(cfg.get("crop_pct", 0.875))
        mode = cfg.get("crop_mode", "center")
        if mode == "squash":
            resize: Any = (math.floor(h / crop_pct), math.floor(w / crop_pct))
        elif mode == "center":
            resize = math.floor(h / crop_pct) if h == w else (math.floor(h / crop_pct), math.floor(w / crop_pct))
        else:
            raise BitError(f"timm pretrained_cfg: crop_mode {mode!r} is not supported")
        return cls(
            resize=resize,
            crop=(int(h), int(w)),
            interpolation=cfg.get("interpolation", "bilinear"),
            mean=tuple(cfg.get("mean", (0.5,) * 3)),
            std=tuple(cfg.get("std", (0.5,) * 3)),
        )

    def to_timm(self) -> dict[str, Any]:
        crop = self.crop or (self.resize if isinstance(self.resize, tuple) else (224, 224))
        short = self.resize if isinstance(self.resize, int) else crop[0]
        return {
            "input_size": [3, crop[0], crop[1]],
            "interpolation": self.interpolation,
            "mean": list(self.mean),
            "std": list(self.std),
            "crop_pct": crop[0] / short,
            "crop_mode": "center",
        }

    def resize_and_crop(self, image: Image.Image) -> Image.Image:
        if self.resize is not None:
            w, h = image.size
            if isinstance(self.resize, int):  # shortest edge; the long edge is truncated, as transformers does
                if w <= h:
                    size = (self.resize, int(self.resize * h / w))
                else:
                    size = (int(self.resize * w / h), self.resize)
            else:
                size = (self.resize[1], self.resize[0])
            if size != image.size:
                image = image.resize(size, _PIL_FILTERS[self.interpolation])
        if self.crop is not None:
            w, h = image.size
            ch, cw = self.crop
            if ch > h or cw > w:  # pad with black like transformers' center_crop, then crop
                canvas = Image.new("RGB", (max(w, cw), max(h, ch)))
                canvas.paste(image, ((max(w, cw) - w) // 2, (max(h, ch) - h) // 2))
                image, w, h = canvas, canvas.width, canvas.height
            top, left = (h - ch) // 2, (w - cw) // 2
            image = image.crop((left, top, left + cw, top + ch))
        return image

    def to_uint8(self, image: Image.Image) -> np.ndarray:
        """RGB image -> the resized, cropped HWC uint8 array (normalisation happens in the batch, in torch)."""
        return np.asarray(self.resize_and_crop(image), dtype=np.uint8)

    def normalize(self, batch):  # uint8 [B, H, W, 3] tensor -> float [B, 3, H, W]
        import torch

        x = batch.permute(0, 3, 1, 2).to(torch.float32) * (1 / 255)
        mean = torch.tensor(self.mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def __call__(self, image: Image.Image):
        """One RGB PIL image -> float tensor [3, H, W]."""
        import torch

        return self.normalize(torch.from_numpy(self.to_uint8(image).copy()).unsqueeze(0))[0]


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB. Transparency is composited on white (as transformers does); high bit depths
    are scaled, not clipped: 16-bit integers by 1/257, floats assumed in [0, 1]."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        a = np.asarray(image, dtype=np.float64)
        scale = 257.0 if a.max(initial=0) > 255 or image.mode.startswith("I;16") else 1.0
        image = Image.fromarray(np.clip(np.rint(a / scale), 0, 255).astype(np.uint8), "L")
    elif image.mode == "F":
        a = np.nan_to_num(np.asarray(image, dtype=np.float64))
        a = a * 255.0 if a.max(initial=0) <= 1.0 else a
        image = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode == "P" and "transparency" in image.info
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(path: str | os.PathLike[str]) -> Image.Image:
    """Open, decode (first frame), apply EXIF orientation and convert to RGB. Raises BitError on bad files."""
    name = os.fsencode(path).decode("utf-8", "replace")  # printable even for non-UTF-8 names
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        broken = os.path.islink(path)
        raise BitError(f"{name}: " + ("broken symbolic link" if broken else "no such file")) from None
    except OSError as exc:
        raise BitError(f"{name}: cannot read ({exc.strerror})") from None
    if stat.S_ISDIR(mode):
        raise BitError(f"{name}: is a directory; pass --recursive to classify folders inside folders")
    if not stat.S_ISREG(mode):  # a FIFO or device would block or never end
        raise BitError(f"{name}: not a regular file (pipe, socket or device); copy the image to a file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                pixels = im.width * im.height
                if pixels > MAX_IMAGE_PIXELS:
                    raise Image.DecompressionBombError(str(pixels))
                im.seek(0)
                im.load()
                image = ImageOps.exif_transpose(im) or im
                image = to_rgb(image)
                image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise BitError(
            f"{name}: image is larger than the {MAX_IMAGE_PIXELS:,}-pixel limit (possible decompression bomb); "
            "downscale it first"
        ) from None
    except FileNotFoundError:
        raise BitError(f"{name}: no such file") from None
    except PermissionError:
        raise BitError(f"{name}: permission denied; make the file readable") from None
    except Image.UnidentifiedImageError:
        raise BitError(f"{name}: not an image PIL can read (empty, corrupt or another format)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise BitError(f"{name}: cannot decode image ({_one_line(exc)}); the file may be truncated or corrupt") from None
    if image.width < 1 or image.height < 1:
        raise BitError(f"{name}: image has no pixels")
    return image


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
