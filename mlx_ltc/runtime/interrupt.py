"""Ctrl-C that saves: the first one asks the loop to stop at its next safe point (after the current
update), where the trainer saves and raises `Interrupted` (exit 130, the resume command printed); a
second one aborts at once."""

import signal


class StopRequest:
    def __init__(self, log, saving: str = "saving a checkpoint after this update", again: str = "abort without saving"):
        self.log, self.saving, self.again, self.requested, self._previous = log, saving, again, False, None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)
        except ValueError:  # not the main thread: Ctrl-C stays Python's
            self._previous = None
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False

    def _on_sigint(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.log(f"Ctrl-C: {self.saving} (press again to {self.again})")
