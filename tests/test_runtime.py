"""The runtime every trainer shares: the run directory's guards, checkpoints with manifests, the metrics log
a resume cuts back, and Ctrl-C that asks for a stop before it aborts."""

import json
import os
import signal
import subprocess
import sys
import time

import mlx.core as mx
import pytest
from test_megacontext_run import small_repo

from mlx_ltc.errors import UserError
from mlx_ltc.runtime.checkpoints import Checkpoints
from mlx_ltc.runtime.interrupt import StopRequest
from mlx_ltc.runtime.metrics import MetricsLog
from mlx_ltc.runtime.rundir import CONTINUE, NEW, REPLACE, RunDir


def test_the_run_directory_guards(tmp_path):
    rd = RunDir(tmp_path / "run", "a test run", "run.json")
    assert rd.check(overwrite=False) == NEW
    rd.path.mkdir()
    assert rd.check(overwrite=False) == NEW  # empty
    (rd.path / "mine.txt").write_text("not a run")
    with pytest.raises(UserError, match="is a non-empty directory that is not a test run; refusing"):
        rd.check(overwrite=True)
    (rd.path / "run.json").write_text("{}")
    with pytest.raises(UserError, match="holds an unfinished run; pass --overwrite"):
        rd.check(overwrite=False)  # no rerun rule: only an explicit resume continues it
    assert rd.check(overwrite=False, changed=lambda out: []) == CONTINUE
    with pytest.raises(UserError, match=r"holds a test run with other settings \(train.lr\)"):
        rd.check(overwrite=False, changed=lambda out: ["train.lr"])
    rd.complete()
    assert rd.finished
    with pytest.raises(UserError, match="already holds a finished run"):
        rd.check(overwrite=False)
    assert rd.check(overwrite=True) == REPLACE
    rd.create(REPLACE)
    assert list(rd.path.iterdir()) == []
    rd.complete()
    rd.reopen()
    assert not rd.finished
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file, not a directory"):
        RunDir(tmp_path / "file", "a test run", "run.json").check(overwrite=True)


def test_named_checkpoints_are_verified_and_old_ones_without_a_manifest_still_read(tmp_path):
    messages = []
    ck = Checkpoints(tmp_path, log=messages.append)
    ck.write("len-0000032", {"model": {"w": mx.arange(4)}, "optimizer": {"m": mx.zeros(2)}}, {"seq_len": 32})
    (ck.root / ".len-0000064.tmp-1").mkdir()  # a write a kill interrupted: never listed
    assert ck.names("len-") == ["len-0000032"] and ck.verify("len-0000032") is None
    assert ck.state("len-0000032") == {"seq_len": 32}
    assert ck.arrays("len-0000032", "model")["w"].tolist() == [0, 1, 2, 3]
    manifest = json.loads((ck.path("len-0000032") / "manifest.json").read_text())
    assert sorted(manifest["files"]) == ["model.safetensors", "optimizer.safetensors", "state.json"]
    (ck.path("len-0000032") / "optimizer.safetensors").unlink()
    assert ck.state("len-0000032") is None and "optimizer.safetensors is missing" in messages[-1]
    legacy = ck.path("cycle1-gist")  # as `mc train` wrote them before manifests
    legacy.mkdir()
    (legacy / "records.json").write_text("[]")
    assert ck.verify("cycle1-gist") is None
    assert ck.state("nowhere") is None
    ck.remove("cycle1-gist")
    assert ck.names() == ["len-0000032"]


def test_a_damaged_step_checkpoint_without_a_manifest_falls_back_to_the_previous_one(tmp_path):
    messages = []
    ck = Checkpoints(tmp_path, log=messages.append)
    for step in (10, 20):
        ck.save(step, {"a": mx.full((2,), step)}, {"m": mx.zeros(2)}, {"good": True, "step": step})
    newest = ck.path(20)
    (newest / "manifest.json").unlink()  # as the trainer wrote checkpoints before manifests
    (newest / "adapters.safetensors").write_bytes(b"not a safetensors file")
    step, adapters, _, state = ck.load()
    assert (step, state["step"], adapters["a"].tolist()) == (10, 10, [10, 10])
    assert "step-0000020 is damaged: unreadable" in messages[-1]
    (ck.path(10) / "manifest.json").unlink()
    (ck.path(10) / "state.json").write_text("{")
    assert ck.load() is None and ck.state(10) is None and "unreadable state.json" in messages[-1]


def test_the_metrics_log_cuts_back_and_drops_a_line_a_kill_cut_short(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    assert log.rows() == []
    log.start()
    for step in range(1, 6):
        log.append({"step": step})
    with open(log.path, "a") as f:
        f.write('{"step": 6, "lo')
    assert [r["step"] for r in log.rows()] == [1, 2, 3, 4, 5]
    log.keep(lambda r: r["step"] <= 3)
    assert log.path.read_text().splitlines() == ['{"step": 1}', '{"step": 2}', '{"step": 3}']


def test_the_first_ctrl_c_asks_for_a_stop_and_the_second_aborts():
    messages = []
    before = signal.getsignal(signal.SIGINT)
    with StopRequest(messages.append, "saving after this update") as stop:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.1)
        assert stop.requested and messages == ["Ctrl-C: saving after this update (press again to abort without saving)"]
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert signal.getsignal(signal.SIGINT) is before


MC_ARGS = ("--max-steps", "6", "--cycles", "1", "--lens-contexts", "2", "--budget", "128", "--horizon", "16",
           "--split", "40/20/40", "--quiet")  # fmt: skip


def mc_train(repo, out):
    return [sys.executable, "-m", "mlx_ltc", "mc", "train", "--repo", str(repo), "--out", str(out), *MC_ARGS]


@pytest.mark.slow
def test_mc_train_stopped_with_ctrl_c_continues_to_the_same_result(tmp_path):
    repo = small_repo(tmp_path / "repo")
    straight = subprocess.run(mc_train(repo, tmp_path / "straight"), capture_output=True, text=True, timeout=900)
    assert straight.returncode == 0, straight.stderr
    out = tmp_path / "stopped"
    proc = subprocess.Popen(mc_train(repo, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = MetricsLog(out / "metrics.jsonl")
    while proc.poll() is None and not any(r["phase"] == "cycle1-lens" for r in metrics.rows()):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)  # inside the LensNet phase, after the GistNet phase's checkpoint
    stdout, stderr = proc.communicate(timeout=600)
    stderr += stdout
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr
    assert "interrupted in cycle1-lens; finished phases are saved (the last: cycle1-gist)" in stderr
    assert json.loads((out / "state.json").read_text())["done"] == ["cycle1-gist"] and not (out / "COMPLETE").exists()
    resumed = subprocess.run(mc_train(repo, out), capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr
    assert "continuing after cycle1-gist" in resumed.stdout + resumed.stderr and (out / "COMPLETE").exists()

    def losses(log):
        return [(r["phase"], r.get("step"), r.get("loss")) for r in log.rows()]

    assert losses(metrics) == losses(MetricsLog(tmp_path / "straight" / "metrics.jsonl"))
    for name in ("encoder", "lensnet", "lora"):  # the base-LoRA encoder and the reading LoRA trained with it
        a, b = (Checkpoints(run).arrays("cycle1-lora", name) for run in (out, tmp_path / "straight"))
        assert a.keys() == b.keys() and all(mx.array_equal(a[k], b[k]).item() for k in a), name
