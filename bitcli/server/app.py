"""The HTTP JSON API of `bit serve`, as a Starlette app over an engine:

    POST /v1/predict   one raw image body, or several as multipart/form-data; ?top_k=K (1..classes), ?name=
    POST /v1/embed     the same bodies; ?normalize=true for unit-length vectors
    GET  /v1/model     labels, preprocessing, precision, device, source and the server's limits
    GET  /healthz      {"status": "ok", ...}
    GET  /             a small upload page (bitcli/server/page.html)

Answers are `bit predict -f json`'s rows (bitcli.render.Row) and `bit embed -f jsonl`'s objects, one per image
in the request's order, each failure an error row in its place, decoded by the rules of `bit predict`
(preprocess.load_image on the bytes: bombs, modes, EXIF) with its error texts (pipeline.failure). HTTP 200 when
any image was answered, 400 when none could be decoded; every other refusal is {"error": "one line"}: 400 (a
bad query or body), 404/405, 408 (the body did not arrive in time), 413 (body or image count over the limit),
429 with Retry-After (the queue is full), 504 (no answer in time), 500. A refusal that may leave part of the
body unread (400, 408, 413; 404/405 of a request with a body) closes the connection. (A request whose line and
headers do not arrive in time is answered by the connection's protocol: bitcli.server.protocol.)

Decoding runs on a thread pool (a large image never blocks the event loop), the model on the batcher's one
thread (bitcli.server.batcher): concurrent requests share its forward passes.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
from collections.abc import AsyncIterator, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from bitcli.engine import Engine, over_thresholds, top_k
from bitcli.errors import BitError, one_line
from bitcli.onnx_engine import OnnxEngine
from bitcli.pipeline import failure
from bitcli.preprocess import load_image
from bitcli.render import Row
from bitcli.server.batcher import Batcher
from bitcli.server.bodies import Part, RequestError, read_body, split_images
from bitcli.tool_options import ServeOptions
from bitcli.ui import display, mb_to_bytes

PRECISIONS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
ENDPOINTS = "POST /v1/predict, POST /v1/embed, GET /v1/model, GET /healthz, GET /"
# The page loads nothing from anywhere: its script and style are inline, it talks only to this server.
PAGE_POLICY = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; "
               "img-src blob: data:; base-uri 'none'; form-action 'none'")  # fmt: skip
MakeRow = Callable[[str, Any, "str | None"], dict]


@dataclass(frozen=True)
class Outcome:
    """One image of a request: the model's value, or why it has none (`model`: the model failed, not the image)."""

    value: Any = None
    error: str | None = None
    model: bool = False


