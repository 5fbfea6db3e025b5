"""``tal serve`` as a user runs it: a process of its own (its own local Ray), settings from a config file,
a flag and ``--set``, real HTTP, then Ctrl-C (SIGINT) stops it cleanly with exit code 0."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import requests
import torch
from helpers import free_port

from pipelines.backbones import BackboneConfig, build_backbone
from pipelines.extract import SamplingConfig, provenance_for, settings_json
from tal_models.checkpoint import Checkpoint, save_checkpoint
from tal_models.detectors import build_detector
from tal_models.presets import make_config


@pytest.mark.slow
def test_tal_serve_runs_answers_and_stops_on_ctrl_c(tmp_path):
    torch.manual_seed(0)
    model = build_detector(make_config("temporalmaxer", num_classes=2, input_dim=1280, max_seq_len=64, embed_dim=16, levels=3))
    sampling = SamplingConfig(fps=5.0, window=2, stride=2)
    backbone_config = BackboneConfig(name="mobilenet_v2")
    provenance = provenance_for(build_backbone(backbone_config, "cpu"), sampling, settings_json(backbone_config, sampling))
    save_checkpoint(Checkpoint.from_model(model.eval(), ["a", "b"], provenance.to_dict()), tmp_path / "model.pt")
    (tmp_path / "serve.yaml").write_text("max_batch_size: 4\nmax_steps: 50\ncpus_per_replica: 1\n")
    port = free_port()
    log = tmp_path / "serve.log"
    env = {**os.environ, "RAY_ADDRESS": "local", "RAY_USAGE_STATS_ENABLED": "0"}  # its own Ray, not the test session's
    argv = [sys.executable, "-m", "jobs.cli", "serve", "--model", "model.pt", "--config", "serve.yaml",  # relative to its cwd
            "--port", str(port), "--max-steps", "40", "--set", "max_batch_size=2"]  # fmt: skip
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 180
        while b"Ctrl-C stops it" not in log.read_bytes():
            assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
            assert time.monotonic() < deadline, "tal serve did not come up in 180 s: " + log.read_text(errors="replace")[-3000:]
            time.sleep(0.5)
        url = f"http://127.0.0.1:{port}"
        assert requests.get(url + "/healthz", timeout=30).json()["status"] == "ok"
        described = requests.get(url + "/v1/model", timeout=30).json()
        assert described["labels"] == ["a", "b"]
        assert (described["server"]["max_batch_size"], described["server"]["max_steps"]) == (2, 40)  # --set, the flag
        ok = requests.post(url + "/v1/detect", json={"features": [[0.5] * 1280] * 40}, timeout=60)
        assert ok.status_code == 200, ok.text
        too_long = requests.post(url + "/v1/detect", json={"features": [[0.5] * 1280] * 41}, timeout=60)
        assert too_long.status_code == 422 and "at most 40" in too_long.json()["message"]  # the flag beat the file's 50
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert code == 0, log.read_text(errors="replace")[-3000:]
    assert "stopping ..." in log.read_text(errors="replace")
