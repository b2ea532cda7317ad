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
