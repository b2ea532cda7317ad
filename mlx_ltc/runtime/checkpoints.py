"""Checkpoints that a kill at any instant cannot corrupt, and that tell when a disk did.

`RUN/checkpoints/NAME/` holds one safetensors file per group of arrays (adapters, optimizer, model, ...),
state.json, and manifest.json (each file's size and SHA-256). The directory is built under a temp name
and renamed into place, so it either exists complete or not at all; reading re-checks the manifest, and
the step-numbered history (`step-0000123/`, the LoRA trainer's) falls back to the previous checkpoint
when a file was truncated or changed. A checkpoint written before manifests existed has none; it is
read as it is (the rename made it whole).
"""

import hashlib
import json
import shutil
from pathlib import Path

import mlx.core as mx

from mlx_ltc import atomic

VERSION = 1
STATE, MANIFEST = "state.json", "manifest.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class Checkpoints:
    def __init__(self, run_dir: Path, keep_last: int = 3, log=print):
        self.root, self.keep_last, self.log = Path(run_dir) / "checkpoints", keep_last, log

    # --- named checkpoints -----------------------------------------------------------------------
    def path(self, name) -> Path:
        return self.root / (f"step-{name:07d}" if isinstance(name, int) else name)

    def names(self, prefix: str = "") -> list:
        """Checkpoints on disk whose name starts with `prefix`, sorted (temp directories are not listed)."""
        if not self.root.is_dir():
            return []
        return sorted(
            p.name
            for p in self.root.iterdir()
            if p.is_dir() and p.name.startswith(prefix) and not p.name.startswith(".")
        )

    def write(self, name, arrays: dict, state: dict) -> Path:
        """arrays: {file stem: {key: mx.array}}, each saved as STEM.safetensors."""
        target = self.path(name)
        with atomic.replace_dir(target) as tmp:
            for stem, group in arrays.items():
                mx.save_safetensors(str(tmp / f"{stem}.safetensors"), group)
            (tmp / STATE).write_text(json.dumps(state), encoding="utf-8")
            files = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(tmp.iterdir())}
            manifest = {"version": VERSION, "name": target.name, "files": files}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
        return target

    def verify(self, name) -> str | None:
        """None when the checkpoint is whole, else what is wrong with it."""
        path = self.path(name)
        if path.is_dir() and not (path / MANIFEST).exists():
            return None  # from before manifests: the rename into place made it whole
        try:
            manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
            files = manifest["files"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            return f"unreadable manifest ({e.__class__.__name__})"
        for file_name, want in files.items():
            file = path / file_name
            if not file.is_file():
                return f"{file_name} is missing"
            if file.stat().st_size != want["bytes"]:
                return f"{file_name} is truncated ({file.stat().st_size} of {want['bytes']} bytes)"
            if _sha256(file) != want["sha256"]:
                return f"{file_name} does not match its checksum"
        return None

    def state(self, name) -> dict | None:
        """state.json of a whole checkpoint; None (and a message) when it is damaged, None when absent."""
        if not self.path(name).is_dir():
            return None
        problem = self.verify(name)
        if not problem:
            try:
                return json.loads((self.path(name) / STATE).read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:  # a checkpoint from before manifests
                problem = f"unreadable {STATE} ({e.__class__.__name__})"
        self.log(f"checkpoint {self.path(name)} is damaged: {problem}")
        return None

    def arrays(self, name, stem: str) -> dict:
        return mx.load(str(self.path(name) / f"{stem}.safetensors"))

    def remove(self, name) -> None:
        shutil.rmtree(self.path(name), ignore_errors=True)

    # --- the step-numbered history of the LoRA trainer --------------------------------------------
    def steps(self) -> list:
        """Steps of the complete step checkpoints on disk, oldest first."""
        return sorted(int(n[5:]) for n in self.names("step-") if n[5:].isdigit())

    def save(self, step: int, adapters: dict, optimizer: dict, state: dict, keep=()) -> Path:
        target = self.write(step, {"adapters": adapters, "optimizer": optimizer}, state)
        self.prune(keep=set(keep) | {step})
        return target

    def prune(self, keep=()) -> None:
        """Keep the last `keep_last` step checkpoints and the steps in `keep` (the best, the one just written)."""
        steps = self.steps()
        for step in steps[: max(0, len(steps) - self.keep_last)]:
            if step not in keep:
                self.remove(step)

    def drop_after(self, step: int) -> None:
        """Remove the checkpoints of an abandoned branch (after a rollback to `step`)."""
        for s in self.steps():
            if s > step:
                self.remove(s)

    def load(self, at_most: int | None = None, good_only: bool = False):
        """(step, adapters, optimizer, state) of the newest whole checkpoint with step <= at_most
        (and state["good"] when good_only); damaged ones are reported and skipped. None if there is none."""
        for step in reversed(self.steps()):
            if at_most is not None and step > at_most:
                continue
            problem = self.verify(step)
            if not problem:
                try:  # a checkpoint from before manifests is only checked by reading it
                    state = json.loads((self.path(step) / STATE).read_text(encoding="utf-8"))
                    if good_only and not state.get("good", True):
                        continue
                    return step, self.arrays(step, "adapters"), self.arrays(step, "optimizer"), state
                except (OSError, ValueError, RuntimeError) as e:
                    problem = f"unreadable ({str(e).splitlines()[0][:120]})"
            self.log(f"checkpoint {self.path(step)} is damaged: {problem}; using the previous one")
        return None
