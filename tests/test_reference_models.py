"""Whole models against the torch reference: StarCoder2 fidelity (sliding window, tanh GELU),
GQA/head-dim shapes, `mlx-ltc compare`, and `--backend torch` against the MLX backend."""

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import run_cli  # noqa: E402

from mlx_ltc import models  # noqa: E402
from mlx_ltc.reference import TOLERANCES, within  # noqa: E402
from mlx_ltc.reference import model as reference_model  # noqa: E402


def save_random(tmp_path, module, config: dict):
    """A random mlx-lm model saved as a Hugging Face directory (unquantized)."""
    from mlx.utils import tree_flatten

    mx.random.seed(0)
    model = module.Model(module.ModelArgs.from_dict(config))
    weights = {k: v * 4 if k.endswith("norm.weight") else v for k, v in tree_flatten(model.parameters())}
    out = tmp_path / config["model_type"]
    out.mkdir()
    mx.save_safetensors(str(out / "model.safetensors"), weights, {"format": "pt"})
    (out / "config.json").write_text(json.dumps(config))
    return out


def logits_pair(model_dir, length, faithful=True, efficient=False):
    from mlx_lm.utils import load_model

    from mlx_ltc.models import faithful as fix
    from mlx_ltc.train import engine

    model, config = load_model(model_dir)
    if faithful:
        fix.apply(model, config)
    if efficient:
        engine.use_efficient_attention(model, 1 << 14)
    ids = np.random.default_rng(1).integers(0, config["vocab_size"], (2, length))
    ours = np.array(model(mx.array(ids)))
    with torch.no_grad():
        ref = reference_model.load(model_dir, torch.float64)(torch.from_numpy(ids)).logits.numpy()
    return ours, ref


STARCODER2 = {
    "model_type": "starcoder2",
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 97,
    "norm_epsilon": 1e-5,
    "rope_theta": 10000.0,
    "hidden_act": "gelu_pytorch_tanh",
    "use_bias": True,
    "tie_word_embeddings": True,
    "max_position_embeddings": 256,
}


@pytest.mark.parametrize("window", [None, 16])
def test_starcoder2_matches_transformers_only_with_our_fixes(tmp_path, window):
    from mlx_lm.models import starcoder2

    model_dir = save_random(tmp_path, starcoder2, {**STARCODER2, "sliding_window": window})
    length = 40  # beyond the window
    ours, ref = logits_pair(model_dir, length)
    ok, d, r = within("model_forward", ours, ref)
    assert ok, f"with the fixes: max |d| {d:.2e}, rel {r:.2e}"
    raw, _ = logits_pair(model_dir, length, faithful=False)
    early = slice(0, window or length)
    _, d_early, _ = within("model_forward", raw[:, early], ref[:, early])
    assert d_early > 20 * d, f"mlx-lm's erf GELU should show: {d_early:.2e} vs {d:.2e}"
    if window:
        _, d_late, _ = within("model_forward", raw[:, window:], ref[:, window:])
        assert d_late > 100 * d_early, f"beyond the window mlx-lm diverges by a lot: {d_late:.2e}"
        eff, _ = logits_pair(model_dir, length, efficient=True)  # the engine's attention honours the window
        assert within("model_forward", eff, ref)[0]


def test_windowed_generation_mask_matches_full_forward(tmp_path):
    """With mlx-lm's KV cache, token-by-token decoding past the window gives the full forward's logits."""
    from mlx_lm.models import cache, starcoder2
    from mlx_lm.utils import load_model

    from mlx_ltc.models import faithful

    model_dir = save_random(tmp_path, starcoder2, {**STARCODER2, "sliding_window": 8})
    model, config = load_model(model_dir)
    faithful.apply(model, config)
    ids = mx.array(np.random.default_rng(2).integers(0, 97, (1, 20)))
    full = model(ids)
    kv = cache.make_prompt_cache(model)
    steps = [model(ids[:, :5], cache=kv)] + [model(ids[:, i : i + 1], cache=kv) for i in range(5, 20)]
    np.testing.assert_allclose(np.array(mx.concatenate(steps, axis=1)), np.array(full), atol=1e-4)


@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(4, 4, 64), (3, 1, 96), (12, 1, 128), (6, 2, 64)])
def test_llama_shapes_match_transformers(tmp_path, heads, kv_heads, head_dim):
    from mlx_lm.models import llama

    config = {
        "model_type": "llama",
        "hidden_size": heads * head_dim,
        "num_hidden_layers": 2,
        "intermediate_size": 96,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "vocab_size": 101,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
    }
    model_dir = save_random(tmp_path, llama, config)
    for length, efficient in ((1, False), (77, False), (77, True)):
        ours, ref = logits_pair(model_dir, length, efficient=efficient)
        ok, d, r = within("model_forward", ours, ref)
        assert ok, f"L={length} efficient={efficient}: max |d| {d:.2e}, rel {r:.2e}"


def test_reference_refuses_unsupported_architectures(tmp_path):
    from mlx_ltc.errors import UserError

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mistral"}))
    with pytest.raises(UserError, match="supports llama, starcoder2"):
        reference_model.load(tmp_path)


