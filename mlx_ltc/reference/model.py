"""Whole models on torch: transformers' own model classes with the very same weights we train.

- The embedded model: transformers' GGUF loader reads the GGUF file the model came from, with
  gguf-py's own Q4_1/Q8_0 dequantisation and llama.cpp's q/k permutation undone by transformers.
- Any other model directory (mlx-lm layout, quantized by MLX): config.json becomes a transformers
  config, and each quantized tensor is dequantised by `quant`, independently of MLX.

Attention is transformers' "eager" implementation: the textbook softmax, sliding window included.
"""

import json
from pathlib import Path

import torch

from mlx_ltc.errors import UserError
from mlx_ltc.reference import quant

ARCHITECTURES = ("llama", "starcoder2")


def load(model_dir: Path, dtype=torch.float32):
    """A transformers causal LM in eval mode, every parameter frozen."""
    model_dir = Path(model_dir)
    source = model_dir / "SOURCE"
    if source.is_file():
        model = _from_gguf(source.read_text().strip(), dtype)
    else:
        model = _from_mlx_dir(model_dir, dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def _from_gguf(source: str, dtype):
    from transformers import AutoModelForCausalLM

    from mlx_ltc.models import embedded

    if source != f"{embedded.WHEEL}=={embedded.WHEEL_VERSION}:{embedded.GGUF_FILE}":
        raise UserError(f"reference: unknown model source {source!r}")
    gguf = embedded.find_gguf()
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=dtype, attn_implementation="eager"
    )
    return model


def _config(model_dir: Path) -> tuple[dict, dict]:
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"reference: unreadable {model_dir / 'config.json'} ({e})") from None
    if config.get("model_type") not in ARCHITECTURES:
        raise UserError(
            f"the torch reference supports {', '.join(ARCHITECTURES)} models, not {config.get('model_type')!r}"
        )
    quantization = config.pop("quantization", None) or {}
    config.pop("quantization_config", None)
    return config, quantization


def _from_mlx_dir(model_dir: Path, dtype):
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    config, quantization = _config(model_dir)
    hf_config = AutoConfig.for_model(**config)
    hf_config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype, attn_implementation="eager")
    tensors = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    if not tensors:
        raise UserError(f"reference: no *.safetensors in {model_dir}")
    state = _dequantized(tensors, quantization, dtype)
    expected = set(model.state_dict())
    if config.get("tie_word_embeddings", True):
        expected.discard("lm_head.weight")
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise UserError(
            f"reference: weights of {model_dir} don't fit transformers' {type(model).__name__}: "
            f"missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}"
        )
    model.load_state_dict(state, strict=False)
    if config.get("tie_word_embeddings", True):
        model.tie_weights()
    return model


def _dequantized(tensors: dict, quantization: dict, dtype) -> dict:
    out = {}
    for name, value in tensors.items():
        module, _, leaf = name.rpartition(".")
        if leaf in ("scales", "biases") and f"{module}.weight" in tensors:
            continue
        if leaf == "weight" and f"{module}.scales" in tensors:
            spec = quantization.get(module) if isinstance(quantization.get(module), dict) else quantization
            if spec.get("mode", "affine") != "affine":
                mode = spec["mode"]
                raise UserError(f"reference: {module} uses quantization mode {mode!r}; only affine is supported")
            value = quant.dequantize(
                value.numpy(),
                tensors[f"{module}.scales"].float().numpy(),
                tensors[f"{module}.biases"].float().numpy(),
                spec["group_size"],
                spec["bits"],
                dtype,
            )
        out[name] = value.to(dtype) if value.is_floating_point() else value
    return out
