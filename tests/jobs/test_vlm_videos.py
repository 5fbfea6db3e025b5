"""A vision-language model from videos to named classes, through the CLI and over real parts: ``tal extract --backbone
clip:...``'s extraction (Ray Data actors, real MP4s decoded), a training-free ``zero_shot`` preset validated and
registered by ``tal train``'s job, and ``tal detect --classes`` (the CLI) naming classes at inference with the model's own text encoder. The VLM is a
small open_clip model of a real architecture with random weights, loaded from a path (no real VLM weights can be
reached here): what is checked is the mechanics, not the accuracy."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import save_tiny_clip

from jobs.train import TrainJob, train
from pipelines.backbones import BackboneConfig
from pipelines.extract import ExtractConfig, SamplingConfig, extract
from tal_models.config import dump_yaml
from tal_models.detectors.zero_shot import zero_shot_config
from tal_models.optim import OptimConfig
from tal_models.presets import Preset
from tal_models.text import TextEncoderConfig


def tal(*args, env=None, timeout=600):
    exe = shutil.which("tal", path=str(Path(sys.executable).parent))
    assert exe, "the tal console script is not installed in this venv"
    return subprocess.run([exe, *map(str, args)], capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_clip_features_zero_shot_registration_and_detect_with_named_classes(tmp_path, ray_session):
    from pipelines.synth import synthesize

    config, weights = save_tiny_clip(tmp_path / "vlm")
    synth = synthesize(tmp_path / "synth", videos=4, seed=5, classes=2, duration_range=(3.0, 4.0), size=(96, 64), fps=10.0, workers=1,
                       progress=False)  # fmt: skip
    store = tmp_path / "store"  # the Ray Data extraction tal extract runs, in this process (the test's Ray session)
    summary = extract(ExtractConfig(videos=str(synth.root / "videos"), out=str(store), backbone=BackboneConfig(name=f"clip:{config}",
                      weights=str(weights), batch_size=8), sampling=SamplingConfig(fps=5.0, window=2, stride=2), num_workers=1,
                      progress=False))  # fmt: skip
    assert summary.extracted == 4 and not summary.failed

    names = [c.name for c in synth.classes]
    text = TextEncoderConfig(kind="open_clip", model=str(config), weights=str(weights), prompt="a video of {}")
    preset = Preset("tiny-zero-shot", "test", "clip features", zero_shot_config(num_classes=len(names), input_dim=32, text=text),
                    OptimConfig(epochs=1, warmup_epochs=0), 1)  # fmt: skip
    (tmp_path / "zs.yaml").write_text(dump_yaml(preset))
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    subsets = sorted({v.subset for v in synth.annotations})
    summary = train(TrainJob(config=str(tmp_path / "zs.yaml"), features=str(store), annotations=str(synth.activitynet_json),
                             out=str(tmp_path / "runs"), train_subset=subsets[0], val_subset=subsets[-1], mlflow_uri=env["MLFLOW_TRACKING_URI"]))  # fmt: skip
    assert summary["registration"]["version"] == 1 and summary["best_score"] >= 0.0

    video = next(iter(synth.videos.values()))
    out = tmp_path / "detect"
    r = tal("detect", video, "--model", "models:/tal-detector@champion", "--classes", "a red ball,a blue square", "--output", out,
            "--score-threshold", 0, "--no-progress", env=env)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    results = json.loads((out / "results.json").read_text())["results"]
    labels = {d["label"] for dets in results.values() for d in dets}
    assert labels and labels <= {"a red ball", "a blue square"}  # the names given, not the training classes

    for bad, why in (("a red ball,,x", "empty"), ("a" * 101, "long")):
        r = tal("detect", video, "--model", "models:/tal-detector@champion", "--classes", bad, "--output", tmp_path / "bad", env=env)
        assert r.returncode == 2 and "--classes" in r.stderr, (why, r.stderr)
