"""JPEG decoding on the GPU, for a model on CUDA. A GPU runs a BiT far faster than a few CPU cores decode JPEGs
with PIL, so for an engine on CUDA the pipeline (bitcli.pipeline) decodes a batch's JPEGs with one call of
torchvision's nvjpeg decoder and resizes and crops them there, instead of decoding each file with PIL.

Each file is routed on a decoding thread, from its bytes and its header (PIL reads the header without decoding):
- to the GPU: a JPEG (baseline or progressive, RGB or grayscale) that ends in its end-of-image marker, has no EXIF
  (or XMP) rotation, is within the pixel limits, whose resize is done whole and shrinks it at most MAX_DOWNSCALE
  times on each axis, for a checkpoint that resizes bilinear or bicubic;
- to the CPU path, exactly as without a GPU (bitcli.preprocess: PIL, EXIF, modes, bomb guards, errors): every
  other file (PNG and the other formats, EXIF-rotated, CMYK, Adobe RGB-coded, truncated or unreadable files, MPO),
  and any JPEG that the GPU decoder refuses or whose resize fails on the GPU (out of memory), so that a file's error
  is the CPU path's, word for word.

On the GPU the resize is PIL's: an antialiased filter whose support grows with the downscale (torch's
`antialias=True` kernels are PIL's), horizontal pass then vertical, each rounded to uint8 as PIL does; then the
same centre crop (Preprocess.crop_window). Against the CPU path a pixel differs by at most 2 levels (measured on
the CPU, where torchvision's libjpeg and PIL's decode identically: tests/test_gpu_decode.py); nvjpeg's IDCT and
chroma upsampling add their own differences on a GPU (benchmarks/gpu_check.py measures them).
"""

from __future__ import annotations

import io
import os
import stat
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from bitcli.preprocess import FULL_RESIZE_PIXELS, MAX_IMAGE_PIXELS, MAX_IMAGE_ROWS, Preprocess
from bitcli.sources.rows import RowRef
from bitcli.ui import log

K = TypeVar("K")
INTERPOLATIONS = ("bilinear", "bicubic")  # torch's antialiased kernels are PIL's for these two
MAX_FILE_BYTES = 256 << 20  # a larger file goes the CPU path, which streams it (a 100-MP JPEG is far smaller)
CHUNK_PIXELS = 1 << 28  # pixels decoded by one call at most: full-size images of a batch wait in GPU memory
ORIENTATION = 0x0112  # the EXIF tag ImageOps.exif_transpose reads (Pillow also takes it from XMP)
# torch's antialiased CUDA resize holds a filter's support in shared memory and refuses a large enough downscale
# ("Please reduce the scale factor"): an image shrunk more than this on an axis goes the CPU path
MAX_DOWNSCALE = 64
# torchvision 0.29 deprecated its image decoders in favour of TorchCodec; the CUDA decoder is still the one
# torchvision ships, and the warning is not the user's.
warnings.filterwarnings(
    "ignore", message="The image decoding and encoding capabilities of TorchVision", category=DeprecationWarning
)


@dataclass(frozen=True)
class Encoded(Generic[K]):
    """A JPEG to decode on the device: its bytes (uint8 [N], on the CPU) and its size from the header; `ref`
    goes to the CPU path if the device refuses it."""

    ref: K
    data: torch.Tensor
    width: int
    height: int


def decodes_on(device: torch.device) -> bool:
    """Whether images for a model on `device` are decoded there. The tests replace this check to run the GPU
    path's code on the CPU (torchvision decodes JPEGs there with the same function)."""
    return device.type == "cuda"


def for_engine(engine, decode: Callable[[K], np.ndarray], read: Callable[[K], bytes | None]) -> DeviceDecoder[K] | None:
    """The decoder for an engine (bitcli.engine.Engine) on CUDA, or None: decode on the CPU as always (another
    device, a resize the GPU path does not do, or a torchvision that cannot decode there). `decode(ref)` is
    the CPU path; `read(ref)` gives a file's bytes, or None to leave it to the CPU path."""
    device, preprocess = engine.device, engine.preprocess
    if not decodes_on(device) or preprocess.interpolation not in INTERPOLATIONS:
        return None
    reason = _probe(device)
    if reason is not None:
        log(f"note: JPEGs are decoded on the CPU: torchvision cannot decode them on {device} ({reason})")
        return None
    return DeviceDecoder(preprocess, device, decode, read)


