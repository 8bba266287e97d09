#!/usr/bin/env bash
# GPU validation of the CUDA kernels and of CUDA-graph runs in one call on a GPU machine (the
# development machines have no GPU). Two steps:
#   bash scripts/gpu_check.sh prepare
#       on a machine with package access: downloads and unpacks the Debian headers/libraries a bare
#       GPU machine image lacks into .gpu_deps/ (git-ignored, a few MB: small enough to send along).
#   bash scripts/gpu_check.sh run OUTPUT_DIR
#       on the GPU machine, with .gpu_deps/ next to the sources and the machine's own python3 torch
#       and nvcc: builds for the machine's GPU only while generating the tiny and the full-size pi0
#       there (the models are too large to send), runs the CUDA tests (kernels against the CPU
#       reference, CUDA-graph capture), the tiny pi0 through `duquant run` on CPU, CUDA and CUDA
#       graph, quantizes the full-size pi0 (bf16) to W4A8 on the GPU, then the end-to-end benchmark
#       (bf16 vs W4A8, eager and under CUDA graphs) and last the per-layer operator benchmark. The
#       operator benchmark and the end-to-end one time the W4A8 op again on its other paths
#       (DUQUANT_CUDA_ROTATION=tensor-cores: the rotations inside the pre-kernel on tensor cores;
#       =cublas: the transform as fp32 cuBLAS GEMMs before it; DUQUANT_CUDA_GEMM=cublaslt: the
#       integer product by cuBLASLt on int8 weight levels), the end-to-end one also with
#       DUQUANT_REUSE_ACTIVATIONS=0 (every layer computing its own activations); the tiny pi0 runs
#       under a CUDA graph on the tensor-core path and on both cuBLAS paths. Every step
#       has its own time limit and logs into OUTPUT_DIR; a failing step does not stop the later
#       ones; DUQUANT_GPU_SKIP='name|name...' skips steps by name (a second call on a machine that
#       has run the first can skip what passed). The whole call stays within
#       DUQUANT_GPU_BUDGET_SECONDS (default 540);
#       OUTPUT_DIR/summary.txt lists each step's exit code and seconds, the test totals and the
#       end-to-end table.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
DEPS="$ROOT/.gpu_deps"
PACKAGES=(libcli11-dev nlohmann-json3-dev libgtest-dev libpcre2-dev libpcre2-8-0)
# The W4A8 op's other paths (src/ops/operator_settings.h), timed beside the default by the
# benchmark: the rotations on tensor cores or as cuBLAS GEMMs, the integer product by cuBLASLt.
PATH_VARIANTS=(--w4a8-variant DUQUANT_CUDA_ROTATION=tensor-cores --w4a8-variant DUQUANT_CUDA_ROTATION=cublas
  --w4a8-variant DUQUANT_CUDA_GEMM=cublaslt --w4a8-variant DUQUANT_CUDA_ROTATION=cublas,DUQUANT_CUDA_GEMM=cublaslt)
NOTE_EXCLUDE='(?:^|\.)(norm|ln|layernorm|emb|embed|vision_tower|vision|multi_modal_projector|lm_head)(?:\.|$)'

# step NAME SECONDS COMMAND...: runs COMMAND with a time limit (cut to what is left of the whole
# call's budget, DEADLINE in $SECONDS), output to LOGS/NAME.log, and records its exit code
# (124: timed out or skipped) and duration in the summary. The logs are archived again after each
# step into OUT/logs.tar.gz, so that a call cut short still leaves every finished step's log.
step() {
  local name="$1" limit="$2"
  shift 2
  if [ -n "${DUQUANT_GPU_SKIP:-}" ] && [[ "$name" =~ ^(${DUQUANT_GPU_SKIP})$ ]]; then
    echo "$name: skipped (DUQUANT_GPU_SKIP)" | tee -a "$OUT/summary.txt"
    return 0
  fi
  local remaining=$((DEADLINE - SECONDS))
  if ((remaining < 10)); then
    echo "$name: skipped, the time budget is spent" | tee -a "$OUT/summary.txt"
    return 124
  fi
  ((limit > remaining)) && limit=$remaining
  local start=$SECONDS
  timeout "$limit" "$@" > "$LOGS/$name.log" 2>&1
  local rc=$?
  echo "$name: exit $rc, $((SECONDS - start)) s" | tee -a "$OUT/summary.txt"
  archive_logs
  return $rc
}

archive_logs() { tar czf "$OUT/logs.tar.gz" -C "$LOGS" . 2> /dev/null; }

