"""`mlx-ltc build`: a repository -> train/val/test shards of packed repo-level sequences, QA probes
and metadata. Stages: scan -> per-file work (cached by blob) -> quality filters and dedup ->
import graph -> splits by path hash -> documents (dependency order, segmentation, FIM, augmentation,
commit chains) -> best-fit packing -> shards. The output directory appears only when complete."""

import dataclasses
import json
import time
from collections import Counter
from pathlib import Path

import numpy as np

from mlx_ltc import atomic
from mlx_ltc.config import DataConfig
from mlx_ltc.data import analyze, blobs, formats, graph, pack, probes, quality, segment, split, syntax
from mlx_ltc.data.metadata import (
    QA,
    CacheUse,
    Chains,
    DatasetMeta,
    Dedup,
    Difficulty,
    Fim,
    MarkerUse,
    QASplit,
    SplitStats,
)
from mlx_ltc.errors import UserError

SHARD_SUFFIX = ".bin"


def weights_of(cfg: DataConfig) -> dict:
    return {"core": cfg.weight_core, "test": cfg.weight_test, "doc": cfg.weight_doc, "other": cfg.weight_other}


def fractions(cfg: DataConfig) -> tuple:
    parts = [float(x) for x in cfg.split.split("/")]  # validated with the config
    return tuple(p / sum(parts) for p in parts)


class Corpus:
    """The repo's usable files after quality filters, with their graph, roles and splits."""

    def __init__(self, scan, tokenizer, cfg: DataConfig, cache=None, log=print, progress=True):
        from mlx_ltc import progress as progress_bars

        self.scan, self.cfg, self.log = scan, cfg, log
        self.markers = formats.markers(tokenizer)
        self.tokenizer_hash = formats.tokenizer_hash(tokenizer)
        self.tokenizer_name = getattr(tokenizer, "name_or_path", "") or "tokenizer"
        self.encode = formats.Encoder(tokenizer)
        self.vocab_size = len(tokenizer.get_vocab())
        total = sum(len(f.text.encode("utf-8")) for f in scan.files)
        started = time.perf_counter()
        with progress_bars.bar(total=total, unit="B", unit_scale=True, desc="read", enabled=progress) as bar:
            infos, (self.processed, self.cached) = blobs.process(
                scan.files, self.encode, self.vocab_size, cache, bar.update
            )
        self.process_s = time.perf_counter() - started
        self.skipped = list(scan.skipped)
        self.infos = {i.path: i for i in self._filter(infos)}
        if not self.infos:
            counts = ", ".join(f"{n} {r}" for r, n in sorted(Counter(r for _, r in self.skipped).items()))
            raise UserError(f"repo {scan.root} has no usable source files after filtering ({counts})")
        texts = {f.path: f.text for f in scan.files}
        read = lambda p: texts.get(p) or ""
        everything = sorted({f.path for f in scan.files} | {p for p, _ in self.skipped})
        edges = syntax.resolve_all({p: i.syntax for p, i in self.infos.items()}, everything, read)
        self.graph = graph.ImportGraph.build(self.infos, edges, skipped=everything)
        core = quality.most_imported(self.graph.in_degree) if not cfg.core_paths else set()
        self.roles = {p: quality.role(p, cfg.core_paths, core) for p in self.infos}
        self.splits = split.assign(self.infos, fractions(cfg), cfg.split_by, salt=str(cfg.seed) if cfg.seed else "")
        self.texts = texts

    @classmethod
    def cached(cls, scan, tokenizer, cfg: DataConfig, cache_dir: Path, log=print, progress=True) -> "Corpus":
        """A Corpus whose per-file work comes from (and goes to) the blob cache in `cache_dir`."""
        cache = blobs.BlobCache(Path(cache_dir) / "blobs.sqlite", formats.tokenizer_hash(tokenizer))
        try:
            return cls(scan, tokenizer, cfg, cache, log=log, progress=progress)
        finally:
            cache.close()

    def _filter(self, infos):
        kept, by_hash, signatures = [], {}, {}
        self.dedup = {"exact": 0, "near": 0, "low_entropy": 0}
        for info in infos:
            if len(info.tokens) >= 64 and info.entropy < self.cfg.min_entropy:
                self.skipped.append((info.path, "low entropy"))
                self.dedup["low_entropy"] += 1
            elif info.content_hash in by_hash:
                self.skipped.append((info.path, f"exact duplicate of {by_hash[info.content_hash]}"))
                self.dedup["exact"] += 1
            else:
                by_hash[info.content_hash] = info.path
                kept.append(info)
                if len(info.tokens) >= 32:  # shorter files have too few shingles for a Jaccard estimate
                    signatures[info.path] = quality.minhash(info.signature)
        near = quality.near_duplicates(signatures, self.cfg.near_duplicate)
        for path, twin in sorted(near.items()):
            self.skipped.append((path, f"near duplicate of {twin}"))
        self.dedup["near"] = len(near)
        self.near_pairs = sorted(near.items())
        return [i for i in kept if i.path not in near]

    def analysis(self, profile=None) -> analyze.Analysis:
        """The analysis at the config's seq_len (derived when None), the memory profile capping it."""
        infos, seq_len = list(self.infos.values()), self.cfg.seq_len
        result = analyze.analysis(
            self.scan, infos, self.graph, self.tokenizer_name, self.tokenizer_hash, profile, self.roles, seq_len
        )
        skipped = [{"path": p, "reason": r} for p, r in self.skipped]
        return dataclasses.replace(result, skipped=_counts(self.skipped), skipped_files=skipped, dedup=dict(self.dedup))


