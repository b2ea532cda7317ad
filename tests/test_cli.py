"""The command as a user runs it: a subprocess, checked for its files, its exit code and its stderr."""

import json
import math

import pytest
from conftest import run_cli, write_files

import mlx_ltc

TINY = ("--model", "tiny-starcoder2", "--seq-len", "64", "--quiet")


def assert_one_line_error(proc, fragment):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and fragment in errors[0], proc.stderr


def test_version():
    proc = run_cli("--version")
    assert proc.returncode == 0 and mlx_ltc.__version__ in proc.stdout


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, cache_dir):
    root = tmp_path_factory.mktemp("e2e")
    files = {
        f"src/m{i}.py": "".join(f"def f{i}_{j}(a):\n    return a + {i * j}\n\n" for j in range(40)) for i in range(6)
    }
    repo = write_files(root / "repo", files)
    out = root / "run"
    proc = run_cli("train", "--repo", repo, "--out", out, "--max-steps", "6", *TINY)
    assert proc.returncode == 0, proc.stderr
    return repo, out, proc


def test_train_writes_a_complete_run(tiny_run):
    repo, out, proc = tiny_run
    report = json.loads((out / "report.json").read_text())
    for key in ("base", "adapted"):
        assert report[key]["val_tokens"] > 0
        assert math.isclose(report[key]["val_ppl"], math.exp(report[key]["val_loss"]), rel_tol=1e-9)
    assert report["compute"]["dequantized"] is True  # CPU backend here
    assert (out / "adapters" / "adapters.safetensors").is_file()
    config = json.loads((out / "adapters" / "adapter_config.json").read_text())
    derived = json.loads((out / "data" / "analysis.json").read_text())["constants"]["lora_rank"]
    assert derived["inputs"]["seq_len"] == 64  # --seq-len feeds the other constants
    assert config["fine_tune_type"] == "lora" and config["lora_parameters"]["rank"] == derived["value"]
    plan = json.loads((out / "plan.json").read_text())  # resolved once; what config.json records and resume reads
    assert plan["config"] == json.loads((out / "config.json").read_text())["config"]
    assert plan["seq_len"]["source"] == "flag" and plan["lora_rank"]["source"] == "derived"
    assert plan["lora_rank"]["value"] == derived["value"] and "plan: seq_len 64, batch 1" in proc.stderr
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = report["train"]["steps"]  # 6, or fewer when the orchestrator saw convergence
    assert 1 < steps <= 6 and [m["step"] for m in metrics] == list(range(1, steps + 1))
    assert all("loss" in m for m in metrics)
    meta = json.loads((out / "data" / "metadata.json").read_text())
    train_files = set(meta["files_by_split"]["train"])
    assert train_files and not train_files & set(meta["files_by_split"]["val"])
    assert report["data"]["sequences"]["train"] > 0 and report["data"]["packing_efficiency"] > 0.5
    assert (out / "COMPLETE").is_file()
    assert proc.stdout.startswith("fine-tuned tiny-starcoder2 on repo: held-out files' perplexity base ")


def test_mlx_lm_loader_reproduces_the_reported_validation_loss(tiny_run):
    """The adapter in mlx-lm's own loader (4-bit model, not our dequantized copy) gives our number."""
    import subprocess
    import sys
    from pathlib import Path

    _, out, _ = tiny_run
    script = Path(__file__).resolve().parents[1] / "scripts" / "verify_adapters.py"
    proc = subprocess.run([sys.executable, script, out], capture_output=True, text=True)
    assert proc.returncode == 0 and "OK (tolerance 0.001)" in proc.stdout, proc.stdout + proc.stderr


def test_finished_run_is_never_overwritten_by_accident(tiny_run):
    repo, out, _ = tiny_run
    before = (out / "report.json").read_text()
    proc = run_cli("train", "--repo", repo, "--out", out, "--max-steps", "1", *TINY)
    assert_one_line_error(proc, "already holds a finished run")
    assert (out / "report.json").read_text() == before


@pytest.mark.parametrize(
    "files, args, message",
    [
        (None, (), "does not exist"),
        ({}, (), "is empty"),
        ({"a.bin": b"\0\1", "b.dat": b"\xff\xfe\0"}, (), "no text source files"),
        ({"only.py": "x = 1\n"}, (), "too small to hold out validation files"),
        ({"a.py": "x = 1\n", "b.py": "y = 2\n"}, ("--model", "no-such-model"), "not found"),
        ({"a.py": "x = 1\n", "b.py": "y = 2\n"}, ("--seq-len", "4"), "data.seq_len must be at least 16"),
    ],
)
def test_bad_input_is_one_line_and_leaves_no_run(tmp_path, cache_dir, files, args, message):
    repo = tmp_path / "repo"
    if files is not None:
        repo.mkdir()
        write_files(repo, files)
    out = tmp_path / "out"
    proc = run_cli("train", "--repo", repo, "--out", out, "--max-steps", "1", "--model", "tiny-starcoder2", *args)
    assert_one_line_error(proc, message)
    assert not out.exists()