def json_response(content: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """JSON as `bit predict -f json` writes it (UTF-8, not ASCII-escaped), compact."""
    body = json.dumps(content, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return Response(body, status_code=status, headers=headers, media_type="application/json")


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return json_response({"error": message}, status, headers)


def refusal(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    """An error answered before (or instead of) reading the whole body: the connection is closed after it, or
    uvicorn would go on reading and discarding what the client still sends (gigabytes after a 413), holding
    one of --max-connections while it does."""
    return error_response(status, message, {**(headers or {}), "Connection": "close"})


class Service:
    """The engine behind the API: its batcher (the model thread) and the decoding threads."""

    def __init__(self, engine: Engine, opts: ServeOptions) -> None:
        self.engine, self.opts = engine, opts
        self.batcher = Batcher({"logits": self._logits, "features": self._features}, max_batch=opts.max_batch,
                               max_wait_s=opts.max_wait_ms / 1000, capacity=opts.queue)  # fmt: skip
        self.pool = ThreadPoolExecutor(max_workers=max(1, opts.workers), thread_name_prefix="bit-decode")
        self.page = resources.files("bitcli.server").joinpath("page.html").read_text(encoding="utf-8")

    def app(self) -> Starlette:
        routes = [
            Route("/", self.upload_page, methods=["GET"]),
            Route("/healthz", self.healthz, methods=["GET"]),
            Route("/v1/model", self.model, methods=["GET"]),
            Route("/v1/predict", self.predict, methods=["POST"]),
            Route("/v1/embed", self.embed, methods=["POST"]),
        ]
        handlers = {HTTPException: _http_error, Exception: _internal_error}
        app = Starlette(routes=routes, lifespan=self.lifespan, exception_handlers=handlers)
        # `/v1/model/` is a 404 like any unknown path, not a redirect to a URL built from the client's Host header
        app.router.redirect_slashes = False
        return app

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        """The model thread runs while the server does; at shutdown (after the last request was answered) it
        answers whatever is still queued and ends, then the decoding threads end."""
        self.batcher.start()
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, self.batcher.stop)
            self.pool.shutdown(wait=True, cancel_futures=True)

    # -- the model thread's compute functions

    def _logits(self, batch: np.ndarray) -> list[torch.Tensor]:
        return list(self.engine.logits(batch).cpu())

    def _features(self, batch: np.ndarray) -> list[torch.Tensor]:
        return list(self.engine.features(batch).cpu())

    # -- routes

    async def upload_page(self, request: Request) -> Response:
        return HTMLResponse(self.page, headers={"Content-Security-Policy": PAGE_POLICY})

    async def healthz(self, request: Request) -> Response:
        b = self.batcher
        return json_response({"status": "ok", "pending": b.pending, "queue": b.capacity, "batches": b.batches,
                              "images": b.images})  # fmt: skip

    async def model(self, request: Request) -> Response:
        engine, opts = self.engine, self.opts
        dtype = getattr(engine, "dtype", None)
        return json_response({
            "source": display(engine.source),
            "engine": "onnx" if isinstance(engine, OnnxEngine) else "torch",
            "device": str(engine.device),
            "precision": PRECISIONS.get(dtype, str(dtype)) if dtype is not None else "the .onnx file's own",
            "num_classes": engine.num_classes,
            "labels": list(engine.labels),
            # a multi-label model's labels are every class at or above its threshold (bit predict's `labels`)
            "multi_label": engine.thresholds is not None,
            "thresholds": None if engine.thresholds is None else list(engine.thresholds),  # by class, as `labels`
            "preprocessing": engine.preprocess.to_dict(),
            "limits": {"top_k": self.default_top_k, "max_batch": opts.max_batch, "max_wait_ms": opts.max_wait_ms,
                       "queue": opts.queue, "max_body_mb": opts.max_body_mb, "timeout_s": opts.timeout_s},
        })  # fmt: skip

    @property
    def default_top_k(self) -> int:
        return min(self.opts.top_k, self.engine.num_classes)

    async def predict(self, request: Request) -> Response:
        try:
            query = _query(request, ("top_k", "name"))
            k = _whole(query.get("top_k"), "top_k", self.default_top_k, self.engine.num_classes)
        except RequestError as exc:
            return refusal(exc.status, exc.message)
        engine = self.engine
        multi_label = engine.thresholds is not None

        def row(name: str, value: Any, error: str | None) -> dict:
            # bit predict's row: the model's temperature; a multi-label model's sigmoids, and its labels at or
            # above their thresholds beside the top-k
            if value is None:
                return Row(display(name), error=error).to_dict()
            logits = value[None]
            predictions = top_k(logits, engine.labels, k, temperature=engine.temperature, multi_label=multi_label)[0]
            above = over_thresholds(logits, engine)[0] if multi_label else None
            return Row(display(name), predictions, error, labels=above).to_dict()

        return await self._answer(request, "logits", row)

    async def embed(self, request: Request) -> Response:
        if isinstance(self.engine, OnnxEngine):
            return refusal(400, f"{display(self.engine.source)}: an ONNX export gives logits only; serve the "
                           "checkpoint it was exported from for embeddings")  # fmt: skip
        try:
            normalize = _yes_no(_query(request, ("normalize", "name")).get("normalize"), "normalize")
        except RequestError as exc:
            return refusal(exc.status, exc.message)

        def row(name: str, value: Any, error: str | None) -> dict:
            if error is not None:
                return {"path": display(name), "error": error}
            vector = F.normalize(value[None], dim=1)[0] if normalize else value  # as `bit embed --normalize`
            return {"path": display(name), "embedding": vector.numpy().tolist()}

        return await self._answer(request, "features", row)

    # -- one request, start to end

    async def _answer(self, request: Request, kind: str, make_row: MakeRow) -> Response:
        deadline = asyncio.get_running_loop().time() + self.opts.timeout_s
        try:
            parts = await self._parts(request, deadline)
            outcomes = await _unless_gone(request, self._outcomes(parts, kind, deadline))
        except RequestError as exc:  # a refusal of the body (400, 408, 413: maybe not all read) or of the load
            answer = refusal if exc.status in (400, 408, 413) else error_response
            return answer(exc.status, exc.message, exc.headers)
        except ClientDisconnect:  # the client left: nobody reads this answer
            return refusal(400, "the client disconnected")
        rows = [make_row(part.name, o.value, o.error) for part, o in zip(parts, outcomes)]
        if any(o.error is None for o in outcomes):
            return json_response(rows)
        if any(o.model for o in outcomes):
            return json_response({"error": "the model failed on every image of the request", "rows": rows}, 500)
        return json_response({"error": "no image in the request could be decoded", "rows": rows}, 400)

    async def _parts(self, request: Request, deadline: float) -> list[Part]:
        body = read_body(request.stream(), request.headers.get("content-length"), mb_to_bytes(self.opts.max_body_mb))
        try:
            data = await asyncio.wait_for(body, _left(deadline))
        except asyncio.TimeoutError:
            raise RequestError(
                408, f"the request body did not arrive within {self.opts.timeout_s:g} s (--timeout-s)"
            ) from None
        content_type, name = request.headers.get("content-type", ""), request.query_params.get("name") or "image"
        return split_images(data, content_type, name, max_parts=self.opts.queue)

    async def _outcomes(self, parts: list[Part], kind: str, deadline: float) -> list[Outcome]:
        """Every part decoded (on the pool) and run (on the model thread), under the request's slots."""
        if not self.batcher.admit(len(parts)):
            wait = self.batcher.retry_after()
            raise RequestError(
                429, f"the server is busy (images waiting: {self.batcher.pending}, at most {self.opts.queue}); retry in {wait} s",
                {"Retry-After": str(wait)},
            )  # fmt: skip
        held = [len(parts)]  # slots still this request's: those of images not handed to the model thread
        try:
            return await asyncio.wait_for(self._run(parts, kind, held), _left(deadline))
        except asyncio.TimeoutError:
            raise RequestError(504, f"no answer within {self.opts.timeout_s:g} s (--timeout-s); the server is "
                               "overloaded: retry later, or send fewer images at a time") from None  # fmt: skip
        finally:
            self.batcher.release(held[0])

    async def _run(self, parts: list[Part], kind: str, held: list[int]) -> list[Outcome]:
        loop = asyncio.get_running_loop()
        decoded = await asyncio.gather(*(loop.run_in_executor(self.pool, self._decode, p) for p in parts))
        images = {i: d for i, d in enumerate(decoded) if not isinstance(d, str)}
        futures = self.batcher.submit(kind, list(images.values()))
        held[0] -= len(images)
        values = await asyncio.gather(*(asyncio.wrap_future(f) for f in futures), return_exceptions=True)
        outcomes = [Outcome(error=d) if isinstance(d, str) else Outcome() for d in decoded]
        for i, value in zip(images, values):
            outcomes[i] = Outcome(value) if not isinstance(value, BaseException) else _model_failure(parts[i], value)
        return outcomes

    def _decode(self, part: Part) -> np.ndarray | str:
        """The part as the model takes it (uint8 [H, W, 3]), or its error text as `bit predict` words it."""
        try:
            return self.engine.preprocess.to_uint8(load_image(io.BytesIO(part.data), name=display(part.name)))
        except Exception as exc:  # noqa: BLE001 -- one bad image is its error row, never the request's end
            return failure(part.name, exc)


async def _unless_gone(request: Request, work: Coroutine[Any, Any, list[Outcome]]) -> list[Outcome]:
    """`work`'s result, or ClientDisconnect as soon as the client hangs up while it waits (its images still
    queued are dropped and their slots given back: a client that leaves costs no forward pass)."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiting in (task, gone):
            waiting.cancel()  # (a no-op for the one that is done)
        await asyncio.gather(task, gone, return_exceptions=True)
    if task in done:
        return task.result()
    raise ClientDisconnect()


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (its body was read: the next message can only say that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _model_failure(part: Part, exc: BaseException) -> Outcome:
    message = (
        one_line(exc) if isinstance(exc, BitError) else f"{display(part.name)}: the model failed ({one_line(exc)})"
    )
    return Outcome(error=message, model=True)


def _left(deadline: float) -> float:
    return max(deadline - asyncio.get_running_loop().time(), 0.0)


def _query(request: Request, known: tuple[str, ...]) -> dict[str, str]:
    """The request's query parameters, each one of `known` and given at most once (a misspelt `topk=2` would
    otherwise be ignored without a word, and `top_k=2&top_k=3` answered by one of them)."""
    given: dict[str, str] = {}
    for key, value in request.query_params.multi_items():
        if key not in known:
            raise RequestError(400, f"unknown query parameter {key!r}; {request.url.path} takes {', '.join(known)}")
        if key in given:
            raise RequestError(400, f"{key} is given more than once; give it once")
        given[key] = value
    return given


def _whole(value: str | None, name: str, default: int, most: int) -> int:
    if value is None:
        return default
    if not (value.isascii() and value.isdigit()) or not 1 <= int(value) <= most:  # not ' 3', '+3' or '²'
        raise RequestError(400, f"{name}={value!r}: use a whole number from 1 to {most}")
    return int(value)


def _yes_no(value: str | None, name: str) -> bool:
    words = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
    if value is None:
        return False
    if value.lower() not in words:
        raise RequestError(400, f"{name}={value!r}: use true or false")
    return words[value.lower()]


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's 404 and 405, as JSON saying what exists."""
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        message = f"no such endpoint: {request.method} {request.url.path}; the API is {ENDPOINTS}"
    elif exc.status_code == 405:
        message = f"{request.method} is not allowed on {request.url.path}; the API is {ENDPOINTS}"
    else:
        message = str(exc.detail)
    answer = refusal if _has_body(request) else error_response  # a body nobody will read: close after the answer
    return answer(exc.status_code, message, dict(exc.headers or {}))


def _has_body(request: Request) -> bool:
    length = request.headers.get("content-length", "").strip()
    return "transfer-encoding" in request.headers or length not in ("", "0")


async def _internal_error(request: Request, exc: Exception) -> Response:
    return error_response(500, f"internal error: {type(exc).__name__}: {one_line(exc)}")


def build_app(engine: Engine, opts: ServeOptions) -> Starlette:
    """The API over `engine` with `opts`' limits (the model thread starts with the app's lifespan)."""
    return Service(engine, opts).app()
