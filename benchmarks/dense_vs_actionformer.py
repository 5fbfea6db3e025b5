"""Dense (per-frame, multi-label) accuracy of MS-Temba vs our ActionFormer turned dense: same data, same
budget, judged on differently generated data sets and seeds.

    .venv/bin/python benchmarks/dense_vs_actionformer.py [--profiles prototype onset] [--seeds 0 1 2]
        [--steps 600] [--batch-size 2] [--max-seq-len 256] [--lr 4e-4] [--ema-decay 0.99]
        [--input-dim 64] [--embed-dim 64] [--max-videos-per-split 80] [--jobs 2] [--workdir DIR]

Data (``benchmarks/_dense_like.py``): every selected video of the real MultiTHUMOS annotation file
(``../shared/data/multithumos/multithumos.json``: real durations, 65 classes, the real overlaps and
co-occurrences; ``training`` videos train, ``testing`` videos evaluate) with synthetic features whose
signal model is the ``profile``: ``prototype`` (every label visible at each of its steps) or ``onset``
(a label shows fully only at its start, then weakly: temporal context pays). Each seed is a new data
set (new class prototypes and noise) and a new training seed. No I3D features can be downloaded here.

Models: the presets ``multithumos-mstemba`` (Temba blocks at dilations 1, 2, 4 at full resolution, a
bidirectional-Mamba fuser) and ``multithumos-actionformer`` (ActionFormer's 6-level pyramid encoder with
the dense head), both rebuilt at the benchmark's widths by ``make_config(arch, ..., levels=<the preset's>)``
with ``task="dense"``, keeping every other setting of the preset's encoder (window, mlp_ratio, ssm_expand,
stem_layers, kernel_size, ...), head (depth, kernel, prior) and neck kind. Both train for the same number
of optimiser steps with the same batch size, crop length, learning rate, warm-up, weight decay, gradient
clipping and EMA, on the same sequence of random crops (one generator per seed). A crop is labelled
exactly as the full video: every segment overlapping the window is kept unclipped (``dense_targets``
only looks at the window's steps), so no step of a crop loses a label it has in the video.

Metric: the per-frame mAP of the MultiTHUMOS protocol (``tal_models.evaluation.evaluate_dense``, open
boundaries, classes without positive frames excluded) over every test video, the frames being the
feature steps' centre times (``FeatureTiming.centers``) scored by the EMA weights' ``step_scores``.
Trainings run ``--jobs`` at a time with one thread each; with ``--workdir`` the data sets and each run's
result are kept and reused when the same run is asked again. Prints one JSON line: per profile each
model's mAP and training seconds (mean, std, min, max over seeds) and per-seed values, MS-Temba minus
ActionFormer seed by seed, ``target_mstemba_ahead`` (definition in the output's ``settings``), and the
``oracle_probe``: the training-free ``features @ prototypes.T`` with the generator's true prototypes, a
yardstick of how much of the signal the budget lets the models learn.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from dataclasses import fields, replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks._jobs import run_workers  # noqa: E402 (after the path)

MODELS = {"mstemba": "multithumos-mstemba", "actionformer": "multithumos-actionformer"}  # label -> preset
PROFILES = ("prototype", "onset")
WARMUP_FRACTION = 0.1  # of the optimiser steps, for both models (the presets' 5 of 50 / 5 of 35 epochs differ)
AHEAD_DEFINITION = (
    "per profile, d_s = mAP(mstemba) - mAP(actionformer) on seed s (same data, same crops); ahead iff "
    "mean(d) > 0 AND mean(d) > std(d) (sample std over seeds: the mean clears the seed-to-seed spread of the "
    "paired difference) AND min(d) > 0 (ahead on every seed); null with fewer than 2 seeds"
)


# --- one training (a subprocess) ----------------------------------------------------------
def load_split(data_dir: Path, split: str) -> tuple[list[dict], dict]:
    """Samples of ``split`` ("train"/"test"): features [T, C], segments [N, 2] in steps, label columns [N], timing."""
    from pipelines.annotations.multithumos import read_multithumos
    from tal_models.timing import FeatureTiming

    meta = json.loads((data_dir / "meta.json").read_text())
    timing = FeatureTiming(meta["fps"], meta["stride"], meta["window"])
    gt = read_multithumos(data_dir / "annotations.json")
    samples = []
    for video_id in meta["splits"][split]:
        video = gt.videos[video_id]
        seconds = np.asarray(video.segments.to_numpy().data, dtype=np.float64).reshape(-1, 2)
        samples.append({
            "video_id": video_id,
            "features": np.load(data_dir / "features" / f"{video_id}.npy"),
            "segments": timing.seconds_to_step(seconds).astype(np.float32),
            "labels": np.asarray(video.labels, dtype=np.int64) - 1,  # MultiTHUMOS ids 1..65 -> columns 0..64
            "timing": timing,
        })  # fmt: skip
    return samples, meta


def scaled_config(preset_name: str, *, num_classes: int, input_dim: int, embed_dim: int, max_seq_len: int):
    """The preset's detector at the benchmark's widths: ``make_config`` of its arch and levels, task dense,
    with every non-width setting of the preset's encoder, head and neck, and its loss and inference."""
    from tal_models.presets import load_preset, make_config

    d = load_preset(preset_name).detector
    scaled = make_config(
        d.arch, num_classes=num_classes, input_dim=input_dim, max_seq_len=max_seq_len, embed_dim=embed_dim, levels=d.encoder.levels
    )
    widths = {"input_dim", "embed_dim", "levels", "in_dim", "feat_dim", "out_dim"}

    def keep(section_scaled, section_preset):
        return replace(section_scaled, **{f.name: getattr(section_preset, f.name) for f in fields(section_preset) if f.name not in widths})

    return replace(
        scaled,
        task="dense",
        encoder=keep(scaled.encoder, d.encoder),
        head=keep(scaled.head, d.head),
        neck=keep(scaled.neck, d.neck),
        loss=d.loss,
        inference=d.inference,
    )


