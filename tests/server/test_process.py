"""`bit serve` as a process: it prints its URL once it accepts connections, SIGTERM stops it gracefully (no new
connections, the request in flight answered, exit 0 within a bound), and its flags and port are checked before
the model loads."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
from conftest import run_main

from bitcli.server.listen import is_loopback

from .test_limits import _headers, _raw, _response


def _start(*args: object) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "bitcli", "serve", *map(str, args), "--port", "0"],
                            stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)  # fmt: skip
    line = proc.stderr.readline()  # the model loads, then this line says where it listens
    match = re.search(r" on (http://127\.0\.0\.1:\d+/) ", line)
    if match is None:
        proc.kill()
        pytest.fail(f"no URL in {line!r}: {proc.communicate(timeout=30)}")
    return proc, match[1]


def _refused(url: str) -> bool:
    try:
        _raw(url).close()
    except ConnectionRefusedError:
        return True
    return False


def test_sigterm_finishes_the_request_in_flight_then_exits_0(tiny_dir, pictures):
    image = pictures["a.png"].read_bytes()
    proc, url = _start(tiny_dir)
    try:
        with _raw(url) as sock:
            sock.sendall(_headers("/v1/predict?name=a.png", f"Content-Length: {len(image)}\r\n") + image[:100])
            time.sleep(0.2)  # the request is in flight: its body half sent
            proc.send_signal(signal.SIGTERM)
            end = time.monotonic() + 10
            while not _refused(url):  # the listening socket closes within uvicorn's 0.1 s tick
                assert time.monotonic() < end, "still accepting connections after SIGTERM"
                time.sleep(0.05)
            assert proc.poll() is None  # ... but the process waits for the request in flight
            sock.sendall(image[100:])
            status, rows = _response(sock)
        assert status == 200 and rows[0]["path"] == "a.png" and len(rows[0]["predictions"]) == 5
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    out, err = proc.communicate(timeout=10)
    assert out == "" and "Traceback" not in err


CTRL_C_CHILD = """
import os, signal, sys, threading
from starlette.applications import Starlette
from bitcli.tool_options import ServeOptions
from bitcli.server import listen

opts = ServeOptions(model="test")
sock = listen.bind("127.0.0.1", 0)
before = signal.getsignal(signal.SIGINT)
ready = lambda: threading.Thread(target=os.kill, args=(os.getpid(), signal.SIGINT)).start()
code = listen.serve(Starlette(), sock, opts, ready)
print(code, sock.fileno(), signal.getsignal(signal.SIGINT) is before)
"""


def test_ctrl_c_stops_it_the_same_way_with_130():
    """listen.serve in a process's main thread (where signals land; a process of its own, as this one's main
    thread may hold the browser fixture's event loop), sent SIGINT once it is ready: the graceful stop, then
    130 as every bit command gives for Ctrl-C; the socket is closed and the previous SIGINT handler is back."""
    child = subprocess.run([sys.executable, "-c", CTRL_C_CHILD], capture_output=True, text=True, timeout=60)
    assert (child.returncode, child.stdout, child.stderr) == (0, "130 -1 True\n", "")


def test_a_taken_port_fails_before_the_model_loads():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, out, err = run_main("serve", "no/such-model", "--port", port)
    assert (code, out) == (1, "")
    assert (
        err
        == f"Error: cannot listen on 127.0.0.1:{port} (Address already in use); choose another --port (0: a free one)\n"
    )


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--max-body-mb", "0"], "Error: --max-body-mb 0: must be a number > 0\n"),
        (["--max-body-mb", "1e-7"], "Error: --max-body-mb 1e-7: must be at least 0.000001 (one byte)\n"),
        (["--timeout-s", "-1"], "Error: --timeout-s -1: must be a number > 0\n"),
        (["--header-timeout-s", "0"], "Error: --header-timeout-s 0: must be a number > 0\n"),
        (["--queue", "4", "--max-batch", "8"], "Error: --queue 4 is below --max-batch 8: batches could never fill\n"),
        *(
            (
                ["--max-wait-ms", value, "--timeout-s", "60"],
                f"Error: --max-wait-ms {value}: use a number of "
                "milliseconds from 0 to below --timeout-s (60000 ms), or a lone request would wait out its own timeout\n",
            )
            for value in ("inf", "60000")  # (typer refuses nan itself)
        ),
    ],
)
def test_bad_flags_exit_2_before_anything_loads(flags, message):
    assert run_main("serve", "no/such-model", *flags) == (2, "", message)
    code, _, err = run_main("serve", "m", "--port", "70000")
    assert code == 2 and "--port" in err


def test_without_the_extra_it_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as on a machine without it
    code, out, err = run_main("serve", "no/such-model", "--port", "0")
    assert (code, out, err) == (
        1,
        "",
        "Error: bit serve needs uvicorn, which is not installed: pip install 'bitcli[serve]'\n",
    )


def test_under_torchrun_it_refuses_to_start(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, out, err = run_main("serve", "no/such-model", "--port", "0")
    assert (code, out) == (2, "")
    assert err == "Error: bit serve is one process; to serve from several, run one per port (docs/serve.md)\n"


def test_only_loopback_addresses_are_quiet():
    assert is_loopback("127.0.0.1") and is_loopback("127.0.0.2") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4") and not is_loopback("::")


def test_help_says_where_it_listens():
    out = " ".join(run_main("serve", "--help")[1].split())
    assert "--host <str> Address to listen on; the default answers this machine only" in out
    assert "there is no authentication). [default: 127.0.0.1]" in out
    assert "--port <int range> Port to listen on; 0: a free one (printed). [default: 8000; 0<=x<=65535]" in out
