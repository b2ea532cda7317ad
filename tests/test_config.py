from pathlib import Path

import pytest

from mlx_ltc import config
from mlx_ltc.errors import UserError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_default_yaml_is_exactly_the_builtin_defaults():
    assert config.load_file(CONFIGS / "default.yaml") == config.Config().to_dict()


def test_mac_8gb_recipe_is_valid_and_targets_starcoder2_3b():
    cfg = config.build(CONFIGS / "mac-8gb.yaml")
    assert "starcoder2-3b" in cfg.model.name
    assert cfg.memory.staged and cfg.memory.attention == "efficient" and cfg.data.seq_len is None


def test_flags_override_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("data:\n  seq_len: 256\ntrain:\n  lr: 1\n")
    cfg = config.build(f, {"data": {"seq_len": 1024}})
    assert cfg.data.seq_len == 1024
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)


@pytest.mark.parametrize(
    "text, message",
    [
        ("train:\n  lrr: 0.1\n", "unknown key train.lrr"),
        ("trian:\n  lr: 0.1\n", "unknown section 'trian'"),
        ("train:\n  lr: fast\n", "train.lr must be float"),
        ("train:\n  batch_size: true\n", "train.batch_size must be int"),
        ("data:\n  seq_len: 8\n", "data.seq_len must be at least 16"),
        ("model:\n  dequantize: sometimes\n", "model.dequantize must be one of"),
        ("lora:\n  targets: q_proj\n", "lora.targets must be a list of strings"),
        ("train: [1, 2]\n", "section 'train' must be a mapping"),
        ("train: {lr: [\n", "not valid YAML"),
        ("bk:\n  train:\n    lrr: 1\n", "unknown key bk.train.lrr"),
        ("bk:\n  trian:\n    lr: 1\n", "unknown key bk.trian"),
        ("bk: 3\n", "section 'bk' must be a mapping"),
        ("bk:\n  model:\n    top_k: 8\n", "top_k .8. must be at most bk.model.n_experts"),
        ("bk:\n  train:\n    seq_lens: [512, 128]\n", "bk.train.seq_lens must be increasing lengths"),
        ("bk:\n  corpus:\n    val_share: 1\n", "bk.corpus.val_share must be between 0 and 1"),
        ("mc:\n  eval:\n    budgets: 512\n", "mc.eval.budgets must be a list of integers"),
        ("mc:\n  train:\n    budget: 32\n", "mc.train.budget must be at least 64"),
        ("mc:\n  train:\n    split: half\n", "mc.train.split must be train/val/test shares"),
        ("evaluate:\n  chunk: 0\n", "evaluate.chunk must be at least 1"),
        (
            "evaluate:\n  completion:\n    modes: [in_file, all]\n",
            "evaluate.completion.modes: unknown all .choose from in_file",
        ),
        ("eval:\n  context_tokens: 8\n", "the `mlx-ltc eval` command's options are in the `evaluate` section"),
        ("compare:\n  reference_dtype: float16\n", "compare.reference_dtype must be one of float32, float64"),
    ],
)
def test_bad_config_names_the_problem(tmp_path, text, message):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(UserError, match=message):
        config.build(f)


def test_missing_config_file(tmp_path):
    with pytest.raises(UserError, match="config file"):
        config.build(tmp_path / "nope.yaml")


