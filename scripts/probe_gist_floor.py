"""Issue 9: which untrained gist does the frozen base tolerate? One vector stands in for a 32-token block A,
and the base, fed [<|endoftext|>, that vector, the next 31 tokens], is scored on the tokens it can't see:

    python scripts/probe_gist_floor.py --repo DIR [--windows 64] [--split 85/10/5] [--seed 123]

Windows are 64 tokens (block A, then block B) from the val split of --repo. Two tasks: "ae" scores A's own
tokens 1..31 (the vector should say what A is), "next" scores B's tokens 1..31 (A's continuation). Vectors:
none (the slot left out), mean (A's mean token embedding, the mean-pooling baseline), rescaled (the same at a
token embedding's mean norm), zero, last (A's last token embedding, GistNet's untrained floor). For each, the
NLL with A's own vector and with the next window's (shuffled), and their difference, the content the base
reads from it. This is the measurement behind GistNet's last-input floor (`megacontext/gistnet.py`).
"""

import argparse
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_ltc.errors import UserError
from mlx_ltc.research.megacontext import run as mc
from mlx_ltc.research.megacontext.positions import forward_at
from mlx_ltc.research.megacontext.train import sample_windows
from mlx_ltc.numerics.loss import token_nll


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", type=Path, required=True)
    parser.add_argument("--windows", type=int, default=64)
    parser.add_argument("--split", default="85/10/5")
    parser.add_argument("--seed", type=int, default=123)
    args = parser.parse_args()
    try:
        _, val, _ = mc.repo_files(args.repo, "smollm2-135m", args.split, False, lambda m: None)
        windows = sample_windows(val, 64, args.windows, np.random.default_rng(args.seed))
    except (UserError, ValueError) as e:
        sys.exit(f"error: {e}")
    model = mc._load_base("smollm2-135m").model
    embed = model.model.embed_tokens
    e = embed(windows).astype(mx.float32)
    sink = mx.broadcast_to(embed(mx.array([0])).astype(mx.float32)[None], (e.shape[0], 1, e.shape[-1]))
    mean = e[:, :32].mean(axis=1)
    token_norm = mx.linalg.norm(e, axis=-1).mean()
    vectors = {
        "none": None,
        "mean": mean,
        "zero": mx.zeros_like(mean),
        "last": e[:, 31],
        "rescaled": mean * token_norm / mx.linalg.norm(mean, axis=-1, keepdims=True),
    }

    def nll(vector, task):
        seg = slice(0, 32) if task == "ae" else slice(32, 64)
        tokens, inputs = windows[:, seg], e[:, seg][:, :-1]
        slot = [] if vector is None else [vector[:, None]]
        where = np.arange(32, 63) if task == "next" else np.arange(1, 32)
        positions = np.concatenate([[-1.0], [] if vector is None else [15.5 if task == "next" else 0.0], where])
        fed = mx.concatenate([sink, *slot, inputs], axis=1)
        logits = forward_at(model, fed, mx.array(positions.astype(np.float32)))[:, 1 + len(slot) :]
        return token_nll(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1)).mean().item()

    print(f"{args.windows} val windows of {args.repo}; NLL of 31 tokens after [<|endoftext|>, vector]")
    print(f"{'task':5} {'vector':9} {'own':>7} {'shuffled':>9} {'content':>8}")
    for task in ("ae", "next"):
        for name, vector in vectors.items():
            own = nll(vector, task)
            shuffled = own if vector is None else nll(mx.roll(vector, 1, axis=0), task)
            print(f"{task:5} {name:9} {own:7.4f} {shuffled:9.4f} {shuffled - own:+8.4f}", flush=True)


if __name__ == "__main__":
    main()
