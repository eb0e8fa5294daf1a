"""`bit embed`: every image's pre-logits features (Engine.features: the final GroupNorm + ReLU, then global
average pooling; transformers' BitModel pooler_output), in input order, from any checkpoint, with or without
a head. The arguments, decoding, batching, error rows, exit codes and the torchrun split are `bit predict`'s
(bitcli.inputs, bitcli.pipeline: Report, run_report, exit_code); only what is computed and written differs.

Outputs (EmbedFormat):
- .safetensors: tensor `embeddings`, float32 [N, D], one row per input that was embedded, in input order;
  metadata `paths` (JSON list of those N paths) and `errors` (JSON list of {"path", "error"}, the failed inputs).
- .npy: the same [N, D] array, and its N paths in FILE.paths.txt, one per line (both written, or neither).
- .jsonl: one {"path", "embedding"} (or {"path", "error"}) per input, streamed as soon as it and every line
  before it are done; nothing is held.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bitcli.distributed import from_main, process_group
from bitcli.engine import load_engine, view_features
from bitcli.errors import UsageError
from bitcli.formats.raw import write_safetensors
from bitcli.formats.tensors import TensorRef
from bitcli.gpu_decode import file_bytes, for_engine
from bitcli.hub import load_checkpoint
from bitcli.inputs import Input, expand_inputs, path_decoder
from bitcli.options import EmbedFormat, EmbedOptions, paths_file
from bitcli.pipeline import Report, drop, exit_code, run_report
from bitcli.render import json_lines, print_lines
from bitcli.runtime import resolve_precision
from bitcli.ui import display, visible
from bitcli.urls import downloads
from bitcli.writes import atomic_write, refuse_replacing_input, write_together

# The safetensors reader refuses a header over 100 MB (safetensors' MAX_HEADER_SIZE); the paths live there.
MAX_SAFETENSORS_PATHS_BYTES = 90_000_000


@dataclass(frozen=True)
class Embedded:
    """One input's row: its embedding, or why it has none."""

    path: str  # as the user gave it, made printable (ui.display)
    embedding: np.ndarray | None = None  # float32 [D]
    error: str | None = None

    def to_dict(self) -> dict:
        if self.error is not None:
            return {"path": self.path, "error": self.error}
        assert self.embedding is not None  # a row without an error has its embedding
        return {"path": self.path, "embedding": self.embedding.tolist()}  # float32 values, exactly, as JSON numbers


class Table:
    """The embedded rows as one float32 [N, D] array, allocated once for every input (np.empty: the rows of
    inputs that fail are never touched, so they cost no memory), with their paths and the failed inputs."""

    def __init__(self, inputs: int, dim: int) -> None:
        self.vectors = np.empty((inputs, dim), dtype=np.float32)
        self.paths: list[str] = []
        self.errors: list[dict] = []

    def add(self, rows: list[Embedded]) -> None:
        for row in rows:
            if row.error is not None:
                self.errors.append(row.to_dict())
            else:
                self.vectors[len(self.paths)] = row.embedding
                self.paths.append(row.path)

    @property
    def embeddings(self) -> np.ndarray:
        return self.vectors[: len(self.paths)]  # a prefix of rows: still one contiguous array, not a copy


