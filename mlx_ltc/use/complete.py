"""`mlx-ltc complete RUN --file PATH`: the run's model continues a file of its repository at a point.

The prompt is the one training and the completion benchmark build (`eval.targets.Prompter`): the repo
header, the file's dependencies in dependency order within the budget, the file's header and its text
before the point; with FIM tokens in the tokenizer and text after the point, fill-in-the-middle with
that suffix instead. The budget is the trained length less the tokens to generate. The repository is
read as it is now (files unchanged since the run come from the blob cache)."""

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from mlx_ltc import config, data, models
from mlx_ltc.errors import UserError
from mlx_ltc.eval import completion, targets
from mlx_ltc.eval.run import check_run, load_adapters
from mlx_ltc.records import Record

MIN_BUDGET = 64


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


def prompt_at(prompter: targets.Prompter, path: str, at: int, budget: int) -> tuple:
    """(the Prompt, its mode) for completing `path` at byte `at` within `budget` tokens."""
    point = targets.Target.at(path, at)
    suffix = prompter.corpus.texts[path].encode("utf-8")[at:].strip()
    mode = "fim" if prompter.markers.fim is not None and suffix else "cross_file"
    in_file = prompter.in_file(point, budget)
    if in_file is None:
        raise UserError(f"a budget of {budget} tokens can't hold the headers of {path}")
    prompt = prompter.build(point, mode, budget, others=budget - len(prompter.repo) - len(in_file))
    return prompt, mode


class Session:
    """A run's model (its adapters on unless `base`) and its repository as it is now."""

    def __init__(self, run_dir: Path, repo: Path | None = None, base: bool = False, cache_dir=None, log=None):
        log = log or (lambda m: print(m, file=sys.stderr, flush=True))
        run_dir = Path(run_dir)
        info = check_run(run_dir)
        self.cfg = config.build(None, info.config)
        cache_dir = Path(cache_dir) if cache_dir else models.default_cache_dir()
        model_dir = info.base_model_dir(self.cfg, cache_dir)
        self.repo = Path(repo) if repo is not None else Path(info.repo)
        if not self.repo.is_dir():
            raise UserError(f"repository {self.repo} is gone: give the one the run trained on with --repo")
        log(f"model: loading {self.cfg.model.name}" + (" (base)" if base else f" with {run_dir / 'adapters'}"))
        self.loaded = models.load(model_dir, self.cfg.model.dequantize)
        if not base:
            load_adapters(self.loaded, run_dir)
        self.model_name = "base" if base else "adapted"
        scan = data.scan(self.repo, self.cfg.data.max_file_bytes)
        corpus = data.Corpus.cached(scan, self.loaded.tokenizer, self.cfg.data, cache_dir, log=log, progress=False)
        self.prompter = targets.Prompter(corpus)
        self.skipped = dict(corpus.skipped)

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

    def complete(self, path: str, at: int, max_tokens: int, temp: float = 0.0, top_p: float = 1.0) -> Completion:
        from mlx_lm.generate import generate_step
        from mlx_lm.sample_utils import make_sampler

        started = time.perf_counter()
        budget = self.cfg.data.seq_len - max_tokens
        if budget < MIN_BUDGET:
            raise UserError(
                f"--max-tokens {max_tokens} leaves {budget} of the trained {self.cfg.data.seq_len} tokens for the "
                f"prompt; give at most {self.cfg.data.seq_len - MIN_BUDGET}"
            )
        prompt, mode = prompt_at(self.prompter, path, at, budget)
        tokenizer, model = self.loaded.tokenizer, self.loaded.model
        model.eval()
        stop, ids = completion.stop_ids(tokenizer), []
        sampler = make_sampler(temp, top_p if top_p < 1 else 0.0)
        steps = generate_step(mx.array(prompt.tokens), model, max_tokens=max_tokens, sampler=sampler)
        stopped = "max_tokens"
        for token, _ in steps:
            if token in stop:
                stopped = "end"
                break
            ids.append(token)
        steps.close()
        return Completion(
            model=self.model_name,
            path=path,
            at=at,
            mode=mode,
            prompt_tokens=len(prompt.tokens),
            cross_file_tokens=prompt.cross_file,
            text=tokenizer.decode(ids),
            tokens=len(ids),
            stopped=stopped,
            seconds=time.perf_counter() - started,
        )
