import dataclasses
import json

import pytest

from mlx_ltc import backend, config, plan
from mlx_ltc.data.analyze import Constant
from mlx_ltc.errors import UserError
from mlx_ltc.hardware.profile import Machine, Profile

CONSTANTS = {
    "seq_len": Constant(1024, "p95 rule", {}),
    "lora_rank": Constant(16, "rank rule", {}),
    "phases": Constant(2, "phases rule", {}),
}
MACHINE = Machine("cpu", "cpu", 24 << 30, 20 << 30, 2, 2, "0.32.0")
PROFILE = Profile(
    model="tiny", backend="cpu", device_name="cpu", memory_budget=5 << 30, weights_bytes=1 << 20, max_seq_len=4096,
    tokens_per_s=100.0, layers_per_stage=3, batch_size=1, settings={}, machine=MACHINE, matmul_gflops={}, bf16=False,
)  # fmt: skip


class Loaded:
    config = {"model_type": "mamba"}


class Unsupported(backend.MLXBackend):
    def engine_supports(self, loaded):
        return False


class Supported(backend.MLXBackend):
    def engine_supports(self, loaded):
        return True


class NoCurriculum:  # what the torch backend declares, without importing torch
    name, curriculum, memory_engine = "torch", False, False


def resolve(cfg, given, compute_with=None, profile=None):
    compute_with = compute_with or Supported()
    policy = plan.memory_policy(cfg, given, compute_with, Loaded())
    return plan.resolve(cfg, given, compute_with, policy, CONSTANTS, profile)


def test_open_values_are_derived_and_the_users_config_is_left_as_it_was():
    cfg = config.build(None, {"curriculum": {"phases": 0}})  # 0: the analysis derives the phases
    p = resolve(cfg, {})
    assert (p.seq_len.value, p.seq_len.source, p.seq_len.why) == (1024, "derived", "p95 rule")
    assert (p.lora_rank.value, p.lora_rank.source) == (16, "derived")
    assert (p.phases.value, p.phases.source) == (2, "derived")
    assert (p.batch_size.value, p.batch_size.source) == (1, "default")
    assert (p.layers_per_stage.value, p.layers_per_stage.source) == (1, "derived")
    assert (p.policy.value, p.attention.value) == ("engine", "efficient")  # a model the planner can't price
    c = p.config
    assert (c.data.seq_len, c.lora.rank, c.curriculum.phases, c.train.batch_size, c.memory.layers_per_stage) == (
        1024,
        16,
        2,
        1,
        1,
    )
    assert cfg == config.build(None, {"curriculum": {"phases": 0}})  # the user's config is untouched
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.data.seq_len = 64


def test_flags_and_file_values_keep_their_source(tmp_path):
    (tmp_path / "run.yaml").write_text("lora: {rank: 8}\ndata: {seq_len: 2048}\n")
    cfg, given = config.build_given(tmp_path / "run.yaml", {"data": {"seq_len": 512}, "curriculum": {"phases": 1}})
    assert given == {"lora.rank": "file", "data.seq_len": "flag", "curriculum.phases": "flag"}
    p = resolve(cfg, given)
    assert (p.seq_len.value, p.seq_len.source) == (512, "flag")
    assert (p.lora_rank.value, p.lora_rank.source) == (8, "file")
    assert (p.phases.value, p.phases.source) == (1, "flag")
    assert resolve(config.build(), {}).phases == plan.Choice(1, "default")  # one phase unless asked
    # a config built in code says nothing of where its values came from: they are still the user's
    bare = resolve(config.build(None, {"lora": {"rank": 4}, "data": {"seq_len": 256}}), {})
    assert (bare.lora_rank.value, bare.seq_len.value) == (4, 256) and bare.lora_rank.source == "config"


def test_the_memory_profile_sets_the_micro_batch_and_the_checkpoint_policy():
    short = resolve(config.build(None, {"data": {"seq_len": 1024}}), {"data.seq_len": "flag"}, profile=PROFILE)
    assert (short.batch_size.value, short.batch_size.source) == (4, "profile")  # 4096 x 1 // 1024
    assert short.layers_per_stage.value == 3 and short.layers_per_stage.source == "profile"  # 1024 x 4 >= 4096
    longest = resolve(config.build(None, {"data": {"seq_len": 8192}}), {"data.seq_len": "flag"}, profile=PROFILE)
    assert longest.batch_size.value == 1 and longest.layers_per_stage.value == 3
    given = resolve(config.build(None, {"train": {"batch_size": 2}}), {"train.batch_size": "flag"}, profile=PROFILE)
    assert (given.batch_size.value, given.batch_size.source) == (2, "flag")
    assert given.layers_per_stage.source == "derived"  # 1024 x 2 < 4096: the policy's (every layer's input)


def test_a_model_the_engine_cant_run_gets_mlx_attention_and_says_why():
    p = resolve(config.build(), {}, compute_with=Unsupported())
    assert p.attention.value == "stock" and p.staged.value is False and p.attention.source == "backend"
    assert "does not support 'mamba' models" in p.attention.why
    assert p.loss.value == "chunked"  # the chunked loss needs no engine support
    assert p.config.memory.attention == "stock" and p.layers_per_stage.value == 0


def test_a_backend_without_curriculum_or_engine_plans_one_phase_and_plain_attention():
    p = resolve(config.build(), {}, compute_with=NoCurriculum())
    assert p.phases == plan.Choice(1, "backend", "the torch backend has no curriculum")
    assert (p.attention.value, p.loss.value, p.staged.value) == ("stock", "full", False)
    assert p.describe().splitlines()[0].endswith("1 phase: the torch backend has no curriculum")
    with pytest.raises(UserError, match="curriculum.phases 3: the torch backend trains one phase"):
        plan.check(config.build(None, {"curriculum": {"phases": 3}}), NoCurriculum())


def test_the_plan_round_trips_through_plan_json(tmp_path):
    cfg = config.build(None, {"data": {"seq_len": 2048}, "curriculum": {"phases": 0}})
    p = resolve(cfg, {"data.seq_len": "flag"}, profile=PROFILE)
    p.save(tmp_path)
    back = plan.load(tmp_path)
    assert back == p
    assert json.loads((tmp_path / plan.PLAN).read_text())["seq_len"] == {"value": 2048, "source": "flag", "why": ""}
    text = p.describe()
    assert text.startswith("plan: seq_len 2048, batch 2, LoRA rank 16, 2 phases\n")
    assert "  lora_rank         16        derived: rank rule" in text.splitlines()
    assert plan.load(tmp_path / "nowhere") is None
    (tmp_path / plan.PLAN).write_text('{"seq_len": 3}')
    with pytest.raises(UserError, match="not a readable plan"):
        plan.load(tmp_path)


def test_a_named_policy_the_engine_cant_run_falls_back_and_says_so():
    p = resolve(config.build(None, {"memory": {"policy": "engine"}}), {"memory.policy": "flag"}, Unsupported())
    assert (p.policy.value, p.policy.source) == ("custom", "backend") and "mamba" in p.policy.why
    assert p.config.memory.policy == "custom" and p.config.memory.staged is False and p.attention.value == "stock"
