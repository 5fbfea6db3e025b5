#!/usr/bin/env bash
# The README's test command: set up .venv if needed, lint, then run the whole suite (hard timeout per test).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check --quiet . || { echo "lint failed (ruff check .)" >&2; exit 1; }
exec .venv/bin/python -m pytest -q "$@"
