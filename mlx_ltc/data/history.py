"""Commit-evolution chains: how each file reached its HEAD content, one commit at a time.

A chain holds a file's newest `max_versions` distinct contents along the first-parent history of
HEAD, oldest first, each with the message of the commit that produced it. First-parent keeps every
step a real parent -> child change on the branch HEAD followed: a merge is one step, diffed against
its first parent, and side-branch commits are not steps of their own. Renames are followed with git's
rename detection (-M, within one commit, as `git log --follow` does); copies are not. A file that was
deleted and later re-added starts its chain at the re-add.

Whatever the repo size, the work is one `git log --raw` over at most `max_commits` commits and one
`git cat-file --batch` for the needed blobs and commit messages.

A chain is cut at its first unusable version, counting from HEAD backwards, and keeps the newer side:
binary (NUL in the first 8 KB), not UTF-8, over `max_file_bytes`, long-line generated text, a symlink
or a submodule, or a transition with more than `max_diff_lines` changed lines. Changed lines are the
lines added plus removed, as multisets: O(n), and a line diff's count except that moved lines are free.

`format_chain` writes the tokenizer's commit tokens when it has all three,
    HEADER<commit_before>OLD<commit_msg>MESSAGE<commit_after>NEW   (one triple per step)
and otherwise a plain form in which every text follows a `# --- version SHA ---` line and every
message sits between `# --- commit SHA ---` and the next version line:
    HEADER
    # history of a.py: 3 versions, oldest first
    # --- version 1a2b3c4d5e ---
    TEXT
    # --- commit 5f6e7d8c9b ---
    # Subject
    #
    # Body
    # --- version 5f6e7d8c9b ---
    TEXT
HEADER is `<file_sep>a.py\\n` with the tokenizer's file marker, else `### a.py\\n`, as in the repo stream.
A text without a final newline gets one in the plain form, so each marker line starts a line.
"""

import os
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass, field

from mlx_ltc.data.sources import decode

SPECIAL_MODES = {"160000": "submodule", "120000": "symlink"}  # not text: a gitlink's id is a commit
GIT_ENV = {"GIT_TERMINAL_PROMPT": "0", "GIT_NO_LAZY_FETCH": "1"}  # never reach a partial clone's remote


@dataclass
class Version:
    sha: str  # commit that produced this version
    message: str  # that commit's full message, stripped
    text: str  # the file's content after the commit


@dataclass
class Chain:
    path: str  # POSIX path relative to the repo root, as at HEAD
    versions: list  # Version, oldest first, at least 2, consecutive contents distinct


@dataclass
class History:
    chains: list = field(default_factory=list)  # Chain, sorted by path
    commits: int = 0  # commits examined
    shallow: bool = False
    skipped: dict = field(default_factory=dict)  # reason -> versions, transitions or files dropped
    note: str | None = None  # one line for the user when history is missing or partial


def commit_chains(
    root, paths, max_versions=6, max_file_bytes=200_000, max_diff_lines=2000, max_commits=5000
) -> History:
    history = History()
    try:
        repo = _git(root, "rev-parse", "--is-shallow-repository", "--show-prefix")
        if repo.returncode != 0:
            history.note = "not a git repository: no commit-evolution chains"
            return history
        shallow, _, prefix = repo.stdout.decode("utf-8", "surrogateescape").partition("\n")
        history.shallow = shallow == "true"
        if _git(root, "rev-parse", "--verify", "-q", "HEAD^{commit}").returncode != 0:
            history.note = "no commits yet: no commit-evolution chains"
            return history
        log = _git(
            root, "-c", "log.diffMerges=first-parent", "log", "-z", "--raw", "-M", "-m", "--first-parent", "--root",
            "--no-abbrev", "--no-show-signature", "--format=%H", f"--max-count={max_commits}", "HEAD",
        )  # fmt: skip
        if log.returncode != 0:
            history.note = "git log failed: no commit-evolution chains"
            return history
        found = _walk(history, _commits(log.stdout), {prefix[:-1] + p: p for p in paths}, max_versions)
        versioned = {p: vs for p, vs in found.items() if len(vs) >= 2}
        needed = {sha for vs in versioned.values() for sha, _, _ in vs}
        needed |= {oid for vs in versioned.values() for _, mode, oid in vs if mode not in SPECIAL_MODES}
        objects = _cat(root, sorted(needed), max_file_bytes)
    except FileNotFoundError:
        history.note = "git not found: no commit-evolution chains"
        return history
    except (OSError, subprocess.SubprocessError) as e:
        history.note = f"git failed ({type(e).__name__}): no commit-evolution chains"
        return history

    skipped = Counter(history.skipped)
    for vs in found.values():
        if len(vs) < 2:
            skipped[SPECIAL_MODES.get(vs[0][1] if vs else "", "fewer than 2 versions")] += 1
    for path in sorted(versioned):
        versions = []
        for sha, mode, oid in versioned[path]:
            text, reason = _text(mode, objects.get(oid, "missing object"))
            if reason is None and versions and _changed_lines(text, versions[-1].text) > max_diff_lines:
                reason = "huge diff"
            if reason:
                skipped[reason] += 1
                break
            versions.append(Version(sha, _message(objects.get(sha, b"")), text))
        if len(versions) >= 2:
            history.chains.append(Chain(path, versions[::-1]))
    history.skipped = dict(sorted(skipped.items()))
    if history.shallow:
        history.note = f"shallow clone: chains use only the {history.commits} commits fetched"
    return history