def _probe(device: torch.device) -> str | None:
    """Why torchvision cannot decode a JPEG on `device`, or None when it can."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 60)).save(buffer, "JPEG")
    try:
        from torchvision.io import ImageReadMode, decode_jpeg

        decode_jpeg([_tensor(buffer.getvalue())], mode=ImageReadMode.RGB, device=device)
    except Exception as exc:  # noqa: BLE001 -- a torchvision without nvjpeg, a driver problem: any reason will do
        return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return None


class DeviceDecoder(Generic[K]):
    """Decodes the images of a batch for a model on `device`, in two steps: `prepare(ref)` on a decoding thread
    (read the file and route it: an Encoded JPEG, or the image decoded by the CPU path), then `finish(results)`
    on the thread that runs the model (the batch's JPEGs decoded together, resized and cropped on the device).
    `stack` stacks same-sized images into the batch the engine takes."""

    stack = staticmethod(torch.stack)

    def __init__(
        self,
        preprocess: Preprocess,
        device: torch.device,
        decode: Callable[[K], np.ndarray],
        read: Callable[[K], bytes | None],
    ) -> None:
        self.preprocess, self.device, self.decode, self.read = preprocess, device, decode, read

    def prepare(self, ref: K) -> np.ndarray | Encoded[K]:
        """On a decoding thread: the file as an Encoded JPEG for the device, or decoded by the CPU path (whose
        exception, for a bad file, is the result)."""
        try:
            data = self.read(ref)
        except Exception:  # noqa: BLE001 -- the CPU path reads it again and says what is wrong, in its own words
            data = None
        size = None if data is None else gpu_size(data, self.preprocess)
        if data is None or size is None:
            return self.decode(ref)
        return Encoded(ref, _tensor(data), *size)

    def finish(self, results: Sequence[np.ndarray | Encoded[K] | Exception]) -> list[torch.Tensor | Exception]:
        """On the model's thread: every image of the batch as uint8 [H, W, 3] on the device, in order; an
        exception (a file that neither decoder could decode) stays in its place."""
        out: list = list(results)
        encoded = {i: r for i, r in enumerate(results) if isinstance(r, Encoded)}
        for chunk in _chunks(encoded):
            for i, image in zip(chunk, self._decode([encoded[i] for i in chunk])):
                out[i] = image
        return [_on(self.device, r) if isinstance(r, np.ndarray) else r for r in out]

    def _decode(self, items: list[Encoded[K]]) -> list[torch.Tensor | np.ndarray | Exception]:
        """The JPEGs decoded in one call, resized and cropped; when the call fails (one file it refuses fails
        them all), each is tried alone, and a file the device refuses goes the CPU path."""
        from torchvision.io import ImageReadMode, decode_jpeg

        _drain(self.device)
        try:
            decoded = decode_jpeg([e.data for e in items], mode=ImageReadMode.RGB, device=self.device)
        except Exception:  # noqa: BLE001 -- nvjpeg's errors are RuntimeErrors of many kinds: retry one by one
            decoded = [self._decode_one(e) for e in items]
        out: list[torch.Tensor | np.ndarray | Exception] = []
        for e, image in zip(items, decoded):
            if isinstance(image, torch.Tensor) and tuple(image.shape) != (3, e.height, e.width):
                image = self._cpu(e.ref)  # not what the header said: trust the CPU path
            out.append(self._resize(e, image) if isinstance(image, torch.Tensor) else image)
        return out

    def _resize(self, e: Encoded[K], image: torch.Tensor) -> torch.Tensor | np.ndarray | Exception:
        """The decoded image resized and cropped on the device; where the device fails at that (out of memory,
        a scale its kernels refuse), the file goes the CPU path and the rest of the batch carries on."""
        try:
            return resize_and_crop(image, self.preprocess)
        except Exception:  # noqa: BLE001 -- torch.OutOfMemoryError, a kernel's RuntimeError: the CPU path decides
            del image
            return self._cpu(e.ref)

    def _decode_one(self, e: Encoded[K]) -> torch.Tensor | np.ndarray | Exception:
        from torchvision.io import ImageReadMode, decode_jpeg

        try:
            return decode_jpeg([e.data], mode=ImageReadMode.RGB, device=self.device)[0]
        except Exception:  # noqa: BLE001 -- refused here: the CPU path decodes it or says why it cannot
            return self._cpu(e.ref)

    def _cpu(self, ref: K) -> np.ndarray | Exception:
        try:
            return self.decode(ref)
        except Exception as exc:  # noqa: BLE001 -- a failure is the image's result (bitcli.pipeline.failure)
            return exc


def _drain(device: torch.device) -> None:
    """Wait on the host for the work queued on the device's stream. nvjpeg's hardware decoder writes its outputs
    without waiting for that stream, into blocks that PyTorch's caching allocator may have just freed while queued
    kernels (the previous chunk's resize) still read them (pytorch/vision#9606, meta-pytorch/torchcodec#1634)."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def _on(device: torch.device, image: np.ndarray) -> torch.Tensor:
    """A CPU-decoded image on the device (PIL's arrays are read-only: torch wants its own copy of those)."""
    return torch.from_numpy(image if image.flags.writeable else image.copy()).to(device)


def _tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def _chunks(encoded: dict[int, Encoded[K]]) -> Iterator[list[int]]:
    """The positions of `encoded`, in order, in runs of at most CHUNK_PIXELS decoded pixels (at least one image
    each)."""
    chunk: list[int] = []
    pixels = 0
    for i, e in encoded.items():
        size = e.width * e.height
        if chunk and pixels + size > CHUNK_PIXELS:
            yield chunk
            chunk, pixels = [], 0
        chunk.append(i)
        pixels += size
    if chunk:
        yield chunk


def gpu_size(data: bytes, preprocess: Preprocess) -> tuple[int, int] | None:
    """(width, height) of a JPEG that the device decodes as the CPU path would (up to rounding), from its
    header; None for every file that must go the CPU path."""
    if data[:3] != b"\xff\xd8\xff" or data[-2:] != b"\xff\xd9":  # not a JPEG, or cut short (PIL refuses those)
        return None
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.format != "JPEG" or im.mode not in ("RGB", "L"):  # MPO, CMYK/YCCK
                return None
            if im.info.get("adobe") is not None and im.info.get("adobe_transform") == 0 and im.mode == "RGB":
                return None  # stored as RGB, not YCbCr: only libjpeg is known to honour Adobe's marker
            if im.getexif().get(ORIENTATION, 1) in range(2, 9):  # ImageOps.exif_transpose would turn it
                return None
            width, height = im.size
    except Exception:  # noqa: BLE001 -- a header PIL cannot read: the CPU path says why
        return None
    if width < 1 or height < 1 or width * height > MAX_IMAGE_PIXELS or height > MAX_IMAGE_ROWS:
        return None  # the CPU path refuses it with the bomb guards' words
    rw, rh = preprocess.resized_size(width, height)
    if width > MAX_DOWNSCALE * rw or height > MAX_DOWNSCALE * rh:
        return None  # beyond what the device's antialiased resize takes
    if preprocess.crop is None and rw * rh > MAX_IMAGE_PIXELS:
        return None
    if preprocess.crop is not None and (rw, rh) != (width, height) and rw * rh > FULL_RESIZE_PIXELS:
        return None  # a thin strip: the CPU path resizes only the cropped region
    return width, height


def resize_and_crop(image: torch.Tensor, preprocess: Preprocess) -> torch.Tensor:
    """uint8 [3, H, W] on any device -> uint8 [h, w, 3] there: Preprocess.resize_and_crop's geometry with PIL's
    resize (antialiased, the horizontal pass then the vertical one, each rounded to uint8)."""
    _, height, width = image.shape
    rw, rh = preprocess.resized_size(width, height)
    x = image
    if (rw, rh) != (width, height):
        y = image.unsqueeze(0).float()
        if rw != width:
            y = _resize_pass(y, (height, rw), preprocess.interpolation)
        if rh != height:
            y = _resize_pass(y, (rh, rw), preprocess.interpolation)
        x = y[0].to(torch.uint8)
    if preprocess.crop is None:
        return x.permute(1, 2, 0)
    (x0, xn, px), (y0, yn, py) = preprocess.crop_window(rw, rh)
    region = x[:, y0 : y0 + yn, x0 : x0 + xn]
    crop_h, crop_w = preprocess.crop
    if (yn, xn) != (crop_h, crop_w):  # smaller than the crop: centred on black, as the CPU path pads
        canvas = torch.zeros((3, crop_h, crop_w), dtype=torch.uint8, device=x.device)
        canvas[:, py : py + yn, px : px + xn] = region
        region = canvas
    return region.permute(1, 2, 0)


def _resize_pass(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    return F.interpolate(x, size=size, mode=mode, antialias=True, align_corners=False).add_(0.5).floor_().clamp_(0, 255)


def file_bytes(path: str | os.PathLike[str]) -> bytes | None:
    """A regular file's bytes; None for anything else (missing, a folder, a pipe, unreadable, huge): the CPU
    path opens it and says what is wrong."""
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_FILE_BYTES:
            return None
        with open(path, "rb") as f:
            return f.read(MAX_FILE_BYTES + 1)
    except (OSError, ValueError):
        return None


def example_bytes(ref: str | os.PathLike[str] | RowRef) -> bytes | None:
    """A data-set example's encoded bytes (bitcli.sources.rows.load_example's source), or None."""
    if not isinstance(ref, RowRef):
        return file_bytes(ref)
    cell = ref.table.image_cell(ref.row)
    return file_bytes(cell) if isinstance(cell, str) else bytes(cell)
