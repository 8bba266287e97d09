#!/usr/bin/env bash
# The whole test suite: install and build (scripts/setup.sh), generate the tiny test models and the
# tiny lerobot exports, run every C++ (GoogleTest) and Python (pytest) test through CTest. GPU tests
# skip without a GPU.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
bash scripts/make_fixtures.sh build/fixtures
bash scripts/make_lerobot_fixtures.sh build/fixtures/lerobot
cd build
ctest --output-on-failure -j "${DUQUANT_TEST_JOBS:-2}" --timeout 900