def run(opts: EmbedOptions) -> int:
    """The whole command; returns the exit code (0, 1 when an input failed, 130 on Ctrl-C)."""
    with process_group(opts.device) as (info, device):
        dtype = resolve_precision(opts.precision, device)
        report: Report[Embedded] = Report(from_main(lambda: expand_inputs(opts.images, opts.recursive), info), Embedded)
        check_listable(report.inputs, opts)  # before the model loads: the output could not hold these paths
        check_not_input(report.inputs, opts)
        ckpt = load_checkpoint(opts.model, opts.revision)
        engine = load_engine(ckpt, device, dtype, need_head=False)  # features exist with or without a head

        tta = str(opts.tta) if opts.tta is not None else None

        def embed(batch: np.ndarray) -> list[np.ndarray]:
            vectors = view_features(engine, batch, tta)  # with --tta: the mean over the views
            if opts.normalize:
                vectors = F.normalize(vectors, dim=1)  # unit length; an all-zero vector stays zero
            return list(vectors.cpu().numpy())

        decode = path_decoder(engine.preprocess, downloads(opts.max_download_mb))
        on_device = for_engine(engine, decode, file_bytes)

        def run_all(emit: Callable[[list[Embedded]], None]) -> bool:
            return run_report(report, decode, embed, batch_size=opts.batch_size, workers=opts.workers, emit=emit,
                              info=info, verb="embedding", on_device=on_device)  # fmt: skip

        if not info.main:
            interrupted = run_all(drop)
        elif opts.format == EmbedFormat.jsonl:
            interrupted = _stream(opts.output, run_all)
        else:
            assert opts.output is not None  # embed_format: only jsonl goes to stdout
            table = Table(len(report.inputs), ckpt.config.num_features)
            interrupted = run_all(table.add)
            _write_table(table, opts.format, opts.output)
        return exit_code(report, interrupted, info, opts.output)


def _stream(output: Path | None, run_all: Callable[[Callable[[list[Embedded]], None]], bool]) -> bool:
    """JSON lines onto stdout, or into `output` as they come (renamed into place when the run ends)."""
    if output is None:
        return run_all(print_lines)
    interrupted = False

    def fill(f) -> None:
        nonlocal interrupted
        interrupted = run_all(lambda rows: f.write(json_lines(rows).encode("utf-8")))

    atomic_write(output, fill)
    return interrupted


def _write_table(table: Table, fmt: EmbedFormat, output: Path) -> None:
    vectors = table.embeddings
    if fmt == EmbedFormat.safetensors:
        metadata = {
            "paths": json.dumps(table.paths, ensure_ascii=False),
            "errors": json.dumps(table.errors, ensure_ascii=False),
        }
        tensor = TensorRef(vectors.shape, torch.float32, lambda: torch.from_numpy(vectors))  # written without a copy
        write_safetensors(output, {"embeddings": tensor}, metadata)
        return
    listing = "".join(p + "\n" for p in table.paths).encode("utf-8")
    write_together(  # an array without its paths (or paths without their array) would be misread
        [(output, lambda f: np.save(f, vectors, allow_pickle=False)), (paths_file(output), lambda f: f.write(listing))]
    )


def check_not_input(inputs: list[Input], opts: EmbedOptions) -> None:
    """Refuse (exit 2, nothing run) an --output, or the .paths.txt written beside a .npy, that is one of the images."""
    paths = [i.path for i in inputs if i.error is None]
    refuse_replacing_input("--output", opts.output, paths)
    if opts.format == EmbedFormat.npy and opts.output is not None:
        refuse_replacing_input(f"--output {display(opts.output)}: its paths file", paths_file(opts.output), paths)


def check_listable(inputs: list[Input], opts: EmbedOptions) -> None:
    """Refuse (exit 2, nothing run) paths that the chosen file cannot list: a path with a line break in a
    one-path-per-line .paths.txt (it would read as two paths), or more paths than a safetensors header holds."""
    paths = [display(i.path) for i in inputs if i.error is None]
    if opts.format == EmbedFormat.npy:
        assert opts.output is not None  # embed_format: .npy goes only to a file
        for path in paths:
            if path.splitlines() != [path]:  # \n, \r and every other break that str.splitlines() splits at
                raise UsageError(
                    f"{visible(path)}: this path holds a line break, so {display(paths_file(opts.output))} could not "
                    "list it one per line; write .safetensors or .jsonl instead (they keep paths as JSON strings)"
                )
    if (
        opts.format == EmbedFormat.safetensors
        and sum(len(p.encode("utf-8")) + 4 for p in paths) > MAX_SAFETENSORS_PATHS_BYTES
    ):
        raise UsageError(
            f"{len(paths)} paths do not fit in a safetensors header (at most about 90 MB of paths); "
            "write .npy (paths in .paths.txt) or .jsonl instead"
        )
