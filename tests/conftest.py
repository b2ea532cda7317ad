import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """One model cache for the whole session (the embedded model is materialised once)."""
    path = tmp_path_factory.mktemp("cache")
    os.environ["MLX_LTC_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def smollm2_dir(cache_dir):
    from mlx_ltc import models

    return models.resolve("smollm2-135m", cache_dir)


@pytest.fixture(scope="session")
def tiny_dir(cache_dir):
    from mlx_ltc import models

    return models.resolve("tiny-starcoder2", cache_dir)


def write_files(root: Path, files: dict) -> Path:
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    return root


@pytest.fixture
def small_repo(tmp_path):
    """A small multi-file Python package, enough text for a few windows per split."""
    files = {}
    for i in range(8):
        body = "\n\n".join(
            f'def func_{i}_{j}(x, y={j}):\n    """Return a mix of x and {j}."""\n    total = x * {j} + y\n'
            f"    for k in range({j + 2}):\n        total += k * x\n    return total"
            for j in range(12)
        )
        files[f"pkg/mod_{i}.py"] = f"import math\nfrom pkg import mod_{max(i - 1, 0)}\n\n{body}\n"
    files["README.md"] = "# pkg\n\nA small package used in tests.\n"
    return write_files(tmp_path / "repo", files)


def run_cli(*args, cwd=None, env=None):
    """Run `python -m mlx_ltc ...` in a subprocess, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "mlx_ltc", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        timeout=900,
    )


def ring_package() -> dict:
    """Six modules importing each other in a ring, thirty small functions each: cross-file context for every file."""
    return {
        f"pkg/mod{i}.py": f"from pkg import mod{(i + 1) % 6}\n\n"
        + "".join(f"def func_{i}_{j}(value):\n    return value * {j} + {i}\n\n" for j in range(30))
        for i in range(6)
    }


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, cache_dir):
    """(repo, run): six files importing each other in a ring, and a 2-step run of the tiny model on them."""
    root = tmp_path_factory.mktemp("use")
    repo = write_files(root / "repo", ring_package())
    run = root / "run"
    proc = run_cli("train", "--repo", repo, "--out", run, "--model", "tiny-starcoder2", "--seq-len", "128",
                   "--max-steps", "2", "--quiet")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return repo, run


# Module fixtures that train or load a model for a whole file: every test that uses one is slow, so the
# fast tier (`pytest -m "not slow"`) never pays for their setup.
SLOW_FIXTURES = {"tiny_run", "trained_run", "trained", "reference_run", "torch_model"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
