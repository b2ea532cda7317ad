"""Two ranks under `mlx.launch -n 2 --backend ring` on this machine: the distributed gradients equal one
process's, a killed rank ends the run with whole checkpoints that resume, and bad input is one line per rank.

mlx.launch (mlx 0.32) exits 0 whatever its ranks do; what it says of each rank is a line on stderr,
"[WARN] Node with rank R exited with code C" (only for a non-zero C), so that is what these tests read.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mlx_ltc.launch import free_port
from conftest import write_files

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
LAUNCH = BIN / "mlx.launch"
CLI = BIN / "mlx-ltc"
HERE = Path(__file__).resolve().parent
TINY = ("--model", "tiny-starcoder2", "--seq-len", "64", "--quiet")

# Runs one rank of mlx-ltc in this process (no OpenBLAS re-exec, which would start a fresh interpreter),
# so that rank 1 can be given other arguments or another version than rank 0.
WRAPPER = """\
import json, os, sys
import mlx_ltc
os.environ["MLX_LTC_BLAS_CHECKED"] = "1"
args = sys.argv[1:]
if os.environ.get("MLX_RANK") == "1":
    args += json.loads(os.environ.get("RANK1_EXTRA", "[]"))
    mlx_ltc.__version__ = os.environ.get("RANK1_VERSION", mlx_ltc.__version__)
