"""The memory planner: its predictions against MLX's measured peaks, the policy `auto` picks, and `mlx-ltc plan`."""

import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from conftest import run_cli

from mlx_ltc import config, models, plan
from mlx_ltc.config import MemoryConfig
from mlx_ltc.errors import UserError
from mlx_ltc.hardware import planner, profile
from mlx_ltc.train.policies import NAMES, POLICIES

ROOT = Path(__file__).resolve().parent.parent
SMOLLM2 = {"model_type": "llama", "hidden_size": 576, "num_hidden_layers": 30, "intermediate_size": 1536,
           "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152,
           "tie_word_embeddings": True}  # fmt: skip


@pytest.mark.slow
def test_the_planner_predicts_the_tiny_models_peak_within_ten_percent_never_five_under(tmp_path):
    """The validation table's procedure on the tiny model: each policy's real training step (forward, backward,
    AdamW) in its own process (`scripts/bench_memory.py`; its `stock` is mlx-lm's recipe), MLX's peak against
    the planner's prediction."""
    out = tmp_path / "cells.json"
    impls = "plain,stock,chunked,efficient,engine,engine_sqrt"
    cmd = [sys.executable, str(ROOT / "scripts/bench_memory.py"), "--model", "tiny-starcoder2", "--lens", "1024,2048",
           "--impls", impls, "--json", str(out), "--png", str(tmp_path / "p.png")]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    cells = json.loads(out.read_text())
    shape = planner.Shape.read(models.resolve("tiny-starcoder2", models.default_cache_dir()))
    errors = {}
    for cell in cells:
        setup = planner.Setup(dtype=cell["dtype"], bits=0)  # dequantized on a CPU
        predicted = planner.predict(shape, setup, cell["impl"], cell["L"])["peak"]
        errors[(cell["impl"], cell["L"])] = predicted / cell["peak_bytes"] - 1
    assert len(errors) == 12 and all(-0.05 <= e <= 0.10 for e in errors.values()), errors


def test_weights_are_priced_from_the_config_as_mlx_holds_them(tiny_dir):
    """The dequantized tiny model's weights, and a 4-bit StarCoder2-3B layer, as MLX allocates them."""
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlx_lm.models import starcoder2

    loaded = models.load(tiny_dir)
    held = sum(v.nbytes for _, v in tree_flatten(loaded.model.parameters()))
    predicted = planner.weights_bytes(planner.Shape.read(tiny_dir), planner.Setup(dtype="fp32", bits=0))
    assert abs(predicted / held - 1) < 0.01
    shape_config = json.loads(
        (planner.Path(planner.__file__).parent.parent / "models/configs/starcoder2-3b.json").read_text()
    )
    one_layer = dict(shape_config, num_hidden_layers=1)
    model = starcoder2.Model(starcoder2.ModelArgs.from_dict(one_layer))
    model.set_dtype(mx.bfloat16)
    nn.quantize(model, group_size=64, bits=4)
    held = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    predicted = planner.weights_bytes(planner.Shape.from_config(one_layer, "3b"), planner.Setup(dtype="bf16", bits=4))
    assert abs(predicted / held - 1) < 0.01


def test_auto_picks_the_fastest_policy_that_fits_and_says_why():
    shape = planner.Shape.from_config(SMOLLM2, "smollm2")
    setup = planner.Setup(dtype="fp32", bits=0)
    roomy = planner.plan(shape, setup, 20 * 10**9, 512)
    assert roomy.auto == "plain" and "fastest" in roomy.why
    tight = planner.plan(shape, setup, 2 * 10**9, 8192)
    assert tight.auto in ("engine", "engine_sqrt")
    peaks = {r.policy: r.peak_bytes for r in tight.policies}
    assert peaks[tight.auto] <= 0.9 * 2 * 10**9 < peaks["plain"]
    # the longest length each policy fits is where its predicted peak crosses the budget
    for r in tight.policies:
        if r.max_seq_len:
            assert planner.predict(shape, setup, r.policy, r.max_seq_len)["peak"] <= 2 * 10**9
            assert planner.predict(shape, setup, r.policy, r.max_seq_len + 256)["peak"] > 2 * 10**9
    engine_only = planner.plan(shape, setup, 2 * 10**9, 8192, policies=("engine",))
    assert [r.policy for r in engine_only.policies] == ["engine"]


def test_every_policy_is_a_config_choice_and_its_settings_are_the_engines():
    assert set(NAMES) | {"auto", "custom"} == set(config._CHOICES["memory.policy"])
    engine_default = POLICIES["engine"].memory(MemoryConfig(), 30)
    assert (engine_default.attention, engine_default.loss, engine_default.staged) == ("efficient", "chunked", True)
    assert POLICIES["engine_sqrt"].layers_per_stage(30) == 6 and POLICIES["stock"].checkpoint


class Loaded:
    config = SMOLLM2
    dequantized, dtype = True, "float32"


class Supported:
    name, curriculum, memory_engine = "mlx", True, True

    def engine_supports(self, loaded):
        return True


CONSTANTS = {"seq_len": type("C", (), {"value": 512, "formula": "rule", "inputs": {}})(),
             "lora_rank": type("C", (), {"value": 8, "formula": "rule", "inputs": {}})(),
             "phases": type("C", (), {"value": 1, "formula": "rule", "inputs": {}})()}  # fmt: skip


