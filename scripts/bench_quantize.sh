#!/usr/bin/env bash
# Quantize benchmark: the per-stage table of `duquant quantize` on a generated pi0, with peak memory
# against the input file and the per-layer error summary, so that a change to the pipeline can be
# compared with the last one in one run.
#   scripts/bench_quantize.sh [--size full|tiny] [--device auto|cpu|cuda] [--work DIR] [--baseline REPORT]
#                             [-- extra quantize flags]
# --baseline names the report of an earlier run (e.g. a copy of DIR/q.report.json): the per-layer
# figures of this run are compared with it field by field, so a change meant to be exact shows 0
# differing fields and one meant to be more accurate shows which layers moved.
# The model (scripts/make_pi0.py, script export) and its inputs are generated into DIR once
# (default out/bench); the full-size pi0 needs about 6 GB of disk and 7 GB of memory to generate.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
size=full device=auto work="$ROOT/out/bench" baseline=""
while (($#)); do
  case "$1" in
    --size) size="$2"; shift 2 ;;
    --device) device="$2"; shift 2 ;;
    --work) work="$2"; shift 2 ;;
    --baseline) baseline="$2"; shift 2 ;;
    --) shift; break ;;
    *) echo "bench_quantize.sh: unknown argument '$1'; see the header of this script" >&2; exit 2 ;;
  esac
done
mkdir -p "$work"
model="$work/pi0_${size}_script.pt"
inputs="$work/pi0_${size}.inputs.pt"
if [ ! -f "$model" ] || [ ! -f "$inputs" ]; then
  "$ROOT/.venv/bin/python" "$ROOT/scripts/make_pi0.py" --variant pi0 --size "$size" --exports script --out "$work"
fi
export OPENPI_DUQUANT_EXCLUDE='(?:^|\.)(norm|ln|layernorm|emb|embed|vision_tower|vision|multi_modal_projector|lm_head)(?:\.|$)'
echo "[bench] $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg) before the run"
/usr/bin/time -f '%e %M' -o "$work/time.txt" "$ROOT/build/duquant" quantize "$model" -o "$work/q.pt" \
  --calib "$inputs" --device "$device" "$@" > "$work/quantize.log"
grep '^\[DUQUANT\] \(stage\|total\)' "$work/quantize.log"
"$ROOT/.venv/bin/python" - "$work/q.report.json" "$model" "$work/time.txt" "$baseline" <<'PY'
import json, os, statistics, sys
report = json.load(open(sys.argv[1]))
wall, rss_kib = open(sys.argv[3]).read().split()
input_bytes = os.path.getsize(sys.argv[2])
errors = [layer["layer_output_error"] for layer in report["layers"] if layer["layer_output_error"] is not None]
print(f"[bench] wall {float(wall):.1f} s, peak RSS {int(rss_kib) / 2**20:.2f} GiB = "
      f"{int(rss_kib) * 1024 / input_bytes:.2f}x the input file ({input_bytes / 2**30:.2f} GiB)")
if errors:
    print(f"[bench] layer output error on calibration rows: median {statistics.median(errors):.4e}, "
          f"max {max(errors):.4e} over {len(errors)} layers")
if sys.argv[4]:
    baseline = {layer["path"]: layer for layer in json.load(open(sys.argv[4]))["layers"]}
    moved = [(layer["path"], key) for layer in report["layers"] for key, value in layer.items()
             if layer["path"] in baseline and baseline[layer["path"]].get(key) != value]
    unmatched = sum(layer["path"] not in baseline for layer in report["layers"])
    print(f"[bench] against {sys.argv[4]}: {len(moved)} per-layer fields differ, {unmatched} layers not in it")
    for name in ("weight_quantization_error", "layer_output_error"):
        pairs = [(layer[name], baseline[layer["path"]][name]) for layer in report["layers"]
                 if layer["path"] in baseline and layer[name] is not None and baseline[layer["path"]][name]]
        if pairs:
            ratios = [now / before for now, before in pairs]
            print(f"[bench]   {name}: median ratio now/baseline {statistics.median(ratios):.4f}, "
                  f"worse on {sum(r > 1 for r in ratios)} of {len(ratios)} layers")
PY