def crop_exact(sample: dict, length: int, g: np.random.Generator) -> dict:
    """A random window of ``length`` steps (``random_crop`` picks it) with every segment that overlaps it,
    unclipped and shifted: the window's steps keep exactly the labels they have in the full video."""
    from tal_models.batch import random_crop

    segs, labels = sample["segments"], sample["labels"]
    feats, _, _, offset = random_crop(sample["features"], segs, labels, length, g, min_kept_fraction=0.0)
    overlap = (segs[:, 1] > offset) & (segs[:, 0] < offset + feats.shape[0])
    return {"features": feats, "segments": segs[overlap] - offset, "labels": labels[overlap], "video_id": sample["video_id"]}


def train_and_evaluate(preset_name: str, data_dir: Path, args) -> dict:
    import torch

    from pipelines.annotations.multithumos import read_multithumos
    from tal_models.batch import collate
    from tal_models.detectors import build_detector
    from tal_models.evaluation import evaluate_dense
    from tal_models.optim import ModelEMA, build_optimizer, build_scheduler
    from tal_models.presets import load_preset
    from tal_models.training import train_one_epoch

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    train, meta = load_split(data_dir, "train")
    test, _ = load_split(data_dir, "test")
    config = scaled_config(
        preset_name, num_classes=meta["num_classes"], input_dim=meta["input_dim"], embed_dim=args.embed_dim, max_seq_len=args.max_seq_len
    )
    model = build_detector(config)
    # one optimiser step per "epoch": the schedule's warm-up and cosine are counted in steps, the same for both models
    optim = replace(
        load_preset(preset_name).optim,
        lr=args.lr,
        ema_decay=args.ema_decay,
        epochs=args.steps,
        warmup_epochs=round(WARMUP_FRACTION * args.steps),
    )
    optimizer = build_optimizer(model, optim)
    scheduler = build_scheduler(optimizer, optim, steps_per_epoch=1)
    ema = ModelEMA(model, optim.ema_decay)
    g = np.random.default_rng(args.seed)  # the same crops, in the same order, for every model of a seed

    def batches():
        done = 0
        while True:
            order = g.permutation(len(train))
            for i in range(0, len(order) - args.batch_size + 1, args.batch_size):
                if done == args.steps:
                    return
                crops = [crop_exact(train[j], args.max_seq_len, g) for j in order[i : i + args.batch_size]]
                yield collate(crops, model.pad_multiple, num_classes=config.num_classes)
                done += 1

    started = time.perf_counter()
    stats = train_one_epoch(model, batches(), optimizer, scheduler, ema=ema, clip_grad_norm=optim.clip_grad_norm)
    train_seconds = time.perf_counter() - started

    evaluated = ema.module.eval()
    started = time.perf_counter()
    scores = {}
    for s in test:
        batch = collate([{"features": s["features"], "video_id": s["video_id"]}], evaluated.pad_multiple)
        (step_scores,) = evaluated.step_scores(batch)  # [T, K]
        scores[s["video_id"]] = (s["timing"].centers(step_scores.shape[0]), step_scores)
    gt = read_multithumos(data_dir / "annotations.json")
    gt = replace(gt, videos={v: gt.videos[v] for v in meta["splits"]["test"]})
    metrics = evaluate_dense(gt, scores)
    infer_seconds = time.perf_counter() - started
    return {
        "preset": preset_name,
        "mAP": round(metrics.mAP, 4),
        "classes_evaluated": metrics.num_classes_evaluated,
        "test_frames": metrics.num_frames,
        "train_seconds": round(train_seconds, 1),
        "infer_seconds": round(infer_seconds, 1),
        "final_loss": round(float(stats["final_loss"]), 5),  # mean over the steps
        "params": sum(p.numel() for p in model.parameters()),
    }


