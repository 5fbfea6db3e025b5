#!/usr/bin/env bash
# The README's test command: set up .venv if needed, lint, then run the whole suite (hard timeout per test).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The viewer's browser tests (tests/browser) drive Debian's chromium through Playwright, which never downloads
# a browser of its own. The demo does not need it, so setup.sh leaves it out.
if [ ! -x /usr/bin/chromium ] && ! command -v chromium >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null
  else
    echo "warning: no chromium and no root apt-get: the browser tests (tests/browser) will fail; install Debian's chromium" >&2
  fi
fi
.venv/bin/ruff check --quiet . || { echo "lint failed (ruff check .)" >&2; exit 1; }
exec .venv/bin/python -m pytest -q "$@"
