"""Accuracy of our detectors vs the original ActionFormer (``actionformer==1.5.0``): same data, same budget,
judged on several differently generated data sets and seeds.

    .venv/bin/python benchmarks/accuracy_vs_actionformer.py [--profiles prototype confusable cuts phases]
        [--seeds 0 1 2] [--variants LABEL=PRESET[,key=value,...] ...] [--inference-variants LABEL=key=value;... ...]
        [--steps 400] [--lr 4e-4] [--max-seq-len 576] [--max-videos-per-split 100] [--jobs 2] [--workdir DIR]

Each data set (``benchmarks/_thumos_like.py``) follows the real THUMOS14 annotation timings
(``../shared/data/thumos14/thumos14.json``: the real durations, segment lengths, overlaps and class
frequencies; Validation videos train, Test videos evaluate) with synthetic features whose signal model
is the ``profile`` (see that module: ``prototype``, ``confusable``, ``cuts``, and ``phases``, which is
meant to stay out of tuning); each seed is a new data set and a new training seed. No I3D features can
be downloaded here. Every model trains for the same number of optimiser steps with the same batch size,
crop length, learning rate and EMA, and is evaluated on the test videos with our evaluator (ActivityNet
semantics, tIoU 0.3:0.1:0.7). Widths are scaled down equally for every model so that the whole run fits
a CPU budget: ``--input-dim`` (feature width) and ``--embed-dim`` (the models' embedding / FPN / head
width; the reference gets the same through its config overrides).

Our models are *variants*: a preset plus ``tal train --set``-style overrides (``dyn=thumos14-actionformer,
detector.loss.assigner=dynamic``); *inference variants* decode the same trained weights with other
post-processing settings, reported as ``VARIANT|LABEL``. Trainings run ``--jobs`` at a time with one
thread each, the reference alongside ours. With ``--workdir`` the data sets and each run's result are
kept and reused when the same run (same settings, same variant) is asked again. Prints one JSON line:
per profile each model's average mAP (mean, std, min, max over seeds), ours minus the reference seed by
seed, the training time relative to the reference's, and the worst profile's margin.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks._jobs import run_workers  # noqa: E402 (after the path)

REFERENCE_PYTHON = ROOT / ".venv-reference" / "bin" / "python"
THUMOS_TIOU = [0.3, 0.4, 0.5, 0.6, 0.7]
DEFAULT_VARIANTS = ("thumos14-actionformer",)
TUNING_PROFILES = ("prototype", "confusable", "cuts")  # "phases" is held out: check a tuned recipe on it


# --- our side ------------------------------------------------------------------------------
def load_split(data_dir: Path, split: str):
    """Samples of ``split`` ("train"/"test"): features [T, C], segments in steps, labels, timing."""
    from pipelines.annotations import read_annotations
    from tal_models.timing import FeatureTiming

    meta = json.loads((data_dir / "meta.json").read_text())
    timing = FeatureTiming(meta["fps"], meta["stride"], meta["window"])
    classes = {name: i for i, name in enumerate(meta["classes"])}
    gt = read_annotations(data_dir / "annotations.json")
    samples = []
    for video_id in meta["splits"][split]:
        video = gt[video_id]
        steps = timing.seconds_to_step(np.asarray(video.segments.data, dtype=np.float64))
        labels = np.array([classes[gt.label_map.name(int(k))] for k in video.labels], dtype=np.int64)
        samples.append({
            "video_id": video_id,
            "features": np.load(data_dir / "features" / f"{video_id}.npy"),
            "segments": steps.astype(np.float32).reshape(-1, 2),
            "labels": labels,
            "timing": timing,
            "duration": video.duration,
        })  # fmt: skip
    return samples, meta, gt


def train_ours(
    preset_name: str,
    data_dir: Path,
    steps: int,
    batch_size: int,
    embed_dim: int,
    max_seq_len: int,
    seed: int,
    threads: int,
    ema_decay: float | None,
    overrides: list[str] = (),
    inference_variants: list[str] = (),
    lr: float | None = None,
):
    import torch

    from tal_models.detectors import build_detector
    from tal_models.optim import ModelEMA, build_optimizer, build_scheduler
    from tal_models.presets import load_preset, make_config
    from tal_models.training import train_one_epoch

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    train, meta, _ = load_split(data_dir, "train")
    test, _, _ = load_split(data_dir, "test")
    preset = _with_overrides(load_preset(preset_name), overrides)
    d = preset.detector
    # the preset's architecture at the benchmark's widths: rebuilt by make_config, keeping the preset's loss and inference
    scaled = make_config(
        d.arch, num_classes=len(meta["classes"]), input_dim=meta["input_dim"], max_seq_len=max_seq_len, embed_dim=embed_dim
    )
    config = replace(
        scaled, loss=d.loss, inference=d.inference, refine=d.refine, encoder=replace(scaled.encoder, **_encoder_extras(d.encoder))
    )
    model = build_detector(config)
    steps_per_epoch = math.ceil(len(train) / batch_size)
    epochs = max(1, round(steps / steps_per_epoch))
    warmup = min(epochs - 1, round(epochs * preset.optim.warmup_epochs / preset.optim.epochs))
    optim = replace(preset.optim, epochs=epochs, warmup_epochs=warmup)
    if lr is not None and not any(o.startswith("optim.lr=") for o in overrides):
        optim = replace(optim, lr=lr)  # the benchmark's common learning rate, unless the variant sets its own
    if ema_decay is not None and not any(o.startswith("optim.ema_decay=") for o in overrides):
        optim = replace(optim, ema_decay=ema_decay)  # the benchmark's common EMA, unless the variant sets its own
    optimizer = build_optimizer(model, optim)
    scheduler = build_scheduler(optimizer, optim, steps_per_epoch)
    ema = ModelEMA(model, optim.ema_decay) if optim.ema_decay else None
    g = np.random.default_rng(seed)
    started = time.perf_counter()
    stats = train_one_epoch(
        model,
        crop_batches(train, steps, batch_size, max_seq_len, g, model.pad_multiple),
        optimizer,
        scheduler,
        ema=ema,
        clip_grad_norm=optim.clip_grad_norm or None,
    )
    train_seconds = time.perf_counter() - started

    evaluated = ema.module if ema is not None else model
    evaluated.eval()
    started = time.perf_counter()
    predictions = _detect_all(evaluated, test)
    infer_seconds = time.perf_counter() - started
    # the same trained weights decoded with other inference settings (post-processing variants cost no training)
    alternatives = {}
    for spec in inference_variants:
        label, _, rest = spec.partition("=")
        evaluated.config = replace(config, inference=_with_overrides(preset, rest.split(";")).detector.inference)
        alternatives[label] = _detect_all(evaluated, test)
    evaluated.config = config
    return (
        predictions,
        alternatives,
        {
            "impl": preset_name,
            "steps": steps,
            "train_seconds": round(train_seconds, 1),
            "infer_seconds": round(infer_seconds, 1),
            "mean_loss": stats["final_loss"],  # over all steps
            "params": sum(p.numel() for p in model.parameters()),
        },
    )


def crop_batches(train: list[dict], steps: int, batch_size: int, max_seq_len: int, g: np.random.Generator, pad_multiple: int,
                 agnostic: bool = False):  # fmt: skip
    """``steps`` batches of random crops of ``max_seq_len`` steps of the ``train`` samples, epoch after epoch in a shuffled
    order drawn from ``g`` (``agnostic``: every label 0, one class "action")."""
    from tal_models.batch import collate, random_crop

    for batch in epoch_batches(len(train), steps, batch_size, g):
        crops = []
        for j in batch:
            s = train[j]
            labels = np.zeros_like(s["labels"]) if agnostic else s["labels"]
            feats, segs, labels, _ = random_crop(s["features"], s["segments"], labels, max_seq_len, g)
            crops.append({"features": feats, "segments": segs, "labels": labels, "video_id": s["video_id"]})
        yield collate(crops, pad_multiple)


def epoch_batches(n: int, steps: int, batch_size: int, g: np.random.Generator):
    """``steps`` index batches of ``batch_size`` out of ``n`` samples, epoch after epoch, each epoch in an order drawn from
    ``g`` (a last incomplete batch is dropped). The caller may draw from ``g`` between batches: the draws interleave."""
    done = 0
    while done < steps:
        order = g.permutation(n)
        for i in range(0, n - batch_size + 1, batch_size):
            if done == steps:
                return
            yield order[i : i + batch_size]
            done += 1


def fit_crops(net, train: list[dict], steps: int, batch_size: int, max_seq_len: int, lr: float, weight_decay: float, seed: int,
              agnostic: bool = False) -> tuple:  # fmt: skip
    """The drivers' training: ``steps`` batches of ``crop_batches`` (crops drawn from ``seed``), through ``fit_batches``."""
    steps_per_epoch = math.ceil(len(train) / batch_size)
    batches = lambda g: crop_batches(train, steps, batch_size, max_seq_len, g, net.pad_multiple, agnostic)  # noqa: E731
    return fit_batches(net, batches, steps, steps_per_epoch, lr, weight_decay, seed)


