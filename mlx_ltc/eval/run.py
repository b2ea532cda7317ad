"""`mlx-ltc eval RUN_DIR`: perplexity (by document kind), context use, repo QA, streaming and the
forgetting check of a finished run's adapted model (and, with `base`, of the model it started from);
with `--completion`, the repo code-completion benchmark instead. Written into the run directory as
report.md, report.json["eval"] (each measurement its own entries, kept when another is rerun) and
plots/*.png."""

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_ltc import atomic, config, data, models
from mlx_ltc.errors import UserError
from mlx_ltc.eval import completion, context, forgetting, perplexity, qa, report, stream
from mlx_ltc.eval.completion import CompletionOptions


@dataclass
class EvalOptions:
    base: bool = False  # also evaluate the base model, side by side
    lengths: list = field(default_factory=list)  # evaluation lengths; [] = context.default_lengths
    context_tokens: int = 16_384  # test-split tokens scored at every evaluation length
    windows: list = field(default_factory=list)  # streaming KV windows; [] = seq_len / 2, seq_len, 2 x seq_len
    stream_tokens: int = 32_768  # 0: the whole stream source
    stream_corpus: Path | None = None  # a directory of source files; None: the test split
    chunk: int = 512  # streaming prefill chunk
    qa_split: str = "test"
    splits: tuple = ("val", "test")  # perplexity on these
    forgetting_tokens: int = 16_384  # standard-library tokens for the forgetting check (0: none)
    completion: CompletionOptions | None = None  # set: the completion benchmark instead
    progress: bool = True


def _log(msg):
    print(msg, file=sys.stderr, flush=True)


def check_run(run_dir: Path) -> dict:
    """The run's config.json, once the directory is known to hold adapters and a dataset."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run directory does not exist: {run_dir}")
    if not (run_dir / "config.json").is_file():
        raise UserError(f"{run_dir} is not an mlx-ltc run directory (no config.json)")
    adapters = run_dir / "adapters"
    if not (adapters / "adapters.safetensors").is_file() or not (adapters / "adapter_config.json").is_file():
        raise UserError(
            f"{run_dir} has no adapters: training did not finish (`mlx-ltc train --resume {run_dir}` continues it)"
        )
    try:
        mx.load(str(adapters / "adapters.safetensors"))
    except (ValueError, OSError, RuntimeError) as e:
        raise UserError(f"cannot load {adapters / 'adapters.safetensors'}: {str(e).splitlines()[0]}") from None
    data.load_metadata(run_dir / "data")
    return json.loads((run_dir / "config.json").read_text(encoding="utf-8"))


def split_stream(split: data.Split) -> np.ndarray:
    """A split's real tokens, sequence after sequence (no repo prefix, no padding)."""
    return split.tokens[:, 1:][split.real]


def corpus_stream(root: Path, tokenizer, limit: int, max_file_bytes: int) -> tuple:
    """(tokens, files used): source files of `root` in path order, each under its file header in the
    model's repo-level format, tokenized until `limit` tokens (0: all)."""
    scan = data.scan(root, max_file_bytes)
    encode, markers = data.formats.Encoder(tokenizer), data.formats.markers(tokenizer)
    parts, total, used = [], 0, 0
    for f in scan.files:
        header = encode.markup([markers.file_header(f.path)])[0]
        parts.append(np.asarray(header + encode([f.text])[0], dtype=np.int32))
        total += len(parts[-1])
        used += 1
        if limit and total >= limit:
            break
    tokens = np.concatenate(parts)
    return (tokens[:limit] if limit else tokens), used


def _bar(total, desc, unit, progress):
    from mlx_ltc import progress as progress_bars

    return progress_bars.bar(total=total, desc=desc, unit=unit, unit_scale=True, enabled=progress, leave=False)


