"""Runs the ActivityNet reference algorithm, as shipped in ``actionformer==1.5.0``, on one case.

Executed by ``benchmarks/evaluation.py`` inside the separate reference venv (pandas and an old
torch pin make it unfit for ours). It builds the reference's DataFrames the way the ActivityNet
evaluator does (one row per instance or prediction, file order, integer labels by sorted class
name) and calls ``compute_average_precision_detection`` once per class, sequentially.
Prints one JSON object: seconds spent in the per-class calls, mAP per threshold.
"""

import json
import sys
import time

import numpy as np
import pandas as pd
from actionformer.utils.metrics import compute_average_precision_detection


def strip(video_id: str) -> str:
    # The reference matches ids literally; our evaluator accepts the v_ prefix either way.
    return video_id.removeprefix("v_")


def main() -> None:
    gt_path, pred_path, tiou_text = sys.argv[1:4]
    tiou = np.array(json.loads(tiou_text), dtype=np.float64)
    with open(gt_path) as f:
        gt_json = json.load(f)
    database = gt_json.get("database", gt_json)
    rows = [(strip(v), a["segment"][0], a["segment"][1], a["label"]) for v, d in database.items() for a in d["annotations"]]
    gt = pd.DataFrame(rows, columns=["video-id", "t-start", "t-end", "label"])
    classes = {name: i for i, name in enumerate(sorted(gt["label"].unique()))}
    gt["label"] = gt["label"].map(classes)
    with open(pred_path) as f:
        results = json.load(f)["results"]
    rows = [
        (strip(v), p["segment"][0], p["segment"][1], classes[p["label"]], p["score"])
        for v, preds in results.items()
        for p in preds
        if p["label"] in classes
    ]
    pred = pd.DataFrame(rows, columns=["video-id", "t-start", "t-end", "label", "score"])

    start = time.perf_counter()
    gt_by_label, pred_by_label = gt.groupby("label"), pred.groupby("label")
    ap = np.zeros((len(tiou), len(classes)))
    for cidx in classes.values():
        this_gt = gt_by_label.get_group(cidx).reset_index(drop=True)
        try:
            this_pred = pred_by_label.get_group(cidx).reset_index(drop=True)
        except KeyError:
            this_pred = pd.DataFrame()
        ap[:, cidx] = compute_average_precision_detection(this_gt, this_pred, tiou)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "mAP": ap.mean(axis=1).tolist(), "per_class_ap": ap.T.tolist()}))


if __name__ == "__main__":
    main()
