"""Our evaluator vs the ActivityNet reference algorithm, side by side, on real eval cases.

    .venv/bin/python benchmarks/evaluation.py [--data ../shared/data] [--repeats 5]

Prints ONE JSON line: per case our seconds (median of repeats, parsed inputs), the reference's
seconds (its per-class calls, when the reference venv exists), the ratio, the largest absolute
mAP difference between the two, and the largest difference from the published table; plus the
machine's load. The reference venv is ``.venv-reference`` (or ``$TAL_REFERENCE_PYTHON``); make it
with ``bash benchmarks/setup_reference_venv.sh``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from pipelines.annotations import read_activitynet_results, read_annotations
from tal_models.evaluation import ACTIVITYNET_TIOU, evaluate_detection

ROOT = Path(__file__).resolve().parents[1]
REFERENCE_SCRIPT = ROOT / "benchmarks" / "_reference_eval.py"


def reference_python() -> Path | None:
    candidate = Path(os.environ.get("TAL_REFERENCE_PYTHON", ROOT / ".venv-reference" / "bin" / "python"))
    return candidate if candidate.exists() else None


def cases(data: Path) -> list[tuple[str, Path, Path, np.ndarray, list[float] | None]]:
    out = []
    for case_dir in sorted((data / "eval_cases").iterdir()):
        if not (case_dir / "expected.json").exists():
            continue
        expected = json.loads((case_dir / "expected.json").read_text())
        out.append((case_dir.name, case_dir / "ground_truth.json", case_dir / "predictions.json", np.array(expected["tiou"]), expected["mAP"]))
    anet = data / "activitynet13"
    out.append(("activitynet13_sample_submission", anet / "validation_ground_truth.json", anet / "sample_detection_prediction.json", ACTIVITYNET_TIOU, [1.0] * 10))
    return out


def run_reference(python: Path, gt: Path, pred: Path, tiou: np.ndarray) -> dict:
    proc = subprocess.run(
        [str(python), str(REFERENCE_SCRIPT), str(gt), str(pred), json.dumps(tiou.tolist())],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-reference", action="store_true")
    args = parser.parse_args()
    ref_python = None if args.no_reference else reference_python()

    results = {}
    for name, gt_path, pred_path, tiou, expected in cases(args.data):
        t0 = time.perf_counter()
        gt = read_annotations(gt_path)
        preds = read_activitynet_results(pred_path, gt.label_map).detections
        parse_s = time.perf_counter() - t0
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            metrics = evaluate_detection(gt, preds, tiou)
            times.append(time.perf_counter() - t0)
        ours = statistics.median(times)
        row = {
            "ours_s": round(ours, 4),
            "ours_parse_s": round(parse_s, 4),
            "predictions": metrics.num_predictions,
            "thresholds": len(tiou),
            "average_mAP": metrics.average_mAP,
            "max_abs_diff_vs_published": float(np.max(np.abs(metrics.mAP - np.array(expected)))) if expected else None,
            "reference_s": None,
            "ratio": None,
            "max_abs_diff_vs_reference": None,
        }
        if ref_python is not None:
            ref = run_reference(ref_python, gt_path, pred_path, tiou)
            row["reference_s"] = round(ref["seconds"], 3)
            row["ratio"] = round(ref["seconds"] / ours, 1)
            row["max_abs_diff_vs_reference"] = float(np.max(np.abs(metrics.mAP - np.array(ref["mAP"]))))
            row["max_abs_diff_per_class_ap_vs_reference"] = float(np.max(np.abs(metrics.ap.T - np.array(ref["per_class_ap"]))))
        results[name] = row
    load1, load5, _ = os.getloadavg()
    print(
        json.dumps(
            {
                "benchmark": "evaluation",
                "reference": str(ref_python) if ref_python else None,
                "cases": results,
                "machine": {"cpus": os.cpu_count(), "loadavg_1m": round(load1, 2), "loadavg_5m": round(load5, 2), "python": sys.version.split()[0], "numpy": np.__version__},
            }
        )
    )


if __name__ == "__main__":
    main()
