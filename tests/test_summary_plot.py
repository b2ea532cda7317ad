"""plots/training.png as a reader sees it: the loss panel (log scale) carries labelled ticks."""

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from mlx_ltc.train import summary  # noqa: E402


def rows(losses):
    return [{"step": i + 1, "loss": x, "lr": 5e-4, "seq_len": 512, "phase": 1} for i, x in enumerate(losses)]


def loss_tick_labels(tmp_path, losses) -> list:
    captured = {}
    close = plt.close
    plt.close = lambda fig=None: captured.setdefault("fig", fig)  # keep the figure to read its axes back
    try:
        summary.plot(rows(losses), [], tmp_path / "training.png")
    finally:
        plt.close = close
    fig = captured["fig"]
    fig.canvas.draw()
    ax = fig.axes[0]
    low, high = ax.get_ylim()
    labels = [t.get_text() for t in ax.get_yticklabels() if t.get_text() and low <= t.get_position()[1] <= high]
    close(fig)
    assert (tmp_path / "training.png").stat().st_size > 10_000
    return labels


def test_a_loss_inside_one_decade_gets_labelled_ticks(tmp_path):
    labels = loss_tick_labels(tmp_path, [1.3 + 1.3 * math.exp(-s / 30) for s in range(100)])
    assert len(labels) >= 3, labels
    values = [float(t) for t in labels]
    assert values == sorted(values) and 1.3 <= values[0] and values[-1] <= 2.6


def test_ticks_span_several_decades_and_ignore_non_finite_losses():
    ticks = summary.log_ticks([0.31, 9.8, float("nan"), float("inf"), 2.0])
    assert ticks[0] == 0.31 and ticks[-1] == 9.8 and len(ticks) == 5
    assert all(len(f"{t:g}".replace(".", "").lstrip("0")) <= 2 for t in ticks)
    assert summary.log_ticks([float("nan")]) == [] and summary.log_ticks([2.0]) == [2.0]
