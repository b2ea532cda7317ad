"""The evaluation's outputs: report.json["eval"], report.md and plots/*.png in the run directory, and
`mlx-ltc eval --compare A B`."""

import json
import math
from pathlib import Path

from mlx_ltc import atomic, tables
from mlx_ltc.errors import UserError
from mlx_ltc.eval.results import Evaluation, PairedRow, Report

TRAIN_RECORDS, EVAL_RECORDS = "completion.jsonl", "eval_completion.jsonl"  # each completed line, both models
PLOTS = ("training", "loss_vs_position", "ppl_vs_length", "qa_vs_distance", "memory", "completion")
KIND_LABELS = {"cross_file_line": "cross-file lines", "random_line": "random lines"}


def write(run_dir: Path, results: Evaluation) -> None:
    """Merge one evaluation's entries into report.json["eval"] (the completion benchmark and the rest are
    measured by separate runs of `eval` and kept side by side), then rewrite report.md and the plots."""
    run_dir = Path(run_dir)
    report = Report.read(run_dir / "report.json")
    report.evaluation = (report.evaluation or Evaluation()).merged(results)
    plots(run_dir, report)
    atomic.write_text(run_dir / "report.md", markdown(report, run_dir.name))
    atomic.write_json(run_dir / "report.json", report.to_json())


def _gb(n: int) -> str:
    return f"{n / 2**30:.2f} GB"


def markdown(report: Report, name: str) -> str:
    ev, run = report.evaluation, report.training
    lines = [f"# Evaluation of {name}", ""]
    if run and run.model:
        length = run.data.seq_len or ev.seq_len or 0
        lines += [
            f"Model `{run.model}`, fine-tuned on `{Path(run.repo).name}` for {run.train.steps} steps "
            f"({run.train.tokens:,} tokens) at length {length:,}.",
            "",
        ]
    if ev.completion is not None:
        lines += _completion_md(ev)
    if ev.perplexity is not None:
        lines += _classic_md(ev)
    lines += ["## Training", "", "![training](plots/training.png)", ""]
    return "\n".join(lines) + "\n"


def _fraction(x, ci=None) -> str:
    text = f"{x:.1%}"
    return text + (f" [{ci[0]:.1%}, {ci[1]:.1%}]" if ci else "")


def _signed(x, ci) -> str:
    return f"{x * 100:+.1f} [{ci[0] * 100:+.1f}, {ci[1] * 100:+.1f}]"


def _completion_md(ev: Evaluation) -> list:
    info = ev.completion_info
    n, splits = sum(info.targets.values()), " and ".join(info.splits)
    lines = [
        "## Completion of held-out code",
        "",
        f"{n} lines of {info.target_files} held-out files ({splits} split): "
        f"{info.targets['cross_file_line']} cross-file lines (they use a name defined in a file "
        f"their file imports) and {info.targets['random_line']} random code lines, completed greedily to "
        f"the end of the line (at most {info.max_tokens} tokens). Modes: `in_file` (the file's text before "
        "the line), `cross_file` (its dependencies in the training format too), `fim` (and the text after "
        "it). Budget: prompt tokens. EM: exact match (whitespace normalised), ES: edit similarity, "
        "identifier F1; [95% CI] by resampling files.",
        "",
    ]
    lines += [f"Note: {note}." for note in info.notes] + ([""] if info.notes else [])
    order = sorted(ev.completion, key=lambda r: (r.kind, r.mode, r.budget, r.model != "base"))
    rows = [[KIND_LABELS[r.kind], r.mode, f"{r.budget:,}", r.model, r.targets, _fraction(r.em, r.em_ci), f"{r.es:.3f}",
             f"{r.id_f1:.3f}", f"{r.in_file_tokens:,.0f} / {r.cross_file_tokens:,.0f}",
             "" if r.with_context is None else r.with_context]
            for r in order]  # fmt: skip
    header = ["lines", "mode", "budget", "model", "n", "EM [95% CI]", "ES", "id F1", "in-file / cross-file tokens",
              "with other files"]  # fmt: skip
    lines += tables.markdown(header, rows) + [""]
    if ev.completion_paired:
        lines += [
            "Paired differences (percentage points; the same lines on both sides; `cross_file - in_file` "
            "over the lines whose cross-file prompt had other files in it):",
            "",
        ]
        rows = [[p.compare, KIND_LABELS[p.kind], p.mode or p.model, f"{p.budget:,}", p.targets, *_differences(p)]
                for p in ev.completion_paired]  # fmt: skip
        lines += tables.markdown(["difference", "lines", "mode / model", "budget", "n", "EM", "ES", "id F1"], rows)
        lines += [""]
    lines += [
        f"Each line with every model's completion: `{EVAL_RECORDS}`.",
        "",
        "![completion](plots/completion.png)",
        "",
    ]
    return lines


