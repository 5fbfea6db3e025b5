"""Two-stage (BMN) and set-prediction (TadTR) detectors vs our ActionFormer, and our video classifier's fusion.

    .venv/bin/python benchmarks/two_stage.py [--parts thumos anet speed] [--seeds 0 1 2] [--profile prototype]
        [--steps 400] [--input-dim 64] [--embed-dim 64] [--max-videos-per-split 100] [--anet-videos 400] [--jobs 2] [--workdir DIR]

``thumos``: on the THUMOS14-timed feature set of ``benchmarks/accuracy_vs_actionformer.py`` (``_thumos_like``: the
real THUMOS14 timings, synthetic features of the ``--profile`` signal model; Validation trains, Test evaluates), our
``thumos14-actionformer``, ``thumos14-bmn`` (BMN + its proposal classifier, windows) and ``thumos14-tadtr`` (windows),
each trained for the same ``--steps`` optimiser steps of ``--batch-size`` crops, at the benchmark's widths, 3 seeds
(a new data set and training seed each). Average mAP at tIoU 0.3:0.1:0.7; TadTR / ActionFormer seed by seed (the
issue's target: >= 0.85, the published 56.7 / 66.8).

``anet``: on an ActivityNet-timed feature set (``_anet_like``: the real durations and segments of the 4,728
validation videos, in two halves: one trains, the other tests; synthetic class-conditional features),
class-agnostic ``anet-actionformer`` and ``anet-bmn`` (resized to 100 cells) and our video classifier
(``anet-classifier``): AR@100 and AUC of each detector, and average mAP at 0.5:0.05:0.95 after fusion with (a) our
classifier's scores and (b) the ground-truth video labels (the ceiling: score 1 for each labelled class); target
(a) >= 0.9 x (b).

``speed``: inference time per video at each protocol's published size (THUMOS14: 2048-d input, a 1,500-step
video; ActivityNet: 512-d, a 120-step video), untrained weights, one thread, the models interleaved in one
process; ratios to our ActionFormer of the same protocol.

Trainings run ``--jobs`` at a time with one thread each. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks._jobs import add_worker_arguments, run_model_jobs  # noqa: E402 (after the path)

THUMOS_MODELS = ("actionformer", "bmn", "tadtr")
ANET_MODELS = ("anet-actionformer", "anet-bmn", "classifier")
LR = {"actionformer": 4e-4, "bmn": 1e-3, "tadtr": 2e-4, "classifier": 3e-3}  # the accuracy benchmark's for ActionFormer, the papers' else


def build_config(model: str, num_classes: int, input_dim: int, embed: int, max_seq_len: int, full: bool = False):
    """``model``'s detector config at the benchmark's widths (``full``: the shipped preset's, for the speed part)."""
    from tal_models.detectors.bmn import bmn_config
    from tal_models.detectors.classifier import VideoClassifierConfig
    from tal_models.detectors.tadtr import tadtr_config
    from tal_models.presets import load_preset, make_config

    family, _, arch = model.rpartition("-") if model.startswith("anet-") else ("", "", model)
    anet = family == "anet"
    if full:
        preset = load_preset(("anet-" if anet else "thumos14-") + arch)
        return replace(preset.detector, num_classes=num_classes)
    protocol = "activitynet" if anet else "thumos14"
    match arch:
        case "actionformer":
            preset = load_preset("anet-actionformer" if anet else "thumos14-actionformer").detector
            scaled = make_config("actionformer", num_classes=num_classes, input_dim=input_dim, max_seq_len=192 if anet else max_seq_len,
                                 embed_dim=embed)  # fmt: skip
            return replace(
                scaled, loss=preset.loss, inference=preset.inference, encoder=replace(scaled.encoder, window=preset.encoder.window)
            )
        case "bmn":  # widths / 4 of the published 256 / 128 / 512, 16 bins of 2 points
            return bmn_config(protocol=protocol, num_classes=num_classes, input_dim=input_dim, hidden_1d=embed, hidden_2d=embed // 2,
                              hidden_3d=2 * embed, num_samples=16, samples_per_bin=2)  # fmt: skip
        case "tadtr":
            return tadtr_config(protocol=protocol, num_classes=num_classes, input_dim=input_dim, embed_dim=embed, ffn_dim=4 * embed)
        case "classifier":
            return VideoClassifierConfig(num_classes=num_classes, input_dim=input_dim, hidden_dim=2 * embed, max_seq_len=4096, dropout=0.0)
    raise ValueError(f"unknown model {model!r}")


# --- a worker: one model trained and run on one data set --------------------------------------------------------
def train_and_run(
    model: str, data_dir: Path, out: Path, steps: int, batch_size: int, embed: int, max_seq_len: int, seed: int, lr: float | None = None
) -> dict:
    import torch

    from benchmarks.accuracy_vs_actionformer import fit_crops, load_split
    from tal_models.detectors import build_detector

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    train, meta, _ = load_split(data_dir, "train")
    test, _, _ = load_split(data_dir, "test")
    agnostic = model.startswith("anet-")
    config = build_config(model, 1 if agnostic else len(meta["classes"]), meta["input_dim"], embed, max_seq_len)
    net = build_detector(config)
    weight_decay = 0.05 if "actionformer" in model else 1e-4
    evaluated, stats, train_seconds, epochs = fit_crops(
        net, train, steps, batch_size, config.max_seq_len, lr or LR[model.removeprefix("anet-")], weight_decay, seed, agnostic
    )
    started = time.perf_counter()
    with torch.inference_mode():
        if model == "classifier":
            scores = {s["video_id"]: evaluated.classify(s["features"]).tolist() for s in test}
            out.write_text(json.dumps({"scores": scores, "classes": meta["classes"]}))
        else:
            from pipelines.annotations import write_activitynet_results
            from tal_models.structures import LabelMap

            found = {s["video_id"]: evaluated.detect(s["features"], s["timing"], s["duration"], s["video_id"]) for s in test}
            write_activitynet_results(out, found.values(), LabelMap.from_names(["action"] if agnostic else meta["classes"]))
    infer_seconds = time.perf_counter() - started
    return {"model": model, "train_seconds": round(train_seconds, 1), "infer_ms_per_video": round(1000 * infer_seconds / len(test), 2),
            "mean_loss": round(float(stats["final_loss"]), 4), "params": sum(p.numel() for p in net.parameters()), "epochs": epochs}  # fmt: skip


# --- scoring ----------------------------------------------------------------------------------------------------
def thumos_map(pred: Path, data_dir: Path) -> float:
    from benchmarks.accuracy_vs_actionformer import evaluate

    return evaluate(pred, data_dir)["average_mAP"]


def anet_scores(det_pred: Path, cls_pred: Path, data_dir: Path) -> dict:
    """AR@100 / AUC of class-agnostic detections, and average mAP at 0.5:0.95 fused with (a) the classifier, (b) the truth."""
    from pipelines.annotations import read_activitynet_results, read_annotations
    from tal_models.evaluation import ACTIVITYNET_TIOU, evaluate_detection, evaluate_proposals
    from tal_models.postprocess import fuse_video_classifier
    from tal_models.structures import Detections, LabelMap

    gt = read_annotations(data_dir / "annotations.json").subset("Test")
    found = read_activitynet_results(det_pred, LabelMap.from_names(["action"])).detections
    proposals = evaluate_proposals(gt, found, ACTIVITYNET_TIOU).to_dict()
    classified = json.loads(cls_pred.read_text())
    names = classified["classes"]
    gt_id = np.array([gt.label_map.id(n) if n in gt.label_map else -1 for n in names], np.int64)  # -1: no test video has it
    out = {"AR@100": round(proposals["AR@100"], 4), "AUC": round(proposals["AUC"], 4)}
    for how in ("classifier", "ground_truth"):
        fused = {}
        for vid, d in found.items():
            if how == "classifier":
                scores = np.asarray(classified["scores"][vid], np.float64)
            else:  # the ceiling: each labelled class scores 1, the others 0
                scores = np.zeros(len(names))
                scores[[names.index(gt.label_map.name(int(k))) for k in gt[vid].labels]] = 1.0
            f = fuse_video_classifier(d, scores, 2)
            labels = gt_id[np.asarray(f.labels, np.int64)]
            fused[vid] = Detections(vid, f.segments, f.scores, labels)[labels >= 0]  # classes absent from the test half score no AP
        out[f"average_mAP_{how}"] = round(float(evaluate_detection(gt, fused, ACTIVITYNET_TIOU).mAP.mean()), 4)
    out["fused_ratio"] = round(out["average_mAP_classifier"] / max(out["average_mAP_ground_truth"], 1e-9), 4)
    return out


# --- speed ------------------------------------------------------------------------------------------------------
def speed(repeats: int = 5) -> dict:
    import torch

    from tal_models.detectors import build_detector
    from tal_models.timing import FeatureTiming

    torch.set_num_threads(1)
    torch.manual_seed(0)
    result = {}
    for protocol, (prefix, dim, steps, models) in {
        "thumos14": ("", 2048, 1500, ("actionformer", "bmn", "tadtr")),
        "activitynet": ("anet-", 512, 120, ("actionformer", "bmn", "tadtr")),
    }.items():
        nets = {m: build_detector(build_config(prefix + m, 20 if not prefix else 1, dim, 0, 2304, full=True)).eval() for m in models}
        x = torch.randn(steps, dim)
        timing = FeatureTiming(30.0, 4, 16) if not prefix else FeatureTiming(15.0, 16, 16)
        times = {m: [] for m in models}
        with torch.inference_mode():
            for m in models:
                nets[m].detect(x, timing)  # warm-up
            for _ in range(repeats):  # interleaved, so a load change hits every model alike
                for m in models:
                    started = time.perf_counter()
                    nets[m].detect(x, timing)
                    times[m].append(time.perf_counter() - started)
        ms = {m: round(1000 * float(np.median(t)), 1) for m, t in times.items()}
        result[protocol] = {"steps": steps, "input_dim": dim, "ms_per_video": ms,
                            "vs_actionformer": {m: round(ms[m] / ms["actionformer"], 3) for m in models}}  # fmt: skip
    return result


# --- the driver -------------------------------------------------------------------------------------------------
def _summary(values: list[float]) -> dict:
    a = np.asarray(values, dtype=np.float64)
    return {"mean": round(float(a.mean()), 4), "std": round(float(a.std(ddof=1)) if len(a) > 1 else 0.0, 4),
            "min": round(float(a.min()), 4), "max": round(float(a.max()), 4), "n": len(a)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=["thumos", "anet", "speed"], choices=["thumos", "anet", "speed"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--profile", default="prototype", help="signal model of benchmarks/_thumos_like.py")
    parser.add_argument("--steps", type=int, default=400, help="optimiser steps of every THUMOS model")
    parser.add_argument("--anet-steps", type=int, default=400, help="optimiser steps of every ActivityNet detector")
    parser.add_argument(
        "--classifier-steps", type=int, default=12000, help="optimiser steps of the video classifier (a step costs ~1/100 of a detector's)"
    )
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--input-dim", type=int, default=64)
    parser.add_argument("--embed-dim", type=int, default=64)
    parser.add_argument("--max-seq-len", type=int, default=576, help="ActionFormer's THUMOS crop")
    parser.add_argument("--max-videos-per-split", type=int, default=100, help="THUMOS videos per split")
    parser.add_argument("--anet-videos", type=int, default=1200, help="ActivityNet videos per half (of 2,364)")
    parser.add_argument("--models", nargs="+", help=f"only these of {THUMOS_MODELS + ANET_MODELS} (e.g. a learning-rate probe)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--workdir", type=Path)
    add_worker_arguments(parser)
    parser.add_argument("--lr", nargs="*", default=[], help="MODEL=LR overrides of the learning rates (default: " + str(LR) + ")")
    args = parser.parse_args()
    if args.worker:
        args.lr = float(args.lr[0]) if args.lr else None
        info = train_and_run(
            args.worker, args.data, args.out, args.steps, args.batch_size, args.embed_dim, args.max_seq_len, args.seed, args.lr
        )
        print(json.dumps(info))
        return

    from benchmarks._anet_like import make_anet_like
    from benchmarks._machine import loadavg
    from benchmarks._thumos_like import make_thumos_like

    started, load_before = time.perf_counter(), loadavg()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="tal-two-stage-"))
    workdir.mkdir(parents=True, exist_ok=True)
    tag = f"d{args.input_dim}-e{args.embed_dim}-b{args.batch_size}"
    lrs = LR | {k.removeprefix("anet-"): float(v) for k, v in (item.split("=") for item in args.lr)}
    jobs = []
    for seed in args.seeds:
        if "thumos" in args.parts:
            data = workdir / f"thumos-{args.profile}-{seed}-d{args.input_dim}-v{args.max_videos_per_split}"
            if not (data / "meta.json").exists():
                make_thumos_like(
                    data, input_dim=args.input_dim, seed=seed, max_videos_per_split=args.max_videos_per_split, profile=args.profile
                )
            for m in (m for m in THUMOS_MODELS if not args.models or m in args.models):
                lr = lrs[m]
                name = f"{data.name}-{m}-{tag}-s{args.steps}" + (f"-lr{lr:g}" if lr != LR[m] else "")
                jobs.append({"part": "thumos", "seed": seed, "model": m, "data": data, "steps": args.steps, "lr": lr,
                             "out": workdir / f"{name}.json", "info": workdir / f"{name}.info.json"})  # fmt: skip
        if "anet" in args.parts:
            data = workdir / f"anet-{args.profile}-{seed}-d{args.input_dim}-v{args.anet_videos}"
            if not (data / "meta.json").exists():
                make_anet_like(data, input_dim=args.input_dim, seed=seed, max_videos_per_split=args.anet_videos, profile=args.profile)
            for m in (m for m in ANET_MODELS if not args.models or m in args.models):
                lr = lrs[m.removeprefix("anet-")]
                steps = args.classifier_steps if m == "classifier" else args.anet_steps
                name = f"{data.name}-{m}-{tag}-s{steps}" + (f"-lr{lr:g}" if lr != LR[m.removeprefix("anet-")] else "")
                jobs.append({"part": "anet", "seed": seed, "model": m, "data": data, "steps": steps, "lr": lr,
                             "out": workdir / f"{name}.json", "info": workdir / f"{name}.info.json"})  # fmt: skip
    run_model_jobs(jobs, args, __file__, ROOT)

    report: dict = {
        "benchmark": "two_stage",
        "setting": {k: v for k, v in vars(args).items() if k not in ("worker", "data", "out", "seed")},
    }
    report["setting"]["workdir"] = str(workdir)
    ok = [j for j in jobs if "error" not in j.get("result", {"error": 1})]
    if "thumos" in args.parts:
        maps = {(j["model"], j["seed"]): thumos_map(j["out"], j["data"]) for j in ok if j["part"] == "thumos"}
        table = {}
        for m in THUMOS_MODELS:
            seeds = [s for s in args.seeds if (m, s) in maps]
            if seeds:
                runs = [j["result"] for j in ok if j["part"] == "thumos" and j["model"] == m]
                table[m] = {"average_mAP": _summary([maps[m, s] for s in seeds]), "per_seed": {s: round(maps[m, s], 4) for s in seeds},
                            "train_seconds": _summary([r["train_seconds"] for r in runs]), "params": runs[0]["params"]}  # fmt: skip
        for m in ("bmn", "tadtr"):
            common = [s for s in args.seeds if (m, s) in maps and ("actionformer", s) in maps]
            if common:
                table[m]["vs_actionformer"] = _summary([maps[m, s] / max(maps["actionformer", s], 1e-9) for s in common])
        report["thumos"] = table
    if "anet" in args.parts:
        table = {}
        for seed in args.seeds:
            by_model = {j["model"]: j for j in ok if j["part"] == "anet" and j["seed"] == seed}
            if "classifier" not in by_model:
                continue
            for m in ("anet-actionformer", "anet-bmn"):
                if m in by_model:
                    table.setdefault(m, {})[seed] = anet_scores(by_model[m]["out"], by_model["classifier"]["out"], by_model[m]["data"])
        report["anet"] = {
            m: {"per_seed": per_seed, **{k: _summary([r[k] for r in per_seed.values()]) for k in next(iter(per_seed.values()))}}
            for m, per_seed in table.items()
        }
    if "speed" in args.parts:
        report["speed"] = speed()
    report["failures"] = [f"{j['part']}/{j['seed']} {j['model']}" for j in jobs if "error" in j.get("result", {"error": 1})]
    report.update(load_before=load_before, load_after=loadavg(), wall_s=round(time.perf_counter() - started, 1))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
