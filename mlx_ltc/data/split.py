"""Train/val/test assignment from a stable hash of each file's path (or its directory).

A file's split depends only on its own path, so adding files never moves an old one, and a rebuild
after new commits keeps every split stable. Held-out text never reaches training: splitting happens
per file, before anything is windowed, duplicated or augmented."""

import hashlib
from pathlib import PurePosixPath

SPLITS = ("train", "val", "test")


def unit(path: str, by: str = "file") -> str:
    return str(PurePosixPath(path).parent) if by == "directory" else path


def position(key: str, salt: str = "") -> float:
    """A stable uniform number in [0, 1) for a key."""
    digest = hashlib.sha256(f"{salt}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign(paths, fractions=(0.85, 0.10, 0.05), by: str = "file", salt: str = "") -> dict:
    """path -> split. When a held-out split would be empty but there are enough files, the file whose
    hash position lies closest to that split's interval moves there (small repos only)."""
    edges = (fractions[0], fractions[0] + fractions[1])
    pos = {p: position(unit(p, by), salt) for p in sorted(paths)}
    result = {p: SPLITS[(x >= edges[0]) + (x >= edges[1])] for p, x in pos.items()}
    for k, split in ((1, "val"), (2, "test")):
        if split in result.values() or fractions[k] <= 0 or len(set(map(lambda p: unit(p, by), pos))) < 3:
            continue
        lo, hi = (edges[0], edges[1]) if split == "val" else (edges[1], 1.0)
        donors = [p for p in pos if result[p] == "train"]
        if donors:
            closest = min(donors, key=lambda p: min(abs(pos[p] - lo), abs(pos[p] - hi)))
            for p in pos:  # the whole unit moves
                if unit(p, by) == unit(closest, by):
                    result[p] = split
    return result
