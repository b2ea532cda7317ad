"""Checkpoints that a kill at any instant cannot corrupt, and that tell when a disk did.

`RUN/checkpoints/step-0000123/` holds adapters.safetensors, optimizer.safetensors, state.json
(trainer, orchestrator and stability state, RNG, data cursor) and manifest.json (each file's size
and SHA-256). The directory is built under a temp name and renamed into place, so it either exists
complete or not at all; `load` re-checks the manifest and falls back to the previous checkpoint
when a file was truncated or changed.
"""

import hashlib
import json
import shutil
from pathlib import Path

import mlx.core as mx

from mlx_ltc import atomic

FILES = ("adapters.safetensors", "optimizer.safetensors", "state.json")
VERSION = 1


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class Checkpoints:
    def __init__(self, run_dir: Path, keep_last: int = 3, log=print):
        self.root, self.keep_last, self.log = Path(run_dir) / "checkpoints", keep_last, log

    def path(self, step: int) -> Path:
        return self.root / f"step-{step:07d}"

    def steps(self) -> list:
        """Steps of the complete checkpoints on disk, oldest first (temp directories are not listed)."""
        if not self.root.is_dir():
            return []
        return sorted(int(p.name[5:]) for p in self.root.glob("step-*") if p.name[5:].isdigit())

    def save(self, step: int, adapters: dict, optimizer: dict, state: dict, keep=()) -> Path:
        target = self.path(step)
        with atomic.replace_dir(target) as tmp:
            mx.save_safetensors(str(tmp / "adapters.safetensors"), adapters)
            mx.save_safetensors(str(tmp / "optimizer.safetensors"), optimizer)
            (tmp / "state.json").write_text(json.dumps(state), encoding="utf-8")
            files = {name: {"bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)} for name in FILES}
            manifest = {"version": VERSION, "step": step, "files": files}
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")
        self.prune(keep=set(keep) | {step})
        return target

    def prune(self, keep=()) -> None:
        """Keep the last `keep_last` checkpoints and the steps in `keep` (the best, the one just written)."""
        steps = self.steps()
        for step in steps[: max(0, len(steps) - self.keep_last)]:
            if step not in keep:
                shutil.rmtree(self.path(step), ignore_errors=True)

    def drop_after(self, step: int) -> None:
        """Remove the checkpoints of an abandoned branch (after a rollback to `step`)."""
        for s in self.steps():
            if s > step:
                shutil.rmtree(self.path(s), ignore_errors=True)

    def verify(self, step: int) -> str | None:
        """None when the checkpoint is whole, else what is wrong with it."""
        path = self.path(step)
        try:
            manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            return f"unreadable manifest ({e.__class__.__name__})"
        for name in FILES:
            want = manifest.get("files", {}).get(name)
            file = path / name
            if want is None or not file.is_file():
                return f"{name} is missing"
            if file.stat().st_size != want["bytes"]:
                return f"{name} is truncated ({file.stat().st_size} of {want['bytes']} bytes)"
            if _sha256(file) != want["sha256"]:
                return f"{name} does not match its checksum"
        return None

    def load(self, at_most: int | None = None, good_only: bool = False):
        """(step, adapters, optimizer, state) of the newest whole checkpoint with step <= at_most
        (and state["good"] when good_only); damaged ones are reported and skipped. None if there is none."""
        for step in reversed(self.steps()):
            if at_most is not None and step > at_most:
                continue
            problem = self.verify(step)
            if problem:
                self.log(f"checkpoint {self.path(step)} is damaged: {problem}; using the previous one")
                continue
            path = self.path(step)
            state = json.loads((path / "state.json").read_text(encoding="utf-8"))
            if good_only and not state.get("good", True):
                continue
            adapters = mx.load(str(path / "adapters.safetensors"))
            optimizer = mx.load(str(path / "optimizer.safetensors"))
            return step, adapters, optimizer, state
        return None