from mlx_ltc.cli import main
sys.argv = ["mlx-ltc", *args]
sys.exit(main())
"""


def launch_args(*command, n=2) -> list:
    return [
        str(LAUNCH),
        "-n",
        str(n),
        "--backend",
        "ring",
        "--starting-port",
        str(free_port()),
        "--",
        *map(str, command),
    ]


def launch(*command, env=None, timeout=600):
    return subprocess.run(
        launch_args(*command), capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=timeout
    )


def rank_exits(stderr: str) -> dict:
    """{rank: exit code} of the ranks the launcher reported as failed (-N: killed by signal N)."""
    plain = re.sub(r"\x1b\[[0-9;]*m", "", stderr)
    return {int(r): int(c) for r, c in re.findall(r"\[WARN\] Node with rank (\d+) exited with code (-?\d+)", plain)}


def assert_error_on_every_rank(proc, fragment):
    """Each rank said the same one line, or was stopped by the launcher; none said it with a traceback."""
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert 1 <= len(errors) <= 2 and all(fragment in e for e in errors), proc.stderr
    assert sorted(rank_exits(proc.stderr)) == [0, 1], proc.stderr  # every rank exited non-zero


def assert_nothing_complete(out: Path):
    assert not (out / "COMPLETE").exists() and not (out / "report.json").exists()


@pytest.fixture
def wrapper(tmp_path):
    path = tmp_path / "rank_wrapper.py"
    path.write_text(WRAPPER)
    return path


@pytest.fixture
def fast_env(cache_dir):
    """OpenBLAS preloaded up front (as mlx-ltc's own re-exec would), so the wrapper's ranks are not slow."""
    from mlx_ltc.hardware import find_openblas

    lib = find_openblas()
    return {"LD_PRELOAD": lib} if lib else {}


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    files = {}
    for i in range(8):
        files[f"pkg/mod_{i}.py"] = "\n".join(
            f'def func_{i}_{j}(x, y={j}):\n    """Return a mix."""\n    total = x * {j} + y\n'
            f"    for k in range({j}):\n        total += k * x\n    return total\n"
            for j in range(12)
        )
    return write_files(tmp_path_factory.mktemp("dist") / "repo", files)


# --- numerics ---------------------------------------------------------------------------------------------


def test_two_ranks_give_the_one_process_loss_and_gradients():
    """Context parallel (StagedStep) and data parallel (Updater.gradients: 4, 3 and 1 micro-batches of one
    sequence) on starcoder2 and llama: summed over the ranks, equal to one process's (tests/distributed_worker.py)."""
    proc = launch(sys.executable, HERE / "distributed_worker.py")
    assert proc.returncode == 0 and not rank_exits(proc.stderr), proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert sorted(r["rank"] for r in lines) == [0, 1] and all(r["size"] == 2 for r in lines), proc.stdout
    expected = [
        c
        for k in ("starcoder2", "llama")
        for c in (f"context_parallel/{k}", *(f"data_parallel/{k}/{m}" for m in (4, 3, 1)))
    ]
    sequences = {}
    for rank in lines:
        assert [r["case"] for r in rank["results"]] == expected
        for r in rank["results"]:
            assert r["loss"] < 1e-4 and r["grads"] < 1e-4, (rank["rank"], r)
            if r["case"].startswith("context_parallel"):
                assert r["count"] < 1e-4 and r["nll"] < 1e-4 and r["nll_shape_equal"], (rank["rank"], r)
            else:
                assert r["tokens"][0] == r["tokens"][1], (rank["rank"], r)
                sequences.setdefault(r["case"], {})[rank["rank"]] = r["my_sequences"]
    # the data-parallel split really is a split: 2 + 2, 1 + 2, and 0 + 1 (one rank gets no sequence)
    for case, by_rank in sequences.items():
        micro = int(case.rsplit("/", 1)[1])
        assert sum(by_rank.values()) == micro and max(by_rank.values()) - min(by_rank.values()) <= 1, case


# --- a rank dies ------------------------------------------------------------------------------------------


def rank_pid(rank: int, out: Path) -> int | None:
    """The pid of the mlx-ltc process with MLX_RANK=rank that trains into `out`."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"MLX_RANK={rank}".encode() in environ and str(out).encode() in cmdline and b"train" in cmdline:
            return int(proc.name)
    return None


def test_a_killed_rank_stops_the_run_with_whole_checkpoints_that_resume(tmp_path, repo, tiny_dir):
    from mlx_ltc.runtime.checkpoints import Checkpoints

    out = tmp_path / "out"
    err_path = tmp_path / "stderr.txt"
    args = launch_args(CLI, "train", "--repo", repo, "--out", out, "--max-steps", "400", "--save-every", "2", *TINY)
    with open(err_path, "w") as err, open(tmp_path / "stdout.txt", "w") as stdout:
        launcher = subprocess.Popen(args, stdout=stdout, stderr=err, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while not [s for s in Checkpoints(out).steps() if s > 0]:
            assert launcher.poll() is None, err_path.read_text()
            assert time.monotonic() < deadline, "no step checkpoint after 600 s\n" + err_path.read_text()
            time.sleep(0.5)
        pid = rank_pid(1, out)
        assert pid is not None, "rank 1 not found"
        os.kill(pid, signal.SIGKILL)
        try:
            launcher.wait(timeout=180)  # a surviving rank blocked in a collective would hang here
        except subprocess.TimeoutExpired:
            pytest.fail("the launcher still runs 180 s after rank 1 was killed\n" + err_path.read_text()[-3000:])
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
    stderr = err_path.read_text()
    exits = rank_exits(stderr)
    assert exits.get(1) == -signal.SIGKILL and 0 in exits, stderr[-3000:]  # which rank died, and rank 0 stopped too
    # rank 0 says so in one line when it notices before the launcher's SIGTERM reaches it; never a traceback
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("Error:")]
    assert all("rank 0: lost the connection to another rank" in e and f"--resume {out}" in e for e in errors), errors
    assert_nothing_complete(out)
    checkpoints = Checkpoints(out)
    names = checkpoints.names()
    assert names and all(checkpoints.verify(name) is None for name in names), names
    last = max(checkpoints.steps())

    resumed = subprocess.run(
        [str(CLI), "train", "--resume", str(out), "--max-steps", str(last + 2), "--quiet"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert (out / "COMPLETE").is_file() and (out / "report.json").is_file()
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["kind"] == "resume"] == [last]
    assert json.loads((out / "report.json").read_text())["train"]["steps"] == last + 2


# --- bad input --------------------------------------------------------------------------------------------


def test_context_parallel_without_mlx_launch_is_one_line(tmp_path, repo, cache_dir):
    out = tmp_path / "out"
    proc = subprocess.run(
        [str(CLI), "train", "--repo", str(repo), "--out", str(out), "--max-steps", "1", "--context-parallel", *TINY],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "mlx.launch" in errors[0], proc.stderr
    assert not out.exists()


@pytest.mark.parametrize(
    "rank1, message",
    [
        ({"RANK1_EXTRA": '["--overwrite"]'}, "ranks disagree on --overwrite"),
        ({"RANK1_EXTRA": '["--seq-len", "128"]'}, "ranks disagree on the settings"),
        ({"RANK1_VERSION": "9.9.9"}, "ranks disagree on the mlx-ltc version"),
    ],
    ids=["overwrite", "seq-len", "version"],
)
def test_ranks_that_disagree_stop_in_one_line(tmp_path, repo, tiny_dir, wrapper, fast_env, rank1, message):
    out = tmp_path / "out"
    proc = launch(
        sys.executable, wrapper, "train", "--repo", repo, "--out", out, "--max-steps", "1", *TINY,
        env={**fast_env, **rank1},
    )  # fmt: skip
    assert_error_on_every_rank(proc, message)
    assert not out.exists()


def test_torch_backend_under_mlx_launch_is_one_line(tmp_path, repo, tiny_dir):
    out = tmp_path / "out"
    proc = launch(CLI, "train", "--repo", repo, "--out", out, "--max-steps", "1", "--context-parallel",
                  "--backend", "torch", *TINY)  # fmt: skip
    assert_error_on_every_rank(proc, "--backend torch trains in one process")
    assert not out.exists()


def test_context_parallel_with_a_non_engine_policy_is_one_line(tmp_path, repo, tiny_dir):
    config = tmp_path / "plain.yaml"
    config.write_text("memory:\n  policy: plain\n")
    out = tmp_path / "out"
    proc = launch(CLI, "train", "--repo", repo, "--out", out, "--max-steps", "1", "--context-parallel",
                  "--config", config, *TINY)  # fmt: skip
    assert_nothing_complete(out)
    assert_error_on_every_rank(proc, "memory.context_parallel needs memory.policy engine or engine_sqrt")


# --- mlx-ltc launch: the hosts checked first, the ranks' failure in the exit status ---------------------------


def test_launch_refuses_a_hostfile_with_an_unreachable_host_in_one_line(tmp_path):
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([{"ssh": "mac1.invalid", "ips": ["10.255.255.1"]},
                                    {"ssh": "mac2.invalid", "ips": ["10.255.255.2"]}]))  # fmt: skip
    proc = subprocess.run([str(CLI), "launch", "--hostfile", str(hostfile), "--backend", "ring", "--", "--version"],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "host mac1.invalid does not answer SSH" in errors[0], proc.stderr
    hostfile.write_text("not json")
    proc = subprocess.run([str(CLI), "launch", "--hostfile", str(hostfile), "--", "--version"],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 1 and "not MLX's hostfile" in proc.stderr and "Traceback" not in proc.stderr


def test_launch_exits_non_zero_when_a_rank_fails(tmp_path):
    """mlx.launch exits 0 whatever its ranks do; mlx-ltc launch says which rank failed, and exits 1."""
    out = tmp_path / "out"
    args = ["launch", "-n", "2", "--backend", "ring", "--starting-port", str(free_port()), "--",
            "train", "--repo", str(tmp_path / "missing"), "--out", str(out), *TINY]  # fmt: skip
    proc = subprocess.run([str(CLI), *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "the job did not finish" in proc.stderr.splitlines()[-1], proc.stderr
    assert not out.exists()
