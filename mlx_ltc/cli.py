"""The `mlx-ltc` command line."""

import os
import sys
from pathlib import Path

import click

from mlx_ltc import __version__
from mlx_ltc.errors import UserError


class _Group(click.Group):
    """Turns a UserError from any command into click's one-line error and a non-zero exit."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as e:
            raise click.ClickException(str(e)) from None
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)


@click.group(cls=_Group)
@click.version_option(__version__, prog_name="mlx-ltc")
def cli():
    """Fine-tune a code model on your repository with long context, on the machine you own."""


@cli.command("train")
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
@click.option("--seq-len", type=int, default=None, help="Tokens per training window.")
@click.option("--bits", type=int, default=None, help="Quantize to this many bits when the model is not quantized.")
@click.option("--group-size", type=int, default=None, help="Quantization group size.")
@click.option(
    "--config", "config_file", type=click.Path(path_type=Path), default=None, help="YAML config (see configs/)."
)
@click.option("--overwrite", is_flag=True, help="Replace an existing run in --out.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def train_cmd(repo, model, out, max_steps, seq_len, bits, group_size, config_file, overwrite, quiet):
    """Build a dataset from REPO, train LoRA adapters, report validation perplexity before/after."""
    from mlx_ltc import config, run

    flags = {
        "model": {"name": model, "bits": bits, "group_size": group_size},
        "data": {"seq_len": seq_len},
        "train": {"max_steps": max_steps},
    }
    overrides = {s: {k: v for k, v in d.items() if v is not None} for s, d in flags.items()}
    cfg = config.build(config_file, overrides)
    report = run.run_train(cfg, repo, out or run.default_out(repo), overwrite=overwrite, progress=not quiet)
    click.echo(run.summary(report), nl=False)


def main():
    from mlx_ltc import hardware

    # transformers is only our tokenizer library here; its advice (e.g. "PyTorch was not found") is noise
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warning = hardware.ensure_fast_blas()
    if warning and len(sys.argv) > 1 and sys.argv[1] == "train":
        click.echo(f"warning: {warning}", err=True)
    cli(prog_name="mlx-ltc")