def oracle_probe_map(data_dir: Path) -> float:
    """Per-frame mAP of the training-free probe ``features @ prototypes.T`` (the generator's true class
    directions): a yardstick of how much of the signal the trained models pick up, not a competitor."""
    from benchmarks._dense_like import NUM_CLASSES, class_directions
    from pipelines.annotations.multithumos import read_multithumos
    from tal_models.evaluation import evaluate_dense

    test, meta = load_split(data_dir, "test")
    prototypes = class_directions(NUM_CLASSES, meta["input_dim"], meta["seed"])  # [K, C]
    scores = {s["video_id"]: (s["timing"].centers(len(s["features"])), s["features"] @ prototypes.T) for s in test}
    gt = read_multithumos(data_dir / "annotations.json")
    return round(evaluate_dense(replace(gt, videos={v: gt.videos[v] for v in meta["splits"]["test"]}), scores).mAP, 4)


# --- the driver ----------------------------------------------------------------------------
def _settings(args) -> dict:
    return {
        "steps": args.steps, "batch_size": args.batch_size, "max_seq_len": args.max_seq_len, "input_dim": args.input_dim,
        "embed_dim": args.embed_dim, "lr": args.lr, "ema_decay": args.ema_decay, "warmup_fraction": WARMUP_FRACTION,
        "max_videos_per_split": args.max_videos_per_split, "threads_per_model": 1, "crop_labels": "exact (overlapping segments kept)",
    }  # fmt: skip


def _summary(values: list[float]) -> dict:
    a = np.asarray(values, dtype=np.float64)
    return {"mean": round(float(a.mean()), 4), "std": round(float(a.std(ddof=1)) if len(a) > 1 else 0.0, 4),
            "min": round(float(a.min()), 4), "max": round(float(a.max()), 4), "n": len(a)}  # fmt: skip


def _worker_cmd(preset: str, args, data_dir: Path, seed: int) -> list[str]:
    return [
        sys.executable, __file__, "--worker", preset, "--data", str(data_dir), "--seed", str(seed), "--threads", "1",
        "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--max-seq-len", str(args.max_seq_len),
        "--embed-dim", str(args.embed_dim), "--lr", str(args.lr), "--ema-decay", str(args.ema_decay),
    ]  # fmt: skip


