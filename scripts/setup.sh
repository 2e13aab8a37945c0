#!/usr/bin/env bash
# Idempotent set-up on a fresh machine: virtual environment, torch (CPU wheel), the package with its
# test extras, and Debian's Fashion-MNIST package for the real-data jobs. Sourced by run.sh/test.sh.
#
# torch: a venv (GHOSTNOISE_VENV) that already has a torch in the range the version matrix tested
# (docs/results/version_matrix.md) keeps it; otherwise the pinned, tested CPU wheel is installed.
# GHOSTNOISE_SETUP_DRY_RUN=1 prints what would be done and changes nothing.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${GHOSTNOISE_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
DRY="${GHOSTNOISE_SETUP_DRY_RUN:-}"
# the supported torch range: the oldest and the newest torch of the version matrix (patch releases of
# the newest minor included)
TORCH_OLDEST="2.4.0"
TORCH_NEWEST_MINOR="2.15"

run() {
  if [ -n "$DRY" ]; then echo "setup (dry run): $*"; else "$@"; fi
}

# "2.6.0+cu124" -> "002006000": comparable as a string; pre-releases count as their release
version_key() {
  local v="${1%%+*}" major minor patch
  IFS=. read -r major minor patch _ <<<"$v"
  major="${major%%[!0-9]*}" minor="${minor%%[!0-9]*}" patch="${patch%%[!0-9]*}"
  printf "%03d%03d%03d" "$((10#${major:-0}))" "$((10#${minor:-0}))" "$((10#${patch:-0}))"
}

torch_supported() {
  local key
  key="$(version_key "$1")"
  [[ ! "$key" < "$(version_key "$TORCH_OLDEST")" ]] && [[ ! "$key" > "$(version_key "$TORCH_NEWEST_MINOR.999")" ]]
}

if [ ! -x "$VENV/bin/python" ]; then
  run "$PY" -m venv "$VENV"
fi
stamp="$VENV/.ghostnoise-installed"
if [ -n "$DRY" ] || [ ! -f "$stamp" ] || [ "$ROOT/pyproject.toml" -nt "$stamp" ] || [ ! -x "$VENV/bin/ghostnoise" ]; then
  # torch first, pinned to the CPU wheel the tests run on, and held there by a constraint while the
  # package installs: pyproject.toml has no upper cap, and no range may resolve to a multi-GB CUDA build
  TORCH_PIN="torch==2.13.0"
  have=""
  if [ -x "$VENV/bin/python" ]; then
    have="$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("torch"))' 2>/dev/null || true)"
  fi
  if [ -n "$have" ] && [ "torch==${have%%+*}" = "$TORCH_PIN" ]; then
    TORCH_PIN="torch==$have"
  elif [ -n "$have" ] && torch_supported "$have"; then
    echo "setup: keeping the venv's torch $have (tested range $TORCH_OLDEST to $TORCH_NEWEST_MINOR.x; default $TORCH_PIN)"
    TORCH_PIN="torch==$have"
  else
    if [ -n "$have" ]; then
      echo "setup: the venv's torch $have is outside the tested range $TORCH_OLDEST to $TORCH_NEWEST_MINOR.x: installing $TORCH_PIN"
    fi
    run "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$TORCH_PIN" 2>&1 | grep -v "^WARNING: Location" || true
  fi
  constraints="$(mktemp)"
  echo "$TORCH_PIN" >"$constraints"
  run "$VENV/bin/python" -m pip install -q --disable-pip-version-check -c "$constraints" -e "$ROOT[test,plot,cli,docs]" 2>&1 | grep -v "^WARNING: Location" || true
  rm -f "$constraints"
  run "$VENV/bin/python" -c "import lightning_ghostnoise, lightning, torchmetrics, scipy, jsonargparse, mkdocs, ruff, mypy"
  run touch "$stamp"
fi
if [ -n "$DRY" ]; then
  exit 0
fi
if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 \
      || echo "setup: could not install dataset-fashion-mnist; the jobs fall back to scikit-learn's digits" >&2
  else
    echo "setup: no root apt-get; the jobs fall back to scikit-learn's digits" >&2
  fi
fi
