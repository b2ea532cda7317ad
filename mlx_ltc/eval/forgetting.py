"""What the fine-tune costs outside the repository: perplexity of a fixed sample of code the user did
not write, before and after. The sample is this interpreter's standard library (read locally: nothing
is downloaded), files in the order of a hash of their path, each under its file header as training
writes files, cut into windows of the trained length."""

import hashlib
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlx_ltc.data import Split, formats, markers
from mlx_ltc.data.sources import decode
from mlx_ltc.errors import UserError
from mlx_ltc.eval import Perplexity
from mlx_ltc.eval.results import Forgetting

LEFT_OUT = {"test", "tests", "idlelib", "lib2to3", "turtledemo", "ensurepip", "site-packages", "dist-packages",
            "__pycache__"}  # fmt: skip


@dataclass
class Sample:
    """Where the sample came from."""

    source: str  # "the Python 3.X standard library"
    root: str
    files: list  # paths read, in order
    tokens: int
    seq_len: int

    def scored(self, **models: Perplexity) -> Forgetting:
        """The report's entry: the sample and each model's ("base", "adapted") perplexity on it."""
        return Forgetting(source=self.source, root=self.root, files=len(self.files), tokens=self.tokens,
                          seq_len=self.seq_len, **models)  # fmt: skip


def stdlib() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def sample(tokenizer, tokens: int, seq_len: int, root: Path | None = None) -> tuple:
    """(Split of windows of `seq_len` tokens, Sample): the first `tokens` tokens of the sample."""
    root = Path(root or stdlib())
    if not root.is_dir():
        raise UserError(f"forgetting check: no standard library at {root}")
    paths = [p.relative_to(root).as_posix() for p in root.rglob("*.py")]
    paths = sorted(
        (p for p in paths if not LEFT_OUT & set(p.split("/")[:-1])),
        key=lambda p: hashlib.sha256(p.encode()).hexdigest(),
    )
    encode, mark = formats.Encoder(tokenizer), markers(tokenizer)
    stream, used = [], []
    for path in paths:
        if sum(map(len, stream)) >= tokens:
            break
        text, problem = decode((root / path).read_bytes())
        if problem or not text.strip():
            continue
        header = encode.markup([mark.file_header(path)])[0]
        stream.append(np.asarray(header + encode([text])[0], dtype=np.int32))
        used.append(path)
    flat = np.concatenate(stream)[:tokens] if stream else np.zeros(0, dtype=np.int32)
    if len(flat) < 2:
        raise UserError(f"forgetting check: no Python files under {root}")
    rows = [flat[s : s + seq_len] for s in range(0, len(flat), seq_len)]
    rows = [r for r in rows if len(r) > 1]
    version = f"Python {sys.version_info.major}.{sys.version_info.minor}"
    return Split.from_rows(rows), Sample(f"the {version} standard library", str(root), used, len(flat), seq_len)
