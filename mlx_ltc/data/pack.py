"""Best-fit packing of documents into sequences of exactly seq_len tokens, with no padding.

Documents arrive in dependency order. Each sequence starts with the repo prefix, then takes, among
the next `window` documents, the largest that fits the space left (best fit; nearby documents are
related ones), until nothing fits; the remaining space is then filled with the head of the next
document, whose rest continues in the next sequence after a repeated file header. Only the last
sequence can be padded. Every content token lands exactly once."""

from collections import deque
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Doc:
    tokens: np.ndarray  # header + content
    header: int  # number of header tokens at the front
    index: int  # the caller's document id (kept through splits)


@dataclass
class Span:
    start: int  # offset in the sequence
    length: int
    doc: int  # Doc.index
    first: int  # offset within the doc's tokens of the first content token here (0: the doc's start)
    overhead: int  # repeated header tokens at the front of this span (not useful)


@dataclass
class Sequence:
    tokens: np.ndarray  # exactly seq_len
    spans: list = field(default_factory=list)
    prefix: int = 0  # repo prefix tokens at the start
    pad: int = 0  # padding tokens at the end (last sequence only)

    @property
    def useful(self) -> int:
        return len(self.tokens) - self.prefix - self.pad - sum(s.overhead for s in self.spans)


def pack(docs, seq_len: int, prefix=(), pad_id: int = 0, window: int = 64):
    """Yield Sequences. `docs` must each fit in seq_len - len(prefix) tokens."""
    prefix = np.asarray(prefix, dtype=np.int32)
    room = seq_len - len(prefix)
    queue = deque((d, 0) for d in docs)  # (doc, offset of its first unplaced token)
    if any(len(d.tokens) > room for d, _ in queue):
        raise ValueError(f"a document is longer than {room} tokens; segment it first")
    while queue:
        parts, spans, used = [prefix], [], len(prefix)
        while queue and used < seq_len:
            left = seq_len - used
            best = None
            for i in range(min(window, len(queue))):
                n = _remaining(*queue[i])
                if n <= left and (best is None or n > best[1]):
                    best = (i, n)
                    if n == left:
                        break
            if best is not None:
                doc, offset = queue[best[0]]
                del queue[best[0]]
                piece, first = _piece(doc, offset, None)
                overhead = min(doc.header, len(piece)) if offset else 0
            else:  # nothing fits: the head of the next document fills the sequence exactly
                doc, offset = queue[0]
                piece, first = _piece(doc, offset, left)
                if left > doc.header:
                    queue[0] = (doc, (offset or doc.header) + left - doc.header)
                    overhead = doc.header if offset else 0
                else:  # only (part of) a header fitted; the document comes again whole
                    overhead = left
            spans.append(Span(used, len(piece), doc.index, first, overhead))
            parts.append(piece)
            used += len(piece)
        pad = seq_len - used
        if pad:
            parts.append(np.full(pad, pad_id, dtype=np.int32))
        yield Sequence(np.concatenate(parts).astype(np.int32), spans, len(prefix), pad)


def _remaining(doc: Doc, offset: int) -> int:
    """Tokens still to place: the whole doc, or a repeated header plus the rest of its content."""
    return len(doc.tokens) if offset == 0 else doc.header + len(doc.tokens) - offset


def _piece(doc: Doc, offset: int, limit):
    """(tokens, first) of the doc's next piece, at most `limit` tokens (None: all)."""
    if offset == 0:
        tokens, first = doc.tokens, 0
    else:
        tokens, first = np.concatenate([doc.tokens[: doc.header], doc.tokens[offset:]]), offset
    return (tokens if limit is None else tokens[:limit]), first
