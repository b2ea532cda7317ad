"""`mlx-ltc analyze`: what the repository is made of, its import graph, and the training constants
derived from both. Every constant is printed with its formula and inputs, and can be overridden."""

import math
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from mlx_ltc.data.graph import ImportGraph

ROUND = 512


@dataclass
class Constant:
    name: str
    value: int
    formula: str
    inputs: dict


def _pow2(x: float) -> int:
    return 2 ** round(math.log2(x))


def derive(p95_tokens: float, mean_depth: float, n_files: int, total_tokens: int, profile_max=None,
           batch_size: int = 1, fallback_cap: int = 2048, seq_len: int | None = None) -> list:  # fmt: skip
    """The derived constants; a given seq_len replaces the derived one (and feeds the others)."""
    raw = p95_tokens * (1 + mean_depth / 10)
    seq = max(ROUND, math.ceil(raw / ROUND) * ROUND)
    cap, cap_from = (profile_max, "memory profile") if profile_max else (fallback_cap, "no memory profile")
    derived = min(seq, max(ROUND, cap // ROUND * ROUND) if cap >= ROUND else cap)
    seq_len = seq_len or derived
    rank_raw = 8 * math.sqrt(seq_len / 512) * math.log(n_files + 1)
    rank = min(64, max(4, _pow2(max(rank_raw, 1))))
    phases = min(3, 1 + int(math.log2(seq_len / 512))) if seq_len >= 512 else 1
    while phases > 1 and total_tokens < phases * 50 * seq_len:  # each phase needs >= 50 sequences
        phases -= 1
    per_step = min(65536, max(seq_len, total_tokens // 100))
    per_step = max(seq_len * batch_size, per_step // (seq_len * batch_size) * seq_len * batch_size)
    return [
        Constant("seq_len", seq_len, "round_up(p95_file_tokens * (1 + mean_import_depth / 10), 512), capped"
                 + ("" if seq_len == derived else f"; overridden (derived: {derived})"),
                 {"p95_file_tokens": round(p95_tokens, 1), "mean_import_depth": round(mean_depth, 3),
                  "raw": round(raw, 1), "cap": cap, "cap_from": cap_from}),
        Constant("lora_rank", rank, "pow2(8 * sqrt(seq_len / 512) * ln(files + 1)) clamped to [4, 64]",
                 {"seq_len": seq_len, "files": n_files, "raw": round(rank_raw, 2)}),
        Constant("phases", phases, "min(3, 1 + log2(seq_len / 512)), fewer while tokens < phases * 50 * seq_len",
                 {"seq_len": seq_len, "tokens": total_tokens}),
        Constant("tokens_per_step", per_step,
                 "clamp(tokens / 100, seq_len, 65536), a multiple of seq_len * batch (>= 100 updates per epoch)",
                 {"tokens": total_tokens, "seq_len": seq_len, "batch": batch_size}),
    ]  # fmt: skip


def analysis(
    scan, infos, graph: ImportGraph, tokenizer_name: str, tokenizer_hash: str, profile=None, roles=None, seq_len=None
) -> dict:
    """The analysis.json document."""
    tokens = np.array([len(i.tokens) for i in infos])
    per_language = defaultdict(lambda: {"files": 0, "bytes": 0, "tokens": 0})
    for i in infos:
        lang = per_language[i.language or "other"]
        lang["files"] += 1
        lang["bytes"] += i.bytes
        lang["tokens"] += len(i.tokens)
    p95 = float(np.percentile(tokens, 95)) if len(tokens) else 0.0
    skipped = set(graph.skipped)
    constants = derive(
        p95,
        graph.mean_depth,
        len(infos),
        int(tokens.sum()),
        profile["max_seq_len"] if profile else None,
        profile["batch_size"] if profile else 1,
        seq_len=seq_len,
    )
    return {
        "repo": str(scan.root),
        "listing": scan.listing,
        "tokenizer": tokenizer_name,
        "tokenizer_hash": tokenizer_hash,
        "files": {
            i.path: {
                "language": i.language or "other",
                "bytes": i.bytes,
                "tokens": len(i.tokens),
                "depth": graph.depth.get(i.path, 0),
                "entropy": round(i.entropy, 4),
                **({"role": roles[i.path]} if roles else {}),
            }
            for i in infos
        },
        "totals": {"files": len(infos), "bytes": sum(i.bytes for i in infos), "tokens": int(tokens.sum())},
        "file_tokens": {
            "median": float(np.median(tokens)) if len(tokens) else 0.0,
            "p95": p95,
            "max": int(tokens.max()) if len(tokens) else 0,
        },
        "languages": dict(sorted(per_language.items(), key=lambda kv: -kv[1]["tokens"])),
        "skipped": scan.skip_counts(),
        "skipped_files": [{"path": p, "reason": r} for p, r in scan.skipped],
        "imports": graph.edges,
        "import_graph": {
            "edges": len(graph.edges),
            "edges_to_skipped_files": sum(d in skipped for _, d in graph.edges),
            "mean_depth": graph.mean_depth,
            "max_depth": max(graph.depth.values(), default=0),
            "components": graph.components,
            "order": graph.order,
        },
        "constants": {c.name: {"value": c.value, "formula": c.formula, "inputs": c.inputs} for c in constants},
    }


def table(a: dict) -> str:
    """A compact human summary of an analysis."""
    lines = [
        f"{a['repo']}: {a['totals']['files']:,} files, {a['totals']['bytes'] / 1e6:.2f} MB, "
        f"{a['totals']['tokens']:,} tokens ({a['tokenizer']})"
    ]
    lines.append(f"  {'language':<12}{'files':>8}{'MB':>9}{'tokens':>12}")
    for lang, t in a["languages"].items():
        lines.append(f"  {lang:<12}{t['files']:>8,}{t['bytes'] / 1e6:>9.2f}{t['tokens']:>12,}")
    ft, g = a["file_tokens"], a["import_graph"]
    lines.append(f"  file tokens: median {ft['median']:,.0f}, p95 {ft['p95']:,.0f}, max {ft['max']:,}")
    lines.append(
        f"  imports: {g['edges']:,} edges resolved to repo files ({g.get('edges_to_skipped_files', 0):,} to skipped "
        f"ones); mean depth {g['mean_depth']:.2f}, "
        f"max {g['max_depth']}; import cycles (strongly connected components): {len(g['components'])}"
    )
    if a["skipped"]:
        lines.append("  skipped: " + ", ".join(f"{n} {r}" for r, n in sorted(a["skipped"].items())))
    lines.append("  derived constants:")
    for name, c in a["constants"].items():
        inputs = ", ".join(f"{k}={v}" for k, v in c["inputs"].items())
        lines.append(f"    {name:<16}{c['value']:>8,}  = {c['formula']}  [{inputs}]")
    return "\n".join(lines) + "\n"