def _differences(p: PairedRow) -> list:
    return [_signed(p.em, p.em_ci), _signed(p.es, p.es_ci), _signed(p.id_f1, p.id_f1_ci)]


def _change(models: list, before: float, after: float) -> list:
    """The relative change from base to adapted, as a cell when both were measured."""
    return [f"{(after / before - 1):+.1%}"] if len(models) == 2 else []


def _classic_md(ev: Evaluation) -> list:
    lines = [
        "## Perplexity",
        "",
        "Token-weighted over each split's real tokens (no prefix, no padding); held-out files and the commit "
        "chains of those files separately.",
        "",
    ]
    lines += _perplexity_table(ev) + [""]
    if ev.forgetting:
        lines += _forgetting_md(ev)
    lines += _context_md(ev) + _qa_md(ev) + _streaming_md(ev)
    return lines


def _perplexity_table(ev: Evaluation) -> list:
    models, rows = ev.models, []
    for split in ev.perplexity[models[-1]]:
        for kind in ("all", "file", "chain"):
            numbers = [ev.perplexity[m][split] for m in models]
            numbers = numbers if kind == "all" else [p.kind(kind) for p in numbers]
            if any(p is None for p in numbers):
                continue
            cells = [split, kind, *(f"{p.ppl:.3f}" for p in numbers), f"{numbers[-1].tokens:,}"]
            rows.append(cells + _change(models, numbers[0].ppl, numbers[-1].ppl))
    return tables.markdown(["split", "documents", *models, "tokens"] + (["change"] if len(models) == 2 else []), rows)


def _forgetting_md(ev: Evaluation) -> list:
    forgot, models = ev.forgetting, ev.models
    lines = [
        "## Outside the repository",
        "",
        f"Perplexity of {forgot.tokens:,} tokens of {forgot.source} ({forgot.files} files), "
        f"code the fine-tune never saw, in windows of {forgot.seq_len:,} tokens.",
        "",
    ]
    cells = [f"{forgot.of(m).ppl:.3f}" for m in models]
    if len(models) == 2:
        cells += _change(models, forgot.base.ppl, forgot.adapted.ppl)
    return lines + tables.markdown([*models] + (["change"] if len(models) == 2 else []), [cells]) + [""]


def _context_md(ev: Evaluation) -> list:
    ctx, models = ev.context, ev.models
    last = ctx[models[-1]]
    lines = [
        "## Context use",
        "",
        "Perplexity at each evaluation length: windows of that length, back to back over the same "
        f"{last.tokens:,} test-split tokens. The model trained at {ev.seq_len:,}.",
        "",
    ]
    rows = [[f"{n:,}"] + [f"{ctx[m].ppl[i]:.3f}" for m in models] for i, n in enumerate(last.lengths)]
    lines += tables.markdown(["length", *models], rows) + [""]
    lines += ["Mean NLL (nats) by target position, at the longest length:", ""]
    rows = [
        [f"{b['start']:,}-{b['end'] - 1:,}"] + [f"{ctx[m].buckets[i]['nll']:.4f}" for m in models]
        for i, b in enumerate(last.buckets)
    ]
    lines += tables.markdown(["positions", *models], rows)
    lines += ["", "![loss vs position](plots/loss_vs_position.png)", ""]
    return lines + ["![perplexity vs length](plots/ppl_vs_length.png)", ""]


def _qa_md(ev: Evaluation) -> list:
    qa, models = ev.qa, ev.models
    lines = [
        "## Repo QA",
        "",
        f"The {ev.qa_split} split's probes: the answer is right when it has the lowest total NLL "
        "among itself and its distractors.",
        "",
    ]
    rows = []
    for i, b in enumerate(qa[models[-1]].buckets):
        per_model = [qa[m].buckets[i] for m in models]
        rows.append(
            [f"{b['distance']:,}", b["probes"], f"{b['chance']:.0%}"]
            + [f"{x['accuracy']:.0%} / {x['answer_nll']:.3f}" for x in per_model]
        )
    lines += tables.markdown(["distance ≥", "probes", "chance"] + [f"{m}: accuracy / answer NLL" for m in models], rows)
    return lines + ["", "![QA vs distance](plots/qa_vs_distance.png)", ""]


