#!/usr/bin/env bash
# Installs what duquant needs on a fresh machine and builds it. Idempotent: a second run installs
# nothing (apt packages and torch are checked first) and only rebuilds what changed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

TORCH_VERSION=2.11.0
APT_PACKAGES=(cmake ninja-build g++ pkg-config python3-venv
  libcli11-dev nlohmann-json3-dev libpcre2-dev libgtest-dev)

missing=()
for package in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if ((${#missing[@]})); then
  echo "[setup] installing Debian packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

PYTHON=python3.11
command -v "$PYTHON" >/dev/null || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $PYTHON"
  "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import torch, numpy, pytest, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
  echo "[setup] installing torch==$TORCH_VERSION (CUDA 13.0 build) into .venv"
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q "torch==$TORCH_VERSION" numpy pytest
fi
.venv/bin/python -c "import torch; assert torch.version.cuda and torch.version.cuda.startswith('13'), torch.version.cuda"

TORCH_PREFIX="$(.venv/bin/python -c 'import torch;print(torch.utils.cmake_prefix_path)')"
if [ ! -f build/CMakeCache.txt ]; then
  # ccache, when installed, makes rebuilds in other checkouts (worktrees, CI clones) cheap.
  launcher=()
  if command -v ccache >/dev/null; then
    launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache -DCMAKE_CUDA_COMPILER_LAUNCHER=ccache)
  fi
  cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$TORCH_PREFIX" \
    -DPython3_EXECUTABLE="$ROOT/.venv/bin/python" "${launcher[@]}" >/dev/null
fi
# Two jobs: each LibTorch translation unit needs over 1 GB of memory to compile.
cmake --build build -j "${DUQUANT_BUILD_JOBS:-2}"