def test_a_curriculum_on_the_torch_backend_is_one_line(tmp_path, small_repo):
    """The torch reference trains one phase: asking it for more is an error, not silently ignored."""
    config = tmp_path / "phases.yaml"
    config.write_text("curriculum:\n  phases: 2\n")
    out = tmp_path / "out"
    proc = run_cli("train", "--repo", small_repo, "--out", out, "--backend", "torch", "--config", config, *TINY)
    assert_one_line_error(proc, "the torch backend trains one phase")
    assert not out.exists()


def test_bad_config_file_is_one_line(tmp_path, small_repo):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  learning_rate: 0.1\n")
    proc = run_cli("train", "--repo", small_repo, "--out", tmp_path / "o", "--config", cfg)
    assert_one_line_error(proc, "unknown key train.learning_rate")


def test_unfinished_run_needs_overwrite(tmp_path, small_repo):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text("{}")
    proc = run_cli("train", "--repo", small_repo, "--out", out, "--max-steps", "1", *TINY)
    assert_one_line_error(proc, "unfinished run")
    (out / "x").write_text("")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    proc = run_cli("train", "--repo", small_repo, "--out", foreign, "--overwrite", *TINY)
    assert_one_line_error(proc, "not an mlx-ltc run")
    assert (foreign / "notes.txt").read_text() == "mine"


def test_mlx_lm_fuse_and_generate_accept_our_adapters(tiny_run, tmp_path):
    """mlx-lm's own commands take the adapter directory; the fused model computes what the adapter does."""
    import subprocess
    import sys

    import mlx.core as mx
    from mlx_lm.utils import load

    _, out, _ = tiny_run
    model_dir = json.loads((out / "report.json").read_text())["model_dir"]
    adapters = str(out / "adapters")
    fused = tmp_path / "fused"
    mlx_lm = [sys.executable, "-m", "mlx_lm"]
    proc = subprocess.run(
        [*mlx_lm, "fuse", "--model", model_dir, "--adapter-path", adapters, "--save-path", fused],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    proc = subprocess.run(
        [
            *mlx_lm,
            "generate",
            "--model",
            model_dir,
            "--adapter-path",
            adapters,
            "--prompt",
            "def f",
            "--max-tokens",
            "4",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0 and "Generation:" in proc.stdout, proc.stderr
    ids = mx.array([[5, 600, 7000, 80, 9, 10, 11]])
    with_adapter, _ = load(model_dir, adapter_path=adapters)
    fused_model, _ = load(str(fused))
    # fusing re-quantizes W + BA to 4 bits, so agreement is to quantization error, not exact
    a, b = with_adapter(ids), fused_model(ids)
    assert (a.argmax(-1) == b.argmax(-1)).mean().item() >= 0.8
    assert mx.abs(a - b).mean().item() < 0.1 * mx.abs(a).mean().item()


def test_overwrite_with_bad_input_keeps_the_old_run(tiny_run, tmp_path):
    _, out, _ = tiny_run
    before = sorted(p.name for p in out.iterdir())
    proc = run_cli("train", "--repo", tmp_path / "missing", "--out", out, "--overwrite", *TINY)
    assert_one_line_error(proc, "does not exist")
    assert sorted(p.name for p in out.iterdir()) == before


@pytest.mark.parametrize(
    "command, text, message",
    [
        (("bk", "train", "--out", "o"), "bk:\n  model:\n    d_model: 0\n", "bk.model.d_model must be at least 1"),
        (("bk", "eval", "run"), "bk:\n  eval:\n    chunks: 64\n", "unknown key bk.eval.chunks"),
        (("mc", "train", "--repo", ".", "--out", "o"), "mc:\n  train:\n    cycle: 3\n", "unknown key mc.train.cycle"),
        (("mc", "eval", "run", "--json", "r.json"), "mc:\n  eval:\n    budgets: [0]\n", "mc.eval.budgets must be at"),
        (("eval", "run"), "evaluate:\n  chunk: fast\n", "evaluate.chunk must be int, got str 'fast'"),
        (("compare",), "compare:\n  steps: [1]\n", "compare.steps must be int"),
    ],
)
def test_a_bad_config_file_is_one_line_for_every_command(tmp_path, command, text, message):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    proc = run_cli(*command, "--config", cfg, cwd=tmp_path)
    assert_one_line_error(proc, message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]
