"""The MegaContext tree: a long token history as 32-token raw blocks, L1 gists (one vector per block) and
L2 gists (one per 32 L1 gists, i.e. 1,024 tokens).

Append-only: tokens arrive at the end; each block that completes is gisted, and each 32 L1 gists that
complete are gisted again; an incomplete tail stays raw. `gist(level, inputs)` is the compressor (GistNet,
or a fixed one: `last_input`, `mean_gist`): level 1 gets a block's 32 token ids, level 2 its 32 L1 gists, and
both return one vector of `width` (the base model's embedding space). A compressor with a `many(level, list of
inputs)` attribute gists all the blocks an append completes in one call.

On disk a tree is a directory with one file per level, `level0.bin` (token ids, int32), `level1.bin`,
`level2.bin` (gists): a fixed 128-byte header (magic, version, level, block size, width, dtype, model id),
then rows back to back, so row i sits at 128 + i * row_bytes and no index is needed. A save swaps the
whole directory in at once: a crash never leaves levels that disagree.
"""

import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mlx_ltc import atomic
from mlx_ltc.errors import UserError

__all__ = ["BLOCK", "GistTree", "last_input", "load", "mean_gist"]

BLOCK = 32
LEVELS = 3  # raw tokens, L1, L2
MAGIC, VERSION = b"MCTREE\0\0", 1
_HEADER = struct.Struct("<8sIIIII96s")  # magic, version, level, block, width, dtype code, model id
_HEADER_BYTES = 128
_DTYPES = {1: np.dtype("<i4"), 2: np.dtype("<f2"), 3: np.dtype("<f4")}


def _code(dtype) -> int:
    return next(code for code, d in _DTYPES.items() if d == np.dtype(dtype).newbyteorder("<"))


@dataclass
class GistTree:
    width: int  # the gists' size: the base model's embedding width
    model_id: str  # which base model's embedding space the gists live in
    dtype: str = "float32"
    block: int = BLOCK
    levels: list = field(default_factory=list)  # levels[0]: (n,) int32 tokens; levels[1], [2]: (m, width)

    def __post_init__(self):
        if not self.levels:
            self.levels = [np.zeros(0, np.int32)] + [np.zeros((0, self.width), self.dtype) for _ in range(LEVELS - 1)]
        if len(self.model_id.encode("utf-8")) > 96:
            raise ValueError("model_id takes at most 96 bytes")

    @property
    def tokens(self) -> np.ndarray:
        return self.levels[0]

    def append(self, tokens, gist) -> None:
        """Add tokens at the end; gist every block (and every 32 L1 gists) that this completes."""
        self.levels[0] = np.concatenate([self.levels[0], np.asarray(tokens, np.int32)])
        for level in range(1, LEVELS):
            below, have = self.levels[level - 1], len(self.levels[level])
            inputs = [below[i * self.block : (i + 1) * self.block] for i in range(have, len(below) // self.block)]
            if inputs and hasattr(gist, "many"):  # a compressor that gists a batch of blocks in one pass
                new = gist.many(level, inputs)
            else:
                new = [gist(level, i) for i in inputs]
            new = [np.asarray(g, np.float32) for g in new]
            if new:
                self.levels[level] = np.concatenate([self.levels[level], np.stack(new).astype(self.dtype)])

    def span(self, level: int, index: int) -> tuple:
        """Token range [start, end) covered by entry `index` of `level`."""
        size = self.block**level
        return index * size, (index + 1) * size

    def save(self, path: Path) -> None:
        with atomic.replace_dir(Path(path)) as tmp:
            for level, rows in enumerate(self.levels):
                width = 1 if level == 0 else self.width
                header = _HEADER.pack(
                    MAGIC, VERSION, level, self.block, width, _code(rows.dtype), self.model_id.encode("utf-8")
                )
                with open(tmp / f"level{level}.bin", "wb") as f:
                    f.write(header.ljust(_HEADER_BYTES, b"\0"))
                    f.write(np.ascontiguousarray(rows, rows.dtype.newbyteorder("<")).tobytes())


def _read_level(path: Path, level: int) -> tuple:
    """(header fields, rows) of one level file; a damaged or foreign file is a UserError."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    if len(raw) < _HEADER_BYTES or raw[:8] != MAGIC:
        raise UserError(f"{path} is not a MegaContext tree level (bad magic)")
    magic, version, got_level, block, width, code, model = _HEADER.unpack(raw[: _HEADER.size])
    if version != VERSION or got_level != level or code not in _DTYPES:
        raise UserError(
            f"{path}: version {version}, level {got_level}, dtype code {code}; expected version "
            f"{VERSION}, level {level}"
        )
    dtype = _DTYPES[code]
    body = raw[_HEADER_BYTES:]
    if len(body) % (width * dtype.itemsize):
        raise UserError(f"{path} is truncated: {len(body)} bytes is not a whole number of rows")
    rows = np.frombuffer(body, dtype).reshape(-1, width)
    fields = {"block": block, "width": width, "model_id": model.rstrip(b"\0").decode("utf-8")}
    return fields, (rows[:, 0] if level == 0 else rows).copy()


def load(path: Path, model_id: str | None = None) -> GistTree:
    """The tree saved in `path`, checked: same block size and model in every level, gist counts that match
    the tokens (and, when given, the model the caller's gists are for)."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path}: no such MegaContext tree directory")
    read = [_read_level(path / f"level{level}.bin", level) for level in range(LEVELS)]
    (head, _), gists = read[0], [fields for fields, _ in read[1:]]
    if any(g["block"] != head["block"] or g["model_id"] != head["model_id"] for g in gists) or (
        gists[0]["width"] != gists[1]["width"]
    ):
        raise UserError(f"{path}: its levels disagree on block size, width or model")
    if model_id is not None and head["model_id"] != model_id:
        raise UserError(f"{path} holds gists for {head['model_id']!r}, not {model_id!r}")
    levels = [rows for _, rows in read]
    for level in range(1, LEVELS):
        if len(levels[level]) != len(levels[level - 1]) // head["block"]:
            raise UserError(
                f"{path}: level {level} has {len(levels[level])} gists for {len(levels[level - 1])} entries below it"
            )
    return GistTree(
        width=gists[0]["width"],
        model_id=head["model_id"],
        dtype=str(levels[1].dtype),
        block=head["block"],
        levels=levels,
    )


def mean_gist(embeddings: np.ndarray):
    """The mean-pooling baseline's compressor: a block's mean input embedding (level 1) or mean gist (level 2)."""

    def gist(level, inputs):
        return (embeddings[inputs] if level == 1 else np.asarray(inputs, np.float32)).mean(axis=0)

    return gist


def last_input(embeddings: np.ndarray):
    """The untrained GistNet's compressor: a block's last token embedding (level 1) or last gist (level 2)."""

    def gist(level, inputs):
        return (embeddings[inputs[-1]] if level == 1 else np.asarray(inputs, np.float32)[-1]).astype(np.float32)

    return gist