def fit_batches(net, batches, steps: int, steps_per_epoch: int, lr: float, weight_decay: float, seed: int) -> tuple:
    """``steps`` batches of ``batches(g)`` (``g`` drawn from ``seed``), AdamW with warm-up over a tenth of the epochs and
    cosine decay, EMA 0.99 -> ``(the EMA model in eval mode, the epoch's stats, seconds, epochs)``."""
    from tal_models.optim import ModelEMA, OptimConfig, build_optimizer, build_scheduler
    from tal_models.training import train_one_epoch

    epochs = max(1, round(steps / steps_per_epoch))
    optim = OptimConfig(lr=lr, weight_decay=weight_decay, warmup_epochs=min(epochs - 1, max(1, epochs // 10)), epochs=epochs,
                        ema_decay=0.99)  # fmt: skip
    optimizer = build_optimizer(net, optim)
    scheduler = build_scheduler(optimizer, optim, steps_per_epoch)
    ema = ModelEMA(net, optim.ema_decay)
    g = np.random.default_rng(seed)
    started = time.perf_counter()
    stats = train_one_epoch(net, batches(g), optimizer, scheduler, ema=ema, clip_grad_norm=optim.clip_grad_norm)
    return ema.module.eval(), stats, time.perf_counter() - started, epochs


def _detect_all(model, samples) -> dict:
    import torch

    with torch.inference_mode():
        return {s["video_id"]: model.detect(s["features"], s["timing"], s["duration"], s["video_id"]) for s in samples}


def _with_overrides(preset, overrides):
    """``preset`` with ``key=value`` overrides (as ``tal train --set``) applied and revalidated."""
    if not overrides:
        return preset
    from tal_models.config import apply_overrides, config_from_dict, config_to_dict
    from tal_models.presets import Preset

    data = config_to_dict(preset)
    apply_overrides(data, list(overrides))
    return config_from_dict(Preset, data, where="variant")


def _encoder_extras(encoder) -> dict:
    """Settings of a preset's encoder that are not widths (kept when the benchmark rescales it)."""
    return {
        "window": encoder.window, "mlp_ratio": encoder.mlp_ratio, "sgp_k": encoder.sgp_k, "kernel_size": encoder.kernel_size,
        "ssm_state": encoder.ssm_state, "ssm_expand": encoder.ssm_expand, "graph_k": encoder.graph_k, "drop_path": encoder.drop_path,
    }  # fmt: skip


def write_results(predictions, classes: list[str], path: Path) -> None:
    from pipelines.annotations import write_activitynet_results
    from tal_models.structures import LabelMap

    write_activitynet_results(path, predictions.values(), LabelMap.from_names(classes))


def evaluate(pred_path: Path, data_dir: Path) -> dict:
    from pipelines.annotations import read_activitynet_results, read_annotations
    from tal_models.evaluation.detection import evaluate_detection

    gt = read_annotations(data_dir / "annotations.json").subset("Test")
    predictions = read_activitynet_results(pred_path, gt.label_map)
    metrics = evaluate_detection(gt, predictions.detections, THUMOS_TIOU)
    return {f"mAP@{t:.1f}": round(float(m), 4) for t, m in zip(THUMOS_TIOU, metrics.mAP)} | {
        "average_mAP": round(float(metrics.mAP.mean()), 4),
        "num_predictions": metrics.num_predictions,
    }


# --- the driver ----------------------------------------------------------------------------
class Variant:
    """One of our models as the benchmark trains it: ``LABEL=PRESET[,key=value,...]`` (overrides as ``tal train --set``)."""

    def __init__(self, spec: str):
        label, _, rest = spec.partition("=")
        preset, *overrides = rest.split(",") if rest else (label,)
        self.label, self.preset, self.overrides = label, preset, [o for o in overrides if o]

    def key(self, inference_variants: list[str] = ()) -> str:
        return ";".join([",".join([self.preset, *self.overrides]), *inference_variants])


def _worker_cmd(impl: str, variant: Variant | None, args, data_dir: Path, out: Path) -> list[str]:
    common = ["--steps", str(args.steps), "--batch-size", str(args.batch_size), "--threads", "1", "--seed", str(args.seed_of[data_dir])]
    common += ["--ema-decay", str(args.ema_decay)] + (["--lr", str(args.lr)] if args.lr is not None else [])
    if variant is None:
        widths = ["--embed-dim", str(args.embed_dim), "--fpn-dim", str(args.embed_dim), "--head-dim", str(args.embed_dim)]
        return [
            str(REFERENCE_PYTHON), str(ROOT / "benchmarks" / "_actionformer_reference.py"), "train-eval", "--data", str(data_dir),
            "--out", str(out), "--max-seq-len", str(args.max_seq_len), *widths, *common,
        ]  # fmt: skip
    sets = [x for o in variant.overrides for x in ("--set", o)] + ["--inference-variants", *args.inference_variant]
    return [
        sys.executable, __file__, "--worker", variant.preset, "--data", str(data_dir), "--out", str(out),
        "--embed-dim", str(args.embed_dim), "--max-seq-len", str(args.max_seq_len), *common, *sets,
    ]  # fmt: skip


def _alternative_path(out: Path, label: str) -> Path:
    return out.with_name(f"{out.stem}.{label}.json")


def _settings(args) -> dict:
    return {
        "steps": args.steps, "batch_size": args.batch_size, "input_dim": args.input_dim, "embed_dim": args.embed_dim,
        "max_seq_len": args.max_seq_len, "ema_decay": args.ema_decay, "lr": args.lr, "max_videos_per_split": args.max_videos_per_split,
        "threads_per_model": 1,
    }  # fmt: skip


def _summary(values: list[float]) -> dict:
    a = np.asarray(values, dtype=np.float64)
    return {"mean": round(float(a.mean()), 4), "std": round(float(a.std(ddof=1)) if len(a) > 1 else 0.0, 4),
            "min": round(float(a.min()), 4), "max": round(float(a.max()), 4), "n": len(a)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--input-dim", type=int, default=64)
    parser.add_argument("--embed-dim", type=int, default=64)
    parser.add_argument("--max-seq-len", type=int, default=576)
    parser.add_argument("--max-videos-per-split", type=int, default=100, help="videos per split (evenly spaced; 0 or less: all)")
    parser.add_argument(
        "--profiles",
        nargs="+",
        default=[*TUNING_PROFILES, "phases"],
        help="signal models of benchmarks/_thumos_like.py (phases: held out from tuning)",
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="one data set and one training seed each")
    parser.add_argument(
        "--variants", nargs="+", default=[f"{p}={p}" for p in DEFAULT_VARIANTS],
        help="our models: LABEL=PRESET[,key=value,...] (overrides as tal train --set), e.g. r2=thumos14-actionformer,detector.loss.center_radius=2.0",
    )  # fmt: skip
    parser.add_argument("--no-reference", action="store_true", help="ours only")
    parser.add_argument(
        "--ema-decay", type=float, default=0.99, help="EMA of the evaluated weights, for every model (0.999 suits 3,500 steps)"
    )
    parser.add_argument(
        "--lr",
        type=float,
        default=4e-4,
        help="learning rate of every model unless a variant sets its own (the papers': 1e-4 over 3,500 steps)",
    )
    parser.add_argument("--jobs", type=int, default=2, help="trainings at a time, one thread each")
    parser.add_argument(
        "--workdir", type=Path, help="keep data sets and per-run results here and reuse them (default: a new temporary folder)"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--set", action="append", default=[], help=argparse.SUPPRESS)
    parser.add_argument(
        "--inference-variants", nargs="*", default=[], dest="inference_variant",
        help="also decode each of our trained models with other inference settings, LABEL=key=value;key=value "
        "(e.g. s07=detector.inference.nms.sigma=0.7): reported as VARIANT|LABEL",
    )  # fmt: skip
    args = parser.parse_args()

    if args.worker:
        predictions, alternatives, info = train_ours(
            args.worker, args.data, args.steps, args.batch_size, args.embed_dim, args.max_seq_len, args.seed, args.threads,
            args.ema_decay, args.set, args.inference_variant, args.lr,
        )  # fmt: skip
        classes = json.loads((args.data / "meta.json").read_text())["classes"]
        write_results(predictions, classes, args.out)
        for label, alternative in alternatives.items():
            write_results(alternative, classes, _alternative_path(args.out, label))
        print(json.dumps(info))
        return

    from benchmarks._thumos_like import make_thumos_like

    started = time.perf_counter()
    load_before = os.getloadavg()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="tal-accuracy-"))
    workdir.mkdir(parents=True, exist_ok=True)
    variants = [Variant(v) for v in args.variants]
    use_reference = REFERENCE_PYTHON.exists() and not args.no_reference
    settings = _settings(args)
    settings_key = json.dumps(settings, sort_keys=True)

    # one data set per (profile, seed); one run per (data set, model), reference and ours side by side
    args.seed_of, jobs = {}, []
    for profile in args.profiles:
        for seed in args.seeds:
            data_dir = workdir / f"data-{profile}-{seed}-d{args.input_dim}-v{args.max_videos_per_split}"
            if not (data_dir / "meta.json").exists():
                make_thumos_like(
                    data_dir, input_dim=args.input_dim, seed=seed, max_videos_per_split=args.max_videos_per_split, profile=profile
                )
            args.seed_of[data_dir] = seed
            for label, variant in ([("reference", None)] if use_reference else []) + [(v.label, v) for v in variants]:
                run_key = json.dumps([settings_key, "reference" if variant is None else variant.key(args.inference_variant)])
                name = f"{profile}-{seed}-{hashlib.sha1(run_key.encode()).hexdigest()[:12]}"
                jobs.append({"profile": profile, "seed": seed, "label": label, "variant": variant, "data": data_dir,
                             "out": workdir / f"{name}.pred.json", "info": workdir / f"{name}.info.json", "key": run_key})  # fmt: skip

    runs: list[dict] = []

    def cached(job):
        info = json.loads(job["info"].read_text()) if job["info"].exists() else None
        return info if info and info.get("key") == job["key"] and job["out"].exists() else None

    def command(job):
        return _worker_cmd(job["label"], job["variant"], args, job["data"], job["out"])

    for job, returncode, stdout, stderr in run_workers(jobs, command, args.jobs, ROOT, cached):
        if returncode is None:
            done = cached(job)
            runs.append(job | {"result": done["result"], "cached": True})
            runs.extend(
                job | {"label": f"{job['label']}|{k}", "result": r, "cached": True} for k, r in done.get("alternatives", {}).items()
            )
            continue
        if returncode != 0:
            print(f"{job['label']} on {job['profile']}/{job['seed']} failed:\n{stderr[-1500:]}", file=sys.stderr)
            runs.append(job | {"result": {"error": stderr[-1500:]}})
            continue
        info = json.loads(stdout.strip().splitlines()[-1])
        result = info | evaluate(job["out"], job["data"])
        alternatives = {}
        if job["variant"] is not None:
            for spec in args.inference_variant:
                label = spec.partition("=")[0]
                alternatives[label] = info | evaluate(_alternative_path(job["out"], label), job["data"])
        job["info"].write_text(json.dumps({"key": job["key"], "result": result, "alternatives": alternatives}))
        runs.append(job | {"result": result})
        runs.extend(job | {"label": f"{job['label']}|{k}", "result": r} for k, r in alternatives.items())
        print(f"{job['profile']}/{job['seed']} {job['label']}: {json.dumps(result)}", file=sys.stderr)

    # per profile: each model's average mAP over seeds, and ours minus the reference, seed by seed
    table: dict[str, dict] = {}
    for profile in args.profiles:
        by_label: dict[str, dict[int, dict]] = {}
        for run in runs:
            if run["profile"] == profile and "average_mAP" in run["result"]:
                by_label.setdefault(run["label"], {})[run["seed"]] = run["result"]
        entry: dict[str, dict] = {}
        ref = by_label.get("reference", {})
        for label, per_seed in by_label.items():
            seeds = sorted(per_seed)
            entry[label] = {
                "average_mAP": _summary([per_seed[s]["average_mAP"] for s in seeds]),
                "per_seed": {s: per_seed[s]["average_mAP"] for s in seeds},
                "train_seconds": _summary([per_seed[s]["train_seconds"] for s in seeds]),
            }
            common = [s for s in seeds if s in ref]
            if label != "reference" and common:
                entry[label]["minus_reference"] = _summary([per_seed[s]["average_mAP"] - ref[s]["average_mAP"] for s in common])
                entry[label]["train_time_vs_reference"] = round(
                    float(np.mean([per_seed[s]["train_seconds"] / ref[s]["train_seconds"] for s in common])), 3
                )
        table[profile] = entry
    labels = sorted({r["label"] for r in runs} - {"reference"})
    margins = {
        label: min((table[p].get(label, {}).get("minus_reference", {}).get("mean", -math.inf) for p in args.profiles), default=None)
        for label in labels
    }
    print(
        json.dumps(
            {
                "benchmark": "accuracy_vs_actionformer",
                "setting": settings
                | {
                    "profiles": args.profiles,
                    "seeds": args.seeds,
                    "variants": {v.label: v.key() for v in variants},
                    "workdir": str(workdir),
                    "cached_runs": sum(1 for r in runs if r.get("cached")),
                },
                "table": table,
                "worst_profile_margin_over_reference": margins if use_reference else None,
                "failures": [f"{r['profile']}/{r['seed']} {r['label']}" for r in runs if "error" in r["result"]],
                "load_before": [round(x, 2) for x in load_before],
                "load_after": [round(x, 2) for x in os.getloadavg()],
                "wall_s": round(time.perf_counter() - started, 1),
            }
        )  # fmt: skip
    )


if __name__ == "__main__":
    main()
