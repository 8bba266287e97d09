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
# Tests run side by side, one per core; each gets its share of the cores for its OpenMP/MKL threads.
# Without this every process starts one spinning thread per core, and on a 2-core machine the suite
# ran several times slower (a forward of the tiny model: 0.5 s alone, 1.5-4.7 s oversubscribed).
jobs="${DUQUANT_TEST_JOBS:-$(nproc)}"
threads=$(( $(nproc) / jobs ))
(( threads >= 1 )) || threads=1
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$threads}" MKL_NUM_THREADS="${MKL_NUM_THREADS:-$threads}"
ctest --output-on-failure -j "$jobs" --timeout 900
