"""ONNX Runtime vs PyTorch on CPU: the dense part and the full ``detect`` of the three THUMOS14 presets.

For ``thumos14-actionformer``, ``thumos14-tridet`` and ``thumos14-temporalmaxer`` (random weights,
the papers' sizes: 2048-d features, 512 channels, 6 levels, 20 classes), one video of THUMOS14's
crop length (2,304 steps x 2,048):

- ``dense``: features [1, 2048, 2304] -> class logits, offsets, valid points (PyTorch
  ``OneStageDetector.dense`` under ``inference_mode`` vs the exported graph in ONNX Runtime);
- ``detect``: ``detect(features [2304, 2048])``, i.e. dense + decoding + Soft-NMS (the same
  Python decoding for both: ``RuntimeDetector`` hands ORT's outputs to ``tal_models.decode``).

PyTorch runs with 2 intra-op threads, ONNX Runtime with 2 intra-op threads (``--threads``); the two
are timed alternately, ``--repeats`` times each after one warm-up, and the medians compared. The
ORT graph is the one ``tal export --format onnx`` writes (exported in memory here, and verified
against PyTorch at another length). ``os.getloadavg()`` is printed before and after: the machine is
shared, and only the ratios measured side by side are meaningful.

Run: ``.venv/bin/python benchmarks/export.py [--repeats 5] [--threads 2]``; prints one JSON line.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import time
import warnings

import numpy as np
import onnx
import onnxruntime
import torch

from jobs.export import export_checkpoint, runtime_detector
from tal_models.checkpoint import Checkpoint
from tal_models.detectors import build_detector
from tal_models.presets import load_preset

PRESETS = ("thumos14-actionformer", "thumos14-tridet", "thumos14-temporalmaxer")
STEPS = 2304


def _median_ms(times: list[float]) -> float:
    return round(1000 * statistics.median(times), 1)


def bench_preset(name: str, repeats: int, threads: int) -> dict:
    torch.manual_seed(0)
    config = load_preset(name).detector
    model = build_detector(config).eval()
    checkpoint = Checkpoint.from_model(model, [f"class{i}" for i in range(config.num_classes)])
    started = time.perf_counter()
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        verify_diff = export_checkpoint(checkpoint, "onnx", buf, source=name)
    export_s = time.perf_counter() - started
    ort_model = runtime_detector(buf.getvalue(), name, num_threads=threads)[0]

    rng = np.random.default_rng(0)
    sequence = rng.standard_normal((STEPS, config.input_dim)).astype(np.float32)  # [T, C]
    features = torch.from_numpy(np.ascontiguousarray(sequence.T))[None]  # [1, C, T]
    mask = torch.ones(1, 1, STEPS, dtype=torch.bool)

    def torch_dense():
        with torch.inference_mode():
            return model.dense(features, mask, zero_padded=True)

    def ort_dense():
        return ort_model.dense(features, mask)

    def torch_detect():
        with torch.inference_mode():
            return model.detect(sequence)

    def ort_detect():
        return ort_model.detect(sequence)

    # the same detections, or the figures compare different work
    want, got = torch_detect(), ort_detect()
    assert len(want) == len(got) and np.allclose(np.asarray(want.scores), np.asarray(got.scores), atol=1e-4), name
    times: dict[str, list[float]] = {k: [] for k in ("torch_dense", "ort_dense", "torch_detect", "ort_detect")}
    fns = {"torch_dense": torch_dense, "ort_dense": ort_dense, "torch_detect": torch_detect, "ort_detect": ort_detect}
    for fn in fns.values():  # warm-up
        fn()
    for _ in range(repeats):
        for key, fn in fns.items():  # alternating: torch, ORT, torch, ORT
            start = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - start)
    med = {key: _median_ms(values) for key, values in times.items()}
    return {
        "preset": name,
        "detections": len(want),
        "export_s": round(export_s, 1),
        "verify_max_diff": verify_diff,
        "onnx_mb": round(len(buf.getvalue()) / 2**20, 1),
        "median_ms": med,
        "min_ms": {key: round(1000 * min(values), 1) for key, values in times.items()},
        "ort_speedup_dense": round(med["torch_dense"] / med["ort_dense"], 2),  # > 1: ORT faster
        "ort_speedup_detect": round(med["torch_detect"] / med["ort_detect"], 2),
        "all_ms": {key: [round(1000 * t, 1) for t in values] for key, values in times.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each path per preset (default 5)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads and ORT intra-op threads (default 2)")
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), help="presets to time (default: the three THUMOS14 ones)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    results = [bench_preset(name, args.repeats, args.threads) for name in args.presets]
    print(
        json.dumps(
            {
                "benchmark": "export: ONNX Runtime vs PyTorch (CPU)",
                "steps": STEPS,
                "threads": args.threads,
                "repeats": args.repeats,
                "results": results,
                "load_before": [round(x, 2) for x in load_before],
                "load_after": [round(x, 2) for x in os.getloadavg()],
                "versions": {
                    "torch": torch.__version__,
                    "onnx": onnx.__version__,
                    "onnxruntime": onnxruntime.__version__,
                    "numpy": np.__version__,
                    "python": platform.python_version(),
                },
                "cpu": {"cores": os.cpu_count(), "machine": platform.machine()},
            }
        ),  # fmt: skip
        flush=True,
    )


if __name__ == "__main__":
    main()
