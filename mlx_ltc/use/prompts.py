"""Prompts at a point: of a file of the repository as `complete` and the completion benchmark build
them (`prompt_at`), and of an editor's text around its cursor for the server (`Editor`).

An editor's request may name its file, or be recognised as one of the repository's (`LineIndex`); its
text takes the place of the saved file, so unsaved edits count. Whitespace just before the cursor is
left out of the prompt, for the model to write and `healed` to take off again: a prompt ending in
whitespace ends inside a token. While the user types on in a file, its prompt keeps its layout (the
same dependencies, its text from the same line), so each prompt extends the last and the KV cache
holds all of it but the new text."""

from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from mlx_ltc.data.sources import path_problem
from mlx_ltc.errors import UserError
from mlx_ltc.eval import targets

SLACK = 128  # tokens (an eighth of the budget at most) a rebuilt prompt leaves free for the next requests to extend


def prompt_at(prompter: targets.Prompter, path: str, at: int, budget: int, others: int | None = None) -> tuple:
    """(the Prompt, its mode) for completing `path` at byte `at` within `budget` tokens; the dependencies
    are those chosen for `others` tokens of room when they fit [default: all the room the file's part leaves]."""
    point = targets.Target.at(path, at)
    suffix = prompter.texts[path].encode("utf-8")[at:].strip()
    mode = "fim" if prompter.markers.fim is not None and suffix else "cross_file"
    in_file = prompter.in_file(point, budget)
    if in_file is None:
        raise UserError(f"a budget of {budget} tokens can't hold the headers of {path}")
    room = budget - len(prompter.repo) - len(in_file)
    if others is None or sum(len(d) for d in prompter.dependencies(path, others)) > room:
        others = room  # what was asked for doesn't fit beside the file's part
    prompt = prompter.build(point, mode, budget, others=others)
    return prompt, mode


class LineIndex:
    """Which file of the repository an editor's text is, when the request doesn't say (llama.vim and
    llama.vscode send no file name): the file most of its distinctive lines (MIN_CHARS or more, found in
    at most MAX_FILES files) come from, if there is one."""

    MIN_CHARS, MAX_FILES, MIN_VOTES = 16, 3, 4

    def __init__(self, texts: dict):
        # each file's distinct lines as hashes, sorted: a large repository's lines as dict keys take 100s of MB
        self.paths = list(texts)
        keys, owners = [np.zeros(0, dtype=np.int64)], [np.zeros(0, dtype=np.int32)]
        for i, text in enumerate(texts.values()):
            lines = {hash(x) for x in map(str.strip, text.splitlines()) if len(x) >= self.MIN_CHARS}
            keys.append(np.fromiter(lines, dtype=np.int64, count=len(lines)))
            owners.append(np.full(len(lines), i, dtype=np.int32))
        keys, owners = np.concatenate(keys), np.concatenate(owners)
        order = np.argsort(keys, kind="stable")
        keys, owners = keys[order], owners[order]
        _, counts = np.unique(keys, return_counts=True)
        distinctive = np.repeat(counts <= self.MAX_FILES, counts)
        self.keys, self.owners = keys[distinctive], owners[distinctive]

    def find(self, prefix: str, suffix: str) -> str | None:
        lines = [x.strip() for x in prefix.splitlines()[-64:] + suffix.splitlines()[:32]]
        lines = [x for x in lines if len(x) >= self.MIN_CHARS]
        hashes = np.array([hash(x) for x in lines], dtype=np.int64)
        lo, hi = np.searchsorted(self.keys, hashes, "left"), np.searchsorted(self.keys, hashes, "right")
        votes = Counter(self.paths[o] for a, b in zip(lo, hi, strict=True) for o in self.owners[a:b])
        ranked = votes.most_common(2) + [(None, 0)] * 2
        (best, n), (_, second) = ranked[0], ranked[1]
        return best if n >= max(self.MIN_VOTES, len(lines) / 2) and n > second else None


