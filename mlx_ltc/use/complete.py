"""A run's model and its repository as they are now: `mlx-ltc complete` and the server's engine.

The repository is read as it is now (files unchanged since the run come from the blob cache) and read
again when it changes; prompts come from `use/prompts.py`, in the format training used, within the
trained length (or the server's context) less the tokens to generate. Generation is mlx-lm's
`generate_step` with one KV cache kept between calls: a prompt that starts like the previous one (the
same file, typed on further down) computes only what differs."""

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_ltc import config, data, models
from mlx_ltc.errors import UserError
from mlx_ltc.eval import completion, targets
from mlx_ltc.eval.run import check_run, load_adapters
from mlx_ltc.records import Record
from mlx_ltc.use import prompts

MIN_BUDGET = 64  # prompt tokens at least
PREFILL_CHUNK = completion.PREFILL_CHUNK
RESCAN_S = 2.0  # the repository is looked at again at most this often


@dataclass(frozen=True)
class Completion(Record):
    model: str  # adapted | base
    path: str
    at: int  # byte offset in the file where the text goes
    mode: str  # cross_file | fim
    prompt_tokens: int
    cross_file_tokens: int  # of the prompt's, other files' (their headers included)
    text: str
    tokens: int  # generated
    stopped: str  # end: the model ended the document | max_tokens
    seconds: float


def position(text: str, line: int | None = None, at: int | None = None) -> int:
    """The byte offset to complete at: `at` itself; the end of line `line` - 1 for `line` (1-based: the
    completion writes line `line`, starting with its newline, as the benchmark's prompts end); else the
    end of the file."""
    raw = text.encode("utf-8")
    if line is not None and at is not None:
        raise UserError("give --line or --at, not both")
    if at is not None:
        if not 0 <= at <= len(raw):
            raise UserError(f"--at {at} is outside the file (0 to {len(raw)} bytes)")
        if at < len(raw) and raw[at] & 0xC0 == 0x80:
            raise UserError(f"--at {at} is inside a UTF-8 character")
        return at
    if line is None:
        return len(raw)
    lines = raw.split(b"\n")
    last = len(lines) + (0 if raw.endswith(b"\n") else 1)  # a new line after the last one included
    if not 1 <= line <= last:
        raise UserError(f"--line {line} is outside the file (lines 1 to {last})")
    return sum(len(x) + 1 for x in lines[: line - 1]) - 1 if line > 1 else 0


@dataclass(frozen=True)
class Generated(Record):
    text: str
    tokens: int
    finish: str  # stop: the model ended the document or wrote a stop string | length: max_tokens or time
    prompt_tokens: int
    reused_tokens: int  # of the prompt's, read from the KV cache of the previous request
    prompt_s: float  # until the first token
    generate_s: float  # after it