def _counts(skipped) -> dict:
    return dict(Counter(r.split(" of ")[0] if r.startswith(("exact", "near")) else r for _, r in skipped))


def check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "metadata.json").exists())):
        raise UserError(f"--out {out} exists and is not an mlx-ltc dataset; refusing to replace it")


def build(corpus: Corpus, out: Path, seq_len: int, analysis: analyze.Analysis, progress=True) -> DatasetMeta:
    """Write the dataset to `out` (replacing an older build there) and return its metadata."""
    cfg, markers, encode, log = corpus.cfg, corpus.markers, corpus.encode, corpus.log
    out = Path(out)
    check_out(out)
    started = time.perf_counter()
    rng = np.random.default_rng(cfg.seed)
    prefix = np.asarray(encode.markup([markers.repo_header(corpus.scan.name)])[0], dtype=np.int32)
    fim_on = cfg.fim_rate > 0 and markers.fim is not None
    if cfg.fim_rate > 0 and markers.fim is None:
        log("data: FIM off: this tokenizer has no <fim_prefix>/<fim_suffix>/<fim_middle> tokens")
    room = seq_len - len(prefix) - (3 if fim_on else 0)
    if room < 32:
        raise UserError(f"seq_len {seq_len} is too short for this tokenizer's headers; use at least 64")
    weights = weights_of(cfg)
    docs, doc_pieces = [], {}  # doc table rows; path -> [(tokens incl header, token offset)] for probes
    by_split = {s: [] for s in split.SPLITS}
    augmented = _augment(corpus, rng) if cfg.augment > 0 else {}
    order = corpus.graph.order
    headers = dict(zip(order, encode.markup([markers.file_header(p) for p in order])))
    for path in order:
        info, s = corpus.infos[path], corpus.splits[path]
        content, aug_text = augmented.get(path, (info.tokens, None))
        header = np.asarray(headers[path], dtype=np.int32)
        starts = _segments(corpus, path, content, room - len(header), aug_text)
        for k, (a, b) in enumerate(zip(starts, starts[1:] + [len(content)])):
            tokens = content[a:b]
            kind = "file"
            if fim_on and s == "train" and rng.random() < cfg.fim_rate:
                tokens, kind = formats.fim(tokens, rng, markers.fim), "fim"
            doc_tokens = np.concatenate([header, tokens]).astype(np.int32)
            if kind == "file" and path not in augmented:
                doc_pieces.setdefault(path, []).append((doc_tokens, a, len(header)))
            by_split[s].append(pack.Doc(doc_tokens, len(header), len(docs)))
            docs.append({"id": len(docs), "path": path, "split": s, "kind": kind, "part": k, "parts": len(starts),
                         "role": corpus.roles[path], "weight": weights[corpus.roles[path]],
                         "tokens": len(doc_tokens), "augmented": path in augmented})  # fmt: skip
    chains = _chains(corpus, by_split, docs, room, weights) if cfg.chains else Chains(note="off")

    dtype = np.uint16 if corpus.vocab_size <= 65536 else np.uint32
    stats = {}
    with atomic.replace_dir(out) as tmp:
        for s in split.SPLITS:
            stats[s] = _write_split(tmp, s, by_split[s], seq_len, prefix, docs, corpus, dtype)
        qa = _write_probes(tmp, corpus, doc_pieces, prefix, seq_len, rng) if cfg.qa else None
        atomic.write_jsonl(tmp / "documents.jsonl", docs)
        atomic.write_json(tmp / "analysis.json", analysis.to_json())
        capacity = sum(v.sequences for v in stats.values()) * seq_len
        useful = sum(v.useful_tokens for v in stats.values())
        meta = DatasetMeta(
            format_version=1,
            repo=str(corpus.scan.root),
            repo_name=corpus.scan.name,
            listing=corpus.scan.listing,
            tokenizer=corpus.tokenizer_name,
            tokenizer_hash=corpus.tokenizer_hash,
            vocab_size=corpus.vocab_size,
            dtype=np.dtype(dtype).name,
            seq_len=seq_len,
            markers=MarkerUse(
                markers.repo, markers.file, markers.eos, markers.fim is not None, any(markers.commit.values())
            ),
            config=dict(vars(cfg)),
            packing_efficiency=useful / capacity if capacity else 0.0,
            splits=stats,
            files_by_split={s: sorted(p for p in corpus.infos if corpus.splits[p] == s) for s in split.SPLITS},
            blobs={p: blobs.blob_hash(corpus.texts[p].encode("utf-8")) for p in sorted(corpus.infos)},
            files=len(corpus.infos),
            skipped=_counts(corpus.skipped),
            skipped_files=[{"path": p, "reason": r} for p, r in corpus.skipped],
            dedup=Dedup(**corpus.dedup, near_pairs=[list(p) for p in corpus.near_pairs[:100]]),
            documents=dict(Counter(d["kind"] for d in docs)),
            mix=mix(docs),
            segmented_files=sum(1 for d in docs if d["part"] == 1 and d["kind"] != "chain"),
            fim=Fim(cfg.fim_rate if fim_on else 0.0, sum(d["kind"] == "fim" for d in docs)),
            augmented_files=len(augmented),
            chains=chains,
            qa=qa,
            roles=dict(Counter(corpus.roles.values())),
            role_weights=weights,
            cache=CacheUse(corpus.processed, corpus.cached),
            timing={"process_s": corpus.process_s, "build_s": time.perf_counter() - started},
        )
        meta.save(tmp)
    return meta