@dataclass(frozen=True)
class EditorPrompt:
    tokens: np.ndarray
    path: str | None  # repository-relative, None without repo context or a file of the repository
    found: str | None  # how the file was known: named (by the request) | text (LineIndex) | None
    mode: str  # cross_file | fim
    cross_file_tokens: int  # dependencies from the import graph (headers included)
    extra_tokens: int  # the request's own context chunks (headers included)
    heal: str  # whitespace before the cursor left out of the prompt, to be written by the model (`generate`)


class Editor:
    """An editor's text around its cursor as prompts in the training format, for one reading of the
    repository; keeps each file's last prompt layout, so that the next request extends it."""

    def __init__(self, prompter: targets.Prompter, repo: Path, specials: tuple = ()):
        self.prompter, self.repo, self.specials = prompter, Path(repo), specials
        self.lines = LineIndex({p: prompter.texts[p] for p in prompter.corpus.infos})
        self._layouts = {}  # path -> (byte where its prompt's own text starts, the dependencies' room)

    def name_of(self, file: str) -> str | None:
        """An editor's file name as a repository path: relative as given, or an absolute path inside the
        repository; None for a file outside it. Raises UserError for a name no header can hold."""
        check_name(file, self.specials)
        path = PurePosixPath(file.replace("\\", "/"))
        if path.is_absolute():
            try:
                path = PurePosixPath(Path(file).resolve().relative_to(self.repo.resolve()).as_posix())
            except ValueError:
                return None
        if ".." in path.parts:
            raise UserError(f"file name {file!r}: not a path inside the repository")
        return path.as_posix()

    def prompt(
        self, file: str | None, prefix: str, suffix: str, extra: list, budget: int, repo_context: bool = True
    ) -> EditorPrompt:
        """The prompt for an editor's text around the cursor. For a file of the repository (named, or
        else recognised by its lines), the training format: the file's dependencies, its header, its
        saved text replaced by `prefix` + `suffix`. Otherwise, or without `repo_context`, the repo header
        and the text. `extra` ((file name, text) chunks the editor sends) fills what room is left, ahead
        of the dependencies."""
        heal = whitespace_before(prefix)
        prefix, suffix = prefix[: len(prefix) - len(heal)], heal + suffix
        path = self.name_of(file) if file and repo_context else None
        found = "named" if path else None
        if repo_context and not file:
            path = self.lines.find(prefix, suffix)
            found = "text" if path else None
        p = self.prompter
        if path is None:
            room = budget - len(p.repo) - (3 if p.markers.fim and suffix.strip() else 0)
            tokens, mode = self._bare(prefix, suffix, room), "cross_file"
            if p.markers.fim and suffix.strip():
                mode = "fim"
            prompt = targets.Prompt(np.concatenate([p.repo, tokens]).astype(np.int32), len(tokens), 0)
        else:
            p = p.with_buffer(path, prefix + suffix)
            at = len(prefix.encode("utf-8"))
            prompt, mode = self._file_prompt(p, path, at, budget)
        docs, room = [], budget - len(prompt.tokens)
        for name, text in extra:
            check_name(name, self.specials)
            doc = np.concatenate([p.markup(p.markers.file_header(name)), p.encode([text])[0]]).astype(np.int32)
            if len(doc) <= room:
                docs.append(doc)
                room -= len(doc)
        tokens = np.concatenate([p.repo, *docs, prompt.tokens[len(p.repo) :]]).astype(np.int32)
        return EditorPrompt(tokens, path, found, mode, prompt.cross_file, sum(len(d) for d in docs), heal)

    def _bare(self, prefix: str, suffix: str, room: int) -> np.ndarray:
        encode, fim = self.prompter.encode, self.prompter.markers.fim
        if room < 1:
            raise UserError(f"a budget of {room} tokens can't hold the repo header")
        before = np.asarray(encode([prefix])[0], dtype=np.int32)
        if not (fim and suffix.strip()):
            return before[len(before) - room :] if len(before) > room else before
        after = np.asarray(encode([suffix])[0], dtype=np.int32)[: room // 4]
        before = before[max(0, len(before) - (room - len(after))) :]
        pre, suf, mid = (np.array([t], dtype=np.int32) for t in fim)
        return np.concatenate([pre, before, suf, after, mid])

    def _file_prompt(self, prompter, path: str, at: int, budget: int) -> tuple:
        """(Prompt, mode) for the editor's text of `path` cut at byte `at`. The first request on a file
        gets the prompt `complete` builds. After that the last prompt's layout (the same dependencies,
        the file's text from the same line) is kept while it fits, so the prompt extends the last one and
        the KV cache holds all but the new text; when it no longer fits, the prompt is built again for
        SLACK tokens (an eighth at most) less than the budget, room for what the user types next."""
        last = self._layouts.get(path)
        prompt = self._extend(prompter, path, at, budget, *last) if last is not None else None
        if prompt is not None:
            return prompt, "cross_file"
        header = prompter.file(path)[0]
        fresh = budget - (min(SLACK, budget // 8) if last is not None else 0)
        prompt, mode = prompt_at(prompter, path, at, fresh)
        if mode == "cross_file":
            tokens, starts = self._before(prompter, path, at)
            start = int(starts[len(tokens) - prompt.in_file]) if prompt.in_file else at
            self._layouts[path] = (start, fresh - len(prompter.repo) - len(header) - prompt.in_file)
        return prompt, mode

    @staticmethod
    def _before(prompter, path: str, at: int) -> tuple:
        """The file's tokens before byte `at` and the byte where each starts."""
        tokens = prompter.upto(path, at)
        text = prompter.texts[path].encode("utf-8")[:at].decode("utf-8")
        return tokens, prompter.encode.byte_starts(tokens, text)

    def _extend(self, prompter, path: str, at: int, budget: int, start: int, room: int):
        """The prompt with the last layout, or None when the file's text changed before `start` or the
        prompt no longer fits the budget."""
        raw = prompter.texts[path].encode("utf-8")
        if prompter.markers.fim is not None and raw[at:].strip():
            return None
        if start > at or (start > 0 and ord("\n") not in raw[start - 1 : start + 1]):  # Prompter cuts at lines
            return None
        tokens, starts = self._before(prompter, path, at)
        k = int(np.searchsorted(starts, start))
        if k < len(tokens) and starts[k] != start:
            return None
        header = prompter.file(path)[0]
        docs = prompter.dependencies(path, room)
        cross = sum(len(d) for d in docs)
        if len(prompter.repo) + cross + len(header) + len(tokens) - k > budget:
            return None
        return targets.Prompt(
            np.concatenate([prompter.repo, *docs, header, tokens[k:]]).astype(np.int32), len(tokens) - k, cross
        )


def whitespace_before(prefix: str) -> str:
    """The whitespace the text before the cursor ends with, which the prompt leaves for the model to
    write: a prompt ending in whitespace ends inside a token (byte-level BPE merges a newline with the
    next line's indentation, a space with the next word), and the model then writes nonsense."""
    return prefix[len(prefix.rstrip()) :] if prefix.strip() else ""


def healed(text: str, heal: str) -> str:
    """The model's text after whitespace `heal` the editor already has: nothing while it may still be
    writing that, the rest once it has, else its text without leading whitespace. Each result extends
    the one before as the text grows."""
    if not heal:
        return text
    if heal.startswith(text):
        return ""
    return text[len(heal) :] if text.startswith(heal) else text.lstrip()


def check_name(name: str, specials=()) -> None:
    """Raise UserError for a file name that a file header can't hold as it is."""
    problem = path_problem(name) or ("empty" if not name.strip() else None)
    forged = [t for t in specials if t in name]
    if problem or forged:
        raise UserError(f"file name {name!r}: {problem or 'it spells the control token ' + forged[0]}")
