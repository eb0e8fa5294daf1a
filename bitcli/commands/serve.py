"""`bit serve MODEL`: the model behind an HTTP JSON API (bitcli.server) until SIGTERM or Ctrl-C.

The socket is bound first (a taken port or a bad --host fails before the model loads), then the model is
loaded and run once on a blank image (the first forward pass sets up kernels: no client waits for that), then
the URL is printed once the server accepts connections.
"""

from __future__ import annotations

import os

import numpy as np

from bitcli.engine import Engine, load_engine
from bitcli.errors import UsageError
from bitcli.hub import load_checkpoint
from bitcli.runtime import resolve_device, resolve_precision
from bitcli.server.app import build_app
from bitcli.server.listen import bind, is_loopback, serve, url_of
from bitcli.tool_options import ServeOptions
from bitcli.ui import display, log


def run(opts: ServeOptions) -> int:
    """The whole command; returns the exit code (0 after SIGTERM, 130 after Ctrl-C)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UsageError("bit serve is one process; to serve from several, run one per port (docs/serve.md)")
    device = resolve_device(opts.device)
    dtype = resolve_precision(opts.precision, device)
    sock = bind(opts.host, opts.port)
    try:
        engine = load_engine(load_checkpoint(opts.model, opts.revision), device, dtype)
        _warm_up(engine)
    except BaseException:
        sock.close()
        raise
    if not is_loopback(sock.getsockname()[0]):
        log(f"warning: listening on {opts.host}: other machines can reach this API, which has no authentication "
            "or TLS; put a reverse proxy in front of it (docs/serve.md)")  # fmt: skip
    url = url_of(sock)

    def ready() -> None:
        log(f"serving {display(engine.source)} on {url} (POST /v1/predict, /v1/embed; GET /v1/model, /healthz; "
            "the upload page at /); SIGTERM or Ctrl-C stops")  # fmt: skip

    return serve(build_app(engine, opts), sock, opts, ready)


def _warm_up(engine: Engine) -> None:
    """One forward pass of a blank image at the model's input size (the crop; 224 px for a model without one)."""
    crop = engine.preprocess.crop or (224, 224)
    engine.logits(np.zeros((1, crop[0], crop[1], 3), dtype=np.uint8))