def evaluate_model(model, name, splits, stream_tokens, windows, lengths, opts, qa_set, sample) -> dict:
    """Every measurement for one model (the base or the adapted one)."""
    out = {"perplexity": {}}
    for split_name in opts.splits:
        split = splits[split_name]
        p = perplexity(model, split, 4, desc=f"{name}: {split_name} perplexity", progress=opts.progress)
        out["perplexity"][split_name] = asdict(p)
        kinds = ", ".join(f"{k} {v['ppl']:.3f} ({v['tokens']:,})" for k, v in p.by_kind.items())
        _log(f"eval {name}: {split_name} ppl {p.ppl:.3f} over {p.tokens:,} tokens; by kind (tokens): {kinds}")
    if sample is not None:
        p = perplexity(model, sample[0], 4, desc=f"{name}: forgetting", progress=opts.progress)
        out["forgetting"] = asdict(p)
        _log(f"eval {name}: {sample[1]['source']}: ppl {p.ppl:.3f} over {p.tokens:,} tokens")

    ctx_tokens = min(opts.context_tokens, len(stream_tokens)) // max(lengths) * max(lengths)
    with _bar(ctx_tokens * len(lengths), f"{name}: context", "tok", opts.progress) as bar:
        curve = context.context_curve(model, stream_tokens, lengths, opts.context_tokens, bar)
    out["context"] = asdict(curve)
    _log(f"eval {name}: ppl by length " + ", ".join(f"{n}: {p:.3f}" for n, p in zip(curve.lengths, curve.ppl)))

    rows, tokens, buckets = qa_set
    with _bar(len(rows), f"{name}: repo QA", "probe", opts.progress) as bar:
        scores = qa.score(model, rows, tokens, buckets, bar)
    out["qa"] = {"buckets": qa.by_bucket(scores), "probes": [asdict(s) for s in scores]}
    if scores:
        accuracy = sum(s.rank == 1 for s in scores) / len(scores)
        out["qa"]["accuracy"] = accuracy
        _log(f"eval {name}: repo QA {accuracy:.1%} of {len(scores)} probes")

    out["streaming"] = []
    for w in windows:
        with _bar(len(stream_tokens), f"{name}: stream W={w:,}", "tok", opts.progress) as bar:
            points = stream.stream_eval(model, stream_tokens, w, opts.chunk, progress=bar)
        out["streaming"] += [{"model": name, **asdict(p)} for p in points]
        last = points[-1]
        _log(
            f"eval {name}: stream of {last.tokens:,} tokens, window {w:,}: nll {last.nll:.4f}, "
            f"{last.tokens_per_s:,.0f} tokens/s, peak {last.peak_bytes / 2**30:.2f} GB"
        )
    return out


def run_eval(run_dir: Path, opts: EvalOptions, cache_dir=None) -> dict:
    started = time.perf_counter()
    run_dir = Path(run_dir)
    info = check_run(run_dir)
    cfg = config.build(None, info["config"])
    meta = data.load_metadata(run_dir / "data")
    if opts.stream_corpus is not None and not Path(opts.stream_corpus).is_dir():
        raise UserError(f"--stream-corpus {opts.stream_corpus}: not a directory")
    cache_dir = Path(cache_dir) if cache_dir else models.default_cache_dir()
    model_dir = Path(info["model_dir"])
    if not model_dir.is_dir():
        model_dir = models.resolve(cfg.model.name, cache_dir, cfg.model.bits, cfg.model.group_size)
    if opts.completion is not None:
        bench = _benchmark(info, cfg, meta, opts.completion, cache_dir, model_dir)
    _log(f"model: loading {cfg.model.name}")
    loaded = models.load(model_dir, cfg.model.dequantize)
    if meta["tokenizer_hash"] != data.tokenizer_hash(loaded.tokenizer):
        raise UserError(f"{run_dir / 'data'} was built with another tokenizer than {cfg.model.name}'s")
    if opts.completion is not None:
        results = _complete(loaded, run_dir, bench, opts)
    else:
        results = _measure(loaded, run_dir, cfg, meta, opts)
        results["wall_s"] = time.perf_counter() - started
    report.write(run_dir, results)
    return results


def _adapt(loaded, run_dir: Path) -> None:
    from mlx_lm.tuner.utils import load_adapters

    try:
        load_adapters(loaded.model, str(run_dir / "adapters"))
    except (ValueError, OSError, RuntimeError) as e:
        raise UserError(f"cannot load {run_dir / 'adapters'}: {str(e).splitlines()[0]}") from None
    loaded.model.freeze()


def _benchmark(info, cfg, meta, opts, cache_dir, model_dir):
    """The completion benchmark's targets and prompts, from the run's repository as it is now."""
    repo = Path(info["repo"])
    if not repo.is_dir():
        raise UserError(f"the completion benchmark reads the run's repository, and {repo} is gone")
    tokenizer = models.load_tokenizer(model_dir)
    corpus = data.Corpus.cached(
        data.scan(repo, cfg.data.max_file_bytes), tokenizer, cfg.data, cache_dir, log=_log, progress=False
    )
    return completion.Benchmark.build(corpus, meta, opts)


