"""Checkpoint readers and writers: bitcli .safetensors, transformers folders, timm folders/files, Google's .npz.

Every reader maps its own key names onto bitcli's (the names of `BitModel.state_dict()`) with a pure key
map, and returns lazy tensor references so that a converter can stream a checkpoint tensor by tensor.
"""

from __future__ import annotations

import dataclasses
import json
import re
import struct
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bitcli import __version__
from bitcli.config import BitConfig
from bitcli.errors import BitError
from bitcli.preprocess import Preprocess
from bitcli.writes import WriteFailed, atomic_folder, atomic_write  # noqa: F401 (finetune and predict import them from here)

# Google's fine-tuning preprocessing for BiT checkpoints that carry none (.npz, random init).
BIT_DEFAULT_PREPROCESS = Preprocess(resize=448, crop=(448, 448), interpolation="bilinear")


@dataclass(frozen=True)
class TensorRef:
    """A tensor in bitcli layout that is read from disk only when `load()` is called."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    load: Callable[[], torch.Tensor]


@dataclass
class Checkpoint:
    config: BitConfig
    labels: list[str]
    preprocess: Preprocess
    tensors: dict[str, TensorRef]  # bitcli key -> lazy tensor
    source: str = ""
    format: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: ref.load() for k, ref in self.tensors.items()}

    def build_model(self, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        """The model with these weights, checked for shapes and non-finite values, in eval mode."""
        from bitcli.model import BitModel

        check_tensors(self.config, self.tensors, self.source)
        with torch.device("meta"):
            model = BitModel(self.config)
        state = {}
        for key, ref in self.tensors.items():
            t = ref.load()
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise BitError(f"{self.source}: tensor {key} holds NaN or infinite values; the checkpoint is corrupt")
            state[key] = t.to(device=device, dtype=dtype)
        model.load_state_dict(state, strict=True, assign=True)
        return model.eval()


# ----------------------------------------------------------------------------------------------------------
# Shapes and validation


def expected_shapes(config: BitConfig) -> dict[str, tuple[int, ...]]:
    from bitcli.model import BitModel

    with torch.device("meta"):
        model = BitModel(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@dataclass(frozen=True)
class SourceNames:
    """How a source format names bitcli's tensors and lays out their shapes, so errors speak its language."""

    key: Callable[[str], str] = lambda key: key
    shape: Callable[[str, tuple[int, ...]], tuple[int, ...]] = lambda key, shape: tuple(shape)


BITCLI_NAMES = SourceNames()


def check_tensors(
    config: BitConfig, tensors: Mapping[str, TensorRef], source: str, names: SourceNames = BITCLI_NAMES
) -> None:
    """All problems at once: missing keys, unexpected keys, wrong shapes (named as the source names them)."""
    want = expected_shapes(config)
    missing = [names.key(k) for k in want if k not in tensors]
    unused = [names.key(k) for k in tensors if k not in want]
    wrong = [
        f"{names.key(k)} {names.shape(k, tuple(tensors[k].shape))} (expected {names.shape(k, want[k])})"
        for k in want
        if k in tensors and tuple(tensors[k].shape) != want[k]
    ]
    problems = []
    if missing:
        problems.append(f"missing {_few(missing)}")
    if unused:
        problems.append(f"unexpected {_few(unused)}")
    if wrong:
        problems.append(f"wrong shape {_few(wrong)}")
    if problems:
        raise BitError(f"{source}: weights do not match the architecture: " + "; ".join(problems))
    for key, ref in tensors.items():
        if not ref.dtype.is_floating_point:
            raise BitError(f"{source}: tensor {names.key(key)} has dtype {ref.dtype}; BiT weights must be floating point")


def _few(items: list[str], n: int = 4) -> str:
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


_UNIT_KEY = re.compile(r"^stages\.(\d+)\.units\.(\d+)\.")


