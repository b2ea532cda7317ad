"""Does the fine-tune complete the user's own code better? The repo code-completion benchmark of
`mlx-ltc eval --completion` and of train's final report.

Each target line (eval/targets.py) is completed greedily to the end of its line (at most
`max_tokens` tokens) through mlx-lm's generation and a KV cache, in each mode (in-file context only;
cross-file context too; FIM with the suffix when the tokenizer has FIM tokens) and token budget.
Targets are run file by file in line order, so a prompt that extends the previous one reuses its
cache (trimmed back to their common prefix), and a prompt met twice (a cross-file prompt with no room
left for other files is the in-file one) is completed once. The cross-file part is filled up to the
budget beside the longest in-file part among a file's targets whose in-file parts are in the same
quarter of the budget: one prefill serves them all, and no target loses more than a quarter of the
budget of cross-file context to its neighbours.

Metrics per (model, mode, budget, kind), each target scored against its line with whitespace
normalised: exact match (EM), edit similarity (ES, 1 - normalised Levenshtein distance, rapidfuzz),
identifier EM and F1 (the line's identifiers by a plain pattern, keywords left out). 95% confidence
intervals come from a bootstrap over files (targets of one file are not independent); paired
differences (adapted - base, cross-file - in-file) resample the same files for both sides.
"""

import sys
import time
from collections import Counter
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

from mlx_ltc.config import CompletionConfig
from mlx_ltc.errors import UserError
from mlx_ltc.eval import targets as tg
from mlx_ltc.eval.results import CompletionInfo, CompletionRow, PairedRow

METRICS = ("em", "es", "id_em", "id_f1")
PREFILL_CHUNK = 512  # prompt tokens per forward: 2,048 at once took 40 s on a 2-core CPU, 512 at a time 28 s


CompletionOptions = CompletionConfig  # the config's evaluate.completion section (budgets: empty for default_budgets)


def default_budgets(seq_len: int) -> list:
    """512 and the trained length."""
    return sorted({512, seq_len})


def _log(msg):
    print(msg, file=sys.stderr, flush=True)


