"""Turn a model spec (local path, Hugging Face repo id, Google's published name) into a Checkpoint."""

from __future__ import annotations

import base64
import binascii
import hashlib
import http.client
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

from bitcli import formats
from bitcli.architectures import is_published_name
from bitcli.errors import BitError, one_line
from bitcli.formats import FORMATS, MODEL_FILE_SUFFIXES, Checkpoint, read_class_names, read_safetensors
from bitcli.ui import quiet_logger
from bitcli.writes import replaced_when_complete

# What bit finetune writes (bitcli.finetune's CONFIG_FILE and STATE_FORMAT, without importing its training code).
FINETUNE_CONFIG = "finetune_config.json"
FINETUNE_STATE_FORMAT = "bitcli-finetune-state/"
GOOGLE_BASE_URL = "https://storage.googleapis.com/bit_models"


def load_checkpoint(spec: str, revision: str | None = None, labels_file: str | None = None) -> Checkpoint:
    path = Path(spec).expanduser()
    if path.exists():
        ckpt = read_local(path)
    elif is_published_name(spec.removesuffix(".npz")):
        cached = download_published(spec.removesuffix(".npz"))
        try:
            ckpt = formats.read(cached)
        except BitError as exc:  # validated before it entered the cache, so damaged since
            raise BitError(f"{exc}; delete {cached} to download it again") from None
    elif _looks_local(spec):
        raise BitError(f"model {spec!r}: no such file or folder")
    elif _looks_like_repo_id(spec):
        try:
            snapshot = hub_snapshot(spec, revision)
        except BitError as exc:  # `runs/typo` could be either: say both what is not here and what the Hub said
            raise BitError(f"model {spec!r}: no such file or folder, and as a Hub repo id: {exc}") from None
        ckpt = read_local(snapshot)
    else:
        raise BitError(
            f"model {spec!r}: no such file or folder, and not a Hub repo id (org/name) "
            "or a published BiT name (e.g. BiT-M-R50x1)"
        )
    if labels_file is not None:
        ckpt.labels = read_class_names(Path(labels_file), ckpt.config.num_classes)
    return ckpt


def read_local(path: Path) -> Checkpoint:
    """A local model file or folder, in whichever format it is (bitcli.formats), after refusing what a bit
    finetune run holds besides its model."""
    if path.is_dir():
        if not (path / "config.json").is_file() and (path / FINETUNE_CONFIG).is_file():
            raise BitError(
                f"{path}: this bit finetune run has not written its model yet (config.json, model.safetensors); "
                f"finish it with `bit finetune DATA --output {path} --resume`"
            )
    elif path.suffix.lower() == ".safetensors":
        meta = read_safetensors(path)[1]
        _refuse_training_state(path, meta)
        if (
            meta.get("format") != "bitcli"
            and path.name == "model.safetensors"
            and (path.parent / "config.json").is_file()
        ):
            path = path.parent  # the weights of a transformers or timm folder: read with their config
    return formats.read(path)


def _looks_local(spec: str) -> bool:
    """A path, not a Hub id (exactly `owner/name`): ./x, ~/x, /x, a/b/c, a\\b, or a model file's name."""
    return (
        spec.startswith((".", "~", "/"))
        or "\\" in spec
        or spec.count("/") > 1
        or spec.lower().endswith(MODEL_FILE_SUFFIXES)
    )


def _refuse_training_state(path: Path, meta: dict[str, str]) -> None:
    """A run's checkpoint.safetensors holds weights under other names, momentum and RNG state: say what to use."""
    if not meta.get("format", "").startswith(FINETUNE_STATE_FORMAT):
        return
    model = path.parent / "model.safetensors"
    if model.is_file():
        use = f"use {model} (or the run folder {path.parent})"
    else:
        use = f"the run has not written its model ({model}) yet: finish it with `bit finetune DATA --output {path.parent} --resume`"
    raise BitError(f"{path}: is the resumable training state of a bit finetune run, not a model; {use}")


def _looks_like_repo_id(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "~")) and "\\" not in spec


# ----------------------------------------------------------------------------------------------------------
# Hugging Face Hub (HF_HOME, HF_HUB_CACHE and HF_HUB_OFFLINE are honoured by huggingface_hub itself)


