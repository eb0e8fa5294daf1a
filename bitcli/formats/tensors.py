"""Lazy tensor references, and how a format names bitcli's tensors and lays out their axes (a `Layout`).

bitcli's names are those of `BitModel.state_dict()`. Every format is one Layout: a pure key map both ways and
at most two axis changes (conv kernels stored in another axis order, the Linear head stored as a 1x1 conv).
Readers, writers and error messages all go through it, so each format's transforms are written once.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import cast

import torch

from bitcli.errors import BitError

HEAD = "head.weight"  # the classifier: a Linear [classes, features] in bitcli


@dataclass(frozen=True)
class TensorRef:
    """A tensor that is read from disk only when `load()` is called."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    load: Callable[[], torch.Tensor]


def few(items: list[str], n: int = 4) -> str:
    """The first n items of a list for a one-line message, and how many more there are."""
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


@dataclass(frozen=True)
class Layout:
    """How one format names bitcli's tensors and lays out their axes."""

    description: str  # the layout, named in messages ("... not a BiT checkpoint in <description>")
    source_key: Callable[[str], str | None]  # bitcli key -> this format's key (None: the format has no name for it)
    bitcli_key: Callable[[str], str | None]  # this format's key -> bitcli key (None: not a BiT tensor)
    kernel_axes: tuple[int, ...] | None = None  # 4-d kernels stored with OIHW's axes in this order (HWIO: 2, 3, 1, 0)
    conv_head: bool = False  # the head [N, C] stored as a 1x1 conv [N, C, 1, 1] (then kernel_axes apply to it too)
    noun: str = "tensor"  # what the format calls its entries, for messages
    thing: str = "BiT checkpoint"

    def key(self, bitcli_key: str) -> str:
        """This format's name for a bitcli key, for messages (the bitcli key where the format has none)."""
        return self.source_key(bitcli_key) or bitcli_key

    def from_bitcli(self, key: str, t: torch.Tensor) -> torch.Tensor:
        """bitcli's tensor `key` as this format stores it."""
        if self.conv_head and key == HEAD and t.ndim == 2:
            t = t.reshape(*t.shape, 1, 1)
        if self.kernel_axes and t.ndim == 4:
            t = t.permute(self.kernel_axes)
        return t

    def to_bitcli(self, key: str, t: torch.Tensor) -> torch.Tensor:
        """The inverse of from_bitcli: this format's tensor as bitcli's tensor `key`."""
        if self.kernel_axes and t.ndim == 4:
            t = t.permute(tuple(sorted(range(4), key=self.kernel_axes.__getitem__)))  # the inverse permutation
        if self.conv_head and key == HEAD and t.ndim == 4 and t.shape[2:] == (1, 1):
            t = t.reshape(t.shape[:2])
        return t

    def shape(self, key: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape this format stores bitcli's tensor `key` of `shape` in."""
        return tuple(self.from_bitcli(key, torch.empty(shape, device="meta")).shape)

    def ref_from_bitcli(self, key: str, ref: TensorRef) -> TensorRef:
        return self._relaid(self.from_bitcli, key, ref)

    def ref_to_bitcli(self, key: str, ref: TensorRef) -> TensorRef:
        return self._relaid(self.to_bitcli, key, ref)

    def _relaid(self, change: Callable[[str, torch.Tensor], torch.Tensor], key: str, ref: TensorRef) -> TensorRef:
        # Shapes come from the same code as the tensors, run on the meta device (no data).
        shape = tuple(change(key, torch.empty(ref.shape, device="meta")).shape)
        if shape == tuple(ref.shape) and not (self.kernel_axes and len(shape) == 4):
            return ref  # nothing moves
        return TensorRef(shape, ref.dtype, lambda: change(key, ref.load()).contiguous())

    def map_keys(self, source: str, keys: Iterable[str]) -> dict[str, str]:
        """bitcli key -> this format's key, for every key of a file; a key that does not map is an error."""
        out, unknown = {}, []
        for key in keys:
            new = self.bitcli_key(key)
            if new is None:
                unknown.append(key)
            else:
                out[new] = key
        if unknown:
            raise BitError(
                f"{source}: unknown {self.noun} name(s) {few(sorted(unknown))}; not a {self.thing} in {self.description}"
            )
        return out

    def refs_to_bitcli(self, source: str, refs: dict[str, TensorRef]) -> dict[str, TensorRef]:
        """A file's tensors under bitcli's names and in bitcli's layout (still lazy)."""
        return {new: self.ref_to_bitcli(new, refs[old]) for new, old in self.map_keys(source, refs).items()}

    def refs_from_bitcli(self, source: str, tensors: dict[str, TensorRef]) -> dict[str, TensorRef]:
        """bitcli's tensors under this format's names and in its layout (still lazy), for a writer."""
        unnamed = sorted(key for key in tensors if self.source_key(key) is None)
        if unnamed:
            raise BitError(f"{source}: {self.description} has no name for {few(unnamed)}; convert to another format")
        return {cast(str, self.source_key(key)): self.ref_from_bitcli(key, ref) for key, ref in tensors.items()}


# ----------------------------------------------------------------------------------------------------------
# Key maps written as regex rules (source pattern -> bitcli name), inverted once for the other direction


Rules = list[tuple[re.Pattern, str]]


def renaming(pairs: list[tuple[str, str]]) -> tuple[Callable[[str], str | None], Callable[[str], str | None]]:
    """(source key -> bitcli key, bitcli key -> source key) from anchored prefix rules with at most \\1 and \\2
    standing for digit groups, e.g. (r"^stages\\.(\\d+)\\.blocks\\.(\\d+)\\.", r"stages.\\1.units.\\2.")."""
    fwd = [(re.compile(a), b) for a, b in pairs]
    back = [(re.compile(_invert(b)), _invert_repl(a)) for a, b in pairs]
    return (lambda key: rename(key, fwd)), (lambda key: rename(key, back))


def rename(key: str, rules: Rules) -> str | None:
    for pattern, repl in rules:
        if pattern.match(key):
            return pattern.sub(repl, key, count=1)
    return None


def _invert(repl: str) -> str:
    return "^" + re.sub(r"\\(\d)", r"(\\d+)", repl.replace(".", r"\."))


def _invert_repl(pattern: str) -> str:
    out, group = pattern.lstrip("^"), 0
    while r"(\d+)" in out:
        group += 1
        out = out.replace(r"(\d+)", f"\\{group}", 1)
    return out.replace(r"\.", ".")


BITCLI = Layout("bitcli's layout", lambda key: key, lambda key: key)
