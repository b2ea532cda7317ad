"""`mlx-ltc export RUN --out DIR [--gguf]`: the run's adapters fused into a standalone model directory
(mlx-lm's fuse: `mlx_lm.generate`, `mlx_lm.server` and LM Studio load it), and, for the architectures
mlx-lm converts (llama, mistral, mixtral), a float16 GGUF for llama.cpp and
Ollama. mlx-lm's GGUF writer records a SentencePiece tokenizer, so a model with a byte-level BPE
tokenizer (the embedded SmolLM2) is refused rather than written with a tokenizer llama.cpp would
misread. The directory appears only when complete."""

import contextlib
import io
import json
import sys
from pathlib import Path

from mlx_ltc import atomic, config, models
from mlx_ltc.errors import UserError
from mlx_ltc.eval.run import check_run

GGUF_TYPES = ("llama", "mistral", "mixtral")  # what mlx_lm.gguf.convert_to_gguf converts
GGUF_NAME = "model-f16.gguf"


def export(run_dir: Path, out: Path, gguf: bool = False, dequantize: bool = False, log=None) -> list:
    """The files written to `out`; `gguf` implies `dequantize` (GGUF is written in float16)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_lm import utils
    from mlx_lm.gguf import convert_to_gguf

    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    run_dir, out = Path(run_dir), Path(out)
    info = check_run(run_dir)
    cfg = config.build(None, info.config)
    model_dir = info.base_model_dir(cfg, models.default_cache_dir())
    model_type = json.loads((model_dir / "config.json").read_text(encoding="utf-8")).get("model_type")
    if gguf and model_type not in GGUF_TYPES:
        raise UserError(
            f"--gguf: mlx-lm converts {', '.join(GGUF_TYPES)} models to GGUF, not {model_type!r} ({cfg.model.name}); "
            "export without --gguf for the fused mlx-lm directory"
        )
    if gguf and _byte_level(model_dir):
        raise UserError(
            f"--gguf: mlx-lm's GGUF writer records a SentencePiece ('llama') tokenizer, and {cfg.model.name}'s is "
            "byte-level BPE, so llama.cpp would split text wrongly; export without --gguf for the fused mlx-lm "
            "directory"
        )
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} exists and is not empty; choose another directory")
    log(f"export: fusing {run_dir / 'adapters'} into {cfg.model.name}")
    model, tokenizer, model_config = utils.load(
        str(model_dir), adapter_path=str(run_dir / "adapters"), return_config=True
    )
    dequantize = dequantize or gguf
    fused = [(name, m.fuse(dequantize=dequantize)) for name, m in model.named_modules() if hasattr(m, "fuse")]
    model.update_modules(tree_unflatten(fused))
    if dequantize:
        model = utils.dequantize_model(model)
        model_config.pop("quantization", None)
        model_config.pop("quantization_config", None)
    with atomic.replace_dir(out) as tmp:
        utils.save(tmp, str(model_dir), model, tokenizer, model_config, donate_model=False)
        if gguf:
            log(f"export: writing {GGUF_NAME}")
            weights = {k: v.astype(mx.float16) for k, v in tree_flatten(model.parameters())}
            with contextlib.redirect_stdout(io.StringIO()):  # mlx-lm names the temp path; the caller says where
                convert_to_gguf(tmp, weights, model_config, str(tmp / GGUF_NAME))
    return sorted(p.name for p in out.iterdir())


def _byte_level(model_dir: Path) -> bool:
    """Whether the model's tokenizer is GPT-2-style byte-level BPE (SmolLM2's, StarCoder2's)."""
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        return False
    spec = json.loads(path.read_text(encoding="utf-8"))
    parts = [spec.get("pre_tokenizer") or {}, spec.get("decoder") or {}]
    parts += [p for part in list(parts) for p in part.get("pretokenizers", [])]
    return any(part.get("type") == "ByteLevel" for part in parts)
