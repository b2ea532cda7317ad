"""The `mlx-ltc` command line."""

import dataclasses
import os
import re
import sys
from pathlib import Path

import click

from mlx_ltc import __version__, config
from mlx_ltc.errors import Interrupted, UserError


class _Group(click.Group):
    """Turns a UserError from any command into click's one-line error and a non-zero exit."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as e:
            raise click.ClickException(str(e)) from None
        except Interrupted as e:
            if str(e):  # empty on an mlx.launch rank other than the main one
                click.echo(str(e), err=True)
            ctx.exit(130)
        except OSError as e:  # a path we were given can't be written or read (permissions, missing parent, full disk)
            where = f": {e.filename}" if e.filename else ""
            raise click.ClickException(f"{e.strerror or e}{where}") from None
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)


@click.group(cls=_Group)
@click.version_option(__version__, prog_name="mlx-ltc")
def cli():
    """Fine-tune a code model on your repository with long context, on the machine you own."""


def _memory_options(f):
    """Switch each part of the memory engine off, for comparison with stock MLX."""
    for name, what in (
        ("staged", "staged execution (one lazy graph per step instead)"),
        ("chunked-loss", "the chunked cross-entropy (full L x V logits instead)"),
        ("efficient-attention", "the O(L)-memory attention (MLX's scaled_dot_product_attention instead)"),
    ):
        f = click.option(f"--no-{name}", f"no_{name.replace('-', '_')}", is_flag=True, help=f"Turn off {what}.")(f)
    return f


def _context_parallel_option(f):
    return click.option(
        "--context-parallel",
        is_flag=True,
        help="Under mlx.launch: the ranks share every sequence's positions (memory.context_parallel).",
    )(f)


def _memory_overrides() -> dict:
    """The `memory` keys the current command's --no-* memory flags set."""
    params = click.get_current_context().params
    switched = {
        "staged": False if params.get("no_staged") else None,
        "loss": "full" if params.get("no_chunked_loss") else None,
        "attention": "stock" if params.get("no_efficient_attention") else None,
        "context_parallel": True if params.get("context_parallel") else None,
    }
    return {"memory": _given(switched)}


def _given(values: dict) -> dict:
    return {k: v for k, v in values.items() if v is not None}


