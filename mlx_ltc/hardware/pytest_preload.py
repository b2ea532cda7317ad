"""pytest plugin (named with -p in pyproject.toml's addopts): re-run pytest once with OpenBLAS
preloaded. It must run at import time, before pytest starts capturing output: a re-exec from a
conftest would inherit fds that point into pytest's capture files and print nothing."""

from mlx_ltc.hardware import ensure_fast_blas

ensure_fast_blas(module="pytest")
