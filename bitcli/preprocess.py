"""Image loading (any file PIL can decode, any mode, EXIF orientation) and the checkpoint's eval transform.
How transformers (preprocessor_config.json) and timm (pretrained_cfg) write the transform is in
bitcli.formats.hf and bitcli.formats.timm."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import os
import stat
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO, Literal, cast

import numpy as np
from PIL import Image, ImageOps

from bitcli.errors import BitError, one_line
from bitcli.reads import not_regular

# Decompression bombs: images above this many pixels are refused before they are decoded, and no resize may
# produce more (the shortest-edge resize of a thin strip would). PIL itself refuses twice the limit from the
# header; its warning above the limit is silenced because load_image checks the size itself (turning the
# warning into an error with warnings.catch_warnings is not thread-safe, and decoding runs in threads).
MAX_IMAGE_PIXELS = 100_000_000
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
# PIL keeps an 8-byte pointer per row besides the pixels: a 1x90,000,000 strip costs 1 GB to decode.
MAX_IMAGE_ROWS = 10_000_000
SOURCE_KEY = "bitcli.source"  # Image.info key: the file an image was loaded from, for error messages

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".jfif"}
)

Interpolation = Literal["nearest", "bilinear", "bicubic", "lanczos", "box", "hamming"]
PIL_FILTERS: dict[Interpolation, Image.Resampling] = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
# How far each filter reaches, in source pixels at scale 1 (PIL's supports; nearest given a pixel of slack).
_SUPPORT = {"nearest": 1.0, "bilinear": 1.0, "bicubic": 2.0, "lanczos": 3.0, "box": 0.5, "hamming": 1.0}
# With a centre crop, a resize up to this many pixels (64 MB in PIL's RGB) is done whole and then cropped: pixel
# for pixel what transformers and timm compute. Only thin strips (aspect ratios beyond ~80:1 at 448) resize more;
# for them only the cropped region is resized (_resize_region).
FULL_RESIZE_PIXELS = 16_000_000
# Where a centre crop starts when the margin is odd. "floor": transformers' rule, top = (h - ch) // 2 (and an
# image smaller than the crop sits ceil(pad / 2) from the top). "round": torchvision's CenterCrop, which timm's
# eval transform uses, top = int(round((h - ch) / 2)) with Python's half-to-even round (and a smaller image sits
# pad // 2 from the top). They differ by a pixel, which a confident head can notice.
CropRounding = Literal["floor", "round"]
RGB = tuple[float, float, float]  # a value per channel (mean, std)


@dataclass(frozen=True)
class Preprocess:
    """Eval transform: resize, centre crop, scale to [0, 1], normalise. Travels with the weights."""

    resize: tuple[int, int] | int | None = 448  # int: shortest edge; (h, w): exact size; None: keep
    crop: tuple[int, int] | None = (448, 448)  # centre crop (h, w); None: no crop
    interpolation: Interpolation = "bilinear"
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    crop_rounding: CropRounding = "floor"  # transformers' centre-crop offsets, or "round": timm's (torchvision's)

    def __post_init__(self) -> None:
        if self.interpolation not in PIL_FILTERS:
            raise BitError(f"preprocessing: unknown interpolation {self.interpolation!r}")
        if self.crop_rounding not in ("floor", "round"):
            raise BitError(f"preprocessing: crop_rounding must be 'floor' or 'round', not {self.crop_rounding!r}")

    @classmethod
    def square(
        cls,
        resize: int,
        crop: int,
        *,
        mean: tuple[float, float, float] = (0.5, 0.5, 0.5),
        std: tuple[float, float, float] = (0.5, 0.5, 0.5),
    ) -> Preprocess:
        """Google's fine-tuning eval transform: resize to a square (bilinear), then centre-crop a square."""
        return cls(resize=(resize, resize), crop=(crop, crop), interpolation="bilinear", mean=mean, std=std)

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
            mean=cast(RGB, tuple(float(x) for x in d.get("mean", (0.5,) * 3))),  # as the file holds them
            std=cast(RGB, tuple(float(x) for x in d.get("std", (0.5,) * 3))),
            crop_rounding=d.get("crop_rounding", "floor"),  # files from before the field: transformers' rule
        )

    def same_pixels(self, other: Preprocess) -> bool:
        """Whether the two give the same pixels for every image (the rounding matters only with a real crop)."""
        return self._canonical() == other._canonical()

    def _canonical(self) -> Preprocess:
        crop = None if self.crop is None or self.crop == self.resize else self.crop  # an exact resize's crop is a no-op
        rounding = self.crop_rounding if crop else "floor"
        # margins known in advance: the rule may not matter
        if (
            crop
            and isinstance(self.resize, tuple)
            and all(_crop_window(r, c, "floor") == _crop_window(r, c, "round") for r, c in zip(self.resize, crop))
        ):
            rounding = "floor"
        return dataclasses.replace(self, crop=crop, crop_rounding=rounding)

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(w, h) after the resize step, before the crop."""
        if self.resize is None:
            return width, height
        if isinstance(self.resize, int):  # shortest edge; the long edge is truncated, as transformers does
            if width <= height:
                return self.resize, int(self.resize * height / width)
            return int(self.resize * width / height), self.resize
        return self.resize[1], self.resize[0]

    def resize_and_crop(self, image: Image.Image) -> Image.Image:
        """Resize, then centre crop (padding with black where the crop is larger), as transformers does."""
        w, h = image.size
        rw, rh = self.resized_size(w, h)
        resample = PIL_FILTERS[self.interpolation]
        if self.crop is None:
            if rw * rh > MAX_IMAGE_PIXELS:
                raise BitError(
                    f"{image.info.get(SOURCE_KEY, 'image')}: a {w}x{h} image would be {rw}x{rh} after resizing, "
                    f"over the {MAX_IMAGE_PIXELS:,}-pixel limit; crop it to a less extreme aspect ratio first"
                )
            return image if (rw, rh) == (w, h) else image.resize((rw, rh), resample)
        rounding = self.crop_rounding
        (x0, xn, px), (y0, yn, py) = _crop_window(rw, self.crop[1], rounding), _crop_window(rh, self.crop[0], rounding)
        if (rw, rh) == (w, h):
            region = image.crop((x0, y0, x0 + xn, y0 + yn))
        elif rw * rh <= FULL_RESIZE_PIXELS:
            region = image.resize((rw, rh), resample).crop((x0, y0, x0 + xn, y0 + yn))
        else:  # a thin strip: its shortest-edge resize would be huge (8000x1 to 448: 3,584,000x448, 6 GB)
            region = _resize_region(image, (rw, rh), (x0, y0, xn, yn), self.interpolation)
        if (xn, yn) == (self.crop[1], self.crop[0]):
            return region
        canvas = Image.new("RGB", (self.crop[1], self.crop[0]))  # black padding, like transformers' center_crop
        canvas.paste(region, (px, py))
        return canvas

    def view_box(self, width: int, height: int) -> tuple[float, float, float, float]:
        """(left, top, right, bottom): where the model's input lies on a width x height image, in the image's
        pixels. The whole image without a crop; the centre crop's window with one; past the image's edges
        where the crop is larger than the resized image (the black padding). A Grad-CAM map drawn into
        this box sits on what the model saw."""
        rw, rh = self.resized_size(width, height)
        if self.crop is None:
            return 0.0, 0.0, float(width), float(height)
        (x0, _, px), (y0, _, py) = (_crop_window(rw, self.crop[1], self.crop_rounding),
                                    _crop_window(rh, self.crop[0], self.crop_rounding))  # fmt: skip
        left, top = (x0 - px) * width / rw, (y0 - py) * height / rh
        return left, top, left + self.crop[1] * width / rw, top + self.crop[0] * height / rh

    def crop_window(self, width: int, height: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
        """The centre crop of a resized width x height image, as resize_and_crop takes it: for x, then y, (first
        kept pixel, pixels kept, offset in the output). For decoders that resize elsewhere (bitcli.gpu_decode)."""
        if self.crop is None:
            raise ValueError("crop_window: this preprocessing has no crop")
        return _crop_window(width, self.crop[1], self.crop_rounding), _crop_window(
            height, self.crop[0], self.crop_rounding
        )

    def to_uint8(self, image: Image.Image) -> np.ndarray:
        """RGB image -> the resized, cropped HWC uint8 array (normalisation happens in the batch, in torch)."""
        try:
            return np.asarray(self.resize_and_crop(image), dtype=np.uint8)
        except MemoryError:  # str(MemoryError()) is empty: say what ran out
            name, size = image.info.get(SOURCE_KEY, "image"), f"{image.width}x{image.height}"
            raise BitError(f"{name}: out of memory resizing a {size} image; free memory first") from None

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


def _resize_region(
    image: Image.Image, size: tuple[int, int], window: tuple[int, int, int, int], interpolation: Interpolation
) -> Image.Image:
    """Columns [x0, x0 + xn) and rows [y0, y0 + yn) of image.resize(size), without making the rest.

    PIL reads a resize box in float32 and may order its two passes differently for a box, so a pixel can
    differ from the full resize's by a level or so; hence only for images whose full resize is too large."""
    (w, h), (rw, rh), (x0, y0, xn, yn) = image.size, size, window
    box = [x0 * w / rw, y0 * h / rh, (x0 + xn) * w / rw, (y0 + yn) * h / rh]  # exact fractions, rounded once
    # Cut the source to the box plus the filter's reach first: small coordinates stay precise in float32, and
    # every tap the full resize would use (clipped only at the image's own edges) is still there.
    reach_x = _SUPPORT[interpolation] * max((box[2] - box[0]) / xn, 1.0) + 1
    reach_y = _SUPPORT[interpolation] * max((box[3] - box[1]) / yn, 1.0) + 1
    left, top = max(int(box[0] - reach_x), 0), max(int(box[1] - reach_y), 0)
    right, bottom = min(math.ceil(box[2] + reach_x), w), min(math.ceil(box[3] + reach_y), h)
    shifted = (box[0] - left, box[1] - top, box[2] - left, box[3] - top)
    return image.crop((left, top, right, bottom)).resize((xn, yn), PIL_FILTERS[interpolation], box=shifted)


