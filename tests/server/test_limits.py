"""`bit serve` under pressure: bodies over the cap (413, before or while they are read), bodies that do not
arrive (408), a full queue (429 with Retry-After), answers that do not come in time (504), a model that fails
(500), concurrent requests sharing forward passes, and misbehaving clients beside a good one."""

from __future__ import annotations

import json
import socket
import threading
import time
from urllib.parse import urlsplit

from .helpers import Gated, call, multipart, post, serving, wait_until


def _raw(url: str) -> socket.socket:
    parts = urlsplit(url)
    assert parts.hostname == "127.0.0.1"  # loopback only
    return socket.create_connection((parts.hostname, parts.port), timeout=20)


def _response(sock: socket.socket) -> tuple[int, dict]:
    """(status, JSON body) of the one response on `sock` (the server closes or says its length)."""
    status, _, body = _answer(sock)
    return status, body


def _answer(sock: socket.socket) -> tuple[int, dict[str, str], dict]:
    """(status, headers (names in lower case), JSON body) of the next response on `sock`."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, data
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, value in (line.split(":", 1) for line in lines[1:])}
    while len(body) < int(headers["content-length"]):
        body += sock.recv(65536)
    return int(lines[0].split()[1]), headers, json.loads(body)


def _closed(sock: socket.socket) -> bool:
    """Whether the server closed `sock` (within its timeout: the test's bound, not the server's)."""
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False


def _headers(path: str, extra: str) -> bytes:
    return f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}\r\n".encode()


def _healthy(url: str) -> dict:
    reply = call(url, "GET", "/healthz")
    assert reply.status == 200
    return reply.json


def test_bodies_over_the_cap_are_413_without_being_read(engine, pictures):
    with serving(engine, max_body_mb=0.02, queue=2, max_batch=1) as url:
        with _raw(url) as sock:  # the declared length is refused before a byte of the body is sent
            sock.sendall(_headers("/v1/predict", "Content-Length: 30000\r\n"))
            assert _response(sock) == (
                413,
                {"error": "the request body is 0.03 MB, over the 0.02 MB limit (--max-body-mb)"},
            )
        with _raw(url) as sock:  # a chunked body is cut off as soon as it passes the cap
            sock.sendall(_headers("/v1/predict", "Transfer-Encoding: chunked\r\n"))
            sock.sendall((b"2ee0\r\n" + b"x" * 12000 + b"\r\n") * 2)
            assert _response(sock) == (413, {"error": "the request body passed the 0.02 MB limit (--max-body-mb)"})
        body, content_type = multipart([("f", f"{i}.png", b"") for i in range(3)])
        reply = post(url, "/v1/predict", body, content_type)
        assert (reply.status, reply.json) == (413, {"error": "more than 2 images in one request (--queue)"})
        assert post(url, "/v1/predict", pictures["a.png"].read_bytes()).status == 200  # under the cap: answered


def test_the_body_cap_is_said_in_the_flag_s_unit(engine, pictures):
    """--max-body-mb 2.01 is 2,010,000 bytes (MB = 10^6 bytes, as the flag says; not 2,009,999 from a float
    truncated): a body of exactly that is read, one byte more is refused in MB, to the byte."""
    with serving(engine, max_body_mb=2.01) as url:
        with _raw(url) as sock:
            sock.sendall(_headers("/v1/predict", "Content-Length: 2010001\r\n"))
            assert _response(sock) == (
                413,
                {"error": "the request body is 2.010001 MB, over the 2.01 MB limit (--max-body-mb)"},
            )
        reply = post(url, "/v1/predict?name=x.png", b"x" * 2_010_000)
        error = "x.png: not an image PIL can read (empty, corrupt or another format)"
        assert (reply.status, reply.json["rows"]) == (400, [{"path": "x.png", "error": error}])
        assert call(url, "GET", "/v1/model").json["limits"]["max_body_mb"] == 2.01


def test_a_body_that_does_not_arrive_in_time_is_408(engine, pictures):
    with serving(engine, timeout_s=0.5) as url, _raw(url) as sock:
        sock.sendall(_headers("/v1/predict", "Content-Length: 1000\r\n") + b"\x89PNG")
        assert _response(sock) == (408, {"error": "the request body did not arrive within 0.5 s (--timeout-s)"})
        assert post(url, "/v1/predict", pictures["a.png"].read_bytes()).status == 200


def test_a_full_queue_is_429_with_retry_after(engine, pictures):
    gated = Gated(engine)
    image = pictures["a.png"].read_bytes()
    with serving(gated, queue=2, max_batch=1) as url:
        gated.gate.clear()
        first: list = []
        holder = threading.Thread(target=lambda: first.append(post(url, "/v1/predict", image)))
        holder.start()
        wait_until(lambda: _healthy(url)["pending"] == 1)  # the model thread holds it
        body, content_type = multipart([("f", "x.png", image), ("f", "y.png", image)])
        reply = post(url, "/v1/predict", body, content_type)
        assert (reply.status, reply.json) == (
            429,
            {"error": "the server is busy (images waiting: 1, at most 2); retry in 1 s"},
        )
        assert reply.headers["retry-after"] == "1"
        gated.gate.set()
        holder.join(20)
        assert first[0].status == 200 and _healthy(url)["pending"] == 0
        assert post(url, "/v1/predict", body, content_type).status == 200  # now they fit


def test_an_answer_that_does_not_come_in_time_is_504_and_its_slot_comes_back(engine, pictures):
    gated = Gated(engine)
    image = pictures["a.png"].read_bytes()
    with serving(gated, timeout_s=0.3) as url:
        gated.gate.clear()
        reply = post(url, "/v1/predict", image)
        assert (reply.status, reply.json) == (
            504, {"error": "no answer within 0.3 s (--timeout-s); the server is overloaded: retry later, or send fewer images at a time"},
        )  # fmt: skip
        gated.gate.set()
        wait_until(lambda: _healthy(url)["pending"] == 0)
        assert post(url, "/v1/predict", image).status == 200


def test_concurrent_requests_share_a_forward_pass(engine, pictures):
    """While the model thread is busy, four clients' images queue; they then go through in one forward pass,
    and each client gets its own image's row."""
    gated = Gated(engine)
    names = ["a.png", "b.jpg", "c.png", "a.png", "b.jpg"]
    alone = {}
    with serving(engine) as url:
        for name in set(names):
            alone[name] = post(url, f"/v1/predict?name={name}", pictures[name].read_bytes()).json
    replies: dict[int, object] = {}

    def client(i: int) -> None:
        replies[i] = post(url, f"/v1/predict?name={names[i]}", pictures[names[i]].read_bytes())

    with serving(gated) as url:
        gated.gate.clear()
        threads = [threading.Thread(target=client, args=(i,)) for i in range(5)]
        threads[0].start()
        assert gated.entered.wait(20)  # the model thread is in the first client's forward pass
        for t in threads[1:]:
            t.start()
        wait_until(lambda: _healthy(url)["pending"] == 5)
        gated.gate.set()
        for t in threads:
            t.join(20)
    assert gated.passes == [1, 4]
    for i, name in enumerate(names):
        assert replies[i].status == 200
        got, want = replies[i].json[0], alone[name][0]
        assert got["path"] == name and [p["index"] for p in got["predictions"]] == [
            p["index"] for p in want["predictions"]
        ]
        for p, q in zip(got["predictions"], want["predictions"]):
            assert abs(p["score"] - q["score"]) <= 2e-6  # batched with others: equal up to float rounding