class Session:
    """A run's model (its adapters on unless `base`) and its repository as it is now. Not thread-safe:
    one thread generates (MLX's generation stream belongs to the thread that made it)."""

    def __init__(self, run_dir: Path, repo: Path | None = None, base: bool = False, cache_dir=None, log=None):
        self.log = log or (lambda m: print(m, file=sys.stderr, flush=True))
        run_dir = Path(run_dir)
        info = check_run(run_dir)
        self.cfg = config.build(None, info.config)
        self.cache_dir = Path(cache_dir) if cache_dir else models.default_cache_dir()
        model_dir = info.base_model_dir(self.cfg, self.cache_dir)
        self.repo = Path(repo) if repo is not None else Path(info.repo)
        if not self.repo.is_dir():
            raise UserError(f"repository {self.repo} is gone: give the one the run trained on with --repo")
        self.log(f"model: loading {self.cfg.model.name}" + (" (base)" if base else f" with {run_dir / 'adapters'}"))
        self.loaded = models.load(model_dir, self.cfg.model.dequantize)
        if not base:
            load_adapters(self.loaded, run_dir)
        self.model_name = "base" if base else "adapted"
        self.stop_ids = completion.stop_ids(self.loaded.tokenizer)
        self._kv, self._held = None, np.zeros(0, dtype=np.int32)
        self._specials = tuple(self.loaded.tokenizer.get_added_vocab())  # control tokens a header must not spell
        self._read_repo(data.scan(self.repo, self.cfg.data.max_file_bytes))

    def _read_repo(self, scan) -> None:
        corpus = data.Corpus.cached(
            scan, self.loaded.tokenizer, self.cfg.data, self.cache_dir, log=self.log, progress=False
        )
        self.prompter = targets.Prompter(corpus)
        self.editor = prompts.Editor(self.prompter, self.repo, self._specials)
        self.skipped = dict(corpus.skipped)
        self._scanned = time.monotonic()

    def refresh(self) -> bool:
        """Read the repository again if it may have changed (at most every RESCAN_S seconds); whether it had."""
        if time.monotonic() - self._scanned < RESCAN_S:
            return False
        scan = data.scan(self.repo, self.cfg.data.max_file_bytes)
        self._scanned = time.monotonic()
        texts = {f.path: f.text for f in scan.files}
        if texts == self.prompter.corpus.texts:
            return False
        self.log(f"repository: {self.repo} changed, reading it again")
        self._read_repo(scan)
        return True

    def path_of(self, file: str | Path) -> str:
        """The repository-relative path of `file` (given relative to the repository or as a real path)."""
        path = Path(file)
        if path.is_absolute() or not (self.repo / path).is_file():
            if not path.is_file():
                raise UserError(f"--file {file}: no such file in the repository {self.repo}")
            try:
                path = path.resolve().relative_to(self.repo.resolve())
            except ValueError:
                raise UserError(f"--file {file} is not in the repository {self.repo}") from None
        name = path.as_posix()
        if name not in self.prompter.corpus.infos:
            why = self.skipped.get(name)
            raise UserError(
                f"--file {file}: " + (f"skipped when the repository was read ({why})" if why else "not a source file")
            )
        return name

    def budget(self, context: int, max_tokens: int, what: str = "--max-tokens") -> int:
        budget = context - max_tokens
        if budget < MIN_BUDGET:
            raise UserError(
                f"{what} {max_tokens} leaves {budget} of the {context}-token context for the prompt; "
                f"give at most {context - MIN_BUDGET}"
            )
        return budget

    def generate(self, tokens, max_tokens: int, temp=0.0, top_p=1.0, top_k=0, stop=(), seconds=None, heal=""):
        """Yield the completion's text piece by piece; the generator's return value is a Generated.
        `stop`: strings that end it (left out of the text); `seconds`: a time limit after the first token;
        `heal`: whitespace the editor has already, taken off the start of the text (`healed`)."""
        from mlx_lm.generate import generate_step
        from mlx_lm.models.cache import make_prompt_cache, trim_prompt_cache
        from mlx_lm.sample_utils import make_sampler

        model, tokenizer = self.loaded.model, self.loaded.tokenizer
        model.eval()
        tokens = np.asarray(tokens, dtype=np.int32)
        started = time.perf_counter()
        if self._kv is None:
            self._kv, self._held = make_prompt_cache(model), np.zeros(0, dtype=np.int32)
        keep = min(completion.shared(self._held, tokens), len(tokens) - 1)  # generate_step needs a new token
        trim_prompt_cache(self._kv, self._kv[0].offset - keep)
        self._held = np.zeros(0, dtype=np.int32)  # unknown until this generation ends cleanly
        sampler = make_sampler(temp, top_p if top_p < 1 else 0.0, top_k=top_k)
        steps = generate_step(
            mx.array(tokens[keep:]), model, prompt_cache=self._kv, max_tokens=max_tokens, sampler=sampler,
            prefill_step_size=PREFILL_CHUNK,
        )  # fmt: skip
        ids, text, sent, finish, first = [], "", 0, "length", None
        hold = max((len(s) for s in stop), default=1) - 1
        try:
            for token, _ in steps:
                first = first or time.perf_counter()
                if token in self.stop_ids:
                    finish = "stop"
                    break
                ids.append(token)
                text = prompts.healed(tokenizer.decode(ids), heal)
                cut = min((i for i in (text.find(s, max(0, sent - hold)) for s in stop) if i >= 0), default=-1)
                if cut >= 0:
                    text, finish = text[:cut], "stop"
                    break
                ready = len(text) - hold if stop else len(text)
                while ready > sent and text[ready - 1] == "\ufffd":  # a character whose bytes are still coming
                    ready -= 1
                if ready > sent:
                    yield text[sent:ready]
                    sent = ready
                if seconds is not None and time.perf_counter() - first > seconds:
                    break
        except BaseException:
            self._kv = None  # a half-written cache is not reused
            raise
        finally:
            steps.close()
        if len(text) > sent:
            yield text[sent:]
        trim_prompt_cache(self._kv, self._kv[0].offset - len(tokens))
        self._held = tokens
        now = time.perf_counter()
        return Generated(
            text=text,
            tokens=len(ids),
            finish=finish,
            prompt_tokens=len(tokens),
            reused_tokens=keep,
            prompt_s=(first or now) - started,
            generate_s=now - (first or now),
        )

    def complete(self, path: str, at: int, max_tokens: int, temp: float = 0.0, top_p: float = 1.0) -> Completion:
        started = time.perf_counter()
        budget = self.budget(self.cfg.data.seq_len, max_tokens)
        heal = prompts.whitespace_before(self.prompter.texts[path].encode("utf-8")[:at].decode("utf-8"))
        prompt, mode = prompts.prompt_at(self.prompter, path, at - len(heal.encode("utf-8")), budget)
        steps = self.generate(prompt.tokens, max_tokens, temp, top_p, heal=heal)
        done = _drain(steps)
        return Completion(
            model=self.model_name,
            path=path,
            at=at,
            mode=mode,
            prompt_tokens=len(prompt.tokens),
            cross_file_tokens=prompt.cross_file,
            text=done.text,
            tokens=done.tokens,
            stopped="end" if done.finish == "stop" else "max_tokens",
            seconds=time.perf_counter() - started,
        )


def _drain(steps) -> Generated:
    """Run a generation to its end; its Generated."""
    while True:
        try:
            next(steps)
        except StopIteration as end:
            return end.value
