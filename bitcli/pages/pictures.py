"""The pictures of bitcli's pages: thumbnails and Grad-CAM heat maps laid over an image, drawn with numpy and
Pillow alone (matplotlib is an extra, and OpenCV only the tests' oracle), encoded as JPEG or PNG bytes.

A heat map is computed at the model's input size, which is the image resized and centre-cropped. It is drawn
on the image as the user sees it (EXIF-rotated, transparency on white, any mode as RGB) inside the box the
model's input covers (Preprocess.view_box); the part of the image the crop cut off is greyed, so an overlay
never claims attention where the model did not look.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

THUMB = 128  # pixels, the longer side of a gallery picture
OVERLAY_MAX = 1024  # pixels, the longer side of `bit explain`'s overlays (a 6000-px photo stays a few hundred KB)
HEAT_WEIGHT = 0.5  # the heat map's share where it is drawn (the `grad-cam` package's show_cam_on_image: one half)
CUT_OFF_WEIGHT = 0.6  # how far the part outside the model's view fades to grey

# The "jet" colour map (OpenCV's COLORMAP_JET, which the grad-cam package draws with): dark blue (0), blue,
# cyan, yellow, red, dark red (1).
_JET_AT = np.array([0.0, 0.125, 0.375, 0.625, 0.875, 1.0])
_JET_RGB = np.array([[0, 0, 0.5], [0, 0, 1], [0, 1, 1], [1, 1, 0], [1, 0, 0], [0.5, 0, 0]])
JET = np.stack([np.interp(np.linspace(0, 1, 256), _JET_AT, _JET_RGB[:, c]) for c in range(3)], axis=1)
JET = np.round(JET * 255).astype(np.uint8)  # [256, 3]


def colorize(heat: np.ndarray) -> np.ndarray:
    """Values in [0, 1] ([H, W]) -> uint8 RGB [H, W, 3] through the jet colour map."""
    index = np.clip(np.rint(np.asarray(heat, dtype=np.float32) * 255), 0, 255).astype(np.uint8)
    return JET.take(index, axis=0)  # JET[index], without fancy indexing's overhead (5 times faster)


def fit(image: Image.Image, size: int) -> Image.Image:
    """`image` scaled so that its longer side is `size` pixels: smoothly when it shrinks, pixel for pixel
    (nearest) when a tiny image grows, so that 16-px digits stay sharp rather than blurred."""
    w, h = image.size
    scale = size / max(w, h)
    target = (max(1, round(w * scale)), max(1, round(h * scale)))
    if target == (w, h):
        return image
    method = Image.Resampling.NEAREST if scale >= 2 else Image.Resampling.BILINEAR
    return image.resize(target, method, reducing_gap=None if scale >= 1 else 3.0)


def overlay(image: Image.Image, heat: np.ndarray, box: tuple[float, float, float, float], size: int, *,
            fitted: Image.Image | None = None) -> Image.Image:  # fmt: skip
    """`image` (RGB) fitted to `size` (`fitted`: that picture, already drawn as the thumbnail), with `heat`
    ([H, W] in [0, 1], the model input's map) resized onto `box` (left, top, right, bottom in `image`'s pixels:
    where the model's input lies) and blended in; outside the box, the image is greyed."""
    base = fitted if fitted is not None else fit(image, size)
    sx, sy = base.width / image.width, base.height / image.height
    left, top = round(box[0] * sx), round(box[1] * sy)
    width, height = max(1, round((box[2] - box[0]) * sx)), max(1, round((box[3] - box[1]) * sy))
    heat_image = Image.fromarray(np.asarray(heat, dtype=np.float32))  # mode F
    colours = colorize(np.asarray(heat_image.resize((width, height), Image.Resampling.BILINEAR))).astype(np.float32)
    pixels = np.asarray(base, dtype=np.float32)
    x0, y0 = max(left, 0), max(top, 0)
    x1, y1 = min(left + width, base.width), min(top + height, base.height)
    covered = x1 > x0 and y1 > y0
    if covered and (x0, y0, x1, y1) == (0, 0, base.width, base.height):
        out = np.empty_like(pixels)  # the model saw it all (a square image): nothing to grey
    else:
        out = pixels * (1 - CUT_OFF_WEIGHT) + 128 * CUT_OFF_WEIGHT
    if covered:
        seen = colours[y0 - top : y1 - top, x0 - left : x1 - left]
        inside = out[y0:y1, x0:x1]
        np.multiply(pixels[y0:y1, x0:x1], 1 - HEAT_WEIGHT, out=inside)
        inside += seen * HEAT_WEIGHT
    np.rint(out, out=out)
    return Image.fromarray(np.clip(out, 0, 255, out=out).astype(np.uint8))


def encode(image: Image.Image, fmt: str = "JPEG") -> bytes:
    """The picture as file bytes: JPEG (quality 85: a 128-px thumbnail is 3-6 KB) or PNG."""
    buf = io.BytesIO()
    if fmt == "JPEG":
        (image if image.mode == "RGB" else image.convert("RGB")).save(buf, "JPEG", quality=85)
    else:
        image.save(buf, fmt)
    return buf.getvalue()