# generate NAME SECONDS MAKE_PI0_ARGS...: scripts/make_pi0.py in the background (its PID in $!),
# logged and summarised like a step.
generate() {
  local name="$1" limit="$2"
  shift 2
  (
    start=$SECONDS
    timeout "$limit" python3 scripts/make_pi0.py "$@" > "$LOGS/$name.log" 2>&1
    echo "$name: exit $?, $((SECONDS - start)) s (in the background)" >> "$OUT/summary.txt"
  ) &
}

case "${1:-}" in
  prepare)
    set -e
    mkdir -p "$DEPS/debs"
    (cd "$DEPS/debs" && apt-get download "${PACKAGES[@]}")
    for deb in "$DEPS"/debs/*.deb; do dpkg -x "$deb" "$DEPS/root"; done
    rm -rf "$DEPS/debs"
    du -sh "$DEPS"
    ;;
  run)
    if [ -z "${2:-}" ]; then
      echo "usage: bash scripts/gpu_check.sh run OUTPUT_DIR" >&2
      exit 2
    fi
    mkdir -p "$2"
    OUT="$(cd "$2" && pwd)"
    : > "$OUT/summary.txt"
    DEADLINE=$((SECONDS + ${DUQUANT_GPU_BUDGET_SECONDS:-540}))
    WORK="${DUQUANT_GPU_WORK:-/tmp/duquant-gpu}"  # full-size models: several GB, outside the sources
    LOGS="$WORK/logs"
    mkdir -p "$LOGS"
    BUILD="$ROOT/build-gpu"
    F="$WORK/fixtures"
    export DUQUANT_FIXTURE_DIR="$F"
    export LD_LIBRARY_PATH="$DEPS/root/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}"
    # A LibTorch error names where in duquant it came from (with the executables' symbols exported).
    export TORCH_SHOW_CPP_STACKTRACES=1
    {
      nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total --format=csv
      python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
      echo "$(nproc) CPU cores, $(command -v nvcc) $(nvcc --version | tail -1), $(cmake --version | head -1)"
    } | tee -a "$OUT/summary.txt"
    TORCH_PREFIX="$(python3 -c 'import torch;print(torch.utils.cmake_prefix_path)')"
    # Only this GPU's architecture: halves the kernels' compile time (Hopper needs 9.0a for its
    # arch-specific instructions).
    capability="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d ' ')"
    [ "$capability" = "9.0" ] && capability="9.0a"
    capability="${capability:-8.0;9.0a}"
    generator=(-G Ninja)
    command -v ninja > /dev/null || generator=()

    # Both models are generated on the CPU while the project builds: the tiny pi0 (seconds; the
    # CUDA-graph test and the CLI runs wait for it) and the full-size one (the last steps wait).
    generate make_pi0_tiny 240 --variant pi0 --size tiny --exports script --out "$F"
    tiny_generation=$!
    generate make_pi0_full 420 --variant pi0 --size full --exports script --out "$WORK"
    generation=$!

    step configure 120 cmake -S . -B "$BUILD" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release -DCMAKE_ENABLE_EXPORTS=ON \
      -DDUQUANT_WITH_CUDA=ON -DDUQUANT_CUDA_ARCH_LIST="$capability" -DCMAKE_PREFIX_PATH="$TORCH_PREFIX;$DEPS/root/usr" \
      -DCMAKE_INCLUDE_PATH="$DEPS/root/usr/include"
    step build 300 cmake --build "$BUILD" -j "$(nproc)" --target duquant duquant_bench test_ops_layout_cuda \
      test_ops_cuda test_cuda_graph test_quantize_model
    grep -iE "warning|spill" "$LOGS/build.log" > "$LOGS/build_warnings.txt" || true

    step test_ops_layout_cuda 60 "$BUILD/tests/test_ops_layout_cuda"
    step test_ops_cuda 240 "$BUILD/tests/test_ops_cuda"

    wait "$tiny_generation"
    step test_cuda_graph 150 "$BUILD/tests/test_cuda_graph"
    step test_quantize_on_cuda 150 "$BUILD/tests/test_quantize_model" \
      --gtest_filter=PipelineOptions.CudaQuantizationMatchesTheCpu

    # The tiny pi0, W4A8: the CLI on CPU, CUDA and as a CUDA graph; the outputs compared.
    step quantize_tiny 120 "$BUILD/duquant" quantize "$F/pi0_tiny_script.pt" -o "$WORK/pi0_tiny_w4a8.pt" \
      --calib "$F/pi0_tiny.inputs.pt" --exclude "$NOTE_EXCLUDE"
    tiny=("$WORK/pi0_tiny_w4a8.pt" --inputs "$F/pi0_tiny.inputs.pt")
    step run_tiny_cpu 60 "$BUILD/duquant" run "${tiny[@]}" --device cpu --save "$WORK/tiny_cpu.pt"
    step run_tiny_cuda 60 "$BUILD/duquant" run "${tiny[@]}" --device cuda --save "$WORK/tiny_cuda.pt"
    step run_tiny_cuda_graph 60 "$BUILD/duquant" run "${tiny[@]}" --device cuda --cuda-graph --repeat 20 \
      --save "$WORK/tiny_cuda_graph.pt"
    step run_tiny_cuda_graph_tensor_cores 60 env DUQUANT_CUDA_ROTATION=tensor-cores "$BUILD/duquant" run "${tiny[@]}" \
      --device cuda --cuda-graph --repeat 20 --save "$WORK/tiny_cuda_graph_tensor_cores.pt"
    step run_tiny_cuda_graph_cublas 60 env DUQUANT_CUDA_ROTATION=cublas DUQUANT_CUDA_GEMM=cublaslt "$BUILD/duquant" \
      run "${tiny[@]}" --device cuda --cuda-graph --repeat 20 --save "$WORK/tiny_cuda_graph_cublas.pt"
    python3 - "$WORK" > "$LOGS/run_tiny_compare.log" 2>&1 <<'PY'
import sys, torch
work = sys.argv[1]
cpu = torch.jit.load(f"{work}/tiny_cpu.pt").output.float()
for name in ("tiny_cuda", "tiny_cuda_graph", "tiny_cuda_graph_tensor_cores", "tiny_cuda_graph_cublas"):
    other = torch.jit.load(f"{work}/{name}.pt").output.float()
    print(f"pi0 tiny W4A8, {name} vs CPU: max abs {(cpu - other).abs().max().item():.3e}, "
          f"rel L2 {((cpu - other).norm() / cpu.norm()).item():.3e}")
PY

    wait "$generation"
    quantize_device=()
    if "$BUILD/duquant" quantize --help 2>&1 | grep -q -- "--device"; then quantize_device=(--device cuda); fi
    echo "quantize full with: ${quantize_device[*]:-(CPU, no --device option)}" >> "$OUT/summary.txt"
    step quantize_full 300 "$BUILD/duquant" quantize "$WORK/pi0_full_script.pt" -o "$WORK/pi0_full_w4a8.pt" \
      --calib "$WORK/pi0_full.inputs.pt" --exclude "$NOTE_EXCLUDE" "${quantize_device[@]}"
    step bench_end_to_end 420 "$BUILD/duquant_bench" --no-ops --model "$WORK/pi0_full_script.pt" \
      --quantized "$WORK/pi0_full_w4a8.pt" --inputs "$WORK/pi0_full.inputs.pt" --model-iterations 20 \
      --w4a8-variant DUQUANT_REUSE_ACTIVATIONS=0 "${PATH_VARIANTS[@]}" --json "$OUT/bench_end_to_end.json"
    # The kernels' speed per layer shape on every path, last: the end-to-end figure comes first.
    step bench_ops 240 "$BUILD/duquant_bench" --iterations 50 --warmup 5 "${PATH_VARIANTS[@]}" \
      --json "$OUT/bench_ops.json"

    for log in test_ops_layout_cuda test_ops_cuda test_cuda_graph test_quantize_on_cuda; do
      grep -E "^\[  (PASSED  |SKIPPED )\] [0-9]+ test|^\[  FAILED  \] .*\)$" "$LOGS/$log.log" | sed "s/^/$log: /" \
        >> "$OUT/summary.txt"
      grep -E -A6 "^[^ ]+:[0-9]+: Failure" "$LOGS/$log.log" | head -80 >> "$OUT/summary.txt"
    done
    cat "$LOGS/run_tiny_compare.log" >> "$OUT/summary.txt"
    grep -E "^\[DUQUANT\] (calibration|target layer memory)" "$LOGS/quantize_full.log" >> "$OUT/summary.txt"
    echo "bench_end_to_end:" >> "$OUT/summary.txt"
    sed -n '/^end to end/,$p' "$LOGS/bench_end_to_end.log" >> "$OUT/summary.txt"
    archive_logs
    cat "$OUT/summary.txt"
    ;;
  *)
    echo "usage: bash scripts/gpu_check.sh prepare | run OUTPUT_DIR" >&2
    exit 2
    ;;
esac
