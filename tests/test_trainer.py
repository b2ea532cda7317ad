"""The training loop as an unattended run sees it: kills, Ctrl-C, corrupt checkpoints, NaNs, spikes."""

import json
import shutil
import signal
import subprocess
import sys
import time

import mlx.core as mx
import numpy as np
import pytest
from conftest import run_cli, write_files

from mlx_ltc import models
from mlx_ltc.train.lora import apply_lora
from mlx_ltc.config import Config, LoraConfig, TrainConfig, merge
from mlx_ltc.data import Split
from mlx_ltc.train import phases
from mlx_ltc.runtime.checkpoints import Checkpoints
from mlx_ltc.train.trainer import Trainer

STEPS = 16
RUN_CONFIG = """
curriculum: {phases: 2}
orchestrator: {converge_tol: 0.0, eval_every: 2, eval_sequences: 2}
train: {lr: 0.003}
"""


def metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def repo_and_config(tmp_path_factory, cache_dir):
    root = tmp_path_factory.mktemp("resume")
    files = {
        f"src/m{i}.py": "".join(f"def f{i}_{j}(a, b):\n    return a * {j} + b - {i}\n\n" for j in range(60))
        for i in range(8)
    }
    repo = write_files(root / "repo", files)
    (root / "run.yaml").write_text(RUN_CONFIG)
    return root, repo, root / "run.yaml"


def train_args(repo, config, out):
    return ["train", "--repo", repo, "--out", out, "--config", config, "--model", "tiny-starcoder2",
            "--seq-len", "128", "--max-steps", str(STEPS), "--save-every", "3", "--quiet"]  # fmt: skip


@pytest.fixture(scope="module")
def reference_run(repo_and_config):
    root, repo, config = repo_and_config
    proc = run_cli(*train_args(repo, config, root / "reference"))
    assert proc.returncode == 0, proc.stderr
    return root / "reference"


def start(args):
    return subprocess.Popen(
        [sys.executable, "-m", "mlx_ltc", *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def wait_for_steps(proc, run, n):
    while proc.poll() is None:
        if (run / "metrics.jsonl").exists() and len((run / "metrics.jsonl").read_text().splitlines()) >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"the run ended before step {n}: {proc.stderr.read()}")


def test_a_multi_phase_run_logs_every_step_its_phases_and_its_decisions(reference_run):
    rows = metrics(reference_run)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for key in ("phase", "seq_len", "loss", "lr", "grad_norm", "tokens_per_s", "peak_memory_gb", "spikes", "events"):
        assert all(key in r for r in rows), key
    assert [r["seq_len"] for r in rows] == [64] * 9 + [128] * 7  # shares 0.35 : 0.25 of 16 updates
    evals = [r for r in rows if "val_loss" in r]
    assert len(evals) >= 6 and all(np.isclose(r["val_ppl"], np.exp(r["val_loss"])) for r in evals)
    assert any(e.startswith("phase: phase 2 at 128 tokens") for e in rows[9]["events"])
    events = [json.loads(line) for line in (reference_run / "events.jsonl").read_text().splitlines()]
    assert {"phase", "checkpoint", "best"} <= {e["kind"] for e in events}
    report = json.loads((reference_run / "report.json").read_text())
    cur = report["train"]["curriculum"]
    assert [p["seq_len"] for p in cur["phases"]] == [64, 128] and cur["stability"]["rollbacks"] == 0
    assert (reference_run / "plots" / "training.png").stat().st_size > 10_000
    assert "per phase" in (reference_run / "summary.txt").read_text()


@pytest.mark.slow
def test_sigkill_at_an_arbitrary_step_then_resume_repeats_the_same_losses(repo_and_config, reference_run):
    root, repo, config = repo_and_config
    out = root / "killed"
    kill_at = int(np.random.default_rng().integers(4, STEPS - 2))
    proc = start(train_args(repo, config, out))
    wait_for_steps(proc, out, kill_at)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "COMPLETE").exists()
    resumed = run_cli("train", "--resume", out, "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from the checkpoint at step" in resumed.stderr
    ours, ref = metrics(out), metrics(reference_run)
    assert [r["step"] for r in ours] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in ours] == [r["loss"] for r in ref], f"killed after step {kill_at}"
    assert [r.get("val_loss") for r in ours] == [r.get("val_loss") for r in ref]
    a = mx.load(str(out / "adapters" / "adapters.safetensors"))
    b = mx.load(str(reference_run / "adapters" / "adapters.safetensors"))
    assert all(mx.array_equal(a[k], b[k]).item() for k in b)