def _shown(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def _default_help(key: str) -> str:
    """'[default: X]' with X the built-in default of a dotted config key (one place: mlx_ltc/config.py)."""
    return f"[default: {_shown(config.default(key))}]"


class _Setting(click.Option):
    """An option that sets one config key. It has no default of its own: unset, the --config file's value
    or the built-in one applies, and the help names the built-in one (unless it says its own)."""

    def __init__(self, *decls, key: str, **kwargs):
        help_text = kwargs.pop("help")
        if "[default" not in help_text and not kwargs.get("is_flag"):
            help_text = f"{help_text} {_default_help(key)}"
        super().__init__(*decls, default=None, help=help_text, **kwargs)
        self.key = key


def _setting(*decls, key: str, **kwargs):
    return click.option(*decls, cls=_Setting, key=key, **kwargs)


_config_option = click.option(
    "--config",
    "config_file",
    type=click.Path(path_type=Path),
    default=None,
    help="YAML config (configs/default.yaml lists every key); flags override it.",
)


def _config(config_file, extra: dict | None = None) -> config.Config:
    return _config_given(config_file, extra)[0]


def _config_given(config_file, extra: dict | None = None) -> tuple:
    """(config, given): defaults <- the --config file <- the current command's setting options that were given
    (and `extra`, overrides the command maps itself); `given` says where the user set each key ("file" or
    "flag"). A flag's value the config rejects is named by its flag as well."""
    ctx = click.get_current_context()
    overrides, flags = dict(extra or {}), {}
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if isinstance(param, _Setting) and value is not None:
            *sections, name = param.key.split(".")
            node = overrides
            for section in sections:
                node = node.setdefault(section, {})
            node[name] = value
            flags[param.key] = param.opts[0]
    config.build(config_file)  # the file's own mistakes first, without a flag to blame
    try:
        return config.build_given(config_file, overrides)
    except UserError as e:
        named = [flag for key, flag in flags.items() if re.search(rf"\b{re.escape(key)}\b", str(e))]
        raise UserError(f"{e} ({', '.join(named)})" if named else str(e)) from None


@cli.command("train", short_help="Build the dataset, train LoRA adapters, report before/after.")
@click.option("--repo", type=click.Path(path_type=Path), default=".", show_default=True, help="Repository to train on.")
@_setting(
    "--model",
    key="model.name",
    help="smollm2-135m, tiny-starcoder2, a local mlx-lm/HF directory, or a Hugging Face id.",
)
@click.option(
    "--out", type=click.Path(path_type=Path), default=None, help="Run directory [default: runs/REPO-TIMESTAMP]."
)
@_setting("--max-steps", key="train.max_steps", type=int, help="Optimizer updates [default: one epoch].")
@_setting("--seq-len", key="data.seq_len", type=int, help="Tokens per training sequence [default: derived by analyze].")
@_setting("--bits", key="model.bits", type=int, help="Quantize to this many bits when the model is not quantized.")
@_setting("--group-size", key="model.group_size", type=int, help="Quantization group size.")
@_config_option
@click.option("--overwrite", is_flag=True, help="Replace an existing run in --out.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@_setting(
    "--backend",
    key="train.backend",
    type=click.Choice(["mlx", "torch"]),
    help="mlx, or torch: the reference implementation, for small models.",
)
@_setting(
    "--save-every",
    key="checkpoint.save_every",
    type=int,
    help="Checkpoint every K optimizer steps [default: phase ends].",
)
@_setting(
    "--report-to", key="orchestrator.report_to", type=click.Choice(["none", "wandb"]), help="Also log metrics to wandb."
)
@click.option(
    "--resume",
    type=click.Path(path_type=Path),
    default=None,
    help="Continue the interrupted run in this directory from its last checkpoint.",
)
@_memory_options
@_context_parallel_option
def train_cmd(repo, out, config_file, overwrite, quiet, resume, max_steps, **settings):
    """Train LoRA adapters on the repository given by --repo: build its dataset, train, and report the
    base and adapted models side by side (held-out perplexity, completion, the forgetting check).

    Training runs in one phase at --seq-len, or in phases of growing length (curriculum.phases), steered by
    the orchestrator; checkpoints make it resumable with --resume RUN_DIR (--max-steps then moves the
    run's end).
    """
    from mlx_ltc import run

    ctx = click.get_current_context()
    if resume is not None:
        given = [
            p.name
            for p in ctx.command.params
            if p.name not in ("resume", "max_steps", "quiet")
            and ctx.get_parameter_source(p.name) == click.core.ParameterSource.COMMANDLINE
        ]
        if given:
            raise UserError(f"--resume continues a run with its own settings; drop {', '.join(given)}")
        report = run.resume_train(resume, max_steps, progress=not quiet)
    else:
        cfg, given = _config_given(config_file, _memory_overrides())
        report = run.run_train(
            cfg, repo, out or run.default_out(repo), overwrite=overwrite, progress=not quiet, given=given
        )
    if report is not None:  # None: a rank other than the main one of an mlx.launch run
        click.echo(run.summary(report), nl=False)


def _data_options(f):
    for opt in reversed(
        [
            click.option("--repo", type=click.Path(path_type=Path), default=".", show_default=True, help="Repository."),
            _setting("--model", key="model.name", help="Whose tokenizer."),
            _setting(
                "--seq-len", key="data.seq_len", type=int, help="Tokens per sequence [default: derived by analyze]."
            ),
            _config_option,
            click.option("--quiet", is_flag=True, help="No progress bars."),
        ]
    ):
        f = opt(f)
    return f


def _corpus(repo, config_file, extra=None):
    """(cfg, scan, tokenizer, cache_dir, profile) for analyze/build."""
    from mlx_ltc import data, models, run

    cfg = _config(config_file, extra)
    scan = data.scan(repo, cfg.data.max_file_bytes)
    cache_dir = models.default_cache_dir()
    tokenizer = models.load_tokenizer(models.resolve(cfg.model.name, cache_dir, cfg.model.bits, cfg.model.group_size))
    return cfg, scan, tokenizer, cache_dir, run.cached_profile(cfg.model.name, cfg.memory, cache_dir)


@cli.command("analyze", short_help="Inventory, import graph and derived constants of a repo.")
@_data_options
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=Path("analysis.json"), show_default=True,
              help="Where to write the analysis.")  # fmt: skip
def analyze_cmd(repo, config_file, quiet, json_out, **settings):
    """Inventory, import graph and derived training constants of a repository."""
    from mlx_ltc import atomic, data
    from mlx_ltc.data import analyze

    cfg, scan, tokenizer, cache_dir, profile = _corpus(repo, config_file)
    log = lambda m: click.echo(m, err=True)  # noqa: E731
    corpus = data.Corpus.cached(scan, tokenizer, cfg.data, cache_dir, log=log, progress=not quiet)
    result = corpus.analysis(profile)
    atomic.write_json(json_out, result.to_json())
    click.echo(analyze.table(result) + f"  written: {json_out}", nl=True)


