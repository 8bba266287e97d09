#!/usr/bin/env bash
# GPU validation of the CUDA kernels, in one call of the device tool (no GPU on the development
# machines). Two steps:
#   here:   bash scripts/gpu_check.sh prepare
#           (downloads and unpacks the Debian headers/libraries the device image lacks into
#            .gpu_deps/ (git-ignored), and generates the tiny pi0 fixtures into .gpu_deps/fixtures)
#   device: run(command="bash scripts/gpu_check.sh run", carry=[".gpu_deps"])
#           builds with the device's own torch (python3) and nvcc, runs the CUDA tests against the
#           CPU reference, the op benchmark and the tiny pi0 on CUDA vs CPU; results land in $OUT.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
DEPS="$ROOT/.gpu_deps"
PACKAGES=(libcli11-dev nlohmann-json3-dev libgtest-dev libpcre2-dev libpcre2-8-0)

case "${1:-}" in
  prepare)
    mkdir -p "$DEPS/debs"
    (cd "$DEPS/debs" && apt-get download "${PACKAGES[@]}")
    for deb in "$DEPS"/debs/*.deb; do dpkg -x "$deb" "$DEPS/root"; done
    rm -rf "$DEPS/debs"
    bash scripts/make_fixtures.sh "$DEPS/fixtures"
    du -sh "$DEPS"
    ;;
  run)
    OUT="${OUT:-$ROOT/out/gpu}"
    mkdir -p "$OUT"
    export PKG_CONFIG_PATH="$DEPS/root/usr/lib/x86_64-linux-gnu/pkgconfig:$DEPS/root/usr/share/pkgconfig"
    export LD_LIBRARY_PATH="$DEPS/root/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}"
    TORCH_PREFIX="$(python3 -c 'import torch;print(torch.utils.cmake_prefix_path)')"
    nvidia-smi --query-gpu=name,driver_version --format=csv | tee "$OUT/device.txt"
    cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DDUQUANT_WITH_CUDA=ON \
      -DCMAKE_PREFIX_PATH="$TORCH_PREFIX;$DEPS/root/usr" -DCMAKE_INCLUDE_PATH="$DEPS/root/usr/include" \
      > "$OUT/configure.log" 2>&1
    cmake --build build-gpu -j "$(nproc)" > "$OUT/build.log" 2>&1
    set +e
    ./build-gpu/tests/test_ops_layout_cuda > "$OUT/test_ops_layout_cuda.log" 2>&1
    ./build-gpu/tests/test_ops_cuda > "$OUT/test_ops_cuda.log" 2>&1
    echo "test_ops_cuda exit $?" | tee -a "$OUT/summary.txt"
    ./build-gpu/duquant_bench --json "$OUT/bench.json" > "$OUT/bench.log" 2>&1
    F="$DEPS/fixtures"
    ./build-gpu/duquant quantize "$F/pi0_tiny_script.pt" -o build-gpu/pi0_w4a8.pt --calib "$F/pi0_tiny.inputs.pt" \
      --exclude '(?:^|\.)(norm|ln|layernorm|emb|embed|vision_tower|vision|multi_modal_projector|lm_head)(?:\.|$)' \
      > "$OUT/quantize.log" 2>&1
    for device in cpu cuda; do
      ./build-gpu/duquant run build-gpu/pi0_w4a8.pt --inputs "$F/pi0_tiny.inputs.pt" --device $device \
        --save "build-gpu/out_$device.pt" >> "$OUT/model_cpu_vs_cuda.log" 2>&1
    done
    python3 - >> "$OUT/model_cpu_vs_cuda.log" 2>&1 <<'PY' || true
import torch
cpu, cuda = (torch.jit.load(f"build-gpu/out_{d}.pt").output for d in ("cpu", "cuda"))
print("tiny pi0 W4A8, CUDA vs CPU: max abs", (cpu - cuda).abs().max().item(),
      "rel L2", ((cpu - cuda).norm() / cpu.norm()).item())
PY
    tail -3 "$OUT"/*.log | tee -a "$OUT/summary.txt"
    ;;
  *)
    echo "usage: bash scripts/gpu_check.sh prepare|run" >&2
    exit 2
    ;;
esac
