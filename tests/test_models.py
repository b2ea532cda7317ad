import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_ltc import models
from mlx_ltc.errors import UserError
from mlx_ltc.models.embedded import _unpermute_rows


def llama_cpp_permute(w, n_head):
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows (the thing we undo)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize("n_head", [1, 3, 9])
def test_unpermute_inverts_llama_cpp_permute(n_head):
    w = np.arange(n_head * 64 * 5).reshape(n_head * 64, 5)
    assert np.array_equal(_unpermute_rows(llama_cpp_permute(w, n_head), n_head), w)
    assert not np.array_equal(llama_cpp_permute(w, n_head), w)


def test_embedded_model_is_a_4bit_mlx_lm_directory(smollm2_dir):
    from mlx_lm.utils import load

    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["quantization"]["bits"] == 4 and config["quantization"]["group_size"] == 32
    model, tokenizer = load(str(smollm2_dir))
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, nn.QuantizedLinear) and q.bits == 4 and q.group_size == 32
    assert len(model.model.layers) == 30 and q.scales.dtype == mx.float32
    assert isinstance(model.model.embed_tokens, nn.QuantizedEmbedding) and model.model.embed_tokens.bits == 8


def test_embedded_tokenizer_has_repo_tokens_and_round_trips(smollm2_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smollm2_dir))
    for special in ("<repo_name>", "<file_sep>", "<filename>", "<|endoftext|>"):
        ids = tok.encode(special, add_special_tokens=False)
        assert len(ids) == 1, special
    text = "def héllo(x):\n\treturn x ** 2  # 12345 ✓\n"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert tok.encode("12345", add_special_tokens=False) == [tok.convert_tokens_to_ids(c) for c in "12345"]


def test_materialise_is_cached(smollm2_dir, cache_dir):
    stamp = (smollm2_dir / "model.safetensors").stat().st_mtime_ns
    assert models.resolve("smollm2-135m", cache_dir) == smollm2_dir
    assert (smollm2_dir / "model.safetensors").stat().st_mtime_ns == stamp


def test_tiny_starcoder2_is_quantized_on_load(tiny_dir):
    from mlx_lm.utils import load

    config = json.loads((tiny_dir / "config.json").read_text())
    assert config["model_type"] == "starcoder2" and config["quantization"]["bits"] == 4
    model, _ = load(str(tiny_dir))
    assert isinstance(model.model.layers[0].mlp.c_fc, nn.QuantizedLinear)


@pytest.mark.parametrize("name", ["tiny-starcoder2", "smollm2-135m"])
def test_dequantized_model_computes_what_the_4bit_model_does(cache_dir, name):
    model_dir = models.resolve(name, cache_dir)
    quant = models.load(model_dir, dequantize="never")
    deq = models.load(model_dir, dequantize="always")
    assert not quant.dequantized and deq.dequantized and deq.dtype == "float32"
    assert isinstance(deq.model.model.layers[0].self_attn.q_proj, nn.Linear)
    ids = mx.array([[1, 200, 3000, 42, 7, 9000, 11, 12]])
    a, b = quant.model(ids), deq.model(ids)
    assert mx.abs(a - b).max().item() < 1e-3 * max(1.0, mx.abs(a).max().item())


def test_unknown_models_are_user_errors(tmp_path, cache_dir):
    with pytest.raises(UserError, match="not found"):
        models.resolve("no-such-model", cache_dir)
    (tmp_path / "m").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        models.resolve(str(tmp_path / "m"), cache_dir)
    with pytest.raises(UserError, match="could not be fetched"):
        models.resolve("nobody-xyz/no-such-model-xyz", cache_dir)
