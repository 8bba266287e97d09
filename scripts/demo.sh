#!/usr/bin/env bash
# The main job end to end on the embedded default, a generated tiny pi0: install and build, dry
# run, quantize to W4A8 DuQuant, run the result, verify it against the original, show the report.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
OUT="$ROOT/out/demo"
mkdir -p "$OUT"
# The model, its 16 calibration observations (pi0_tiny.calib/) and held-out inputs.
[ -f "$OUT/pi0_tiny.heldout.inputs.pt" ] || .venv/bin/python scripts/make_pi0.py --variant pi0 --size tiny --out "$OUT" --exports script

# The user's LIBERO scripts set this exclude regex (shared/spec/vision_exclusion_verified.md): 252 targets.
export OPENPI_DUQUANT_EXCLUDE='(?:^|\.)(norm|ln|layernorm|emb|embed|vision_tower|vision|multi_modal_projector|lm_head)(?:\.|$)'
DUQUANT=build/duquant

echo "== 1. dry run: which layers, and why"
"$DUQUANT" quantize "$OUT/pi0_tiny_script.pt" --dry-run | grep -v '^\[DUQUANT\]\[SKIP\]' | sed -n '1,40p'
echo "   ... (full listing: $DUQUANT list $OUT/pi0_tiny_script.pt)"

echo "== 2. quantize"
"$DUQUANT" quantize "$OUT/pi0_tiny_script.pt" -o "$OUT/pi0_tiny_w4a8.pt" --calib "$OUT/pi0_tiny.calib" \
  | grep -v '^  ' | awk '/\[REPLACED\]/ { if (shown++ >= 7) next } { print }'

echo "== 3. run the original and the quantized model (held-out inputs)"
"$DUQUANT" run "$OUT/pi0_tiny_script.pt" --inputs "$OUT/pi0_tiny.heldout.inputs.pt"
"$DUQUANT" run "$OUT/pi0_tiny_w4a8.pt" --inputs "$OUT/pi0_tiny.heldout.inputs.pt"

echo "== 4. verify on held-out inputs: end-to-end and per-layer error (worst 8)"
"$DUQUANT" verify "$OUT/pi0_tiny_script.pt" "$OUT/pi0_tiny_w4a8.pt" --inputs "$OUT/pi0_tiny.heldout.inputs.pt" | sed -n '1,10p'

echo "== 5. report ($OUT/pi0_tiny_w4a8.report.json), first layer:"
.venv/bin/python - "$OUT/pi0_tiny_w4a8.report.json" <<'PY'
import json, sys
report = json.load(open(sys.argv[1]))
print(json.dumps({k: report[k] for k in ("layers_replaced", "stages", "peak_rss_bytes", "summary")}, indent=1))
print(json.dumps(report["layers"][0], indent=1))
PY
