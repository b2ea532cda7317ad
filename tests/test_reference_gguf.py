"""The first reference check: our smollm2-135m (GGUF -> mlx-lm) against transformers' own GGUF
loader in torch, an independent dequantisation and model implementation."""

import inspect

import mlx.core as mx
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def snippet_ids(smollm2_dir):
    from transformers import AutoTokenizer

    from mlx_ltc.data import sources

    tok = AutoTokenizer.from_pretrained(str(smollm2_dir))
    text = inspect.getsource(sources)  # real code, stable within a checkout
    ids = tok.encode(text, add_special_tokens=False)[:256]
    assert len(ids) == 256
    return text, ids


@pytest.fixture(scope="module")
def torch_model():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mlx_ltc.models.embedded import find_gguf

    gguf = find_gguf()
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    return model.eval(), tok


def test_tokenizer_matches_transformers_gguf_tokenizer(snippet_ids, torch_model):
    text, ids = snippet_ids
    assert torch_model[1].encode(text, add_special_tokens=False)[:256] == ids


@pytest.mark.slow
@pytest.mark.parametrize("dequantize", ["always", "never"])
def test_logits_match_transformers_gguf_model(smollm2_dir, snippet_ids, torch_model, dequantize):
    from mlx_ltc import models

    _, ids = snippet_ids
    with torch.no_grad():
        ref = torch_model[0](torch.tensor([ids])).logits[0].numpy()
    ours = np.array(models.load(smollm2_dir, dequantize).model(mx.array([ids]))[0])
    diff = np.abs(ours - ref)
    agree = (ours.argmax(-1) == ref.argmax(-1)).mean()
    print(f"dequantize={dequantize}: top-1 agreement {agree:.4f}, mean |d| {diff.mean():.2e}, max |d| {diff.max():.2e}")
    assert agree >= 0.99
    assert diff.mean() < 1e-3 and diff.max() < 1e-2
