"""Cut a file that is longer than a window into pieces at definition boundaries.

Cut points are tried in order of preference: top-level definitions, members of top-level containers
(methods of a class, fns of an impl), blank lines, and only then a hard cut. The longest piece that
fits is taken each time, so a definition is never split when a boundary that fits exists."""

import re

import numpy as np

_BLANK_LINE = re.compile(rb"\n[ \t]*\n")


def boundary_levels(source: bytes, token_starts: np.ndarray, definitions) -> list:
    """Token indices where a piece may start, one sorted array per preference level.

    token_starts: byte offset where each token starts; definitions: syntax.Definition (byte offsets)."""

    def token_at(positions):  # the token containing each byte position
        idx = np.searchsorted(token_starts, np.asarray(positions, dtype=np.int64), side="right") - 1
        return np.unique(idx[idx > 0])

    levels = [token_at([d.start for d in definitions or () if d.depth == depth]) for depth in (0, 1)]
    levels.append(token_at([m.end() for m in _BLANK_LINE.finditer(source)]))
    return levels


def cut(n_tokens: int, budget: int, levels) -> list:
    """Start indices of the pieces (the first is 0): every piece has at most `budget` tokens."""
    starts, start = [0], 0
    while n_tokens - start > budget:
        limit = start + budget
        nxt = limit  # hard cut when no boundary fits
        for level in levels:
            i = np.searchsorted(level, limit, side="right") - 1
            if i >= 0 and level[i] > start:
                nxt = int(level[i])
                break
        starts.append(nxt)
        start = nxt
    return starts