def hub_snapshot(repo_id: str, revision: str | None) -> Path:
    """The folder holding a Hub repo's config.json, weights and preprocessor_config.json: cached or downloaded.

    snapshot_download lists the repo once and fetches only the files that exist; when the Hub cannot be
    reached it falls straight back to the cached snapshot. (hf_hub_download per file retries every uncached
    optional file, e.g. a timm repo's absent preprocessor_config.json, for about 25 s first.) safetensors is
    preferred; pytorch_model.bin is fetched only for a repo without it. Download progress bars show only on a
    terminal, like bitcli's own.
    """
    if not sys.stderr.isatty():
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    online = hub_answers(repo_id, revision)
    wanted = ["config.json", "preprocessor_config.json", "model.safetensors"]
    folder = fetch_snapshot(repo_id, revision, wanted, online=online)
    if not (folder / "config.json").is_file():
        raise _absent(
            repo_id, revision, "config.json", online=online, consequence="it is not a transformers or timm model"
        )
    if not (folder / "model.safetensors").is_file():
        folder = fetch_snapshot(repo_id, revision, ["pytorch_model.bin"], online=online)
        if not (folder / "pytorch_model.bin").is_file():
            raise _absent(repo_id, revision, "model.safetensors or pytorch_model.bin", online=online)
    return folder


def hub_answers(repo_id: str, revision: str | None, repo_type: str = "model") -> bool | None:
    """Ask the Hub about the repo: True if it answered, None if it said nothing within HF_HUB_ETAG_TIMEOUT (10 s),
    False for offline mode or any other failure (snapshot_download then reports it or uses the cache).

    snapshot_download's own request has no timeout: a Hub or proxy that accepts the connection and never
    replies would hang `bit` forever, even for a cached model."""
    import httpx2
    from huggingface_hub import HfApi, constants

    if constants.HF_HUB_OFFLINE:
        return False
    try:
        with quiet_logger("huggingface_hub"):
            HfApi().repo_info(
                repo_id,
                revision=revision or constants.DEFAULT_REVISION,
                repo_type=repo_type,
                timeout=constants.HF_HUB_ETAG_TIMEOUT,
            )
    except httpx2.TimeoutException:
        return None
    except Exception:  # noqa: BLE001 -- snapshot_download meets the same failure and turns it into the right error
        return False
    return True


def _where(repo_id: str, revision: str | None) -> str:
    return repo_id + (f"@{revision}" if revision else "")


def not_cached(repo_id: str, revision: str | None, what: str, repo_type: str = "model") -> BitError:
    """The error for `what` of a repo (a model, or a data set's files: bitcli.sources.hub) that is not cached and
    cannot be downloaded now: where the cache is and how to fill it."""
    from huggingface_hub import constants

    why = "HF_HUB_OFFLINE=1 forbids downloading" if constants.HF_HUB_OFFLINE else "the Hub cannot be reached"
    flag = "" if repo_type == "model" else f" --repo-type {repo_type}"
    return BitError(
        f"{what} {_where(repo_id, revision)!r} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and {why}; "
        f"run `hf download{flag} {repo_id}` on a connected machine, or pass a local {repo_type} path"
    )


def _absent(
    repo_id: str, revision: str | None, filename: str, *, online: bool | None, consequence: str = ""
) -> BitError:
    """A file missing from the snapshot: the repo lacks it if the Hub just listed the repo, else the cache does."""
    if not online:
        return not_cached(repo_id, revision, f"{filename} of model")
    return BitError(
        f"Hub repo {_where(repo_id, revision)!r} has no {filename}" + (f"; {consequence}" if consequence else "")
    )


def fetch_snapshot(
    repo_id: str, revision: str | None, files: list[str], *, online: bool | None, repo_type: str = "model"
) -> Path:
    """The snapshot folder holding the repo's `files` (patterns), cached or downloaded (only the cache when
    `online` is None: see hub_answers); every Hub failure is one line. Models and data sets (bitcli.sources.hub)
    alike."""
    from huggingface_hub import errors as hf_errors
    from huggingface_hub import snapshot_download

    where = _where(repo_id, revision)
    repo = "Hub repo" if repo_type == "model" else f"Hub {repo_type}"
    try:
        with quiet_logger("huggingface_hub"):
            return Path(snapshot_download(repo_id, revision=revision, allow_patterns=files, local_files_only=online is None,
                                          repo_type=repo_type))  # fmt: skip
    except hf_errors.IncompleteSnapshotError as exc:  # not online, and a file the Hub once listed was never fetched
        return Path(exc.snapshot_path)  # the caller checks that what it needs is there
    except hf_errors.LocalEntryNotFoundError:
        raise not_cached(repo_id, revision, repo_type, repo_type) from None
    except hf_errors.RevisionNotFoundError:
        raise BitError(f"{repo} {repo_id!r} has no revision {revision!r}") from None
    except hf_errors.GatedRepoError:
        raise BitError(f"{repo} {repo_id!r} is gated; accept its terms and log in with `hf auth login`") from None
    except hf_errors.RepositoryNotFoundError:
        raise BitError(f"no {repo} {repo_id!r} (check the spelling; private repos need `hf auth login`)") from None
    except hf_errors.HFValidationError as exc:
        raise BitError(f"{repo_type} {repo_id!r}: not a valid Hub repo id ({exc})") from None
    except (hf_errors.HfHubHTTPError, OSError) as exc:
        raise BitError(f"cannot download {where!r} from the Hub: {one_line(exc)}") from None


