"""The names and text `bit push` sends to the Hub, checked before anything is read or imported (a bad one exits 2
with the rule it breaks): a repo id OWNER/NAME, a branch name for --revision, a commit message's summary.

A repo id is what huggingface_hub's validate_repo_id accepts (its rules, written out here so that the check costs
no import and can say which rule a name breaks). A branch name is what `git check-ref-format --branch` accepts,
the rules of git's refs.c written out (no subprocess, no git needed), and then what the Hub reads as a branch:
not a full ref (`refs/heads/NAME`, `refs/pr/N`) and not 40 hex digits, which the Hub would take for a commit.
"""

from __future__ import annotations

import re

MAX_REPO_PART = 96  # characters of OWNER and of NAME (huggingface_hub's REPO_ID_REGEX)
MAX_BRANCH = 255  # characters: git sets no limit, but a ref is a file, and a longer name is no file name
_REPO_CHARS = re.compile(r"[A-Za-z0-9_.-]+")
_COMMIT_ID = re.compile(r"[0-9a-fA-F]{40}")
# git check-ref-format: ASCII control characters, space, ~ ^ : ? * [ and backslash are refused anywhere.
_REF_FORBIDDEN = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]")


def repo_id_problem(repo_id: str) -> str | None:
    """The rule `repo_id` breaks as OWNER/NAME on the Hub, or None."""
    owner, slash, name = repo_id.partition("/")
    if not slash or not owner or not name or "/" in name:
        return "name the Hub repo OWNER/NAME, e.g. alice/bit-flowers"
    for what, part in (("owner", owner), ("name", name)):
        if rule := _repo_part_problem(part):
            return f"the {what} {part!r} {rule}"
    return None


def _repo_part_problem(part: str) -> str | None:
    if not _REPO_CHARS.fullmatch(part):
        return "may hold only letters, digits, '-', '_' and '.' (ASCII)"
    if part[0] in "-.":
        return "must not start with '-' or '.'"
    if part[-1] in "-.":
        return "must not end with '-' or '.'"
    if "--" in part or ".." in part:
        return "must not hold '--' or '..'"
    if part.endswith(".git"):
        return "must not end with '.git'"
    if len(part) > MAX_REPO_PART:
        return f"is {len(part)} characters long, over the Hub's {MAX_REPO_PART}"
    return None


def branch_problem(name: str) -> str | None:
    """The rule `name` breaks as a branch to push to, or None: git's rules for a branch name first, then the
    Hub's reading of it."""
    return _git_branch_problem(name) or _hub_branch_problem(name)


def _git_branch_problem(name: str) -> str | None:
    """`git check-ref-format --branch NAME`'s rules (git's refs.c check_refname_component and
    strbuf_check_branch_ref), each as one sentence."""
    if not name:
        return "a branch name cannot be empty"
    if name.startswith("-"):
        return "a branch name cannot start with '-'"
    if name == "HEAD":
        return "HEAD is not a branch name"
    if name == "@":
        return "'@' alone is not a branch name"
    if found := _REF_FORBIDDEN.search(name):
        shown = repr(found[0]) if found[0] > " " else "a space or control character"
        return f"a branch name cannot hold {shown} (nor spaces, control characters, ~ ^ : ? * [ \\)"
    if ".." in name:
        return "a branch name cannot hold '..'"
    if "@{" in name:
        return "a branch name cannot hold '@{'"
    if name.startswith("/") or name.endswith("/") or "//" in name:
        return "a branch name cannot start or end with '/' or hold '//'"
    if name.endswith("."):
        return "a branch name cannot end with '.'"
    for part in name.split("/"):
        if part.startswith("."):
            return f"no part of a branch name can start with '.' ({part!r})"
        if part.endswith(".lock"):
            return f"no part of a branch name can end with '.lock' ({part!r})"
    if len(name) > MAX_BRANCH:
        return f"a branch name of {len(name)} characters is over {MAX_BRANCH}"
    return None


def _hub_branch_problem(name: str) -> str | None:
    if name.startswith("refs/heads/"):
        return f"give the branch's name alone: --revision {name.removeprefix('refs/heads/')}"
    if name.startswith("refs/pr/"):
        return "a pull request's ref: bit push commits to a branch, and opens no pull request"
    if name.startswith("refs/"):
        return "a full ref, not a branch name: give a branch name such as try-1"
    if _COMMIT_ID.fullmatch(name):
        return "40 hex digits read as a commit id on the Hub, not as a branch: give a branch name such as try-1"
    return None


def commit_text(message: str) -> tuple[str, str]:
    """(summary, description) of a commit message, as git reads one: the first line is the summary, the lines
    after it (past the blank line that usually follows) the description."""
    first, _, rest = message.partition("\n")
    return first.strip(), rest.strip("\r\n").rstrip()
