"""A checkpoint in bitcli's terms (config, labels, preprocessing, lazy tensors), and the checks every reader
applies: all missing, unexpected and misshapen tensors at once, and the architecture its shapes describe."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bitcli.config import BitConfig
from bitcli.errors import BitError, one_line
from bitcli.formats.tensors import BITCLI, Layout, TensorRef, few
from bitcli.labels import default_labels
from bitcli.model import BitModel
from bitcli.preprocess import Preprocess
from bitcli.reads import file_size
from bitcli.scores import check_temperature

# For a transformers folder without preprocessor_config.json: google/bit-50's (shortest edge 448, centre crop 448).
BIT_DEFAULT_PREPROCESS = Preprocess(resize=448, crop=(448, 448), interpolation="bilinear")
# Google's own evaluation transform for its .npz checkpoints (big_transfer's bit_pytorch/train.py and
# input_pipeline_tf2_or_jax.py): the whole image resized to the crop size, bilinear, no centre crop, [-1, 1];
# 480x480 is the HyperRule's crop for ImageNet-size images, at which the -ILSVRC2012 weights were evaluated.
GOOGLE_EVAL_PREPROCESS = Preprocess(resize=(480, 480), crop=None, interpolation="bilinear")


@dataclass
class Checkpoint:
    config: BitConfig
    labels: list[str]
    preprocess: Preprocess
    tensors: dict[str, TensorRef]  # bitcli key -> lazy tensor
    source: str = ""
    format: str = ""
    layout: Layout = BITCLI  # how the source names the tensors, so that errors speak its language
    graph: Path | None = None  # an exported .onnx holding the weights (tensors is then empty): runs in onnxruntime only
    temperature: float = 1.0  # scores are softmax(logits / temperature) (bitcli.scores); bit finetune fits it
    # A multi-label model: sigmoid scores, class i predicted when its score reaches thresholds[i]
    # (bitcli.multilabel); None: a single-label (softmax) model.
    thresholds: list[float] | None = None

    @property
    def multi_label(self) -> bool:
        return self.thresholds is not None

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: ref.load() for k, ref in self.tensors.items()}

    def build_model(self, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> BitModel:
        """The model with these weights, checked for shapes and non-finite values, in eval mode."""
        self.refuse_graph()
        check_tensors(self.config, self.tensors, self.source, self.layout)
        with torch.device("meta"):
            model = BitModel(self.config)
        state = {}
        for key, ref in self.tensors.items():
            t = ref.load()
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise BitError(
                    f"{self.source}: tensor {self.layout.key(key)} holds NaN or infinite values; the checkpoint is corrupt"
                )
            state[key] = t.to(device=device, dtype=dtype)
        model.load_state_dict(state, strict=True, assign=True)
        return model.eval()

    def refuse_graph(self) -> None:
        """An exported graph runs (bit predict, bit eval) but gives no weights to build, convert or train."""
        if self.graph is not None:
            raise BitError(
                f"{self.source}: an ONNX export runs in bit predict and bit eval only; its weights are compiled into "
                "the graph, so convert or fine-tune from the checkpoint it was exported from"
            )


def expected_shapes(config: BitConfig) -> dict[str, tuple[int, ...]]:
    """bitcli key -> shape of every tensor of a BitModel with this config (built on the meta device)."""
    with torch.device("meta"):
        model = BitModel(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_tensors(config: BitConfig, tensors: Mapping[str, TensorRef], source: str, layout: Layout = BITCLI) -> None:
    """All problems at once: missing keys, unexpected keys, wrong shapes (named as the source names them)."""
    want = expected_shapes(config)
    missing = [layout.key(k) for k in want if k not in tensors]
    unused = [layout.key(k) for k in tensors if k not in want]
    wrong = [
        f"{layout.key(k)} {layout.shape(k, tuple(tensors[k].shape))} (expected {layout.shape(k, want[k])})"
        for k in want
        if k in tensors and tuple(tensors[k].shape) != want[k]
    ]
    problems = []
    if missing:
        problems.append(f"missing {few(missing)}")
    if unused:
        problems.append(f"unexpected {few(unused)}")
    if wrong:
        problems.append(f"wrong shape {few(wrong)}")
    if problems:
        raise BitError(f"{source}: weights do not match the architecture: " + "; ".join(problems))
    for key, ref in tensors.items():
        if not ref.dtype.is_floating_point:
            raise BitError(
                f"{source}: tensor {layout.key(key)} has dtype {ref.dtype}; BiT weights must be floating point"
            )


_UNIT_KEY = re.compile(r"^stages\.(\d+)\.units\.(\d+)\.")


def infer_config(
    shapes: Mapping[str, tuple[int, ...]], source: str, layout: Layout = BITCLI, *, ws_eps: float
) -> BitConfig:
    """Depth, width and class count of a BiT from its bitcli-named tensor shapes (never from a file name); the
    standardisation eps, which no shape shows, from the format."""
    stem = shapes.get("stem.conv.weight")
    if stem is None or len(stem) != 4:
        raise BitError(f"{source}: has no {layout.key('stem.conv.weight')}; this is not a BiT checkpoint")
    units: dict[int, set[int]] = {}
    for key in shapes:
        m = _UNIT_KEY.match(key)
        if m:
            units.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    if not units:
        raise BitError(f"{source}: has no residual units (no {layout.key('stages.0.units.0.conv1.weight')})")
    depths, hidden = [], []
    for s in range(max(units) + 1):
        found = units.get(s, set())
        gap = next((u for u in range(max(found, default=0) + 1) if u not in found), None)
        if gap is not None:  # a stage, or a unit inside one, is absent while later ones exist
            raise BitError(
                f"{source}: missing {layout.key(f'stages.{s}.units.{gap}.conv1.weight')} (and the rest of that unit)"
            )
        conv3 = shapes.get(f"stages.{s}.units.0.conv3.weight")
        if conv3 is None or not conv3:
            raise BitError(f"{source}: missing {layout.key(f'stages.{s}.units.0.conv3.weight')}")
        depths.append(len(found))
        hidden.append(int(conv3[0]))
    head = shapes.get("head.weight")
    try:
        return BitConfig(
            depths=tuple(depths),
            hidden_sizes=tuple(hidden),
            embedding_size=int(stem[0]),
            in_channels=int(stem[1]),
            num_classes=int(head[0]) if head else 0,
            layer_type="bottleneck" if "stem.norm.weight" in shapes else "preactivation",
            ws_eps=ws_eps,
        )
    except BitError as exc:  # e.g. widths that do not split into GroupNorm's 32 groups
        raise BitError(f"{source}: tensor shapes describe no valid BiT ({exc})") from None


# ----------------------------------------------------------------------------------------------------------
# Labels and the standardisation eps, as the formats store them


def checked_labels(labels: list[str] | None, num_classes: int, source: str) -> list[str]:
    """The names a file carries, or the default ones for its head size (ImageNet-1k or -21k, else class_N)."""
    if labels is None:
        return default_labels(num_classes)
    if len(labels) != num_classes:
        raise BitError(f"{source}: {len(labels)} label names for a head of {num_classes} classes")
    return [str(x) for x in labels]


def read_class_names(path: Path, num_classes: int) -> list[str]:
    """`--labels FILE`: one class name per line (blank lines ignored), as many as the head has classes."""
    file_size(path, what="label file")  # a FIFO would hang the read
    try:
        labels = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise BitError(f"{path}: cannot read label file ({one_line(exc)})") from None
    if len(labels) != num_classes:
        raise BitError(f"{path}: has {len(labels)} labels but the model has {num_classes} classes; one name per line")
    first_line: dict[str, int] = {}
    for number, name in enumerate(labels, 1):
        if name in first_line:  # two outputs of one name: predictions and label files could not tell them apart
            raise BitError(f"{path}: names class {name!r} twice (names {first_line[name]} and {number}); "
                           "give each class its own name")  # fmt: skip
        first_line[name] = number
    return labels


# The weight-standardisation eps the weights were trained with (Google's: 1e-10), kept in config.json files
# whose own libraries hard-code theirs (transformers and timm: 1e-8), so that converting through them changes
# no number.
WS_EPS_KEY = "bitcli_ws_eps"


# The temperature of a calibrated model (bit finetune fits it on the validation set), in every format bitcli
# writes: this key in transformers' and timm's config.json (their libraries ignore it: their scores stay
# uncalibrated), bitcli's safetensors metadata and the ONNX metadata. An uncalibrated model has none (1).
TEMPERATURE_KEY = "bitcli_temperature"


def stored_temperature(value: Any, source: Path | str) -> float:
    """A stored temperature (None: absent, 1); one line naming the file when it is no number > 0."""
    if value is None:
        return 1.0
    temperature = check_temperature(value)
    if temperature is None:
        raise BitError(f"{source}: {TEMPERATURE_KEY} must be a number greater than 0, got {value!r}")
    return temperature


def temperature_record(ckpt: Checkpoint) -> dict[str, float]:
    """{TEMPERATURE_KEY: T} for a calibrated checkpoint, {} for one at temperature 1 (written as before)."""
    return {TEMPERATURE_KEY: ckpt.temperature} if ckpt.temperature != 1.0 else {}


# A multi-label model's per-class thresholds, beside the temperature in every format (transformers' own marker,
# config.json's problem_type "multi_label_classification", is written and read too: a transformers folder with
# it and no thresholds is multi-label at 0.5).
THRESHOLDS_KEY = "bitcli_thresholds"
MULTI_LABEL_PROBLEM = "multi_label_classification"


def stored_thresholds(value: Any, num_classes: int, source: Path | str) -> list[float] | None:
    """Stored thresholds (None: absent, a single-label model); one line naming the file when they are not
    one number in [0, 1] per class."""
    if value is None:
        return None
    if (
        not isinstance(value, list)
        or len(value) != num_classes
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0.0 <= v <= 1.0 for v in value)
    ):
        raise BitError(f"{source}: {THRESHOLDS_KEY} must be a list of {num_classes} numbers between 0 and 1")
    return [float(v) for v in value]


def thresholds_record(ckpt: Checkpoint) -> dict[str, Any]:
    """{THRESHOLDS_KEY: [...]} for a multi-label checkpoint, {} for a single-label one."""
    return {THRESHOLDS_KEY: ckpt.thresholds} if ckpt.thresholds is not None else {}


def stored_ws_eps(cfg: dict[str, Any], default: float, source: Path) -> float:
    value = cfg.get(WS_EPS_KEY, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise BitError(f"{source}: {WS_EPS_KEY} must be a small positive number, got {value!r}")
    return float(value)
