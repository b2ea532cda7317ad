"""`mlx-ltc eval RUN_DIR`: perplexity (by document kind), context use, repo QA, streaming and the
forgetting check of a finished run's adapted model (and, with `base`, of the model it started from);
with `--completion`, the repo code-completion benchmark instead. Written into the run directory as
report.md, report.json["eval"] (each measurement its own entries, kept when another is rerun) and
plots/*.png."""

import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_ltc import atomic, config, data, models, plan
from mlx_ltc.errors import UserError
from mlx_ltc.eval import completion, context, forgetting, perplexity, qa, report, stream
from mlx_ltc.eval.completion import CompletionOptions
from mlx_ltc.eval.results import Evaluation, RepoQA, StreamRow, StreamSource


@dataclass(frozen=True)
class EvalOptions(config.EvaluateConfig):
    """The config's `evaluate` section as run_eval takes it: `completion` set (to the section's own completion
    options) runs the completion benchmark instead of the measurements."""

    completion: CompletionOptions | None = None
    progress: bool = True

    @classmethod
    def of(cls, section: config.EvaluateConfig, benchmark: bool = False, progress: bool = True) -> "EvalOptions":
        values = {f.name: getattr(section, f.name) for f in fields(section)}
        return cls(**values | {"completion": section.completion if benchmark else None, "progress": progress})


def _log(msg):
    print(msg, file=sys.stderr, flush=True)


def check_run(run_dir: Path) -> plan.RunInfo:
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
    return plan.RunInfo.read(run_dir)


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


def evaluate_model(model, name, splits, stream_tokens, windows, lengths, opts, qa_set, sample, ev: Evaluation):
    """Every measurement for one model (the base or the adapted one), into `ev`'s entries for `name`; the
    forgetting check's perplexity is returned (None without a sample)."""
    ev.perplexity[name] = {}
    for split_name in opts.splits:
        split = splits[split_name]
        p = perplexity(model, split, 4, desc=f"{name}: {split_name} perplexity", progress=opts.progress)
        ev.perplexity[name][split_name] = p
        kinds = ", ".join(f"{k} {p.kind(k).ppl:.3f} ({p.kind(k).tokens:,})" for k in p.by_kind)
        _log(f"eval {name}: {split_name} ppl {p.ppl:.3f} over {p.tokens:,} tokens; by kind (tokens): {kinds}")
    forgot = None
    if sample is not None:
        forgot = perplexity(model, sample[0], 4, desc=f"{name}: forgetting", progress=opts.progress)
        _log(f"eval {name}: {sample[1].source}: ppl {forgot.ppl:.3f} over {forgot.tokens:,} tokens")

    ctx_tokens = min(opts.context_tokens, len(stream_tokens)) // max(lengths) * max(lengths)
    with _bar(ctx_tokens * len(lengths), f"{name}: context", "tok", opts.progress) as bar:
        curve = context.context_curve(model, stream_tokens, lengths, opts.context_tokens, bar)
    ev.context[name] = curve
    _log(f"eval {name}: ppl by length " + ", ".join(f"{n}: {p:.3f}" for n, p in zip(curve.lengths, curve.ppl)))

    rows, tokens, buckets = qa_set
    with _bar(len(rows), f"{name}: repo QA", "probe", opts.progress) as bar:
        scores = qa.score(model, rows, tokens, buckets, bar)
    ev.qa[name] = RepoQA(qa.by_bucket(scores), scores)
    if scores:
        ev.qa[name].accuracy = sum(s.rank == 1 for s in scores) / len(scores)
        _log(f"eval {name}: repo QA {ev.qa[name].accuracy:.1%} of {len(scores)} probes")

    for w in windows:
        with _bar(len(stream_tokens), f"{name}: stream W={w:,}", "tok", opts.progress) as bar:
            points = stream.stream_eval(model, stream_tokens, w, opts.chunk, progress=bar)
        ev.streaming += [StreamRow(**asdict(p), model=name) for p in points]
        last = points[-1]
        _log(
            f"eval {name}: stream of {last.tokens:,} tokens, window {w:,}: nll {last.nll:.4f}, "
            f"{last.tokens_per_s:,.0f} tokens/s, peak {last.peak_bytes / 2**30:.2f} GB"
        )
    return forgot


