"""`mlx-ltc mc train` and `mc eval`: MegaContext on a repository, with the frozen embedded base.

Training alternates three phases per cycle, each ending in a checkpoint (`checkpoints/cycle{c}-{phase}/`, with
`runtime`'s manifest; each update's record in `metrics.jsonl`):
the gist encoder (`--encoder base-lora`: the base with a LoRA of its own, on autoencoding then autoencoding +
continuation + contrast, the decoder's reading LoRA alongside; `gistnet`: GistNet on substitutability; `both`:
GistNet, then the base-LoRA encoder, which the later phases use); LensNet on fresh counterfactual labels from
contexts the current encoder and LensNet produce; a tiny LoRA on the base (the reading LoRA), on the next
tokens' NLL through such contexts. After each cycle,
telemetry on the val files: loss@H vs budget, swap rate, residency, latency per block. A rerun of the same
command continues after the last finished phase; Ctrl-C stops after the current update, and the phase it
interrupted runs again from its start. A finished run has its training curves in `training.png`.

Evaluation uses the dataset builder's test split: held-out files of 3-6K tokens, their last H tokens scored
under each condition at each budget (see `evaluate`), plus `lens` (the focus loop streamed over the file
with LensNet + allocator), `gist_compact` (the gist condition at compact positions 0..n-1 instead of span
centres) and the same NLLs restricted to identifiers defined only in the truncated head.
"""

import json
import re
import time
from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten

from mlx_ltc import atomic, tables
from mlx_ltc.config import McEvalConfig, McTrainConfig
from mlx_ltc.errors import Interrupted, UserError
from mlx_ltc.runtime.checkpoints import Checkpoints
from mlx_ltc.runtime.interrupt import StopRequest
from mlx_ltc.runtime.metrics import MetricsLog
from mlx_ltc.runtime.rundir import CONTINUE, RunDir
from mlx_ltc.research.megacontext import context as wc
from mlx_ltc.research.megacontext import evaluate as ev
from mlx_ltc.research.megacontext import lens as lensnet
from mlx_ltc.research.megacontext.encoder import EncoderConfig, LoraEncoder, encoder_compressor
from mlx_ltc.research.megacontext.focus import Focus, extend
from mlx_ltc.research.megacontext.gistnet import GistConfig, GistNet, compressor
from mlx_ltc.research.megacontext.plots import training_curves
from mlx_ltc.research.megacontext.train import EncoderWeights, train_encoder, train_gistnet
from mlx_ltc.research.megacontext.tree import last_input, mean_gist
from mlx_ltc.numerics.loss import token_nll

__all__ = ["evaluate_run", "run_settings", "stream_focus", "train_run"]

PHASES = ("gist", "lens", "lora")
# settings a run written before they existed had: a GistNet-only run
LEGACY = {"encoder": "gistnet", "encoder_rank": 8, "encoder_lr": 3e-4, "autoencode_steps": 20, "autoencode": 1.0,
          "continuation": 1.0, "reading_lora": True}  # fmt: skip


def repo_files(repo: Path, model_name: str, split: str, progress: bool, log) -> tuple:
    """(train token arrays, val token arrays, test files) by the dataset builder's split of the repository; a
    test file is {path, tokens, text, byte_starts, definitions: [(name, byte start)]}."""
    from mlx_ltc import config, data, models

    cfg = config.build(None, {"model": {"name": model_name}, "data": {"split": split}})
    scan = data.scan(repo, cfg.data.max_file_bytes)
    tokenizer = models.load_tokenizer(models.resolve(model_name, models.default_cache_dir()))
    corpus = data.Corpus(scan, tokenizer, cfg.data, None, log=log, progress=progress)
    by = {"train": [], "val": [], "test": []}
    for path, info in sorted(corpus.infos.items()):
        by[corpus.splits[path]].append((path, info))
    test = [{"path": path, "tokens": info.tokens.astype(int).tolist(), "text": corpus.texts[path],
             "byte_starts": corpus.encode.byte_starts(info.tokens, corpus.texts[path]).astype(int).tolist(),
             "definitions": [(d.name, d.start) for d in (info.syntax.definitions if info.syntax else [])]}
            for path, info in by["test"]]  # fmt: skip
    return [i.tokens for _, i in by["train"]], [i.tokens for _, i in by["val"]], test


