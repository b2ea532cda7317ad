"""Models: resolve `--model` to an mlx-lm model directory holding a quantized model, and load it.

Every model we train is quantized (4-bit by default) and lives in a directory that mlx-lm's own
loader opens, so our adapters work with `mlx_lm.generate`/`mlx_lm.fuse` on that same directory.
"""

import json
import os
import sys
from contextlib import redirect_stdout
from dataclasses import dataclass
from pathlib import Path

from mlx_ltc.atomic import atomic_dir
from mlx_ltc.errors import UserError
from mlx_ltc.models import embedded, faithful, tiny

BUILTIN = (embedded.NAME, tiny.NAME)


def default_cache_dir() -> Path:
    if os.environ.get("MLX_LTC_CACHE"):
        return Path(os.environ["MLX_LTC_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mlx-ltc"


@dataclass
class LoadedModel:
    model: object  # mlx.nn.Module (mlx-lm model)
    tokenizer: object  # transformers tokenizer
    model_dir: Path
    config: dict
    dequantized: bool
    dtype: str
    fixes: list  # what `faithful` changed so the model computes what its config says


def resolve(name: str, cache_dir: Path, bits: int = 4, group_size: int = 64) -> Path:
    """Return a local mlx-lm directory with a quantized model for `name`."""
    if name == embedded.NAME:
        return embedded.materialise(cache_dir)
    if name == tiny.NAME:
        source = tiny.materialise(cache_dir, embedded.materialise(cache_dir))
    else:
        source = _local_or_hub(name)
    config = _read_config(source)
    if "quantization" in config:
        return source
    return _quantize(source, cache_dir, bits, group_size)


def _local_or_hub(name: str) -> Path:
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise UserError(f"model directory {path} has no config.json")
        return path
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise UserError(
            f"model {name!r} not found: not a directory, not a Hugging Face id, "
            f"and not a built-in model ({', '.join(BUILTIN)})"
        )
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(
                name, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
            )
        )
    except Exception as e:  # network, auth or missing repo: all mean "can't get this model"
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"model {name!r} not found locally and could not be fetched from the Hugging Face Hub: {reason}"
        ) from None


def _read_config(path: Path) -> dict:
    try:
        return json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"model {path}: unreadable config.json ({e})") from None


def _quantize(source: Path, cache_dir: Path, bits: int, group_size: int) -> Path:
    """Quantize with mlx-lm's converter into the cache (once per source, bits and group size)."""
    slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(source.resolve()).strip("/"))[-80:]
    out = Path(cache_dir) / "models" / "quantized" / f"{slug}-q{bits}g{group_size}"
    if (out / "config.json").is_file():
        return out
    from mlx_lm.convert import convert

    with atomic_dir(out) as tmp, redirect_stdout(sys.stderr):
        convert(str(source), str(tmp / "m"), quantize=True, q_bits=bits, q_group_size=group_size)
        for f in (tmp / "m").iterdir():
            f.rename(tmp / f.name)
        (tmp / "m").rmdir()
    return out


def load(model_dir: Path, dequantize: str = "auto") -> LoadedModel:
    """Load with mlx-lm. On the CPU backend 4-bit matmuls are slow, so by default the weights are
    dequantized to float32 there: the same numbers the 4-bit model represents, computed fast."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_map
    from mlx_lm.utils import dequantize_model, load_model
    from transformers import AutoTokenizer

    from mlx_ltc import hardware

    try:
        model, config = load_model(Path(model_dir))
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError, KeyError, RuntimeError) as e:  # missing/corrupt files, bad config
        raise UserError(
            f"cannot load model from {model_dir}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from None
    fixes = faithful.apply(model, config)
    do_dequantize = dequantize == "always" or (dequantize == "auto" and hardware.on_cpu())
    if do_dequantize:  # scales to fp32 first: bf16 scales would otherwise round every weight to bf16
        to_fp32 = lambda p: p.astype(mx.float32) if mx.issubdtype(p.dtype, mx.floating) else p  # noqa: E731
        model.update(tree_map(to_fp32, model.parameters()))
        model = dequantize_model(model)
        model.update(tree_map(to_fp32, model.parameters()))
    dtypes = {p.dtype for _, p in tree_flatten(model.parameters()) if mx.issubdtype(p.dtype, mx.floating)}
    model.freeze()
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        model_dir=Path(model_dir),
        config=config,
        dequantized=do_dequantize,
        dtype=",".join(sorted(str(d).split(".")[-1] for d in dtypes)),
        fixes=fixes,
    )


def load_tokenizer(model_dir: Path):
    """The model's tokenizer alone (no weights), for the data stages."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError, KeyError) as e:
        raise UserError(
            f"cannot load the tokenizer from {model_dir}: {str(e).splitlines()[0] if str(e) else e}"
        ) from None