def infer_config(
    shapes: Mapping[str, tuple[int, ...]], source: str, names: SourceNames = BITCLI_NAMES, **overrides: Any
) -> BitConfig:
    """Depth, width and class count of a BiT from its bitcli-named tensor shapes (never from a file name)."""
    stem = shapes.get("stem.conv.weight")
    if stem is None or len(stem) != 4:
        raise BitError(f"{source}: has no {names.key('stem.conv.weight')}; this is not a BiT checkpoint")
    units: dict[int, set[int]] = {}
    for key in shapes:
        m = _UNIT_KEY.match(key)
        if m:
            units.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    if not units:
        raise BitError(f"{source}: has no residual units (no {names.key('stages.0.units.0.conv1.weight')})")
    depths, hidden = [], []
    for s in range(max(units) + 1):
        found = units.get(s, set())
        gap = next((u for u in range(max(found, default=0) + 1) if u not in found), None)
        if gap is not None:  # a stage, or a unit inside one, is absent while later ones exist
            raise BitError(f"{source}: missing {names.key(f'stages.{s}.units.{gap}.conv1.weight')} (and the rest of that unit)")
        conv3 = shapes.get(f"stages.{s}.units.0.conv3.weight")
        if conv3 is None or not conv3:
            raise BitError(f"{source}: missing {names.key(f'stages.{s}.units.0.conv3.weight')}")
        depths.append(len(found))
        hidden.append(int(conv3[0]))
    head = shapes.get("head.weight")
    values: dict[str, Any] = dict(
        depths=tuple(depths),
        hidden_sizes=tuple(hidden),
        embedding_size=int(stem[0]),
        in_channels=int(stem[1]),
        num_classes=int(head[0]) if head else 0,
        layer_type="bottleneck" if "stem.norm.weight" in shapes else "preactivation",
    )
    values.update(overrides)
    try:
        return BitConfig(**values)
    except BitError as exc:  # e.g. widths that do not split into GroupNorm's 32 groups
        raise BitError(f"{source}: tensor shapes describe no valid BiT ({exc})") from None


# ----------------------------------------------------------------------------------------------------------
# Key maps (pure): source name <-> bitcli name


def _rules(pairs: list[tuple[str, str]]) -> tuple[list[tuple[re.Pattern, str]], list[tuple[re.Pattern, str]]]:
    fwd = [(re.compile(a), b) for a, b in pairs]
    back = [(re.compile(_invert(b)), _invert_repl(a)) for a, b in pairs]
    return fwd, back


def _invert(repl: str) -> str:
    # Patterns here are anchored prefixes with at most \1 and \2 as digit groups.
    return "^" + re.sub(r"\\(\d)", r"(\\d+)", repl.replace(".", r"\."))


def _invert_repl(pattern: str) -> str:
    out, group = pattern.lstrip("^"), 0
    while r"(\d+)" in out:
        group += 1
        out = out.replace(r"(\d+)", f"\\{group}", 1)
    return out.replace(r"\.", ".")


HF_TO_BITCLI, BITCLI_TO_HF = _rules(
    [
        (r"^bit\.embedder\.convolution\.", "stem.conv."),
        (r"^bit\.embedder\.norm\.", "stem.norm."),
        (r"^bit\.encoder\.stages\.(\d+)\.layers\.(\d+)\.", r"stages.\1.units.\2."),
        (r"^bit\.norm\.", "norm."),
        (r"^classifier\.1\.", "head."),
    ]
)
TIMM_TO_BITCLI, BITCLI_TO_TIMM = _rules(
    [
        (r"^stem\.conv\.", "stem.conv."),
        (r"^stem\.norm\.", "stem.norm."),
        (r"^stages\.(\d+)\.blocks\.(\d+)\.", r"stages.\1.units.\2."),
        (r"^norm\.", "norm."),
        (r"^head\.fc\.", "head."),
    ]
)


