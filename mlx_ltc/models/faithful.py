"""Make mlx-lm's models compute what their configs say, without forking them.

mlx-lm's StarCoder2 port ignores `sliding_window` (4,096 in starcoder2-3b: beyond it the model was
trained never to look further back) and uses the exact erf GELU where the config says
`gelu_pytorch_tanh`. Both are fixed here on the loaded model, per instance, so module paths (and
adapter names) stay mlx-lm's. Transformers' Starcoder2ForCausalLM is the reference
(`mlx_ltc.reference`, tests/test_reference_models.py).

The window also holds for generation with mlx-lm's default (growing) KV cache; a rotating cache
(`max_kv_size`) masks its own window, which must not exceed the model's (`eval.stream` sees to it).
"""

import mlx.core as mx
import mlx.nn as nn

from mlx_ltc.errors import UserError
from mlx_ltc.models import patch

_ACTIVATIONS = {
    "gelu": nn.gelu,
    "gelu_pytorch_tanh": nn.gelu_approx,  # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
    "gelu_new": nn.gelu_approx,
}


def window_mask(offset: int, length: int, window: int) -> mx.array:
    """(length, offset + length) bool: query offset + i sees keys j with offset + i - window < j <= offset + i."""
    rows = mx.arange(offset, offset + length)[:, None]
    keys = mx.arange(offset + length)[None, :]
    return (keys <= rows) & (keys > rows - window)


def _windowed(self, base_call, x, mask=None, cache=None):
    offset = cache.offset if cache is not None else 0
    rotating = getattr(cache, "max_size", None)  # a RotatingKVCache masks its own window
    if rotating is None and offset + x.shape[1] > self.window and (mask is None or isinstance(mask, str)):
        mask = window_mask(offset, x.shape[1], self.window)
    return base_call(self, x, mask, cache)


def _activation(act):
    def call(self, base_call, x):
        return self.c_proj(act(self.c_fc(x)))

    return call


def apply(model, config: dict) -> list:
    """Fix the loaded mlx-lm `model` in place; returns what was changed, for the run's record."""
    if config.get("model_type") != "starcoder2":
        return []
    fixes = []
    name = config.get("hidden_act", "gelu_pytorch_tanh")
    if name not in _ACTIVATIONS:
        raise UserError(f"starcoder2: unsupported hidden_act {name!r} (supported: {', '.join(_ACTIVATIONS)})")
    if _ACTIVATIONS[name] is not nn.gelu:
        for layer in model.layers:
            patch.install(layer.mlp, "activation", _activation(_ACTIVATIONS[name]))
        fixes.append(f"mlp activation {name}")
    window = config.get("sliding_window")
    if window:
        for layer in model.layers:
            patch.install(layer.self_attn, "windowed", _windowed, window=int(window))
        fixes.append(f"sliding window {window}")
    return fixes
