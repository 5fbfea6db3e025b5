#!/usr/bin/env bash
# The README's demo command: set up .venv if needed, then run the pipeline end to end on the
# embedded default (a synthetic archive, local Ray, local files). Extra flags go to `tal demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export RAY_USAGE_STATS_ENABLED=0
exec .venv/bin/tal demo "$@"
