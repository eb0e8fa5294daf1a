"""A loopback Hugging Face Hub for the tests: an http.server on 127.0.0.1 that answers the requests the real
huggingface_hub makes (bitcli is run against it with HF_ENDPOINT=hub.url), from folders on disk.

Downloads (`snapshot_download`, bitcli.hub), with huggingface_hub 2.4:

    GET  /api/models/{repo}[/revision/{rev}]           repo info: its "sha" turns a branch/tag into a commit
    GET  /api/models/{repo}/tree/{commit}?recursive=true&expand=false
                                                       the file listing (cached on disk as trees/{commit}.json)
    HEAD /{repo}/resolve/{commit}/{file}               X-Repo-Commit, ETag (the blob's name in the cache), size
    GET  /{repo}/resolve/{commit}/{file}               the bytes

and, once a day per HF_HOME (it is cached in $HF_HOME/.agent_harnesses.json) unless HF_HUB_DISABLE_TELEMETRY=1,
`GET /api/agent-harnesses`: building the User-Agent header fetches a registry of AI-agent env vars. That call is
telemetry, not part of resolving a model, so the tests look at `hub.model_requests()`, which leaves it out.

Uploads (`create_repo`, `create_branch`, `create_commit`: bitcli.hub_upload), with HF_HUB_DISABLE_XET=1 (this
server speaks git LFS, not the Xet storage protocol that hf_xet would use):

    POST /api/repos/create                             a repo, with the Hub's initial commit (.gitattributes)
    POST /api/models/{repo}/branch/{branch}            a branch from main (or "startingPoint")
    POST /api/validate-yaml                            the README.md's metadata, checked before any upload
    POST /api/models/{repo}/preupload/{rev}            which files go to LFS (by name, and binary samples)
    POST /{repo}.git/info/lfs/objects/batch            where to PUT each LFS object (none for a stored one)
    PUT  /lfs-storage/{sha256}                         the object's bytes (the real Hub: a presigned S3 URL)
    POST /{repo}.git/info/lfs/objects/verify           the object arrived whole
    GET  /api/models/{repo}/tree/{rev}?recursive=...   the files a branch holds (as for downloads)
    POST /api/models/{repo}/commit/{rev}               NDJSON: a header, then files (base64), lfsFiles (oids)
                                                       and deletedFiles
    GET  /api/whoami-v2                                who the token is

Writes need `Authorization: Bearer TOKEN` with a token of `tokens` (else 401) whose user owns the namespace or
is a member of it (`orgs`; else 403). A private repo is invisible (404) to everyone else. A commit becomes a new
folder under `storage`, so the download side serves it back; nothing is stored until the commit request itself.

Every request is recorded in `requests`; `fail_with` makes every request fail with a status (the Hub is down)
and `fail_on[kind]` one kind of request ("info", "tree", "create", "preupload", "lfs-upload", "commit", ...) with a
status, or with "drop": the connection closes without an answer (the network breaks there), or with "hang": the
request is read and never answered (a Hub or proxy gone silent) until `reset` or the end of the server (at most
HANG_LIMIT seconds), then dropped.
A commit's summary is kept in repo["messages"], its description in repo["descriptions"] (by commit id).
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import shutil
import socket
import threading
from pathlib import Path
from urllib.parse import unquote, urlsplit

import yaml

TELEMETRY = "/api/agent-harnesses"
LFS_SUFFIXES = (".safetensors", ".bin", ".onnx")  # what the Hub stores in LFS by name (tree "lfs", X-Linked-Etag)
HANG_LIMIT = 60  # seconds a "hang" answer waits at most, so that a test that forgets to reset holds no thread
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.onnx filter=lfs diff=lfs merge=lfs -text\n"


def git_blob_sha1(data: bytes) -> str:
    """A file's git object id, which the Hub reports as `oid` and as the ETag of non-LFS files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def is_lfs(name: str, data: bytes) -> bool:
    """The Hub keeps binary files in LFS: by name (.gitattributes) or by a NUL byte in the first 512 bytes."""
    return name.endswith(LFS_SUFFIXES) or b"\0" in data[:512]


def etag_of(path: Path) -> str:
    """The Hub's ETag: the sha256 for LFS files, the git blob id otherwise. It names the blob in the cache."""
    data = path.read_bytes()
    return hashlib.sha256(data).hexdigest() if is_lfs(path.name, data) else git_blob_sha1(data)