def _table(profiles, seeds, runs: list[dict], probes: dict) -> dict:
    table = {}
    for profile in profiles:
        per = {label: {r["seed"]: r["result"] for r in runs if r["profile"] == profile and r["label"] == label and "mAP" in r["result"]}
               for label in MODELS}  # fmt: skip
        entry: dict = {}
        for label, by_seed in per.items():
            if by_seed:
                ordered = sorted(by_seed)
                entry[label] = {
                    "mAP": _summary([by_seed[s]["mAP"] for s in ordered]),
                    "per_seed": {s: by_seed[s]["mAP"] for s in ordered},
                    "train_seconds": _summary([by_seed[s]["train_seconds"] for s in ordered]),
                    "train_seconds_per_seed": {s: by_seed[s]["train_seconds"] for s in ordered},
                    "final_loss_per_seed": {s: by_seed[s]["final_loss"] for s in ordered},
                    "params": by_seed[ordered[0]]["params"],
                }
        common = [s for s in seeds if s in per["mstemba"] and s in per["actionformer"]]
        if common:
            diff = {s: round(per["mstemba"][s]["mAP"] - per["actionformer"][s]["mAP"], 4) for s in common}
            summary = _summary(list(diff.values()))
            entry["mstemba_minus_actionformer"] = {"per_seed": diff, **summary}
            ahead = summary["mean"] > 0 and summary["mean"] > summary["std"] and summary["min"] > 0
            entry["target_mstemba_ahead"] = bool(ahead) if len(common) > 1 else None  # one seed has no spread to clear
        probe = {s: probes[profile, s] for s in seeds}
        entry["oracle_probe"] = {"mAP": _summary(list(probe.values())), "per_seed": probe}
        table[profile] = entry
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profiles", nargs="+", default=list(PROFILES), choices=PROFILES)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="one data set and one training seed each")
    parser.add_argument("--steps", type=int, default=600, help="optimiser steps of every model")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--max-seq-len", type=int, default=256, help="training crop (steps); test videos are scored whole")
    parser.add_argument("--lr", type=float, default=4e-4)
    parser.add_argument("--ema-decay", type=float, default=0.99, help="EMA of the evaluated weights")
    parser.add_argument("--input-dim", type=int, default=64, help="feature width of the generated data")
    parser.add_argument("--embed-dim", type=int, default=64, help="the models' embedding / neck / head width")
    parser.add_argument("--max-videos-per-split", type=int, default=80, help="videos per split (evenly spaced over the ids)")
    parser.add_argument("--jobs", type=int, default=2, help="trainings at a time, one thread each")
    parser.add_argument("--workdir", type=Path, help="keep data sets and per-run results here and reuse them")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        print(json.dumps(train_and_evaluate(args.worker, args.data, args)))
        return

    from benchmarks._dense_like import make_dense_like
    from benchmarks._machine import busy_since, cpu_times, loadavg

    started, cpu_start, load_before = time.perf_counter(), cpu_times(), loadavg()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="tal-dense-"))
    workdir.mkdir(parents=True, exist_ok=True)
    settings = _settings(args)
    settings_key = json.dumps(settings, sort_keys=True)

    jobs, probes = [], {}
    for profile in args.profiles:
        for seed in args.seeds:
            data_dir = workdir / f"data-{profile}-{seed}-d{args.input_dim}-v{args.max_videos_per_split}"
            if not (data_dir / "meta.json").exists():
                make_dense_like(
                    data_dir, input_dim=args.input_dim, seed=seed, max_videos_per_split=args.max_videos_per_split, profile=profile
                )
            probes[profile, seed] = oracle_probe_map(data_dir)
            for label, preset in MODELS.items():
                key = json.dumps([settings_key, preset, profile, seed])
                name = f"{profile}-{seed}-{label}-{hashlib.sha1(key.encode()).hexdigest()[:12]}"
                jobs.append({"profile": profile, "seed": seed, "label": label, "preset": preset, "data": data_dir,
                             "info": workdir / f"{name}.json", "key": key})  # fmt: skip

    runs: list[dict] = []

    def cached(job):
        info = json.loads(job["info"].read_text()) if job["info"].exists() else None
        return info["result"] if info and info.get("key") == job["key"] else None

    def command(job):
        return _worker_cmd(job["preset"], args, job["data"], job["seed"])

    for job, returncode, stdout, stderr in run_workers(jobs, command, args.jobs, ROOT, cached):
        if returncode is None:
            runs.append(job | {"result": cached(job), "cached": True})
        elif returncode != 0:
            print(f"{job['label']} on {job['profile']}/{job['seed']} failed:\n{stderr[-1500:]}", file=sys.stderr)
            runs.append(job | {"result": {"error": stderr[-1500:]}})
        else:
            result = json.loads(stdout.strip().splitlines()[-1])
            job["info"].write_text(json.dumps({"key": job["key"], "result": result}))
            runs.append(job | {"result": result})
            print(f"{job['profile']}/{job['seed']} {job['label']}: {json.dumps(result)}", file=sys.stderr, flush=True)

    print(
        json.dumps(
            {
                "benchmark": "dense_vs_actionformer",
                "settings": settings
                | {
                    "profiles": args.profiles,
                    "seeds": args.seeds,
                    "models": MODELS,
                    "jobs": args.jobs,
                    "workdir": str(workdir),
                    "metric": "per-frame mAP (evaluate_dense: open boundaries, empty classes excluded) at the feature steps' centres",
                    "target_mstemba_ahead": AHEAD_DEFINITION,
                    "cached_runs": sum(1 for r in runs if r.get("cached")),
                },
                "table": _table(args.profiles, args.seeds, runs, probes),
                "failures": [f"{r['profile']}/{r['seed']} {r['label']}" for r in runs if "error" in r["result"]],
                "machine": {"load_before": load_before, "load_after": loadavg(), "machine_busy_fraction": busy_since(cpu_start)},
                "wall_s": round(time.perf_counter() - started, 1),
            }
        )  # fmt: skip
    )


if __name__ == "__main__":
    main()