def _git(root, *args):
    return subprocess.run(
        ["git", "-C", str(root), "-c", "diff.relative=false", *args],
        capture_output=True,
        env={**os.environ, **GIT_ENV},
        timeout=600,
    )


def _commits(log: bytes):
    """(sha, [(mode, blob, status, src, dst)]) per commit, newest first, from `git log -z --raw`."""
    tokens = iter(log.split(b"\0"))
    sha, changes = None, []
    for token in tokens:
        token = token.lstrip(b"\n")
        if token.startswith(b":"):
            *_, mode, _, blob, status = token.decode().split()
            src = next(tokens).decode("utf-8", "surrogateescape")
            dst = next(tokens).decode("utf-8", "surrogateescape") if status[0] in "RC" else src
            changes.append((mode, blob, status[0], src, dst))
        elif token:
            if sha:
                yield sha, changes
            sha, changes = token.decode(), []
    if sha:
        yield sha, changes


def _walk(history, commits, live, max_versions):
    """Follow each wanted file back from HEAD: head path -> [[sha, mode, blob]], newest first, at most
    max_versions distinct blobs. `live` maps a path as it was in the commit being read to its HEAD path."""
    found = {head: [] for head in live.values()}
    readded = {}  # path -> HEAD path, for files whose history began with an add
    for sha, changes in commits:
        history.commits += 1
        renamed = []
        for mode, blob, status, src, dst in changes:
            if status == "D" and readded.pop(dst, None):
                history.skipped["deleted and re-added"] = history.skipped.get("deleted and re-added", 0) + 1
            head = live.get(dst)
            if head is None or status == "D":
                continue
            versions = found[head]
            if versions and versions[-1][2] == blob:  # same content: the older commit produced it
                versions[-1][0] = sha
            elif len(versions) == max_versions:
                del live[dst]
                continue
            else:
                versions.append([sha, mode, blob])
            if status == "A" or mode in SPECIAL_MODES:
                del live[dst]
                if status == "A" and len(versions) < max_versions:
                    readded[dst] = head
            elif status == "R":
                del live[dst]
                renamed.append((src, head))
        for src, head in renamed:  # after the commit's other changes, so swapped names don't collide
            live.setdefault(src, head)
    return found


def _cat(root, oids, max_file_bytes) -> dict:
    """oid -> bytes, or the reason it is not there ("too large", "missing object")."""
    objects = {}
    with tempfile.TemporaryFile() as requests:
        requests.write(b"".join(oid.encode() + b"\n" for oid in oids))
        requests.seek(0)
        cmd = ["git", "-C", str(root), "cat-file", "--batch"]
        env = {**os.environ, **GIT_ENV}
        with subprocess.Popen(cmd, stdin=requests, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env) as proc:
            for oid in oids:
                header = proc.stdout.readline().split()
                if len(header) != 3:
                    objects[oid] = "missing object"
                    continue
                size = int(header[2])
                if header[1] == b"blob" and size > max_file_bytes:
                    left = size + 1  # drain it and its newline without holding it
                    while left > 0 and (chunk := proc.stdout.read(min(left, 1 << 20))):
                        left -= len(chunk)
                    objects[oid] = "too large"
                    continue
                objects[oid] = proc.stdout.read(size)
                proc.stdout.read(1)
    return objects


def _text(mode, data):
    if mode in SPECIAL_MODES:
        return None, SPECIAL_MODES[mode]
    if isinstance(data, str):
        return None, data
    return decode(data)


def _message(commit) -> str:
    if isinstance(commit, str):
        return ""
    header, _, message = commit.partition(b"\n\n")
    encoding = next((h[9:].decode() for h in header.split(b"\n") if h.startswith(b"encoding ")), "utf-8")
    try:
        return message.decode(encoding, "replace").strip()
    except LookupError:
        return message.decode("utf-8", "replace").strip()


def _changed_lines(a: str, b: str) -> int:
    old, new = Counter(a.splitlines()), Counter(b.splitlines())
    return (old - new).total() + (new - old).total()


def format_chain(chain: Chain, markers: dict) -> str:
    file = markers.get("file")
    header = f"{file}{chain.path}\n" if file else f"### {chain.path}\n"
    before, msg, after = (markers.get(k) for k in ("commit_before", "commit_msg", "commit_after"))
    if before and msg and after:
        steps = zip(chain.versions, chain.versions[1:])
        return header + "".join(f"{before}{old.text}{msg}{new.message}{after}{new.text}" for old, new in steps)
    parts = [header, f"# history of {chain.path}: {len(chain.versions)} versions, oldest first\n"]
    for i, version in enumerate(chain.versions):
        if i:
            lines = version.message.splitlines()
            parts += [f"# --- commit {version.sha[:10]} ---\n", *(f"# {line}".rstrip() + "\n" for line in lines)]
        parts += [f"# --- version {version.sha[:10]} ---\n", version.text]
        if version.text and not version.text.endswith("\n"):
            parts.append("\n")
    return "".join(parts)