def closed_port_url() -> str:
    """An endpoint where nothing listens: connecting is refused at once, as with no network."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


class Drop(Exception):
    """Close the connection without an answer."""


class FakeHub:
    """The Hub endpoints listed above, for repos added with `add` or created through the API."""

    def __init__(self, storage: Path | None = None) -> None:
        self.storage = storage  # where commits made through the API are written (None: uploads are refused)
        # repo id -> {"commits": {sha: folder}, "refs": {name: sha}, "parents": {sha: sha}, "messages": {sha: str},
        #             "private": bool}
        self.repos: dict[str, dict] = {}
        self.tokens: dict[str, str] = {}  # token -> user name
        self.orgs: dict[str, set[str]] = {}  # user name -> organisations they may write to
        self.lfs: dict[str, bytes] = {}  # sha256 -> bytes of every LFS object PUT
        self.requests: list[tuple[str, str]] = []
        self.fail_with: int | None = None  # e.g. 503: every request gets that status (the Hub is down)
        self.fail_on: dict[str, int | str] = {}  # request kind -> status, "drop" or "hang"
        self._hung = threading.Event()  # set to release the requests a "hang" holds
        self.break_downloads: set[str] = set()  # file names whose GET fails with 500 after a good HEAD
        self._lock = threading.Lock()
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                hub.handle(self, "GET")

            def do_HEAD(self) -> None:
                hub.handle(self, "HEAD")

            def do_POST(self) -> None:
                hub.handle(self, "POST")

            def do_PUT(self) -> None:
                hub.handle(self, "PUT")

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)  # snapshot_download uses 8 threads
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hung.set()
        self.server.shutdown()
        self.server.server_close()

    def add(self, repo_id: str, folder: Path, commit: str, refs: tuple[str, ...] = ("main",)) -> None:
        repo = self.repos.setdefault(repo_id, _new_repo(private=False))
        repo["commits"][commit] = folder
        repo["refs"].update(dict.fromkeys(refs, commit))

    def reset(self) -> None:
        self._hung.set()  # the requests held so far end (dropped); later "hang"s wait on a new event
        self._hung = threading.Event()
        self.requests.clear()
        self.fail_with = None
        self.fail_on.clear()
        self.break_downloads.clear()

    def model_requests(self) -> list[tuple[str, str]]:
        return [(m, p) for m, p in self.requests if p != TELEMETRY]

    def files(self, repo_id: str, rev: str = "main") -> dict[str, bytes]:
        """{name: bytes} of a repo's revision."""
        repo = self.repos[repo_id]
        folder = repo["commits"][repo["refs"].get(rev, rev)]
        return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}

    def history(self, repo_id: str, rev: str = "main") -> list[str]:
        """The commit messages of a revision, newest first."""
        repo = self.repos[repo_id]
        sha: str | None = repo["refs"][rev]
        messages = []
        while sha is not None:
            messages.append(repo["messages"].get(sha, ""))
            sha = repo["parents"].get(sha)
        return messages

    # --- request handling ---------------------------------------------------------------------------------

    def handle(self, h: http.server.BaseHTTPRequestHandler, method: str) -> None:
        self.requests.append((method, h.path))
        body = _read_body(h) if method in ("POST", "PUT") else b""
        if self.fail_with is not None:
            return self.reply(h, method, self.fail_with, body=b"Service Unavailable")
        if h.path == TELEMETRY:  # what the Hub serves when no harness is registered
            return self.reply_json(h, method, {"standardEnvVars": [], "harnesses": {}})
        parts = [unquote(p) for p in urlsplit(h.path).path.strip("/").split("/")]
        try:
            if method in ("GET", "HEAD"):
                return self.handle_read(h, method, parts)
            return self.handle_write(h, method, parts, body)
        except Drop:
            h.close_connection = True  # no status line at all: the client sees the connection end

    def failure(self, h, method: str, kind: str) -> bool:
        """Answer with fail_on[kind] (or drop the connection) if that kind of request is to fail."""
        status = self.fail_on.get(kind)
        if status is None:
            return False
        if status == "hang":
            self._hung.wait(HANG_LIMIT)
            raise Drop
        if status == "drop":
            raise Drop
        self.reply_error(h, method, int(status), "Injected", f"{kind} refused with {status} by the test")
        return True

    def handle_read(self, h, method: str, parts: list[str]) -> None:
        if parts == ["api", "whoami-v2"]:
            if (user := self.user(h)) is None:
                return self.reply_error(h, method, 401, "Unauthorized", "Invalid credentials in Authorization header")
            orgs = [{"name": org} for org in sorted(self.orgs.get(user, ()))]
            return self.reply_json(h, method, {"type": "user", "name": user, "orgs": orgs})
        if parts[:2] == ["api", "models"] and (
            len(parts) == 4 or (len(parts) == 6 and parts[4] in ("revision", "tree"))
        ):
            repo_id = "/".join(parts[2:4])
            kind, rev = (parts[4], parts[5]) if len(parts) == 6 else ("revision", "main")
            failing = "info" if kind == "revision" else "tree"
            if self.failure(h, method, failing) or (found := self.resolve(h, method, repo_id, rev)) is None:
                return
            commit, folder = found
            files = sorted(p for p in folder.iterdir() if p.is_file())
            if kind == "revision":  # model_info: huggingface_hub reads "sha" (and ModelInfo needs "id")
                info = {"id": repo_id, "sha": commit, "private": self.repos[repo_id]["private"],
                        "siblings": [{"rfilename": f.name} for f in files]}  # fmt: skip
                return self.reply_json(h, method, info)
            # The real Hub pages at 1000 entries with a `Link: <...>; rel="next"` header; one page holds these.
            return self.reply_json(h, method, [self.tree_entry(f) for f in files])
        if len(parts) >= 5 and parts[2] == "resolve":
            repo_id, rev, filename = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
            if (found := self.resolve(h, method, repo_id, rev)) is None:
                return
            commit, folder = found
            path = folder / filename
            if not path.is_file():  # hf_hub_download reads X-Repo-Commit even here (to cache the absence)
                return self.reply_error(h, method, 404, "EntryNotFound", f"{filename} does not exist", commit)
            # huggingface_hub needs X-Repo-Commit and an ETag (else FileMetadataError); the size comes from
            # X-Linked-Size or Content-Length. The real Hub redirects LFS files to a CDN with X-Linked-*
            # headers; serving them here directly, with the same headers, keeps the server small.
            if method == "GET" and filename in self.break_downloads:  # its HEAD went well, its download fails
                return self.reply(h, method, 500, body=b"Internal Server Error")
            etag, data = etag_of(path), path.read_bytes()
            headers = {"X-Repo-Commit": commit, "ETag": f'"{etag}"', "Content-Type": "application/octet-stream"}
            if is_lfs(path.name, data):
                headers |= {"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(len(data))}
            return self.reply(h, method, 200, headers, data)
        return self.reply(h, method, 404, body=b"Not Found")

    def handle_write(self, h, method: str, parts: list[str], body: bytes) -> None:
        if method == "PUT" and len(parts) == 2 and parts[0] == "lfs-storage":  # presigned: no Authorization
            if not self.failure(h, method, "lfs-upload"):
                self.store_lfs(h, method, parts[1], body)
            return
        if parts == ["api", "validate-yaml"]:
            if not self.failure(h, method, "validate"):
                self.validate_yaml(h, method, json.loads(body))
            return
        route = _write_route(parts)
        if route is None:
            return self.reply(h, method, 404, body=b"Not Found")
        kind, repo_id, rest = route
        if self.failure(h, method, kind):
            return
        user = self.user(h)
        if user is None:
            return self.reply_error(h, method, 401, "Unauthorized", "Invalid credentials in Authorization header")
        if kind == "create":
            return self.create_repo(h, method, user, json.loads(body))
        repo = self.repos.get(repo_id)
        if repo is None or (repo["private"] and not self.may_write(user, repo_id)):
            return self.reply_error(h, method, 404, "RepoNotFound", "Repository not found")
        if not self.may_write(user, repo_id):
            return self.reply_error(h, method, 403, "Forbidden", f"You don't have write access to {repo_id}")
        with self._lock:
            return getattr(self, kind.replace("-", "_"))(h, method, repo_id, rest, body)

    def user(self, h) -> str | None:
        auth = h.headers.get("authorization", "")
        return self.tokens.get(auth.removeprefix("Bearer ")) if auth.startswith("Bearer ") else None

    def may_write(self, user: str, repo_id: str) -> bool:
        namespace = repo_id.partition("/")[0]
        return namespace == user or namespace in self.orgs.get(user, set())

    # --- uploads ----------------------------------------------------------------------------------------------

    def create_repo(self, h, method: str, user: str, payload: dict) -> None:
        namespace = payload.get("organization") or user
        repo_id = f"{namespace}/{payload['name']}"
        if not self.may_write(user, repo_id):
            message = f"You don't have the rights to create a model under the namespace {namespace!r}"
            return self.reply_error(h, method, 403, "Forbidden", message)
        with self._lock:
            if repo_id in self.repos:  # the Hub's 409 names the repo's URL, which create_repo(exist_ok=True) returns
                body = {"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"}
                return self.reply(h, method, 409, {"Content-Type": "application/json"}, json.dumps(body).encode())
            repo = self.repos[repo_id] = _new_repo(private=payload.get("visibility") == "private")
            self.commit_files(repo_id, repo, "main", {".gitattributes": GITATTRIBUTES}, "initial commit")
        self.reply_json(h, method, {"url": f"{self.url}/{repo_id}", "name": repo_id})

    def branch(self, h, method: str, repo_id: str, rest: str, body: bytes) -> None:
        repo = self.repos[repo_id]
        if rest in repo["refs"]:
            return self.reply_error(h, method, 409, "Conflict", f"Reference already exists: refs/heads/{rest}")
        start = json.loads(body or b"{}").get("startingPoint", "main")
        repo["refs"][rest] = repo["refs"].get(start, start)
        self.reply_json(h, method, {})

    def validate_yaml(self, h, method: str, payload: dict) -> None:
        """What the Hub checks before an upload: the metadata block parses as a mapping."""
        content = payload["content"]
        errors = []
        if content.startswith("---\n"):
            try:
                meta = yaml.safe_load(content[4:].split("\n---\n", 1)[0])
            except yaml.YAMLError as exc:
                meta, errors = None, [{"message": f"YAML does not parse: {exc}"}]
            if not errors and not isinstance(meta, dict):
                errors = [{"message": "metadata must be a mapping"}]
        status = 400 if errors else 200
        self.reply(h, method, status, {"Content-Type": "application/json"},
                   json.dumps({"errors": errors, "warnings": []}).encode())  # fmt: skip

    def preupload(self, h, method: str, repo_id: str, rest: str, body: bytes) -> None:
        if (found := self.resolve(h, method, repo_id, rest)) is None:
            return
        commit, folder = found
        files = []
        for entry in json.loads(body)["files"]:
            sample, existing = base64.b64decode(entry["sample"]), folder / entry["path"]
            oid = git_blob_sha1(existing.read_bytes()) if existing.is_file() else None
            mode = "lfs" if is_lfs(entry["path"], sample) else "regular"
            files.append({"path": entry["path"], "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        self.reply_json(h, method, {"files": files, "commitOid": commit})

    def lfs_batch(self, h, method: str, repo_id: str, rest: str, body: bytes) -> None:
        objects = []
        for obj in json.loads(body)["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.lfs:  # a stored object needs no upload: no "actions"
                entry["actions"] = {
                    "upload": {"href": f"{self.url}/lfs-storage/{obj['oid']}", "header": {}},
                    "verify": {"href": f"{self.url}/{repo_id}.git/info/lfs/objects/verify", "header": {}},
                }
            objects.append(entry)
        self.reply(h, method, 200, {"Content-Type": "application/vnd.git-lfs+json"},
                   json.dumps({"transfer": "basic", "objects": objects}).encode())  # fmt: skip

    def store_lfs(self, h, method: str, oid: str, body: bytes) -> None:
        if hashlib.sha256(body).hexdigest() != oid:
            return self.reply_error(h, method, 400, "BadDigest", "the content does not match its sha256")
        self.lfs[oid] = body
        self.reply(h, method, 200)

    def lfs_verify(self, h, method: str, repo_id: str, rest: str, body: bytes) -> None:
        obj = json.loads(body)
        if len(self.lfs.get(obj["oid"], b"")) != obj["size"] or obj["oid"] not in self.lfs:
            return self.reply_error(h, method, 404, "NotFound", "object not found")
        self.reply_json(h, method, {})

    def commit(self, h, method: str, repo_id: str, rest: str, body: bytes) -> None:
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = lines[0]["value"]
        files: dict[str, bytes | None] = {}  # None: deleted
        for line in lines[1:]:
            value = line["value"]
            if line["key"] == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif line["key"] == "lfsFile":
                if value["oid"] not in self.lfs:
                    return self.reply_error(h, method, 422, "LfsObjectMissing", f"{value['path']}: LFS object missing")
                files[value["path"]] = self.lfs[value["oid"]]
            elif line["key"] == "deletedFile":
                files[value["path"]] = None
            else:
                return self.reply_error(h, method, 400, "Unsupported", f"operation {line['key']} is not supported")
        repo = self.repos[repo_id]
        if rest not in repo["refs"]:
            return self.reply_error(h, method, 404, "RevisionNotFound", f"Invalid rev id: {rest}")
        sha = self.commit_files(repo_id, repo, rest, files, header["summary"])
        repo["descriptions"][sha] = header.get("description", "")
        self.reply_json(h, method, {"commitUrl": f"{self.url}/{repo_id}/commit/{sha}", "commitOid": sha})

    def commit_files(self, repo_id: str, repo: dict, ref: str, files: dict[str, bytes | None], message: str) -> str:
        """A new commit on `ref`: its parent's files with `files` added, replaced or (None) deleted."""
        assert self.storage is not None, "FakeHub(storage=...) stores commits"
        parent = repo["refs"].get(ref)
        sha = hashlib.sha1(f"{repo_id}\0{parent}\0{message}\0{len(repo['commits'])}".encode()).hexdigest()
        folder = self.storage / repo_id.replace("/", "--") / sha
        folder.mkdir(parents=True)
        if parent is not None:
            for f in repo["commits"][parent].iterdir():
                shutil.copy(f, folder / f.name)
        for name, data in files.items():
            if data is None:
                (folder / name).unlink()
            else:
                (folder / name).write_bytes(data)
        repo["commits"][sha], repo["refs"][ref], repo["messages"][sha] = folder, sha, message
        if parent is not None:
            repo["parents"][sha] = parent
        return sha

    # --- answers --------------------------------------------------------------------------------------------

    def resolve(self, h, method: str, repo_id: str, rev: str) -> tuple[str, Path] | None:
        """(commit, folder) for a branch, tag or commit; otherwise the 404 the Hub sends, and None."""
        repo = self.repos.get(repo_id)
        user = self.user(h)
        if repo is None or (repo["private"] and (user is None or not self.may_write(user, repo_id))):
            # hf_raise_for_status turns X-Error-Code: RepoNotFound into RepositoryNotFoundError
            return self.reply_error(h, method, 404, "RepoNotFound", "Repository not found")
        commit = repo["refs"].get(rev, rev)
        if commit not in repo["commits"]:  # ... and RevisionNotFound into RevisionNotFoundError
            return self.reply_error(h, method, 404, "RevisionNotFound", f"Invalid rev id: {rev}")
        return commit, repo["commits"][commit]

    @staticmethod
    def tree_entry(path: Path) -> dict:
        data = path.read_bytes()
        entry = {"type": "file", "oid": git_blob_sha1(data), "size": len(data), "path": path.name}
        if is_lfs(path.name, data):
            entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        return entry

    def reply_json(self, h, method: str, obj: object) -> None:
        self.reply(h, method, 200, {"Content-Type": "application/json"}, json.dumps(obj).encode())

    def reply_error(self, h, method: str, status: int, code: str, message: str, commit: str | None = None) -> None:
        headers = {"X-Error-Code": code, "X-Error-Message": message, "Content-Type": "application/json"}
        if commit is not None:
            headers["X-Repo-Commit"] = commit
        self.reply(h, method, status, headers, json.dumps({"error": message}).encode())

    @staticmethod
    def reply(h, method: str, status: int, headers: dict | None = None, body: bytes = b"") -> None:
        h.send_response(status)
        for key, value in (headers or {}).items():
            h.send_header(key, value)
        h.send_header("Content-Length", str(len(body)))  # on HEAD too: it is the file's size
        h.end_headers()
        if method != "HEAD":
            h.wfile.write(body)  # HTTP/1.0: the connection closes after each response


def _new_repo(private: bool) -> dict:
    return {"commits": {}, "refs": {}, "parents": {}, "messages": {}, "descriptions": {}, "private": private}


def _write_route(parts: list[str]) -> tuple[str, str, str] | None:
    """(kind, repo id, the rest: a revision or branch) of a write request, or None."""
    if parts == ["api", "repos", "create"]:
        return "create", "", ""
    if len(parts) == 6 and parts[:2] == ["api", "models"] and parts[4] in ("preupload", "commit", "branch"):
        return parts[4], "/".join(parts[2:4]), parts[5]
    if len(parts) == 6 and parts[1].endswith(".git") and parts[2:5] == ["info", "lfs", "objects"]:
        kind = {"batch": "lfs-batch", "verify": "lfs-verify"}.get(parts[5])
        return (kind, f"{parts[0]}/{parts[1].removesuffix('.git')}", "") if kind else None
    return None


def _read_body(h: http.server.BaseHTTPRequestHandler) -> bytes:
    """A request's body: Content-Length bytes, or the chunks of a chunked transfer (httpx streams files so)."""
    if h.headers.get("Transfer-Encoding", "").lower() == "chunked":
        data = b""
        while True:
            size = int(h.rfile.readline().split(b";")[0].strip(), 16)
            if size == 0:
                h.rfile.readline()
                return data
            data += h.rfile.read(size)
            h.rfile.readline()
    return h.rfile.read(int(h.headers.get("Content-Length") or 0))
