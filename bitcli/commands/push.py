"""`bit push SRC OWNER/NAME`: publish a fine-tuned run (or any model) on the Hugging Face Hub, in one commit, as
a transformers folder that `transformers.pipeline("image-classification", model="OWNER/NAME")` loads without
bitcli: config.json (with id2label), model.safetensors and preprocessor_config.json, written by bitcli's own
transformers writer; the model card README.md (bitcli.modelcard); the run's pictures; model.onnx with --onnx.

The files are staged in a temporary folder and only the names in UPLOADED ever leave it: a run's training state
(checkpoint.safetensors), metrics.jsonl, summary.json, its plan file and anything else in the folder stay home.
Local checks come first (the token, the source, the export), the network last (bitcli.hub_upload).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from bitcli import extras
from bitcli.errors import BitError
from bitcli.hub_upload import check_online, hub_token, push_files
from bitcli.hubnames import commit_text
from bitcli.tool_options import PushOptions
from bitcli.ui import display, human_size, log, visible

if TYPE_CHECKING:
    from bitcli.formats import Checkpoint
    from bitcli.modelcard import RunRecord

CARD = "README.md"
MODEL_FILES = ("config.json", "model.safetensors", "preprocessor_config.json")  # bitcli.formats.hf.write's
ONNX_FILE = "model.onnx"
PICTURES = ("curves.png", "confusion.png")
UPLOADED = (CARD, *MODEL_FILES, ONNX_FILE, *PICTURES)  # every name a push may upload, and nothing else


def run(opts: PushOptions) -> None:
    token = None
    if not opts.dry_run:
        check_online()
        token = hub_token()
    if opts.onnx:
        extras.require("onnx", "--onnx")
    # torch comes with these: only after the checks above, which a missing token or extra fails in a blink.
    from bitcli.hub import load_checkpoint
    from bitcli.modelcard import RunRecord

    ckpt = load_checkpoint(opts.src)
    if ckpt.graph is not None:
        raise BitError(
            f"{visible(display(opts.src))}: an ONNX export cannot be pushed (its weights are compiled into the graph, "
            "and the Hub repo needs them as a transformers folder); push the checkpoint or run folder it was "
            "exported from, with --onnx to upload its ONNX export too"
        )
    path = Path(opts.src).expanduser()
    record = RunRecord.read(path.parent if path.name == "model.safetensors" and path.is_file() else path)
    with tempfile.TemporaryDirectory(prefix="bitcli-push-") as tmp:
        files = stage(ckpt, record, Path(tmp) / "upload", opts)
        if opts.dry_run or token is None:
            show_dry_run(files, opts)
            return
        summary, description = commit_text(opts.commit_message or f"Upload {opts.repo.split('/')[1]} with bit push")
        # A name bit push manages that this push lacks (model.onnx without --onnx) would be an earlier model's.
        stale = [name for name in (ONNX_FILE, *PICTURES) if name not in {f.name for f in files}]
        pushed = push_files(files, opts.repo, token=token, branch=opts.revision, private=opts.private, message=summary,
                            description=description, remove=stale)  # fmt: skip
    names = ", ".join(f.name for f in files)
    log(f"pushed {len(files)} files to {opts.repo} ({pushed.revision}) in one commit: {names}")
    if pushed.removed:
        log(f"removed {', '.join(pushed.removed)}: an earlier push's, not part of this model (the history keeps them)")
    print(pushed.commit_url, flush=True)


def stage(ckpt: Checkpoint, record: RunRecord | None, folder: Path, opts: PushOptions) -> list[Path]:
    """Write the repo's files into `folder` (new): the model's transformers files, model.onnx with --onnx, the
    run's pictures, and last the card, which lists them. Returns them, README.md first."""
    from bitcli.formats import hf
    from bitcli.modelcard import CardInput, model_card

    hf.write(ckpt, folder)
    if opts.onnx:
        import torch

        from bitcli.export import write_onnx

        write_onnx(ckpt, folder / ONNX_FILE, torch.float32)
    for name, data in record.pictures.items() if record is not None else ():
        (folder / name).write_bytes(data)  # as RunRecord.read checked them: regular PNG files inside the run
    names = tuple(sorted(p.name for p in folder.iterdir()))
    card = CardInput(repo_id=opts.repo, ckpt=ckpt, src=opts.src, run=record, license=opts.license, files=names)
    (folder / CARD).write_text(model_card(card), encoding="utf-8")
    files = [folder / CARD, *(folder / name for name in names)]
    stray = [f.name for f in files if f.name not in UPLOADED]
    if stray:  # a writer that starts writing another file must be added to UPLOADED on purpose
        raise BitError(f"internal: refusing to upload unlisted files {stray}")
    return files


def show_dry_run(files: list[Path], opts: PushOptions) -> None:
    branch = opts.revision or "main"
    width = max(len(f.name) for f in files)
    lines = [f"bit push would upload {len(files)} files to {opts.repo} ({branch}) in one commit:"]
    lines += [f"  {f.name:<{width}}  {human_size(f.stat().st_size):>9}" for f in files]
    lines += ["", f"{CARD}:", "", files[0].read_text(encoding="utf-8")]
    sys.stdout.write("\n".join(lines))
    sys.stdout.flush()
    log(f"dry run: nothing uploaded; {visible(display(opts.src))} would go to {opts.repo}")
