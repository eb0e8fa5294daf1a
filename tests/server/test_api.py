"""`bit serve`'s API answers what `bit predict -f json` and `bit embed -f jsonl` answer for the same images:
rows in order, error rows in place with predict's words; the model's description; JSON errors for everything
else. The server is a real uvicorn on 127.0.0.1 in this process (helpers.serving)."""

from __future__ import annotations

import json
import struct
import zlib

import numpy as np
import pytest
from conftest import TINY_LABELS, run_main

from bitcli.hub import load_checkpoint

from .helpers import call, multipart, post, serving


def _predict(*args: object) -> list[dict]:
    code, out, err = run_main("predict", *args, "-f", "json")
    assert code in (0, 1), err
    return json.loads(out)


@pytest.fixture(scope="module")
def server(engine):
    with serving(engine) as url:
        yield url


def test_a_raw_image_is_bit_predict_s_row(server, tiny_dir, pictures):
    expected = _predict(pictures["a.png"], "-m", tiny_dir, "-b", "1")
    reply = post(server, "/v1/predict?name=a.png", pictures["a.png"].read_bytes(), "image/png")
    assert reply.status == 200 and reply.headers["content-type"] == "application/json"
    assert reply.json == [{**expected[0], "path": "a.png"}]
    unnamed = post(server, "/v1/predict", pictures["a.png"].read_bytes())  # curl --data-binary's content type too
    assert unnamed.json == [{**expected[0], "path": "image"}]
    assert (
        post(server, "/v1/predict", pictures["a.png"].read_bytes(), "application/x-www-form-urlencoded").json
        == unnamed.json
    )


def test_multipart_parts_are_rows_in_order_with_predict_s_errors(server, tiny_dir, pictures, monkeypatch):
    """Three images of three sizes and formats, a text file, a form field and an empty file: one row each, in
    order, equal to `bit predict`'s rows for the same files (one forward pass of the three images, as predict's
    one batch), and the undecodable parts as predict words them."""
    monkeypatch.chdir(pictures["a.png"].parent)
    names = ["a.png", "b.jpg", "notes.txt", "c.png"]
    expected = _predict(*names, "-m", tiny_dir, "-b", "16")
    parts = [("file", name, pictures[name].read_bytes()) for name in names]
    body, content_type = multipart([*parts, ("comment", None, b"hello"), ("file", "empty.png", b"")])
    reply = post(server, "/v1/predict", body, content_type)
    assert reply.status == 200
    assert reply.json == [
        *expected,
        {"path": "comment", "error": "comment: not an image PIL can read (empty, corrupt or another format)"},
        {"path": "empty.png", "error": "empty.png: not an image PIL can read (empty, corrupt or another format)"},
    ]
    assert expected[2] == {
        "path": "notes.txt",
        "error": "notes.txt: not an image PIL can read (empty, corrupt or another format)",
    }


def test_a_decompression_bomb_is_refused_from_its_header_as_predict_does(server, tiny_dir, tmp_path, monkeypatch):
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 12_000, 12_000, 1, 0, 0, 0, 0)  # 144 megapixels promised, nothing decoded
    (tmp_path / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))
    monkeypatch.chdir(tmp_path)
    expected = _predict("bomb.png", "-m", tiny_dir)
    assert "possible decompression bomb" in expected[0]["error"]
    reply = post(server, "/v1/predict?name=bomb.png", (tmp_path / "bomb.png").read_bytes())
    assert (reply.status, reply.json) == (400, {"error": "no image in the request could be decoded", "rows": expected})


def test_top_k_is_bounded_by_the_classes(server, tiny_dir, pictures):
    data = pictures["b.jpg"].read_bytes()
    expected = _predict(pictures["b.jpg"], "-m", tiny_dir, "-k", "10")
    assert post(server, "/v1/predict?top_k=10", data).json == [{**expected[0], "path": "image"}]
    assert [len(r["predictions"]) for r in post(server, "/v1/predict?top_k=1", data).json] == [1]
    for bad in ("0", "11", "x", "-1", "2.5"):
        reply = post(server, f"/v1/predict?top_k={bad}", data)
        assert (reply.status, reply.json) == (400, {"error": f"top_k={bad!r}: use a whole number from 1 to 10"})
    reply = post(server, "/v1/predict?top_k=%C2%B2", data)  # a digit to str.isdigit, not to int()
    assert (reply.status, reply.json) == (400, {"error": "top_k='²': use a whole number from 1 to 10"})


