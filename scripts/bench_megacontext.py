"""Issue 9, first measurement: does a gisted head beat truncation on the frozen embedded model?

    python scripts/bench_megacontext.py [--steps 150] [--files 8] [--budgets 256,512] [--horizon 128]
        [--corpus DIR] [--json OUT]

Trains GistNet (L1) on substitutability for --steps updates on the corpus's files (default: this Python's
standard library, top level), except --files held-out files of 3-6K tokens spread over the sorted list.
Then, per held-out file and budget W, the NLL of its last --horizon tokens under truncation, mean-pooled
gists, trained gists, the shuffled / other-file / zeroed controls and the full context; bootstrap CIs over
files and the paired fraction of the truncation-to-full gap each closes. L2 gists are the mean of the
trained L1 gists (GistNet is trained at level 1 only).
"""

import argparse
import json
import os
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from mlx_ltc import models
from mlx_ltc.hardware import ensure_fast_blas
from mlx_ltc.megacontext import evaluate as ev
from mlx_ltc.megacontext.gistnet import GistConfig, GistNet, compressor
from mlx_ltc.megacontext.train import train_gistnet
from mlx_ltc.megacontext.tree import mean_gist

CONDITIONS = ["truncation", "mean_gist", "gist", "shuffled", "other_file", "zeroed"]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--files", type=int, default=8, help="held-out files of 3-6K tokens")
    p.add_argument("--budgets", default="256,512")
    p.add_argument("--horizon", type=int, default=128, help="scored tokens at each file's end")
    p.add_argument("--corpus", type=Path, default=Path(os.__file__).parent)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--weights", type=Path, default=None, help="save the trained GistNet here")
    args = p.parse_args()
    budgets = [int(b) for b in args.budgets.split(",")]

    loaded = models.load(models.resolve("smollm2-135m", models.default_cache_dir()))
    model, tokenizer = loaded.model, loaded.tokenizer
    ids = {f.name: np.array(tokenizer(f.read_text(errors="replace"))["input_ids"], np.int32)
           for f in sorted(args.corpus.glob("*.py"))}  # fmt: skip
    mid = [name for name, tokens in ids.items() if 3000 <= len(tokens) <= 6000]
    held_out = mid[:: max(1, len(mid) // args.files)][: args.files]
    train_files = [tokens for name, tokens in ids.items() if name not in held_out and len(tokens) >= 320]
    print(f"{len(train_files)} train files ({sum(map(len, train_files)):,} tokens); held out: "
          f"{[(name, len(ids[name])) for name in held_out]}", flush=True)  # fmt: skip

    mx.random.seed(0)
    net = GistNet(GistConfig(width=model.model.embed_tokens.weight.shape[1]))
    mx.eval(net.parameters())
    began = time.time()

    def log(r):
        if r["step"] % 10 == 0 or r["step"] == 1:
            print(f"step {r['step']:4d} loss {r['loss']:.4f} kl {r['kl']:.4f} extra {r['extra_nll']:+.4f} "
                  f"grad norm {r['grad_norm']:.3f} {r['seconds']:.1f}s", flush=True)  # fmt: skip

    records = train_gistnet(net, model, train_files, steps=args.steps, blocks=8, keep=2, horizon=64, batch=2,
                            lr=1e-3, log=log)  # fmt: skip
    print(f"trained {args.steps} steps in {time.time() - began:.0f}s", flush=True)
    if args.weights:
        mx.save_safetensors(str(args.weights), dict(tree_flatten(net.parameters())))

    embed = model.model.embed_tokens
    gists = {"mean_gist": mean_gist(np.array(embed.weight)), "gist": compressor(net, embed, trained_levels=(1,))}
    per_file = {}
    for k, name in enumerate(held_out):
        tokens, other = ids[name], ids[held_out[(k + 1) % len(held_out)]]
        full = float(ev.score_file(model, tokens, budgets[0], args.horizon, ["full"], gists)["full"].mean())
        for w in budgets:
            for condition, nll in ev.score_file(model, tokens, w, args.horizon, CONDITIONS, gists, other).items():
                per_file.setdefault((w, condition), []).append(float(nll.mean()))
            per_file.setdefault((w, "full"), []).append(full)
        print(name, {f"{w}:{c}": round(v[-1], 3) for (w, c), v in per_file.items()}, flush=True)

    rows = []
    for (w, condition), values in sorted(per_file.items()):
        nll, low, high = ev.bootstrap_mean(values)
        rows.append({"budget": w, "condition": condition, "nll": nll, "ci_low": low, "ci_high": high})
        print(f"W={w:5d} {condition:12s} nll {nll:.4f} [{low:.4f}, {high:.4f}]")
    for w in budgets:
        for condition in ("mean_gist", "gist", "shuffled", "zeroed"):
            point, low, high = ev.gap_closed(per_file[(w, "truncation")], per_file[(w, condition)],
                                             per_file[(w, "full")])  # fmt: skip
            print(f"W={w}: {condition} closes {point:.3f} [{low:.3f}, {high:.3f}] of the truncation-full gap")
    if args.json:
        per_file_json = {f"{w}:{c}": v for (w, c), v in per_file.items()}
        args.json.write_text(json.dumps({"rows": rows, "per_file": per_file_json, "files": held_out,
                                         "training": records}, indent=1))  # fmt: skip


if __name__ == "__main__":
    ensure_fast_blas(script=__file__)
    main()
