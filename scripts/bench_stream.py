"""Streaming evaluation: peak memory and tokens/s vs stream length, a bounded KV window side by side
with the unbounded cache.

    python scripts/bench_stream.py [--model smollm2-135m] [--tokens 131072] [--windows 512]
                                   [--full-up-to 16384] [--corpus DIR] [--chunk 512]

The stream is the corpus (default: this interpreter's standard library) in the model's repo-level
format. Prints, per configuration and stream length, NLL, tokens/s and peak memory, then the ratio of
the peak at the longest length to the peak at 64K (or the first mark): 1.0 means memory does not grow.
"""

import argparse
import json
import sysconfig
from pathlib import Path


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tokens", type=int, default=131_072)
    parser.add_argument("--windows", default="512", help="comma-separated KV windows")
    parser.add_argument("--full-up-to", type=int, default=16_384, help="unbounded-cache stream length (0: skip)")
    parser.add_argument("--corpus", type=Path, default=Path(sysconfig.get_paths()["stdlib"]))
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    from tqdm import tqdm

    from mlx_ltc.hardware import ensure_fast_blas

    ensure_fast_blas(script=__file__)

    from mlx_ltc import hardware, models
    from mlx_ltc.eval import stream
    from mlx_ltc.eval.run import corpus_stream

    loaded = models.load(models.resolve(args.model, models.default_cache_dir()), "auto")
    tokens, files = corpus_stream(args.corpus, loaded.tokenizer, args.tokens, 1_000_000)
    machine = hardware.describe()
    print(
        f"{args.model} on {machine['platform']} ({machine['device']}, {machine['cpu_cores']} cores): "
        f"{len(tokens):,} tokens from {files} files of {args.corpus}"
    )
    configs = [(int(w), tokens) for w in args.windows.split(",")]
    if args.full_up_to > 0:
        configs.append((None, tokens[: args.full_up_to]))
    rows = []

    def show(p):
        tqdm.write(
            f"  W={p.window or 'all':>6} {p.tokens:>10,} tokens  nll {p.nll:.4f}  {p.tokens_per_s:8.1f} tok/s  "
            f"peak {p.peak_bytes / 2**30:.3f} GB"
        )

    for window, toks in configs:
        with tqdm(total=len(toks), unit="tok", unit_scale=True, leave=False, desc=f"W={window or 'all'}") as bar:
            points = stream.stream_eval(loaded.model, toks, window, args.chunk, progress=bar, on_point=show)
        rows += [{"window": window or 0, **p.__dict__} for p in points]
        base = next((p for p in points if p.tokens >= 65_536), points[0])
        print(
            f"  W={window or 'all':>6} peak at {points[-1].tokens:,} / peak at {base.tokens:,}: "
            f"{points[-1].peak_bytes / base.peak_bytes:.3f}"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
