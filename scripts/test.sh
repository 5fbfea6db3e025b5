#!/usr/bin/env bash
# The README's test command: set up .venv if needed, then run the whole suite (hard timeout per test).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
