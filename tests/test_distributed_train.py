"""Training on two local ranks under `mlx.launch --backend ring`: the same numbers as one process, rank 0
alone writes the run, and a checkpoint resumes with another number of ranks."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import pytest

from mlx_ltc.launch import free_port
from conftest import ring_package, write_files

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
STEPS = 10
# No early stop, an eval every 5 steps to compare, two sequences per update (one per rank)
CONFIG = """
train:
  batch_size: 2
orchestrator:
  converge_tol: 0.0
  converge_evals: 100
  overfit_gap: 100.0
  eval_every: 5
  eval_sequences: 2
"""
ENGINE = "memory:\n  policy: engine\n"


def launch_cmd(*args, n=2):
    return [BIN / "mlx.launch", "-n", str(n), "--backend", "ring", "--starting-port", str(free_port()), "--",
            BIN / "mlx-ltc", *map(str, args)]  # fmt: skip


def single_cmd(*args):
    return [sys.executable, "-m", "mlx_ltc", *map(str, args)]


def start(cmd, logs: Path):
    """Start a command with its output in files and TMPDIR in `logs`' parent (where rank 1 keeps its private
    dataset; other tests' launches leave theirs elsewhere). Its stdin is a pipe left open: mlx.launch polls
    stdin and would spin on /dev/null's end of file."""
    logs.mkdir(parents=True, exist_ok=True)
    out, err = open(logs / "stdout", "w"), open(logs / "stderr", "w")
    env = {**os.environ, "TMPDIR": str(tmp_of(logs))}
    proc = subprocess.Popen(list(map(str, cmd)), stdin=subprocess.PIPE, stdout=out, stderr=err, text=True, env=env)
    proc.logs = logs
    return proc


def finish(proc, timeout=900):
    try:
        proc.wait(timeout=timeout)
    finally:
        proc.stdin.close()
    return proc.returncode, (proc.logs / "stdout").read_text(), (proc.logs / "stderr").read_text()


def run(cmd, logs: Path):
    return finish(start(cmd, logs))


def tmp_of(logs: Path) -> Path:
    tmp = logs.parent / "tmp"
    tmp.mkdir(exist_ok=True)
    return tmp


def rank_dirs(root: Path) -> list:
    return sorted(p.name for p in tmp_of(root / "logs").glob("mlx-ltc-rank*"))


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def adapters(out):
    (path,) = (out / "adapters").glob("*.safetensors")
    return mx.load(str(path))


def rank0_of(launcher: subprocess.Popen) -> int:
    """The pid of the launcher's child whose environment says MLX_RANK=0."""
    for _ in range(600):
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                env = (entry / "environ").read_bytes().split(b"\0") if ppid == launcher.pid else []
            except (OSError, IndexError, ValueError):
                continue
            if b"MLX_RANK=0" in env:
                return int(entry.name)
        time.sleep(0.1)
    raise AssertionError("mlx.launch started no rank 0")


def interrupt_after(proc, out, steps, pid=None):
    """Ctrl-C (to `pid`, the process itself by default) once `steps` updates are in metrics.jsonl."""
    path = out / "metrics.jsonl"
    while proc.poll() is None:
        if path.exists() and len(path.read_text().splitlines()) >= steps:
            os.kill(pid or proc.pid, signal.SIGINT)
            return rank_dirs(out.parent)
        time.sleep(0.02)
    raise AssertionError(f"the run ended before step {steps}: {(proc.logs / 'stderr').read_text()}")


def close(a, b, tol=1e-4):
    return abs(a - b) <= tol


@pytest.fixture(scope="module")
def setup(tmp_path_factory, cache_dir):
    root = tmp_path_factory.mktemp("dist")
    repo = write_files(root / "repo", ring_package())
    (root / "b2.yaml").write_text(CONFIG)
    (root / "b2_engine.yaml").write_text(CONFIG + ENGINE)
    return root, repo


def train_args(repo, out, config, *extra):
    return ["train", "--repo", repo, "--out", out, "--max-steps", STEPS, "--model", "tiny-starcoder2",
            "--config", config, "--quiet", *extra]  # fmt: skip


@pytest.fixture(scope="module")
def data_parallel(setup):
    """(one process, two ranks, the launcher's (rc, stdout, stderr), tmp rank dirs before, after)."""
    root, repo = setup
    one, two = root / "one", root / "two"
    rc, _, err = run(single_cmd(*train_args(repo, one, root / "b2.yaml", "--seq-len", "64")), root / "logs-one")
    assert rc == 0, err
    launched = run(launch_cmd(*train_args(repo, two, root / "b2.yaml", "--seq-len", "64")), root / "logs-two")
    return one, two, launched, rank_dirs(root)


