"""`bit serve` under load, then under attack, on loopback only (127.0.0.1), bounded in time and count:

1. model only: R50x1 at 448 px, what `bit predict` runs (TorchEngine.logits) on a batch of --max-batch images,
   images/s in a process of its own, before and after the server phases (the figure the server is held to);
2. load: `bit serve` (a real process, random weights built locally) and --clients concurrent clients, each
   posting one JPEG at a time for --seconds: images/s, p50/p99 latency, failed requests, the server's RSS
   sampled every second;
3. faults: the same good clients for --fault-seconds while other clients send garbage, bodies over the cap
   (declared and streamed), bodies that stall, and hang up mid-body or while waiting: the good clients'
   throughput loss and failures, what the bad ones got, and whether the server is still answering;
4. SIGTERM: the server's exit code and time to exit.

    .venv/bin/python benchmarks/serve_load.py                  # the issue's run: 16 clients x 60 s, R50x1 448 px
    .venv/bin/python benchmarks/serve_load.py --quick          # a tiny model, 5 s phases: checks the script
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, load, machine, r50_checkpoint, realistic_images

HOST = "127.0.0.1"  # the only address this benchmark talks to


# ----------------------------------------------------------------------------------------------------------
# model only (a process of its own, the server not running)


def model_only_child(hf: str, batch: int, repeats: int) -> None:
    import numpy as np
    import torch

    from bitcli.engine import load_engine
    from bitcli.hub import load_checkpoint

    engine = load_engine(load_checkpoint(hf), torch.device("cpu"), torch.float32)  # what `bit predict` builds
    images = np.stack([engine.preprocess.to_uint8(im) for im in realistic_images(batch, seed=4)])
    engine.logits(images)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        engine.logits(images)
        times.append(time.perf_counter() - t0)
    print(json.dumps({"images_per_s": batch / statistics.median(times), "seconds": times}))


def model_only(hf: Path, batch: int, repeats: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--model-only-child", str(hf), "--max-batch", str(batch),
                          "--repeats", str(repeats)], capture_output=True, text=True, check=True, cwd=ROOT)  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------------------
# the server process


class Server:
    def __init__(self, model: Path, flags: list[str]) -> None:
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        cmd = [sys.executable, "-m", "bitcli", "serve", str(model), "--host", HOST, "--port", "0", *flags]
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        line = self.proc.stderr.readline()
        match = re.search(r" on http://127\.0\.0\.1:(\d+)/ ", line)
        if match is None:
            self.proc.kill()
            raise RuntimeError(f"bit serve did not start: {line}{self.proc.stderr.read()}")
        self.port = int(match[1])
        self.rss: list[tuple[float, float]] = []  # (seconds since start, MiB)
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()
        self.start = time.monotonic()

    def _sample(self) -> None:
        t0 = time.monotonic()
        while not self._stop.wait(1.0):
            try:
                status = Path(f"/proc/{self.proc.pid}/status").read_text()
            except OSError:
                return
            rss = re.search(r"VmRSS:\s+(\d+)", status)
            if rss is None:  # the process has exited (a zombie has no VmRSS)
                return
            kib = int(rss[1])
            self.rss.append((time.monotonic() - t0, kib / 1024))

    def alive(self) -> bool:
        try:
            return request(self.port, "GET", "/healthz", None)[0] == 200
        except OSError:
            return False

    def stop(self) -> dict:
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=120)
        self._stop.set()
        return {"exit_code": code, "seconds_to_exit": time.monotonic() - t0, "stderr": self.proc.stderr.read()[-2000:]}


def request(port: int, method: str, path: str, body: bytes | None, conn=None) -> tuple[int, bytes]:
    own = conn is None
    conn = conn or http.client.HTTPConnection(HOST, port, timeout=120)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "image/jpeg"} if body else {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        if own:
            conn.close()


# ----------------------------------------------------------------------------------------------------------
# clients


class GoodClients:
    """`n` clients, each posting one image at a time (keep-alive) until `deadline`; every answer is checked."""

    def __init__(self, port: int, images: list[bytes], n: int) -> None:
        self.port, self.images, self.n = port, images, n
        self.results: list[tuple[float, float, bool]] = []  # (start, end, ok)
        self.errors: Counter = Counter()
        self._lock = threading.Lock()

    def run(self, seconds: float) -> dict:
        t0 = time.monotonic()
        deadline = t0 + seconds
        threads = [threading.Thread(target=self._client, args=(i, deadline)) for i in range(self.n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        ok = [r for r in self.results if r[2]]
        end = max((r[1] for r in self.results), default=t0)
        latencies = sorted(r[1] - r[0] for r in ok)
        return {
            "seconds": end - t0,
            "requests": len(self.results),
            "ok": len(ok),
            "failed": len(self.results) - len(ok),
            "failures": dict(self.errors),
            "images_per_s": len(ok) / (end - t0),
            "latency_p50_s": _percentile(latencies, 50),
            "latency_p99_s": _percentile(latencies, 99),
            "latency_max_s": latencies[-1] if latencies else None,
        }

    def _client(self, i: int, deadline: float) -> None:
        conn = http.client.HTTPConnection(HOST, self.port, timeout=120)
        k = i
        while time.monotonic() < deadline:
            body = self.images[k % len(self.images)]
            k += self.n
            start = time.monotonic()
            try:
                status, data = request(self.port, "POST", "/v1/predict", body, conn)
                ok = status == 200 and len(json.loads(data)[0]["predictions"]) == 5
                why = None if ok else f"HTTP {status}: {data[:120]!r}"
            except (OSError, http.client.HTTPException, ValueError, KeyError) as exc:
                ok, why = False, f"{type(exc).__name__}: {exc}"
                conn.close()
                conn = http.client.HTTPConnection(HOST, self.port, timeout=120)
            with self._lock:
                self.results.append((start, time.monotonic(), ok))
                if why:
                    self.errors[why] += 1
        conn.close()


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]


def _raw(port: int) -> socket.socket:
    return socket.create_connection((HOST, port), timeout=60)


def _status(sock: socket.socket) -> str:
    try:
        head = sock.recv(4096)
    except OSError as exc:
        return type(exc).__name__
    return head.split(b" ", 2)[1].decode() if head.startswith(b"HTTP/") else ("closed" if not head else "garbled")


def _post_head(length: int | None) -> bytes:
    framing = f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    return f"POST /v1/predict HTTP/1.1\r\nHost: {HOST}\r\n{framing}\r\n\r\n".encode()


class FaultClients:
    """Misbehaving clients, each kind on its own threads, looping until the deadline with a short pause."""

    def __init__(self, port: int, image: bytes, max_body: int) -> None:
        self.port, self.image, self.max_body = port, image, max_body
        self.outcomes: dict[str, Counter] = {}
        self._lock = threading.Lock()

    def _record(self, kind: str, outcome: str) -> None:
        with self._lock:
            self.outcomes.setdefault(kind, Counter())[outcome] += 1

    def garbage(self) -> str:
        body = random.randbytes(random.randint(1, 200_000))
        try:
            return str(request(self.port, "POST", "/v1/predict", body)[0])
        except (OSError, http.client.HTTPException) as exc:
            return type(exc).__name__

    def oversize_declared(self) -> str:
        with _raw(self.port) as sock:
            sock.sendall(_post_head(self.max_body + 10_000_000))
            return _status(sock)

    def oversize_streamed(self) -> str:
        """Chunks of 1 MB past the cap: the server answers 413 and closes while we still send."""
        with _raw(self.port) as sock:
            sock.sendall(_post_head(None))
            chunk = b"100000\r\n" + b"\x00" * 0x100000 + b"\r\n"
            try:
                for _ in range(self.max_body // 0x100000 + 5):
                    sock.sendall(chunk)
            except OSError:
                pass
            return _status(sock)

    def slow(self) -> str:
        """A byte every half second, until the server's request timeout answers (or the phase ends)."""
        with _raw(self.port) as sock:
            sock.sendall(_post_head(len(self.image)))
            sock.settimeout(0.5)  # the pace: each byte is followed by half a second of listening
            for byte in self.image:
                if self._deadline_passed():
                    return "phase ended"
                try:
                    sock.sendall(bytes([byte]))
                    head = sock.recv(4096)
                except TimeoutError:
                    continue
                except OSError as exc:
                    return type(exc).__name__
                return head.split(b" ", 2)[1].decode() if head.startswith(b"HTTP/") else "closed"
            return "sent it all"

    def hang_up_mid_body(self) -> str:
        with _raw(self.port) as sock:
            sock.sendall(_post_head(len(self.image)) + self.image[: len(self.image) // 2])
        return "hung up"

    def hang_up_waiting(self) -> str:
        with _raw(self.port) as sock:
            sock.sendall(_post_head(len(self.image)) + self.image)
        return "hung up"

    def _deadline_passed(self) -> bool:
        return time.monotonic() > self.deadline

    def run(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds
        kinds = {"garbage": self.garbage, "oversize_declared": self.oversize_declared,
                 "oversize_streamed": self.oversize_streamed, "slow": self.slow,
                 "hang_up_mid_body": self.hang_up_mid_body, "hang_up_waiting": self.hang_up_waiting}  # fmt: skip

        def loop(kind: str) -> None:
            while not self._deadline_passed():
                self._record(kind, kinds[kind]())
                time.sleep(0.2)  # bounded: a few requests a second per client

        self.threads = [threading.Thread(target=loop, args=(k,), daemon=True) for k in kinds for _ in range(2)]
        for t in self.threads:
            t.start()

    def join(self) -> dict:
        for t in self.threads:
            t.join(120)
        return {k: dict(v) for k, v in self.outcomes.items()}


# ----------------------------------------------------------------------------------------------------------


def jpegs(n: int, short_side: int) -> list[bytes]:
    """n realistic photos as JPEG bytes, resized so that their short side is `short_side` (what a client of an
    image API usually sends: the model's own resize is then small)."""
    from PIL import Image

    out = []
    for im in realistic_images(n, seed=6):
        scale = short_side / min(im.size)
        im = im.convert("RGB").resize((round(im.width * scale), round(im.height * scale)), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def tiny_model(workdir: Path) -> Path:
    from conftest import BIT50_PREPROCESSOR, TINY_LABELS, save_hf_model

    folder = workdir / "tiny-serve"
    if not (folder / "model.safetensors").is_file():
        pre = {**BIT50_PREPROCESSOR, "size": {"shortest_edge": 64}, "crop_size": {"height": 64, "width": 64}}
        save_hf_model(folder, pre, embedding_size=16, hidden_sizes=[32, 64], depths=[1, 1], num_groups=8,
                      id2label=dict(enumerate(TINY_LABELS)), label2id={n: i for i, n in enumerate(TINY_LABELS)})  # fmt: skip
    return folder


def rss_summary(samples: list[tuple[float, float]], phases: dict[str, tuple[float, float]]) -> dict:
    out = {}
    for name, (a, b) in phases.items():
        values = [m for t, m in samples if a <= t <= b]
        if values:
            out[name] = {"first_mib": values[0], "last_mib": values[-1], "max_mib": max(values), "samples": len(values)}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--seconds", type=float, help="the load phase (default 60; 5 with --quick)")
    p.add_argument("--fault-seconds", type=float, help="the fault phase (default 30; 5 with --quick)")
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--max-wait-ms", type=float, default=10)
    p.add_argument("--timeout-s", type=float, default=30, help="the server's --timeout-s (slow clients meet it)")
    p.add_argument("--repeats", type=int, default=3, help="model-only rounds")
    p.add_argument("--quick", action="store_true", help="a tiny model at 64 px (and 5 s phases unless given)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/bitcli-bench"))
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--model-only-child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.model_only_child:
        model_only_child(args.model_only_child, args.max_batch, args.repeats)
        return
    args.seconds = args.seconds or (5 if args.quick else 60)
    args.fault_seconds = args.fault_seconds or (5 if args.quick else 30)
    args.workdir.mkdir(parents=True, exist_ok=True)
    results: dict = {"machine": machine(), "load_before": os.getloadavg(), "settings": {
        k: getattr(args, k) for k in ("clients", "seconds", "fault_seconds", "max_batch", "max_wait_ms", "timeout_s", "quick")}}  # fmt: skip
    print(json.dumps(results), flush=True)
    model = tiny_model(args.workdir) if args.quick else r50_checkpoint(args.workdir)
    images = jpegs(32, 64 if args.quick else 448)

    results["model_only_before"] = model_only(model, args.max_batch, args.repeats)
    print(f"model only: {results['model_only_before']['images_per_s']:.3f} img/s  load {load():.2f}", flush=True)

    server = Server(model, ["--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms),
                            "--timeout-s", str(args.timeout_s), "--device", "cpu"])  # fmt: skip
    try:
        GoodClients(server.port, images, args.clients).run(0.1)  # warm-up: one round of batches of every size
        GoodClients(server.port, images, args.clients).run(2 if args.quick else 10)
        t_load = time.monotonic() - server.start
        results["load"] = GoodClients(server.port, images, args.clients).run(args.seconds)
        print(f"load: {json.dumps(results['load'])}  load avg {load():.2f}", flush=True)
        t_fault = time.monotonic() - server.start
        faults = FaultClients(server.port, images[0], max_body=50_000_000)
        faults.run(args.fault_seconds)
        results["fault_good"] = GoodClients(server.port, images, args.clients).run(args.fault_seconds)
        results["fault_bad"] = faults.join()
        t_end = time.monotonic() - server.start
        results["alive_after_faults"] = server.alive()
        results["loss_under_faults"] = 1 - results["fault_good"]["images_per_s"] / results["load"]["images_per_s"]
        print(f"faults: good {json.dumps(results['fault_good'])}\n  bad {json.dumps(results['fault_bad'])}", flush=True)
        results["rss"] = rss_summary(server.rss, {"load": (t_load, t_fault), "faults": (t_fault, t_end)})
        results["rss_samples"] = server.rss
    finally:
        results["sigterm"] = server.stop()
    print(f"rss: {json.dumps(results['rss'])}  sigterm: exit {results['sigterm']['exit_code']} after "
          f"{results['sigterm']['seconds_to_exit']:.1f} s", flush=True)  # fmt: skip

    results["model_only_after"] = model_only(model, args.max_batch, args.repeats)
    reference = (results["model_only_before"]["images_per_s"] + results["model_only_after"]["images_per_s"]) / 2
    results["ratio_to_model_only"] = results["load"]["images_per_s"] / reference
    results["load_after"] = os.getloadavg()
    print(f"model only after: {results['model_only_after']['images_per_s']:.3f} img/s; served / model only: "
          f"{results['ratio_to_model_only']:.3f}", flush=True)  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
