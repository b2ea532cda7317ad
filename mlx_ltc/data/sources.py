"""Find a repository's text source files: `git ls-files` in a git work tree, else a walk that
honours .gitignore files. Binary, huge, non-UTF-8 and generated files are skipped and counted."""

import os
import subprocess
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from mlx_ltc.errors import UserError

SKIP_DIRS = {"__pycache__", "node_modules", "site-packages"}  # virtualenvs are found by their pyvenv.cfg
GENERATED = {
    "package-lock.json", "yarn.lock", "pnpm-lock.yaml", "Cargo.lock", "poetry.lock", "uv.lock",
    "Pipfile.lock", "composer.lock", "Gemfile.lock", "go.sum",
}  # fmt: skip
DATA_SUFFIXES = {".svg", ".csv", ".tsv", ".ipynb", ".min.js", ".min.css", ".map"}
MAX_LINE_CHARS = 5000  # longer lines mean minified or generated text


@dataclass
class SourceFile:
    path: str  # POSIX path relative to the repo root
    text: str


@dataclass
class RepoScan:
    root: Path
    name: str
    listing: str  # "git" or "walk"
    files: list = field(default_factory=list)  # SourceFile, sorted by path
    skipped: list = field(default_factory=list)  # (path, reason)

    def skip_counts(self) -> dict:
        return dict(Counter(reason for _, reason in self.skipped))


def scan(root, max_file_bytes: int = 1_000_000) -> RepoScan:
    root = Path(root).expanduser()
    if not root.exists():
        raise UserError(f"repo path does not exist: {root}")
    if not root.is_dir():
        raise UserError(f"repo path is not a directory: {root}")
    root = root.resolve()
    paths = _git_files(root)
    result = RepoScan(root=root, name=root.name, listing="git" if paths is not None else "walk")
    if paths is None:
        paths = _walk_files(root)
    if not paths:
        raise UserError(f"repo {root} is empty: no files to train on")
    for rel in sorted(paths):
        text, reason = _read_text(root / rel, rel, max_file_bytes)
        if reason:
            result.skipped.append((rel, reason))
        else:
            result.files.append(SourceFile(rel, text))
    if not result.files:
        counts = ", ".join(f"{n} {reason}" for reason, n in sorted(result.skip_counts().items()))
        raise UserError(f"repo {root} has no text source files ({len(paths)} files skipped: {counts})")
    return result


def _git_files(root: Path):
    """Tracked and untracked-but-not-ignored files relative to root, or None outside a git work tree
    (or when root itself is ignored, e.g. a virtualenv inside a project)."""

    def git(*args):
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=False, timeout=120)

    try:
        if git("rev-parse", "--is-inside-work-tree").stdout.strip() != b"true":
            return None
        if git("check-ignore", "-q", ".").returncode == 0:
            return None
        out = git("ls-files", "-z", "--cached", "--others", "--exclude-standard")
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return [p.decode("utf-8", "surrogateescape") for p in out.stdout.split(b"\0") if p]


def _walk_files(root: Path) -> list:
    import pathspec

    files = []
    specs = []  # (directory relative to root, spec of its .gitignore)
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        rel_dir = "" if rel_dir == "." else rel_dir + "/"
        ignore = Path(dirpath) / ".gitignore"
        if ignore.is_file():
            lines = ignore.read_text(encoding="utf-8", errors="replace").splitlines()
            specs.append((rel_dir, pathspec.GitIgnoreSpec.from_lines(lines)))

        def ignored(rel, is_dir):
            probe = rel + "/" if is_dir else rel
            return any(probe.startswith(base) and spec.match_file(probe[len(base) :]) for base, spec in specs)

        dirnames[:] = sorted(
            d
            for d in dirnames
            if not d.startswith(".")
            and d not in SKIP_DIRS
            and not (Path(dirpath) / d / "pyvenv.cfg").exists()
            and not ignored(rel_dir + d, True)
        )
        files += [rel_dir + f for f in filenames if not ignored(rel_dir + f, False)]
    return files


def _read_text(path: Path, rel: str, max_file_bytes: int):
    """(text, None) for a usable text file, else (None, reason)."""
    name = path.name
    if path.is_symlink():
        return None, "symlink"
    if not path.is_file():
        return None, "not a regular file"
    if name in GENERATED or any(name.endswith(s) for s in DATA_SUFFIXES):
        return None, "generated or data"
    try:
        size = path.stat().st_size
        if size > max_file_bytes:
            return None, "too large"
        data = path.read_bytes()
    except OSError:
        return None, "unreadable"
    if b"\0" in data[:8192]:
        return None, "binary"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None, "not UTF-8"
    if not text.strip():
        return None, "empty"
    if max(map(len, text.splitlines()), default=0) > MAX_LINE_CHARS:
        return None, "generated or data"
    return text, None
