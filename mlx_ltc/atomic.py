"""Writes that never leave a half-written file behind: write a temp file beside the target, then rename."""

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


def _umask():
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path):
    """Yield a temp path in the target's directory; on success it replaces `path` in one rename.

    The temp name keeps the target's suffix, since some writers (mx.save_safetensors) append one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path, text):
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=2) + "\n")


def write_jsonl(path, rows):
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


@contextmanager
def atomic_dir(path):
    """Build a directory under a temp name and rename it into place only when complete.

    If another process placed `path` first, its copy wins and ours is discarded.
    """
    path = Path(path)
    tmp = _temp_dir(path)
    try:
        yield tmp
        try:
            os.rename(tmp, path)
        except OSError:
            if not path.is_dir():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def replace_dir(path):
    """Build a directory under a temp name, then swap it in for `path` (which may exist): the old
    content stays whole until the new one is complete, and a failure leaves it untouched."""
    path = Path(path)
    tmp = _temp_dir(path)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
        os.rename(path, old / "d")
    os.rename(tmp, path)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def _temp_dir(path: Path) -> Path:
    """An empty directory beside `path` (same filesystem, so a rename moves it into place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp
