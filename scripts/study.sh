#!/usr/bin/env bash
# The evidence study of docs/results.md: where ghost noise generalizes better, with N selected on a
# validation split, paired seeds and significance. Hours of CPU; every stage resumes (--resume), so
# an interrupted study loses at most the run in progress.
#
#   bash scripts/study.sh bn    # ResNet-8 (BatchNorm): N sweep on validation, then the selected N on 5 seeds
#   bash scripts/study.sh ln    # layer-normalized ResNet-8 and the ViT: N sweep on validation, then 5 seeds
#
# The two parts can run at the same time (one CPU thread each: OMP_NUM_THREADS=1); a second process on
# the same stage with the methods and sizes in reverse order shares its work through the run files.
# Outputs go to ${STUDY_DIR:-runs/study}/{bn-sweep,bn,ln-sweep,ln,vit}/ (results.json, plots, runs/).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
cd "$ROOT"
export MALLOC_TRIM_THRESHOLD_="${MALLOC_TRIM_THRESHOLD_:-17179869184}" MALLOC_MMAP_THRESHOLD_="${MALLOC_MMAP_THRESHOLD_:-33554432}"
GN="${GHOSTNOISE_VENV:-$ROOT/.venv}/bin/ghostnoise"
PY="${GHOSTNOISE_VENV:-$ROOT/.venv}/bin/python"
OUT="${STUDY_DIR:-runs/study}"
# the regime: 2000 training images (seeded per seed), 2000 validation images (one split for all), 30 epochs,
# batch 128, no augmentation: plain BN reaches >= 99.5% train accuracy (it overfits)
COMMON=(--subset 2000 --val-size 2000 --epochs 30 --batch-size 128 --eval-every 10 --progress-bar off --resume)

# "method@N" for each method of a sweep, as its results.json selected it on validation accuracy
selected() {
  "$PY" - "$1" <<'EOF'
import json, sys
res = json.load(open(sys.argv[1]))
for row in res["summary"]:
    if row["method"] != "plain" and row.get("selected"):
        variant = f":{row['variant']}" if row.get("variant") else ""
        print(f"{row['method']}{variant}@{row['ghost_batch_size']}")
EOF
}

# the sweep's finished runs, offered to the next stage's --resume
reuse() {
  mkdir -p "$2/runs"
  cp -n "$1"/runs/*.json "$2/runs/" 2>/dev/null || true
}

case "${1:-}" in
  bn)
    "$GN" compare --model resnet8 --methods plain gbn gni xbn --ghost-batch-size 4 8 16 32 64 --seeds 2 \
      "${COMMON[@]}" --out-dir "$OUT/bn-sweep"
    mapfile -t picks < <(selected "$OUT/bn-sweep/results.json")
    gni_n=$(printf '%s\n' "${picks[@]}" | sed -n 's/^gni@//p')
    gbn_n=$(printf '%s\n' "${picks[@]}" | sed -n 's/^gbn@//p')
    # seeds 0-1 of the selected N are reused from the sweep (same configuration, same run files). Analytic
    # GNI runs at GNI's selected N; gbn:batch (running statistics from the full batch) at GBN's.
    reuse "$OUT/bn-sweep" "$OUT/bn"
    "$GN" compare --model resnet8 --methods plain "${picks[@]}" "analytic@$gni_n" "gbn:batch@$gbn_n" --seeds 5 \
      "${COMMON[@]}" --out-dir "$OUT/bn"
    ;;
  ln)
    "$GN" compare --model resnet8_ln --methods plain gni --ghost-batch-size 8 16 32 --seeds 2 \
      "${COMMON[@]}" --out-dir "$OUT/ln-sweep"
    mapfile -t picks < <(selected "$OUT/ln-sweep/results.json")
    reuse "$OUT/ln-sweep" "$OUT/ln"
    "$GN" compare --model resnet8_ln --methods plain "${picks[@]}" --seeds 5 "${COMMON[@]}" --out-dir "$OUT/ln"
    "$GN" compare --model vit --methods plain gni --ghost-batch-size 4 8 16 32 64 --seeds 2 "${COMMON[@]}" \
      --out-dir "$OUT/vit-sweep"
    mapfile -t picks < <(selected "$OUT/vit-sweep/results.json")
    reuse "$OUT/vit-sweep" "$OUT/vit"
    "$GN" compare --model vit --methods plain "${picks[@]}" --seeds 5 "${COMMON[@]}" --out-dir "$OUT/vit"
    ;;
  *)
    echo "usage: bash scripts/study.sh bn|ln" >&2
    exit 2
    ;;
esac
