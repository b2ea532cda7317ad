"""The evaluation's outputs: report.json["eval"], report.md and plots/*.png in the run directory, and
`mlx-ltc eval --compare A B`."""

import json
import math
from pathlib import Path

from mlx_ltc import atomic
from mlx_ltc.errors import UserError

PLOTS = ("training", "loss_vs_position", "ppl_vs_length", "qa_vs_distance", "memory")


def write(run_dir: Path, results: dict) -> None:
    run_dir = Path(run_dir)
    report_path = run_dir / "report.json"
    report = json.loads(report_path.read_text(encoding="utf-8")) if report_path.is_file() else {}
    report["eval"] = results
    plots(run_dir, report)
    atomic.write_text(run_dir / "report.md", markdown(report, run_dir.name))
    atomic.write_json(report_path, report)


def _gb(n: int) -> str:
    return f"{n / 2**30:.2f} GB"


def _table(header: list, rows: list) -> list:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---:" if i else "---" for i in range(len(header))) + "|",
        *("| " + " | ".join(str(c) for c in r) + " |" for r in rows),
    ]


def markdown(report: dict, name: str) -> str:
    ev = report["eval"]
    models = ev["models"]
    lines = [f"# Evaluation of {name}", ""]
    if report.get("model"):
        t = report.get("train", {})
        repo = Path(report.get("repo", "")).name
        lines += [f"Model `{report['model']}`, fine-tuned on `{repo}` for {t.get('steps', '?')} steps "
                  f"({t.get('tokens', 0):,} tokens) at length {ev['seq_len']:,}.", ""]  # fmt: skip
    lines += ["## Perplexity", "", "Token-weighted over each split's real tokens (no prefix, no padding).", ""]
    rows = []
    for split in ev["perplexity"][models[-1]]:
        cells = [split] + [f"{ev['perplexity'][m][split]['ppl']:.3f}" for m in models]
        cells.append(f"{ev['perplexity'][models[-1]][split]['tokens']:,}")
        if len(models) == 2:
            b, a = (ev["perplexity"][m][split]["ppl"] for m in models)
            cells.append(f"{(a / b - 1):+.1%}")
        rows.append(cells)
    lines += _table(["split", *models, "tokens"] + (["change"] if len(models) == 2 else []), rows) + [""]

    ctx = ev["context"]
    lines += ["## Context use", "",
              "Perplexity at each evaluation length: windows of that length, back to back over the same "
              f"{ctx[models[-1]]['tokens']:,} test-split tokens. The model trained at {ev['seq_len']:,}.",
              ""]  # fmt: skip
    rows = [[f"{n:,}"] + [f"{ctx[m]['ppl'][i]:.3f}" for m in models] for i, n in enumerate(ctx[models[-1]]["lengths"])]
    lines += _table(["length", *models], rows) + [""]
    lines += ["Mean NLL (nats) by target position, at the longest length:", ""]
    rows = [
        [f"{b['start']:,}-{b['end'] - 1:,}"] + [f"{ctx[m]['buckets'][i]['nll']:.4f}" for m in models]
        for i, b in enumerate(ctx[models[-1]]["buckets"])
    ]
    lines += _table(["positions", *models], rows)
    lines += ["", "![loss vs position](plots/loss_vs_position.png)", ""]
    lines += ["![perplexity vs length](plots/ppl_vs_length.png)", ""]

    qa = ev["qa"]
    lines += ["## Repo QA", "",
              f"The {ev['qa_split']} split's probes: the answer is right when it has the lowest total NLL "
              "among itself and its distractors.", ""]  # fmt: skip
    rows = []
    for i, b in enumerate(qa[models[-1]]["buckets"]):
        rows.append([f"{b['distance']:,}", b["probes"], f"{b['chance']:.0%}"]
                    + [f"{qa[m]['buckets'][i]['accuracy']:.0%} / {qa[m]['buckets'][i]['answer_nll']:.3f}"
                       for m in models])  # fmt: skip
    lines += _table(["distance ≥", "probes", "chance"] + [f"{m}: accuracy / answer NLL" for m in models], rows)
    lines += ["", "![QA vs distance](plots/qa_vs_distance.png)", ""]

    src = ev["stream_source"]
    lines += ["## Streaming", "",
              f"{src['tokens']:,} tokens of the {src['kind']} ({src['path']}), prefilled in chunks through a "
              "KV cache of the last W tokens.", ""]  # fmt: skip
    rows = [
        [r["model"], f"{r['window']:,}", f"{r['tokens']:,}", f"{r['nll']:.4f}", f"{math.exp(r['nll']):.3f}",
         f"{r['tokens_per_s']:,.0f}", _gb(r["peak_bytes"])]
        for r in ev["streaming"]
    ]  # fmt: skip
    lines += _table(["model", "window", "tokens", "NLL", "ppl", "tokens/s", "peak memory"], rows)
    lines += ["", "![memory](plots/memory.png)", "", "## Training", "", "![training](plots/training.png)", ""]
    lines += [f"Evaluation took {ev['wall_s'] / 60:.1f} min."]
    return "\n".join(lines) + "\n"