def _streaming_md(ev: Evaluation) -> list:
    src = ev.stream_source
    lines = [
        "## Streaming",
        "",
        f"{src.tokens:,} tokens of the {src.kind} ({src.path}), prefilled in chunks through a "
        "KV cache of the last W tokens.",
        "",
    ]
    rows = [
        [r.model, f"{r.window:,}", f"{r.tokens:,}", f"{r.nll:.4f}", f"{math.exp(r.nll):.3f}",
         f"{r.tokens_per_s:,.0f}", _gb(r.peak_bytes)]
        for r in ev.streaming
    ]  # fmt: skip
    lines += tables.markdown(["model", "window", "tokens", "NLL", "ppl", "tokens/s", "peak memory"], rows)
    return lines + ["", "![memory](plots/memory.png)", "", f"Evaluation took {ev.wall_s / 60:.1f} min.", ""]


def plots(run_dir: Path, report: Report) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mlx_ltc.train import summary

    ev = report.evaluation
    out = run_dir / "plots"
    out.mkdir(exist_ok=True)
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file() and not (out / "training.png").is_file():
        rows = [json.loads(line) for line in metrics.read_text(encoding="utf-8").splitlines() if line]
        events_path = run_dir / "events.jsonl"
        events = [json.loads(x) for x in events_path.read_text().splitlines() if x] if events_path.is_file() else []
        if rows:
            summary.plot(rows, events, out / "training.png")

    def save(fig, name):
        fig.tight_layout()
        with atomic.atomic_path(out / f"{name}.png") as tmp:
            fig.savefig(tmp, dpi=110)
        plt.close(fig)

    if ev.completion is not None:
        save(completion_figure(plt, ev), "completion")
    if ev.context is None:
        return
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for m in ev.models:
        c = ev.context[m]
        ax.plot(range(1, len(c.position_nll) + 1), _smooth(c.position_nll), lw=0.7, alpha=0.6, label=f"{m} (smoothed)")
        mids = [math.sqrt(max(b["start"], 1) * b["end"]) for b in c.buckets]
        ax.plot(mids, [b["nll"] for b in c.buckets], "o-", ms=4, label=f"{m} (bucket mean)")
    ax.axvline(ev.seq_len, color="gray", ls="--", lw=0.8, label="trained length")
    ax.set(xscale="log", xlabel="target position", ylabel="mean NLL (nats)", title="Loss vs position")
    ax.legend(fontsize=8)
    save(fig, "loss_vs_position")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m in ev.models:
        ax.plot(ev.context[m].lengths, ev.context[m].ppl, "o-", label=m)
    ax.axvline(ev.seq_len, color="gray", ls="--", lw=0.8, label="trained length")
    ax.set(xscale="log", xlabel="evaluation length (tokens)", ylabel="perplexity", title="Perplexity vs context length")
    lengths = ev.context[ev.models[-1]].lengths
    ax.set_xticks(lengths, [f"{n:,}" for n in lengths])
    ax.legend(fontsize=8)
    save(fig, "ppl_vs_length")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m in ev.models:
        buckets = ev.qa[m].buckets
        ax.plot([b["distance"] for b in buckets], [b["accuracy"] for b in buckets], "o-", label=m)
    buckets = ev.qa[ev.models[-1]].buckets
    ax.plot([b["distance"] for b in buckets], [b["chance"] for b in buckets], ":", color="gray", label="chance")
    ax.set(
        xlabel="distance from evidence to question (tokens)",
        ylabel="accuracy",
        ylim=(0, 1.05),
        title=f"Repo QA ({ev.qa_split} split)",
    )
    ax.legend(fontsize=8)
    save(fig, "qa_vs_distance")

    fig, (ax_s, ax_t) = plt.subplots(1, 2, figsize=(11, 4.5))
    for m in ev.models:
        for w in ev.windows:
            pts = [r for r in ev.streaming if r.model == m and r.window == w]
            ax_s.plot([r.tokens for r in pts], [r.peak_bytes / 2**30 for r in pts], "o-", ms=3, label=f"{m}, W={w:,}")
    ax_s.set(xscale="log", xlabel="stream tokens", ylabel="peak memory (GB)", title="Streaming eval", ylim=(0, None))
    ax_s.legend(fontsize=8)
    if metrics.is_file():
        rows = [json.loads(line) for line in metrics.read_text(encoding="utf-8").splitlines() if line]
        ax_t.plot([r["step"] for r in rows], [r["peak_memory_gb"] for r in rows])
    ax_t.set(xlabel="optimizer step", ylabel="peak memory (GB)", title="Training memory", ylim=(0, None))
    save(fig, "memory")


