"""`mlx-ltc bk train`: the BK model from scratch, on a curriculum of growing sequence lengths.

Each length trains `steps_per_length` AdamW updates of max(1, tokens_per_step // length) random windows
of the train stream (so tokens per update stay about constant), at its own warmup + cosine rate
(`runtime.schedule`), with the pre-clip gradient norm, loss spikes (> 2x the running median) and
non-finite updates (skipped) counted by `runtime.stability`. Sequences longer than `train_chunk`
go through forward and backward a chunk at a time with the carried state (`bk.chunked`), so memory does
not grow with length. Each length ends with a val loss on non-overlapping windows of that length and a
checkpoint.

The run directory (`runtime`'s guards, COMPLETE last): run.json (settings), data/ (the token streams),
checkpoints/len-NNNNNNN/ (weights, optimizer, state.json with the length's results row, manifest.json),
metrics.jsonl (one line per update attempt), results.json and summary.txt. Ctrl-C saves
checkpoints/partial/ after the current update (the length's position, its window sampler and running
stats too). Started again with the same settings (and the same or more --seq-lens), a run continues
from its partial or last checkpoint, with the updates it would have made.
"""

import json
import math
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from mlx_ltc import atomic, tables
from mlx_ltc.research.bk import chunked, data
from mlx_ltc.research.bk.model import BKConfig, BKModel
from mlx_ltc.config import BkCorpusConfig, BkModelConfig, BkTrainConfig, StabilityConfig
from mlx_ltc.errors import Interrupted, UserError
from mlx_ltc.runtime.checkpoints import Checkpoints
from mlx_ltc.runtime.interrupt import StopRequest
from mlx_ltc.runtime.metrics import MetricsLog
from mlx_ltc.runtime.rundir import CONTINUE, RunDir
from mlx_ltc.runtime.schedule import warmup_cosine
from mlx_ltc.train.update import enable_grad_checkpoint
from mlx_ltc.runtime import stability
from mlx_ltc.runtime.stability import StabilityState
from mlx_ltc.train.phases import Phase

__all__ = ["LengthRun", "load_checkpoint", "summary_table", "train"]


def _log(msg):
    print(msg, file=sys.stderr, flush=True)


def _finite(x):
    return float(x) if x is not None and math.isfinite(x) else None


def run_settings(model: BkModelConfig, opts: BkTrainConfig, corpus: BkCorpusConfig) -> dict:
    """run.json: the config's bk sections as they always were laid out, so a rerun of a run written before
    compares equal (check_out)."""
    return json.loads(json.dumps({"model": asdict(model), "train": asdict(opts), "corpus": asdict(corpus)}))