def mix(docs) -> dict:
    """Tokens (headers included) per split and document kind: what each split is made of."""
    out = {s: {} for s in split.SPLITS}
    for d in docs:
        out[d["split"]][d["kind"]] = out[d["split"]].get(d["kind"], 0) + d["tokens"]
    return out


def _segments(corpus, path, content, budget, augmented_text=None) -> list:
    """Token offsets where the file's pieces start (see segment.py)."""
    if len(content) <= budget:
        return [0]
    text = augmented_text or corpus.texts[path]
    info = corpus.infos[path]
    defs = info.syntax.definitions if info.syntax and augmented_text is None else []
    starts = corpus.encode.byte_starts(content, text)
    return segment.cut(len(content), budget, segment.boundary_levels(text.encode("utf-8"), starts, defs))


def _augment(corpus, rng) -> dict:
    """path -> (tokens, text) for the train files replaced by an augmented variant: locals renamed
    where supported, comments stripped. Variants replace their original (no copies)."""
    from mlx_ltc.data import augment

    chosen = {}
    for path in sorted(corpus.infos):
        info = corpus.infos[path]
        if corpus.splits[path] != "train" or info.language not in augment.COMMENT_LANGUAGES:
            continue
        if rng.random() >= corpus.cfg.augment:
            continue
        text = corpus.texts[path]
        if info.language in augment.RENAME_LANGUAGES:
            text = augment.rename_locals(text, info.language, seed=int(rng.integers(1 << 31)))
        text = augment.strip_comments(text, info.language)
        if text != corpus.texts[path] and text.strip():
            chosen[path] = text
    encoded = corpus.encode(list(chosen.values()))
    return {p: (np.asarray(ids, dtype=np.int32), t) for (p, t), ids in zip(chosen.items(), encoded)}


