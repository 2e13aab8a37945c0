#!/usr/bin/env bash
# Idempotent set-up on a fresh machine: virtual environment, torch (CPU wheel), the package with its
# test extras, and Debian's Fashion-MNIST package for the real-data jobs. Sourced by run.sh/test.sh.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${GHOSTNOISE_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.ghostnoise-installed"
if [ ! -f "$stamp" ] || [ "$ROOT/pyproject.toml" -nt "$stamp" ] || [ ! -x "$VENV/bin/ghostnoise" ]; then
  # torch first, pinned to the CPU wheel the tests run on, and held there by a constraint while the
  # package installs: pyproject.toml has no upper cap, and no range may resolve to a multi-GB CUDA build
  TORCH_PIN="torch==2.13.0"
  constraints="$(mktemp)"
  echo "$TORCH_PIN" >"$constraints"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$TORCH_PIN" 2>&1 | grep -v "^WARNING: Location" || true
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -c "$constraints" -e "$ROOT[test,plot,cli,docs]" 2>&1 | grep -v "^WARNING: Location" || true
  rm -f "$constraints"
  "$VENV/bin/python" -c "import lightning_ghostnoise, lightning, torchmetrics, scipy, jsonargparse, mkdocs, ruff, mypy"
  touch "$stamp"
fi
if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 \
      || echo "setup: could not install dataset-fashion-mnist; the jobs fall back to scikit-learn's digits" >&2
  else
    echo "setup: no root apt-get; the jobs fall back to scikit-learn's digits" >&2
  fi
fi