def _timm_shape(key: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    return (*shape, 1, 1) if key == "head.weight" and len(shape) == 2 else tuple(shape)  # timm's head is a 1x1 conv


HF_NAMES = SourceNames(lambda key: rename(key, BITCLI_TO_HF) or key)
TIMM_NAMES = SourceNames(lambda key: rename(key, BITCLI_TO_TIMM) or key, _timm_shape)


def rename(key: str, rules: list[tuple[re.Pattern, str]]) -> str | None:
    for pattern, repl in rules:
        if pattern.match(key):
            return pattern.sub(repl, key, count=1)
    return None


_HF_LAYOUT = "transformers' BiT layout (bit.embedder.*, bit.encoder.stages.N.layers.N.*, classifier.1.*)"
_TIMM_LAYOUT = "timm's BiT layout (stem.conv.weight, stages.N.blocks.N.*, head.fc.*)"


def _mapped(
    source: str,
    keys: Iterator[str],
    rules: list[tuple[re.Pattern, str]],
    ignore: Callable[[str], bool] = lambda k: False,
    layout: str = "this format",
) -> dict[str, str]:
    """bitcli key -> source key; every source key must map (or be explicitly ignorable)."""
    out, unknown = {}, []
    for key in keys:
        new = rename(key, rules)
        if new is None:
            if not ignore(key):
                unknown.append(key)
            continue
        out[new] = key
    if unknown:
        raise BitError(f"{source}: unknown tensor name(s) {_few(sorted(unknown))}; not a BiT checkpoint in {layout}")
    return out


# ----------------------------------------------------------------------------------------------------------
# Files of tensors: safetensors, torch .bin (weights only), numpy .npz (no pickle)

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


def read_safetensors(path: Path) -> tuple[dict[str, TensorRef], dict[str, str]]:
    """Lazy references to every tensor, and the metadata. The header is validated before anything is read."""
    from safetensors import safe_open

    size = _file_size(path)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise BitError(f"{path}: file is too short to be safetensors (truncated or empty)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise BitError(f"{path}: safetensors header runs past the end of the file (truncated)")
            header = json.loads(f.read(n))
        metadata = header.pop("__metadata__", None) or {}
        end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
        if 8 + n + end > size:
            raise BitError(f"{path}: safetensors data runs past the end of the file (truncated)")
        for key, v in header.items():
            if v["dtype"] not in _ST_DTYPES:
                raise BitError(f"{path}: tensor {key} has unsupported dtype {v['dtype']}")
        handle = safe_open(str(path), framework="pt")
    except BitError:
        raise
    except Exception as exc:  # malformed JSON, wrong field types, the Rust reader's own checks
        raise BitError(f"{path}: not a valid safetensors file ({_one_line(exc)})") from None

    def loader(key: str) -> Callable[[], torch.Tensor]:
        return lambda: handle.get_tensor(key)

    refs = {k: TensorRef(tuple(v["shape"]), _ST_DTYPES[v["dtype"]], loader(k)) for k, v in header.items()}
    return refs, dict(metadata)


def read_torch_bin(path: Path) -> dict[str, TensorRef]:
    """A torch state dict, loaded with weights_only=True: pickled code is refused, never run."""
    import pickle
    import warnings

    _file_size(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols; the error below says enough
            # mmap needs torch's zip container; legacy (pre-1.6) files are read the ordinary way.
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as exc:
        what = re.search(r"GLOBAL (\S+)", str(exc))
        detail = f"it refers to {what.group(1)}" if what else "torch's weights-only loader cannot read it"
        raise BitError(
            f"{path}: pickled Python objects, not plain weights ({detail}); bitcli never unpickles those. "
            "If you trust the file, re-save its weights as safetensors with the tool that wrote it"
        ) from None
    except Exception as exc:
        raise BitError(f"{path}: not a torch weights file ({_one_line(exc)[:200]})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BitError(f"{path}: does not hold a flat dict of tensors")
    return {k: TensorRef(tuple(v.shape), v.dtype, (lambda v=v: v)) for k, v in state.items()}


# numpy dtypes a BiT .npz may hold (any byte order), and their torch equivalents.
_NPZ_DTYPES = {np.dtype("float16"): torch.float16, np.dtype("float32"): torch.float32, np.dtype("float64"): torch.float64}


def read_npz_arrays(path: Path) -> dict[str, TensorRef]:
    """Lazy references to the arrays of an .npz, one zip member each. Only the .npy headers are read here:
    object arrays (pickles) are refused, and a member shorter than its header promises is reported as
    truncated before anything is converted. `load()` reads one member, so peak memory is one array."""
    _file_size(path)
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError) as exc:
        with open(path, "rb") as f:
            magic = f.read(6)
        if magic == b"\x93NUMPY":
            raise BitError(f"{path}: is a single .npy array, not an .npz archive of named arrays") from None
        if magic.startswith(b"PK\x03\x04"):
            raise BitError(f"{path}: the .npz archive is truncated (its zip directory is missing); download or copy it again") from None
        raise BitError(f"{path}: not an .npz (zip) archive ({_one_line(exc)})") from None
    refs: dict[str, TensorRef] = {}
    for info in zf.infolist():
        key = info.filename.removesuffix(".npy")
        try:
            with zf.open(info) as fh:
                version = np.lib.format.read_magic(fh)
                if version == (1, 0):
                    shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
                elif version == (2, 0):
                    shape, _, dtype = np.lib.format.read_array_header_2_0(fh)
                else:  # 3.0 only exists for non-Latin-1 field names, which weights never have
                    raise BitError(f"{path}: array {key} uses .npy format {version[0]}.{version[1]}; expected 1.0 or 2.0")
                data_start = fh.tell()
        except BitError:
            raise
        except zipfile.BadZipFile as exc:  # a small member is read whole with its header: CRC checked here
            raise BitError(f"{path}: array {key} is corrupt ({_one_line(exc)}); download or copy the file again") from None
        except Exception as exc:  # not a .npy member, a damaged header, a zip entry that cannot be opened
            raise BitError(f"{path}: member {info.filename} is not a readable .npy array ({_one_line(exc)})") from None
        if dtype.hasobject:
            raise BitError(f"{path}: array {key} holds Python objects (a pickle); bitcli refuses to load it")
        native = dtype.newbyteorder("=")
        if native not in _NPZ_DTYPES:
            raise BitError(f"{path}: array {key} has dtype {dtype}; BiT weights must be float16, float32 or float64")
        need = data_start + _numel(shape) * dtype.itemsize
        if info.file_size != need:
            state = "is truncated" if info.file_size < need else "has bytes after its data"
            raise BitError(
                f"{path}: array {key} {state} ({info.file_size} bytes, its header promises {need}); the file is corrupt"
            )
        refs[key] = TensorRef(tuple(int(n) for n in shape), _NPZ_DTYPES[native], _npz_loader(path, zf, info, key))
    return refs


def _npz_loader(path: Path, zf: zipfile.ZipFile, info: zipfile.ZipInfo, key: str) -> Callable[[], torch.Tensor]:
    def load() -> torch.Tensor:
        try:
            with zf.open(info) as fh:
                array = np.lib.format.read_array(fh, allow_pickle=False)
        except Exception as exc:  # CRC mismatch, a member cut short
            raise BitError(f"{path}: array {key} cannot be read ({_one_line(exc)}); the file is corrupt, download or copy it again") from None
        if not array.dtype.isnative:
            array = array.astype(array.dtype.newbyteorder("="))
        return torch.from_numpy(np.ascontiguousarray(array))

    return load


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError as exc:
        raise BitError(f"{path}: cannot read ({exc.strerror})") from None


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300] or type(exc).__name__


def _mapped_refs(refs: dict[str, TensorRef], mapping: dict[str, str], fix: Callable[[str, TensorRef], TensorRef]) -> dict[str, TensorRef]:
    return {new: fix(new, refs[old]) for new, old in mapping.items()}


def _same(_: str, ref: TensorRef) -> TensorRef:
    return ref


# ----------------------------------------------------------------------------------------------------------
# Labels


def imagenet_labels() -> list[str]:
    from torchvision.models._meta import _IMAGENET_CATEGORIES

    return list(_IMAGENET_CATEGORIES)


def default_labels(num_classes: int) -> list[str]:
    """ImageNet-1k names for 1000-class heads, else class_0, class_1, ..."""
    return imagenet_labels() if num_classes == 1000 else [f"class_{i}" for i in range(num_classes)]


def read_label_file(path: Path, num_classes: int) -> list[str]:
    try:
        labels = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise BitError(f"{path}: cannot read label file ({_one_line(exc)})") from None
    if len(labels) != num_classes:
        raise BitError(f"{path}: has {len(labels)} labels but the model has {num_classes} classes; one name per line")
    return labels


def _checked_labels(labels: list[str] | None, num_classes: int, source: str) -> list[str]:
    if labels is None:
        return default_labels(num_classes)
    if len(labels) != num_classes:
        raise BitError(f"{source}: {len(labels)} label names for a head of {num_classes} classes")
    return [str(x) for x in labels]


# ----------------------------------------------------------------------------------------------------------
# bitcli's single-file format


def read_bitcli(path: Path) -> Checkpoint:
    refs, meta = read_safetensors(path)
    if meta.get("format") != "bitcli":
        return read_timm_weights(path, refs)
    try:
        config = BitConfig.from_dict(json.loads(meta["config"]))
        labels = json.loads(meta["labels"])
        preprocess = Preprocess.from_dict(json.loads(meta["preprocess"]))
    except BitError as exc:
        raise BitError(f"{path}: {exc}") from None
    except (KeyError, ValueError, TypeError) as exc:
        raise BitError(f"{path}: bitcli metadata is damaged ({_one_line(exc)}); convert the source again") from None
    check_tensors(config, refs, str(path))
    return Checkpoint(config, _checked_labels(labels, config.num_classes, str(path)), preprocess, refs, str(path), "bitcli")


def write_safetensors(path: Path, tensors: Mapping[str, TensorRef], metadata: dict[str, str], dtype: torch.dtype | None = None) -> None:
    """Stream tensors into a safetensors file one at a time (peak memory: one tensor), atomically."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for key, ref in tensors.items():
        out_dtype = dtype if (dtype is not None and ref.dtype.is_floating_point) else ref.dtype
        nbytes = _numel(ref.shape) * torch.empty((), dtype=out_dtype).element_size()
        header[key] = {"dtype": _ST_NAMES[out_dtype], "shape": list(ref.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keep the data 8-byte aligned, as the reference writer does

    def write(f) -> None:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for key, ref in tensors.items():
            t = ref.load()
            if tuple(t.shape) != tuple(ref.shape):
                raise BitError(f"{key}: shape {tuple(t.shape)} differs from its header {ref.shape}")
            t = t.to(_ST_DTYPES[header[key]["dtype"]]).contiguous()
            if t.numel():
                f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))  # no copy of the tensor's bytes
            del t

    atomic_write(path, write)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def write_bitcli(ckpt: Checkpoint, path: Path, dtype: torch.dtype | None = None) -> None:
    meta = {
        "format": "bitcli",
        "bitcli_version": __version__,
        "config": json.dumps(ckpt.config.to_dict()),
        "labels": json.dumps(ckpt.labels),
        "preprocess": json.dumps(ckpt.preprocess.to_dict()),
    }
    write_safetensors(path, ckpt.tensors, meta, dtype)


# ----------------------------------------------------------------------------------------------------------
# transformers folders


# The weight-standardisation eps the weights were trained with (Google's: 1e-10), kept in config.json files
# whose own libraries hard-code theirs, so that converting through them changes no number.
WS_EPS_KEY = "bitcli_ws_eps"


def _ws_eps(cfg: dict[str, Any], default: float, source: Path) -> float:
    value = cfg.get(WS_EPS_KEY, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise BitError(f"{source}: {WS_EPS_KEY} must be a small positive number, got {value!r}")
    return float(value)


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BitError(f"{path}: missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BitError(f"{path}: not valid JSON ({_one_line(exc)})") from None
    if not isinstance(data, dict):
        raise BitError(f"{path}: expected a JSON object")
    return data


def _weights_in(folder: Path) -> dict[str, TensorRef]:
    st, bin_ = folder / "model.safetensors", folder / "pytorch_model.bin"
    if st.is_file():
        return read_safetensors(st)[0]
    if bin_.is_file():
        return read_torch_bin(bin_)
    raise BitError(f"{folder}: holds no model.safetensors or pytorch_model.bin")


def read_hf(folder: Path) -> Checkpoint:
    hf = read_json(folder / "config.json")
    refs = _weights_in(folder)
    head = refs.get("classifier.1.weight")
    num_classes = head.shape[0] if head is not None else 0
    try:
        config = BitConfig.from_hf(hf, num_classes)
    except BitError as exc:
        raise BitError(f"{folder / 'config.json'}: {exc}") from None
    config = dataclasses.replace(config, ws_eps=_ws_eps(hf, 1e-8, folder / "config.json"))
    id2label = hf.get("id2label") or {}
    labels = None
    if id2label and len(id2label) == num_classes:
        labels = [str(id2label.get(str(i), id2label.get(i, f"class_{i}"))) for i in range(num_classes)]
        if num_classes == 1000 and all(re.fullmatch(r"LABEL_\d+", x) for x in labels):
            labels = None  # transformers' placeholders: use the real ImageNet names
    pre_path = folder / "preprocessor_config.json"
    preprocess = Preprocess.from_hf(read_json(pre_path)) if pre_path.is_file() else BIT_DEFAULT_PREPROCESS
    tensors = _mapped_refs(refs, _mapped(str(folder), iter(refs), HF_TO_BITCLI, layout=_HF_LAYOUT), _same)
    check_tensors(config, tensors, str(folder), HF_NAMES)
    return Checkpoint(config, _checked_labels(labels, num_classes, str(folder)), preprocess, tensors, str(folder), "hf")


def write_hf(ckpt: Checkpoint, folder: Path, dtype: torch.dtype | None = None) -> None:
    """transformers layout, through atomic_folder: a new folder appears complete or not at all, an existing one
    has its model files replaced (and must hold nothing else)."""
    hf = ckpt.config.to_hf()
    hf["id2label"] = {str(i): name for i, name in enumerate(ckpt.labels)}
    hf["label2id"] = {name: i for i, name in enumerate(ckpt.labels)}
    hf[WS_EPS_KEY] = ckpt.config.ws_eps  # transformers ignores it (its eps is fixed at 1e-8); bitcli reads it back
    if dtype is not None:
        hf["torch_dtype"] = str(dtype).removeprefix("torch.")
    tensors = {rename(k, BITCLI_TO_HF): ref for k, ref in ckpt.tensors.items()}

    def fill(tmp: Path) -> None:
        (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        (tmp / "preprocessor_config.json").write_text(json.dumps(ckpt.preprocess.to_hf(), indent=2) + "\n")
        write_safetensors(tmp / "model.safetensors", tensors, {"format": "pt"}, dtype)

    atomic_folder(folder, fill)


# ----------------------------------------------------------------------------------------------------------
# timm folders and files


def _timm_fix(key: str, ref: TensorRef) -> TensorRef:
    if key == "head.weight" and len(ref.shape) == 4 and ref.shape[2:] == (1, 1):  # timm's head is a 1x1 conv
        return TensorRef(ref.shape[:2], ref.dtype, lambda: ref.load().reshape(ref.shape[:2]))
    return ref


def read_timm_weights(path: Path, refs: dict[str, TensorRef], timm_cfg: dict[str, Any] | None = None) -> Checkpoint:
    """timm weights (bare file, or with its config.json): architecture from the shapes, checked against the name."""
    mapping = _mapped(str(path), iter(refs), TIMM_TO_BITCLI, layout=_TIMM_LAYOUT)
    tensors = _mapped_refs(refs, mapping, _timm_fix)
    cfg = timm_cfg or {}
    shapes = {k: r.shape for k, r in tensors.items()}
    config = infer_config(shapes, str(path), TIMM_NAMES, ws_eps=_ws_eps(cfg, 1e-8, path / "config.json"))
    arch = cfg.get("architecture")
    if arch is not None:
        try:
            named = BitConfig.from_name(arch, num_classes=config.num_classes, ws_eps=config.ws_eps)
        except BitError:
            raise BitError(f"{path}: timm architecture {arch!r} is not a BiT model (resnetv2_*_bit)") from None
        if named != config:
            raise BitError(f"{path}: config.json says {arch} but the weights have another shape; the config lies")
        if int(cfg.get("num_classes", config.num_classes)) != config.num_classes:
            raise BitError(f"{path}: config.json says {cfg['num_classes']} classes but the head has {config.num_classes}")
    labels = cfg.get("label_names")
    pretrained = cfg.get("pretrained_cfg")
    preprocess = Preprocess.from_timm(pretrained) if pretrained else BIT_DEFAULT_PREPROCESS
    check_tensors(config, tensors, str(path), TIMM_NAMES)
    return Checkpoint(config, _checked_labels(labels, config.num_classes, str(path)), preprocess, tensors, str(path), "timm")


def read_timm(folder: Path) -> Checkpoint:
    return read_timm_weights(folder, _weights_in(folder), read_json(folder / "config.json"))


def write_timm(ckpt: Checkpoint, folder: Path, dtype: torch.dtype | None = None) -> None:
    """timm's hub layout (config.json + model.safetensors); only for the layouts timm has a name for."""
    try:
        arch = dataclasses.replace(ckpt.config, ws_eps=1e-8).timm_architecture()  # the eps travels in WS_EPS_KEY
    except BitError:
        cfg = ckpt.config
        raise BitError(
            f"{ckpt.source}: depths {list(cfg.depths)} and widths {list(cfg.hidden_sizes)} have no timm name "
            "(timm's BiT models are R50/R101/R152 x1-x4); convert to --format bitcli or hf instead"
        ) from None

    def head_conv(key: str, ref: TensorRef) -> TensorRef:
        if key == "head.fc.weight":
            return TensorRef((*ref.shape, 1, 1), ref.dtype, lambda: ref.load().reshape(*ref.shape, 1, 1))
        return ref

    tensors = {rename(k, BITCLI_TO_TIMM): ref for k, ref in ckpt.tensors.items()}
    tensors = {k: head_conv(k, r) for k, r in tensors.items()}
    pretrained = {"architecture": arch, **ckpt.preprocess.to_timm(), "num_classes": ckpt.config.num_classes}
    cfg = {
        "architecture": arch,
        "num_classes": ckpt.config.num_classes,
        "num_features": ckpt.config.num_features,
        "global_pool": "avg",
        "label_names": ckpt.labels,
        "pretrained_cfg": pretrained,
        WS_EPS_KEY: ckpt.config.ws_eps,  # timm builds BiT with 1e-8 and ignores this key; bitcli reads it back
    }

    def fill(tmp: Path) -> None:
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        write_safetensors(tmp / "model.safetensors", tensors, {"format": "pt"}, dtype)

    atomic_folder(folder, fill)


# ----------------------------------------------------------------------------------------------------------
# Google's original .npz


_NPZ_GLOBAL = {
    "stem.conv.weight": "root_block/standardized_conv2d/kernel",
    "norm.weight": "group_norm/gamma",
    "norm.bias": "group_norm/beta",
    "head.weight": "head/conv2d/kernel",
    "head.bias": "head/conv2d/bias",
}
# Google names a unit's pre-activation norm (norm1) under `a`, beside conv1.
_NPZ_UNIT = {
    **{f"conv{n}.weight": f"{p}/standardized_conv2d/kernel" for n, p in zip("123", "abc")},
    **{f"norm{n}.weight": f"{p}/group_norm/gamma" for n, p in zip("123", "abc")},
    **{f"norm{n}.bias": f"{p}/group_norm/beta" for n, p in zip("123", "abc")},
    "downsample.conv.weight": "a/proj/standardized_conv2d/kernel",
}
_NPZ_GLOBAL_BACK = {v: k for k, v in _NPZ_GLOBAL.items()}
_NPZ_UNIT_BACK = {v: k for k, v in _NPZ_UNIT.items()}


def npz_key(bitcli_key: str) -> str:
    """bitcli name -> name inside Google's .npz (without the `resnet/` prefix)."""
    if bitcli_key in _NPZ_GLOBAL:
        return _NPZ_GLOBAL[bitcli_key]
    s, u, rest = re.fullmatch(r"stages\.(\d+)\.units\.(\d+)\.(.+)", bitcli_key).groups()
    return f"block{int(s) + 1}/unit{int(u) + 1:02d}/{_NPZ_UNIT[rest]}"


def bitcli_key_from_npz(key: str) -> str | None:
    if key in _NPZ_GLOBAL_BACK:
        return _NPZ_GLOBAL_BACK[key]
    m = re.fullmatch(r"block(\d+)/unit(\d+)/(.+)", key)
    if not m or m.group(3) not in _NPZ_UNIT_BACK or int(m.group(1)) < 1 or int(m.group(2)) < 1:
        return None
    return f"stages.{int(m.group(1)) - 1}.units.{int(m.group(2)) - 1}.{_NPZ_UNIT_BACK[m.group(3)]}"


def npz_shape(bitcli_key: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """bitcli shape -> shape inside Google's .npz: OIHW kernels are HWIO, the Linear head a [1, 1, C, N] conv."""
    if bitcli_key == "head.weight" and len(shape) == 2:
        return (1, 1, shape[1], shape[0])
    if len(shape) == 4:
        o, i, h, w = shape
        return (h, w, i, o)
    return tuple(shape)


def _npz_display_key(bitcli_key: str) -> str:
    try:
        return "resnet/" + npz_key(bitcli_key)
    except (AttributeError, KeyError):  # a key Google's layout has no name for (e.g. a v1.5 stem norm)
        return bitcli_key


NPZ_NAMES = SourceNames(_npz_display_key, npz_shape)


def read_npz(path: Path, labels: list[str] | None = None) -> Checkpoint:
    """Google's BiT .npz: HWIO kernels, `resnet/` prefix; standardisation eps 1e-10 as in Google's code."""
    arrays = read_npz_arrays(path)
    prefix = "resnet/"
    names = {k: bitcli_key_from_npz(k[len(prefix):]) if k.startswith(prefix) else None for k in arrays}
    unknown = [k for k, name in names.items() if name is None]
    if unknown:
        raise BitError(f"{path}: unknown array name(s) {_few(sorted(unknown))}; not a BiT .npz in Google's layout")

    def to_bitcli(npz_name: str, key: str, ref: TensorRef) -> TensorRef:
        rank = 4 if npz_name.endswith("/kernel") else 1
        if len(ref.shape) != rank:
            raise BitError(f"{path}: {npz_name} has shape {ref.shape}; expected a {rank}-d array")
        if rank == 1:
            return ref
        h, w, i, o = ref.shape
        if key == "head.weight":  # [1, 1, C, N] -> Linear [N, C]
            if (h, w) != (1, 1):
                raise BitError(f"{path}: {npz_name} has shape {ref.shape}; expected (1, 1, {i}, {o})")
            return TensorRef((o, i), ref.dtype, lambda: ref.load().reshape(i, o).t().contiguous())
        return TensorRef((o, i, h, w), ref.dtype, lambda: ref.load().permute(3, 2, 0, 1).contiguous())  # HWIO -> OIHW

    tensors = {names[k]: to_bitcli(k, names[k], ref) for k, ref in arrays.items()}
    if ("head.weight" in tensors) != ("head.bias" in tensors):
        raise BitError(f"{path}: has only one of resnet/head/conv2d/kernel and resnet/head/conv2d/bias")
    shapes = {k: r.shape for k, r in tensors.items()}
    config = infer_config(shapes, str(path), NPZ_NAMES, ws_eps=1e-10)
    check_tensors(config, tensors, str(path), NPZ_NAMES)
    return Checkpoint(config, _checked_labels(labels, config.num_classes, str(path)), BIT_DEFAULT_PREPROCESS, tensors, str(path), "npz")


def write_npz(ckpt: Checkpoint, path: Path) -> None:
    """Google's layout (used by tests and by anyone going back to the original code), one array at a time."""

    def write(f) -> None:
        with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            for key, ref in ckpt.tensors.items():
                t = ref.load().to(torch.float32)
                if key == "head.weight":
                    t = t.t().reshape(npz_shape(key, tuple(ref.shape)))
                elif t.ndim == 4:
                    t = t.permute(2, 3, 1, 0)
                with zf.open(f"resnet/{npz_key(key)}.npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, np.ascontiguousarray(t.numpy()), allow_pickle=False)
                del t

    atomic_write(path, write)