def _chains(corpus, by_split, docs, room, weights) -> Chains:
    from mlx_ltc.data import history

    cfg, markers = corpus.cfg, corpus.markers
    if corpus.scan.listing != "git":
        corpus.log("data: not a git repository: no commit-evolution chains")
        return Chains(note="not a git repository")
    if cfg.chain_share == 0:
        return Chains(note="data.chain_share is 0")
    hist = history.commit_chains(corpus.scan.root, sorted(corpus.infos), max_versions=cfg.chain_versions)
    if hist.note:
        corpus.log(f"data: {hist.note}")
    texts, heads = [], []
    for chain in hist.chains:
        text = history.format_chain(chain, markers.chain_markers())
        head = markers.file_header(chain.path)
        heads.append(head)
        texts.append(text[len(head) :] if text.startswith(head) else text)
    native = all(markers.commit.values())  # then the bodies hold commit markers
    bodies = corpus.encode.markup(texts) if native else corpus.encode(texts)
    header_ids = corpus.encode.markup(heads)
    pieces = []  # per chain: (tokens, header length) of each of its documents
    for body, text, header in zip(bodies, texts, header_ids):
        body, header = np.asarray(body, dtype=np.int32), np.asarray(header, dtype=np.int32)
        budget = room - len(header)
        starts = [0]
        if len(body) > budget:
            offsets = corpus.encode.byte_starts(body, text)
            starts = segment.cut(len(body), budget, segment.boundary_levels(text.encode("utf-8"), offsets, None))
        ends = starts[1:] + [len(body)]
        pieces.append([(np.concatenate([header, body[a:b]]), len(header)) for a, b in zip(starts, ends)])
    kept = _within_share(hist.chains, pieces, corpus, by_split, np.random.default_rng(cfg.seed + 1))
    for chain, parts in zip(hist.chains, pieces):
        if chain.path not in kept:
            continue
        s, role = corpus.splits[chain.path], corpus.roles[chain.path]
        for k, (tokens, header) in enumerate(parts):
            by_split[s].append(pack.Doc(tokens, header, len(docs)))
            docs.append({"id": len(docs), "path": chain.path, "split": s, "kind": "chain", "part": k,
                         "parts": len(parts), "role": role, "weight": weights[role], "tokens": len(tokens),
                         "versions": len(chain.versions), "augmented": False})  # fmt: skip
    return Chains(
        chains=len(kept),
        versions=sum(len(c.versions) for c in hist.chains if c.path in kept),
        commits=hist.commits,
        shallow=hist.shallow,
        skipped=hist.skipped,
        note=hist.note,
        share=cfg.chain_share,
        dropped_for_share=len(hist.chains) - len(kept),
    )


def _within_share(chains, pieces, corpus, by_split, rng) -> set:
    """Paths of the chains kept so that in every split chains take at most `chain_share` of the tokens:
    whole chains, in a seeded random order, each kept while it still fits."""
    share = corpus.cfg.chain_share
    if share >= 1:
        return {c.path for c in chains}
    room = {s: share / (1 - share) * sum(len(d.tokens) for d in docs) for s, docs in by_split.items()}
    kept = set()
    for i in rng.permutation(len(chains)):
        s, size = corpus.splits[chains[i].path], sum(len(tokens) for tokens, _ in pieces[i])
        if size <= room[s]:
            room[s] -= size
            kept.add(chains[i].path)
    return kept


def _write_split(tmp: Path, name: str, split_docs, seq_len, prefix, docs, corpus, dtype) -> SplitStats:
    """Pack and stream one split to NAME.bin (token ids) and NAME.jsonl (one line per sequence)."""
    max_depth = max(corpus.graph.depth.values(), default=0) or 1
    n = useful = pad = 0
    difficulties = []
    with (
        atomic.atomic_path(tmp / f"{name}{SHARD_SUFFIX}") as bin_path,
        open(bin_path, "wb") as tokens_out,
        atomic.atomic_path(tmp / f"{name}.jsonl") as index_path,
        open(index_path, "w") as index_out,
    ):
        for seq in _packed(name, split_docs, seq_len, prefix, docs):
            tokens_out.write(seq.tokens.astype(dtype).tobytes())
            score = _difficulty(seq, docs, corpus, seq_len, max_depth)
            difficulties.append(score)
            spans = [[sp.start, sp.length, sp.doc, sp.first, sp.overhead] for sp in seq.spans]
            row = {"i": n, "prefix": seq.prefix, "pad": seq.pad, "difficulty": round(score, 4), "spans": spans}
            index_out.write(json.dumps(row) + "\n")
            n += 1
            useful += seq.useful
            pad += seq.pad
    d = np.array(difficulties) if difficulties else np.zeros(1)
    files = {docs[x.index]["path"] for x in split_docs}
    return SplitStats(
        sequences=n,
        tokens=n * seq_len,
        useful_tokens=useful,
        pad_tokens=pad,
        packing_efficiency=useful / (n * seq_len) if n else 0.0,
        documents=len(split_docs),
        files=len(files),
        difficulty=Difficulty(float(d.mean()), float(np.percentile(d, 10)), float(np.percentile(d, 90))),
    )


