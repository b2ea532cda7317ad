"""Independent leakage check of a built dataset: files, exact and near duplicates across splits.

    python scripts/check_leakage.py DATASET [--threshold 0.85]

Reads the dataset's metadata and documents and the repository's files from disk. Near duplicates
use datasketch's own MinHash (128 permutations, SHA-1 of whitespace-separated word 5-grams), not the
builder's token-level signatures, so it checks the builder rather than repeating it. Exit 1 on any leak.
"""

import argparse
import hashlib
import json
import sys
from pathlib import Path

from datasketch import MinHash, MinHashLSH

from mlx_ltc.data.metadata import load_metadata


def words_minhash(text: str) -> MinHash:
    words = text.split()
    m = MinHash(num_perm=128)
    m.update_batch([" ".join(words[i : i + 5]).encode() for i in range(max(1, len(words) - 4))])
    return m


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", type=Path)
    parser.add_argument("--threshold", type=float, default=0.85)
    args = parser.parse_args()
    meta = load_metadata(args.dataset)
    root = Path(meta.repo)
    by_split = meta.files_by_split
    split_of = {p: s for s, paths in by_split.items() for p in paths}
    problems = []

    overlap = sum(
        len(set(by_split[a]) & set(by_split[b])) for a, b in (("train", "val"), ("train", "test"), ("val", "test"))
    )
    if overlap:
        problems.append(f"{overlap} files in more than one split")
    for line in (args.dataset / "documents.jsonl").open():
        d = json.loads(line)
        if split_of.get(d["path"]) != d["split"]:
            problems.append(
                f"document {d['id']} ({d['kind']} of {d['path']}) is in {d['split']}, "
                f"its file in {split_of.get(d['path'])}"
            )
    for s in ("val", "test"):
        qa = args.dataset / "qa" / f"{s}.jsonl"
        for line in qa.open() if qa.exists() else ():
            row = json.loads(line)
            if split_of.get(row["evidence"]) != s:
                problems.append(f"{s} probe {row['id']} has its evidence in {split_of.get(row['evidence'])}")

    texts = {p: (root / p).read_text(encoding="utf-8") for p in split_of}
    exact = {}
    for p, t in texts.items():
        exact.setdefault(hashlib.sha1(" ".join(t.split()).encode()).hexdigest(), []).append(p)
    exact_cross = [ps for ps in exact.values() if len({split_of[p] for p in ps}) > 1]
    lsh = MinHashLSH(threshold=args.threshold, num_perm=128)
    sketches = {}
    for p, t in texts.items():
        if len(t.split()) >= 20:
            sketches[p] = words_minhash(t)
            lsh.insert(p, sketches[p])
    near_cross = set()
    for p, m in sketches.items():
        for q in lsh.query(m):
            if q != p and split_of[q] != split_of[p] and m.jaccard(sketches[q]) >= args.threshold:
                near_cross.add(tuple(sorted((p, q))))
    print(
        f"{args.dataset}: {len(split_of)} files "
        f"({', '.join(f'{len(v)} {k}' for k, v in by_split.items())}); files in two splits: {overlap}; "
        f"exact duplicates across splits: {len(exact_cross)}; near duplicates (J >= {args.threshold}) across "
        f"splits: {len(near_cross)}"
    )
    for pair in sorted(near_cross)[:10]:
        print("  near:", *pair)
    problems += [f"exact duplicates across splits: {ps}" for ps in exact_cross]
    problems += [f"near duplicates across splits: {a} / {b}" for a, b in sorted(near_cross)]
    for p in problems[:20]:
        print("LEAK:", p)
    print("OK: no leakage" if not problems else f"FAILED: {len(problems)} problems")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