def test_quantized_tiny_model_loads_identically(tiny_dir):
    """Our dequantisation of the 4-bit directory in torch gives the weights MLX computes with."""
    from mlx.utils import tree_flatten

    ours = dict(tree_flatten(models.load(tiny_dir, "always").model.parameters()))
    ref = reference_model.load(tiny_dir).state_dict()
    assert {k for k in ref if k != "lm_head.weight"} == set(ours)
    for name, value in ours.items():
        assert np.array_equal(np.array(value), ref[name].numpy()), name


def test_compare_passes_and_catches_a_wrong_optimizer(tiny_dir, monkeypatch):
    import mlx.optimizers

    from mlx_ltc.reference import compare

    result = compare.run("tiny-starcoder2", steps=3, seq_len=33, batch_size=2)
    assert result.ok, result.table()
    assert [c[0] for c in result.curve] == [1, 2, 3]
    quantities = " ".join(r.quantity for r in result.rows)
    for q in ("logits", "loss", "LoRA gradients", "gradient norm", "learning rate", "LoRA update"):
        assert q in quantities
    # MLX's default AdamW (no bias correction) is exactly the kind of silent difference compare exists for
    real = mlx.optimizers.AdamW
    monkeypatch.setattr(mlx.optimizers, "AdamW", lambda *a, **k: real(*a, **{**k, "bias_correction": False}))
    broken = compare.run("tiny-starcoder2", steps=3, seq_len=33, batch_size=2)
    assert not broken.ok and any("LoRA update" in r.quantity and not r.ok for r in broken.rows)


@pytest.mark.slow
def test_compare_cli_exit_code_and_json(tiny_dir, tmp_path):
    json_out = tmp_path / "c.json"
    r = run_cli("compare", "--model", "tiny-starcoder2", "--steps", "2", "--seq-len", "48", "--json", json_out)
    assert r.returncode == 0, r.stderr + r.stdout
    assert "all within tolerance" in r.stdout
    data = json.loads(json_out.read_text())
    assert data["ok"] and len(data["curve"]) == 2
    assert all(row["tolerance"]["rel"] == TOLERANCES[key].rel for row, key in zip(data["rows"][:1], ["logits"]))
    bad = run_cli("compare", "--model", "tiny-starcoder2", "--steps", "0")
    assert bad.returncode != 0 and "Traceback" not in bad.stderr and "--steps" in bad.stderr


@pytest.mark.slow
def test_torch_backend_trains_like_mlx_and_writes_mlx_lm_adapters(tiny_dir, small_repo, tmp_path):
    """The same run on both backends: identical batches and LoRA start, so the loss curves agree, and
    the adapters torch writes evaluate in MLX to the perplexity torch reported."""
    from mlx_lm.tuner.utils import load_adapters

    from mlx_ltc import data
    from mlx_ltc.eval import perplexity

    runs = {}
    pinned = tmp_path / "batch.yaml"  # MLX would otherwise take its batch size from a cached memory profile
    pinned.write_text("train:\n  batch_size: 2\n")
    for backend in ("torch", "mlx"):
        out = tmp_path / backend
        args = ["train", "--repo", small_repo, "--model", "tiny-starcoder2", "--max-steps", "4", "--seq-len", "64"]
        r = run_cli(*args, "--backend", backend, "--out", out, "--quiet", "--config", pinned)
        assert r.returncode == 0, r.stderr
        assert ("1 phase: the torch backend has no curriculum" in r.stderr) == (backend == "torch"), r.stderr
        runs[backend] = out
    curves = {b: [json.loads(line)["loss"] for line in open(d / "metrics.jsonl")] for b, d in runs.items()}
    assert len(curves["torch"]) == 4
    np.testing.assert_allclose(curves["torch"], curves["mlx"], atol=TOLERANCES["loss_curve"].abs)
    report = json.loads((runs["torch"] / "report.json").read_text())
    assert report["compute"]["backend"] == "torch"
    loaded = models.load(tiny_dir)
    load_adapters(loaded.model, str(runs["torch"] / "adapters"))
    val = data.load_split(runs["torch"] / "data", "val")
    mlx_ppl = perplexity(loaded.model, val, 4, progress=False)
    assert abs(mlx_ppl.loss - report["adapted"]["val_loss"]) < TOLERANCES["loss"].abs
    shutil.rmtree(tmp_path)


def test_bf16_scales_dequantize_to_exact_fp32(tmp_path):
    """A model converted from a bf16 checkpoint has bf16 scales; on CPU we compute scale * q + bias in
    fp32 (not rounded to bf16 first), exactly as the reference does."""
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlx_lm.models import starcoder2

    config = {**STARCODER2, "num_hidden_layers": 1}
    model = starcoder2.Model(starcoder2.ModelArgs.from_dict(config))
    model.set_dtype(mx.bfloat16)
    nn.quantize(model, group_size=64, bits=4)
    mx.save_safetensors(str(tmp_path / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (tmp_path / "config.json").write_text(json.dumps({**config, "quantization": {"group_size": 64, "bits": 4}}))
    ours = dict(tree_flatten(models.load(tmp_path, "always").model.parameters()))
    ref = reference_model.load(tmp_path).state_dict()
    for name, value in ours.items():
        assert value.dtype == mx.float32 and np.array_equal(np.array(value), ref[name].numpy()), name