def test_the_other_commands_sections_load_and_flags_override_the_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(
        "bk:\n  model: {d_model: 64}\n  train: {seq_lens: [64, 256], lr: 0.002}\n"
        "mc:\n  train: {cycles: 3}\n  eval: {budgets: [128]}\n"
        "evaluate:\n  splits: [test]\n  completion: {targets: 20}\ncompare:\n  steps: 3\n"
    )
    overrides = {"bk": {"train": {"lr": 0.004}}, "evaluate": {"completion": {"modes": ["fim"]}}}
    cfg, given = config.build_given(f, overrides)
    assert cfg.bk.model.d_model == 64 and cfg.bk.train.seq_lens == [64, 256] and cfg.bk.train.lr == 0.004
    assert cfg.mc.train.cycles == 3 and cfg.mc.eval.budgets == [128] and cfg.compare.steps == 3
    assert cfg.evaluate.splits == ["test"] and cfg.evaluate.completion.targets == 20
    assert cfg.evaluate.completion.modes == ["fim"] and cfg.evaluate.forgetting_tokens == 16_384
    assert given["bk.train.lr"] == "flag" and given["bk.train.seq_lens"] == "file" and "bk.model" not in given


def test_a_config_written_before_the_other_commands_sections_still_loads():
    """A LoRA run's config.json from before: its sections are all there, the new ones take their defaults."""
    old = {k: v for k, v in config.Config().to_dict().items() if k not in ("evaluate", "compare", "bk", "mc")}
    assert config.build(None, old) == config.Config()


def test_research_model_defaults_are_the_configs():
    from dataclasses import asdict

    from mlx_ltc.research.bk import BKConfig

    assert asdict(config.BkModelConfig()).items() <= asdict(BKConfig(vocab_size=2)).items()
    assert config.default("mc.train.model") == config.default("model.name")


def invoke(*args):
    from click.testing import CliRunner

    from mlx_ltc.cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture
def calls(monkeypatch):
    """What each command hands its module, with the work itself stubbed out."""
    from types import SimpleNamespace

    from mlx_ltc.eval import run as eval_run
    from mlx_ltc.reference import compare
    from mlx_ltc.research.bk import evaluate as bk_evaluate
    from mlx_ltc.research.bk import train as bk_train
    from mlx_ltc.research.megacontext import run as mc

    seen = {}

    def record(name, result):
        return lambda *args, **kwargs: seen.setdefault(name, (args, kwargs)) and result

    empty = {"rows": [], "identifier_rows": []}
    monkeypatch.setattr(bk_train, "train", record("bk train", {"table": ""}))
    monkeypatch.setattr(bk_evaluate, "evaluate_run", record("bk eval", {}))
    monkeypatch.setattr(bk_evaluate, "table", lambda result: "")
    monkeypatch.setattr(mc, "train_run", record("mc train", {"done": []}))
    monkeypatch.setattr(mc, "evaluate_run", record("mc eval", empty))
    monkeypatch.setattr(mc, "table", lambda result: "")
    monkeypatch.setattr(eval_run, "run_eval", record("eval", {}))
    outcome = SimpleNamespace(table=lambda: "", ok=True, to_dict=dict)
    monkeypatch.setattr(compare, "run", record("compare", outcome))
    return seen


def test_every_command_reads_its_section_from_the_file_and_flags_win(tmp_path, calls):
    f = tmp_path / "c.yaml"
    f.write_text(
        "bk:\n  train: {lr: 0.002, seq_lens: [64, 256]}\n  corpus: {val_share: 0.2}\n  eval: {chunk: 64}\n"
        "mc:\n  train: {cycles: 3, horizon: 32}\n  eval: {horizon: 16, base: true}\n"
        "evaluate:\n  chunk: 64\n  stream_tokens: 100\n  completion: {targets: 10}\n"
        "compare:\n  model: smollm2-135m\n  steps: 2\n"
    )
    run = tmp_path / "run"
    run.mkdir()
    for args in [
        ("bk", "train", "--out", tmp_path / "bk", "--corpus", tmp_path, "--lr", "0.003", "--d-model", "64"),
        ("bk", "eval", run, "--stream-tokens", "500"),
        ("mc", "train", "--repo", tmp_path, "--out", tmp_path / "mc", "--horizon", "16"),
        ("mc", "eval", run, "--json", tmp_path / "rows.json", "--budgets", "64,128"),
        ("eval", run, "--chunk", "128", "--completion"),
        ("compare", "--steps", "3", "--no-staged"),
    ]:
        result = invoke(*args, "--config", f)
        assert result.exit_code == 0, (args, result.output)
    model, opts, corpus = calls["bk train"][0][:3]
    assert (opts.lr, opts.seq_lens, opts.steps_per_length) == (0.003, [64, 256], 200)
    assert (model.d_model, model.n_layers, corpus.val_share, corpus.root) == (64, 4, 0.2, str(tmp_path))
    assert calls["bk eval"][0][1] == config.BkEvalConfig(stream_tokens=500, chunk=64)
    assert calls["mc train"][0][2] == config.McTrainConfig(cycles=3, horizon=16)
    assert calls["mc eval"][0][1] == config.McEvalConfig(budgets=[64, 128], horizon=16, base=True)
    assert (run / "eval-base.json").is_file()  # mc.eval.base from the file
    opts = calls["eval"][0][1]
    assert (opts.chunk, opts.stream_tokens, opts.context_tokens, opts.completion.targets) == (128, 100, 16_384, 10)
    args = calls["compare"][0]
    assert args[:4] == ("smollm2-135m", 3, 128, 2) and args[6].staged is False