def completion_figure(plt, ev: Evaluation):
    """EM and ES against the prompt budget, one panel per kind of line: base and adapted, in-file and
    cross-file (and FIM), with 95% CIs. Budgets are evenly spaced categories, and each series is nudged
    sideways so that intervals at one budget do not hide each other."""
    rows, info = ev.completion, ev.completion_info
    budgets = sorted(info.budgets)
    series = [(model, mode) for model in info.models for mode in info.modes]
    nudge = {s: 0.3 * (i - (len(series) - 1) / 2) / max(len(series), 1) for i, s in enumerate(series)}
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), squeeze=False)
    colours = {"base": "tab:gray", "adapted": "tab:blue"}
    styles = {"in_file": ("-", "o"), "cross_file": ("--", "s"), "fim": (":", "^")}
    for col, kind in enumerate(KIND_LABELS):
        for row, metric in enumerate(("em", "es")):
            ax, top = axes[row][col], 0.0
            for model, mode in series:
                pts = sorted(
                    (r.budget, getattr(r, metric), getattr(r, f"{metric}_ci"))
                    for r in rows
                    if r.kind == kind and r.model == model and r.mode == mode
                )
                if not pts:
                    continue
                x = [budgets.index(p[0]) + nudge[(model, mode)] for p in pts]
                y = [p[1] for p in pts]
                err = [[p[1] - p[2][0] for p in pts], [p[2][1] - p[1] for p in pts]]
                top = max(top, *(p[2][1] for p in pts))
                line, marker = styles[mode]
                ax.errorbar(x, y, yerr=err, color=colours.get(model), ls=line, marker=marker, ms=5, capsize=3,
                            label=f"{model}, {mode.replace('_', '-')}")  # fmt: skip
            ax.set_xticks(range(len(budgets)), [f"{b:,}" for b in budgets])
            ax.set_xlim(-0.5, len(budgets) - 0.5)
            ax.set_ylim(0, 1 if metric == "es" else min(1.0, max(0.1, 1.15 * top)))
            n = info.targets[kind]
            ax.set(
                ylabel={"em": "exact match", "es": "edit similarity"}[metric],
                title=f"{KIND_LABELS[kind]} ({n})" if row == 0 else None,
            )
            if row == 1:
                ax.set_xlabel("prompt budget (tokens)")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8, loc="upper left")
    fig.suptitle("Completion of held-out lines (95% CIs over files)")
    fig.tight_layout()
    return fig


def _smooth(xs, k: int = 32) -> list:
    import numpy as np

    xs = np.asarray(xs)
    if len(xs) < k:
        return xs.tolist()
    kernel = np.ones(k) / k
    return np.concatenate([xs[: k - 1], np.convolve(xs, kernel, mode="valid")]).tolist()


def _eval_of(run_dir: Path) -> Evaluation:
    report = Report.read(Path(run_dir) / "report.json")
    if report.evaluation is None:
        raise UserError(f"{run_dir} has no evaluation yet: run `mlx-ltc eval {run_dir}` first")
    return report.evaluation