def test_a_client_that_hangs_up_while_waiting_costs_no_forward_pass(engine, pictures):
    gated = Gated(engine)
    image = pictures["a.png"].read_bytes()
    with serving(gated) as url:
        gated.gate.clear()
        first: list = []
        holder = threading.Thread(target=lambda: first.append(post(url, "/v1/predict", image)))
        holder.start()
        assert gated.entered.wait(20)  # the model thread is busy with the first request
        with _raw(url) as sock:
            sock.sendall(_headers("/v1/predict", f"Content-Length: {len(image)}\r\n") + image)
            wait_until(lambda: _healthy(url)["pending"] == 2)  # admitted, queued behind the first
        wait_until(lambda: _healthy(url)["pending"] == 1)  # it hung up: its image left the queue
        gated.gate.set()
        holder.join(20)
        assert first[0].status == 200 and gated.passes == [1]
        assert post(url, "/v1/predict", image).status == 200 and gated.passes == [1, 1]


def test_a_failing_model_is_500_with_rows_and_the_server_goes_on(engine, pictures):
    with serving(Gated(engine, fail=True)) as url:
        reply = post(url, "/v1/predict?name=a.png", pictures["a.png"].read_bytes())
        assert (reply.status, reply.json) == (500, {
            "error": "the model failed on every image of the request",
            "rows": [{"path": "a.png", "error": "a.png: the model failed (CUDA out of memory (simulated))"}],
        })  # fmt: skip
        assert _healthy(url)["status"] == "ok"