# ----------------------------------------------------------------------------------------------------------
# Google's published .npz files


def bitcli_cache() -> Path:
    root = os.environ.get("BITCLI_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "bitcli")
    return Path(root).expanduser()


def download_published(name: str) -> Path:
    """`BiT-M-R50x1` -> the cached .npz, downloading it first if needed.

    The download goes to a temporary name beside the target; its size (Content-Length) and MD5
    (x-goog-hash) are checked and it must parse as a BiT .npz before it is renamed into the cache, so the
    cache never holds a partial or corrupt file. The architecture comes from the tensor shapes, not the name.
    """
    target = bitcli_cache() / f"{name}.npz"
    if target.is_file():
        return target
    base = os.environ.get("BITCLI_MODELS_URL", GOOGLE_BASE_URL).rstrip("/")
    url = f"{base}/{name}.npz"
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("BITCLI_OFFLINE") == "1":
        raise BitError(f"{name}: not in the cache ({target}) and offline mode forbids downloading {url}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BitError(f"cannot create the model cache {target.parent} ({exc.strerror}); set BITCLI_CACHE") from None
    try:
        with replaced_when_complete(target) as tmp:
            _download(url, tmp, name)
            try:
                FORMATS["npz"].read(tmp)  # a file that does not parse as a BiT .npz never enters the cache
            except BitError as exc:
                problem = str(exc).removeprefix(f"{tmp}: ")
                raise BitError(f"{name}: the file downloaded from {url} is not a usable BiT .npz ({problem})") from None
    except OSError as exc:  # creating, syncing or renaming the temporary file (the download's own are BitErrors)
        raise BitError(
            f"{name}: cannot write to the model cache {target.parent} ({exc.strerror or one_line(exc)}); "
            "free space or set BITCLI_CACHE"
        ) from None
    return target


def _download(url: str, dest: Path, name: str) -> None:
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    from bitcli.ui import stderr_console

    try:
        response = urllib.request.urlopen(url, timeout=30)
    except urllib.error.HTTPError as exc:
        hint = "check the name (e.g. BiT-M-R50x1)" if exc.code == 404 else "try again later"
        raise BitError(f"{name}: download failed, HTTP {exc.code} from {url}; {hint}") from None
    except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise BitError(f"{name}: cannot reach {url} ({reason}); download it elsewhere and pass the .npz path") from None
    with response:
        length = response.headers.get("Content-Length")
        expected = int(length) if length is not None and length.strip().isdigit() else None
        md5_expected = _goog_md5(response.headers.get_all("x-goog-hash") or [], name, url)
        md5, received = hashlib.md5(), 0
        with (
            Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                     console=stderr_console(), transient=True, disable=not sys.stderr.isatty()) as progress,
            open(dest, "wb") as f,
        ):  # fmt: skip
            task = progress.add_task(f"downloading {name}", total=expected)
            while True:
                try:
                    chunk = response.read(1 << 20)
                except (OSError, http.client.HTTPException) as exc:
                    raise BitError(
                        f"{name}: download from {url} broke off after {received} bytes ({exc or type(exc).__name__}); run again"
                    ) from None
                if not chunk:
                    break
                try:
                    f.write(chunk)
                except OSError as exc:
                    raise BitError(
                        f"{name}: cannot write to the model cache {dest.parent} ({exc.strerror}); free space or set BITCLI_CACHE"
                    ) from None
                md5.update(chunk)
                received += len(chunk)
                progress.update(task, advance=len(chunk))
    if expected is not None and received != expected:
        raise BitError(f"{name}: download from {url} is incomplete ({received} of {expected} bytes); run again")
    if md5_expected is not None and md5.digest() != md5_expected:
        raise BitError(f"{name}: download from {url} does not match the server's MD5; the file is corrupt, run again")


def _goog_md5(values: list[str], name: str, url: str) -> bytes | None:
    """Google Cloud Storage sends `x-goog-hash: crc32c=...,md5=<base64>` (possibly as two headers)."""
    for value in values:
        for part in value.split(","):
            key, _, b64 = part.strip().partition("=")
            if key == "md5":
                try:
                    digest = base64.b64decode(b64, validate=True)
                except binascii.Error:
                    digest = b""
                if len(digest) != 16:
                    raise BitError(f"{name}: {url} sent a malformed x-goog-hash md5 ({b64!r}); try again later")
                return digest
    return None
