#!/usr/bin/env bash
# Tiny lerobot pi0 and pi0.5 exports for the tests, into $1 (default build/fixtures/lerobot):
# a random-weight tiny policy is written in lerobot's from_pretrained layout (save_pretrained),
# then exported from that directory, as a user's checkpoint would be. pi0 in float32, pi0.5 in
# lerobot's bfloat16 precision, so both --dtype paths run. Skipped when the exporter is unchanged.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-$ROOT/build/fixtures/lerobot}"
mkdir -p "$OUT"
stamp="$OUT/.generator.sha"
digest="$(cat "$ROOT/scripts/export_lerobot.py" "$ROOT/scripts/make_pi0.py" | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$digest" ]; then
  exit 0
fi
export_policy() {  # policy dtype
  "$ROOT/.venv/bin/python" -W ignore "$ROOT/scripts/export_lerobot.py" --policy "$1" --size tiny \
    --save-checkpoint "$OUT/$1_tiny_checkpoint"
  "$ROOT/.venv/bin/python" -W ignore "$ROOT/scripts/export_lerobot.py" --checkpoint "$OUT/$1_tiny_checkpoint" \
    --size tiny --dtype "$2" --calib-count 4 --check-count 1 --out "$OUT/$1_lerobot_tiny.pt"
}
export_policy pi0 fp32
export_policy pi05 bf16
echo "$digest" > "$stamp"