def test_misbehaving_clients_do_not_stop_the_good_one(engine, pictures):
    """A short version of benchmarks/serve_load.py's fault phase: garbage, an oversize body, a body that stalls,
    clients that hang up mid-body and while waiting; a good client beside them gets every answer right."""
    image = pictures["b.jpg"].read_bytes()
    good: list[int] = []
    with serving(engine, max_body_mb=0.1, timeout_s=1) as url:
        expected = post(url, "/v1/predict", image).json

        def good_client() -> None:
            for _ in range(12):
                reply = post(url, "/v1/predict", image)
                good.append(reply.status if reply.json == expected else -1)

        runner = threading.Thread(target=good_client)
        runner.start()
        for _ in range(3):
            assert post(url, "/v1/predict", b"\x00garbage" * 100).status == 400
            with _raw(url) as sock:
                sock.sendall(_headers("/v1/predict", "Content-Length: 500000\r\n"))
                assert _response(sock)[0] == 413
            with _raw(url) as sock:  # hangs up halfway through its body
                sock.sendall(_headers("/v1/predict", f"Content-Length: {len(image)}\r\n") + image[: len(image) // 2])
            with _raw(url) as sock:  # hangs up while its image is being classified
                sock.sendall(_headers("/v1/predict", f"Content-Length: {len(image)}\r\n") + image)
        with _raw(url) as sock:  # stalls: answered 408 when its time is up
            sock.sendall(_headers("/v1/predict", "Content-Length: 1000\r\n") + b"\xff\xd8")
            assert _response(sock)[0] == 408
        runner.join(60)
        assert good == [200] * 12
        wait_until(lambda: _healthy(url)["pending"] == 0)


def test_concurrent_requests_wait_max_wait_ms_to_share_a_pass(engine, pictures):
    """With the model idle, the first request's image waits (--max-wait-ms, here 10 s) for the others: three
    clients' images go through in one pass, as soon as they make --max-batch."""
    gated = Gated(engine)  # its gate stays open: it only counts the passes
    image = pictures["c.png"].read_bytes()
    replies: list = []
    with serving(gated, max_batch=3, max_wait_ms=10_000) as url:
        threads = [threading.Thread(target=lambda: replies.append(post(url, "/v1/predict", image))) for _ in range(3)]
        threads[0].start()
        wait_until(lambda: _healthy(url)["pending"] == 1)  # admitted: its image waits for company
        for t in threads[1:]:
            t.start()
        for t in threads:
            t.join(20)
        assert [r.status for r in replies] == [200] * 3 and replies[0].json == replies[1].json == replies[2].json
        assert gated.passes == [3] and _healthy(url)["batches"] == 1


def test_connections_that_send_no_request_in_time_are_closed_and_free_their_slots(engine, pictures):
    """--max-connections sockets that send nothing, or half a request line, would lock every other client out
    (uvicorn's 503) for as long as they stay: each is closed once --header-timeout-s has passed since it opened
    or since its last answer (with a 408 when part of a request came), and a good client is served again."""
    image = pictures["a.png"].read_bytes()
    with serving(engine, max_connections=4, header_timeout_s=0.5) as url:
        socks = [_raw(url) for _ in range(3)]
        try:
            start = time.monotonic()
            socks[1].sendall(b"POST /v1/predict HTTP/1.1\r\n")  # half a request
            socks[2].sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")  # one request, then silence
            assert _answer(socks[2])[0] == 200
            socks[2].sendall(b"GET /heal")  # the next request, never finished
            assert post(url, "/v1/predict", image).status == 503  # every connection is held
            for sock in socks:
                sock.settimeout(3)
            assert _closed(socks[0])
            expected = {"error": "the request line and headers did not arrive within 0.5 s (--header-timeout-s)"}
            for sock in socks[1:]:
                status, headers, body = _answer(sock)
                assert (status, headers["connection"], body) == (408, "close", expected)
                assert _closed(sock)
            assert post(url, "/v1/predict", image).status == 200
            assert time.monotonic() - start < 0.5 + 2.5
        finally:
            for sock in socks:
                sock.close()


def test_refusals_before_the_whole_body_close_the_connection_and_free_its_slot(engine, pictures):
    """After a 413, 408 or 400 the server would go on reading (and discarding) what the client sends, holding
    a connection: the answer says `Connection: close` and the server closes it at once."""
    image = pictures["a.png"].read_bytes()
    refused = [
        (_headers("/v1/predict", "Content-Length: 30000\r\n"), 413),
        (_headers("/v1/predict", "Transfer-Encoding: chunked\r\n") + (b"2ee0\r\n" + b"x" * 12000 + b"\r\n") * 2, 413),
        (_headers("/v1/predict", "Content-Length: 1000\r\n") + b"\x89PNG", 408),
        (_headers("/v1/predict?top_k=x", f"Content-Length: {len(image)}\r\n"), 400),
        (_headers("/v1/nothing", f"Content-Length: {len(image)}\r\n"), 404),
    ]
    with serving(engine, max_body_mb=0.02, timeout_s=1.5, max_connections=2) as url:
        for request, expected in refused:
            with _raw(url) as sock:
                sock.settimeout(3)
                sock.sendall(request)
                status, headers, _ = _answer(sock)
                assert (status, headers["connection"]) == (expected, "close")
                assert _closed(sock), expected
                assert post(url, "/v1/predict", image).status == 200  # its slot is free (2 at most: this and it)
