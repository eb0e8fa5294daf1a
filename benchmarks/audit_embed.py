"""Issue 23: `bit audit`'s embedding pass against `bit embed`, on the same JPEGs and the same model, and the
audit's resume after Ctrl-C from its embedding cache.

The model is the benchmarks' random-weight R50x1 (google/bit-50's layout, common.r50_checkpoint) with its
preprocessing set to --resolution (224: timm's resnetv2_50x1_bit.goog_in21k input; 448: google/bit-50's). The
images are common.realistic_images (crops of real photos, half of them upscaled to 1600 px: decoding is part of
the cost) saved as JPEGs into 4 class folders, and the first --first of them into a second folder set. Each
command runs as a process, in turns (embed, audit, then the other way round in the next round):

- `bit embed` over the class folders (-o .npy) and `bit audit` over the data set (no -o: the summary table),
  each with a fresh $BITCLI_CACHE (a cold cache), same --batch-size and --workers, on the whole set and on the
  first images: the difference of the two wall times is (images - first) at the steady rate, start-up, model
  load, cleanlab's import and the audit's fixed work after the pass cancelling out; the audit's own
  "embedded N images ... in X s" line (from the start of its run to the end of the pass) is differenced too,
  and so are the CPU seconds (user + system) of each process: the work per image, which other processes on a
  shared machine change far less than the wall time;
- the two passes alone, in one process, taking turns (in_process): the ratio with the least noise;
- the resume: an audit with a fresh cache interrupted by SIGINT (as Ctrl-C) part way through, the same audit
  again (it computes only the rest), and once more (everything from the cache).

    .venv/bin/python benchmarks/audit_embed.py [--images 300] [--resolution 224] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, load, machine, median, r50_checkpoint, realistic_images
from rss import run_measured

CLASSES = 4
EMBEDDED = re.compile(
    r"embedded (\d+) images? \((\d+) computed, (\d+) from the cache, (\d+) undecodable\) in ([\d.]+) s"
)
INTERRUPTED = re.compile(r"interrupted: (\d+) of (\d+) images? embedded")


def checkpoint(workdir: Path, resolution: int) -> Path:
    """common.r50_checkpoint's weights with a resize-and-crop of `resolution` pixels."""
    base = r50_checkpoint(workdir)
    if resolution == 448:
        return base
    folder = workdir / f"bit-50-random-{resolution}"
    if not (folder / "model.safetensors").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("model.safetensors", "config.json"):
            shutil.copy(base / name, folder / name)
        pre = json.loads((base / "preprocessor_config.json").read_text())
        pre["size"], pre["crop_size"] = {"shortest_edge": resolution}, {"height": resolution, "width": resolution}
        (folder / "preprocessor_config.json").write_text(json.dumps(pre))
    return folder


def data_sets(workdir: Path, n: int, first: int) -> tuple[Path, Path]:
    """(n JPEGs in CLASSES class folders, the first `first` of them in the same layout), made once."""
    full, head = workdir / f"audit-jpegs-{n}", workdir / f"audit-jpegs-{n}-first{first}"
    if not full.is_dir():
        tmp = workdir / "audit-jpegs.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        for i, im in enumerate(realistic_images(n, seed=2)):
            folder = tmp / f"class{i % CLASSES}"
            folder.mkdir(parents=True, exist_ok=True)
            im.save(folder / f"img{i:04d}.jpg", quality=90)
        tmp.rename(full)
    if not head.is_dir():
        for i in range(first):
            src = full / f"class{i % CLASSES}" / f"img{i:04d}.jpg"
            (head / src.parent.name).mkdir(parents=True, exist_ok=True)
            shutil.copy(src, head / src.parent.name / src.name)
    return full, head


def env(cache: Path) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "BITCLI_CACHE": str(cache)}