@cli.command("build", short_help="Build the packed train/val/test dataset of a repo.")
@_data_options
@click.option(
    "--out", type=click.Path(path_type=Path), required=True, help="Dataset directory (replaced if a dataset)."
)
@_setting("--split", key="data.split", help="train/val/test shares.")
@_setting("--fim-rate", key="data.fim_rate", type=float, help="Share of train documents in FIM form (FIM tokenizers).")
@_setting("--augment", key="data.augment", type=float, help="Share of train files replaced by an augmented variant.")
@click.option("--no-chains", is_flag=True, help="No commit-evolution chains (data.chains: false).")
@click.option("--no-qa", is_flag=True, help="No QA probes (data.qa: false).")
def build_cmd(repo, config_file, quiet, out, no_chains, no_qa, **settings):
    """Build train/val/test shards of packed repo-level sequences, QA probes and metadata."""
    import json

    from mlx_ltc import run

    off = {"chains": False if no_chains else None, "qa": False if no_qa else None}
    cfg, scan, tokenizer, cache_dir, profile = _corpus(repo, config_file, {"data": _given(off)})
    meta, _ = run.prepare_data(cfg, scan, tokenizer, out, cache_dir, profile, progress=not quiet)
    keys = ("seq_len", "packing_efficiency", "splits", "documents", "dedup", "chains", "qa", "skipped", "cache")
    summary = {k: v for k, v in meta.to_json().items() if k in keys}
    click.echo(json.dumps(summary | {"out": str(out)}, indent=1))


@cli.command("profile", short_help="Find the longest sequence a training step fits here.")
@_setting("--model", key="model.name", help="Model to profile.")
@_setting(
    "--memory-budget",
    key="profile.memory_budget",
    help="e.g. 5.3GB (an 8 GB Mac) [default: what this machine allows].",
)
@_setting(
    "--max-len",
    key="profile.max_len",
    type=click.IntRange(min=1),
    help="Longest length to try [default: 8192 on CPU, 131072 on GPU].",
)
@_setting(
    "--granularity", key="profile.granularity", type=click.IntRange(min=1), help="Bisection stops at this resolution."
)
@_setting("--start", key="profile.start", type=click.IntRange(min=1), help="First length tried (then doubled).")
@_setting("--batch-size", key="profile.batch_size", type=click.IntRange(min=1), help="Sequences per step.")
@_config_option
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None, help="Also write the profile here.")
@click.option("--force", is_flag=True, help="Measure again even when a cached profile matches.")
@_memory_options
def profile_cmd(config_file, json_out, force, **settings):
    """Measure this machine and find the longest sequence a real training step fits in the budget."""
    from mlx_ltc import atomic, models
    from mlx_ltc.hardware import profile

    cfg = _config(config_file, _memory_overrides())
    result = profile.run_profile(cfg, models.default_cache_dir(), force, log=lambda line: click.echo(line, err=True))
    if json_out:
        atomic.write_json(json_out, result.to_json())
    click.echo(profile.summary(result), nl=False)


@cli.command(
    "launch",
    short_help="Run an mlx-ltc command on several ranks with mlx.launch, checking the hosts first.",
    context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False},
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def launch_cmd(args):
    """mlx.launch's options, then -- and an mlx-ltc command, e.g.

    \b
      mlx-ltc launch -n 2 --backend ring -- train --repo . --out runs/dp
      mlx-ltc launch --hostfile hosts.json --backend ring -- train --repo ~/src/p --context-parallel

    Each host of --hosts/--hostfile must answer SSH first (mlx.launch would wait for an unreachable one
    without a word), and the exit status is non-zero when a rank failed (mlx.launch's is 0 regardless).
    """
    from mlx_ltc import launch

    args = list(args)
    if "--" not in args:
        raise UserError("give mlx.launch's options, then -- and the mlx-ltc command (mlx-ltc launch -n 2 -- train ...)")
    cut = args.index("--")
    launch.run(args[:cut], args[cut + 1 :])


