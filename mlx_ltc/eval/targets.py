"""Completion targets: lines of a run's held-out files for a model to complete, and the prompts that
put each one in front of it in the format it was trained on.

Two kinds of target, after CrossCodeEval and RepoBench (without their compiler step):
- cross-file lines: code that uses a name defined in a file this one imports (the dataset builder's
  tree-sitter definitions and resolved import graph) and not in the file itself. A top-level
  definition always counts; a method only when its name is not one that many types define (`get`,
  `items`, `run`, ...), which a line could be calling on anything;
- random lines: any non-trivial code line, a control.
A target is a code line with at least 6 non-blank characters, not only punctuation; comments,
docstrings, the inside of strings, imports and a file's first non-blank line are never targets
(tree-sitter decides, per language). Sampling is seeded and round-robin over files in a seeded order,
capped per file, so one big file cannot dominate.

A prompt ends at the end of the last non-blank line before the target: the model writes the newline
and the indentation itself. (Ending inside that whitespace would leave it a piece of a byte-level BPE
token that merges the newline with the indentation, and the model then writes an empty line.)
"""

import builtins
import copy
import keyword
import math
import re
from dataclasses import dataclass, field

import numpy as np

from mlx_ltc.data import syntax
from mlx_ltc.data.blobs import blob_hash
from mlx_ltc.errors import UserError

CROSS, RANDOM = "cross_file_line", "random_line"
KINDS = (CROSS, RANDOM)
MODES = ("in_file", "cross_file", "fim")
IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
MIN_CHARS = 6  # non-blank characters of a target line
MIN_FILES = 8  # files to draw from: intervals from a bootstrap over fewer files are too rough
MIN_HEAD = 32  # tokens: a dependency that does not fit whole contributes its head only if this much fits
COMMON_METHODS = frozenset(
    {n for t in (object, dict, list, str, set, bytes, int, float, tuple) for n in dir(t)}
    | set(dir(builtins))
    | {"get", "set", "run", "main", "init", "close", "open", "read", "write", "start", "stop", "update", "call",
       "name", "value", "data", "setup", "reset", "load", "save", "add", "remove", "clear", "apply", "execute",
       "process", "handle", "build", "parse", "render", "create", "delete", "send", "next", "size", "length",
       "to_dict", "from_dict", "to_json", "from_json", "validate", "visit", "emit", "push", "flush", "wait"}
)  # fmt: skip


@dataclass(frozen=True)
class Target:
    path: str
    line: int  # 0-based line number
    kind: str  # CROSS or RANDOM
    text: str  # the line as written, without its newline
    names: tuple  # the cross-file names it uses
    cut: int  # byte offset where the prompt's in-file part ends: the end of the last non-blank line before
    end: int  # byte offset of the newline that ends the target line (the FIM suffix starts there)

    @classmethod
    def at(cls, path: str, byte: int) -> "Target":
        """A point to complete (`mlx-ltc complete`): the prompt ends there, a FIM suffix starts there."""
        return cls(path, -1, "point", "", (), byte, byte)


@dataclass
class TargetSet:
    targets: list  # Target, sorted by (path, line)
    splits: list  # the held-out splits the files came from
    files: int  # held-out files with a grammar that were read
    candidates: dict  # kind -> lines that could have been drawn
    notes: list = field(default_factory=list)


def split_files(meta, corpus) -> tuple:
    """({split: held-out paths}, notes): the files of the run's test and val splits that the repository
    still has, with a grammar. A file edited since the build is still held out (training never saw any
    version of it) but gives other lines than it did then: the notes count those."""
    usable, changed, gone = {}, 0, 0
    blobs = meta.blobs
    for name in ("test", "val"):
        usable[name] = []
        for path in meta.files_by_split[name]:
            info = corpus.infos.get(path)
            if info is None:
                gone += 1
            elif info.language is not None:
                usable[name].append(path)
                built = blobs.get(path)
                changed += built is not None and built != blob_hash(corpus.texts[path].encode("utf-8"))
    notes = [f"{changed} held-out files changed since the run was built"] if changed else []
    notes += [f"{gone} held-out files are gone from the repository"] if gone else []
    return usable, notes