def test_embed_rows_are_bit_embed_s(server, tiny_dir, pictures, monkeypatch):
    monkeypatch.chdir(pictures["a.png"].parent)
    names = ["a.png", "notes.txt", "c.png"]
    body, content_type = multipart([("f", name, pictures[name].read_bytes()) for name in names])
    for flags, query in (([], ""), (["--normalize"], "?normalize=true")):
        code, out, _ = run_main("embed", *names, "-m", tiny_dir, "-f", "jsonl", "-b", "16", *flags)
        expected = [json.loads(line) for line in out.splitlines()]
        reply = post(server, "/v1/embed" + query, body, content_type)
        assert (code, reply.status) == (1, 200)
        if not flags:
            assert reply.json == expected  # the same float32 values, exactly
        else:
            assert [r["path"] for r in reply.json] == names and reply.json[1] == expected[1]
            for got, want in zip(reply.json[::2], expected[::2]):
                np.testing.assert_allclose(got["embedding"], want["embedding"], rtol=0, atol=1e-6)
                assert np.linalg.norm(got["embedding"]) == pytest.approx(1.0, abs=1e-5)
    reply = post(server, "/v1/embed?normalize=perhaps", body, content_type)
    assert (reply.status, reply.json) == (400, {"error": "normalize='perhaps': use true or false"})


def test_model_and_health(server, tiny_dir):
    reply = call(server, "GET", "/v1/model")
    assert reply.status == 200
    assert reply.json == {
        "source": str(tiny_dir),
        "engine": "torch",
        "device": "cpu",
        "precision": "fp32",
        "num_classes": 10,
        "labels": TINY_LABELS,
        "multi_label": False,
        "thresholds": None,
        "preprocessing": json.loads(json.dumps(load_checkpoint(str(tiny_dir)).preprocess.to_dict())),
        "limits": {
            "top_k": 5,
            "max_batch": 16,
            "max_wait_ms": 10.0,
            "queue": 64,
            "max_body_mb": 50.0,
            "timeout_s": 60.0,
        },
    }
    health = call(server, "GET", "/healthz")
    assert health.status == 200
    assert {k: health.json[k] for k in ("status", "pending", "queue")} == {"status": "ok", "pending": 0, "queue": 64}


def test_everything_else_is_a_json_error(server):
    api = "the API is POST /v1/predict, POST /v1/embed, GET /v1/model, GET /healthz, GET /"
    reply = call(server, "GET", "/v2/predict")
    assert (reply.status, reply.json) == (404, {"error": f"no such endpoint: GET /v2/predict; {api}"})
    reply = call(server, "GET", "/v1/predict")
    assert (reply.status, reply.json) == (405, {"error": f"GET is not allowed on /v1/predict; {api}"})
    assert reply.headers["allow"] == "POST"
    reply = post(server, "/v1/predict", b"")
    assert (reply.status, reply.json) == (
        400, {"error": "the request body is empty; send an image (or several as multipart/form-data)"}
    )  # fmt: skip
    body, _ = multipart([("f", "a.png", b"x")])
    for content_type, message in (
        ("multipart/form-data", "the multipart body has no boundary in its Content-Type"),
        ("multipart/form-data; boundary=other", "the multipart body is malformed (Expected boundary character 111, got 98 at index 4)"),
        ("multipart/form-data; boundary=bitcli-test-boundary-7MA4YWxkTrZu0gW", None),
    ):  # fmt: skip
        reply = post(server, "/v1/predict", body[:-8] if message is None else body, content_type)
        expected = message or "the multipart body ends before its closing boundary"
        assert (reply.status, reply.json) == (400, {"error": expected})


def test_a_trailing_slash_is_a_404_not_a_redirect(server):
    """Starlette would answer 307 with a Location built from the client's Host header."""
    api = "the API is POST /v1/predict, POST /v1/embed, GET /v1/model, GET /healthz, GET /"
    for method, path in (("GET", "/v1/model/"), ("GET", "/healthz/"), ("POST", "/v1/predict/")):
        reply = call(server, method, path, b"" if method == "POST" else None, {"Host": "evil.example"})
        assert (reply.status, reply.json) == (404, {"error": f"no such endpoint: {method} {path}; {api}"})
        assert "location" not in reply.headers


