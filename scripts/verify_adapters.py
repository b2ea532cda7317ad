"""Recompute a run's adapted validation loss with mlx-lm's own loader and nothing of mlx-ltc's.

    python scripts/verify_adapters.py RUN_DIR [--tolerance 1e-3] [--max-windows N]

Loads `model_dir` from RUN_DIR/report.json with `mlx_lm.utils.load(..., adapter_path=RUN_DIR/adapters)`
(the 4-bit model as mlx-lm runs it, not mlx-ltc's dequantized copy), computes the token-weighted
next-token loss over the validation sequences (RUN_DIR/data/val.bin, with the document spans of
val.jsonl: the repo prefix and padding are not scored), and compares it with report.json. Exit 1 when they differ
by more than the tolerance. On MLX's CPU backend 4-bit matmuls are slow: the 135M model takes about
2 minutes per 1,000 tokens here.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.utils import load

from mlx_ltc.data.metadata import load_metadata


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--tolerance", type=float, default=1e-3)
    parser.add_argument("--max-windows", type=int, default=None, help="only the first N validation windows")
    args = parser.parse_args()

    report = json.loads((args.run_dir / "report.json").read_text())
    model, _ = load(report["model_dir"], adapter_path=str(args.run_dir / "adapters"))
    data = args.run_dir / "data"
    meta = load_metadata(data)
    sequences = np.fromfile(data / "val.bin", dtype=meta.dtype).reshape(-1, meta.seq_len)
    lines = (data / "val.jsonl").read_text().splitlines()[: args.max_windows]
    total, count, start = 0.0, 0, time.perf_counter()
    for line, row in zip(lines, sequences):
        scored = np.zeros(len(row), dtype=bool)
        for first, length, *_ in json.loads(line)["spans"]:
            scored[first : first + length] = True
        ids = mx.array(row.astype(np.int32))[None]
        logits = model(ids[:, :-1]).astype(mx.float32)
        nll = nn.losses.cross_entropy(logits, ids[:, 1:])[0]
        total += (nll * mx.array(scored[1:])).sum().item()
        count += int(scored[1:].sum())
    loss = total / count
    ours = report["adapted"]["val_loss"]
    print(f"mlx-lm loader: val loss {loss:.6f} over {count} tokens ({time.perf_counter() - start:.0f}s)")
    if args.max_windows is None:
        diff = abs(loss - ours)
        print(f"mlx-ltc report: val loss {ours:.6f} over {report['adapted']['val_tokens']} tokens; |diff| {diff:.2e}")
        if count != report["adapted"]["val_tokens"] or diff > args.tolerance:
            print(f"MISMATCH (tolerance {args.tolerance})")
            sys.exit(1)
        print(f"OK (tolerance {args.tolerance})")


if __name__ == "__main__":
    main()
