"""A feature-level data set with the real ActivityNet-1.3 validation timings and synthetic features.

The 4,728 validation videos of the common BSN/BMN protocol (``../shared/data/activitynet13/
validation_ground_truth_4728.json``: real durations, real segments, 200 classes) are split in two
halves by sorted id (even positions train, odd ones test), and each gets features on the TSP grid
(15 fps, stride 16, window 16: about one step per second, ~110 steps for a median video) from
``benchmarks/_thumos_like.py``'s generator and signal models. The conversion only renames: the
ActivityNet file becomes the ActionFormer-style JSON that generator reads (``label_id`` by sorted
class name, ``subset`` "validation" for the training half and "test" for the other, as THUMOS14's).

    make_anet_like(out_dir, input_dim=64, seed=0, max_videos_per_split=500, profile="prototype")
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from benchmarks._thumos_like import make_thumos_like

ANET_GROUND_TRUTH = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "activitynet13" / "validation_ground_truth_4728.json"
TSP_GRID = {"fps": 15.0, "stride": 16, "window": 16}


def thumos_style(source: str | Path = ANET_GROUND_TRUTH) -> dict[str, Any]:
    """The ActivityNet ground truth as the ActionFormer-style JSON ``make_thumos_like`` reads (halves as subsets)."""
    data = json.loads(Path(source).read_text())
    database = data.get("database", data)
    classes = sorted({a["label"] for v in database.values() for a in v["annotations"]})
    label_id = {name: i for i, name in enumerate(classes)}
    out = {}
    for i, vid in enumerate(sorted(database)):
        video = database[vid]
        out[vid] = {
            "subset": "validation" if i % 2 == 0 else "test",  # validation = the training half (THUMOS14's naming)
            "duration": float(video["duration"]),
            "fps": TSP_GRID["fps"],
            "annotations": [
                {"segment": list(map(float, a["segment"])), "label": a["label"], "label_id": label_id[a["label"]]}
                for a in video["annotations"]
            ],  # fmt: skip
        }
    return {"version": "activitynet-1.3 (halves)", "database": out}


def make_anet_like(out_dir: str | Path, *, input_dim: int = 64, seed: int = 0, max_videos_per_split: int | None = 500,
                   profile: str = "prototype", signal: float = 3.0) -> dict[str, Any]:  # fmt: skip
    """Write the data set (``make_thumos_like``'s layout: features/, annotations.json, meta.json) and return its summary."""
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "anet_thumos_style.json"
        source.write_text(json.dumps(thumos_style()))
        return make_thumos_like(
            out_dir, annotations=source, input_dim=input_dim, seed=seed, max_videos_per_split=max_videos_per_split, profile=profile,
            signal=signal, **TSP_GRID,
        )  # fmt: skip
