"""`mlx-ltc analyze`: what the repository is made of, its import graph, and the training constants
derived from both. Every constant is printed with its formula and inputs, and can be overridden."""

import math
from dataclasses import dataclass, field

import numpy as np

from mlx_ltc.data.graph import ImportGraph
from mlx_ltc.records import Record

ROUND = 512


@dataclass(frozen=True)
class Constant(Record):
    value: int
    formula: str
    inputs: dict


@dataclass(frozen=True)
class FileEntry(Record):
    language: str
    bytes: int
    tokens: int
    depth: int
    entropy: float
    role: str | None = None  # core | test | doc | other


@dataclass(frozen=True)
class Totals(Record):
    files: int
    bytes: int
    tokens: int


@dataclass(frozen=True)
class FileTokens(Record):
    median: float
    p95: float
    max: int


@dataclass(frozen=True)
class GraphSummary(Record):
    edges: int
    mean_depth: float
    max_depth: int
    components: list  # the import cycles: strongly connected components of more than one file
    order: list[str]  # dependency order: a file after the files it imports
    edges_to_skipped_files: int = 0


@dataclass(frozen=True)
class Analysis(Record):
    """analysis.json: what the repository is made of, its import graph, and the derived constants."""

    repo: str
    listing: str
    tokenizer: str
    tokenizer_hash: str
    files: dict[str, FileEntry]
    totals: Totals
    file_tokens: FileTokens
    languages: dict[str, Totals]
    skipped: dict[str, int]  # reason -> files
    skipped_files: list  # {path, reason}
    imports: list  # [importer, imported] edges between repo files
    import_graph: GraphSummary
    constants: dict[str, Constant]
    dedup: dict[str, int] = field(default_factory=dict)

    def constant(self, name: str) -> int:
        return self.constants[name].value


def _pow2(x: float) -> int:
    return 2 ** round(math.log2(x))


def derive(p95_tokens: float, mean_depth: float, n_files: int, total_tokens: int, profile_max=None,
           batch_size: int = 1, fallback_cap: int = 2048, seq_len: int | None = None) -> dict:  # fmt: skip
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
    return {
        "seq_len": Constant(seq_len, "round_up(p95_file_tokens * (1 + mean_import_depth / 10), 512), capped"
                 + ("" if seq_len == derived else f"; overridden (derived: {derived})"),
                 {"p95_file_tokens": round(p95_tokens, 1), "mean_import_depth": round(mean_depth, 3),
                  "raw": round(raw, 1), "cap": cap, "cap_from": cap_from}),
        "lora_rank": Constant(rank, "pow2(8 * sqrt(seq_len / 512) * ln(files + 1)) clamped to [4, 64]",
                 {"seq_len": seq_len, "files": n_files, "raw": round(rank_raw, 2)}),
        "phases": Constant(phases, "min(3, 1 + log2(seq_len / 512)), fewer while tokens < phases * 50 * seq_len",
                 {"seq_len": seq_len, "tokens": total_tokens}),
        "tokens_per_step": Constant(per_step,
                 "clamp(tokens / 100, seq_len, 65536), a multiple of seq_len * batch (>= 100 updates per epoch)",
                 {"tokens": total_tokens, "seq_len": seq_len, "batch": batch_size}),
    }  # fmt: skip


def analysis(
    scan, infos, graph: ImportGraph, tokenizer_name: str, tokenizer_hash: str, profile=None, roles=None, seq_len=None
) -> Analysis:
    tokens = np.array([len(i.tokens) for i in infos])
    languages = {}
    for i in infos:
        languages.setdefault(i.language or "other", []).append(i)
    per_language = {
        lang: Totals(len(files), sum(i.bytes for i in files), sum(len(i.tokens) for i in files))
        for lang, files in languages.items()
    }
    p95 = float(np.percentile(tokens, 95)) if len(tokens) else 0.0
    skipped = set(graph.skipped)
    constants = derive(
        p95,
        graph.mean_depth,
        len(infos),
        int(tokens.sum()),
        profile.max_seq_len if profile else None,
        profile.batch_size if profile else 1,
        seq_len=seq_len,
    )
    files = {
        i.path: FileEntry(
            i.language or "other",
            i.bytes,
            len(i.tokens),
            graph.depth.get(i.path, 0),
            round(i.entropy, 4),
            roles[i.path] if roles else None,
        )
        for i in infos
    }
    return Analysis(
        repo=str(scan.root),
        listing=scan.listing,
        tokenizer=tokenizer_name,
        tokenizer_hash=tokenizer_hash,
        files=files,
        totals=Totals(len(infos), sum(i.bytes for i in infos), int(tokens.sum())),
        file_tokens=FileTokens(
            float(np.median(tokens)) if len(tokens) else 0.0, p95, int(tokens.max()) if len(tokens) else 0
        ),
        languages=dict(sorted(per_language.items(), key=lambda kv: -kv[1].tokens)),
        skipped=scan.skip_counts(),
        skipped_files=[{"path": p, "reason": r} for p, r in scan.skipped],
        imports=graph.edges,
        import_graph=GraphSummary(
            edges=len(graph.edges),
            edges_to_skipped_files=sum(d in skipped for _, d in graph.edges),
            mean_depth=graph.mean_depth,
            max_depth=max(graph.depth.values(), default=0),
            components=graph.components,
            order=graph.order,
        ),
        constants=constants,
    )


def table(a: Analysis) -> str:
    """A compact human summary of an analysis."""
    from mlx_ltc import tables

    t, ft, g = a.totals, a.file_tokens, a.import_graph
    rows = [[lang, f"{x.files:,}", f"{x.bytes / 1e6:.2f}", f"{x.tokens:,}"] for lang, x in a.languages.items()]
    lines = [
        f"{a.repo}: {t.files:,} files, {t.bytes / 1e6:.2f} MB, {t.tokens:,} tokens ({a.tokenizer})\n",
        tables.text(["language", "files", "MB", "tokens"], rows),
        f"  file tokens: median {ft.median:,.0f}, p95 {ft.p95:,.0f}, max {ft.max:,}\n",
        f"  imports: {g.edges:,} edges resolved to repo files ({g.edges_to_skipped_files:,} to skipped ones); "
        f"mean depth {g.mean_depth:.2f}, max {g.max_depth}; "
        f"import cycles (strongly connected components): {len(g.components)}\n",
    ]
    if a.skipped:
        lines.append("  skipped: " + ", ".join(f"{n} {r}" for r, n in sorted(a.skipped.items())) + "\n")
    lines.append("  derived constants:\n")
    for name, c in a.constants.items():
        inputs = ", ".join(f"{k}={v}" for k, v in c.inputs.items())
        lines.append(f"    {name:<16}{c.value:>8,}  = {c.formula}  [{inputs}]\n")
    return "".join(lines)
