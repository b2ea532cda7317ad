"""The ranks of a run started by `mlx.launch` (MLX's distributed layer: ring, MPI, JACCL, NCCL).

One `World` per process. A run without `mlx.launch` is a world of one, and every method is then the
identity, so the trainer has one code path. Rank 0 is the main rank: it alone writes the run directory;
other ranks get what they need from disk through it (`broadcast_*`), so the Macs of a ring need not
share a filesystem.
"""

import hashlib
import json
from contextlib import contextmanager
from dataclasses import dataclass

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from mlx_ltc.errors import UserError

__all__ = ["World", "world"]


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    group: object = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def all_sum(self, x: mx.array) -> mx.array:
        return mx.distributed.all_sum(x, group=self.group) if self.distributed else x

    def sum_tree(self, tree):
        """Sum a tree of arrays over the ranks in one collective (one flat buffer per dtype)."""
        if not self.distributed:
            return tree
        flat = tree_flatten(tree)
        by_dtype = {}
        for i, (_, a) in enumerate(flat):
            by_dtype.setdefault(a.dtype, []).append(i)
        out = [None] * len(flat)
        for idx in by_dtype.values():
            parts = [flat[i][1] for i in idx]
            summed = self.all_sum(mx.concatenate([p.reshape(-1) for p in parts]))
            offset = 0
            for i, p in zip(idx, parts):
                out[i] = summed[offset : offset + p.size].reshape(p.shape)
                offset += p.size
        return tree_unflatten([(name, a) for (name, _), a in zip(flat, out)])

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on any (a stop request, a failure to report)."""
        if not self.distributed:
            return flag
        return bool(self.all_sum(mx.array(int(bool(flag)))).item())

    def barrier(self) -> None:
        if self.distributed:
            mx.eval(self.all_sum(mx.array(0)))

    # --- from the main rank to all ------------------------------------------------------------
    def _bytes_from_main(self, payload: bytes | None) -> bytes:
        size = self.all_sum(mx.array(len(payload) if self.main else 0, dtype=mx.int64)).item()
        buf = np.frombuffer(payload, dtype=np.uint8) if self.main else np.zeros(size, dtype=np.uint8)
        return bytes(np.array(self.all_sum(mx.array(buf)), dtype=np.uint8))  # the others add zeros: exact

    def broadcast_json(self, value):
        """The main rank's JSON-able value, on every rank (the others pass anything)."""
        if not self.distributed:
            return value
        payload = json.dumps(value).encode() if self.main else None
        return json.loads(self._bytes_from_main(payload).decode())

    def broadcast_arrays(self, arrays: dict | None) -> dict | None:
        """The main rank's {name: array} (or None), bit for bit, on every rank."""
        if not self.distributed:
            return arrays
        header = None
        if self.main:
            header = None if arrays is None else [(k, list(a.shape), str(a.dtype)) for k, a in arrays.items()]
        header = self.broadcast_json(header)
        if header is None:
            return None
        raw = b"".join(_raw(arrays[k]) for k, _, _ in header) if self.main else None
        raw = self._bytes_from_main(raw)
        out, offset = {}, 0
        for name, shape, dtype in header:
            kind = getattr(mx, dtype.split(".")[-1])
            n = int(np.prod(shape)) * kind.size
            out[name] = mx.array(np.frombuffer(raw[offset : offset + n], dtype=np.uint8)).view(kind).reshape(shape)
            offset += n
        return out

    def agree(self, what: str, value) -> None:
        """Refuse to go on unless every rank has the same `value` (its JSON hash), in one line on every rank."""
        if not self.distributed:
            return
        digest = hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).digest()[:8]
        mine = mx.array(np.frombuffer(digest, dtype=np.uint8).astype(np.int32))
        gathered = np.array(mx.distributed.all_gather(mine[None], group=self.group))
        differ = [r for r in range(self.size) if not (gathered[r] == gathered[0]).all()]
        if differ:
            text = value if isinstance(value, str) else json.dumps(value, default=str)
            shown = text if len(text) < 60 else "its own"
            raise UserError(
                f"ranks disagree on {what}: rank {differ[0]} differs from rank 0 (rank {self.rank} has {shown}); "
                "run the same mlx-ltc, command and repository on every host"
            )

    @contextmanager
    def guard(self, hint=lambda: ""):
        """A peer that stopped (its own error, a kill) becomes one line on this rank instead of MLX's
        RuntimeError from inside a collective; `hint()` adds what to do next."""
        try:
            yield
        except RuntimeError as e:
            if not (self.distributed and _lost_peer(e)):
                raise
            raise UserError(
                f"rank {self.rank}: lost the connection to another rank, which stopped or was killed "
                f"(its own error, if any, is above){hint()}"
            ) from None


def _lost_peer(e: RuntimeError) -> bool:
    text = str(e)
    return text.startswith(("[ring]", "[mpi]", "[jaccl]", "[nccl]")) or "peer" in text


def _raw(a: mx.array) -> bytes:
    """An array's bytes, whatever its dtype (numpy has no bfloat16)."""
    return np.array(a.reshape(-1).view(mx.uint8)).tobytes()


_WORLD = None


def world() -> World:
    """This process's world: the ranks `mlx.launch` started, or one."""
    global _WORLD
    if _WORLD is None:
        group = mx.distributed.init()
        _WORLD = World(group.rank(), group.size(), group) if group.size() > 1 else World()
    return _WORLD