def test_unknown_repeated_or_loose_query_parameters_are_400(server, pictures):
    data = pictures["b.jpg"].read_bytes()
    for query, message in (
        ("topk=2", "unknown query parameter 'topk'; /v1/predict takes top_k, name"),
        ("top_k=2&name=x&TOP_K=3", "unknown query parameter 'TOP_K'; /v1/predict takes top_k, name"),
        ("top_k=2&top_k=3", "top_k is given more than once; give it once"),
        ("name=a&name=b", "name is given more than once; give it once"),
        ("top_k=%203", "top_k=' 3': use a whole number from 1 to 10"),
        ("top_k=3%20", "top_k='3 ': use a whole number from 1 to 10"),
        ("top_k=%2B3", "top_k='+3': use a whole number from 1 to 10"),
    ):
        reply = post(server, f"/v1/predict?{query}", data)
        assert (reply.status, reply.json, reply.headers["connection"]) == (400, {"error": message}, "close"), query
    reply = post(server, "/v1/embed?normalise=true", data)
    assert (reply.status, reply.json) == (
        400, {"error": "unknown query parameter 'normalise'; /v1/embed takes normalize, name"}
    )  # fmt: skip
    reply = post(server, "/v1/embed?normalize=%20true", data)
    assert (reply.status, reply.json) == (400, {"error": "normalize=' true': use true or false"})
    assert [len(r["predictions"]) for r in post(server, "/v1/predict?top_k=03&name=x.jpg", data).json] == [3]


def test_a_calibrated_model_s_scores_are_bit_predict_s(tiny_dir, pictures, tmp_path):
    """A model that stores a temperature (bit finetune's calibration): the server's scores are predict's, at
    that temperature, not the plain softmax."""
    import dataclasses

    import torch

    from bitcli.engine import load_engine
    from bitcli.formats import bitcli as bitcli_format

    model = tmp_path / "calibrated.safetensors"
    bitcli_format.write(dataclasses.replace(load_checkpoint(str(tiny_dir)), temperature=1.7), model)
    expected = _predict(pictures["a.png"], "-m", model, "-b", "1")
    assert expected != _predict(pictures["a.png"], "-m", tiny_dir, "-b", "1")  # the temperature changes the scores
    engine = load_engine(load_checkpoint(str(model)), torch.device("cpu"), torch.float32)
    with serving(engine) as url:
        reply = post(url, "/v1/predict?name=a.png", pictures["a.png"].read_bytes(), "image/png")
    assert reply.status == 200
    assert reply.json == [{**expected[0], "path": "a.png"}]


def test_a_multi_label_model_s_rows_are_bit_predict_s(tiny_dir, pictures, tmp_path, monkeypatch):
    """A multi-label model (thresholds stored with it): the server's rows are predict's, with the `labels` at or
    above their thresholds beside the sigmoid top-k, and GET /v1/model says it is multi-label, with the
    thresholds by class."""
    import dataclasses

    import torch

    from bitcli.engine import load_engine
    from bitcli.formats import bitcli as bitcli_format

    thresholds = [0.45, 0.5, 0.55] * 3 + [0.5]
    model = tmp_path / "multi.safetensors"
    bitcli_format.write(dataclasses.replace(load_checkpoint(str(tiny_dir)), thresholds=thresholds), model)
    monkeypatch.chdir(pictures["a.png"].parent)
    names = ["a.png", "b.jpg", "notes.txt", "c.png"]
    expected = _predict(*names, "-m", model, "-b", "16", "-k", "3")
    picked = [{p["label"] for p in row["labels"]} for row in expected if "labels" in row]
    assert len(picked) == 3 and all(0 < len(p) < 10 for p in picked), picked  # labels above and below their cut
    engine = load_engine(load_checkpoint(str(model)), torch.device("cpu"), torch.float32)
    with serving(engine) as url:
        body, content_type = multipart([("file", name, pictures[name].read_bytes()) for name in names])
        reply = post(url, "/v1/predict?top_k=3", body, content_type)
        described = call(url, "GET", "/v1/model").json
    assert reply.status == 200
    assert reply.json == expected
    assert (described["multi_label"], described["thresholds"], described["labels"]) == (True, thresholds, TINY_LABELS)
