"""A corpus of hostile image inputs, generated here: each gets one line naming the file, the others go on."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import run_main
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from bitcli.errors import BitError
from bitcli.preprocess import load_image


def _png_bytes(image: Image.Image, **save) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", **save)
    return buf.getvalue()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, photos) -> tuple[Path, dict[str, str | None]]:
    """name -> None (must classify) or a fragment its error must contain."""
    root = tmp_path_factory.mktemp("corpus")
    expect: dict[str, str | None] = {}
    jpeg = photos["rocket.jpg"].read_bytes()

    def put(name: str, data: bytes, error: str | None) -> None:
        (root / name).write_bytes(data)
        expect[name] = error

    put("zero_bytes.jpg", b"", "not an image")
    put("truncated.jpg", jpeg[: len(jpeg) // 3], "truncated")
    put("truncated.png", _png_bytes(Image.open(photos["coffee.png"]))[:3000], "truncated")
    put("random_bytes.png", np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(), "not an image")
    put("html.jpg", b"<html><body>404 not found</body></html>", "not an image")
    put("bomb.png", _png_bytes(Image.new("1", (20000, 20000))), "pixel limit")
    put("one_pixel.png", _png_bytes(Image.new("RGB", (1, 1), (200, 10, 10))), None)
    put("wide_strip.png", _png_bytes(Image.new("RGB", (3000, 2), (0, 90, 200))), None)
    put("thin_strip.png", _png_bytes(Image.new("RGB", (2_000_000, 1), (0, 90, 200))), None)  # resized: 128,000,000x64
    put("gray16.png", _png_bytes(Image.fromarray(np.arange(0, 65536, 16, dtype=np.uint16).reshape(64, 64))), None)
    floats = Image.fromarray(np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64), "F")
    buf = io.BytesIO()
    floats.save(buf, format="TIFF")
    put("float.tiff", buf.getvalue(), None)
    frames = [Image.new("RGB", (32, 32), c) for c in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    for fmt, name in [("GIF", "animated.gif"), ("WEBP", "animated.webp")]:
        buf = io.BytesIO()
        frames[0].save(buf, format=fmt, save_all=True, append_images=frames[1:], duration=100)
        put(name, buf.getvalue(), None)
    big = Image.new("RGB", (9000, 9000), (30, 120, 60))  # 81 megapixels: large but under the limit
    put("huge.png", _png_bytes(big), None)
    put("good.jpg", jpeg, None)

    (root / "dangling.jpg").symlink_to(root / "does-not-exist.jpg")
    expect["dangling.jpg"] = "broken symbolic link"
    os.mkfifo(root / "pipe.jpg")
    expect["pipe.jpg"] = "pipe.jpg: is a FIFO (named pipe), not a regular file"
    odd = os.fsencode(str(root)) + b"/caf\xe9-latin1.jpg"  # not valid UTF-8
    with open(odd, "wb") as f:
        f.write(jpeg)
    expect["caf\ufffd-latin1.jpg"] = None
    return root, expect


def test_every_hostile_input_gets_its_own_outcome(corpus, tiny_dir):
    root, expect = corpus
    code, out, err = run_main("predict", root, "--model", tiny_dir, "--format", "json")
    assert code == 1
    assert "Traceback" not in err
    rows = {Path(r["path"]).name: r for r in json.loads(out)}
    assert set(rows) == set(expect)
    for name, error in expect.items():
        row = rows[name]
        if error is None:
            assert "predictions" in row and len(row["predictions"]) == 5, row
        else:
            assert error in row["error"] and name in row["error"], row
            assert "\n" not in row["error"]
    assert sum(line.startswith("error: ") for line in err.splitlines()) == sum(e is not None for e in expect.values())
    assert rows["caf\ufffd-latin1.jpg"]["predictions"] == rows["good.jpg"]["predictions"]  # the same bytes


def test_unreadable_file(tmp_path, tiny_dir, photos):
    """Permissions. Root reads everything, so there the CLI runs without the DAC-override capabilities."""
    good = Path(shutil.copy(photos["chelsea.png"], tmp_path / "good.png"))
    secret = Path(shutil.copy(photos["chelsea.png"], tmp_path / "secret.png"))
    os.chmod(secret, 0)
    args = ["predict", good, secret, "--model", tiny_dir, "--format", "json"]
    if os.geteuid() == 0:
        drop = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]
        result = subprocess.run([*drop, sys.executable, "-m", "bitcli", *map(str, args)], capture_output=True,
                                text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)  # fmt: skip
        code, out, err = result.returncode, result.stdout, result.stderr
    else:
        code, out, err = run_main(*args)
    assert code == 1, err
    rows = {Path(r["path"]).name: r for r in json.loads(out)}
    assert "predictions" in rows["good.png"]
    assert "permission denied" in rows["secret.png"]["error"]


# ----------------------------------------------------------------------------------------------------------
# Property-based: no byte string makes the loader crash, hang or return something that is not RGB.

_SEEDS = [
    _png_bytes(Image.new("RGB", (17, 9), (1, 2, 3))),
    _png_bytes(Image.new("P", (5, 5))),
    _png_bytes(Image.new("LA", (4, 6))),
]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    seed=st.sampled_from(_SEEDS),
    cut=st.integers(min_value=0, max_value=400),
    flips=st.lists(st.tuples(st.integers(0, 399), st.integers(0, 255)), max_size=6),
    suffix=st.sampled_from([".png", ".jpg", ".gif", ".tiff"]),
)
def test_loader_survives_mutated_files(tmp_path, seed, cut, flips, suffix):
    data = bytearray(seed[:cut] if cut < len(seed) else seed)
    for pos, value in flips:
        if pos < len(data):
            data[pos] = value
    path = tmp_path / f"fuzz{suffix}"
    path.write_bytes(bytes(data))
    try:
        image = load_image(path)
    except BitError as exc:
        assert "\n" not in str(exc) and str(path) in str(exc)
    else:
        assert image.mode == "RGB" and image.width >= 1 and image.height >= 1


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=2048))
def test_loader_survives_arbitrary_bytes(tmp_path, data):
    path = tmp_path / "any.jpg"
    path.write_bytes(data)
    with contextlib.suppress(BitError):
        assert load_image(path).mode == "RGB"
    assert stat.S_ISREG(path.stat().st_mode)  # the input is left untouched