def _complete(loaded, run_dir: Path, bench, opts: EvalOptions) -> dict:
    c = opts.completion
    started = time.perf_counter()
    t = bench.targets
    _log(
        f"completion: {len(t.targets)} targets from {len({x.path for x in t.targets})} files of the "
        f"{' and '.join(t.splits)} split(s); modes {', '.join(bench.modes)}; budgets "
        f"{', '.join(f'{b:,}' for b in bench.budgets)}"
    )
    results = {}
    if opts.base:
        results["base"] = completion.measure(
            loaded.model, loaded.tokenizer, bench, "base", c.max_tokens, progress=opts.progress
        )
    _adapt(loaded, run_dir)
    results["adapted"] = completion.measure(
        loaded.model, loaded.tokenizer, bench, "adapted", c.max_tokens, progress=opts.progress
    )
    atomic.write_jsonl(run_dir / report.EVAL_RECORDS, completion.records(bench, results))  # train's stay
    return completion.section(bench, results, c, time.perf_counter() - started)


def _measure(loaded, run_dir: Path, cfg, meta: dict, opts: EvalOptions) -> dict:
    seq_len = meta["seq_len"]
    splits = {name: data.load_split(run_dir / "data", name) for name in ("val", "test")}
    for name, split in splits.items():
        if len(split) == 0 or split.predicted_tokens == 0:
            raise UserError(f"{run_dir / 'data'}: the {name} split is empty; nothing to evaluate")
    if opts.stream_corpus is not None:
        tokens, files = corpus_stream(opts.stream_corpus, loaded.tokenizer, opts.stream_tokens, cfg.data.max_file_bytes)
        source = {"kind": "corpus", "path": str(Path(opts.stream_corpus).resolve()), "files": files}
    else:
        tokens = split_stream(splits["test"])
        tokens = tokens[: opts.stream_tokens] if opts.stream_tokens else tokens
        source = {"kind": "test split", "path": str(run_dir / "data")}
    source["tokens"] = len(tokens)
    if opts.stream_tokens and len(tokens) < opts.stream_tokens:
        _log(f"eval: the stream source holds {len(tokens):,} tokens, fewer than --stream-tokens {opts.stream_tokens:,}")
    lengths = sorted(set(opts.lengths or context.default_lengths(seq_len)))
    context_source = split_stream(splits["test"])
    if len(context_source) < max(lengths):
        kept = [n for n in lengths if n <= len(context_source)]
        if not kept:
            raise UserError(f"the test split holds {len(context_source):,} tokens, fewer than any evaluation length")
        _log(f"eval: the test split holds {len(context_source):,} tokens; lengths above it dropped")
        lengths = kept
    windows = _windows(opts.windows or [seq_len // 2, seq_len, 2 * seq_len], stream.model_window(loaded.model))
    qa_set = qa.load_probes(run_dir / "data", opts.qa_split)
    sample = forgetting.sample(loaded.tokenizer, opts.forgetting_tokens, seq_len) if opts.forgetting_tokens else None

    results = {}
    measure = lambda name: evaluate_model(  # noqa: E731
        loaded.model, name, splits, tokens, windows, lengths, opts, qa_set, sample
    )
    if opts.base:
        results["base"] = measure("base")
    _adapt(loaded, run_dir)
    results["adapted"] = measure("adapted")
    out = {
        "models": list(results),
        "seq_len": seq_len,
        "stream_source": source,
        "windows": windows,
        "lengths": lengths,
        "qa_split": opts.qa_split,
        "perplexity": {name: r["perplexity"] for name, r in results.items()},
        "context": {name: r["context"] for name, r in results.items()},
        "qa": {name: r["qa"] for name, r in results.items()},
        "streaming": [row for r in results.values() for row in r["streaming"]],
    }
    if sample is not None:
        info = {**sample[1], "files": len(sample[1]["files"])}
        out["forgetting"] = {**info, **{name: r["forgetting"] for name, r in results.items()}}
    return out


def _windows(windows: list, limit: int | None) -> list:
    """Streaming windows, those beyond the model's own sliding window cut to it."""
    if any(w < 2 for w in windows):
        raise UserError(f"--windows must be at least 2 tokens: {windows}")
    if limit is not None and max(windows) > limit:
        _log(f"eval: the model attends to at most {limit:,} tokens; larger windows use {limit:,}")
    return sorted({min(w, limit or w) for w in windows})
