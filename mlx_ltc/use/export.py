"""`mlx-ltc export RUN --out DIR [--gguf]`: the run's adapters fused into a standalone model directory
(mlx-lm's fuse: `mlx_lm.generate`, `mlx_lm.server` and LM Studio load it), and, for the architectures
mlx-lm converts (llama, mistral, mixtral), a float16 GGUF for llama.cpp and Ollama.

mlx-lm's GGUF writer converts the weights and hyperparameters but records every tokenizer as
SentencePiece ('llama'). That is right for SentencePiece models; for a byte-level BPE tokenizer (the
embedded SmolLM2's) we replace its record with llama.cpp's 'gpt2' one, built from the model's own
tokenizer files the way llama.cpp's convert_hf_to_gguf builds it. Other tokenizers are refused. The
directory appears only when complete."""

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
SENTENCEPIECE, BYTE_LEVEL_BPE = "SentencePiece", "byte-level BPE"
# llama.cpp's names (tokenizer.ggml.pre) for the HF pre-tokenizer chains it reproduces, steps named by _step_rule
PRE_TOKENIZERS = {
    ("gpt-2 regex",): "gpt-2",
    ("single digits", "gpt-2 regex"): "smollm",  # SmolLM's and StarCoder's: llama.cpp splits both alike
}
DEFAULT_PRE_TOKENIZER = "default"  # llama.cpp's own fallback, which it uses when the key is missing


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
    tokenizer_kind = tokenizer_kind_of(model_dir) if gguf else None
    if gguf and tokenizer_kind is None:
        raise UserError(
            f"--gguf: {cfg.model.name}'s tokenizer is neither {SENTENCEPIECE} nor {BYTE_LEVEL_BPE}, the two this "
            "GGUF export records; export without --gguf for the fused mlx-lm directory"
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
            log(f"export: writing {GGUF_NAME} ({tokenizer_kind} tokenizer)")
            weights = {k: v.astype(mx.float16) for k, v in tree_flatten(model.parameters())}
            mlx_lm_gguf = tmp / GGUF_NAME if tokenizer_kind == SENTENCEPIECE else tmp / "mlx-lm-draft.gguf"
            with contextlib.redirect_stdout(io.StringIO()):  # mlx-lm names the temp path; the caller says where
                convert_to_gguf(tmp, weights, model_config, str(mlx_lm_gguf))
            if tokenizer_kind == BYTE_LEVEL_BPE:
                _rewrite_with_bpe_tokenizer(mlx_lm_gguf, tmp / GGUF_NAME, tmp, model_config.get("vocab_size"), log)
    return sorted(p.name for p in out.iterdir())


def tokenizer_kind_of(model_dir: Path) -> str | None:
    """SENTENCEPIECE, BYTE_LEVEL_BPE (GPT-2 style: SmolLM2's, StarCoder2's) or None for any other tokenizer."""
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        return SENTENCEPIECE if (Path(model_dir) / "tokenizer.model").is_file() else None
    spec = json.loads(path.read_text(encoding="utf-8"))
    model = spec.get("model") or {}
    steps = {step.get("type") for step in _steps(spec)}
    if (model.get("type") == "BPE" and model.get("byte_fallback")) or "Metaspace" in steps:
        return SENTENCEPIECE  # llama's and mistral's, as HF writes them
    if model.get("type") == "BPE" and "ByteLevel" in steps:
        return BYTE_LEVEL_BPE
    return None


def bpe_tokenizer_metadata(tokenizer_dir: Path, vocab_size: int | None = None, log=None) -> dict:
    """llama.cpp's record ('gpt2') of the byte-level BPE tokenizer in `tokenizer_dir`, as mlx.core.save_gguf
    metadata: tokens in id order padded to the embedding's `vocab_size`, their types, merges, special ids."""
    import gguf
    import mlx.core as mx

    keys = gguf.Keys.Tokenizer
    spec = json.loads((Path(tokenizer_dir) / "tokenizer.json").read_text(encoding="utf-8"))
    tokens, types = _tokens_and_types(spec, vocab_size)
    special = gguf.SpecialVocab(tokenizer_dir, load_merges=True, n_vocab=len(tokens))
    meta = {
        keys.MODEL: "gpt2",
        keys.PRE: _pre_tokenizer_name(spec, log),
        keys.LIST: tokens,
        keys.TOKEN_TYPE: mx.array(types, dtype=mx.int32),
        keys.MERGES: special.merges,
        keys.ADD_PREFIX: mx.array(any(s.get("add_prefix_space") for s in _pre_tokenizer_steps(spec))),
    }
    for kind, token_id in special.special_token_ids.items():
        if key := getattr(keys, f"{kind.upper()}_ID", None):
            meta[key] = mx.array(token_id, dtype=mx.uint32)
    # the HF tokenizer adds a BOS only when its config or post-processor says so, which SpecialVocab reads
    for kind, add in ({"bos": False} | special.add_special_token).items():
        if key := getattr(keys, f"ADD_{kind.upper()}", None):
            meta[key] = mx.array(add)
    if isinstance(special.chat_template, str):
        meta[keys.CHAT_TEMPLATE] = special.chat_template
    return meta


def _rewrite_with_bpe_tokenizer(mlx_lm_gguf: Path, path: Path, tokenizer_dir: Path, vocab_size, log) -> None:
    """mlx-lm's GGUF with its SentencePiece tokenizer record replaced by the byte-level BPE one."""
    import mlx.core as mx

    tensors, metadata = mx.load(str(mlx_lm_gguf), return_metadata=True)
    kept = {k: v for k, v in metadata.items() if not k.startswith("tokenizer.")}
    mx.save_gguf(str(path), tensors, kept | bpe_tokenizer_metadata(tokenizer_dir, vocab_size, log))
    mlx_lm_gguf.unlink()


def _tokens_and_types(spec: dict, vocab_size: int | None) -> tuple[list, list]:
    """As llama.cpp's convert_hf_to_gguf lists them: added special tokens are CONTROL, other added tokens
    USER_DEFINED, and ids the tokenizer lacks up to the embedding's size are '[PAD<id>]' USER_DEFINED."""
    from gguf import TokenType

    by_id = {i: (t, TokenType.NORMAL) for t, i in spec["model"]["vocab"].items()}
    for added in spec.get("added_tokens") or []:
        by_id[added["id"]] = (added["content"], TokenType.CONTROL if added.get("special") else TokenType.USER_DEFINED)
    size = max(vocab_size or 0, max(by_id) + 1)
    pairs = [by_id.get(i, (f"[PAD{i}]", TokenType.USER_DEFINED)) for i in range(size)]
    return [t for t, _ in pairs], [int(kind) for _, kind in pairs]


def _pre_tokenizer_name(spec: dict, log=None) -> str:
    steps = tuple(_step_rule(step) for step in _pre_tokenizer_steps(spec))
    if steps in PRE_TOKENIZERS:
        return PRE_TOKENIZERS[steps]
    if log:
        log(f"export: llama.cpp has no name for the pre-tokenizer {' + '.join(steps)}; recorded "
            f"{DEFAULT_PRE_TOKENIZER!r}, so llama.cpp may split some text differently")  # fmt: skip
    return DEFAULT_PRE_TOKENIZER


def _step_rule(step: dict) -> str:
    if step.get("type") == "ByteLevel" and step.get("use_regex", True):
        return "gpt-2 regex"
    if step.get("type") == "Digits" and step.get("individual_digits"):
        return "single digits"
    return str(step.get("type"))


def _pre_tokenizer_steps(spec: dict) -> list:
    step = spec.get("pre_tokenizer") or {}
    return step.get("pretokenizers", [step] if step else [])


def _steps(spec: dict) -> list:
    """The normalizer, pre-tokenizer and decoder steps, Sequences opened."""
    parts = [spec.get(key) or {} for key in ("normalizer", "pre_tokenizer", "decoder")]
    nested = [p for part in parts for key in ("normalizers", "pretokenizers", "decoders") for p in part.get(key, [])]
    return parts + nested