@cli.command("plan", short_help="Predict a training step's peak memory under each memory policy (no weights).")
@_setting("--model", key="model.name", help="A model name, a model directory or a config.json.")
@_setting(
    "--memory-budget", key="profile.memory_budget", help="e.g. 5.3GB (an 8 GB Mac) [default: what this machine allows]."
)
@click.option(
    "--seq-len",
    type=click.IntRange(min=1),
    default=None,
    help="Tokens per sequence [default: data.seq_len, else 4096].",
)
@_setting("--batch-size", key="profile.batch_size", type=click.IntRange(min=1), help="Sequences per micro-batch.")
@click.option(
    "--backend",
    "backend_name",
    type=click.Choice(["cpu", "metal", "cuda"]),
    default=None,
    help="Plan for this MLX backend [default: this machine's].",
)
@click.option(
    "--dtype",
    type=click.Choice(["fp32", "bf16", "fp16"]),
    default=None,
    help="Activation dtype [default: fp32 on cpu (weights dequantized), else the model's].",
)
@click.option(
    "--bits",
    type=click.IntRange(min=0, max=8),
    default=None,
    help="Weight bits, 0 = dequantized [default: 0 on cpu, else the model's quantization or model.bits].",
)
@_setting("--lora-rank", key="lora.rank", type=click.IntRange(min=1), help="LoRA rank [default: 8].")
@click.option(
    "--context-parallel",
    "ranks",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Price context parallelism over this many ranks: each rank's peak (engine policies).",
)
@_config_option
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None, help="Also write the plan here.")
def plan_cmd(seq_len, backend_name, dtype, bits, ranks, config_file, json_out, **settings):
    """Predict the peak memory of one LoRA training step for every memory policy, the longest sequence each
    fits in the budget, and the policy `memory.policy: auto` would train with. Reads config.json only."""
    from mlx_ltc import atomic, models
    from mlx_ltc.hardware import planner, profile

    cfg = _config(config_file)
    config_json, where = planner.model_config(cfg.model.name, models.default_cache_dir())
    shape = planner.Shape.from_config(config_json, cfg.model.name)
    here = profile.backend()
    backend_name = backend_name or here
    if cfg.profile.memory_budget:
        budget = profile.parse_size(cfg.profile.memory_budget)
    elif backend_name == here:
        budget = profile.default_budget(profile.machine())
    else:
        raise UserError(f"--backend {backend_name} is not this machine's ({here}): give --memory-budget")
    setup = planner.setup_from_config(config_json, cfg, backend_name, cfg.profile.batch_size, dtype, bits)
    if ranks > 1:
        setup = dataclasses.replace(setup, context_ranks=ranks)
    result = planner.plan(shape, setup, budget, seq_len or cfg.data.seq_len or 4096)
    click.echo(f"config: {where}", err=True)
    click.echo(planner.describe(result), nl=False)
    if json_out:
        atomic.write_json(json_out, result.to_json())


def _session_options(f):
    """--repo and --base: which repository the run's model completes, and with or without its adapters."""
    f = click.option("--base", is_flag=True, help="The base model, without the run's adapters.")(f)
    return click.option(
        "--repo",
        type=click.Path(path_type=Path),
        default=None,
        help="The repository as it is now [default: the one the run trained on].",
    )(f)


@cli.command("complete", short_help="Complete code of the repository with a run's model.")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--file", "file", required=True, help="The file to complete: a path in the run's repository.")
@click.option("--line", type=click.IntRange(min=1), default=None, help="Write this line (1-based) [default: append].")
@click.option("--at", type=click.IntRange(min=0), default=None, help="Complete at this byte offset instead.")
@_setting("--max-tokens", key="complete.max_tokens", type=click.IntRange(min=1), help="Tokens generated at most.")
@_setting("--temp", key="complete.temp", type=click.FloatRange(min=0), help="Sampling temperature (0: greedy).")
@_setting("--top-p", key="complete.top_p", type=click.FloatRange(min=0, max=1), help="Nucleus sampling (1: off).")
@_session_options
@click.option("--json", "as_json", is_flag=True, help="Print the completion and its prompt's make-up as JSON.")
@_config_option
def complete_cmd(run_dir, file, line, at, repo, base, as_json, config_file, **settings):
    """Continue a file of the run's repository at a point (--line N writes line N; --at a byte offset; the
    end of the file by default) with the prompt training used: the repo header, the file's dependencies in
    dependency order within the trained length, the file's text before the point (fill-in-the-middle with
    the text after it when the tokenizer has FIM tokens). Prints the completion."""
    import json

    from mlx_ltc.use.complete import Session, position

    sampling = _config(config_file).complete
    session = Session(run_dir, repo, base=base, log=lambda m: click.echo(m, err=True))
    path = session.path_of(file)
    point = position(session.prompter.corpus.texts[path], line, at)
    done = session.complete(path, point, sampling.max_tokens, sampling.temp, sampling.top_p)
    click.echo(json.dumps(done.to_json(), indent=1) if as_json else done.text)


@cli.command("serve", short_help="Serve a run's model to editors over HTTP (OpenAI and llama.cpp APIs).")
@click.argument("run_dir", type=click.Path(path_type=Path))
@_setting("--host", key="serve.host", help="Address to listen on (0.0.0.0: every interface).")
@_setting("--port", key="serve.port", type=click.IntRange(min=0, max=65535), help="Port (0: any free one).")
@_setting(
    "--context",
    key="serve.context",
    type=click.IntRange(min=1),
    help="Tokens of prompt and completion [default: the length the run trained at].",
)
@_setting("--max-tokens", key="serve.max_tokens", type=click.IntRange(min=1), help="A request's default max_tokens.")
@_session_options
@_config_option
def serve_cmd(run_dir, repo, base, config_file, **settings):
    """Serve the run's model until Ctrl-C or SIGTERM: POST /v1/completions (OpenAI; `suffix` for
    fill-in-the-middle), POST /infill (llama.cpp, for llama.vim and llama.vscode), GET /v1/models and
    /health. A request that names its file (`path` or `filename`), or whose text is one of the
    repository's files, gets that file's dependencies from the repository's import graph in front of its
    text, as in training. One request runs at a time; the next reuses the KV cache of what its prompt
    shares with the last one."""
    from mlx_ltc.use.serve import serve

    serve(run_dir, repo, base, _config(config_file).serve, log=lambda m: click.echo(m, err=True))


