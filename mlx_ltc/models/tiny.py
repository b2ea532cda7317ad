"""`tiny-starcoder2`: a small, randomly initialised StarCoder2 for tests, saved in Hugging Face
format (config.json, model.safetensors, tokenizer files) with the embedded model's code tokenizer."""

import json
import shutil
from pathlib import Path

from mlx_ltc.atomic import atomic_dir

NAME = "tiny-starcoder2"
SEED = 0
CONFIG = {
    "model_type": "starcoder2",
    "architectures": ["Starcoder2ForCausalLM"],
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "intermediate_size": 256,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
    "sliding_window": 4096,
    "norm_epsilon": 1e-5,
    "rope_theta": 100000.0,
    "hidden_act": "gelu_pytorch_tanh",
    "use_bias": True,
    "tie_word_embeddings": True,
    "torch_dtype": "float32",
}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def materialise(cache_dir: Path, tokenizer_dir: Path) -> Path:
    out = Path(cache_dir) / "models" / f"{NAME}-seed{SEED}"
    if (out / "config.json").is_file():
        return out
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import starcoder2
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = dict(
        CONFIG,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    mx.random.seed(SEED)
    model = starcoder2.Model(starcoder2.ModelArgs.from_dict(config))
    weights = dict(tree_flatten(model.parameters()))
    with atomic_dir(out) as tmp:
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, {"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for name in _TOKENIZER_FILES:
            if (Path(tokenizer_dir) / name).exists():
                shutil.copy(Path(tokenizer_dir) / name, tmp / name)
    return out