def run_eval(run_dir: Path, opts: EvalOptions, cache_dir=None) -> dict:
    started = time.perf_counter()
    run_dir = Path(run_dir)
    info = check_run(run_dir)
    cfg = config.build(None, info.config)
    meta = data.load_metadata(run_dir / "data")
    if opts.stream_corpus is not None and not Path(opts.stream_corpus).is_dir():
        raise UserError(f"--stream-corpus {opts.stream_corpus}: not a directory")
    cache_dir = Path(cache_dir) if cache_dir else models.default_cache_dir()
    model_dir = info.base_model_dir(cfg, cache_dir)
    if opts.completion is not None:
        bench = _benchmark(info, cfg, meta, opts.completion, cache_dir, model_dir)
    _log(f"model: loading {cfg.model.name}")
    loaded = models.load(model_dir, cfg.model.dequantize)
    if meta.tokenizer_hash != data.tokenizer_hash(loaded.tokenizer):
        raise UserError(f"{run_dir / 'data'} was built with another tokenizer than {cfg.model.name}'s")
    if opts.completion is not None:
        results = _complete(loaded, run_dir, bench, opts)
    else:
        results = _measure(loaded, run_dir, cfg, meta, opts)
        results.wall_s = time.perf_counter() - started
    report.write(run_dir, results)
    return results.to_json()


def load_adapters(loaded, run_dir: Path) -> None:
    """The run's adapters on the loaded base model (frozen); one error line when they can't be read."""
    from mlx_lm.tuner import utils as tuner

    try:
        tuner.load_adapters(loaded.model, str(run_dir / "adapters"))
    except (ValueError, OSError, RuntimeError) as e:
        raise UserError(f"cannot load {run_dir / 'adapters'}: {str(e).splitlines()[0]}") from None
    loaded.model.freeze()


def _benchmark(info, cfg, meta, opts, cache_dir, model_dir):
    """The completion benchmark's targets and prompts, from the run's repository as it is now."""
    repo = Path(info.repo)
    if not repo.is_dir():
        raise UserError(f"the completion benchmark reads the run's repository, and {repo} is gone")
    tokenizer = models.load_tokenizer(model_dir)
    corpus = data.Corpus.cached(
        data.scan(repo, cfg.data.max_file_bytes), tokenizer, cfg.data, cache_dir, log=_log, progress=False
    )
    return completion.Benchmark.build(corpus, meta, opts)


def _complete(loaded, run_dir: Path, bench, opts: EvalOptions) -> Evaluation:
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
    load_adapters(loaded, run_dir)
    results["adapted"] = completion.measure(
        loaded.model, loaded.tokenizer, bench, "adapted", c.max_tokens, progress=opts.progress
    )
    atomic.write_jsonl(run_dir / report.EVAL_RECORDS, completion.records(bench, results))  # train's stay
    return Evaluation(**completion.section(bench, results, c, time.perf_counter() - started))


def _measure(loaded, run_dir: Path, cfg, meta: dict, opts: EvalOptions) -> Evaluation:
    seq_len = meta.seq_len
    splits = {name: data.load_split(run_dir / "data", name) for name in ("val", "test")}
    for name, split in splits.items():
        if len(split) == 0 or split.predicted_tokens == 0:
            raise UserError(f"{run_dir / 'data'}: the {name} split is empty; nothing to evaluate")
    if opts.stream_corpus is not None:
        tokens, files = corpus_stream(opts.stream_corpus, loaded.tokenizer, opts.stream_tokens, cfg.data.max_file_bytes)
        path = str(Path(opts.stream_corpus).resolve())
        source = StreamSource(kind="corpus", path=path, files=files, tokens=len(tokens))
    else:
        tokens = split_stream(splits["test"])
        tokens = tokens[: opts.stream_tokens] if opts.stream_tokens else tokens
        source = StreamSource(kind="test split", path=str(run_dir / "data"), tokens=len(tokens))
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

    ev = Evaluation(models=["base", "adapted"] if opts.base else ["adapted"], seq_len=seq_len, stream_source=source,
                    windows=windows, lengths=lengths, qa_split=opts.qa_split, perplexity={}, context={}, qa={},
                    streaming=[])  # fmt: skip
    forgot = {}
    for name in ev.models:
        if name == "adapted":
            load_adapters(loaded, run_dir)
        forgot[name] = evaluate_model(loaded.model, name, splits, tokens, windows, lengths, opts, qa_set, sample, ev)
    if sample is not None:
        ev.forgetting = sample[1].scored(**forgot)
    return ev


def _windows(windows: list, limit: int | None) -> list:
    """Streaming windows, those beyond the model's own sliding window cut to it."""
    if any(w < 2 for w in windows):
        raise UserError(f"--windows must be at least 2 tokens: {windows}")
    if limit is not None and max(windows) > limit:
        _log(f"eval: the model attends to at most {limit:,} tokens; larger windows use {limit:,}")
    return sorted({min(w, limit or w) for w in windows})