@cli.command("export", short_help="Fuse a run's adapters into a standalone model (and a GGUF).")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="A new directory for the fused model.")
@click.option("--gguf", is_flag=True, help="Also write a float16 GGUF (llama-family models: the embedded one).")
@click.option("--dequantize", is_flag=True, help="Save the fused weights unquantized (--gguf implies it).")
def export_cmd(run_dir, out, gguf, dequantize):
    """Fuse the run's adapters into its base model with mlx-lm's fuse: a model directory that mlx_lm.generate,
    mlx_lm.server and LM Studio load, and with --gguf a GGUF file that llama.cpp and Ollama load."""
    from mlx_ltc.use.export import export

    written = export(run_dir, out, gguf, dequantize, log=lambda m: click.echo(m, err=True))
    click.echo(f"written: {out} ({', '.join(written)})")


@cli.command("compare", short_help="Check MLX against the PyTorch reference, step by step.")
@_setting("--model", key="compare.model", help="Model to check (as for train).")
@_setting("--steps", key="compare.steps", type=click.IntRange(min=1), help="Optimizer steps on both sides.")
@_setting("--seq-len", key="compare.seq_len", type=click.IntRange(min=1), help="Tokens per sequence.")
@_setting("--batch-size", key="compare.batch_size", type=click.IntRange(min=1), help="Sequences per step.")
@_setting(
    "--source",
    key="compare.source",
    type=click.Path(exists=True, file_okay=False),
    help="Directory of Python files to make the batches from [default: mlx_ltc's own source].",
)
@_setting(
    "--reference-dtype",
    key="compare.reference_dtype",
    type=click.Choice(["float32", "float64"]),
    help="Precision of the torch side (float64 tells MLX's own rounding apart).",
)
@_config_option
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None, help="Also write the results here.")
@_memory_options
def compare_cmd(config_file, json_out, **settings):
    """Check MLX against the torch reference: forward, loss, LoRA gradients and N optimizer steps.

    Exits non-zero when any quantity is outside its tolerance (mlx_ltc/reference/__init__.py).
    """
    from mlx_ltc import atomic, models
    from mlx_ltc.reference import compare

    cfg = _config(config_file, _memory_overrides())
    c = cfg.compare
    if c.source is not None and not Path(c.source).is_dir():
        raise UserError(f"compare.source {c.source}: not a directory")
    result = compare.run(
        c.model, c.steps, c.seq_len, c.batch_size, c.source and Path(c.source), models.default_cache_dir(),
        cfg.memory, c.reference_dtype, log=lambda line: click.echo(line, err=True),
    )  # fmt: skip
    click.echo(result.table(), nl=False)
    if json_out:
        atomic.write_json(json_out, result.to_dict())
    if not result.ok:
        raise SystemExit(1)


