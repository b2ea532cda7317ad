"""After a run: per-phase and per-length summary tables and PNG plots, from metrics.jsonl and the
stability counts (which include what rollbacks discarded)."""

import math
from pathlib import Path

import numpy as np

from mlx_ltc import atomic


def _mean_std(xs) -> tuple:
    xs = np.asarray(xs, dtype=np.float64)
    return (float(xs.mean()), float(xs.std(ddof=1)) if len(xs) > 1 else 0.0) if len(xs) else (math.nan, math.nan)


def phase_rows(rows: list, events: list) -> list:
    """One summary per phase, from the metrics lines of the run's history; spikes and skipped updates
    from the events (rolled-back steps included)."""
    out = []
    for phase in sorted({r["phase"] for r in rows}):
        mine = [r for r in rows if r["phase"] == phase]
        evals = [r for r in mine if "val_loss" in r]
        mean, std = _mean_std([r["grad_norm"] for r in mine])
        out.append(
            {
                "phase": phase,
                "seq_len": mine[0]["seq_len"],
                "steps": f"{mine[0]['step']}-{mine[-1]['step']}",
                "updates": len(mine),
                "final_train_loss": mine[-1]["loss"],
                "final_val_ppl": evals[-1]["val_ppl"] if evals else math.nan,
                "context_gain": evals[-1]["context_gain"] if evals else math.nan,
                "spikes": sum(e["kind"] == "spike" and e["phase"] + 1 == phase for e in events),
                "skipped": sum(e["kind"] == "skip" and e["phase"] + 1 == phase for e in events),
                "grad_norm_mean": mean,
                "grad_norm_std": std,
            }
        )
    return out


def length_rows(rows: list, by_length: dict) -> list:
    """One summary per sequence length (`by_length`: str(seq_len) -> stability.LengthCounts): final val
    perplexity at that length, spikes and skipped updates and pre-clip gradient-norm statistics over
    every attempt (rolled-back ones included)."""
    out = []
    for length in sorted(by_length, key=int):
        counts = by_length[length]
        grad, n = counts.grad, counts.grad.n
        evals = [r for r in rows if r["seq_len"] == int(length) and "val_loss" in r]
        out.append(
            {
                "seq_len": int(length),
                "updates": n,
                "final_val_ppl": evals[-1]["val_ppl"] if evals else math.nan,
                "spikes": counts.spikes,
                "skipped": counts.skipped,
                "grad_norm_mean": grad.mean,
                "grad_norm_std": grad.std,
                "grad_norm_min": grad.min if n else math.nan,
                "grad_norm_max": grad.max if n else math.nan,
            }
        )
    return out


def tables(phases: list, lengths: list, counts: dict) -> str:
    from mlx_ltc import tables as layout

    per_phase = [
        [p["phase"], f"{p['seq_len']:,}", p["steps"], f"{p['final_val_ppl']:.3f}", f"{p['context_gain']:+.2%}",
         p["spikes"], p["skipped"], _spread(p)]
        for p in phases
    ]  # fmt: skip
    per_length = [
        [f"{r['seq_len']:,}", r["updates"], f"{r['final_val_ppl']:.3f}", r["spikes"], r["skipped"],
         _spread(r), f"{r['grad_norm_min']:.3f}", f"{r['grad_norm_max']:.3f}"]
        for r in lengths
    ]  # fmt: skip
    return (
        "per phase (ppl: the eval slice at the phase's length):\n"
        + layout.text(
            ["phase", "length", "steps", "final ppl", "ctx gain", "spikes", "skipped", "grad norm"], per_phase, "r" * 8
        )
        + "per length (every attempt, rolled-back ones included):\n"
        + layout.text(
            ["length", "updates", "final ppl", "spikes", "skipped", "grad norm mean ± std", "min", "max"],
            per_length,
            "r" * 8,
        )
        + f"stability: {counts['spikes']} loss spikes, {counts['skipped']} non-finite updates skipped, "
        f"{counts['rollbacks']} rollbacks\n"
    )


def _spread(row: dict) -> str:
    return f"{row['grad_norm_mean']:.3f} ± {row['grad_norm_std']:.3f}"


def log_ticks(values, n: int = 5) -> list:
    """About n tick values, two significant digits, evenly spaced on a log axis over the finite positive
    values: a loss that stays inside one decade gets labelled ticks too."""
    v = np.asarray([x for x in values if math.isfinite(x) and x > 0], dtype=np.float64)
    if not len(v):
        return []

    def two_digits(x, how):  # the ends round inwards, so they stay inside the plotted range
        unit = 10.0 ** (math.floor(math.log10(x)) - 1)
        return float(f"{how(x / unit) * unit:.2g}")

    ticks = np.geomspace(v.min(), v.max(), n)
    ends = {two_digits(v.min(), math.ceil), two_digits(v.max(), math.floor)}
    return sorted(ends | {two_digits(x, round) for x in ticks[1:-1]})


def plot(rows: list, events: list, path: Path) -> None:
    """Loss (train and val), LR and sequence length over steps; phase starts as vertical lines,
    rollbacks and LR reductions marked."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, (ax_loss, ax_lr, ax_len) = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    ax_loss.plot(steps, [r["loss"] for r in rows], lw=0.8, label="train loss")
    evals = [r for r in rows if "val_loss" in r]
    ax_loss.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", ms=3, label="val loss")
    ax_loss.set_ylabel("loss (nats, log scale)")
    ax_loss.set_yscale("log")  # a spike must not flatten the rest
    ax_loss.yaxis.set_major_locator(
        matplotlib.ticker.FixedLocator(log_ticks([r["loss"] for r in rows] + [r["val_loss"] for r in evals]))
    )
    ax_loss.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax_loss.yaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax_lr.plot(steps, [r["lr"] for r in rows], lw=0.9)
    ax_lr.set_ylabel("learning rate")
    ax_len.step(steps, [r["seq_len"] for r in rows], where="post")
    ax_len.set_ylabel("sequence length")
    ax_len.set_xlabel("optimizer step")
    starts = [r["step"] for prev, r in zip(rows, rows[1:]) if r["phase"] != prev["phase"]]
    marks = {
        "rollback": ("tab:red", "rollback"),
        "reduce_lr": ("tab:orange", "LR reduced"),
        "restore_best": ("tab:purple", "best restored"),
    }
    for ax in (ax_loss, ax_lr, ax_len):
        for s in starts:
            ax.axvline(s, color="gray", ls="--", lw=0.8)
    seen = set()
    for e in events:
        if e["kind"] in marks:
            color, label = marks[e["kind"]]
            ax_loss.axvline(e["step"], color=color, lw=1, alpha=0.7, label=None if label in seen else label)
            seen.add(label)
    ax_loss.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
