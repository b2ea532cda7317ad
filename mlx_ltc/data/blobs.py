"""Per-file work that depends only on a file's content: tokens, syntax, entropy, fingerprints.

Results are cached in SQLite keyed by the git blob hash of the content, the parser language and the
tokenizer, so a rebuild after new commits only re-processes files whose content changed."""

import hashlib
import json
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlx_ltc.data import quality, syntax
from mlx_ltc.data.formats import Encoder

VERSION = 2  # bump when what is cached changes
_NUM_PERM = 64


@dataclass
class FileInfo:
    path: str
    language: str | None  # parser language, None when no grammar handles the file
    bytes: int
    tokens: np.ndarray  # content tokens (int32), no header
    syntax: syntax.Syntax | None
    entropy: float  # quality.entropy
    content_hash: str  # equal for whitespace-only differences
    signature: np.ndarray  # MinHash values (uint64)


def blob_hash(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # git's object id


class BlobCache:
    """SQLite store of per-blob results; safe to share between builds (one writer at a time)."""

    def __init__(self, path: Path, tokenizer_hash: str):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.salt = f"v{VERSION}:{tokenizer_hash}"
        try:
            self.db = self._open(path)
        except sqlite3.DatabaseError:  # a damaged cache is only lost work: set it aside, start afresh
            path.replace(path.with_name(path.name + ".corrupt"))
            self.db = self._open(path)

    @staticmethod
    def _open(path: Path):
        db = sqlite3.connect(str(path), timeout=60)
        db.execute("CREATE TABLE IF NOT EXISTS blobs (key TEXT PRIMARY KEY, tokens BLOB, sig BLOB, info TEXT)")
        return db

    def key(self, blob: str, language) -> str:
        return f"{self.salt}:{language}:{blob}"

    def get_many(self, keys) -> dict:
        found = {}
        keys = list(keys)
        for s in range(0, len(keys), 500):
            chunk = keys[s : s + 500]
            rows = self.db.execute(f"SELECT * FROM blobs WHERE key IN ({','.join('?' * len(chunk))})", chunk)
            for key, tokens, sig, info in rows:
                found[key] = (np.frombuffer(tokens, dtype=np.int32), np.frombuffer(sig, dtype=np.uint64), info)
        return found

    def put_many(self, rows) -> None:
        with self.db:
            self.db.executemany("INSERT OR REPLACE INTO blobs VALUES (?, ?, ?, ?)", rows)

    def close(self):
        self.db.close()


def process(files, encode: Encoder, vocab_size: int, cache: BlobCache | None = None, progress=None):
    """FileInfo for every SourceFile, in order, and (processed, cached) counts.

    Tokenizing runs in the tokenizer's own threads while tree-sitter parses in this one."""
    data = [f.text.encode("utf-8") for f in files]
    languages = [syntax.language_of(f.path) for f in files]
    keys = [cache.key(blob_hash(d), lang) if cache else None for d, lang in zip(data, languages)]
    hits = cache.get_many(set(keys)) if cache else {}
    todo = [i for i, k in enumerate(keys) if k not in hits]
    results = {}
    batch = 64
    with ThreadPoolExecutor(1) as pool:
        chunks = [todo[s : s + batch] for s in range(0, len(todo), batch)]
        pending = pool.submit(encode, [files[i].text for i in chunks[0]]) if chunks else None
        for c, chunk in enumerate(chunks):
            parsed = [syntax.parse(files[i].path, data[i]) for i in chunk]
            encoded = pending.result()
            if c + 1 < len(chunks):
                pending = pool.submit(encode, [files[i].text for i in chunks[c + 1]])
            rows = []
            for i, ids, syn in zip(chunk, encoded, parsed):
                tokens = np.asarray(ids, dtype=np.int32)
                info = {
                    "syntax": syn.to_dict() if syn else None,
                    "entropy": quality.entropy(tokens, vocab_size),
                    "content_hash": quality.content_hash(files[i].text),
                }
                sig = quality.signature(tokens, _NUM_PERM)
                results[i] = (tokens, sig, info)
                rows.append((keys[i], tokens.tobytes(), sig.tobytes(), json.dumps(info)))
            if cache:
                cache.put_many(rows)
            if progress:
                progress(sum(len(data[i]) for i in chunk))
    infos = []
    for i, f in enumerate(files):
        if i in results:
            tokens, sig, info = results[i]
        else:
            tokens, sig, raw = hits[keys[i]]
            info = json.loads(raw)
            if progress:
                progress(len(data[i]))
        syn = syntax.Syntax.from_dict(info["syntax"]) if info["syntax"] else None
        infos.append(
            FileInfo(f.path, languages[i], len(data[i]), tokens, syn, info["entropy"], info["content_hash"], sig)
        )
    return infos, (len(todo), len(files) - len(todo))