def _load_base(name: str):
    from mlx_ltc import models

    loaded = models.load(models.resolve(name, models.default_cache_dir()))
    loaded.model.freeze()
    return loaded


def _with_lora(model, opts: McTrainConfig) -> None:
    from mlx_ltc.config import LoraConfig
    from mlx_ltc.train.lora import apply_lora

    apply_lora(model, LoraConfig(rank=opts.lora_rank, targets=["self_attn"], layers=opts.lora_layers), opts.seed)


def _contexts(files: list, n: int, budget: int, horizon: int, rng) -> list:
    """n (history, target) pairs: a file's start up to a random cut past the budget, and the next tokens."""
    long = [f for f in files if len(f) >= budget + 128 + horizon]
    if not long:
        raise UserError(f"no file of at least {budget + 128 + horizon} tokens to build working contexts from")
    out = []
    for _ in range(n):
        f = long[rng.integers(0, len(long))]
        cut = int(rng.integers(budget + 128, len(f) - horizon + 1))
        out.append((np.asarray(f[:cut], np.int32), np.asarray(f[cut : cut + horizon], np.int32)))
    return out


def stream_focus(lens, tree_gist, tokens, budget: int, width: int, every: int = 2, n_diff: int = 4) -> tuple:
    """Run the focus loop over a history as it grows, `every` blocks per iteration: append, gist, score with
    LensNet, allocate. (tree, entries, telemetry: chosen actions per block (swap rate), forced collapses per
    block (the tail outgrowing the budget), residency in iterations between flips, ms per block)."""
    tokens = np.asarray(tokens, np.int32)
    block = 32
    start = min(len(tokens), max(budget - budget % block, block))
    tree = ev.build_tree(tokens[:start], width, tree_gist)
    entries = extend(tree, [])
    focus = Focus(budget=budget, n_diff=n_diff)
    appeared, stays, seconds, blocks = {}, [], 0.0, 0
    for at in range(start, len(tokens), every * block):
        began = time.perf_counter()
        before = len(tree.tokens) // block
        tree.append(tokens[at : at + every * block], tree_gist)
        entries = extend(tree, entries)
        for k in range(before, len(tree.tokens) // block):
            appeared[(1, k)] = focus.iteration + 1
        entries = focus.step(tree, entries, lensnet.utilities(lens, tree, entries))
        seconds += time.perf_counter() - began
        blocks += len(tree.tokens) // block - before
    last = {}
    for iteration, _, level, index in focus.log:
        key = (1, index) if level in (0, 1) else (2, index)
        since = last.get(key, appeared.get(key, 1))
        stays.append(iteration - since)
        last[key] = iteration
    chosen = sum(action != "forced" for _, action, _, _ in focus.log)
    telemetry = {"actions": chosen, "forced": len(focus.log) - chosen, "blocks": blocks, "iterations": focus.iteration,
                 "swap_rate": chosen / max(blocks, 1), "forced_rate": (len(focus.log) - chosen) / max(blocks, 1),
                 "residency": float(np.mean(stays)) if stays else None,
                 "ms_per_block": 1000 * seconds / max(blocks, 1)}  # fmt: skip
    return tree, entries, telemetry


def _phase_gist(nets, model, train, opts, seed, log):
    records = []
    if nets.gist_net is not None:
        records += _train_gistnet(nets.gist_net, model, train, opts, seed, lambda r: log({"encoder": "gistnet", **r}))
    if nets.encoder is not None:
        weights = EncoderWeights(autoencode=opts.autoencode, continuation=opts.continuation, contrast=opts.contrast)
        records += train_encoder(nets.encoder, model, train, steps=opts.max_steps,
                                 autoencode_steps=opts.autoencode_steps, blocks=opts.blocks, keep=opts.keep,
                                 horizon=opts.horizon, batch=opts.batch, lr=opts.encoder_lr, weights=weights,
                                 seed=seed + 7, log=lambda r: log({"encoder": "base-lora", **r}))  # fmt: skip
    return records


def _train_gistnet(gist_net, model, train, opts, seed, log):
    records = train_gistnet(gist_net, model, train, steps=opts.max_steps, blocks=opts.blocks, keep=opts.keep,
                            horizon=opts.horizon, batch=opts.batch, lr=opts.lr, seed=seed, contrast=opts.contrast,
                            log=log)  # fmt: skip
    if opts.l2_steps:  # one L2 gist for 32 blocks, then `keep` raw blocks and the horizon
        records += train_gistnet(gist_net, model, train, steps=opts.l2_steps, blocks=32 + opts.keep, keep=opts.keep,
                                 horizon=opts.horizon, batch=1, lr=opts.lr, seed=seed + 500, level=2,
                                 log=log)  # fmt: skip
    return records


def _trained_levels(opts) -> tuple:
    return (1, 2) if opts.l2_steps else (1,)


class Nets(NamedTuple):
    gist_net: GistNet | None  # None unless --encoder gistnet or both
    encoder: LoraEncoder | None  # None unless --encoder base-lora or both
    lens: lensnet.LensNet

    def compressor(self, model, opts):
        """The run's gists: the base-LoRA encoder's when it has one, else GistNet's."""
        if self.encoder is not None:
            return encoder_compressor(self.encoder, model.model.embed_tokens, (1,))
        return compressor(self.gist_net, model.model.embed_tokens, trained_levels=_trained_levels(opts))


def _focused(lens, tree, budget):
    """Recency tiling, then two allocator iterations with LensNet (on-policy contexts)."""
    entries = wc.recency(tree, budget)
    focus = Focus(budget=budget)
    for _ in range(2):
        entries = focus.step(tree, entries, lensnet.utilities(lens, tree, entries))
    return entries


def _phase_lens(nets, model, train, opts, seed, log):
    lens = nets.lens
    rng = np.random.default_rng(seed)
    width = model.model.embed_tokens.weight.shape[1]
    gist = nets.compressor(model, opts)
    samples = []
    for k, (history, target) in enumerate(_contexts(train, opts.lens_contexts, opts.budget, opts.horizon, rng)):
        tree = ev.build_tree(history, width, gist)
        entries = _focused(lens, tree, opts.budget)
        raw = [e for e in entries if e.level == 0]
        gists = [e for e in entries if e.level > 0]
        half = opts.lens_candidates // 2
        pick = lambda xs, n: [xs[i] for i in sorted(rng.choice(len(xs), min(n, len(xs)), replace=False))]  # noqa: E731
        candidates = pick(gists, opts.lens_candidates - min(half, len(raw))) + pick(raw, half)
        labels = lensnet.counterfactual_labels(model, tree, entries, target, candidates)
        samples.append(lensnet.sample_of(tree, entries, labels, lens.tail))
        if log:
            log(
                {
                    "context": k + 1,
                    "entries": len(entries),
                    "labels": {f"L{e.level}:{e.index}": round(v, 4) for e, v in labels.items()},
                }
            )
    records = lensnet.train_lensnet(lens, samples, opts.max_steps, seed=seed, log=log)
    mse = [float(lensnet.lens_loss(lens, s)[1]["regression"].item()) for s in samples]
    return records + [{"final_regression": float(np.mean(mse))}]


def _phase_lora(model, nets, train, opts, seed, log):
    lens = nets.lens
    rng = np.random.default_rng(seed)
    width = model.model.embed_tokens.weight.shape[1]
    gist = nets.compressor(model, opts)
    opt = optim.AdamW(learning_rate=opts.lora_lr, weight_decay=0.0)

    def loss_fn(model, tree, entries, target):
        return token_nll(wc.target_logits(model, tree, entries, target), mx.array(target)).mean()

    step = nn.value_and_grad(model, loss_fn)
    records = []
    for i, (history, target) in enumerate(_contexts(train, opts.max_steps, opts.budget, opts.horizon, rng)):
        tree = ev.build_tree(history, width, gist)
        entries = _focused(lens, tree, opts.budget) if i % 2 else wc.recency(tree, opts.budget)
        loss, grads = step(model, tree, entries, target)
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        opt.update(model, grads)
        mx.eval(model.trainable_parameters(), opt.state, loss)
        records.append({"step": i + 1, "loss": loss.item()})
        if log:
            log(records[-1])
    return records


def _telemetry(model, nets, val, opts, cycle) -> dict:
    """loss@H vs budget (truncation and the gisted recency tiling) and the focus loop's swap rate, residency
    and latency, on fixed val contexts."""
    lens = nets.lens
    width = model.model.embed_tokens.weight.shape[1]
    gist = nets.compressor(model, opts)
    contexts = _contexts(val, 2, 2 * opts.budget, opts.horizon, np.random.default_rng(12345))
    out = {"cycle": cycle, "loss_at_h": {}}
    streams = []
    for budget in (opts.budget // 2, opts.budget, 2 * opts.budget):
        trunc, gisted = [], []
        for history, target in contexts:
            tree = ev.build_tree(history, width, gist)
            try:
                entries = wc.recency(tree, budget)
            except ValueError:  # below the coarsest tiling: no gisted context fits
                break
            trunc.append(float(ev.plain_nll(model, history[-budget:], target).mean()))
            gisted.append(float(wc.target_nll(model, tree, entries, target).mean()))
        else:
            out["loss_at_h"][budget] = {"truncation": float(np.mean(trunc)), "gist": float(np.mean(gisted))}
    for history, _ in contexts:
        streams.append(stream_focus(lens, gist, history, opts.budget, width)[2])
    for key in ("swap_rate", "ms_per_block"):
        out[key] = float(np.mean([s[key] for s in streams]))
    stays = [s["residency"] for s in streams if s["residency"] is not None]
    out["residency"] = float(np.mean(stays)) if stays else None
    return out


def _save(out: Path, name: str, nets, model, records, has_lora: bool) -> None:
    arrays = {"lensnet": dict(tree_flatten(nets.lens.parameters()))}
    if nets.gist_net is not None:
        arrays["gistnet"] = dict(tree_flatten(nets.gist_net.parameters()))
    if nets.encoder is not None:
        arrays["encoder"] = dict(tree_flatten(nets.encoder.trainable_parameters()))
    if has_lora:
        arrays["lora"] = dict(tree_flatten(model.trainable_parameters()))
    Checkpoints(out).write(name, arrays, {"records": records})


def _restore(path: Path, nets, model=None) -> None:
    """Load a checkpoint's nets, and its LoRA into `model` (None: leave the base as it is)."""
    problem = Checkpoints(path.parent.parent).verify(path.name)
    if problem:
        raise UserError(f"checkpoint {path} is damaged: {problem}")
    try:
        if nets.gist_net is not None:
            nets.gist_net.load_weights(str(path / "gistnet.safetensors"))
        if nets.encoder is not None:
            nets.encoder.load_weights(str(path / "encoder.safetensors"), strict=False)
        nets.lens.load_weights(str(path / "lensnet.safetensors"))
        if model is not None and (path / "lora.safetensors").exists():
            model.load_weights(str(path / "lora.safetensors"), strict=False)
    except (OSError, ValueError, RuntimeError) as e:
        raise UserError(f"checkpoint {path} is damaged or from other settings: {e}") from None


def _nets(model, opts) -> Nets:
    """Fresh nets for the run's settings (the base-LoRA encoder on an instance of the base of its own)."""
    from mlx_ltc.config import LoraConfig
    from mlx_ltc.train.lora import apply_lora

    width = model.model.embed_tokens.weight.shape[1]
    mx.random.seed(opts.seed)
    gist_net, lens = GistNet(GistConfig(width=width)), lensnet.LensNet(width)
    encoder = None
    if opts.encoder in ("base-lora", "both"):
        base = _load_base(opts.model).model
        apply_lora(base, LoraConfig(rank=opts.encoder_rank, targets=["self_attn", "mlp"], layers=-1), opts.seed + 1)
        encoder = LoraEncoder(base, EncoderConfig(seed=opts.seed))
    nets = Nets(gist_net if opts.encoder in ("gistnet", "both") else None, encoder, lens)
    mx.eval([n.parameters() for n in nets if n is not None])
    return nets


def run_dir(out: Path) -> RunDir:
    return RunDir(Path(out), "a MegaContext run", "state.json")


def run_settings(repo: Path, opts: McTrainConfig) -> dict:
    """state.json's settings: the repository and the config's mc.train section, laid out as they always were,
    so a rerun of a run written before compares equal."""
    return {"repo": str(Path(repo).resolve()), **asdict(opts)}


def _settings_of(state: dict) -> dict:
    """A state's settings, with what a run written before the base-LoRA encoder had (a GistNet run)."""
    return {**LEGACY, **state["settings"]}


def train_run(repo: Path, out: Path, opts: McTrainConfig, overwrite=False, progress=True, log=print) -> dict:
    """Train (or continue after the last finished phase) and return state.json's content. The first Ctrl-C
    stops after the current update; the phase in progress starts again on the next run."""
    out = Path(out)
    if opts.l2_steps and opts.encoder == "base-lora":
        raise UserError("--l2-steps trains GistNet's L2 gists; the base-lora encoder's L2 gist is its last L1 gist")
    settings = run_settings(repo, opts)
    state_path = out / "state.json"
    state = {"settings": settings, "done": [], "telemetry": []}

    def changed(out: Path) -> list:
        old = _settings_of(_read_json(state_path))
        return sorted(k for k in settings if old.get(k) != settings[k])

    verdict = run_dir(out).check(overwrite, changed)
    if verdict == CONTINUE:
        state = _read_json(state_path)
    train, val, test = repo_files(Path(repo), opts.model, opts.split, progress, lambda m: log(m))
    if not any(len(f) >= (opts.blocks * 32 + opts.horizon) for f in train):
        raise UserError(f"repo {repo}: no train-split file of at least {opts.blocks * 32 + opts.horizon} tokens")
    if opts.l2_steps and not any(len(f) >= (32 + opts.keep) * 32 + opts.horizon for f in train):
        raise UserError(
            f"--l2-steps: no train-split file of {(32 + opts.keep) * 32 + opts.horizon} tokens to train L2 gists on"
        )
    metrics = MetricsLog(out / "metrics.jsonl")
    if verdict == CONTINUE:
        metrics.keep(lambda r: r.get("phase") in state["done"])  # an interrupted phase runs again
    else:
        run_dir(out).create(verdict)  # only once the new run's input is known to be usable
        atomic.write_json(state_path, state)
        metrics.start()
    atomic.write_json(out / "heldout.json", {"files": test})
    loaded = _load_base(opts.model)
    model = loaded.model
    nets = _nets(model, opts)
    reading = opts.reading_lora and nets.encoder is not None  # the reading LoRA trains with the encoder
    has_lora = reading or any(d.endswith("-lora") for d in state["done"])
    if has_lora:
        _with_lora(model, opts)
    if state["done"]:
        _restore(out / "checkpoints" / state["done"][-1], nets, model)
        log(f"continuing after {state['done'][-1]}")
    stop = StopRequest(
        log, "stopping after this update; the phase in progress starts again on the next run", "abort at once"
    )
    with stop:
        for cycle in range(1, opts.cycles + 1):
            for k, phase in enumerate(PHASES):
                name = f"cycle{cycle}-{phase}"
                if name in state["done"]:
                    continue
                seed = opts.seed + 1000 * cycle + k
                began = time.perf_counter()

                def step_log(record, name=name):
                    metrics.append({"phase": name, **record})
                    if progress:
                        log(f"{name} {json.dumps(record)}")
                    if stop.requested:
                        finished = state["done"][-1] if state["done"] else "none yet"
                        raise Interrupted(
                            f"interrupted in {name}; finished phases are saved (the last: {finished}); "
                            "run the same command again to continue"
                        )

                if phase == "gist":
                    records = _phase_gist(nets, model, train, opts, seed, step_log)
                elif phase == "lens":
                    records = _phase_lens(nets, model, train, opts, seed, step_log)
                else:
                    if not has_lora:
                        _with_lora(model, opts)
                        has_lora = True
                    records = _phase_lora(model, nets, train, opts, seed, step_log)
                _save(out, name, nets, model, records, has_lora)
                state["done"].append(name)
                log(f"{name}: {time.perf_counter() - began:.0f}s, last {records[-1]}")
                if phase == "lora":
                    state["telemetry"].append(_telemetry(model, nets, val or train, opts, cycle))
                    log(f"telemetry {json.dumps(state['telemetry'][-1])}")
                atomic.write_json(state_path, state)
    training_curves(metrics.rows(), out / "training.png")
    run_dir(out).complete()
    return state


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is missing or damaged: {e}") from None


def load_run(out: Path, base_only: bool = False) -> tuple:
    """(model, Nets, settings, held-out files, state) of a finished run."""
    out = Path(out)
    if not (out / "state.json").exists():
        raise UserError(f"{out} is not a MegaContext run (no state.json); run `mlx-ltc mc train` first")
    state = _read_json(out / "state.json")
    try:
        settings = _settings_of(state)
        settings.pop("repo")
        opts = McTrainConfig(**settings)
    except (KeyError, TypeError) as e:
        raise UserError(f"{out / 'state.json'}: not settings this version of mlx-ltc wrote ({e})") from None
    if not state["done"] or state["done"][-1] != f"cycle{opts.cycles}-lora":
        raise UserError(
            f"{out}: training is unfinished (last phase {state['done'][-1] if state['done'] else 'none'}"
            "); rerun the same `mlx-ltc mc train` command to finish it"
        )
    model = _load_base(opts.model).model
    nets = _nets(model, opts)
    if not base_only:
        _with_lora(model, opts)
    _restore(out / "checkpoints" / state["done"][-1], nets, None if base_only else model)
    heldout = _read_json(out / "heldout.json").get("files", [])
    return model, nets, opts, heldout, state


def identifier_mask(f: dict, n_history: int, budget: int) -> np.ndarray:
    """Which of the file's target tokens (after n_history) belong to a name whose definition starts in the
    truncated head (before the last `budget` history tokens) and that the kept window never mentions."""
    starts = np.asarray(f["byte_starts"], np.int64)
    raw = f["text"].encode("utf-8")
    head_end = int(starts[max(n_history - budget, 0)])
    kept = raw[head_end : int(starts[n_history])]
    names = {n for n, s in f["definitions"] if s < head_end and len(n) >= 3}
    names = {n for n in names if not re.search(rb"\b" + re.escape(n.encode()) + rb"\b", kept)}
    mask = np.zeros(len(starts) - n_history, bool)
    if not names:
        return mask
    tail_start = int(starts[n_history])
    ends = np.concatenate([starts[1:], [len(raw)]])
    pattern = re.compile(rb"\b(" + b"|".join(re.escape(n.encode()) for n in sorted(names)) + rb")\b")
    for m in pattern.finditer(raw, tail_start):
        mask |= (starts[n_history:] < m.end()) & (ends[n_history:] > m.start())
    return mask


CONDITIONS = tuple(c for c in ev.CONDITIONS if c != "full")  # full is scored once per file, not per budget


def evaluate_run(out: Path, settings: McEvalConfig, progress: bool = True, log=print) -> dict:
    """`mc eval`: the config's mc.eval section (validated by `config.merge`) over a finished run."""
    budgets, horizon, base_only = settings.budgets, settings.horizon, settings.base
    min_tokens, max_tokens, max_files = settings.min_tokens, settings.max_tokens, settings.max_files
    model, nets, opts, heldout, state = load_run(out, base_only)
    files = [f for f in heldout if min_tokens <= len(f["tokens"]) <= max_tokens]
    if max_files:
        files = files[:max_files]
    if len(files) < 2:
        raise UserError(
            f"{out}: {len(files)} held-out test file(s) of {min_tokens}-{max_tokens} tokens; need at "
            "least 2 (widen --min-tokens/--max-tokens)"
        )
    embed = model.model.embed_tokens
    width = embed.weight.shape[1]
    table = np.array(embed.weight.astype(mx.float32))
    gists = {"mean_gist": mean_gist(table), "last_input": last_input(table)}
    if nets.gist_net is not None:
        gists["gist"] = compressor(nets.gist_net, embed, trained_levels=_trained_levels(opts))
    if nets.encoder is not None:
        gists["gist_lora"] = nets.compressor(model, opts)
    main = ev.main_gists(gists)
    conditions = [c for c in CONDITIONS if c not in ev.GISTED or c in gists]
    compressors = gists
    per_file, ident, streams, rebuilt, gist_ms = {}, {}, [], {}, []
    from mlx_ltc import progress as progress_bars

    for k, f in enumerate(progress_bars.bar(files, desc="mc eval", enabled=progress)):
        gists = {c: ev.memoized(g) for c, g in compressors.items()}  # each block gisted once per file
        tokens = np.asarray(f["tokens"], np.int32)
        other = np.asarray(files[(k + 1) % len(files)]["tokens"], np.int32)
        n_history = len(tokens) - horizon
        coarsest = n_history // 1024 + n_history % 1024 // 32 + n_history % 32  # L2s, L1s, raw tail
        if min(budgets) < coarsest:
            raise UserError(
                f"--budgets {min(budgets)} is below {f['path']}'s coarsest working context ({coarsest} positions)"
            )
        began = time.perf_counter()  # the main encoder's cost, once per block (later lookups are memoized)
        ev.build_tree(tokens[:-horizon], width, gists[main])
        gist_ms.append(1000 * (time.perf_counter() - began) / (n_history // 32))
        if nets.encoder is not None:  # the marker is the base-LoRA encoder's
            for c, acc in ev.reconstruction(model, tokens[:-horizon], gists, nets.encoder.marker).items():
                rebuilt.setdefault(c, []).append(acc)
        scored = {}
        full = ev.score_file(model, tokens, budgets[0], horizon, ["full"], gists)["full"]
        for w in budgets:
            scored[w] = ev.score_file(model, tokens, w, horizon, conditions, gists, other) | {"full": full}
            tree, entries, telemetry = stream_focus(nets.lens, gists[main], tokens[:-horizon], w, width)
            scored[w]["lens"] = wc.target_nll(model, tree, entries, tokens[-horizon:])
            recent = wc.recency(tree, w)  # the main gists' context, at positions 0, 1, ... instead
            scored[w]["gist_compact"] = wc.target_nll(model, tree, recent, tokens[-horizon:], positions="compact")
            streams.append({"file": f["path"], "budget": w, **telemetry})
            mask = identifier_mask(f, n_history, w)
            for condition, nll in scored[w].items():
                per_file.setdefault((w, condition), []).append(float(nll.mean()))
                if mask.any():
                    ident.setdefault((w, condition), []).append(float(nll[mask].mean()))
            ident.setdefault((w, "_tokens"), []).append(int(mask.sum()))
        shown = [f"W={w} {c} {v[-1]:.3f}" for (w, c), v in per_file.items() if c in ("truncation", main, "lens")]
        log(f"{f['path']} ({len(tokens)} tokens): {', '.join(shown)}")
    rows, ident_rows, gaps = [], [], []
    for (w, condition), values in sorted(per_file.items()):
        nll, low, high = ev.bootstrap_mean(values)
        point, gap_low, gap_high = ev.gap_closed(per_file[(w, "truncation")], values, per_file[(w, "full")])
        rows.append({"budget": w, "condition": condition, "nll": nll, "ci_low": low, "ci_high": high,
                     "gap_closed": point, "gap_ci": [gap_low, gap_high], "files": len(values)})  # fmt: skip
    for (w, condition), values in sorted(ident.items()):
        if condition != "_tokens" and len(values) >= 2:
            nll, low, high = ev.bootstrap_mean(values)
            ident_rows.append({"budget": w, "condition": f"{condition}@identifiers", "nll": nll, "ci_low": low,
                               "ci_high": high, "files": len(values),
                               "tokens": sum(ident[(w, "_tokens")])})  # fmt: skip
    for w in budgets:
        for method in [c for c in scored[w] if c not in ("truncation", "full")]:
            point, low, high = ev.gap_closed(per_file[(w, "truncation")], per_file[(w, method)], per_file[(w, "full")])
            gaps.append({"budget": w, "condition": method, "gap_closed": point, "ci_low": low, "ci_high": high})
        for name, a, b in (("lens-minus-recency", "lens", main), (f"{main}-minus-shuffled", main, "shuffled"),
                           *((("gist_lora-minus-gist", "gist_lora", "gist"),) if {"gist", "gist_lora"} <= set(gists)
                             else ())):  # fmt: skip
            diff = np.array(per_file[(w, a)]) - np.array(per_file[(w, b)])
            mean, low, high = ev.bootstrap_mean(diff)
            gaps.append({"budget": w, "condition": name, "nll_diff": mean, "ci_low": low, "ci_high": high})
    swap = {w: float(np.mean([s["swap_rate"] for s in streams if s["budget"] == w])) for w in budgets}
    res = {w: [s["residency"] for s in streams if s["budget"] == w and s["residency"] is not None] for w in budgets}
    reconstruction = {c: dict(zip(("accuracy", "ci_low", "ci_high"), ev.bootstrap_mean(v))) for c, v in rebuilt.items()}
    return {"rows": rows, "identifier_rows": ident_rows, "gap_closed": gaps, "files": [f["path"] for f in files],
            "horizon": horizon, "base_only": base_only, "lora": not base_only, "main_gists": main,
            "reconstruction": reconstruction,
            "telemetry": {"per_budget": {w: {"swap_rate": swap[w],
                                             "residency": float(np.mean(res[w])) if res[w] else None,
                                             "ms_per_block": float(np.mean([s["ms_per_block"] for s in streams
                                                                            if s["budget"] == w]))}
                                         for w in budgets}, "streams": streams,
                          "gist_ms_per_block": float(np.mean(gist_ms))},
            "training_telemetry": state["telemetry"]}  # fmt: skip


def table(result: dict) -> str:
    rows = [
        [r["budget"], r["condition"], f"{r['nll']:.4f}", f"[{r['ci_low']:.4f}, {r['ci_high']:.4f}]", r["files"]]
        for r in result["rows"] + result["identifier_rows"]
    ]
    gaps = []
    for g in result["gap_closed"]:
        key = "gap_closed" if "gap_closed" in g else "nll_diff"
        gaps.append([g["budget"], g["condition"], key, f"{g[key]:+.3f}", f"[{g['ci_low']:+.3f}, {g['ci_high']:+.3f}]"])
    rebuilt = [[c, f"{r['accuracy']:.3f}", f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}]"]
               for c, r in result.get("reconstruction", {}).items()]  # fmt: skip
    focus = []
    for w, t in result["telemetry"]["per_budget"].items():
        residency = "n/a" if t["residency"] is None else f"{t['residency']:.1f}"
        focus.append([w, f"{t['swap_rate']:.3f}", residency, f"{t['ms_per_block']:.1f}"])
    gist_ms = result["telemetry"].get("gist_ms_per_block")
    return "\n".join(
        [
            tables.text(["budget", "condition", "NLL", "95% CI", "files"], rows, align="rlrrr"),
            tables.text(["budget", "condition", "measure", "value", "95% CI"], gaps, align="rllrr"),
            f"focus loop ({result['main_gists']} gists; writing them took {gist_ms:.1f} ms per block, "
            "not counted below):\n"
            + tables.text(["budget", "actions/block", "residency (iterations)", "ms/block"], focus, align="rrrr"),
            *(
                [
                    "reconstruction from one L1 gist per block (token accuracy):\n"
                    + tables.text(["gists", "accuracy", "95% CI"], rebuilt, align="lrr")
                ]
                if rebuilt
                else []
            ),
        ]
    )