def _crop_window(size: int, crop: int, rounding: CropRounding = "floor") -> tuple[int, int, int]:
    """One axis of a centre crop of `size` pixels to `crop`: (first kept pixel, pixels kept, offset in the
    output). A crop larger than the image keeps it all, centred on black (the offset). The odd pixel goes
    where the source library puts it (CropRounding): the thin-strip path uses the same window."""
    if crop > size:  # transformers pads ceil(pad / 2) before the image; torchvision pad // 2
        return 0, size, (crop - size) // 2 if rounding == "round" else (crop - size + 1) // 2
    if rounding == "round":
        return round((size - crop) / 2.0), crop, 0
    return (size - crop) // 2, crop, 0


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
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info)
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def image_too_large(name: str) -> BitError:
    """The one wording for an image over the pixel limit: predict, eval and finetune's scan all use it."""
    return BitError(
        f"{name}: image is larger than the {MAX_IMAGE_PIXELS:,}-pixel limit (possible decompression bomb); "
        "downscale it first"
    )


def cannot_decode(name: str, exc: BaseException) -> BitError:
    """The one "cannot decode" wording: a decoder (PIL's, or any other) raised `exc` on image `name`. `name` is
    the file as reports show it (ui.display): the terminal makes the whole line visible, the machine formats
    keep it literal. bitcli.pipeline.failure uses it for what no decoder turned into a BitError."""
    return BitError(f"{name}: cannot decode image ({one_line(exc)}); the file may be truncated or corrupt")


