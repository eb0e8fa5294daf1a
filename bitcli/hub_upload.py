"""Publishing files to a Hugging Face Hub repo as one commit (`bit push`), through huggingface_hub.

The token is huggingface_hub's: `HF_TOKEN`, else the one `hf auth login` stored (never a command-line flag: it
would stay in the shell history). The repo is created if missing (`create_repo(exist_ok=True)`), the branch
too, and the files go up in one `create_commit`: LFS objects are uploaded first, and only the last request
makes the commit, which the Hub applies whole or not at all, so a push that fails midway leaves no revision
holding part of it. Every failure is one line that says what to do.

Every request has a timeout: huggingface_hub's HTTP client waits forever by default (`timeout=None`), and some
of its calls pass `timeout=None` themselves (repo_info, list_repo_files), so a Hub or proxy that accepts the
connection and goes silent would hang the push. For the time of the push, huggingface_hub makes its shared client
with a factory of bitcli's (`set_client_factory`, its supported way to configure the client): its own default
client, with a timeout of HF_HUB_DOWNLOAD_TIMEOUT seconds (huggingface_hub's default timeout for requests that
set none) for connecting and for each wait on the network after that, and a request hook that gives that timeout
to a request sent without one.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bitcli.errors import BitError, one_line
from bitcli.ui import human_size, quiet_logger

ALL_OR_NOTHING = "a push is one commit: the repo holds all of it or none of it"


@dataclass(frozen=True)
class Pushed:
    commit_url: str
    revision: str  # the branch the commit is on
    removed: tuple[str, ...]  # files of `remove` the branch held, deleted by the commit


def check_online() -> None:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise BitError("pushing needs the network, and HF_HUB_OFFLINE=1 forbids it; unset HF_HUB_OFFLINE")


def hub_token() -> str:
    """The token huggingface_hub would send, or one line saying how to give one."""
    from huggingface_hub import get_token

    try:
        token = get_token()
    except Exception as exc:  # noqa: BLE001 -- e.g. a failed OIDC exchange (HF_OIDC_RESOURCE)
        raise BitError(
            f"cannot get a Hugging Face token ({one_line(exc)}); set HF_TOKEN or run `hf auth login`"
        ) from None
    if token is None:
        raise BitError(
            "pushing needs a Hugging Face token with write access: set HF_TOKEN or run `hf auth login` "
            "(bit push takes no token flag: a token on the command line stays in the shell history)"
        )
    return token


def push_files(files: Sequence[Path], repo_id: str, *, token: str, branch: str | None, private: bool,
               message: str, description: str = "", remove: Sequence[str] = ()) -> Pushed:  # fmt: skip
    """Upload exactly `files` (by their names) to the top of `repo_id` at `branch` (None: main) in one commit,
    with the summary `message` and the (maybe empty) `description`, which also deletes the names in `remove`
    that the branch holds (an earlier push's, now stale)."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, constants

    if not sys.stderr.isatty():
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    api = HfApi(token=token)
    revision = branch or constants.DEFAULT_REVISION
    with _requests_time_out(), quiet_logger("huggingface_hub"), _one_line_errors(api, repo_id, files):
        visibility = _visibility(api, repo_id)
        if private and visibility == "public":
            raise BitError(
                f"{repo_id} exists and is public; --private does not change an existing repo's visibility: make it "
                f"private in its settings on the Hub, or push to a new repo"
            )
        # private=None lets an organisation's default visibility apply to a new repo.
        api.create_repo(repo_id, private=True if private else None, exist_ok=True)
        if revision != constants.DEFAULT_REVISION:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        held = set(api.list_repo_files(repo_id, revision=revision)) if remove else set()
        removed = tuple(name for name in remove if name in held)
        operations: list[CommitOperationAdd | CommitOperationDelete] = [
            CommitOperationAdd(path_in_repo=f.name, path_or_fileobj=str(f)) for f in files
        ]
        operations += [CommitOperationDelete(path_in_repo=name) for name in removed]
        info = api.create_commit(repo_id, operations, commit_message=message, commit_description=description or None,
                                 revision=revision)  # fmt: skip
    return Pushed(commit_url=str(info.commit_url), revision=revision, removed=removed)


def _visibility(api: Any, repo_id: str) -> str | None:
    """ "public" or "private" for an existing repo, None for one this token cannot see (a new one). The first
    request."""
    from huggingface_hub import errors

    try:
        info = api.repo_info(repo_id)
    except errors.RepositoryNotFoundError:
        return None
    if info.private is None:  # not said: unknown
        return None
    return "private" if info.private else "public"


@contextmanager
def _requests_time_out() -> Iterator[None]:
    """huggingface_hub's requests in the block give up after HF_HUB_DOWNLOAD_TIMEOUT seconds of silence (connect,
    read, write, pool). Its shared client is made again from a factory that sets the timeout, and afterwards from
    its default factory again (bitcli sets no other)."""
    import httpx2
    from huggingface_hub import constants, set_client_factory
    from huggingface_hub.utils._http import default_client_factory

    seconds = float(constants.HF_HUB_DOWNLOAD_TIMEOUT)

    def bound(request: httpx2.Request) -> None:  # a caller's explicit timeout=None would wait forever
        waits = request.extensions.get("timeout") or dict.fromkeys(("connect", "read", "write", "pool"))
        request.extensions["timeout"] = {kind: seconds if wait is None else wait for kind, wait in waits.items()}

    def client_with_timeout() -> httpx2.Client:
        client = default_client_factory()
        client.timeout = httpx2.Timeout(seconds)
        client.event_hooks = {**client.event_hooks, "request": [*client.event_hooks["request"], bound]}
        return client

    set_client_factory(client_with_timeout)  # closes the current client: the next request makes a timed one
    try:
        yield
    finally:
        set_client_factory(default_client_factory)


@contextmanager
def _one_line_errors(api: Any, repo_id: str, files: Sequence[Path]) -> Iterator[None]:
    """huggingface_hub's and the network's exceptions as one BitError line with the fix."""
    import httpx2
    from huggingface_hub import errors

    try:
        yield
    except BitError:
        raise
    except errors.HFValidationError as exc:
        raise BitError(f"{repo_id}: not a valid Hub repo id ({one_line(exc)})") from None
    except Exception as exc:  # huggingface_hub wraps failures (a RuntimeError around an upload's); re-raised
        for cause in _causes(exc):
            if isinstance(cause, errors.HfHubHTTPError) and cause.response is not None:
                raise _http_error(cause, api, repo_id, files) from None
            if isinstance(cause, httpx2.TimeoutException):
                raise BitError(
                    f"the Hub at {api.endpoint} did not answer in time ({type(cause).__name__}); check the network or "
                    f"HF_ENDPOINT (HF_HUB_DOWNLOAD_TIMEOUT sets the wait), then run again ({ALL_OR_NOTHING})"
                ) from None
            if isinstance(cause, httpx2.TransportError):
                raise BitError(
                    f"cannot reach the Hub at {api.endpoint} ({one_line(cause)}); check the network or HF_ENDPOINT, "
                    f"then run again ({ALL_OR_NOTHING})"
                ) from None
        if isinstance(exc, ValueError) and "Invalid metadata in README.md" in str(exc):
            raise BitError(
                f"the Hub refused the model card's metadata ({one_line(exc)}); check --license "
                "(an id the Hub knows: apache-2.0, mit, cc-by-4.0, other ...)"
            ) from None
        raise


def _causes(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _http_error(exc: Any, api: Any, repo_id: str, files: Sequence[Path]) -> BitError:
    status = exc.response.status_code
    said = " ".join(str(exc.server_message or exc.response.reason_phrase or "").split())[:160]
    said = f"{status}: {said}" if said else str(status)
    if status == 401:
        return BitError(
            f"the Hub refused the token ({said}): it is invalid or expired; set HF_TOKEN to a token with write "
            "access or run `hf auth login`"
        )
    if status == 403:
        return BitError(
            f"no write access to {repo_id} ({said}): it belongs to another account or organisation{_who(api)}, or the "
            f"token is read-only; push to a repo of your own (OWNER/NAME) or use a token with write access"
        )
    if status == 413:
        largest = max(files, key=lambda f: f.stat().st_size)
        return BitError(
            f"the Hub refused the upload as too large ({said}; the largest file is {largest.name}, "
            f"{human_size(largest.stat().st_size)}): check the repo's storage quota and the Hub's limits "
            f"(https://huggingface.co/docs/hub/storage-limits); {ALL_OR_NOTHING}"
        )
    if status == 404:
        return BitError(f"the Hub has no repo {repo_id} that this token can see ({said}); check OWNER/NAME")
    if status >= 500:
        return BitError(f"the Hub failed ({said}); try again later ({ALL_OR_NOTHING})")
    return BitError(f"the Hub refused the push ({said}); {ALL_OR_NOTHING}")


def _who(api: Any) -> str:
    """` (this token is USER's)`, when the Hub says whose token it is."""
    try:
        return f" (this token is {api.whoami()['name']}'s)"
    except Exception:  # noqa: BLE001 -- a detail of the message: without it the message still says what to do
        return ""