def plots(run_dir: Path, report: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mlx_ltc.train import summary

    ev = report["eval"]
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

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for m in ev["models"]:
        c = ev["context"][m]
        nll = c["position_nll"]
        ax.plot(range(1, len(nll) + 1), _smooth(nll), lw=0.7, alpha=0.6, label=f"{m} (smoothed)")
        mids = [math.sqrt(max(b["start"], 1) * b["end"]) for b in c["buckets"]]
        ax.plot(mids, [b["nll"] for b in c["buckets"]], "o-", ms=4, label=f"{m} (bucket mean)")
    ax.axvline(ev["seq_len"], color="gray", ls="--", lw=0.8, label="trained length")
    ax.set(xscale="log", xlabel="target position", ylabel="mean NLL (nats)", title="Loss vs position")
    ax.legend(fontsize=8)
    save(fig, "loss_vs_position")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m in ev["models"]:
        c = ev["context"][m]
        ax.plot(c["lengths"], c["ppl"], "o-", label=m)
    ax.axvline(ev["seq_len"], color="gray", ls="--", lw=0.8, label="trained length")
    ax.set(xscale="log", xlabel="evaluation length (tokens)", ylabel="perplexity", title="Perplexity vs context length")
    lengths = ev["context"][ev["models"][-1]]["lengths"]
    ax.set_xticks(lengths, [f"{n:,}" for n in lengths])
    ax.legend(fontsize=8)
    save(fig, "ppl_vs_length")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m in ev["models"]:
        buckets = ev["qa"][m]["buckets"]
        ax.plot([b["distance"] for b in buckets], [b["accuracy"] for b in buckets], "o-", label=m)
    buckets = ev["qa"][ev["models"][-1]]["buckets"]
    ax.plot([b["distance"] for b in buckets], [b["chance"] for b in buckets], ":", color="gray", label="chance")
    ax.set(xlabel="distance from evidence to question (tokens)", ylabel="accuracy", ylim=(0, 1.05),
           title=f"Repo QA ({ev['qa_split']} split)")  # fmt: skip
    ax.legend(fontsize=8)
    save(fig, "qa_vs_distance")

    fig, (ax_s, ax_t) = plt.subplots(1, 2, figsize=(11, 4.5))
    for m in ev["models"]:
        for w in ev["windows"]:
            pts = [r for r in ev["streaming"] if r["model"] == m and r["window"] == w]
            ax_s.plot([r["tokens"] for r in pts], [r["peak_bytes"] / 2**30 for r in pts], "o-", ms=3,
                      label=f"{m}, W={w:,}")  # fmt: skip
    ax_s.set(xscale="log", xlabel="stream tokens", ylabel="peak memory (GB)", title="Streaming eval", ylim=(0, None))
    ax_s.legend(fontsize=8)
    if metrics.is_file():
        rows = [json.loads(line) for line in metrics.read_text(encoding="utf-8").splitlines() if line]
        ax_t.plot([r["step"] for r in rows], [r["peak_memory_gb"] for r in rows])
    ax_t.set(xlabel="optimizer step", ylabel="peak memory (GB)", title="Training memory", ylim=(0, None))
    save(fig, "memory")


def _smooth(xs, k: int = 32) -> list:
    import numpy as np

    xs = np.asarray(xs)
    if len(xs) < k:
        return xs.tolist()
    kernel = np.ones(k) / k
    return np.concatenate([xs[: k - 1], np.convolve(xs, kernel, mode="valid")]).tolist()


def _eval_of(run_dir: Path) -> dict:
    path = Path(run_dir) / "report.json"
    report = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    if "eval" not in report:
        raise UserError(f"{run_dir} has no evaluation yet: run `mlx-ltc eval {run_dir}` first")
    return report["eval"]


def compare(run_a: Path, run_b: Path) -> tuple:
    """(markdown, rows): the adapted models of two evaluated runs side by side, B / A as a ratio."""
    a, b = _eval_of(run_a), _eval_of(run_b)
    rows = []

    def add(what, x, y):
        if x is not None and y is not None:
            rows.append({"metric": what, "a": x, "b": y, "ratio": y / x if x else math.nan})

    for split in ("val", "test"):
        pa, pb = a["perplexity"]["adapted"].get(split), b["perplexity"]["adapted"].get(split)
        add(f"{split} perplexity", pa and pa["ppl"], pb and pb["ppl"])
    ca, cb = a["context"]["adapted"], b["context"]["adapted"]
    for n in sorted(set(ca["lengths"]) & set(cb["lengths"])):
        add(f"perplexity at length {n:,}", ca["ppl"][ca["lengths"].index(n)], cb["ppl"][cb["lengths"].index(n)])
    qa_a, qa_b = a["qa"]["adapted"], b["qa"]["adapted"]
    add("repo QA accuracy", qa_a.get("accuracy"), qa_b.get("accuracy"))
    by_b = {x["distance"]: x for x in qa_b["buckets"]}
    for x in qa_a["buckets"]:
        if x["distance"] in by_b:
            add(f"repo QA accuracy, distance ≥ {x['distance']:,}", x["accuracy"], by_b[x["distance"]]["accuracy"])
    sa = {(r["tokens"], r["window"]): r for r in a["streaming"] if r["model"] == "adapted"}
    for r in b["streaming"]:
        key = (r["tokens"], r["window"])
        if r["model"] == "adapted" and key in sa:
            add(f"stream NLL, {key[0]:,} tokens, W={key[1]:,}", sa[key]["nll"], r["nll"])
            gb = (sa[key]["peak_bytes"] / 2**30, r["peak_bytes"] / 2**30)
            add(f"stream peak GB, {key[0]:,} tokens, W={key[1]:,}", *gb)
    cells = [[r["metric"], f"{r['a']:.4g}", f"{r['b']:.4g}", f"{r['ratio']:.3f}"] for r in rows]
    lines = [f"A: {run_a}", f"B: {run_b}", ""] + _table(["metric", "A", "B", "B / A"], cells)
    return "\n".join(lines) + "\n", rows
