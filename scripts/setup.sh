#!/usr/bin/env bash
# Installs what duquant needs on a fresh machine and builds it. Idempotent: a second run installs
# nothing (apt packages and Python packages are checked first) and only rebuilds what changed.
#
# One venv (.venv, Python 3.12) serves everything Python: the LibTorch that CMake builds against,
# the tests, the fixture generator and the lerobot exporter (lerobot 0.6.1 needs Python >= 3.12;
# the GPU machine runs 3.12 as well).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

TORCH_VERSION=2.11.0
LEROBOT_VERSION=0.6.1
PYTHON_VERSION=3.12
APT_PACKAGES=(cmake ninja-build g++
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

# Python 3.12: from PATH first, then from pyenv (these machines' Debian has no 3.12 package). A
# pyenv shim on PATH that no selected version provides fails to run, so each candidate is tried.
find_python() {
  local pyenv_root="${PYENV_ROOT:-$HOME/.pyenv}"
  command -v pyenv >/dev/null && pyenv_root="$(pyenv root)"
  local candidate
  for candidate in $(command -v "python$PYTHON_VERSION") \
                   $(ls -d "$pyenv_root"/versions/"$PYTHON_VERSION"*/bin/"python$PYTHON_VERSION" 2>/dev/null | sort -V -r); do
    if "$candidate" -c "import venv" >/dev/null 2>&1; then
      echo "$candidate"
      return
    fi
  done
  return 1
}

venv_has_python_version() {
  [ -x .venv/bin/python ] && [ ! -L .venv ] &&
    .venv/bin/python -c "import sys; sys.exit(sys.version_info[:2] != tuple(map(int, '$PYTHON_VERSION'.split('.'))))"
}

if ! venv_has_python_version; then
  PYTHON="$(find_python)" || {
    echo "[setup] error: Python $PYTHON_VERSION not found on PATH or in pyenv; install it (pyenv install $PYTHON_VERSION)" >&2
    exit 1
  }
  # An older .venv (another Python, or a link to another checkout's venv) is replaced, not
  # modified: rm on a link removes the link only.
  if [ -L .venv ]; then rm -f .venv; elif [ -e .venv ]; then rm -rf .venv; fi
  echo "[setup] creating .venv with $PYTHON"
  "$PYTHON" -m venv .venv
fi

# lerobot allows torch < 2.12: the constraint keeps the exact CUDA 13.0 build the project links.
requirements_met() {
  .venv/bin/python - "$TORCH_VERSION" "$LEROBOT_VERSION" <<'PY' 2>/dev/null
import sys
from importlib.metadata import version
torch_version, lerobot_version = sys.argv[1:]
ok = (version("torch").split("+")[0] == torch_version and version("lerobot") == lerobot_version
      and all(version(name) for name in ("numpy", "pytest", "transformers", "safetensors")))
sys.exit(0 if ok else 1)
PY
}
if ! requirements_met; then
  echo "[setup] installing torch==$TORCH_VERSION (CUDA 13.0 build), lerobot[pi]==$LEROBOT_VERSION, numpy, pytest into .venv"
  constraints="$(mktemp)"
  trap 'rm -f "$constraints"' EXIT
  echo "torch==$TORCH_VERSION" > "$constraints"
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -c "$constraints" "torch==$TORCH_VERSION" "lerobot[pi]==$LEROBOT_VERSION" numpy pytest
fi
.venv/bin/python -c "import torch; assert torch.version.cuda and torch.version.cuda.startswith('13'), torch.version.cuda"

TORCH_PREFIX="$(.venv/bin/python -c 'import torch;print(torch.utils.cmake_prefix_path)')"
# A build/ configured against another venv (another Python, another torch) must be configured
# afresh: its cache pins Torch_DIR and the Python of the tests.
if [ -f build/CMakeCache.txt ] &&
   ! { grep -qxF "CMAKE_PREFIX_PATH:UNINITIALIZED=$TORCH_PREFIX" build/CMakeCache.txt &&
       grep -qxF "Python3_EXECUTABLE:UNINITIALIZED=$ROOT/.venv/bin/python" build/CMakeCache.txt &&
       grep -qxF "Torch_DIR:PATH=$TORCH_PREFIX/Torch" build/CMakeCache.txt; }; then
  echo "[setup] build/ was configured against another Python or torch; configuring it again"
  rm -rf build/CMakeCache.txt build/CMakeFiles
fi
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