@pytest.mark.slow
def test_ctrl_c_saves_and_exits_then_resume_finishes_identically(repo_and_config, reference_run):
    root, repo, config = repo_and_config
    out = root / "interrupted"
    proc = start(train_args(repo, config, out))
    wait_for_steps(proc, out, 5)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130 and "Traceback" not in stderr
    assert "saved a checkpoint at step" in stderr and f"--resume {out}" in stderr
    stopped = len(metrics(out))
    assert Checkpoints(out).steps()[-1] == stopped  # the checkpoint is the last finished step
    (out / "plan.json").unlink()  # as a run written before plans: resume reads config.json's config
    resumed = run_cli("train", "--resume", out, "--max-steps", str(STEPS), "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert [r["loss"] for r in metrics(out)] == [r["loss"] for r in metrics(reference_run)]
    assert (out / "COMPLETE").is_file()


def test_resume_rejects_what_it_cannot_continue(repo_and_config, reference_run, tmp_path):
    root, repo, _ = repo_and_config
    early = tmp_path / "early"  # stopped while writing its first checkpoint: training had not begun
    (early / "checkpoints" / ".step-0000000.tmp").mkdir(parents=True)
    (early / "config.json").write_text("{}")
    for args, message in [
        ((tmp_path,), "not an mlx-ltc run directory"),
        ((reference_run,), "already complete"),
        ((reference_run, "--model", "tiny-starcoder2"), "drop model"),
        ((early,), "stopped before training began"),
    ]:
        proc = run_cli("train", "--resume", *args)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
        assert proc.returncode == 1 and len(errors) == 1 and message in errors[0], proc.stderr
        assert "Traceback" not in proc.stderr


def test_a_run_stopped_before_its_base_eval_resumes_and_measures_it(reference_run, tmp_path):
    """The base eval comes after training (adapters off): a run stopped before it has no base_eval.json,
    and its resume measures the same numbers as the uninterrupted run."""
    out = tmp_path / "stopped"
    shutil.copytree(reference_run, out)
    for name in ("COMPLETE", "base_eval.json", "report.json", "summary.txt"):
        (out / name).unlink()
    resumed = run_cli("train", "--resume", out, "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert "eval: base model (adapters off)" in resumed.stderr and (out / "COMPLETE").is_file()
    read = lambda run, name: json.loads((run / name).read_text())  # noqa: E731
    assert read(out, "base_eval.json") == read(reference_run, "base_eval.json")
    assert read(out, "report.json")["base"] == read(reference_run, "report.json")["base"]


@pytest.mark.skipif(__import__("importlib").util.find_spec("wandb") is not None, reason="wandb is installed")
def test_report_to_wandb_without_wandb_is_one_line(small_repo, tmp_path):
    proc = run_cli("train", "--repo", small_repo, "--out", tmp_path / "r", "--model", "tiny-starcoder2",
                   "--report-to", "wandb", "--quiet")  # fmt: skip
    assert proc.returncode == 1 and "pip install wandb" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "r").exists()


# --- in process: fault injection and damaged checkpoints ---------------------------------------------


def windows(n, length, seed=0):
    rng = np.random.default_rng(seed)
    return Split.from_rows([rng.integers(100, 3000, length, dtype=np.int32) for _ in range(n)])


def trainer(tiny_dir, run_dir, split, n_phases=1, orchestrator=None, **stability):
    loaded = models.load(tiny_dir, dequantize="always")
    apply_lora(loaded.model, LoraConfig(rank=4))
    cfg = merge(
        Config(train=TrainConfig(max_steps=24, lr=1e-3, warmup_steps=2, batch_size=2)),
        {
            "data": {"seq_len": split.tokens.shape[1]},
            "curriculum": {"phases": n_phases},
            "orchestrator": {"converge_tol": 0.0, "eval_every": 4, **(orchestrator or {})},
            "checkpoint": {"save_every": 2},
            "stability": stability,
        },
    )
    t = Trainer(loaded.model, split, split, cfg, run_dir, log=lambda m: None, progress=False)
    t.start(phases.total_steps(cfg, len(split)))
    return t


@pytest.mark.slow
def test_injected_nans_and_spikes_roll_back_and_the_run_finishes(tiny_dir, tmp_path):
    t = trainer(tiny_dir, tmp_path, windows(8, 33), inject_nan=[5, 6, 7], inject_spike=[14, 15, 16])
    result = t.run()
    rows = metrics(tmp_path)
    assert result.steps == 24 and [r["step"] for r in rows] == list(range(1, 25))
    assert all(np.isfinite(r["loss"]) for r in rows) and max(r["loss"] for r in rows) < 2 * rows[0]["loss"]
    counts = result.curriculum["stability"]
    assert counts == {"spikes": 3, "skipped": 3, "rollbacks": 2}
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    rollbacks = [e for e in events if e["kind"] == "rollback"]
    assert len(rollbacks) == 2 and all(e["step"] % 2 == 0 for e in rollbacks)  # to a saved step
    plan_lr = phases.lr_at(t.cfg.train, t.plan[0], 23)
    assert rows[-1]["lr"] == pytest.approx(plan_lr / 4)  # halved at each rollback, not undone by the schedule
    assert t.state.attempts >= 24 + 3 + 3  # the skipped updates and the rolled-back spike steps were redone


@pytest.mark.slow
def test_an_early_advance_hands_its_unused_updates_to_the_next_phase(tiny_dir, tmp_path):
    always = {"converge_tol": 10.0, "context_tol": -1.0, "converge_evals": 1, "min_phase_share": 0.0}
    t = trainer(tiny_dir, tmp_path, windows(8, 65), n_phases=2, orchestrator=always)
    planned = [p.steps for p in t.plan]
    result = t.run()
    rows = metrics(tmp_path)
    first = [r for r in rows if r["phase"] == 1]
    assert len(first) == 8 < planned[0]  # the second eval (every 4 steps) sees convergence
    assert any(e.startswith("advance: converged") for e in rows[7]["events"])
    assert any(e.startswith("phase: phase 2") for e in rows[8]["events"])
    assert [p.steps for p in t.plan] == [8, sum(planned) - 8]
    assert result.steps == 16 and rows[-1]["events"][-1].startswith("stop: converged")  # the last phase, too


def test_too_many_rollbacks_stop_with_one_clear_error(tiny_dir, tmp_path):
    from mlx_ltc.errors import UserError

    t = trainer(tiny_dir, tmp_path, windows(8, 33), inject_nan=list(range(3, 40)), max_rollbacks=2)
    with pytest.raises(UserError, match="training is unstable: 2 rollbacks"):
        t.run()
    assert Checkpoints(tmp_path).load() is not None  # the run directory keeps its good checkpoints


def test_a_damaged_checkpoint_is_reported_and_the_previous_one_used(tmp_path):
    messages = []
    ck = Checkpoints(tmp_path, keep_last=5, log=messages.append)
    for step in (2, 4, 6):
        ck.save(step, {"a": mx.full((8,), float(step))}, {"step": mx.array(step, mx.uint64)}, {"good": True})
    assert ck.verify(6) is None
    path = ck.path(6) / "adapters.safetensors"
    path.write_bytes(path.read_bytes()[:-7])  # truncated
    step, adapters, optimizer, _ = ck.load()
    assert step == 4 and adapters["a"][0].item() == 4.0 and optimizer["step"].item() == 4
    assert "step-0000006" in messages[0] and "truncated" in messages[0]
    data = bytearray((ck.path(4) / "state.json").read_bytes())
    data[0:1] = b" "
    (ck.path(4) / "state.json").write_bytes(bytes(data))  # same size, other bytes
    assert ck.load()[0] == 2 and "checksum" in messages[-1]
    ck.prune(keep={2})
    ck.keep_last = 1
    ck.prune(keep={2})
    assert ck.steps() == [2, 6]  # the last one and the kept one
