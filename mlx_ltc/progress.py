"""Progress that shows in a log too: on a terminal tqdm's bar; with output going to a file or a pipe
(a run under nohup, CI, `> train.log`), tqdm's same status line written as a whole line at most once
a minute, so `tail -f` of a long job says where it is and when it will end. Work that ends within the
first minute writes nothing there."""

import sys

from tqdm import tqdm

LOG_EVERY_S = 60.0


class _Lines:
    """A stream for tqdm that turns its carriage-return redraws into whole lines (blank clears dropped)."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.replace("\r", "").rstrip()
        if text.strip():
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


def bar(iterable=None, *, enabled: bool = True, stream=None, **kwargs) -> tqdm:
    """tqdm(iterable, **kwargs): a bar on a terminal, log lines elsewhere, nothing when not `enabled`."""
    stream = stream or sys.stderr
    if not enabled:
        return tqdm(iterable, disable=True, **kwargs)
    if stream.isatty():
        return tqdm(iterable, file=stream, dynamic_ncols=True, **kwargs)
    # miniters=1: tqdm's monitor thread would otherwise redraw a stalled bar every 10 s
    return tqdm(
        iterable, file=_Lines(stream), mininterval=LOG_EVERY_S, delay=LOG_EVERY_S, miniters=1, ncols=100, **kwargs
    )
