import os
import subprocess
import sys
from pathlib import Path

import pytest

from mlx_ltc import hardware

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(sys.platform != "linux" or hardware.find_openblas() is None, reason="needs Linux with OpenBLAS")
def test_tests_run_with_openblas_preloaded():
    assert hardware.find_openblas() in os.environ.get("LD_PRELOAD", "").split(":")


def test_re_executed_pytest_still_reports_failures(tmp_path):
    """The preload re-exec must not swallow pytest's output or exit code (it did once, from a conftest)."""
    (tmp_path / "test_fails.py").write_text("def test_ok():\n    pass\n\ndef test_fails():\n    assert 1 == 2\n")
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MLX_LTC_BLAS_CHECKED")}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "mlx_ltc.hardware.pytest_preload",
            "-p",
            "no:cacheprovider",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 1
    assert "1 failed, 1 passed" in proc.stdout


@pytest.mark.skipif(sys.platform != "linux", reason="the preload is Linux-only")
def test_train_warns_once_when_no_openblas_is_available(tmp_path):
    env = {**os.environ, "MLX_LTC_BLAS": "none"}
    env.pop("MLX_LTC_BLAS_CHECKED", None)
    proc = subprocess.run(
        [sys.executable, "-m", "mlx_ltc", "train", "--repo", tmp_path / "missing"],
        capture_output=True,
        text=True,
        env=env,
    )
    lines = proc.stderr.splitlines()
    assert proc.returncode == 1
    assert [line for line in lines if line.startswith("warning:")] == [
        "warning: OpenBLAS not found: MLX's CPU matmuls will be ~30x slower "
        "(Debian/Ubuntu: apt-get install libopenblas0-pthread)"
    ]
    assert lines[-1].startswith("Error: repo path does not exist")


@pytest.mark.skipif(sys.platform != "linux" or hardware.find_openblas() is None, reason="needs Linux + OpenBLAS")
def test_blas_re_exec_runs_the_installed_package_not_one_in_the_cwd(tmp_path):
    """The console script re-execs itself with OpenBLAS preloaded; from inside another checkout (a
    directory holding an older mlx_ltc) it must still run the package it started with."""
    (tmp_path / "mlx_ltc").mkdir()
    (tmp_path / "mlx_ltc" / "__init__.py").write_text("raise SystemExit('the wrong mlx_ltc')\n")
    (tmp_path / "mlx_ltc" / "__main__.py").write_text("")
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", hardware._ENV_DONE)}
    script = Path(sys.executable).parent / "mlx-ltc"
    proc = subprocess.run([str(script), "--version"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0 and "mlx-ltc" in proc.stdout, proc.stderr
