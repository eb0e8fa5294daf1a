"""Peak resident memory of benchmark processes, measured so that each figure is that process's own.

On Linux a process's ru_maxrss (getrusage, wait4) starts at its parent's high-water mark: fork copies the
parent's memory map and exec folds that map's peak into the new program's. A small child of a benchmark that
holds 2 GB of images would report 2 GB. So a contender reports VmHWM, the peak of its current memory map
(which exec starts afresh), and a command we do not control is started by a small launcher process, whose own
few MiB become the floor of the figure instead of the benchmark's.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

# Runs argv[2:], then writes the child's ru_maxrss (KiB) to the pipe whose fd is argv[1]. `python -S`: no site.
_LAUNCHER = (
    "import os, subprocess, sys\n"
    "proc = subprocess.Popen(sys.argv[2:])\n"
    "_, status, usage = os.wait4(proc.pid, 0)\n"
    "os.write(int(sys.argv[1]), str(usage.ru_maxrss).encode())\n"
    "sys.exit(os.waitstatus_to_exitcode(status))\n"
)


def own_peak_mib() -> float:
    """This process's peak RSS in MiB (VmHWM; getrusage where /proc is missing, then an upper bound)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_measured(cmd: list[str], **popen_kwargs) -> tuple[int, float, float, str]:
    """Run cmd to the end: (exit code, seconds, its peak RSS in MiB, its stderr). stdout goes to popen_kwargs'
    `stdout` (default: discarded); env and cwd may be given too."""
    read_fd, write_fd = os.pipe()
    popen_kwargs.setdefault("stdout", subprocess.DEVNULL)
    start = time.perf_counter()
    try:
        proc = subprocess.Popen([sys.executable, "-S", "-c", _LAUNCHER, str(write_fd), *cmd], pass_fds=(write_fd,),
                                stderr=subprocess.PIPE, text=True, **popen_kwargs)  # fmt: skip
        os.close(write_fd)
        write_fd = -1
        _, err = proc.communicate()
        seconds = time.perf_counter() - start
        reply = os.read(read_fd, 64)
    finally:
        os.close(read_fd)
        if write_fd >= 0:
            os.close(write_fd)
    return proc.returncode, seconds, (int(reply) / 1024 if reply else float("nan")), err