def test_a_flag_the_config_rejects_is_named_with_its_key(tmp_path, calls):
    result = invoke("mc", "eval", tmp_path, "--json", tmp_path / "rows.json", "--min-tokens", "9000")
    assert result.exit_code == 1 and "mc.eval.max_tokens must be at least mc.eval.min_tokens" in result.output
    result = invoke("bk", "train", "--out", tmp_path / "o", "--corpus", tmp_path, "--top-k", "5")
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert result.exit_code == 1 and errors == [
        "Error: config: bk.model.top_k (5) must be at most bk.model.n_experts (--top-k)"
    ], result.output
    assert "bk train" not in calls


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_is_valid(path):
    config.build(path)


def test_train_and_profile_map_their_flags_to_keys_and_say_which_the_user_gave(tmp_path, monkeypatch):
    from mlx_ltc import run
    from mlx_ltc.hardware import profile

    seen = {}
    monkeypatch.setattr(run, "run_train", lambda cfg, repo, out, **kw: seen.setdefault("train", (cfg, kw["given"])))
    monkeypatch.setattr(run, "summary", lambda report: "")
    monkeypatch.setattr(profile, "run_profile", lambda cfg, cache_dir, force, log: seen.setdefault("profile", cfg))
    monkeypatch.setattr(profile, "summary", lambda found: "")
    f = tmp_path / "c.yaml"
    f.write_text(
        "train: {lr: 0.001, max_steps: 50}\nmemory: {staged: true}\nprofile: {granularity: 128, max_len: 2048}"
    )
    result = invoke("train", "--repo", tmp_path, "--config", f, "--max-steps", 5, "--seq-len", 256, "--no-staged")
    assert result.exit_code == 0, result.output
    cfg, given = seen["train"]
    assert (cfg.train.max_steps, cfg.train.lr, cfg.data.seq_len, cfg.memory.staged) == (5, 0.001, 256, False)
    assert given == {"train.lr": "file", "train.max_steps": "flag", "memory.staged": "flag",
                     "profile.granularity": "file", "profile.max_len": "file", "data.seq_len": "flag"}  # fmt: skip
    result = invoke("profile", "--config", f, "--start", 512, "--memory-budget", "5.3GB", "--no-efficient-attention")
    assert result.exit_code == 0, result.output
    search = seen["profile"].profile
    assert (search.granularity, search.max_len, search.start, search.memory_budget) == (128, 2048, 512, "5.3GB")
    assert seen["profile"].memory.attention == "stock"
    result = invoke("profile", "--max-len", 512, "--start", 1024)
    assert result.exit_code == 1 and result.output.strip().splitlines()[-1] == (
        "Error: config: profile.max_len (512) must be at least profile.start (1024) (--max-len, --start)"
    )