def _packed(name: str, split_docs, seq_len, prefix, docs):
    """Sequences of one split. Training mixes document kinds for the best fit; a held-out split packs
    each kind on its own, so that held-out files are cut and scored the same whatever the chain share
    (mixed with long chains, best fit had cut a split's files into 1.7x as many pieces)."""
    if name == "train":
        yield from pack.pack(split_docs, seq_len, prefix, pad_id=0)
        return
    for kind in dict.fromkeys(docs[d.index]["kind"] for d in split_docs):
        yield from pack.pack([d for d in split_docs if docs[d.index]["kind"] == kind], seq_len, prefix, pad_id=0)


def _difficulty(seq, docs, corpus, seq_len, max_depth) -> float:
    """Curriculum score in [0, 1]: the token-weighted mean over the sequence's documents of
    (document length / seq_len + import depth / max depth + normalised entropy) / 3."""
    total = score = 0.0
    for sp in seq.spans:
        d = docs[sp.doc]
        info = corpus.infos[d["path"]]
        length = min(1.0, d["tokens"] / seq_len)
        depth = corpus.graph.depth.get(d["path"], 0) / max_depth
        score += sp.length * (length + depth + info.entropy) / 3
        total += sp.length
    return score / total if total else 0.0


def _write_probes(tmp: Path, corpus, doc_pieces, prefix, seq_len, rng) -> QA:
    cfg = corpus.cfg
    max_len = cfg.qa_max_len or seq_len
    buckets = [b for b in (256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072) if b <= 0.85 * max_len]
    top = int(0.8 * max_len) // 64 * 64  # near the longest distance the prompt length allows
    buckets += [top] if buckets and top > buckets[-1] else []
    order = corpus.graph.order
    per_split = {}
    (tmp / "qa").mkdir()
    for name in ("val", "test"):
        files = [p for p in order if corpus.splits[p] == name and p in doc_pieces]
        fillers = [(p, doc_pieces[p][0][0]) for p in files] + [
            (p, doc_pieces[p][0][0]) for p in order if corpus.splits[p] == "train" and p in doc_pieces
        ]
        cands = probes.candidates(files, corpus.infos, corpus.graph.edges, rng, limit=20 * cfg.qa_per_bucket)
        made, counts = [], Counter()
        for cand in cands:
            evidence = _evidence_piece(corpus, doc_pieces[cand[3]], cand)
            for b in buckets:
                if counts[b] >= cfg.qa_per_bucket or evidence is None:
                    continue
                probe = probes.build_probe(
                    cand, b, prefix, *evidence, fillers, corpus.markers, corpus.encode, max_len, rng
                )
                if probe is not None:
                    made.append(probe)
                    counts[b] += 1
        offset = 0
        with atomic.atomic_path(tmp / "qa" / f"{name}.bin") as path, open(path, "wb") as out:
            rows = []
            for i, p in enumerate(made):
                out.write(p.prompt.astype(np.int32).tobytes())
                rows.append({"id": i, "kind": p.kind, "question": p.question, "answer": p.answer,
                             "answer_tokens": p.answer_tokens, "distractors": p.distractors,
                             "distractor_tokens": p.distractor_tokens, "evidence": p.evidence,
                             "distance": p.distance, "offset": offset, "length": len(p.prompt),
                             "context_files": p.context_files})  # fmt: skip
                offset += len(p.prompt)
        atomic.write_jsonl(tmp / "qa" / f"{name}.jsonl", rows)
        per_split[name] = QASplit(len(made), dict(Counter(p.kind for p in made)), {str(b): counts[b] for b in buckets})
    return QA(max_len, buckets, **per_split)


def _evidence_piece(corpus, pieces, cand):
    """(doc tokens, token offset of the evidence in them) for the piece holding the evidence."""
    _, _, _, path, ev_byte, _ = cand
    offset = 0
    if ev_byte:
        starts = corpus.encode.byte_starts(corpus.infos[path].tokens, corpus.texts[path])
        offset = int(np.searchsorted(starts, ev_byte, side="right") - 1)
    for tokens, start, header in pieces:
        if start <= offset < start + len(tokens) - header:
            return tokens, header + offset - start
    return None
