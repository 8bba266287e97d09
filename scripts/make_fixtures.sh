#!/usr/bin/env bash
# Generates the tiny pi0 and pi05 test models (scripted and traced) and their inputs into $1,
# skipping the ones already there with the same generator.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-$ROOT/build/fixtures}"
mkdir -p "$OUT"
stamp="$OUT/.generator.sha"
digest="$(sha256sum "$ROOT/scripts/make_pi0.py" | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$digest" ]; then
  exit 0
fi
for variant in pi0 pi05; do
  "$ROOT/.venv/bin/python" "$ROOT/scripts/make_pi0.py" --variant "$variant" --size tiny --out "$OUT"
done
echo "$digest" > "$stamp"
