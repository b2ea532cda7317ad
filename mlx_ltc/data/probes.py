"""Long-context QA probes for evaluation: a question whose answer sits in a file far back in the
context, with the exact answer span, distractors and the token distance recorded.

Kinds (after RepoQA's needle-function search and RepoBench's cross-file setting):
- defined_in: "Which file defines `name`?"  -> the path of the file with that top-level definition
- returns:    "What does `name` return?"    -> the expression of its single `return`
- imports:    "Which file imports `path`?"  -> the only file of the context importing that file
Each prompt is: repo prefix, the evidence file, filler files until the evidence is `distance` tokens
back, then a question block. Answers and distractors are scored as " " + text after the prompt."""

from dataclasses import dataclass, field

import numpy as np

QUESTION = {
    "defined_in": "Which file defines `{}`?",
    "returns": "What does `{}` return?",
    "imports": "Which file imports `{}`?",
}


@dataclass
class Probe:
    kind: str
    question: str
    answer: str
    distractors: list
    evidence: str  # the evidence file
    distance: int  # tokens from the evidence to the question
    prompt: np.ndarray  # token ids, ending just before the answer
    answer_tokens: list = field(default_factory=list)
    distractor_tokens: list = field(default_factory=list)
    context_files: list = field(default_factory=list)


def candidates(split_files, infos, edges, rng, limit):
    """(kind, subject, answer, evidence file, evidence byte offset, wrong answers) for files of the split."""
    defined = {}
    for info in infos.values():
        for d in info.syntax.definitions if info.syntax else ():
            if d.depth == 0:
                defined.setdefault(d.name, []).append((info.path, d))
    out = []
    paths = sorted(infos)
    returns = sorted({d.returns for v in defined.values() for _, d in v if d.returns and _short(d.returns)})
    for path in split_files:
        info = infos[path]
        for d in info.syntax.definitions if info.syntax else ():
            if d.depth or len(d.name) < 4 or len(defined.get(d.name, ())) != 1:
                continue
            out.append(("defined_in", d.name, path, path, d.start, [p for p in paths if p != path]))
            if d.returns and _short(d.returns):
                out.append(("returns", d.name, d.returns, path, d.start, [r for r in returns if r != d.returns]))
    importers = {}
    for src, dst in edges:
        importers.setdefault(dst, []).append(src)
    for dst, srcs in sorted(importers.items()):
        if len(srcs) == 1 and srcs[0] in split_files:
            out.append(("imports", dst, srcs[0], srcs[0], 0, [p for p in paths if p not in (srcs[0], dst)]))
    order = rng.permutation(len(out))
    return [out[i] for i in order[:limit]]


def _short(text: str) -> bool:
    return "\n" not in text and 1 <= len(text) <= 60


def build_probe(
    candidate, distance, prefix, evidence_doc, evidence_offset, fillers, markers, encode, max_len, rng, n_distractors=4
):
    """A Probe with the evidence at least `distance` tokens before the question, or None when the
    filler available (fillers: (path, tokens incl. header), in order) is too short to reach it."""
    kind, subject, answer, evidence, _, wrong = candidate
    question = QUESTION[kind].format(subject)
    q_tokens = np.asarray(encode.markup([f"{markers.file_header('QUESTIONS.md')}Q: {question}\nA:"])[0], dtype=np.int32)
    answer_tokens = encode([" " + answer])[0]
    budget = max_len - len(prefix) - len(q_tokens) - len(answer_tokens)
    gap = len(evidence_doc) - evidence_offset  # tokens from the evidence to the end of its file
    if len(evidence_doc) > budget:
        return None
    parts, used, files = [evidence_doc], len(evidence_doc), [evidence]
    for path, tokens in fillers:
        if gap >= distance:
            break
        if path == evidence or used + len(tokens) > budget:
            continue
        parts.append(tokens)
        used += len(tokens)
        gap += len(tokens)
        files.append(path)
    if gap < distance:
        return None
    picks = sorted(rng.choice(len(wrong), size=min(n_distractors, len(wrong)), replace=False)) if wrong else []
    distractors = [wrong[i] for i in picks]
    return Probe(
        kind, question, answer, distractors, evidence, distance=int(gap),
        prompt=np.concatenate([prefix, *parts, q_tokens]).astype(np.int32),
        answer_tokens=list(answer_tokens), distractor_tokens=encode([" " + d for d in distractors]),
        context_files=files,
    )  # fmt: skip
