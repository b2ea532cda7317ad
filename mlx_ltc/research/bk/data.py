"""Token streams for the BK model: a directory's source files in the repo-level format the dataset
builder and `mlx-ltc eval` use (a file header, then the content, file after file), split per file.

The tokenizer is the default model's (the embedded SmolLM2's code tokenizer, 49,152 entries). Files go to
train or val by the dataset builder's stable path hash (`data.split.assign`), and a val file whose exact
content is also a train file is dropped, so no held-out text is ever trained on.
"""

import hashlib
import json
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlx_ltc import atomic, config, data, models
from mlx_ltc.data import split
from mlx_ltc.errors import UserError

__all__ = ["Corpus", "default_corpus", "load", "load_tokenizer", "save", "tokenize"]

ENCODE_BATCH = 256  # files per tokenizer call; lets --max-tokens stop early


@dataclass
class Corpus:
    train: np.ndarray  # token stream, int32
    val: np.ndarray
    info: dict  # root, files and tokens per split, tokenizer hash, vocab size


def default_corpus() -> Path:
    """This interpreter's standard library: plenty of real Python anywhere we run."""
    return Path(sysconfig.get_paths()["stdlib"])


def load_tokenizer(cache_dir: Path | None = None):
    model_dir = models.resolve(config.ModelConfig().name, Path(cache_dir or models.default_cache_dir()))
    return models.load_tokenizer(model_dir)


def tokenize(root: Path, tokenizer, val_share: float = 0.05, max_tokens: int = 0, log=print) -> Corpus:
    """Source files under root -> train and val token streams: whole files, in path order, until max_tokens
    together (the last file may go past it; 0: every file)."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"corpus directory does not exist: {root}" if not root.exists() else f"not a directory: {root}")
    max_file_bytes = config.DataConfig().max_file_bytes
    files = data.scan(root, max_file_bytes).files
    encode, markers = data.formats.Encoder(tokenizer), data.markers(tokenizer)
    pieces, total = [], 0
    for start in range(0, len(files), ENCODE_BATCH):
        if max_tokens and total >= max_tokens:
            break
        batch = files[start : start + ENCODE_BATCH]
        headers = encode.markup([markers.file_header(f.path) for f in batch])
        for f, header, body in zip(batch, headers, encode([f.text for f in batch])):
            if max_tokens and total >= max_tokens:
                break
            pieces.append((f, np.asarray(header + body, dtype=np.int32)))
            total += len(pieces[-1][1])
    where = split.assign([f.path for f, _ in pieces], (1 - val_share, val_share, 0.0))
    train_text = {hashlib.sha256(f.text.encode()).digest() for f, _ in pieces if where[f.path] == "train"}
    streams, counts = {"train": [], "val": []}, {"train": 0, "val": 0, "val_duplicates_dropped": 0}
    for f, tokens in pieces:
        side = where[f.path]
        if side == "val" and hashlib.sha256(f.text.encode()).digest() in train_text:
            counts["val_duplicates_dropped"] += 1
            continue
        streams[side].append(tokens)
        counts[side] += 1
    train, val = (np.concatenate(s) if s else np.zeros(0, np.int32) for s in (streams["train"], streams["val"]))
    info = {
        "root": str(root.resolve()),
        "files": counts,
        "tokens": {"train": len(train), "val": len(val)},
        "tokenizer_hash": data.tokenizer_hash(tokenizer),
        "vocab_size": len(tokenizer),
    }
    log(
        f"corpus: {root}: {counts['train']:,} train files ({len(train):,} tokens), "
        f"{counts['val']:,} val files ({len(val):,} tokens)"
    )
    return Corpus(train, val, info)


def save(corpus: Corpus, out: Path) -> None:
    """out/train.npy, out/val.npy (uint16 when the vocabulary fits) and out/corpus.json."""
    dtype = np.uint16 if corpus.info["vocab_size"] <= 2**16 else np.int32
    for name, tokens in (("train", corpus.train), ("val", corpus.val)):
        with atomic.atomic_path(Path(out) / f"{name}.npy") as tmp:
            np.save(tmp, tokens.astype(dtype))
    atomic.write_json(Path(out) / "corpus.json", corpus.info)


def load(out: Path) -> Corpus:
    out = Path(out)
    try:
        info = json.loads((out / "corpus.json").read_text(encoding="utf-8"))
        train, val = (np.load(out / f"{name}.npy").astype(np.int32) for name in ("train", "val"))
    except (OSError, ValueError) as e:
        raise UserError(f"{out}: the run's token streams are missing or damaged ({e.__class__.__name__})") from None
    return Corpus(train, val, info)