def _resolve(cfg, given, budget):
    prof = profile.Profile(
        model="smollm2", backend="cpu", device_name="cpu", memory_budget=budget, weights_bytes=1, max_seq_len=1 << 20,
        tokens_per_s=1.0, layers_per_stage=1, batch_size=1, settings={},
        machine=profile.Machine("cpu", "cpu", 1, 1, 1, 1, "0"), matmul_gflops={}, bf16=False,
    )  # fmt: skip
    policy = plan.memory_policy(cfg, given, Supported(), Loaded())
    return plan.resolve(cfg, given, Supported(), policy, CONSTANTS, prof, Loaded())


def test_the_run_plan_trains_with_autos_policy_unless_the_user_set_the_engine():
    fast = _resolve(config.build(None, {"data": {"seq_len": 512}}), {}, 20 * 10**9)
    assert fast.policy.value == "plain" and fast.policy.source == "derived" and "fastest" in fast.policy.why
    c = fast.config
    assert (c.memory.policy, c.memory.attention, c.memory.loss, c.memory.staged) == ("plain", "stock", "full", False)
    assert c.train.grad_checkpoint is False and "policy" in fast.describe().splitlines()[1]
    long = _resolve(config.build(None, {"data": {"seq_len": 8192}}), {}, 2 * 10**9)
    assert long.policy.value in ("engine", "engine_sqrt") and long.config.memory.staged
    stock = _resolve(config.build(None, {"memory": {"policy": "stock"}}), {"memory.policy": "flag"}, 2 * 10**9)
    assert (stock.policy.value, stock.config.train.grad_checkpoint, stock.config.memory.staged) == (
        "stock",
        True,
        False,
    )
    cfg = config.build(None, {"memory": {"attention": "stock"}, "data": {"seq_len": 512}})
    custom = _resolve(cfg, {"memory.attention": "flag"}, 20 * 10**9)  # the user's own settings win over auto
    assert custom.policy.value == "custom" and custom.config.memory.staged and custom.attention.value == "stock"


def test_plan_writes_the_json_other_checks_read(tmp_path):
    out = tmp_path / "plan.json"
    r = run_cli("plan", "--model", "tiny-starcoder2", "--memory-budget", "2GB", "--seq-len", "2048", "--json", out)
    assert r.returncode == 0, r.stderr
    doc = json.loads(out.read_text())
    assert doc["model"] == "tiny-starcoder2" and doc["budget_bytes"] == 2 * 10**9
    rows = {p["policy"]: p for p in doc["policies"]}
    assert {"stock", "engine"} <= set(rows) and doc["auto"] in rows
    for row in rows.values():
        assert {"policy", "seq_len", "peak_bytes", "fits", "max_seq_len"} <= set(row) and row["seq_len"] == 2048
        assert row["fits"] == (row["available"] and row["peak_bytes"] <= doc["budget_bytes"])
    assert "auto:" in r.stdout and "engine" in r.stdout


def test_plan_prices_starcoder2_3b_from_its_shipped_config():
    r = run_cli("plan", "--model", "bigcode/starcoder2-3b", "--backend", "metal", "--memory-budget", "5.3GB",
                "--seq-len", "32768")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "4-bit" in r.stdout and "bf16" in r.stdout and "auto:" in r.stdout


@pytest.mark.parametrize(
    "config_text,message",
    [
        ('{"model_type": "mamba", "hidden_size": 8}', "model_type 'mamba' can't be priced"),
        ("{not json", "is not a readable config.json"),
        ('{"model_type": "llama", "hidden_size": 64}', "has no positive integer num_hidden_layers"),
        (None, "no such config.json"),
    ],
)
def test_plan_refuses_a_config_it_cant_price_in_one_line(tmp_path, config_text, message):
    path = tmp_path / "config.json"
    if config_text is not None:
        path.write_text(config_text)
    r = run_cli("plan", "--model", path, "--memory-budget", "5GB")
    assert r.returncode != 0 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_a_budget_below_the_weights_names_the_minimum():
    r = run_cli("plan", "--model", "bigcode/starcoder2-3b", "--backend", "metal", "--memory-budget", "1GB")
    assert r.returncode != 0 and "give at least" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    with pytest.raises(UserError, match="is below"):
        planner.plan(planner.Shape.from_config(SMOLLM2, "s"), planner.Setup(), 10**6, 512)


def test_the_profile_search_starts_from_a_guess_and_halves_when_it_is_too_long():
    calls = []

    def try_len(n):
        calls.append(n)
        fits = n <= 3000
        return profile.Probe(n, fits, n if fits else None, 1.0 if fits else None, n if fits else None, 1)

    best, _ = profile.search(try_len, 8192, 65536, 128, log=lambda _: None, floor=256)
    assert best.seq_len == 2944 and calls[:3] == [8192, 4096, 2048]
    calls.clear()
    best, _ = profile.search(try_len, 2944, 65536, 128, log=lambda _: None, floor=256)
    assert best.seq_len == 2944 and calls[:2] == [2944, 5888]  # a right guess: one doubling, then bisection


def test_lora_dropout_keeps_auto_off_the_staged_policies():
    cfg = config.build(None, {"lora": {"dropout": 0.1}, "data": {"seq_len": 8192}})  # auto: allowed
    chosen = _resolve(cfg, {}, 2 * 10**9)
    assert not POLICIES[chosen.policy.value].staged and chosen.config.memory.staged is False
    with pytest.raises(UserError, match="not staged"):
        config.build(None, {"lora": {"dropout": 0.1}, "memory": {"policy": "engine"}})
