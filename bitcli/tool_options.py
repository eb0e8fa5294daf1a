"""The flags of the commands around the model (`bit serve`, `bit audit`, `bit push`) as typed values, checked
as bitcli.options checks the others: no torch and no command module imported, so a bad value exits 2 fast."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from bitcli.architectures import DEFAULT_MODEL
from bitcli.errors import UsageError
from bitcli.hubnames import branch_problem, commit_text, repo_id_problem
from bitcli.options import DEFAULT_WORKERS, DataSpec, OptionError, Precision
from bitcli.ui import visible


@dataclass(frozen=True)
class ServeOptions:
    """`bit serve`: the model, where to listen, and the server's limits (bitcli.server)."""

    model: str
    revision: str | None = None
    host: str = "127.0.0.1"  # loopback: another address is the user's explicit choice
    port: int = 8000  # 0: a free port (the URL is printed)
    max_batch: int = 16  # images per forward pass
    max_wait_ms: float = 10.0  # how long the first image of a batch waits for others
    queue: int = 64  # images admitted and not yet answered; more: 429
    max_body_mb: float = 50.0  # a request body over this: 413
    timeout_s: float = 60.0  # a request not answered within this: 408 (body still arriving) or 504
    max_connections: int = 128  # open connections; more: 503
    header_timeout_s: float = 10.0  # a request line and headers not in within this: the connection is closed
    top_k: int = 5  # the default of ?top_k=
    device: str = "auto"
    precision: Precision = Precision.auto
    workers: int = DEFAULT_WORKERS  # decoding threads

    def __post_init__(self) -> None:
        if self.queue < self.max_batch:
            raise UsageError(f"--queue {self.queue} is below --max-batch {self.max_batch}: batches could never fill")
        # (also refuses inf and nan, which typer's min=0 lets through: a wait the model thread cannot time)
        if not 0 <= self.max_wait_ms < self.timeout_s * 1000:
            raise UsageError(
                f"--max-wait-ms {self.max_wait_ms:g}: use a number of milliseconds from 0 to below --timeout-s "
                f"({self.timeout_s * 1000:g} ms), or a lone request would wait out its own timeout"
            )


# The findings `bit audit --fail-on` can count (bitcli.audit.findings.Findings.counts gives each one's number).
AUDIT_COUNTS = (
    "duplicates", "exact", "near", "leaks", "conflicts", "label-issues", "undecodable", "small-classes", "off-size",
)  # fmt: skip
# Cosine similarity of pre-logit embeddings: precision and recall >= 0.95 on the measured set with the stand-ins
# pre-trained for 20,000 steps with mirroring (as BiT-M was) and without (BENCHMARKS.md, issue 23); large sets
# search faster at 0.95.
DEFAULT_NEAR_THRESHOLD = 0.90


@dataclass(frozen=True)
class FailRule:
    """`--fail-on NAME[>N]`: the audit exits 1 when the count of NAME is above N (default 0)."""

    name: str
    limit: int = 0

    def __str__(self) -> str:
        return f"{self.name}>{self.limit}"


def parse_fail_rule(value: str) -> FailRule:
    name, sep, limit = value.strip().lower().replace(" ", "").partition(">")
    if name not in AUDIT_COUNTS or (sep and not limit.isdigit()):
        raise OptionError(
            f"{value!r}: use NAME or NAME>N with NAME one of {', '.join(AUDIT_COUNTS)} (e.g. leaks, label-issues>10)"
        )
    return FailRule(name, int(limit) if sep else 0)


def parse_threshold(value: str) -> float:
    try:
        threshold = float(value)
    except ValueError:
        threshold = math.nan
    if not 0 < threshold <= 1:
        raise OptionError(f"{value!r}: use a cosine similarity in (0, 1], e.g. {DEFAULT_NEAR_THRESHOLD}")
    return threshold


@dataclass(frozen=True)
class AuditOptions:
    data: DataSpec
    val: DataSpec | None = None  # default: DATA's validation part, if it has one
    test: DataSpec | None = None
    model: str = DEFAULT_MODEL
    revision: str | None = None
    output: Path | None = None  # audit.json, the CSVs and index.html (bitcli.pages.folder's rules); None: table only
    threshold: float = DEFAULT_NEAR_THRESHOLD
    exact_search: bool = False  # near-duplicate candidates from the full embeddings at any size (no sketch)
    min_images: int = 5  # a class with fewer images in a split is reported
    fail_on: tuple[FailRule, ...] = ()
    write_clean: Path | None = None  # a label file of the rows that no finding drops
    batch_size: int = 32
    device: str = "auto"
    workers: int = DEFAULT_WORKERS
    image_column: str | None = None
    label_column: str | None = None


# A Hub repo id, each part as the Hub allows it: letters, digits, '-', '_', '.', not starting or ending with '-' or
# '.', no '--' or '..', at most 96 characters (huggingface_hub's validate_repo_id, without importing it).
_HUB_NAME = re.compile(r"(?!.*(--|\.\.))[A-Za-z0-9_](?:[\w.-]{0,94}[A-Za-z0-9_])?", re.ASCII)
_LICENSE_ID = re.compile(r"[a-z0-9][a-z0-9.+-]{0,63}")


@dataclass(frozen=True)
class PushOptions:
    src: str  # a bit finetune run folder or any model spec
    repo: str  # OWNER/NAME on the Hub
    private: bool = False  # create the repo private (an existing public one is refused)
    revision: str | None = None  # the branch to commit to (created from main if missing); None: main
    commit_message: str | None = None  # None: "Upload <name> with bit push"
    onnx: bool = False  # also upload model.onnx
    dry_run: bool = False  # print the files and the card; upload nothing
    license: str | None = None  # the card's license id; None: not stated

    def __post_init__(self) -> None:
        if problem := repo_id_problem(self.repo):
            raise UsageError(f"{visible(self.repo)}: {problem}")
        if self.revision is not None and (problem := branch_problem(self.revision)):
            raise UsageError(f"--revision {visible(repr(self.revision))}: {problem}")
        if self.commit_message is not None and not self.commit_message.strip():
            raise UsageError("--commit-message: give a message (or leave the flag out)")
        if self.commit_message is not None and not commit_text(self.commit_message)[0]:
            raise UsageError("--commit-message: the first line is the commit's summary, and it is blank: start with it")
        if self.license is not None and not _LICENSE_ID.fullmatch(self.license):
            raise UsageError(f"--license {self.license!r}: a Hub license id in lower case, e.g. apache-2.0, mit, other")
