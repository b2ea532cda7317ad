"""How documents are written for a given tokenizer: its own repo-level, FIM and commit markers when
its vocabulary has them, documented plain text otherwise. No token is ever invented."""

import hashlib
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Markers:
    repo: str | None  # <repo_name> / <reponame>
    file: str | None  # <file_sep> / <filename>
    eos: str | None  # end of document (<|endoftext|> for code models)
    fim: tuple | None  # (<fim_prefix>, <fim_suffix>, <fim_middle>) ids
    commit: dict  # commit_before / commit_msg / commit_after -> token or None

    def file_header(self, path: str) -> str:
        return f"{self.file}{path}\n" if self.file else f"### {path}\n"

    def repo_header(self, name: str) -> str:
        return f"{self.repo}{name}" if self.repo else f"### repository: {name}\n"

    def chain_markers(self) -> dict:
        return {"file": self.file, **self.commit}


def markers(tokenizer) -> Markers:
    vocab = tokenizer.get_vocab()
    eos = tokenizer.eos_token if tokenizer.eos_token in vocab else None
    if "<|endoftext|>" in vocab:  # code models' end-of-document token (eos may be a chat token)
        eos = "<|endoftext|>"
    repo = file = None
    for r, f in (("<repo_name>", "<file_sep>"), ("<reponame>", "<filename>")):
        if r in vocab and f in vocab:
            repo, file = r, f
            break
    fim_names = ("<fim_prefix>", "<fim_suffix>", "<fim_middle>")
    fim = tuple(vocab[t] for t in fim_names) if all(t in vocab for t in fim_names) else None
    commit = {k: (f"<{k}>" if f"<{k}>" in vocab else None) for k in ("commit_before", "commit_msg", "commit_after")}
    if not all(commit.values()):
        commit = dict.fromkeys(commit)
    return Markers(repo, file, eos, fim, commit)


def tokenizer_hash(tokenizer) -> str:
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()[:16]


class Encoder:
    """Batched, multi-threaded encoding without added special tokens.

    `__call__` encodes file content: special-token text inside a file ("<file_sep>" in a string
    literal) stays plain text, so a file can never forge a control token. `markup` encodes our own
    headers, where the markers are meant. `byte_starts` gives each token's byte offset in the text."""

    def __init__(self, tokenizer):
        from tokenizers import Tokenizer

        self.markup_tokenizer = tokenizer.backend_tokenizer
        self.text_tokenizer = Tokenizer.from_str(self.markup_tokenizer.to_str())
        self.text_tokenizer.encode_special_tokens = True
        self.token_bytes = _byte_level_lengths(tokenizer)

    def __call__(self, texts) -> list:
        texts = list(texts)
        return [e.ids for e in self.text_tokenizer.encode_batch_fast(texts, add_special_tokens=False)] if texts else []

    def markup(self, texts) -> list:
        texts = list(texts)
        return (
            [e.ids for e in self.markup_tokenizer.encode_batch_fast(texts, add_special_tokens=False)] if texts else []
        )

    def byte_starts(self, ids, text: str) -> np.ndarray:
        """Byte offset where each token of `text` (encoded by __call__) starts."""
        ids = np.asarray(ids)
        if self.token_bytes is not None:  # byte-level BPE: lengths add up, no re-encoding needed
            lengths = self.token_bytes[ids]
            if lengths.sum() == len(text.encode("utf-8")):
                return np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        enc = self.text_tokenizer.encode(text, add_special_tokens=False)
        byte_of_char = np.concatenate([[0], np.cumsum([len(c.encode("utf-8")) for c in text])])
        return byte_of_char[np.array([o[0] for o in enc.offsets], dtype=np.int64)]


def _byte_level_lengths(tokenizer):
    """Bytes per token id for byte-level BPE vocabularies (each symbol is one byte), else None."""
    import json

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    if (spec.get("decoder") or {}).get("type") != "ByteLevel" or spec.get("normalizer"):
        return None
    vocab = tokenizer.get_vocab()
    lengths = np.zeros(max(vocab.values()) + 1, dtype=np.int64)
    for token, i in vocab.items():
        lengths[i] = len(token)
    for added in spec.get("added_tokens", []):
        lengths[added["id"]] = len(added["content"].encode("utf-8"))
    return lengths


def fim(tokens: np.ndarray, rng, fim_ids) -> np.ndarray:
    """Prefix-suffix-middle at token level: <pre>prefix<suf>suffix<mid>middle — the causal-LM form of
    infilling (StarCoder's PSM), cut at two random token positions. Same tokens, three markers more."""
    a, b = sorted(rng.integers(0, len(tokens) + 1, size=2))
    pre, suf, mid = (np.array([t], dtype=tokens.dtype) for t in fim_ids)
    return np.concatenate([pre, tokens[:a], suf, tokens[b:], mid, tokens[a:b]])
