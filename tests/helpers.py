"""Helpers the test modules import (``from helpers import ...``: pytest puts ``tests/`` on ``sys.path`` for its conftest)."""

from __future__ import annotations

import contextlib
import io
import socket
import subprocess
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from tal_models.timing import FeatureTiming

SYNTHETIC_DIM, SYNTHETIC_TIMING, SYNTHETIC_CLASSES = 16, FeatureTiming(fps=15.0, stride=4, window=4), ["jump", "run", "throw"]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the OS picks it), for a server started next."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class HostReads(TorchDispatchMode):
    """Counts reads of a tensor's value by the host (``.item()``, ``int(t)``, ``bool(t)``): each is a
    device synchronisation on an accelerator. ``with HostReads() as reads: ...; reads.count``."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ == "_local_scalar_dense":
            self.count += 1
        return func(*args, **(kwargs or {}))


def synthetic_store(
    root: Path, videos: int = 24, steps: int = 96, seed: int = 0, dim: int = SYNTHETIC_DIM, backbone: str = "synthetic"
) -> tuple[str, Path]:
    """A feature store of class-prototype features inside annotated segments (classes ``SYNTHETIC_CLASSES``,
    timing ``SYNTHETIC_TIMING``, two thirds of the videos "training", the rest "validation"), and its
    ActivityNet ground truth: ``(store uri, ground-truth path)``."""
    import json

    import numpy as np

    from pipelines.store import FeatureSequence, FeatureStore, Provenance

    K, TIMING, CLASSES = len(SYNTHETIC_CLASSES), SYNTHETIC_TIMING, SYNTHETIC_CLASSES
    g = np.random.default_rng(seed)
    protos = 2.0 * g.standard_normal((K, dim)).astype(np.float32)
    sequences, database = [], {}
    for i in range(videos):
        vid = f"vid{i:02d}"
        feats = 0.3 * g.standard_normal((steps, dim)).astype(np.float32)
        annotations, t = [], int(g.integers(2, 8))
        while True:
            n = int(g.integers(6, 24))
            if t + n >= steps - 2:
                break
            k = int(g.integers(K))
            feats[t : t + n] += protos[k]
            start, end = TIMING.step_to_seconds(np.array([t, t + n], np.float64))
            annotations.append({"segment": [float(start), float(end)], "label": CLASSES[k]})
            t += n + int(g.integers(3, 12))
        duration = float(TIMING.step_to_seconds(steps))
        sequences.append(
            FeatureSequence(vid, feats, TIMING, TIMING.centers(steps), duration=duration, num_frames=steps * 4, native_fps=15.0)
        )
        database[vid] = {"subset": "training" if i < videos * 2 // 3 else "validation", "duration": duration, "annotations": annotations}
    store_uri = str(root / "store")
    store = FeatureStore(store_uri)
    provenance = Provenance(backbone, "w.pth", "ab" * 32, dim, 15.0, 4, 4, "{}")
    store.write_part(sequences[: videos // 2], provenance)
    store.write_part(sequences[videos // 2 :], provenance)
    gt = root / "gt.json"
    gt.write_text(json.dumps({"version": "1.3", "database": database}))
    return store_uri, gt


@pytest.fixture(autouse=True)
def seed_zero():
    """Import into a test module (``from helpers import seed_zero``): every test there starts from seed 0."""
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Import into a test module: its tiny tensors run on one thread (on a busy 2-core machine each
    parallel op waits at its barrier for a core: 30x slower here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class TinyFrameNet(nn.Module):
    """A tiny frame backbone for TorchScript tests: ``[N, 3, H, W] -> [N, dim]`` (``gain`` spreads the features, as a
    real backbone's vary)."""

    def __init__(self, dim: int = 6, gain: float = 1.0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, dim)
        self.gain = gain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gain * self.fc(torch.relu(self.conv(x)).mean((2, 3)))


# A real open_clip architecture (ViT image tower, text transformer with the BPE tokenizer) at toy width.
TINY_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def save_tiny_clip(folder: Path, seed: int = 0) -> tuple[Path, Path]:
    """``TINY_CLIP_CONFIG`` as ``folder/tiny_clip.json`` and a randomly initialised model's state dict as
    ``folder/tiny_clip.pth`` (``torch.save``, as open_clip checkpoints are): ``(config_path, weights_path)``."""
    import json

    import open_clip

    folder.mkdir(parents=True, exist_ok=True)
    config_path, weights_path = folder / "tiny_clip.json", folder / "tiny_clip.pth"
    config_path.write_text(json.dumps(TINY_CLIP_CONFIG, indent=1))
    torch.manual_seed(seed)
    model = open_clip.CLIP(**TINY_CLIP_CONFIG)
    torch.save(model.state_dict(), weights_path)
    return config_path, weights_path


SERVED_LABELS = ["jump", "run", "wave"]


def register_untrained_detector(root: Path, experiment: str, sampling) -> tuple[str, object, object]:
    """A small untrained TemporalMaxer for the Serve tests, registered as ``models:/tal-detector@champion`` in a SQLite
    MLflow store under ``root``: (tracking URI, its Checkpoint, the MobileNetV2 backbone its provenance names). Its heads
    are set so that it detects something (scores near 0.5 rather than the focal prior, segments of some length)."""
    from jobs.tracking import TrainingRun, register_checkpoint
    from pipelines.backbones import BackboneConfig, build_backbone
    from pipelines.extract import provenance_for, settings_json
    from tal_models.checkpoint import Checkpoint, save_checkpoint
    from tal_models.detectors import build_detector
    from tal_models.heads import ClassificationHead, OffsetRegressionHead
    from tal_models.presets import make_config

    torch.manual_seed(0)
    config = make_config("temporalmaxer", num_classes=len(SERVED_LABELS), input_dim=1280, max_seq_len=64, embed_dim=16, levels=3)
    model = build_detector(config)
    for head in model.modules():
        if isinstance(head, ClassificationHead):
            torch.nn.init.zeros_(head.tower.out.conv.bias)
        if isinstance(head, OffsetRegressionHead):
            torch.nn.init.constant_(head.tower.out.conv.bias, 2.0)
    backbone_config = BackboneConfig(name="mobilenet_v2")
    backbone = build_backbone(backbone_config, "cpu", num_threads=1)
    provenance = provenance_for(backbone, sampling, settings_json(backbone_config, sampling)).to_dict()
    checkpoint = Checkpoint.from_model(model.eval(), SERVED_LABELS, provenance)
    save_checkpoint(checkpoint, root / "model.pt")
    uri = f"sqlite:///{root / 'mlruns' / 'mlflow.db'}"
    (root / "mlruns").mkdir()
    with TrainingRun(uri, experiment, "fixture") as run:
        run.log_artifact(root / "model.pt", "checkpoint")
    register_checkpoint(uri, run.run_id, "checkpoint/model.pt", 0.5, "fixture")
    return uri, checkpoint, backbone


def synthetic_video(root: Path, seed: int) -> Path:
    """One real 4-5 s synthetic H.264 MP4 (160 x 120, 10 fps, 3 classes) under ``root``."""
    from pipelines.synth import synthesize

    synth = synthesize(
        root / "synth", videos=1, seed=seed, classes=3, duration_range=(4.0, 5.0), size=(160, 120), fps=10.0, workers=1, progress=False
    )
    return Path(next(iter(synth.videos.values())))


def run_tal(*args) -> subprocess.CompletedProcess[str]:
    """``tal ARGS`` in this process (``jobs.cli.main``): exit code, stdout and stderr as a subprocess would give them,
    without the seconds a new interpreter spends importing torch. The console script itself is run by a few tests."""
    from jobs.cli import main

    argv = [str(a) for a in args]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:  # argparse's own errors (exit 2) and --help (exit 0)
            code = e.code if isinstance(e.code, int) else 1
    return subprocess.CompletedProcess(["tal", *argv], code, out.getvalue(), err.getvalue())
