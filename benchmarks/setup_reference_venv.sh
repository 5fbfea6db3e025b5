#!/usr/bin/env bash
# Creates .venv-reference with the ActivityNet reference evaluator as shipped in actionformer==1.5.0
# (pandas; its metadata needs an older torch, so it cannot live in the project's venv).
# Used only by benchmarks/evaluation.py and benchmarks/postprocess.py; never by tests.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv-reference
.venv-reference/bin/pip install -q --upgrade pip
.venv-reference/bin/pip install -q torch==2.13.0 wheel h5py
.venv-reference/bin/pip install -q --no-build-isolation actionformer==1.5.0
echo "reference venv ready: .venv-reference/bin/python"
