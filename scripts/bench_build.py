"""Dataset build throughput and peak memory on a large source tree (default: this interpreter's
standard library, ~30 MB of Python), cold (empty blob cache) and warm (a rebuild: every file cached).

    python scripts/bench_build.py [--repo PATH] [--model smollm2-135m] [--seq-len 2048] [--json OUT]

Each build runs in its own process, so its peak RSS is its own. Prints the stage times and MB/s.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path


def tokenize_only(repo, model):
    """The floor: the model's tokenizer alone over the same files (batched, all cores)."""
    from mlx_ltc import data, models
    from mlx_ltc.data.formats import Encoder

    encode = Encoder(models.load_tokenizer(models.resolve(model, models.default_cache_dir())))
    texts = [f.text for f in data.scan(repo).files]
    start = time.perf_counter()
    for s in range(0, len(texts), 64):
        encode(texts[s : s + 64])
    wall = time.perf_counter() - start
    mb = sum(len(t.encode()) for t in texts) / 1e6
    print(json.dumps({"total_s": wall, "mb_per_s": mb / wall}))


def child(repo, model, seq_len, cache, out):
    from mlx_ltc import config, data, models
    from mlx_ltc.data import blobs

    start = time.perf_counter()
    cfg = config.build(None, {"model": {"name": model}, "data": {"seq_len": seq_len}})
    tokenizer = models.load_tokenizer(models.resolve(model, models.default_cache_dir()))
    t_tok = time.perf_counter()
    scan = data.scan(repo, cfg.data.max_file_bytes)
    t_scan = time.perf_counter()
    store = blobs.BlobCache(Path(cache), data.tokenizer_hash(tokenizer))
    corpus = data.Corpus(scan, tokenizer, cfg.data, store, log=lambda m: None, progress=False)
    t_corpus = time.perf_counter()
    meta = data.build(corpus, out, seq_len, corpus.analysis(), progress=False)
    t_end = time.perf_counter()
    store.close()
    mb = sum(len(f.text.encode()) for f in scan.files) / 1e6
    print(json.dumps({
        "source_mb": mb, "files": len(scan.files), "kept": meta.files,
        "scan_s": t_scan - t_tok, "process_s": corpus.process_s, "graph_filter_s": t_corpus - t_scan - corpus.process_s,
        "build_s": t_end - t_corpus, "total_s": t_end - t_tok, "setup_s": t_tok - start,
        "mb_per_s": mb / (t_end - t_tok), "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "cache": meta.cache.to_json(), "packing_efficiency": meta.packing_efficiency,
        "sequences": {k: v.sequences for k, v in meta.splits.items()},
        "dedup": {**meta.dedup.to_json(), "near_pairs": 0}, "skipped": meta.skipped, "edges": len(corpus.graph.edges),
    }))  # fmt: skip


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=Path(sysconfig.get_paths()["stdlib"]))
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == ["tokenize", "only"]:
        return tokenize_only(args.repo, args.model)
    if args.child:
        return child(args.repo, args.model, args.seq_len, *args.child)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        cache, out = Path(tmp) / "blobs.sqlite", Path(tmp) / "ds"
        for run in ("cold", "warm"):
            cmd = [sys.executable, __file__, "--repo", str(args.repo), "--model", args.model,
                   "--seq-len", str(args.seq_len), "--child", str(cache), str(out)]  # fmt: skip
            proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
            if proc.returncode:
                sys.exit(f"{run} build failed:\n{proc.stderr}")
            results[run] = json.loads(proc.stdout.strip().splitlines()[-1])
        cmd = [sys.executable, __file__, "--repo", str(args.repo), "--model", args.model, "--child", "tokenize", "only"]
        floor = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
        results["tokenizer_only"] = floor
    cold, warm = results["cold"], results["warm"]
    print(
        f"repo {args.repo}: {cold['files']:,} files, {cold['source_mb']:.1f} MB ({cold['kept']:,} kept), "
        f"{os.cpu_count()} CPUs, tokenizer of {args.model}"
    )
    print(
        f"{'':6}{'scan':>8}{'process':>9}{'filter+graph':>14}{'pack+write':>12}{'total':>8}{'MB/s':>8}{'peak RSS':>10}"
    )
    for name in ("cold", "warm"):
        r = results[name]
        print(
            f"{name:6}{r['scan_s']:>7.1f}s{r['process_s']:>8.1f}s{r['graph_filter_s']:>13.1f}s{r['build_s']:>11.1f}s"
            f"{r['total_s']:>7.1f}s{r['mb_per_s']:>8.2f}{r['peak_rss_mb']:>8.0f}MB"
        )
    floor = results["tokenizer_only"]
    print(
        f"tokenizer alone over the same files: {floor['total_s']:.1f}s ({floor['mb_per_s']:.2f} MB/s); "
        f"cold build / tokenizer alone: {cold['total_s'] / floor['total_s']:.2f}x the time"
    )
    print(
        f"warm/cold speed-up {cold['total_s'] / warm['total_s']:.1f}x; packing efficiency "
        f"{cold['packing_efficiency']:.4f}; dedup {cold['dedup']}; import edges {cold['edges']:,}"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
