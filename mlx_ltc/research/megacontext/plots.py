"""`mc train`'s training curves (RUN/training.png) from its metrics.jsonl records."""

from pathlib import Path

import numpy as np

from mlx_ltc import atomic

__all__ = ["training_curves"]


def _smooth(values: list, window: int = 9) -> np.ndarray:
    """Centred moving average (shorter at the ends): per-update losses on 2 random windows are noisy."""
    x = np.asarray(values, np.float64)
    if len(x) < 3:
        return x
    k = min(window, len(x))
    kernel = np.ones(k)
    return np.convolve(x, kernel, "same") / np.convolve(np.ones_like(x), kernel, "same")


def _series(rows: list, phase: str, key: str, encoder: str | None = None) -> tuple:
    """(update numbers, values) of `key` over the phase's updates, cycles in a row; an update without the key
    (the base-LoRA encoder's autoencoding-only start has no continuation terms) keeps its place on the axis."""
    updates = [r for r in rows if r.get("phase", "").endswith(phase) and "step" in r
               and (encoder is None or r.get("encoder") == encoder)]  # fmt: skip
    picked = [(i + 1, r[key]) for i, r in enumerate(updates) if key in r]
    return np.array([i for i, _ in picked]), [v for _, v in picked]


def training_curves(rows: list, path: Path) -> None:
    """Four panels over each phase's updates (all cycles in a row; thin: per update, thick: smoothed): the
    base-LoRA encoder's autoencoding accuracy, the continuation terms of both encoders, the own-vs-other
    gists gap, and the LensNet and LoRA phases' losses."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    panels = [
        (axes[0, 0], "autoencoding (base-lora)", [("gist", "ae_acc", "base-lora", "token accuracy")],
         "rebuilt tokens, teacher forced"),
        (axes[0, 1], "continuation: KL + extra NLL at the horizon",
         [("gist", "kl", "base-lora", "KL, base-lora"), ("gist", "extra_nll", "base-lora", "extra NLL, base-lora"),
          ("gist", "kl", "gistnet", "KL, GistNet"), ("gist", "extra_nll", "gistnet", "extra NLL, GistNet")], "nats"),
        (axes[1, 0], "contrast: NLL(other sample's gists) - NLL(own)",
         [("gist", "contrast_gap", "base-lora", "base-lora"), ("gist", "contrast_gap", "gistnet", "GistNet")],
         "nats (> 0: own gists help)"),
        (axes[1, 1], "LensNet and reading-LoRA phases", [("lens", "loss", None, "LensNet loss"),
                                                          ("lora", "loss", None, "LoRA phase NLL")], "loss"),
    ]  # fmt: skip
    for ax, title, lines, ylabel in panels:
        drawn = False
        for (phase, key, encoder, label), color in zip(lines, ("tab:blue", "tab:orange", "tab:green", "tab:red")):
            steps, values = _series(rows, phase, key, encoder)
            if not len(values):
                continue
            ax.plot(steps, values, color=color, lw=0.6, alpha=0.35)
            ax.plot(steps, _smooth(values), color=color, lw=1.6, label=label)
            drawn = True
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(ylabel)
        ax.set_xlabel("update in the phase (cycles in a row)")
        if drawn:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "not trained in this run", ha="center", va="center", transform=ax.transAxes)
    axes[1, 0].axhline(0, color="gray", lw=0.8, ls="--")
    fig.tight_layout()
    with atomic.atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