def length_phases(opts: BkTrainConfig) -> list:
    """One `Phase` (the LoRA curriculum's unit) per length: its batch and its own LR schedule."""
    steps = opts.steps_per_length
    return [
        Phase(index=i, seq_len=n, lr_mult=1.0, band=1.0, steps=steps, micro_batch=max(1, opts.tokens_per_step // n),
              grad_accum=1, warmup=min(opts.warmup_steps, steps // 5 if i else max(steps - 1, 0)))
        for i, n in enumerate(opts.seq_lens)
    ]  # fmt: skip


def check_corpus(corpus: data.Corpus, lens: list) -> None:
    longest = max(lens)
    for name, tokens in (("train", corpus.train), ("val", corpus.val)):
        if len(tokens) < longest + 1:
            raise UserError(
                f"the corpus's {name} slice holds {len(tokens):,} tokens, fewer than the longest --seq-lens "
                f"{longest:,} + 1: use shorter lengths or a larger corpus"
            )


# --- the run directory ---------------------------------------------------------------------------


PARTIAL = "partial"


def _checkpoint_name(seq_len: int) -> str:
    return f"len-{seq_len:07d}"


def _checkpoint_dir(out: Path, seq_len: int) -> Path:
    return Checkpoints(out).path(_checkpoint_name(seq_len))


def _partial_dir(out: Path) -> Path:
    return Checkpoints(out).path(PARTIAL)


def _partial(out: Path, seq_len: int) -> dict | None:
    """state.json of a Ctrl-C checkpoint inside the length to train next (None: none, damaged or stale)."""
    state = Checkpoints(out, log=_log).state(PARTIAL)
    return state if state and state.get("seq_len") == seq_len else None


def _finished(out: Path) -> list:
    """state.json of each whole per-length checkpoint, shortest first."""
    checkpoints, states = Checkpoints(out, log=_log), []
    for name in checkpoints.names("len-"):
        state = checkpoints.state(name)
        if state is None:
            break  # damaged: it and the lengths after it train again
        states.append(state)
    return states


def run_dir(out: Path) -> RunDir:
    return RunDir(Path(out), "a bk run", "run.json")


def check_out(out: Path, settings: dict, overwrite: bool) -> tuple:
    """(finished lengths' states to resume after, the run directory's verdict); writes nothing."""

    def changed(out: Path) -> list:
        try:
            old = json.loads((out / "run.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise UserError(f"{out}/run.json is unreadable; pass --overwrite to start the run again") from None
        differ = [
            f"{section}.{k}"
            for section in settings
            for k in settings[section]
            if k != "seq_lens" and old.get(section, {}).get(k) != settings[section][k]
        ]
        old_lens = [s["seq_len"] for s in _finished(out)]
        if settings["train"]["seq_lens"][: len(old_lens)] != old_lens:
            differ.append("train.seq_lens (the finished lengths must start the list)")
        return differ

    verdict = run_dir(out).check(overwrite, changed)
    if verdict != CONTINUE:
        return [], verdict
    done = _finished(out)
    if len(done) == len(settings["train"]["seq_lens"]):
        raise UserError(f"{out} already holds a finished run; choose another --out or pass --overwrite")
    return done, verdict


def save_checkpoint(out: Path, model, optimizer, state: dict, name: str | None = None) -> Path:
    arrays = {"model": dict(tree_flatten(model.parameters())), "optimizer": dict(tree_flatten(optimizer.state))}
    return Checkpoints(out, log=_log).write(name or _checkpoint_name(state["seq_len"]), arrays, state)


def load_checkpoint(out: Path, seq_len: int | None = None):
    """(model, state) of the checkpoint at seq_len (default: the longest finished length)."""
    done = _finished(out)
    if not done:
        raise UserError(f"{out} holds no finished length (no checkpoints/len-*/state.json)")
    if seq_len is None:
        state = done[-1]
    else:
        state = next((s for s in done if s["seq_len"] == seq_len), None)
        if state is None:
            raise UserError(f"{out} has no checkpoint at length {seq_len}; it has {[s['seq_len'] for s in done]}")
    cfg = dict(state["config"])
    cfg["eta_init"] = tuple(cfg["eta_init"])
    model = BKModel(BKConfig(**cfg))
    try:
        model.load_weights(str(_checkpoint_dir(out, state["seq_len"]) / "model.safetensors"))
    except (ValueError, OSError, RuntimeError) as e:
        raise UserError(f"cannot load the checkpoint at length {state['seq_len']}: {str(e).splitlines()[0]}") from None
    mx.eval(model.parameters())
    model.eval()
    return model, state


# --- training ------------------------------------------------------------------------------------


def _windows(tokens: np.ndarray, length: int, count: int, rng) -> mx.array:
    """count random windows of `length` tokens (B, length) int32."""
    starts = rng.integers(0, len(tokens) - length + 1, count)
    return mx.array(tokens[starts[:, None] + np.arange(length)])


def val_loss(model, tokens: np.ndarray, length: int, max_tokens: int, batch: int, chunk: int = 0) -> tuple:
    """(mean NLL, targets) over non-overlapping windows of length + 1 tokens (each from a fresh state)."""
    count = max(1, min(max_tokens // length, (len(tokens) - 1) // length))
    starts = np.arange(count) * length
    total = 0.0
    for s in range(0, count, batch):
        total += chunked.nll_sum(model, mx.array(tokens[starts[s : s + batch, None] + np.arange(length + 1)]), chunk)
    return total / (count * length), count * length


class LengthRun:
    """One model through the length curriculum: windows, AdamW with per-length warmup + cosine, clipping,
    stability counts; shared by `bk train` and scripts/bench_bk.py."""

    def __init__(self, model, corpus: data.Corpus, opts: BkTrainConfig, out: Path, progress: bool):
        self.model, self.corpus, self.opts, self.out, self.progress = model, corpus, opts, Path(out), progress
        self.optimizer = optim.AdamW(learning_rate=opts.lr, weight_decay=opts.weight_decay, bias_correction=True)
        self.loss_and_grad = chunked.value_and_grad(model, opts.train_chunk)
        self.stability = StabilityState()
        self.rules = StabilityConfig(spike_limit=sys.maxsize)  # spikes are counted, never rolled back
        self.step = self.attempts = 0
        self.rows = []
        self.stop = StopRequest(_log, "saving after this update")  # bk train's Ctrl-C

    def resume(self, state: dict, path: Path | None = None) -> None:
        path = path or _checkpoint_dir(self.out, state["seq_len"])
        self.model.load_weights(str(path / "model.safetensors"))
        self.optimizer.state = tree_unflatten(list(mx.load(str(path / "optimizer.safetensors")).items()))
        self.stability = StabilityState.from_json(state["stability"])
        self.step, self.attempts = state["step"], state["attempts"]
        mx.eval(self.model.parameters(), self.optimizer.state)

    def _update(self, batch: mx.array, lr: float) -> tuple:
        """(loss, pre-clip grad norm, applied?) of one update attempt."""
        self.attempts += 1
        loss, grads = self.loss_and_grad(self.model, batch)
        if self.attempts in self.opts.inject_nan:
            grads = tree_map(lambda g: g * math.nan, grads)
        grads, norm = optim.clip_grad_norm(grads, self.opts.max_grad_norm)
        loss, norm = loss.item(), norm.item()
        apply, events = stability.check(self.stability, self.rules, self.step + 1, loss, norm, batch.shape[1] - 1)
        if any(e.kind == "unstable" for e in events):
            raise UserError(
                f"training diverged at update {self.step + 1}: {events[-1].reason}; lower --lr "
                f"(the finished lengths' checkpoints are in {self.out / 'checkpoints'})"
            )
        if apply:
            self.optimizer.learning_rate = lr
            self.optimizer.update(self.model, grads)
            mx.eval(self.model.parameters(), self.optimizer.state)
            self.step += 1
        return loss, norm, apply, [e.kind for e in events]

    def _save_partial(self, phase: Phase, done: int, rng, losses: list, tokens: int, train_s: float) -> None:
        state = {"seq_len": phase.seq_len, "index": phase.index, "length_step": done, "step": self.step,
                 "attempts": self.attempts, "stability": self.stability.to_json(), "rng": rng.bit_generator.state,
                 "losses": losses, "tokens": tokens, "train_s": train_s}  # fmt: skip
        save_checkpoint(self.out, self.model, self.optimizer, state, PARTIAL)

    def length(self, phase: Phase, metrics: MetricsLog | None = None, partial: dict | None = None) -> dict:
        """Train one length (from a Ctrl-C checkpoint's position when given) and score its val loss; one line
        per update attempt to `metrics` when given."""
        from mlx_ltc import progress as progress_bars

        n, batch = phase.seq_len, phase.micro_batch
        rng = np.random.default_rng([self.opts.seed, n])
        losses, tokens, train_s, first = [], 0, 0.0, 0
        if partial:
            rng.bit_generator.state = partial["rng"]
            losses, tokens, train_s = partial["losses"], partial["tokens"], partial["train_s"]
            first = partial["length_step"]
        mx.synchronize()
        mx.reset_peak_memory()
        bar = progress_bars.bar(
            total=phase.steps, initial=first, desc=f"bk L={n:,}", unit="step", enabled=self.progress
        )
        with bar:
            for i in range(first, phase.steps):
                started = time.perf_counter()
                lr = warmup_cosine(i, self.opts.lr * phase.lr_mult, phase.warmup, phase.steps, self.opts.min_lr_ratio)
                loss, norm, applied, events = self._update(_windows(self.corpus.train, n + 1, batch, rng), lr)
                train_s += time.perf_counter() - started
                if applied:
                    losses.append(loss)
                    tokens += batch * n
                line = {"step": self.step, "attempt": self.attempts, "seq_len": n, "length_step": i + 1,
                        "batch": batch, "loss": _finite(loss), "lr": lr, "grad_norm": _finite(norm),
                        "applied": applied, "events": events, "tokens": tokens,
                        "tokens_per_s": tokens / max(train_s, 1e-9),
                        "peak_bytes": int(mx.get_peak_memory())}  # fmt: skip
                if metrics is not None:
                    metrics.append(line)
                bar.set_postfix(
                    loss=f"{loss:.3f}",
                    tok_s=f"{line['tokens_per_s']:.0f}",
                    mem=f"{line['peak_bytes'] / 2**30:.2f}GB",
                    refresh=False,
                )
                bar.update(1)
                if self.stop.requested and i + 1 < phase.steps:
                    self._save_partial(phase, i + 1, rng, losses, tokens, train_s)
                    raise Interrupted(
                        f"interrupted: saved length {n:,} after update {i + 1} of {phase.steps} in "
                        f"{_partial_dir(self.out)}; run the same command again to continue"
                    )
        peak = int(mx.get_peak_memory())
        self.model.eval()
        v_loss, v_tokens = val_loss(self.model, self.corpus.val, n, self.opts.val_tokens, batch, self.opts.train_chunk)
        self.model.train()
        per_length = self.stability.by_length.get(str(n))
        grad = per_length.grad if per_length else None
        tail = losses[-max(1, len(losses) // 10) :]
        return {
            "seq_len": n,
            "batch": batch,
            "steps": len(losses),
            "tokens": tokens,
            "final_train_loss": _finite(float(np.mean(tail))) if losses else None,  # mean of the last 10%
            "val_loss": _finite(v_loss),
            "val_ppl": _finite(math.exp(v_loss)) if v_loss < 700 else None,
            "val_tokens": v_tokens,
            "spikes": per_length.spikes if per_length else 0,
            "nonfinite": per_length.skipped if per_length else 0,
            "grad_norm_mean": _finite(grad.mean) if grad and grad.n else None,
            "grad_norm_std": _finite(grad.std) if grad and grad.n else None,
            "grad_norm_min": _finite(grad.min) if grad and grad.n else None,
            "grad_norm_max": _finite(grad.max) if grad and grad.n else None,
            "tokens_per_s": tokens / max(train_s, 1e-9),
            "peak_bytes": peak,
            "seconds": train_s,
        }


def _keep_metrics(metrics: MetricsLog, lengths: set, partial: dict | None = None) -> None:
    """Cut metrics.jsonl back to the finished lengths' lines and those of a partial length's saved updates."""

    def saved(row):
        inside = partial and row["seq_len"] == partial["seq_len"] and row["length_step"] <= partial["length_step"]
        return row["seq_len"] in lengths or bool(inside)

    metrics.keep(saved)


def _fmt(x, spec):
    return format(x, spec) if x is not None else "-"


def summary_table(rows: list) -> str:
    """The design's table: length, final (val) perplexity, spikes, grad norm mean +- std."""
    header = ["length", "final ppl", "spikes", "non-finite", "grad norm mean ± std", "tokens/s", "peak GB"]
    cells = [
        [f"{r['seq_len']:,}", _fmt(r["val_ppl"], ".3f"), r["spikes"], r["nonfinite"],
         f"{_fmt(r['grad_norm_mean'], '.3f')} ± {_fmt(r['grad_norm_std'], '.3f')}", f"{r['tokens_per_s']:,.0f}",
         f"{r['peak_bytes'] / 2**30:.2f}"]
        for r in rows
    ]  # fmt: skip
    return tables.text(header, cells, align="r" * len(header))


def _write_results(out: Path, settings: dict, rows: list, started: float) -> str:
    table = summary_table(rows)
    results = {
        **settings,
        "lengths": rows,
        "nonfinite": sum(r["nonfinite"] for r in rows),
        "spikes": sum(r["spikes"] for r in rows),
        "wall_s": time.perf_counter() - started,
    }
    atomic.write_json(out / "results.json", results)
    atomic.write_text(out / "summary.txt", table)
    return table


def train(
    model: BkModelConfig, opts: BkTrainConfig, corpus_opts: BkCorpusConfig, out: Path, overwrite: bool = False,
    progress: bool = True, log=_log, cache_dir=None,
) -> dict:  # fmt: skip
    """Run (or continue) the curriculum (the config's bk sections, validated by `config.merge`; the model's
    vocabulary is the tokenizer's). Returns results.json's content, with the summary table as "table"."""
    started = time.perf_counter()
    out = Path(out)
    corpus_opts = replace(corpus_opts, root=str(Path(corpus_opts.root or data.default_corpus()).resolve()))
    settings = run_settings(model, opts, corpus_opts)
    done, verdict = check_out(out, settings, overwrite)
    partial = _partial(out, opts.seq_lens[len(done)]) if verdict == CONTINUE else None
    if done or partial:
        corpus = data.load(out / "data")
        finished = ", ".join(str(s["seq_len"]) for s in done) or "none"
        inside = f"; length {partial['seq_len']:,} continues after update {partial['length_step']}" if partial else ""
        log(f"resuming {out}: finished lengths: {finished}{inside}")
    else:
        corpus = data.tokenize(
            Path(corpus_opts.root), data.load_tokenizer(cache_dir), corpus_opts.val_share, corpus_opts.max_tokens, log
        )
    check_corpus(corpus, opts.seq_lens)
    model_cfg = BKConfig(vocab_size=corpus.info["vocab_size"], **asdict(model))
    metrics = MetricsLog(out / "metrics.jsonl")
    if not (done or partial):
        run_dir(out).create(verdict)
        data.save(corpus, out / "data")
        atomic.write_json(out / "run.json", settings)
        metrics.start()
    run_dir(out).reopen()  # more lengths make a finished run unfinished until they are trained

    mx.random.seed(opts.seed)
    net = BKModel(model_cfg)
    if opts.grad_checkpoint:
        enable_grad_checkpoint(net)
    mx.eval(net.parameters())
    run = LengthRun(net, corpus, opts, out, progress)
    if partial:
        run.resume(partial, _partial_dir(out))
    elif done:
        run.resume(done[-1])
    if done or partial:
        _keep_metrics(metrics, {s["seq_len"] for s in done}, partial)
    run.rows = [s["row"] for s in done]
    n_params = sum(p.size for _, p in tree_flatten(net.parameters()))
    log(
        f"model: BK core, {n_params:,} parameters, d_model {model_cfg.d_model}, {model_cfg.n_layers} layers, "
        f"vocabulary {model_cfg.vocab_size:,}"
    )

    net.train()
    with run.stop:
        for phase in length_phases(opts)[len(done) :]:
            row = run.length(phase, metrics, partial if partial and partial["seq_len"] == phase.seq_len else None)
            run.rows.append(row)
            state = {"seq_len": phase.seq_len, "index": phase.index, "step": run.step, "attempts": run.attempts,
                     "config": asdict(model_cfg), "row": row, "stability": run.stability.to_json()}  # fmt: skip
            save_checkpoint(out, net, run.optimizer, state)
            Checkpoints(out).remove(PARTIAL)
            _write_results(out, settings, run.rows, started)
            log(
                f"length {phase.seq_len:,}: {row['steps']} updates of {phase.micro_batch} x {phase.seq_len:,} tokens, "
                f"train loss {_fmt(row['final_train_loss'], '.4f')}, val ppl {_fmt(row['val_ppl'], '.3f')}, "
                f"{row['tokens_per_s']:,.0f} tokens/s, peak {row['peak_bytes'] / 2**30:.2f} GB"
            )
    table = _write_results(out, settings, run.rows, started)
    run_dir(out).complete()
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    return {**results, "table": table}