def _check_size(name: str, width: int, height: int) -> None:
    if width * height > MAX_IMAGE_PIXELS:
        raise image_too_large(name)
    if height > MAX_IMAGE_ROWS:
        raise BitError(f"{name}: a {width}x{height} image has over {MAX_IMAGE_ROWS:,} rows; rotate or crop it first")


def _check_file(path: str | os.PathLike[str], name: str) -> None:
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        broken = os.path.islink(path)
        raise BitError(f"{name}: " + ("broken symbolic link" if broken else "no such file")) from None
    except OSError as exc:
        raise BitError(f"{name}: cannot read ({exc.strerror or type(exc).__name__})") from None
    if stat.S_ISDIR(mode):
        raise BitError(f"{name}: is a directory; pass --recursive to classify folders inside folders")
    if not stat.S_ISREG(mode):  # a FIFO or device would block or never end
        raise BitError(not_regular(name, mode))


@contextlib.contextmanager
def _decoding(name: str) -> Iterator[None]:
    """PIL's many exception types (they vary by format) -> one BitError line naming the file."""
    try:
        yield
    except Image.DecompressionBombError:  # PIL's own refusal, from the header, above twice the limit
        raise image_too_large(name) from None
    except FileNotFoundError:
        raise BitError(f"{name}: no such file") from None
    except PermissionError:
        raise BitError(f"{name}: permission denied; make the file readable") from None
    except Image.UnidentifiedImageError:
        raise BitError(f"{name}: not an image PIL can read (empty, corrupt or another format)") from None
    except MemoryError:
        raise BitError(f"{name}: out of memory while decoding; downscale the image or free memory") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise cannot_decode(name, exc) from None


def _checked(path: str | os.PathLike[str] | BinaryIO, name: str | None) -> str:
    """The printable name of what is opened (even for non-UTF-8 file names), after _check_file for a path."""
    if isinstance(path, io.IOBase):
        return name or "image"
    path = cast("str | os.PathLike[str]", path)  # not an open file
    name = name or os.fsencode(path).decode("utf-8", "replace")
    _check_file(path, name)
    return name


def image_size(path: str | os.PathLike[str] | BinaryIO, name: str | None = None) -> tuple[int, int]:
    """(width, height) as stored, from the header alone, with load_image's checks and error wording."""
    name = _checked(path, name)
    with _decoding(name), Image.open(path) as im:
        size = im.size
    _check_size(name, *size)
    return size


def load_image(path: str | os.PathLike[str] | BinaryIO, name: str | None = None) -> Image.Image:
    """Open, decode (first frame), apply EXIF orientation and convert to RGB. Raises BitError on bad files.
    `path` may be an open binary file (an image cell of a data set) named by `name` in errors.
    The image's info[SOURCE_KEY] holds the printable file name, for errors raised after decoding."""
    name = _checked(path, name)
    with _decoding(name), Image.open(path) as im:
        _check_size(name, im.width, im.height)
        im.seek(0)
        im.load()
        ImageOps.exif_transpose(im, in_place=True)  # in place: a copy would double the memory of a large image
        image = to_rgb(im)
        image.load()
    if image.width < 1 or image.height < 1:
        raise BitError(f"{name}: image has no pixels")
    image.info[SOURCE_KEY] = name
    return image