@dataclass
class Benchmark:
    """One run's targets and every prompt the benchmark feeds the models."""

    targets: tg.TargetSet
    modes: list
    budgets: list
    prompts: dict  # (target index, mode, budget) -> targets.Prompt
    skipped: Counter = field(default_factory=Counter)  # (mode, budget) -> targets whose headers exceed the budget

    @classmethod
    def build(cls, corpus, meta: dict, opts: CompletionOptions, log=_log) -> "Benchmark":
        fim = corpus.markers.fim is not None
        modes = list(opts.modes or (("in_file", "cross_file") + (("fim",) if fim else ())))
        unknown = [m for m in modes if m not in tg.MODES]
        if unknown:
            raise UserError(f"completion modes: unknown {', '.join(unknown)} (choose from {', '.join(tg.MODES)})")
        if "fim" in modes and not fim:
            raise UserError("completion mode fim: this tokenizer has no <fim_prefix>/<fim_suffix>/<fim_middle> tokens")
        budgets = sorted(set(opts.budgets or default_budgets(meta.seq_len)))
        if min(budgets) < 64:
            raise UserError(f"completion budgets must be at least 64 tokens, got {min(budgets)}")
        usable, notes = tg.split_files(meta, corpus)
        target_set = tg.select(corpus, usable, opts.targets, opts.seed, opts.per_file)
        target_set.notes = notes + target_set.notes
        if not target_set.targets:
            raise UserError("the held-out files have no lines to complete (no code lines after the first)")
        prompter = tg.Prompter(corpus)
        prompts, skipped = {}, Counter()
        for budget in budgets:
            # Targets of a file whose in-file parts fall in the same quarter of the budget share one
            # cross-file part (what fits beside the longest of them): their prompts extend one another.
            group, longest = {}, {}
            for i, t in enumerate(target_set.targets):
                part = prompter.in_file(t, budget)
                size = len(part) if part is not None else budget
                group[i] = (t.path, min(3, 4 * size // budget))
                longest[group[i]] = max(longest.get(group[i], 0), size)
            for i, t in enumerate(target_set.targets):
                others = budget - len(prompter.repo) - longest[group[i]]
                for mode in modes:
                    p = prompter.build(t, mode, budget, others)
                    if p is None:
                        skipped[(mode, budget)] += 1
                    else:
                        prompts[(i, mode, budget)] = p
        for (mode, budget), n in sorted(skipped.items()):
            target_set.notes.append(f"{mode} at {budget:,} tokens: {n} targets skipped (their headers alone exceed it)")
        for note in target_set.notes:
            log(f"completion: {note}")
        return cls(target_set, modes, budgets, prompts, skipped)

    def order(self) -> list:
        """Prompt keys file by file, then by mode and budget, targets in line order: each prompt tends to
        extend the one before it."""
        path = lambda key: self.targets.targets[key[0]].path  # noqa: E731
        return sorted(self.prompts, key=lambda k: (path(k), k[1], k[2], k[0]))


def first_line(text: str) -> tuple:
    """(the line the model wrote for the target, whether it has ended). The prompt stops at the end
    of the line before the target, so the target is the first non-blank line after a newline."""
    newline = text.find("\n")
    if newline < 0:
        return "", False
    rest = text[newline + 1 :]
    while True:
        end = rest.find("\n")
        if end < 0:
            return rest, False
        if rest[:end].strip():
            return rest[:end], True
        rest = rest[end + 1 :]


def stop_ids(tokenizer) -> set:
    vocab = tokenizer.get_vocab()
    ids = {vocab[t] for t in ("<|endoftext|>", "<file_sep>", "<filename>", "<repo_name>") if t in vocab}
    return ids | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())


def shared(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the common prefix of two token arrays."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n


def generate(model, tokenizer, prompts: list, max_tokens: int, progress=None, tally=None) -> list:
    """[(line, tokens generated)] for each prompt (arrays of token ids), greedy, in the order given,
    through mlx-lm's generate_step and one KV cache trimmed back to what the next prompt shares.
    `tally` (a Counter) gets the prompt tokens computed ("prefilled") and reused ("reused")."""
    from mlx_lm.generate import generate_step
    from mlx_lm.models.cache import make_prompt_cache, trim_prompt_cache

    model.eval()
    stop = stop_ids(tokenizer)
    cache, held = make_prompt_cache(model), np.zeros(0, dtype=np.int32)
    out = []
    for prompt in prompts:
        keep = min(shared(held, prompt), len(prompt) - 1)  # generate_step needs at least one new token
        trim_prompt_cache(cache, cache[0].offset - keep)
        if tally is not None:
            tally.update(prefilled=len(prompt) - keep, reused=keep)
        ids = []
        steps = generate_step(
            mx.array(prompt[keep:]), model, prompt_cache=cache, max_tokens=max_tokens, prefill_step_size=PREFILL_CHUNK
        )
        for token, _ in steps:
            if token in stop:
                break
            ids.append(token)
            if first_line(tokenizer.decode(ids))[1]:
                break
        steps.close()
        trim_prompt_cache(cache, cache[0].offset - len(prompt))
        held = prompt
        out.append((first_line(tokenizer.decode(ids))[0], len(ids)))
        if progress is not None:
            progress.update(1)
    return out


def _normal(line: str) -> str:
    return " ".join(line.split())


def score(target: str, output: str) -> dict:
    from rapidfuzz.distance import Levenshtein

    t, o = _normal(target), _normal(output)
    ti, oi = tg.identifiers(t), tg.identifiers(o)
    common = sum((Counter(ti) & Counter(oi)).values())
    if not ti and not oi:
        f1 = 1.0
    elif not common:
        f1 = 0.0
    else:
        precision, recall = common / len(oi), common / len(ti)
        f1 = 2 * precision * recall / (precision + recall)
    return {"em": float(t == o), "es": Levenshtein.normalized_similarity(t, o), "id_em": float(ti == oi), "id_f1": f1}


def measure(model, tokenizer, bench: Benchmark, name: str, max_tokens: int, log=_log, progress=True) -> dict:
    """{(target index, mode, budget): {"output", "tokens", "em", "es", ...}} for one model."""
    from mlx_ltc import progress as progress_bars

    keys = bench.order()
    slot, unique = {}, []  # prompt bytes -> its place in `unique`: each distinct prompt is completed once
    for key in keys:
        if slot.setdefault(bench.prompts[key].tokens.tobytes(), len(unique)) == len(unique):
            unique.append(key)
    started = time.perf_counter()
    with progress_bars.bar(
        total=len(unique), desc=f"{name}: completion", unit="line", enabled=progress, leave=False
    ) as bar:
        tally = Counter()
        done = generate(model, tokenizer, [bench.prompts[k].tokens for k in unique], max_tokens, bar, tally)
    results = {}
    for key in keys:
        line, n = done[slot[bench.prompts[key].tokens.tobytes()]]
        results[key] = {"output": line, "tokens": n, **score(bench.targets.targets[key[0]].text, line)}
    took = time.perf_counter() - started
    log(
        f"completion {name}: {len(unique):,} completions ({len(keys):,} prompts) in {took / 60:.1f} min; "
        f"{tally['prefilled']:,} prompt tokens computed, {tally['reused']:,} reused from the cache"
    )
    return results


def bootstrap(values: np.ndarray, files: np.ndarray, resamples: int, rng) -> tuple:
    """(mean, [low, high]): the 95% interval of the mean over targets, resampling whole files."""
    ids, inverse = np.unique(files, return_inverse=True)
    sums = np.bincount(inverse, weights=values, minlength=len(ids))
    counts = np.bincount(inverse, minlength=len(ids))
    draws = rng.integers(0, len(ids), size=(resamples, len(ids)))
    means = sums[draws].sum(axis=1) / np.maximum(counts[draws].sum(axis=1), 1)
    return float(values.mean()), [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def summarize(bench: Benchmark, results: dict, resamples: int = 1000, seed: int = 0) -> tuple:
    """(rows, paired): a CompletionRow per (model, mode, budget, kind) with each metric and its CI, and a
    PairedRow per paired difference adapted - base and MODE - in_file with theirs (cross_file - in_file over
    the targets whose cross-file prompt had other files in it)."""
    rng = np.random.default_rng(seed)
    targets = bench.targets.targets
    cells = [(mode, budget, kind) for mode in bench.modes for budget in bench.budgets for kind in tg.KINDS]

    def keys(model, mode, budget, kind, also=None):
        """Targets of a kind measured in (mode, budget), and in `also` = (model, mode) too if given."""
        return [
            (i, mode, budget)
            for i, t in enumerate(targets)
            if t.kind == kind
            and (i, mode, budget) in results[model]
            and (also is None or (i, also[1], budget) in results[also[0]])
        ]

    def stats(scores, chosen, minus=None) -> dict:
        """Each metric's mean over `chosen` with its CI; minus: the same targets' other scores to subtract."""
        files = np.array([targets[k[0]].path for k in chosen])
        out = {}
        for m in METRICS:
            values = np.array([scores[k][m] - (minus[i][m] if minus else 0.0) for i, k in enumerate(chosen)])
            out[m], out[f"{m}_ci"] = bootstrap(values, files, resamples, rng)
        return out

    rows = []
    for model in results:
        for mode, budget, kind in cells:
            chosen = keys(model, mode, budget, kind)
            if chosen:
                prompts = [bench.prompts[k] for k in chosen]
                row = CompletionRow(model=model, mode=mode, budget=budget, kind=kind, targets=len(chosen),
                                    **stats(results[model], chosen),
                                    with_context=sum(p.cross_file > 0 for p in prompts),
                                    in_file_tokens=float(np.mean([p.in_file for p in prompts])),
                                    cross_file_tokens=float(np.mean([p.cross_file for p in prompts])))  # fmt: skip
                rows.append(row)
    paired = []
    if {"base", "adapted"} <= set(results):
        a, b = results["adapted"], results["base"]
        for mode, budget, kind in cells:
            chosen = keys("adapted", mode, budget, kind, also=("base", mode))
            if chosen:
                paired.append(PairedRow(compare="adapted - base", mode=mode, budget=budget, kind=kind,
                                        targets=len(chosen), **stats(a, chosen, [b[k] for k in chosen])))  # fmt: skip
    for model in results:
        r = results[model]
        for mode, budget, kind in cells:
            if mode == "in_file" or "in_file" not in bench.modes:
                continue
            chosen = keys(model, mode, budget, kind, also=(model, "in_file"))
            if mode == "cross_file":  # where the prompt had other files in it: elsewhere it is the in-file one
                chosen = [k for k in chosen if bench.prompts[k].cross_file]
            if chosen:
                alone = [r[(i, "in_file", budget)] for i, _, _ in chosen]
                paired.append(PairedRow(compare=f"{mode} - in_file", model=model, budget=budget, kind=kind,
                                        targets=len(chosen), **stats(r, chosen, alone)))  # fmt: skip
    return rows, paired


def records(bench: Benchmark, results: dict) -> list:
    """One JSON-able record per target: where it is, what it is, and each model's line per mode and budget."""
    out = []
    for i, t in enumerate(bench.targets.targets):
        outputs = {
            f"{model}/{mode}/{budget}": results[model][(i, mode, budget)]["output"]
            for model in results
            for mode in bench.modes
            for budget in bench.budgets
            if (i, mode, budget) in results[model]
        }
        out.append({"path": t.path, "line": t.line + 1, "kind": t.kind, "names": list(t.names), "target": t.text,
                    "outputs": outputs})  # fmt: skip
    return out


def headline(rows: list[CompletionRow]) -> str | None:
    """'exact match on held-out cross-file lines: base X% -> adapted Y%' (in-file context, the largest
    budget) with the edit similarity beside it, or None without both models."""
    pick = [r for r in rows if r.kind == tg.CROSS and r.mode == "in_file"]
    if not pick:
        return None
    top = max(r.budget for r in pick)
    by = {r.model: r for r in pick if r.budget == top}
    if set(by) != {"base", "adapted"}:
        return None
    b, a = by["base"], by["adapted"]
    return (
        f"exact match on held-out cross-file lines: base {b.em:.1%} -> adapted {a.em:.1%} "
        f"(edit similarity {b.es:.3f} -> {a.es:.3f}; {a.targets} lines, in-file context, "
        f"{top:,} tokens)"
    )


def section(bench: Benchmark, results: dict, opts: CompletionOptions, wall_s: float) -> dict:
    """The benchmark's entries of a report, by field name (results.TrainReport's and results.Evaluation's):
    "completion" (rows), "completion_paired", "completion_info"."""
    rows, paired = summarize(bench, results, opts.resamples, opts.seed)
    chosen = bench.targets.targets
    info = CompletionInfo(
        models=list(results), modes=bench.modes, budgets=bench.budgets, splits=bench.targets.splits,
        files=bench.targets.files, target_files=len({t.path for t in chosen}),
        targets={k: sum(t.kind == k for t in chosen) for k in tg.KINDS}, candidates=bench.targets.candidates,
        max_tokens=opts.max_tokens, seed=opts.seed, notes=bench.targets.notes, wall_s=wall_s,
    )  # fmt: skip
    return {"completion": rows, "completion_paired": paired, "completion_info": info}