def test_data_parallel_repeats_one_process(data_parallel):
    one, two, (rc, stdout, stderr), left = data_parallel
    assert rc == 0, stderr
    ref, ours = metrics(one), metrics(two)
    assert [r["step"] for r in ref] == [r["step"] for r in ours] == list(range(1, STEPS + 1))
    for a, b in zip(ours, ref):
        assert close(a["loss"], b["loss"]), (a, b)
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-4 * abs(b["grad_norm"]), (a, b)
        assert ("val_loss" in a) == ("val_loss" in b)
        assert "val_loss" not in b or close(a["val_loss"], b["val_loss"]), (a, b)
    assert any("val_loss" in r for r in ref)
    x, y = adapters(two), adapters(one)
    assert x.keys() == y.keys()
    assert all(mx.allclose(x[k], y[k], rtol=0, atol=1e-4).item() for k in y)


def test_rank_0_alone_writes_the_run_and_reports_once(data_parallel):
    one, two, (rc, stdout, stderr), left = data_parallel
    assert rc == 0, stderr
    assert all(r["ranks"] == 2 and r["all_reduce_s"] >= 0 and r["wait_s"] >= 0 for r in metrics(two))
    assert not any("ranks" in r for r in metrics(one))
    for name in ("report.json", "COMPLETE", "events.jsonl", "metrics.jsonl"):
        assert (two / name).is_file(), name
    assert json.loads((two / "report.json").read_text())["train"]["steps"] == STEPS
    summaries = [line for line in stdout.splitlines() if line.startswith("fine-tuned tiny-starcoder2")]
    assert len(summaries) == 1 and stdout.startswith("fine-tuned tiny-starcoder2"), stdout
    assert left == []  # rank 1's private dataset is gone


def test_context_parallel_repeats_one_process(setup):
    root, repo = setup
    one, two = root / "cp-one", root / "cp-two"
    args = ("--seq-len", "128", "--max-steps", "5")
    rc, _, err = run(single_cmd(*train_args(repo, one, root / "b2_engine.yaml", *args)), root / "logs-cp-one")
    assert rc == 0, err
    rc, _, err = run(launch_cmd(*train_args(repo, two, root / "b2.yaml", *args, "--context-parallel")),
                     root / "logs-cp-two")  # fmt: skip
    assert rc == 0, err
    ref, ours = metrics(one), metrics(two)
    assert [r["step"] for r in ours] == [r["step"] for r in ref] == [1, 2, 3, 4, 5]
    assert all(close(a["loss"], b["loss"]) for a, b in zip(ours, ref)), [
        (a["loss"], b["loss"]) for a, b in zip(ours, ref)
    ]
    assert all(r["ranks"] == 2 for r in ours)


def test_ctrl_c_then_resume_on_another_number_of_ranks(setup, data_parallel):
    """Two ranks, Ctrl-C to rank 0; resumed by one process, Ctrl-C; resumed on two ranks to the end: the
    uninterrupted one-process run's losses, step for step."""
    root, repo = setup
    out = root / "resumed"
    resume = ("train", "--resume", out, "--max-steps", STEPS, "--quiet")
    legs = [launch_cmd(*train_args(repo, out, root / "b2.yaml", "--seq-len", "64")), single_cmd(*resume)]
    stops = []
    for i, cmd in enumerate(legs):
        proc = start(cmd, root / f"logs-leg{i}")
        seen = interrupt_after(proc, out, (stops or [0])[-1] + 2, pid=rank0_of(proc) if i == 0 else None)
        rc, _, err = finish(proc, timeout=600)
        assert "Traceback" not in err and f"--resume {out}" in err, err  # mlx.launch exits 0 whatever its ranks do
        assert rc == (0 if i == 0 else 130) and not (out / "COMPLETE").exists()
        stops.append(len(metrics(out)))
        assert stops[-1] < STEPS
        if i == 0:
            assert len(seen) == 1 and seen[0].startswith("mlx-ltc-rank1-"), seen  # rank 1's copy, while it ran
            assert rank_dirs(root) == [], "rank 1's private dataset outlived a Ctrl-C"
            leg0_stderr = err
    rc, stdout, err = run(launch_cmd(*resume), root / "logs-leg2")
    assert rc == 0 and "resumed from the checkpoint at step" in err and (out / "COMPLETE").is_file(), err
    assert stdout.count("fine-tuned tiny-starcoder2") == 1, stdout
    ours, ref = metrics(out), metrics(data_parallel[0])
    assert [r["step"] for r in ours] == list(range(1, STEPS + 1))
    assert all(close(a["loss"], b["loss"]) for a, b in zip(ours, ref)), [
        (a["loss"], b["loss"]) for a, b in zip(ours, ref)
    ]
    k1, k2 = stops
    assert [r.get("ranks", 1) for r in ours] == [2] * k1 + [1] * (k2 - k1) + [2] * (STEPS - k2)
    assert rank_dirs(root) == []
    # rank 1 prints nothing: one resume hint, naming the run directory (not rank 1's private copy)
    assert leg0_stderr.count("--resume") == 1, leg0_stderr