def cross_file_names(corpus, path: str) -> dict:
    """name -> the imported repo file that defines it, for the names `path` can use from its imports."""
    info = corpus.infos[path]
    own = {d.name for d in info.syntax.definitions} if info.syntax else set()
    names = {}
    for src, dst in corpus.graph.edges:
        dep = corpus.infos.get(dst) if src == path else None
        if dep is None or dep.syntax is None:
            continue
        for d in dep.syntax.definitions:
            usable = d.depth == 0 or (d.name not in COMMON_METHODS and not d.name.startswith("__"))
            if usable and d.name not in own and len(d.name) > 1:
                names.setdefault(d.name, dst)
    return names


def candidates(corpus, path: str) -> list:
    """(line, text, cross-file names used, cut, end) for every line of the file that can be a target."""
    text = corpus.texts[path]
    source = text.encode("utf-8")
    roles = syntax.line_roles(path, source) or []
    names = cross_file_names(corpus, path)
    out, offset, last_end = [], 0, None
    for i, line in enumerate(source.split(b"\n")):
        end = offset + len(line)
        role = roles[i] if i < len(roles) else "blank"
        if role != "blank":
            stripped = line.decode("utf-8", "replace")
            visible = "".join(stripped.split())
            if (
                role == "code"
                and last_end is not None
                and len(visible) >= MIN_CHARS
                and any(c.isalnum() for c in visible)
            ):
                used = tuple(sorted({n for n in IDENTIFIER.findall(stripped) if n in names}))
                out.append((i, stripped.rstrip("\r"), used, last_end, end))
            last_end = end
        offset = end + 1
    return out


