"""The `mlx-ltc` command line."""

import os
import sys
from pathlib import Path

import click

from mlx_ltc import __version__
from mlx_ltc.errors import Interrupted, UserError


class _Group(click.Group):
    """Turns a UserError from any command into click's one-line error and a non-zero exit."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as e:
            raise click.ClickException(str(e)) from None
        except Interrupted as e:
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


def _memory_flags(no_staged=False, no_chunked_loss=False, no_efficient_attention=False) -> dict:
    return {
        "staged": False if no_staged else None,
        "loss": "full" if no_chunked_loss else None,
        "attention": "stock" if no_efficient_attention else None,
    }


@cli.command("train", short_help="Build the dataset, train LoRA adapters, report before/after.")
@click.option("--repo", type=click.Path(path_type=Path), default=".", show_default=True, help="Repository to train on.")
@click.option(
    "--model",
    default=None,
    help="smollm2-135m (default), tiny-starcoder2, a local mlx-lm/HF directory, or a Hugging Face id.",
)
@click.option(
    "--out", type=click.Path(path_type=Path), default=None, help="Run directory [default: runs/REPO-TIMESTAMP]."
)
@click.option("--max-steps", type=int, default=None, help="Optimizer updates [default: one epoch].")
@click.option("--seq-len", type=int, default=None, help="Tokens per training sequence [default: derived by analyze].")
@click.option(
    "--bits",
    type=int,
    default=None,
    help="Quantize to this many bits when the model is not quantized [default: 4, model.bits].",
)
@click.option("--group-size", type=int, default=None, help="Quantization group size [default: 64, model.group_size].")
@click.option(
    "--config", "config_file", type=click.Path(path_type=Path), default=None, help="YAML config (see configs/)."
)
@click.option("--overwrite", is_flag=True, help="Replace an existing run in --out.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.option(
    "--backend",
    type=click.Choice(["mlx", "torch"]),
    default=None,
    help="mlx (default) or torch: the reference implementation, for small models.",
)
@click.option("--save-every", type=int, default=None, help="Checkpoint every K optimizer steps [default: phase ends].")
@click.option("--report-to", type=click.Choice(["none", "wandb"]), default=None, help="Also log metrics to wandb.")
@click.option(
    "--resume",
    type=click.Path(path_type=Path),
    default=None,
    help="Continue the interrupted run in this directory from its last checkpoint.",
)
@_memory_options
def train_cmd(repo, model, out, max_steps, seq_len, bits, group_size, config_file, overwrite, quiet, backend,
              save_every, report_to, resume, **memory):  # fmt: skip
    """Train LoRA adapters on the repository given by --repo: build its dataset, train, and report the
    base and adapted models side by side (held-out perplexity, completion, the forgetting check).

    Training runs in phases of growing sequence length, steered by the orchestrator; checkpoints make
    it resumable with --resume RUN_DIR (--max-steps then moves the run's end).
    """
    from mlx_ltc import config, run

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
        click.echo(run.summary(report), nl=False)
        return
    flags = {
        "model": {"name": model, "bits": bits, "group_size": group_size},
        "data": {"seq_len": seq_len},
        "train": {"max_steps": max_steps, "backend": backend},
        "memory": _memory_flags(**memory),
        "checkpoint": {"save_every": save_every},
        "orchestrator": {"report_to": report_to},
    }
    overrides = {s: {k: v for k, v in d.items() if v is not None} for s, d in flags.items()}
    cfg, given = config.build_given(config_file, overrides)
    report = run.run_train(
        cfg, repo, out or run.default_out(repo), overwrite=overwrite, progress=not quiet, given=given
    )
    click.echo(run.summary(report), nl=False)


def _data_options(f):
    for opt in reversed(
        [
            click.option("--repo", type=click.Path(path_type=Path), default=".", show_default=True, help="Repository."),
            click.option("--model", default=None, help="Whose tokenizer [default: the config's, smollm2-135m]."),
            click.option(
                "--seq-len", type=int, default=None, help="Tokens per sequence [default: derived by analyze]."
            ),
            click.option("--config", "config_file", type=click.Path(path_type=Path), default=None, help="YAML config."),
            click.option("--quiet", is_flag=True, help="No progress bars."),
        ]
    ):
        f = opt(f)
    return f


def _corpus(repo, model, seq_len, config_file, quiet, extra=None):
    """(cfg, scan, tokenizer, cache_dir, profile) for analyze/build."""
    from mlx_ltc import config, data, models, run

    overrides = {"data": {"seq_len": seq_len, **(extra or {})}}
    if model:
        overrides["model"] = {"name": model}
    overrides = {s: {k: v for k, v in d.items() if v is not None} for s, d in overrides.items()}
    cfg = config.build(config_file, overrides)
    scan = data.scan(repo, cfg.data.max_file_bytes)
    cache_dir = models.default_cache_dir()
    tokenizer = models.load_tokenizer(models.resolve(cfg.model.name, cache_dir, cfg.model.bits, cfg.model.group_size))
    return cfg, scan, tokenizer, cache_dir, run.cached_profile(cfg.model.name, cfg.memory, cache_dir)


@cli.command("analyze", short_help="Inventory, import graph and derived constants of a repo.")
@_data_options
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=Path("analysis.json"), show_default=True,
              help="Where to write the analysis.")  # fmt: skip
def analyze_cmd(repo, model, seq_len, config_file, quiet, json_out):
    """Inventory, import graph and derived training constants of a repository."""
    from mlx_ltc import atomic, data
    from mlx_ltc.data import analyze

    cfg, scan, tokenizer, cache_dir, profile = _corpus(repo, model, seq_len, config_file, quiet)
    log = lambda m: click.echo(m, err=True)  # noqa: E731
    corpus = data.Corpus.cached(scan, tokenizer, cfg.data, cache_dir, log=log, progress=not quiet)
    result = corpus.analysis(profile)
    atomic.write_json(json_out, result)
    click.echo(analyze.table(result) + f"  written: {json_out}", nl=True)


@cli.command("build", short_help="Build the packed train/val/test dataset of a repo.")
@_data_options
@click.option(
    "--out", type=click.Path(path_type=Path), required=True, help="Dataset directory (replaced if a dataset)."
)
@click.option("--split", default=None, help="train/val/test shares [default: 85/10/5].")
@click.option(
    "--fim-rate", type=float, default=None, help="Share of train documents in FIM form (FIM tokenizers) [default: 0.5]."
)
@click.option(
    "--augment", type=float, default=None, help="Share of train files replaced by an augmented variant [default: 0]."
)
@click.option("--no-chains", is_flag=True, help="No commit-evolution chains.")
@click.option("--no-qa", is_flag=True, help="No QA probes.")
def build_cmd(repo, model, seq_len, config_file, quiet, out, split, fim_rate, augment, no_chains, no_qa):
    """Build train/val/test shards of packed repo-level sequences, QA probes and metadata."""
    import json

    from mlx_ltc import run

    extra = {
        "split": split,
        "fim_rate": fim_rate,
        "augment": augment,
        "chains": False if no_chains else None,
        "qa": False if no_qa else None,
    }
    cfg, scan, tokenizer, cache_dir, profile = _corpus(repo, model, seq_len, config_file, quiet, extra)
    meta, _ = run.prepare_data(cfg, scan, tokenizer, out, cache_dir, profile, progress=not quiet)
    keys = ("seq_len", "packing_efficiency", "splits", "documents", "dedup", "chains", "qa", "skipped", "cache")
    click.echo(json.dumps({k: meta[k] for k in keys} | {"out": str(out)}, indent=1))


@cli.command("profile", short_help="Find the longest sequence a training step fits here.")
@click.option("--model", default=None, help="Model to profile [default: the config's, smollm2-135m].")
@click.option("--memory-budget", default=None, help="e.g. 5.3GB (an 8 GB Mac) [default: what this machine allows].")
@click.option("--max-len", type=int, default=None, help="Longest length to try [default: 8192 on CPU, 131072 on GPU].")
@click.option("--granularity", type=int, default=256, show_default=True, help="Bisection stops at this resolution.")
@click.option("--start", type=int, default=256, show_default=True, help="First length tried (then doubled).")
@click.option("--batch-size", type=int, default=1, show_default=True, help="Sequences per step.")
@click.option("--config", "config_file", type=click.Path(path_type=Path), default=None, help="YAML config.")
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None, help="Also write the profile here.")
@click.option("--force", is_flag=True, help="Measure again even when a cached profile matches.")
@_memory_options
def profile_cmd(model, memory_budget, max_len, granularity, start, batch_size, config_file, json_out, force, **memory):
    """Measure this machine and find the longest sequence a real training step fits in the budget."""
    from mlx_ltc import atomic, config, models
    from mlx_ltc.hardware import profile

    if min(granularity, start, batch_size) < 1 or (max_len is not None and max_len < start):
        raise UserError("--granularity, --start and --batch-size must be positive, and --max-len at least --start")
    overrides = {"memory": {k: v for k, v in _memory_flags(**memory).items() if v is not None}}
    if model:
        overrides["model"] = {"name": model}
    cfg = config.build(config_file, overrides)
    budget = profile.parse_size(memory_budget) if memory_budget else None
    log = lambda line: click.echo(line, err=True)
    result = profile.run_profile(
        cfg, budget, models.default_cache_dir(), max_len, granularity, start, batch_size, force, log
    )
    if json_out:
        atomic.write_json(json_out, result)
    click.echo(profile.summary(result), nl=False)


@cli.command("compare", short_help="Check MLX against the PyTorch reference, step by step.")
@click.option("--model", default="tiny-starcoder2", show_default=True, help="Model to check (as for train).")
@click.option("--steps", type=int, default=5, show_default=True, help="Optimizer steps on both sides.")
@click.option("--seq-len", type=int, default=128, show_default=True, help="Tokens per sequence.")
@click.option("--batch-size", type=int, default=2, show_default=True, help="Sequences per step.")
@click.option(
    "--source",
    type=click.Path(path_type=Path, exists=True, file_okay=False),
    default=None,
    help="Directory of Python files to make the batches from [default: mlx_ltc's own source].",
)
@click.option(
    "--reference-dtype",
    type=click.Choice(["float32", "float64"]),
    default="float32",
    show_default=True,
    help="Precision of the torch side (float64 tells MLX's own rounding apart).",
)
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None, help="Also write the results here.")
@_memory_options
def compare_cmd(model, steps, seq_len, batch_size, source, reference_dtype, json_out, **memory):
    """Check MLX against the torch reference: forward, loss, LoRA gradients and N optimizer steps.

    Exits non-zero when any quantity is outside its tolerance (mlx_ltc/reference/__init__.py).
    """
    from mlx_ltc import atomic, config, models
    from mlx_ltc.reference import compare

    overrides = {"memory": {k: v for k, v in _memory_flags(**memory).items() if v is not None}}
    mem = config.build(None, overrides).memory
    result = compare.run(
        model, steps, seq_len, batch_size, source, models.default_cache_dir(), mem, reference_dtype,
        log=lambda line: click.echo(line, err=True),
    )  # fmt: skip
    click.echo(result.table(), nl=False)
    if json_out:
        atomic.write_json(json_out, result.to_dict())
    if not result.ok:
        raise SystemExit(1)


def _int_list(ctx, param, value):
    if not value:
        return []
    try:
        out = [int(x.replace("_", "")) for x in value.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None
    if any(x < 1 for x in out):
        raise click.BadParameter("every value must be positive")
    return out


@cli.command("eval", short_help="Evaluate a run: perplexity, streaming, completion.")
@click.argument("run_dir", type=click.Path(path_type=Path), required=False)
@click.option("--base", is_flag=True, help="Also evaluate the base model, side by side (doubles the time).")
@click.option("--lengths", callback=_int_list, help="Evaluation lengths [default: 512 ... 2 x the trained length].")
@click.option(
    "--context-tokens",
    type=click.IntRange(min=1),
    default=16_384,
    show_default=True,
    help="Test-split tokens scored at every evaluation length.",
)
@click.option("--windows", callback=_int_list, help="Streaming KV windows [default: 1/2, 1, 2 x trained length].")
@click.option(
    "--stream-tokens",
    type=click.IntRange(min=0),
    default=32_768,
    show_default=True,
    help="Tokens in the streaming evaluation (0: the whole source).",
)
@click.option(
    "--stream-corpus",
    type=click.Path(path_type=Path),
    default=None,
    help="Stream this directory's source files instead of the test split.",
)
@click.option("--chunk", type=click.IntRange(min=1), default=512, show_default=True, help="Streaming prefill chunk.")
@click.option(
    "--qa-split",
    type=click.Choice(["test", "val"]),
    default="test",
    show_default=True,
    help="Split whose QA probes are asked.",
)
@click.option(
    "--splits",
    type=click.Choice(["val,test", "test", "val"]),
    default="val,test",
    show_default=True,
    help="Splits to measure perplexity on.",
)
@click.option("--compare", nargs=2, type=click.Path(path_type=Path), default=None, metavar="RUN_A RUN_B",
              help="Put two evaluated runs side by side instead.")  # fmt: skip
@click.option(
    "--forgetting-tokens",
    type=click.IntRange(min=0),
    default=16_384,
    show_default=True,
    help="Standard-library tokens scored: what the fine-tune costs outside the repo (0: none).",
)
@click.option(
    "--completion", is_flag=True, help="Run the repo code-completion benchmark (instead of the measurements above)."
)
@click.option(
    "--completion-targets",
    type=click.IntRange(min=2),
    default=200,
    show_default=True,
    help="Held-out lines to complete: half cross-file lines, half random lines.",
)
@click.option(
    "--completion-lengths", callback=_int_list, help="Prompt budgets in tokens [default: 512 and the trained length]."
)
@click.option(
    "--completion-modes",
    default=None,
    help="in_file,cross_file[,fim] [default: in_file,cross_file, and fim with FIM tokens].",
)
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None, help="Also write the results here.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def eval_cmd(run_dir, base, lengths, context_tokens, windows, stream_tokens, stream_corpus, chunk, qa_split, splits,
             compare, forgetting_tokens, completion, completion_targets, completion_lengths, completion_modes,
             json_out, quiet):  # fmt: skip
    """Evaluate a finished run: perplexity (held-out files and commit chains), loss vs position, repo QA,
    streaming, the forgetting check; or, with --completion, the repo code-completion benchmark. Each is
    kept in report.json["eval"], report.md and plots/."""
    from mlx_ltc import atomic
    from mlx_ltc.eval import report
    from mlx_ltc.eval.completion import CompletionOptions
    from mlx_ltc.eval.run import EvalOptions, run_eval

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
    benchmark = None
    if completion:
        modes = tuple(m.strip() for m in completion_modes.split(",") if m.strip()) if completion_modes else ()
        benchmark = CompletionOptions(targets=completion_targets, budgets=tuple(completion_lengths), modes=modes)
    opts = EvalOptions(base=base, lengths=lengths, context_tokens=context_tokens, windows=windows,
                       stream_tokens=stream_tokens, stream_corpus=stream_corpus, chunk=chunk, qa_split=qa_split,
                       splits=tuple(splits.split(",")), forgetting_tokens=forgetting_tokens, completion=benchmark,
                       progress=not quiet)  # fmt: skip
    results = run_eval(run_dir, opts)
    if json_out:
        atomic.write_json(json_out, results)
    click.echo(f'written: {Path(run_dir) / "report.md"}, report.json ("eval"), plots/')


@cli.group("bk", short_help="[research] The BK-core model, trained from scratch.")
def bk_group():
    """[research] The BK-core language model (a causal Birman-Schwinger Green's function mixer), trained
    from scratch."""


def _lengths(text: str) -> list:
    try:
        lengths = [int(x.strip().replace("_", "")) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--seq-lens: expected comma-separated integers, got {text!r}") from None
    if not lengths or any(n < 2 for n in lengths) or lengths != sorted(set(lengths)):
        raise UserError(f"--seq-lens: expected increasing lengths of at least 2 tokens, got {text!r}")
    return lengths


@bk_group.command("train", short_help="Train the BK model on growing lengths.")
@click.option(
    "--seq-lens",
    default="128,512,2048,8192,32768,131072",
    show_default=True,
    help="The curriculum's lengths, shortest first.",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    required=True,
    help="Run directory (continued when it holds an unfinished run with the same settings).",
)
@click.option("--repo", type=click.Path(path_type=Path), default=None, help="Train on this repository's files.")
@click.option(
    "--corpus",
    type=click.Path(path_type=Path),
    default=None,
    help="Train on this directory's source files [default: this Python's standard library].",
)
@click.option("--steps-per-length", type=int, default=200, show_default=True, help="Optimizer updates per length.")
@click.option(
    "--tokens-per-step",
    type=int,
    default=32768,
    show_default=True,
    help="Tokens per update: batch = max(1, this // length).",
)
@click.option("--d-model", type=int, default=256, show_default=True, help="Width of the model.")
@click.option("--layers", type=int, default=4, show_default=True, help="BK blocks.")
@click.option("--channels", type=int, default=None, help="BK channels per layer [default: d-model].")
@click.option("--experts", type=int, default=4, show_default=True, help="Experts in each block's MoE.")
@click.option("--top-k", type=int, default=2, show_default=True, help="Experts per token (learned router).")
@click.option("--expert-hidden", type=int, default=512, show_default=True, help="Hidden width of each expert.")
@click.option(
    "--router",
    type=click.Choice(["learned", "scattering"]),
    default="learned",
    show_default=True,
    help="learned: a linear router; scattering: parameter-free, top-1 by the phase of the Green's function.",
)
@click.option("--lr", type=float, default=1e-3, show_default=True, help="Peak learning rate of each length.")
@click.option("--warmup-steps", type=int, default=20, show_default=True, help="Warmup updates of each length.")
@click.option("--weight-decay", type=float, default=0.1, show_default=True, help="AdamW weight decay.")
@click.option("--max-grad-norm", type=float, default=1.0, show_default=True, help="Clip gradients to this norm.")
@click.option("--val-share", type=float, default=0.05, show_default=True, help="Share of files held out for val.")
@click.option("--val-tokens", type=int, default=65536, show_default=True, help="Val tokens scored at each length.")
@click.option("--max-tokens", type=int, default=0, help="Tokenize files until this many tokens [default: all].")
@click.option("--grad-checkpoint", is_flag=True, help="Recompute each block in the backward (less memory).")
@click.option(
    "--train-chunk",
    type=int,
    default=8192,
    show_default=True,
    help="Longer sequences train a chunk at a time through the carried state: memory independent of "
    "length (0: whole sequences).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the initialisation and data order.")
@click.option("--overwrite", is_flag=True, help="Replace an existing bk run in --out.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def bk_train_cmd(seq_lens, out, repo, corpus, steps_per_length, tokens_per_step, d_model, layers, channels, experts,
                 top_k, expert_hidden, router, lr, warmup_steps, weight_decay, max_grad_norm, val_share, val_tokens,
                 max_tokens, grad_checkpoint, train_chunk, seed, overwrite, quiet):  # fmt: skip
    """Train the BK model on growing lengths; per-length checkpoints, results.json and summary.txt in OUT."""
    from mlx_ltc.research.bk import data, train

    if repo is not None and corpus is not None:
        raise UserError("give --repo or --corpus, not both")
    root = repo or corpus or data.default_corpus()
    if not root.is_dir():
        raise UserError(
            f"{'--repo' if repo else '--corpus'} {root}: "
            + ("not a directory" if root.exists() else "no such directory")
        )
    if min(d_model, layers, experts, top_k, expert_hidden, channels or 1) < 1 or top_k > experts:
        raise UserError(
            "--d-model, --layers, --experts, --top-k, --expert-hidden and --channels must be positive, "
            "--top-k at most --experts"
        )
    if not 0 < val_share < 1:
        raise UserError(f"--val-share must be between 0 and 1, got {val_share}")
    model = {"d_model": d_model, "n_layers": layers, "channels": channels, "n_experts": experts, "top_k": top_k,
             "expert_hidden": expert_hidden, "router": router}  # fmt: skip
    opts = train.TrainOptions(seq_lens=_lengths(seq_lens), steps_per_length=steps_per_length,
                              tokens_per_step=tokens_per_step, lr=lr, warmup_steps=warmup_steps,
                              weight_decay=weight_decay, max_grad_norm=max_grad_norm, val_tokens=val_tokens,
                              seed=seed, grad_checkpoint=grad_checkpoint, train_chunk=train_chunk)  # fmt: skip
    corpus_opts = train.CorpusOptions(root=str(root.resolve()), val_share=val_share, max_tokens=max_tokens)
    results = train.train(model, opts, corpus_opts, out, overwrite=overwrite, progress=not quiet)
    click.echo(results["table"] + f"written: {Path(out) / 'results.json'}, {Path(out) / 'summary.txt'}")


@bk_group.command("eval", short_help="Stream tokens through a bk checkpoint.")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option(
    "--stream-tokens",
    type=click.IntRange(min=0),
    default=1 << 20,
    show_default=True,
    help="Tokens to stream (0: the whole source).",
)
@click.option(
    "--corpus",
    type=click.Path(path_type=Path),
    default=None,
    help="Stream this directory's source files [default: the run's val slice].",
)
@click.option("--chunk", type=click.IntRange(min=1), default=4096, show_default=True, help="Tokens per forward.")
@click.option(
    "--length",
    "seq_len",
    type=int,
    default=None,
    help="Evaluate the checkpoint of this training length [default: the longest finished].",
)
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None, help="Also write the results here.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def bk_eval_cmd(run_dir, stream_tokens, corpus, chunk, seq_len, json_out, quiet):
    """Stream tokens through a bk run's checkpoint with its exact carried state: NLL, memory and speed at
    1K, 4K, 16K, ... tokens."""
    from mlx_ltc import atomic
    from mlx_ltc.research.bk import evaluate

    log = lambda line: click.echo(line, err=True)
    result = evaluate.evaluate_run(run_dir, stream_tokens, corpus, chunk, seq_len, progress=not quiet, log=log)
    if json_out:
        atomic.write_json(json_out, result)
    click.echo(evaluate.table(result), nl=False)


@cli.group("mc", short_help="[research] MegaContext: learned gists for the frozen base.")
def mc_group():
    """[research] MegaContext: learned gists and focus for the frozen embedded model, measured against
    truncation."""


@mc_group.command("train", short_help="Train GistNet, LensNet and a LoRA in cycles.")
@click.option("--repo", type=click.Path(path_type=Path), required=True, help="Repository (its train split trains).")
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    required=True,
    help="Run directory (continued when it holds an unfinished run with the same settings).",
)
@click.option(
    "--max-steps",
    type=click.IntRange(min=1),
    default=60,
    show_default=True,
    help="Updates per phase per cycle (GistNet, LensNet, LoRA).",
)
@click.option("--cycles", type=click.IntRange(min=1), default=2, show_default=True, help="GistNet -> LensNet -> LoRA.")
@click.option(
    "--lens-contexts",
    type=click.IntRange(min=1),
    default=6,
    show_default=True,
    help="Contexts given counterfactual labels per cycle.",
)
@click.option(
    "--budget",
    type=click.IntRange(min=64),
    default=512,
    show_default=True,
    help="Working-context budget (positions) while training LensNet and LoRA.",
)
@click.option("--horizon", type=click.IntRange(min=2), default=64, show_default=True, help="Tokens scored per sample.")
@click.option(
    "--contrast",
    type=click.FloatRange(min=0),
    default=1.0,
    show_default=True,
    help="Weight of GistNet's own-vs-other-gists hinge (0: KL + NLL only).",
)
@click.option(
    "--l2-steps",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="GistNet updates at level 2 per cycle (0: an L2 gist is its last L1 gist).",
)
@click.option("--split", default="85/10/5", show_default=True, help="train/val/test shares (the dataset builder's).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the initialisation and data order.")
@click.option("--overwrite", is_flag=True, help="Replace an existing run in --out.")
@click.option("--quiet", is_flag=True, help="Phase summaries only.")
def mc_train_cmd(
    repo, out, max_steps, cycles, lens_contexts, budget, horizon, contrast, l2_steps, split, seed, overwrite, quiet
):
    """Alternate GistNet, LensNet and a tiny LoRA on the base; a checkpoint per phase, telemetry per cycle."""
    from mlx_ltc.research.megacontext import run as mc

    opts = mc.McOptions(cycles=cycles, max_steps=max_steps, lens_contexts=lens_contexts, budget=budget,
                        horizon=horizon, contrast=contrast, l2_steps=l2_steps, split=split, seed=seed)  # fmt: skip
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
@click.option(
    "--budgets",
    callback=_int_list,
    default="256,512,1024",
    show_default=True,
    help="Working-context budgets (positions) to evaluate.",
)
@click.option("--horizon", type=click.IntRange(min=2), default=128, show_default=True, help="Scored tokens per file.")
@click.option("--min-tokens", type=int, default=3000, show_default=True, help="Shortest held-out file scored.")
@click.option("--max-tokens", type=int, default=6000, show_default=True, help="Longest held-out file scored.")
@click.option("--max-files", type=int, default=0, help="Score at most this many files [default: all].")
@click.option("--base", is_flag=True, help="Leave the trained LoRA out: every condition on the frozen base.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def mc_eval_cmd(run_dir, json_out, budgets, horizon, min_tokens, max_tokens, max_files, base, quiet):
    """NLL of held-out files' ends: truncation vs gists vs LensNet focus vs full context, with bootstrap CIs."""
    from mlx_ltc import atomic
    from mlx_ltc.research.megacontext import run as mc

    result = mc.evaluate_run(run_dir, budgets, horizon, min_tokens, max_tokens, max_files, base_only=base,
                             progress=not quiet, log=lambda m: click.echo(m, err=True))  # fmt: skip
    report = Path(run_dir) / ("eval-base.json" if base else "eval.json")
    atomic.write_json(report, result)
    atomic.write_json(json_out, result["rows"] + result["identifier_rows"])
    click.echo(mc.table(result) + f"written: {json_out}, {report}")


def main():
    from mlx_ltc import hardware

    # transformers is only our tokenizer library here; its advice (e.g. "PyTorch was not found") is noise
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warning = hardware.ensure_fast_blas()
    if warning and len(sys.argv) > 1 and sys.argv[1] in ("train", "profile", "compare", "eval", "bk", "mc"):
        click.echo(f"warning: {warning}", err=True)
    cli(prog_name="mlx-ltc")
