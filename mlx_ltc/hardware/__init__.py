"""What machine we run on, and making MLX's CPU backend fast on Linux.

MLX's Linux CPU wheel ships a reference BLAS (~4-6 GFLOP/s fp32 matmul). Preloading Debian's
OpenBLAS replaces its cblas symbols (~90-200 GFLOP/s). The preload must be in place before the
process starts, so the CLI re-executes itself once with LD_PRELOAD set.
"""

import os
import platform
import sys
from pathlib import Path

_ENV_DONE = "MLX_LTC_BLAS_CHECKED"


def missing_mlx_backend() -> str | None:
    """Why MLX can't run here (on Linux `mlx` alone has no backend library), or None."""
    try:
        import mlx.core  # noqa: F401
    except ImportError as e:
        return (
            f"MLX has no backend here ({str(e).splitlines()[0][:120]}); install one: "
            "pip install 'mlx-ltc[cpu]', or 'mlx-ltc[cuda]' with an NVIDIA GPU (scripts/setup.sh [--cuda])"
        )
    return None


def find_openblas():
    """Path of a preloadable OpenBLAS providing cblas_sgemm, or None. MLX_LTC_BLAS overrides
    (a path, or 'none' to disable)."""
    override = os.environ.get("MLX_LTC_BLAS")
    if override:
        return None if override == "none" else override
    arch = platform.machine()
    for path in (
        f"/usr/lib/{arch}-linux-gnu/openblas-pthread/libblas.so.3",
        f"/usr/lib/{arch}-linux-gnu/openblas-openmp/libblas.so.3",
        "/usr/lib64/libopenblas.so.0",
    ):
        if Path(path).is_file():
            return path
    return None


def ensure_fast_blas(module="mlx_ltc", script=None):
    """On Linux, re-exec `python -m module` (or `python script`) with OpenBLAS preloaded (once).
    Returns a warning string when no OpenBLAS is available, else None."""
    if sys.platform != "linux" or os.environ.get(_ENV_DONE):
        return None
    os.environ[_ENV_DONE] = "1"
    lib = find_openblas()
    if lib is None:
        return (
            "OpenBLAS not found: MLX's CPU matmuls will be ~30x slower "
            "(Debian/Ubuntu: apt-get install libopenblas0-pthread)"
        )
    preload = os.environ.get("LD_PRELOAD", "")
    if lib in preload.split(":"):
        return None
    env = dict(os.environ, LD_PRELOAD=f"{lib}:{preload}" if preload else lib)
    target = [str(script)] if script else ["-m", module]
    safe = []
    if sys.version_info >= (3, 11) and not script:  # import the mlx_ltc that was running, not one in the cwd
        here = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join([here, *filter(None, [env.get("PYTHONPATH")])])
        safe = ["-P"]
    os.execve(sys.executable, [sys.executable, *safe, *target, *sys.argv[1:]], env)


def describe() -> dict:
    """A short, JSON-able description of the machine and the MLX device we compute on."""
    import mlx.core as mx
    import psutil

    device = mx.default_device()
    return {
        "platform": f"{platform.system()} {platform.machine()}",
        "cpu_cores": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "mlx_version": mx.__version__,
        "device": "gpu" if device == mx.gpu else "cpu",
        "blas_preload": os.environ.get("LD_PRELOAD", "") or None,
    }


def on_cpu() -> bool:
    import mlx.core as mx

    return mx.default_device() == mx.cpu


def reset_peak_memory():
    import mlx.core as mx

    mx.reset_peak_memory()


def peak_memory_gb() -> float:
    import mlx.core as mx

    return mx.get_peak_memory() / 1e9
