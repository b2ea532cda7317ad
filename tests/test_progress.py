"""Progress on long work shows in a log file as whole lines, not only on a terminal."""

import io

from mlx_ltc import progress


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_log_gets_whole_lines_at_most_once_per_interval(monkeypatch):
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    log = io.StringIO()
    with progress.bar(total=5, desc="train", unit="step", stream=log) as bar:
        for step in range(5):
            bar.set_postfix(loss=f"{2.5 - step / 10:.3f}", refresh=False)
            bar.update(1)
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and "\x1b" not in log.getvalue()
    assert lines and all(line.startswith("train:") for line in lines)
    assert "5/5" in lines[-1] and "loss=2.100" in lines[-1]


def test_work_shorter_than_the_interval_writes_nothing_to_a_log():
    log = io.StringIO()
    with progress.bar(total=50, desc="eval", stream=log, leave=False) as bar:
        for _ in range(50):
            bar.set_postfix(x=1, refresh=False)
            bar.update(1)
    assert log.getvalue() == ""


def test_a_terminal_gets_the_redrawn_bar_and_disabled_progress_nothing():
    tty = _Terminal()
    with progress.bar(total=3, desc="read", stream=tty) as bar:
        bar.update(3)
    assert "\r" in tty.getvalue() and "3/3" in tty.getvalue()
    quiet = io.StringIO()
    for _ in progress.bar(range(3), enabled=False, stream=quiet):
        pass
    assert quiet.getvalue() == ""