def _int_list(ctx, param, value):
    if value is None:
        return None
    try:
        out = [int(x.replace("_", "")) for x in value.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None
    if any(x < 1 for x in out):
        raise click.BadParameter("every value must be positive")
    return out


def _words(ctx, param, value):
    return None if value is None else [w.strip() for w in value.split(",") if w.strip()]


@cli.command("eval", short_help="Evaluate a run: perplexity, streaming, completion.")
@click.argument("run_dir", type=click.Path(path_type=Path), required=False)
@_setting(
    "--base", key="evaluate.base", is_flag=True, help="Also evaluate the base model, side by side (doubles the time)."
)
@_setting(
    "--lengths",
    key="evaluate.lengths",
    callback=_int_list,
    help="Evaluation lengths [default: 512 ... 2 x the trained length].",
)
@_setting(
    "--context-tokens",
    key="evaluate.context_tokens",
    type=click.IntRange(min=1),
    help="Test-split tokens scored at every evaluation length.",
)
@_setting(
    "--windows",
    key="evaluate.windows",
    callback=_int_list,
    help="Streaming KV windows [default: 1/2, 1, 2 x trained length].",
)
@_setting(
    "--stream-tokens",
    key="evaluate.stream_tokens",
    type=click.IntRange(min=0),
    help="Tokens in the streaming evaluation (0: the whole source).",
)
@_setting(
    "--stream-corpus",
    key="evaluate.stream_corpus",
    type=click.Path(),
    help="Stream this directory's source files [default: the test split].",
)
@_setting("--chunk", key="evaluate.chunk", type=click.IntRange(min=1), help="Streaming prefill chunk.")
@_setting(
    "--qa-split", key="evaluate.qa_split", type=click.Choice(["test", "val"]), help="Split whose QA probes are asked."
)
@_setting(
    "--splits",
    key="evaluate.splits",
    type=click.Choice(["val,test", "test", "val"]),
    callback=_words,
    help="Splits to measure perplexity on.",
)
@click.option("--compare", nargs=2, type=click.Path(path_type=Path), default=None, metavar="RUN_A RUN_B",
              help="Put two evaluated runs side by side instead.")  # fmt: skip
@_setting(
    "--forgetting-tokens",
    key="evaluate.forgetting_tokens",
    type=click.IntRange(min=0),
    help="Standard-library tokens scored: what the fine-tune costs outside the repo (0: none).",
)
@click.option(
    "--completion", is_flag=True, help="Run the repo code-completion benchmark (instead of the measurements above)."
)
@_setting(
    "--completion-targets",
    key="evaluate.completion.targets",
    type=click.IntRange(min=2),
    help="Held-out lines to complete: half cross-file lines, half random lines.",
)
@_setting(
    "--completion-lengths",
    key="evaluate.completion.budgets",
    callback=_int_list,
    help="Prompt budgets in tokens [default: 512 and the trained length].",
)
@_setting(
    "--completion-modes",
    key="evaluate.completion.modes",
    callback=_words,
    help="in_file,cross_file[,fim] [default: in_file,cross_file, and fim with FIM tokens].",
)
@_config_option
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None, help="Also write the results here.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def eval_cmd(run_dir, compare, completion, config_file, json_out, quiet, **settings):
    """Evaluate a finished run: perplexity (held-out files and commit chains), loss vs position, repo QA,
    streaming, the forgetting check; or, with --completion, the repo code-completion benchmark. Each is
    kept in report.json["eval"], report.md and plots/."""
    from mlx_ltc import atomic
    from mlx_ltc.eval import report
    from mlx_ltc.eval.run import EvalOptions, run_eval

    cfg = _config(config_file)
    if compare:
        if run_dir is not None:
            raise UserError("--compare takes two run directories; drop RUN_DIR")
        text, rows = report.compare(*compare)
        click.echo(text, nl=False)
        if json_out:
            atomic.write_json(json_out, {"a": str(compare[0]), "b": str(compare[1]), "rows": rows})
        return
    if run_dir is None:
        raise UserError("give a run directory (mlx-ltc eval RUN_DIR) or --compare RUN_A RUN_B")
    results = run_eval(run_dir, EvalOptions.of(cfg.evaluate, benchmark=completion, progress=not quiet))
    if json_out:
        atomic.write_json(json_out, results)
    click.echo(f'written: {Path(run_dir) / "report.md"}, report.json ("eval"), plots/')


@cli.group("bk", short_help="[research] The BK-core model, trained from scratch.")
def bk_group():
    """[research] The BK-core language model (a causal Birman-Schwinger Green's function mixer), trained
    from scratch."""


def _seq_lens(ctx, param, text):
    if text is None:
        return None
    try:
        lengths = [int(x.strip().replace("_", "")) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--seq-lens: expected comma-separated integers, got {text!r}") from None
    if not lengths or any(n < 2 for n in lengths) or lengths != sorted(set(lengths)):
        raise UserError(f"--seq-lens: expected increasing lengths of at least 2 tokens, got {text!r}")
    return lengths


@bk_group.command("train", short_help="Train the BK model on growing lengths.")
@_setting("--seq-lens", key="bk.train.seq_lens", callback=_seq_lens, help="The curriculum's lengths, shortest first.")
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    required=True,
    help="Run directory (continued when it holds an unfinished run with the same settings).",
)
@_setting(
    "--repo",
    key="bk.corpus.root",
    type=click.Path(),
    help="Train on this repository's files (another name for --corpus) [default: see --corpus].",
)
@_setting(
    "--corpus",
    key="bk.corpus.root",
    type=click.Path(),
    help="Train on this directory's source files [default: this Python's standard library].",
)
@_setting("--steps-per-length", key="bk.train.steps_per_length", type=int, help="Optimizer updates per length.")
@_setting(
    "--tokens-per-step",
    key="bk.train.tokens_per_step",
    type=int,
    help="Tokens per update: batch = max(1, this // length).",
)
@_setting("--d-model", key="bk.model.d_model", type=int, help="Width of the model.")
@_setting("--layers", key="bk.model.n_layers", type=int, help="BK blocks.")
@_setting("--channels", key="bk.model.channels", type=int, help="BK channels per layer [default: d-model].")
@_setting("--experts", key="bk.model.n_experts", type=int, help="Experts in each block's MoE.")
@_setting("--top-k", key="bk.model.top_k", type=int, help="Experts per token (learned router).")
@_setting("--expert-hidden", key="bk.model.expert_hidden", type=int, help="Hidden width of each expert.")
@_setting(
    "--router",
    key="bk.model.router",
    type=click.Choice(["learned", "scattering"]),
    help="learned: a linear router; scattering: parameter-free, top-1 by the phase of the Green's function.",
)
@_setting("--lr", key="bk.train.lr", type=float, help="Peak learning rate of each length.")
@_setting("--warmup-steps", key="bk.train.warmup_steps", type=int, help="Warmup updates of each length.")
@_setting("--weight-decay", key="bk.train.weight_decay", type=float, help="AdamW weight decay.")
@_setting("--max-grad-norm", key="bk.train.max_grad_norm", type=float, help="Clip gradients to this norm.")
@_setting("--val-share", key="bk.corpus.val_share", type=float, help="Share of files held out for val.")
@_setting("--val-tokens", key="bk.train.val_tokens", type=int, help="Val tokens scored at each length.")
@_setting(
    "--max-tokens", key="bk.corpus.max_tokens", type=int, help="Tokenize files until this many tokens [default: all]."
)
@_setting(
    "--grad-checkpoint",
    key="bk.train.grad_checkpoint",
    is_flag=True,
    help="Recompute each block in the backward (less memory).",
)
@_setting(
    "--train-chunk",
    key="bk.train.train_chunk",
    type=int,
    help="Longer sequences train a chunk at a time through the carried state: memory independent of "
    "length (0: whole sequences).",
)
@_setting("--seed", key="bk.train.seed", type=int, help="Seeds the initialisation and data order.")
@_config_option
@click.option("--overwrite", is_flag=True, help="Replace an existing bk run in --out.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def bk_train_cmd(out, repo, corpus, config_file, overwrite, quiet, **settings):
    """Train the BK model on growing lengths; per-length checkpoints, results.json and summary.txt in OUT."""
    from mlx_ltc.research.bk import data, train

    if repo is not None and corpus is not None:
        raise UserError("give --repo or --corpus, not both")
    bk = _config(config_file).bk
    root = Path(bk.corpus.root) if bk.corpus.root is not None else data.default_corpus()
    if not root.is_dir():
        named = "--repo" if repo else "--corpus" if corpus else "bk.corpus.root"
        raise UserError(f"{named} {root}: " + ("not a directory" if root.exists() else "no such directory"))
    results = train.train(bk.model, bk.train, bk.corpus, out, overwrite=overwrite, progress=not quiet)
    click.echo(results["table"] + f"written: {Path(out) / 'results.json'}, {Path(out) / 'summary.txt'}")


@bk_group.command("eval", short_help="Stream tokens through a bk checkpoint.")
@click.argument("run_dir", type=click.Path(path_type=Path))
@_setting(
    "--stream-tokens",
    key="bk.eval.stream_tokens",
    type=click.IntRange(min=0),
    help="Tokens to stream (0: the whole source).",
)
@_setting(
    "--corpus",
    key="bk.eval.corpus",
    type=click.Path(),
    help="Stream this directory's source files [default: the run's val slice].",
)
@_setting("--chunk", key="bk.eval.chunk", type=click.IntRange(min=1), help="Tokens per forward.")
@_setting(
    "--length",
    key="bk.eval.seq_len",
    type=int,
    help="Evaluate the checkpoint of this training length [default: the longest finished].",
)
@_config_option
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None, help="Also write the results here.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def bk_eval_cmd(run_dir, config_file, json_out, quiet, **settings):
    """Stream tokens through a bk run's checkpoint with its exact carried state: NLL, memory and speed at
    1K, 4K, 16K, ... tokens."""
    from mlx_ltc import atomic
    from mlx_ltc.research.bk import evaluate

    log = lambda line: click.echo(line, err=True)
    result = evaluate.evaluate_run(run_dir, _config(config_file).bk.eval, progress=not quiet, log=log)
    if json_out:
        atomic.write_json(json_out, result)
    click.echo(evaluate.table(result), nl=False)


@cli.group("mc", short_help="[research] MegaContext: learned gists for the frozen base.")
def mc_group():
    """[research] MegaContext: learned gists and focus for the frozen embedded model, measured against
    truncation."""


@mc_group.command("train", short_help="Train the gist encoder, LensNet and a LoRA in cycles.")
@click.option("--repo", type=click.Path(path_type=Path), required=True, help="Repository (its train split trains).")
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    required=True,
    help="Run directory (continued when it holds an unfinished run with the same settings).",
)
@_setting(
    "--max-steps",
    key="mc.train.max_steps",
    type=click.IntRange(min=1),
    help="Updates per phase per cycle (each encoder, LensNet, LoRA).",
)
@_setting("--cycles", key="mc.train.cycles", type=click.IntRange(min=1), help="Encoder -> LensNet -> LoRA.")
@_setting(
    "--lens-contexts",
    key="mc.train.lens_contexts",
    type=click.IntRange(min=1),
    help="Contexts given counterfactual labels per cycle.",
)
@_setting(
    "--budget",
    key="mc.train.budget",
    type=click.IntRange(min=64),
    help="Working-context budget (positions) while training LensNet and LoRA.",
)
@_setting("--horizon", key="mc.train.horizon", type=click.IntRange(min=2), help="Tokens scored per sample.")
@_setting(
    "--contrast",
    key="mc.train.contrast",
    type=click.FloatRange(min=0),
    help="Weight of the own-vs-other-gists hinge, both encoders (0: none).",
)
@_setting(
    "--l2-steps",
    key="mc.train.l2_steps",
    type=click.IntRange(min=0),
    help="GistNet updates at level 2 per cycle (0: an L2 gist is its last L1 gist).",
)
@_setting(
    "--encoder",
    key="mc.train.encoder",
    type=click.Choice(["base-lora", "gistnet", "both"]),
    help="Who writes the gists: the base with a LoRA of its own (autoencoding + continuation), the small "
    "GistNet, or both (the later phases use base-lora's).",
)
@_setting(
    "--autoencode-steps",
    key="mc.train.autoencode_steps",
    type=click.IntRange(min=0),
    help="base-lora: the first updates of the encoder phase train autoencoding alone.",
)
@_setting(
    "--reading-lora/--no-reading-lora",
    key="mc.train.reading_lora",
    help="base-lora: train the decoder's LoRA together with the encoder (else only in the LoRA phase).",
)
@_setting("--split", key="mc.train.split", help="train/val/test shares (the dataset builder's).")
@_setting("--seed", key="mc.train.seed", type=int, help="Seeds the initialisation and data order.")
@_config_option
@click.option("--overwrite", is_flag=True, help="Replace an existing run in --out.")
@click.option("--quiet", is_flag=True, help="Phase summaries only.")
def mc_train_cmd(repo, out, config_file, overwrite, quiet, **settings):
    """Alternate the gist encoder, LensNet and a tiny LoRA on the base; a checkpoint per phase, telemetry per cycle."""
    from mlx_ltc.research.megacontext import run as mc

    opts = _config(config_file).mc.train
    state = mc.train_run(
        repo, out, opts, overwrite=overwrite, progress=not quiet, log=lambda m: click.echo(m, err=True)
    )
    click.echo(f"trained: {', '.join(state['done'])}; written: {Path(out) / 'state.json'}")


@mc_group.command("eval", short_help="Truncation vs gists vs focus vs full context.")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option(
    "--json",
    "json_out",
    type=click.Path(path_type=Path),
    required=True,
    help="Rows {budget, condition, nll, ci_low, ci_high} go here.",
)
@_setting(
    "--budgets", key="mc.eval.budgets", callback=_int_list, help="Working-context budgets (positions) to evaluate."
)
@_setting("--horizon", key="mc.eval.horizon", type=click.IntRange(min=2), help="Scored tokens per file.")
@_setting("--min-tokens", key="mc.eval.min_tokens", type=int, help="Shortest held-out file scored.")
@_setting("--max-tokens", key="mc.eval.max_tokens", type=int, help="Longest held-out file scored.")
@_setting("--max-files", key="mc.eval.max_files", type=int, help="Score at most this many files [default: all].")
@_setting(
    "--base",
    key="mc.eval.base",
    is_flag=True,
    help="Leave the decoder's trained (reading) LoRA out: every condition read by the frozen base (a base-lora "
    "encoder keeps its own LoRA).",
)
@_config_option
@click.option("--quiet", is_flag=True, help="No progress bar.")
def mc_eval_cmd(run_dir, json_out, config_file, quiet, **settings):
    """NLL of held-out files' ends: truncation vs gists vs LensNet focus vs full context, with bootstrap CIs."""
    from mlx_ltc import atomic
    from mlx_ltc.research.megacontext import run as mc

    opts = _config(config_file).mc.eval
    result = mc.evaluate_run(run_dir, opts, progress=not quiet, log=lambda m: click.echo(m, err=True))
    report = Path(run_dir) / ("eval-base.json" if opts.base else "eval.json")
    atomic.write_json(report, result)
    atomic.write_json(json_out, result["rows"] + result["identifier_rows"])
    click.echo(mc.table(result) + f"written: {json_out}, {report}")


def main():
    from mlx_ltc import hardware

    # transformers is only our tokenizer library here; its advice (e.g. "PyTorch was not found") is noise
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    missing = hardware.missing_mlx_backend()
    if missing:
        click.echo(f"Error: {missing}", err=True)
        sys.exit(1)
    warning = hardware.ensure_fast_blas()
    if (
        warning
        and len(sys.argv) > 1
        and sys.argv[1] in ("train", "profile", "compare", "eval", "complete", "export", "bk", "mc")
    ):
        click.echo(f"warning: {warning}", err=True)
    cli(prog_name="mlx-ltc")
