"""How the suite itself runs: under pytest-xdist (.ci/run's `-n auto`) each worker takes an even share of the
cores for torch and hands it to the processes it starts; run alone, nothing is changed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import worker_threads

PROBE = """
import os

import torch


def test_probe():
    with open(os.environ["PROBE_OUT"], "a") as out:
        print(os.environ.get("PYTEST_XDIST_WORKER", "-"), torch.get_num_threads(),
              os.environ.get("OMP_NUM_THREADS", "-"), os.environ.get("MKL_NUM_THREADS", "-"), file=out)
"""


def probe(tmp_path: Path, *args: str, env: dict[str, str]) -> list[list[str]]:
    """Run a one-test suite beside a copy of tests/conftest.py with pytest ARGS: (worker, torch threads,
    OMP_NUM_THREADS, MKL_NUM_THREADS) as the test saw them."""
    suite = tmp_path / "suite"
    suite.mkdir()
    shutil.copy(Path(__file__).with_name("conftest.py"), suite / "conftest.py")
    (suite / "test_probe.py").write_text(PROBE)
    out = tmp_path / "seen.txt"
    clean = {k: v for k, v in os.environ.items() if not k.endswith("_NUM_THREADS") and not k.startswith("PYTEST_")}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args, str(suite)],
                          capture_output=True, text=True, cwd=suite, env={**clean, **env, "PROBE_OUT": str(out)},
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [line.split() for line in out.read_text().splitlines()]


def test_a_worker_takes_its_share_of_the_cores(tmp_path: Path) -> None:
    share = str(worker_threads(len(os.sched_getaffinity(0)), 2))
    [[worker, *threads]] = probe(tmp_path, "-n", "2", env={})
    assert worker.startswith("gw") and threads == [share, share, share]


def test_a_thread_count_the_caller_chose_is_kept(tmp_path: Path) -> None:
    [[worker, *threads]] = probe(tmp_path, "-n", "2", env={"OMP_NUM_THREADS": "3", "MKL_NUM_THREADS": "3"})
    assert worker.startswith("gw") and threads == ["3", "3", "3"]


def test_run_alone_the_suite_changes_nothing(tmp_path: Path) -> None:
    default = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                             capture_output=True, text=True, check=True,
                             env={k: v for k, v in os.environ.items() if not k.endswith("_NUM_THREADS")})  # fmt: skip
    assert probe(tmp_path, env={}) == [["-", default.stdout.strip(), "-", "-"]]


def test_the_share_is_even_and_at_least_one() -> None:
    assert [worker_threads(cores, 2) for cores in (1, 2, 3, 4, 16)] == [1, 1, 1, 2, 8]
    assert worker_threads(16, 3) == 5 and worker_threads(2, 8) == 1
