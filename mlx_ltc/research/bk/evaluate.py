"""`mlx-ltc bk eval RUN_DIR`: next-token NLL over a long stream, fed to the BK model chunk by chunk.

The carried state (per layer g, k and the mixer's y of the last position) makes the chunked numbers the
one-shot forward's, and memory constant however long the stream: one chunk's activations and a few
(rows x vocab) logits at a time. Reported at 1K, 4K, 16K, 64K, 256K, 1M, ... tokens and at the end.
"""

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_ltc import config, tables
from mlx_ltc.research.bk import data
from mlx_ltc.research.bk.loss import nll_per_token
from mlx_ltc.research.bk.train import load_checkpoint
from mlx_ltc.data import tokenizer_hash
from mlx_ltc.errors import UserError
from mlx_ltc.eval.stream import marks_for

__all__ = ["StreamPoint", "chunk_nll", "evaluate_run", "stream_eval", "table"]


@dataclass
class StreamPoint:
    tokens: int  # stream length so far (tokens read; tokens - 1 predicted)
    nll: float  # mean NLL per predicted token over the stream so far
    peak_bytes: int  # MLX peak memory since the stream began
    tokens_per_s: float


def chunk_nll(model, tokens: np.ndarray, chunk: int):
    """Yield the NLL (float64) of each target in consecutive chunks: target t is tokens[t + 1], predicted
    from tokens[<= t] through the state carried from chunk to chunk."""
    model.eval()
    state, n = None, len(tokens) - 1
    for start in range(0, n, chunk):
        end = min(start + chunk, n)
        hidden, state = model.hidden(mx.array(tokens[None, start:end], dtype=mx.int32), state)
        mx.eval(hidden, state)
        nll = nll_per_token(hidden[0], model.embed.weight, mx.array(tokens[start + 1 : end + 1], dtype=mx.int32))
        yield np.array(nll, dtype=np.float64)


def stream_eval(model, tokens: np.ndarray, chunk: int = 4096, marks=None, progress=None) -> list:
    """StreamPoints at each mark (default `eval.stream.marks_for`); `progress`: a tqdm bar or None."""
    if len(tokens) < 2:
        raise UserError(f"the stream holds {len(tokens)} tokens; at least 2 are needed")
    pending = sorted(set(marks or marks_for(len(tokens))))
    points, total, count = [], 0.0, 0
    mx.synchronize()
    mx.reset_peak_memory()
    began = time.perf_counter()
    for nll in chunk_nll(model, tokens, chunk):
        while pending and pending[0] - 1 <= count + len(nll):  # a mark inside this chunk: exact
            seen = pending.pop(0) - 1
            points.append(
                StreamPoint(
                    tokens=seen + 1,
                    nll=(total + float(nll[: seen - count].sum())) / max(seen, 1),
                    peak_bytes=int(mx.get_peak_memory()),
                    tokens_per_s=(seen + 1) / max(time.perf_counter() - began, 1e-9),
                )
            )
        total += float(nll.sum())
        count += len(nll)
        if progress is not None:
            progress.update(len(nll))
    return points


def _stream_source(run_dir: Path, state: dict, stream_tokens: int, corpus: str | None, cache_dir=None):
    """(tokens, description): the run's val slice, or a directory's files in the repo-level format."""
    if corpus is None:
        tokens = data.load(run_dir / "data").val
        tokens = tokens[:stream_tokens] if stream_tokens else tokens
        return tokens, {"kind": "val slice", "path": str(run_dir / "data" / "val.npy")}
    from mlx_ltc.eval.run import corpus_stream

    if not Path(corpus).is_dir():
        raise UserError(f"--corpus {corpus}: not a directory")
    tokenizer = data.load_tokenizer(cache_dir)
    if data.load(run_dir / "data").info["tokenizer_hash"] != tokenizer_hash(tokenizer):
        raise UserError(f"{run_dir} was trained with another tokenizer than the one --corpus would be read with")
    tokens, files = corpus_stream(Path(corpus), tokenizer, stream_tokens, config.DataConfig().max_file_bytes)
    return tokens, {"kind": "corpus", "path": str(Path(corpus).resolve()), "files": files}


def evaluate_run(run_dir: Path, opts: config.BkEvalConfig, progress: bool = True, log=print, cache_dir=None) -> dict:
    """`bk eval`: the config's bk.eval section (validated by `config.merge`) over a run's checkpoint."""
    from mlx_ltc import progress as progress_bars

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run directory does not exist: {run_dir}")
    stream_tokens, chunk = opts.stream_tokens, opts.chunk
    model, state = load_checkpoint(run_dir, opts.seq_len)
    tokens, source = _stream_source(run_dir, state, stream_tokens, opts.corpus, cache_dir)
    source["tokens"] = len(tokens)
    if stream_tokens and len(tokens) < stream_tokens:
        log(f"bk eval: the stream source holds {len(tokens):,} tokens, fewer than --stream-tokens {stream_tokens:,}")
    with progress_bars.bar(
        total=len(tokens) - 1, desc="bk stream", unit="tok", unit_scale=True, enabled=progress, leave=False
    ) as bar:
        points = stream_eval(model, tokens, chunk, progress=bar)
    return {
        "run": str(run_dir),
        "checkpoint_seq_len": state["seq_len"],
        "chunk": chunk,
        "source": source,
        "points": [asdict(p) for p in points],
    }


def table(result: dict) -> str:
    rows = [
        [f"{p['tokens']:,}", f"{p['nll']:.4f}", f"{np.exp(min(p['nll'], 700)):.3f}", f"{p['tokens_per_s']:,.0f}",
         f"{p['peak_bytes'] / 2**20:.1f}"]
        for p in result["points"]
    ]  # fmt: skip
    title = f"stream of the length-{result['checkpoint_seq_len']:,} checkpoint, chunks of {result['chunk']:,}:\n"
    return title + tables.text(["tokens", "nll", "ppl", "tokens/s", "peak MB"], rows, align="rrrrr")
