"""A run's directory: checked before anything is written, `COMPLETE` written last.

A directory is a run of a kind when it holds that kind's marker file (`config.json` for `train`,
`run.json` for `bk train`, `state.json` for `mc train`). mlx-ltc never writes into a non-empty
directory that isn't one, never replaces a finished run without --overwrite, and continues an
unfinished one only when the command says so (`train --resume`) or, for the research trainers, when
the settings are the same.
"""

import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from mlx_ltc import atomic
from mlx_ltc.errors import UserError

COMPLETE = "COMPLETE"
NEW, REPLACE, CONTINUE = "new", "replace", "continue"


@dataclass(frozen=True)
class RunDir:
    path: Path
    kind: str  # what the messages call a run of this kind: "an mlx-ltc run", "a bk run", ...
    marker: str  # the file that makes a directory a run of this kind

    @property
    def finished(self) -> bool:
        return (self.path / COMPLETE).exists()

    def check(self, overwrite: bool, changed=None) -> str:
        """NEW (absent or empty), REPLACE (--overwrite) or CONTINUE; raises a UserError for anything else.
        `changed`: for the trainers that continue when the same command runs again, a function of the
        directory that lists the settings that differ from this command's (whether anything is left to do
        is theirs to say); None: a run is continued only by `train --resume`, never by a rerun."""
        out = self.path
        if not out.exists():
            return NEW
        if not out.is_dir():
            raise UserError(f"--out {out} is a file, not a directory")
        if not any(out.iterdir()):
            return NEW
        if not (out / self.marker).exists() and not self.finished:
            raise UserError(f"--out {out} is a non-empty directory that is not {self.kind}; refusing to write into it")
        if overwrite:
            return REPLACE
        if changed is None:
            if self.finished:
                raise UserError(f"{out} already holds a finished run; choose another --out or pass --overwrite")
            raise UserError(f"{out} holds an unfinished run; pass --overwrite to replace it")
        differ = changed(out)
        if differ:
            raise UserError(
                f"{out} holds {self.kind} with other settings ({', '.join(differ)}); "
                "choose another --out or pass --overwrite"
            )
        return CONTINUE

    def create(self, verdict: str) -> None:
        """Make the directory for a NEW or REPLACE verdict, once the run's inputs are known to be good."""
        if verdict == REPLACE:
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)

    def reopen(self) -> None:
        """A finished run that a rerun extends (`bk train` with more lengths) is unfinished again."""
        (self.path / COMPLETE).unlink(missing_ok=True)

    def complete(self) -> None:
        atomic.write_text(self.path / COMPLETE, datetime.now(timezone.utc).isoformat() + "\n")
