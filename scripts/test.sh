#!/usr/bin/env bash
# Set up (if needed), then the project's checks: lint and format (ruff), types (mypy), the docs site
# (mkdocs --strict) and the test suite (pytest). Arguments go to pytest, e.g. the fast unit suite:
#   bash scripts/test.sh -m "not slow and not ddp and not gpu"
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
cd "$ROOT"
BIN="${GHOSTNOISE_VENV:-$ROOT/.venv}/bin"
echo "ruff check, ruff format --check, mypy, mkdocs build --strict ..."
"$BIN/ruff" check .
"$BIN/ruff" format --check --quiet .
"$BIN/mypy"
site="$(mktemp -d)"
NO_MKDOCS_2_WARNING=1 "$BIN/mkdocs" build --strict --quiet --site-dir "$site"
rm -rf "$site"
exec "$BIN/python" -m pytest -q "$@"