def select(corpus, usable: dict, n: int, seed: int = 0, per_file: int = 0, min_files: int = MIN_FILES) -> TargetSet:
    """About n targets, half cross-file lines and half random lines, from the test split's files, and
    the val split's too when the test split holds too few of either kind, or fewer than `min_files`
    files to draw from (a small repository's 5% test split can be two or three files)."""
    if n < 2:
        raise UserError(f"completion targets must be at least 2 (one of each kind), got {n}")
    want = {CROSS: n // 2, RANDOM: n - n // 2}
    per_split = {name: {p: candidates(corpus, p) for p in usable[name]} for name in ("test", "val")}
    counts = lambda files: {
        CROSS: sum(bool(c[2]) for cs in files.values() for c in cs),  # noqa: E731
        RANDOM: sum(len(cs) for cs in files.values()),
    }
    drawable = lambda files: sum(bool(cs) for cs in files.values())  # noqa: E731
    splits, files = ["test"], dict(per_split["test"])
    short = any(counts(files)[k] < want[k] for k in KINDS) or drawable(files) < min_files
    if short and per_split["val"]:
        splits.append("val")
        files.update(per_split["val"])
    found = counts(files)
    if not files:
        raise UserError("the run has no held-out source files to draw completion targets from")
    rng = np.random.default_rng(seed)
    cap = per_file or max(4, math.ceil(2 * n / max(len(files), 1)))
    chosen = {}
    cross = {p: [c for c in cs if c[2]] for p, cs in files.items()}
    for kind, pool in ((CROSS, cross), (RANDOM, files)):
        taken = _round_robin(pool, want[kind], cap, rng, exclude=set(chosen))
        for path, c in taken:
            chosen[(path, c[0])] = Target(path, c[0], kind, c[1], c[2], c[3], c[4])
    notes = []
    sources = len({t.path for t in chosen.values()})
    if sources < min_files:
        notes.append(f"targets from {sources} files only: intervals from a bootstrap over so few files are rough")
    got = {k: sum(t.kind == k for t in chosen.values()) for k in KINDS}
    for k in KINDS:
        if got[k] < want[k]:
            notes.append(f"{got[k]} {k.replace('_', ' ')}s (of {want[k]} asked): the held-out files hold no more")
    return TargetSet(sorted(chosen.values(), key=lambda t: (t.path, t.line)), splits, len(files), found, notes)


def _round_robin(pool: dict, n: int, cap: int, rng, exclude: set) -> list:
    """n (path, candidate) draws: files in a seeded order, one random line of each per round."""
    order = [p for p in sorted(pool) if pool[p]]
    rng.shuffle(order)
    left = {p: [c for c in pool[p] if (p, c[0]) not in exclude] for p in order}
    for p in order:
        rng.shuffle(left[p])
    taken, used = [], dict.fromkeys(order, 0)
    while len(taken) < n and any(left[p] and used[p] < cap for p in order):
        for p in order:
            if len(taken) < n and left[p] and used[p] < cap:
                taken.append((p, left[p].pop()))
                used[p] += 1
    return taken


@dataclass
class Prompt:
    tokens: np.ndarray  # int32 token ids, at most the budget
    in_file: int  # tokens of the target file's own text (header and FIM markers excluded)
    cross_file: int  # tokens of other files (their headers included)


class Prompter:
    """Prompts in the training format: the repo header, then (cross-file mode) the target file's
    dependencies in dependency order, each under its file header, then the target file's header and
    its text before the target. Within a budget the in-file prefix is kept whole when it fits (else
    its most recent lines); the cross-file part gets `others` tokens (the caller leaves it what the
    in-file part does not take), nearest dependencies first, the last one cut to its head at a line
    boundary. FIM mode: in-file only, the prefix and up to a quarter of the room for the suffix."""

    def __init__(self, corpus):
        self.corpus, self.texts = corpus, corpus.texts
        self.encode, self.markers = corpus.encode, corpus.markers
        self.repo = self.markup(self.markers.repo_header(corpus.scan.name))
        self.newline = np.asarray(self.encode(["\n"])[0], dtype=np.int32)
        self._files, self._dependencies = {}, {}

    def with_buffer(self, path: str, text: str) -> "Prompter":
        """This prompter with `path` holding `text` (an editor's unsaved buffer, or a file the repository
        lacks): its own tokens and headers, the repository's dependencies (shared, so cheap to make)."""
        if self.texts.get(path) == text:
            return self
        other = copy.copy(self)
        other.texts = {**self.texts, path: text}
        other._files = {p: f for p, f in self._files.items() if p != path}
        return other

    def markup(self, text: str) -> np.ndarray:
        return np.asarray(self.encode.markup([text])[0], dtype=np.int32)

    def file(self, path: str) -> tuple:
        """(header tokens, content tokens, byte offset of each token, whether each token starts a line)."""
        if path not in self._files:
            text, info = self.texts[path], self.corpus.infos.get(path)
            saved = info is not None and self.corpus.texts[path] == text
            tokens = np.asarray(info.tokens if saved else self.encode([text])[0], dtype=np.int32)
            starts = self.encode.byte_starts(tokens, text)
            raw = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
            after_newline = np.concatenate([[True], raw == ord("\n")])  # [b]: byte b is the first of a line
            line_start = after_newline[starts] | (raw[starts] == ord("\n"))  # tokens that begin a line
            self._files[path] = (self.markup(self.markers.file_header(path)), tokens, starts, line_start)
        return self._files[path]

    def upto(self, path: str, byte: int) -> np.ndarray:
        """The file's tokens before byte offset `byte` (a token boundary, else the prefix re-encoded)."""
        _, tokens, starts, _ = self.file(path)
        k = int(np.searchsorted(starts, byte))
        if k == len(tokens) or starts[k] == byte:
            return tokens[:k]
        text = self.texts[path].encode("utf-8")[:byte].decode("utf-8", "replace")
        return np.asarray(self.encode([text])[0], dtype=np.int32)

    def _from(self, path: str, byte: int) -> np.ndarray:
        _, tokens, starts, _ = self.file(path)
        k = int(np.searchsorted(starts, byte))
        if k == len(tokens) or starts[k] == byte:
            return tokens[k:]
        text = self.texts[path].encode("utf-8")[byte:].decode("utf-8", "replace")
        return np.asarray(self.encode([text])[0], dtype=np.int32)

    @staticmethod
    def _tail(tokens: np.ndarray, line_start: np.ndarray, room: int) -> np.ndarray:
        """The last tokens that fit `room`, starting at a line when one starts within it."""
        if len(tokens) <= room:
            return tokens
        first = len(tokens) - room
        later = np.flatnonzero(line_start[first : len(tokens)])
        return tokens[first + int(later[0]) :] if len(later) else tokens[first:]

    def in_file(self, target: Target, budget: int) -> np.ndarray | None:
        """The target file's header and its text before the target, its most recent lines when the
        whole of it does not fit; None when the budget cannot hold the headers and a token."""
        header, _, _, line_start = self.file(target.path)
        room = budget - len(self.repo) - len(header)
        if room < 1:
            return None
        return np.concatenate([header, self._tail(self.upto(target.path, target.cut), line_start, room)])

    def build(self, target: Target, mode: str, budget: int, others: int = 0) -> Prompt | None:
        """The prompt for one target; `others`: tokens the cross-file part may take (cross_file mode)."""
        header, _, _, line_start = self.file(target.path)
        if mode == "fim":
            room = budget - len(self.repo) - len(header) - 3
            if room < 1:
                return None
            suffix = self._from(target.path, target.end)[: room // 4]
            prefix = self._tail(self.upto(target.path, target.cut), line_start, room - len(suffix))
            pre, suf, mid = (np.array([t], dtype=np.int32) for t in self.markers.fim)
            body = np.concatenate([header, pre, prefix, suf, suffix, mid])
            return Prompt(np.concatenate([self.repo, body]), len(prefix) + len(suffix), 0)
        in_file = self.in_file(target, budget)
        if in_file is None:
            return None
        docs = self.dependencies(target.path, others) if mode == "cross_file" else []
        cross = sum(len(d) for d in docs)
        return Prompt(np.concatenate([self.repo, *docs, in_file]).astype(np.int32), len(in_file) - len(header), cross)

    def dependencies(self, path: str, room: int) -> tuple:
        """Dependency documents (header + content) that fit `room` tokens, in dependency order."""
        if (path, room) not in self._dependencies:
            if len(self._dependencies) >= 4096:  # a server's prompts ask for ever new rooms: bound the memory
                self._dependencies.clear()
            self._dependencies[path, room] = self._fit_dependencies(path, room)
        return self._dependencies[path, room]

    def _fit_dependencies(self, path: str, room: int) -> tuple:
        chosen = []
        order = {p: i for i, p in enumerate(self.corpus.graph.order)}
        for dep in self.corpus.graph.dependencies(path):
            header, tokens, _, line_start = self.file(dep)
            if len(header) + len(tokens) <= room:
                chosen.append((order[dep], np.concatenate([header, tokens])))
                room -= len(header) + len(tokens)
                continue
            if room - len(header) - len(self.newline) >= MIN_HEAD:
                head = tokens[: room - len(header) - len(self.newline)]
                starts = np.flatnonzero(line_start[1 : len(head)]) + 1  # cut before the last line that starts
                if len(starts):  # whole lines, ending with a newline of their own (the next token may hold it)
                    head = np.concatenate([head[: int(starts[-1])], self.newline])
                chosen.append((order[dep], np.concatenate([header, head])))
            break
        return tuple(doc for _, doc in sorted(chosen, key=lambda x: x[0]))


def identifiers(line: str) -> list:
    """The line's identifiers in order, keywords of the supported languages left out."""
    return [n for n in IDENTIFIER.findall(line) if n not in KEYWORDS]


KEYWORDS = (
    frozenset(keyword.kwlist)
    | frozenset(keyword.softkwlist)
    | frozenset(
        "if else for while do return break continue switch case default try catch finally throw throws new "
        "delete this super class interface enum struct union typedef extends implements import package "
        "public private protected static final const var let function async await yield void int long short "
        "char float double bool boolean true false null nil undefined fn mut pub use mod impl trait where "
        "match loop move ref self Self crate unsafe extern func go defer chan map range select type goto "
        "sizeof volatile register unsigned signed auto include define ifdef ifndef endif".split()
    )
)