def compare(run_a: Path, run_b: Path) -> tuple:
    """(markdown, rows): the adapted models of two evaluated runs side by side, B / A as a ratio."""
    a, b = _eval_of(run_a), _eval_of(run_b)
    rows = []

    def add(what, x, y):
        if x is not None and y is not None:
            rows.append({"metric": what, "a": x, "b": y, "ratio": y / x if x else math.nan})

    def completion_rows(ev):
        return {(r.kind, r.mode, r.budget): r for r in ev.completion or [] if r.model == "adapted"}

    ra, rb = completion_rows(a), completion_rows(b)
    for key in sorted(set(ra) & set(rb)):
        kind, mode, budget = key
        add(f"completion EM, {kind.replace('_', ' ')}s, {mode}, {budget:,}", ra[key].em, rb[key].em)
    if a.perplexity is not None and b.perplexity is not None:
        _classic_rows(a, b, add)
    cells = [[r["metric"], f"{r['a']:.4g}", f"{r['b']:.4g}", f"{r['ratio']:.3f}"] for r in rows]
    lines = [f"A: {run_a}", f"B: {run_b}", ""] + tables.markdown(["metric", "A", "B", "B / A"], cells)
    paired = paired_completion(run_a, run_b)
    if paired:
        lines += [
            "",
            "Completion, B - A on the same lines (adapted models; percentage points, [95% CI] over files):",
            "",
        ]
        lines += tables.markdown(["lines", "mode", "budget", "n", "EM", "ES", "id F1"],
                                 [[p.kind.replace("_", " ") + "s", p.mode, f"{p.budget:,}", p.targets, *_differences(p)]
                                  for p in paired])  # fmt: skip
    return "\n".join(lines) + "\n", rows + [{"metric": "completion B - A", **p.to_json()} for p in paired]


def paired_completion(run_a: Path, run_b: Path) -> list[PairedRow]:
    """B - A per (kind, mode, budget) over the lines both runs' adapted models completed (train's
    completion.jsonl and eval's eval_completion.jsonl), with CIs from resampling files; [] when they share
    none."""
    import numpy as np

    from mlx_ltc.eval import completion

    def load(run):
        out = {}
        for name in (TRAIN_RECORDS, EVAL_RECORDS):
            path = Path(run) / name
            if path.is_file():
                for r in (json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x):
                    out.setdefault((r["path"], r["line"], r["kind"], r["target"]), {}).update(r["outputs"])
        return out

    a, b = load(run_a), load(run_b)
    groups = {}
    for key in sorted(set(a) & set(b)):
        for name in set(a[key]) & set(b[key]):
            model, mode, budget = name.split("/")
            if model == "adapted":
                groups.setdefault((key[2], mode, int(budget)), []).append((key, name))
    rng = np.random.default_rng(0)
    out = []
    for (kind, mode, budget), items in sorted(groups.items()):
        files = np.array([key[0] for key, _ in items])
        scores = [(completion.score(key[3], a[key][n]), completion.score(key[3], b[key][n])) for key, n in items]
        stats = {}
        for m in completion.METRICS:
            diff = np.array([sb[m] - sa[m] for sa, sb in scores])
            stats[m], stats[f"{m}_ci"] = completion.bootstrap(diff, files, 1000, rng)
        out.append(PairedRow(mode=mode, budget=budget, kind=kind, targets=len(items), **stats))
    return out


def _classic_rows(a: Evaluation, b: Evaluation, add) -> None:
    for split in ("val", "test"):
        pa, pb = a.perplexity["adapted"].get(split), b.perplexity["adapted"].get(split)
        add(f"{split} perplexity", pa and pa.ppl, pb and pb.ppl)
        fa, fb = (p and p.kind("file") for p in (pa, pb))
        add(f"{split} perplexity, held-out files", fa and fa.ppl, fb and fb.ppl)
    if a.forgetting and b.forgetting:
        add("perplexity outside the repo", a.forgetting.adapted.ppl, b.forgetting.adapted.ppl)
    ca, cb = a.context["adapted"], b.context["adapted"]
    for n in sorted(set(ca.lengths) & set(cb.lengths)):
        add(f"perplexity at length {n:,}", ca.ppl[ca.lengths.index(n)], cb.ppl[cb.lengths.index(n)])
    qa_a, qa_b = a.qa["adapted"], b.qa["adapted"]
    add("repo QA accuracy", qa_a.accuracy, qa_b.accuracy)
    by_b = {x["distance"]: x for x in qa_b.buckets}
    for x in qa_a.buckets:
        if x["distance"] in by_b:
            add(f"repo QA accuracy, distance ≥ {x['distance']:,}", x["accuracy"], by_b[x["distance"]]["accuracy"])
    sa = {(r.tokens, r.window): r for r in a.streaming if r.model == "adapted"}
    for r in b.streaming:
        key = (r.tokens, r.window)
        if r.model == "adapted" and key in sa:
            add(f"stream NLL, {key[0]:,} tokens, W={key[1]:,}", sa[key].nll, r.nll)
            add(f"stream peak GB, {key[0]:,} tokens, W={key[1]:,}", sa[key].peak_bytes / 2**30, r.peak_bytes / 2**30)