def measured(cmd: list[str], cache: Path) -> tuple[int, float, float, float, str]:
    """rss.run_measured, and the CPU seconds (user + system) the command used: the work it did, which the other
    processes of a shared machine change far less than its wall time."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    code, seconds, peak, err = run_measured(cmd, env=env(cache), cwd=ROOT)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return code, seconds, cpu, peak, err


def embed(model: Path, data: Path, a: argparse.Namespace, work: Path) -> dict:
    folders = [str(p) for p in sorted(data.iterdir())]
    cmd = [sys.executable, "-m", "bitcli", "embed", *folders, "--model", str(model), "--device", "cpu",
           "-b", str(a.batch_size), "--workers", str(a.workers), "-o", str(work / "embeddings.npy")]  # fmt: skip
    code, seconds, cpu, peak, err = measured(cmd, Path(tempfile.mkdtemp(dir=work)))
    if code != 0:
        raise RuntimeError(f"bit embed failed with exit {code}: {err}")
    return {"wall_s": seconds, "cpu_s": cpu, "peak_rss_mib": peak}


def audit_cmd(model: Path, data: Path, a: argparse.Namespace) -> list[str]:
    return [sys.executable, "-m", "bitcli", "audit", str(data), "--model", str(model), "--device", "cpu",
            "-b", str(a.batch_size), "--workers", str(a.workers)]  # fmt: skip


def audit(model: Path, data: Path, a: argparse.Namespace, cache: Path) -> dict:
    code, seconds, cpu, peak, err = measured(audit_cmd(model, data, a), cache)
    found = EMBEDDED.search(err)
    if code != 0 or found is None:
        raise RuntimeError(f"bit audit failed with exit {code}: {err}")
    return {"wall_s": seconds, "cpu_s": cpu, "peak_rss_mib": peak, "pass_s": float(found[5]),
            "computed": int(found[2]), "from_cache": int(found[3])}  # fmt: skip


def interrupted_audit(model: Path, data: Path, a: argparse.Namespace, work: Path, after_s: float) -> dict:
    """An audit with a fresh cache sent SIGINT (Ctrl-C) `after_s` seconds after its start: how far it got, and
    its cache. On a machine whose load changes, the guess can be wrong: an audit that ended before the signal is
    tried again with half the wait, one stopped before its pass began with one and a half times it."""
    for _ in range(6):
        cache = Path(tempfile.mkdtemp(dir=work))
        started = time.perf_counter()
        # SIGINT as the default in the child: a shell starts a background job (`benchmark &`) with SIGINT
        # ignored, which its children would inherit, and Python then installs no KeyboardInterrupt for it
        proc = subprocess.Popen(audit_cmd(model, data, a), env=env(cache), cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
        time.sleep(after_s)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate()
        found = INTERRUPTED.search(err)
        if proc.returncode == 130 and found is not None and int(found[1]) > 0:
            return {"wall_s": time.perf_counter() - started, "sigint_after_s": after_s, "done": int(found[1]),
                    "exit": proc.returncode, "line": err.strip().splitlines()[-1], "cache": cache}  # fmt: skip
        print(f"SIGINT after {after_s:.1f} s: exit {proc.returncode}, {err.strip().splitlines()[-1:]}", flush=True)
        after_s *= 0.5 if proc.returncode == 0 else 1.5
    raise RuntimeError("no SIGINT landed during the embedding pass")


def in_process(model: Path, data: Path, a: argparse.Namespace) -> dict:
    """Both passes in this process, taking turns, on the same engine: `bit embed`'s (bitcli.pipeline.run with the
    path decoder and Engine.features as the compute, what its run_report runs) and the audit's
    (bitcli.audit.embedding.embed_examples with an in-memory cache, every image computed). Images/s of each turn:
    no start-up or model load, and the turns are close in time, so a shared machine's load hurts both alike."""
    import torch

    from bitcli import pipeline
    from bitcli.audit.cache import EmbeddingCache
    from bitcli.audit.embedding import embed_examples
    from bitcli.audit.examples import audit_parts, gather
    from bitcli.engine import load_engine
    from bitcli.hub import load_checkpoint
    from bitcli.inputs import path_decoder
    from bitcli.sources.locate import Columns

    ckpt = load_checkpoint(str(model))
    engine = load_engine(ckpt, torch.device("cpu"), torch.float32, need_head=False)
    examples = gather(audit_parts(data, None, None, Columns(None, None)))
    paths = [str(examples.ref(i)) for i in range(len(examples))]
    decode = path_decoder(engine.preprocess)

    def embed_pass() -> None:
        def compute(batch: np.ndarray) -> list[np.ndarray]:  # bit embed's, without --tta and --normalize
            return list(engine.features(batch).cpu().numpy())

        for _ in pipeline.run(paths, decode, compute, batch_size=a.batch_size, workers=a.workers):
            pass

    def audit_pass() -> None:
        cache = EmbeddingCache(None, "in-memory", ckpt.config.num_features)
        embed_examples(examples, engine, cache, batch_size=a.batch_size, workers=a.workers)

    embed_pass()  # warm-up: first calls, page cache
    passes = {"embed": embed_pass, "audit": audit_pass}
    rates: dict[str, list[float]] = {k: [] for k in passes}
    for r in range(a.in_process_rounds):
        for name in ("embed", "audit") if r % 2 == 0 else ("audit", "embed"):
            started = time.perf_counter()
            passes[name]()
            rates[name].append(len(paths) / (time.perf_counter() - started))
        print(f"in process, round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f} img/s" for k, v in rates.items())
              + f"  load {load():.2f}", flush=True)  # fmt: skip
    per_round = [x / y for x, y in zip(rates["audit"], rates["embed"])]
    # the median of the rounds' ratios: a round's two turns share the machine's load of the moment
    return {"images_per_s": rates, "audit_over_embed_per_round": per_round, "audit_over_embed": median(per_round)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=300)
    p.add_argument("--first", type=int, default=32, help="images of the short runs (the fixed costs)")
    p.add_argument("--resolution", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2, help="rounds of the processes")
    p.add_argument("--in-process-rounds", type=int, default=6, help="rounds of the two passes in this process")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/bitcli-bench"))
    a = p.parse_args()
    a.workdir.mkdir(parents=True, exist_ok=True)
    model = checkpoint(a.workdir, a.resolution)
    full, head = data_sets(a.workdir, a.images, a.first)
    work = Path(tempfile.mkdtemp(prefix="audit-embed-"))
    load_before = load()
    passes = in_process(model, full, a)
    runs: dict[str, list[dict]] = {"embed": [], "embed_first": [], "audit": [], "audit_first": []}
    for r in range(a.rounds):
        order = ["embed", "audit"] if r % 2 == 0 else ["audit", "embed"]
        for kind in order:
            for data, key in ((full, kind), (head, f"{kind}_first")):
                cache = Path(tempfile.mkdtemp(dir=work))  # cold
                runs[key].append(embed(model, data, a, work) if kind == "embed" else audit(model, data, a, cache))
                print(f"round {r + 1} {key}: {runs[key][-1]}  load {load():.2f}", flush=True)
    extra = a.images - a.first

    def rate(kind: str, field: str) -> float:
        return extra / (median([x[field] for x in runs[kind]]) - median([x[field] for x in runs[f"{kind}_first"]]))

    rates = {"embed": rate("embed", "wall_s"), "audit": rate("audit", "wall_s"), "audit_pass": rate("audit", "pass_s"),
             "embed_per_cpu_s": rate("embed", "cpu_s"), "audit_per_cpu_s": rate("audit", "cpu_s")}  # fmt: skip
    # the resume: Ctrl-C about half way through the pass, then the same audit twice
    start_s = median([x["wall_s"] for x in runs["audit_first"]]) - a.first / rates["audit"]
    stopped = interrupted_audit(model, full, a, work, after_s=start_s + 0.5 * a.images / rates["audit"])
    resumed = audit(model, full, a, stopped["cache"])
    warm = audit(model, full, a, stopped.pop("cache"))
    print(json.dumps({
        "model": f"random-weight R50x1 (google/bit-50 layout), {a.resolution} px", "images": a.images,
        "first": a.first, "batch_size": a.batch_size, "workers": a.workers, "runs": runs,
        "in_process": passes, "images_per_s": rates, "audit_over_embed": rates["audit"] / rates["embed"],
        "audit_pass_over_embed": rates["audit_pass"] / rates["embed"],
        "audit_over_embed_cpu": rates["audit_per_cpu_s"] / rates["embed_per_cpu_s"],
        "resume": {"interrupted": stopped, "resumed": resumed, "warm": warm},
        "load_before": load_before, "load_after": load(), "machine": machine(),
    }, indent=1))  # fmt: skip
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
