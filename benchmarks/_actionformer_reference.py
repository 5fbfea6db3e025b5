"""ActionFormer (``actionformer==1.5.0`` from PyPI) as a reference for speed and accuracy, on CPU.

Runs ONLY inside the reference venv (``.venv-reference``); it imports nothing of this project. It calls
the installed package through its Python API (its CLIs need CUDA): ``load_config`` with the package's
defaults, ``make_meta_arch``, ``make_dataset`` (the THUMOS14 loader, random cropping included),
``make_optimizer`` / ``make_scheduler`` (linear warm-up + cosine), ``ModelEma`` and the model's own
post-processing (multi-class soft-NMS in its C++ extension, score voting, conversion to seconds).

The model configuration is ActionFormer's ``configs/thumos_i3d.yaml`` (happyharrycn/actionformer_release
at 61ea7eb), transcribed below as ``THUMOS_I3D`` and merged with the package defaults exactly as its
train script does. The package is a fork with optional extras (v2 backbone, EIoU, DIoU-NMS, ...); all of
them are off unless a config asks, and this config does not, so the code paths are the original ones.

Prints exactly one JSON line on stdout; everything else goes to stderr.

    speed --threads N --mode inference|train --repeats R [--input-dim 2048 --max-seq-len 2304
          --num-classes 20 --seed 0 --embed-dim D --fpn-dim D --head-dim D --n-mha-win-size W --n-head H]
        inference: R timed forward passes (eval mode, no_grad, one video of max_seq_len random features,
        post-processing included); train: R timed training steps on a batch of 2 such videos with 5 random
        ground-truth segments each (zero_grad, forward, backward, clip 1.0, AdamW step, scheduler step,
        EMA update, as its train loop). One untimed warm-up iteration first.
        -> {"impl", "mode", "threads", "params", "seconds", "median_s", "peak_rss_mb", "baseline_rss_mb", ...}

    train-eval --data DIR --steps S --batch-size B --out PRED.json [--threads N --seed 0 --lr 1e-4
               --weight-decay 0.05 --ema-decay 0.999 --eval-weights ema|model --num-workers 0
               --embed-dim --fpn-dim --head-dim --max-seq-len --n-mha-win-size --n-head]
        DIR is made by benchmarks/_thumos_like.py. Trains exactly S optimizer steps on the training split
        (warm-up = 5/35 of S, as 5 warm-up epochs of 35), then detects on the test split with the EMA
        weights (as its eval script) and writes ActivityNet results JSON with segments in seconds.
        -> {"impl", "steps", "train_seconds", "infer_seconds", "final_loss", "params", ...}
"""

import argparse
import contextlib
import copy
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
from actionformer import (
    ModelEma,
    load_config,
    load_default_config,
    make_data_loader,
    make_dataset,
    make_meta_arch,
    make_optimizer,
    make_scheduler,
)
from actionformer.datasets.data_utils import trivial_batch_collator

IMPL = "actionformer-1.5.0"

# configs/thumos_i3d.yaml of ActionFormer (values only; everything else comes from the package defaults)
THUMOS_I3D = {
    "dataset_name": "thumos",
    "train_split": ["validation"],
    "val_split": ["test"],
    "dataset": {
        "json_file": "./data/thumos/annotations/thumos14.json",
        "feat_folder": "./data/thumos/i3d_features",
        "file_prefix": None,
        "file_ext": ".npy",
        "num_classes": 20,
        "input_dim": 2048,
        "feat_stride": 4,
        "num_frames": 16,
        "trunc_thresh": 0.5,
        "crop_ratio": [0.9, 1.0],
        "max_seq_len": 2304,
    },
    "model": {
        "fpn_type": "identity",
        "max_buffer_len_factor": 6.0,
        "n_mha_win_size": 19,
    },
    "opt": {
        "learning_rate": 0.0001,
        "epochs": 30,
        "weight_decay": 0.05,
    },
    "loader": {
        "batch_size": 2,
    },
    "train_cfg": {
        "init_loss_norm": 100,
        "clip_grad_l2norm": 1.0,
        "cls_prior_prob": 0.01,
        "center_sample": "radius",
        "center_sample_radius": 1.5,
    },
    "test_cfg": {
        "voting_thresh": 0.7,
        "pre_nms_topk": 2000,
        "max_seg_num": 200,
        "min_score": 0.001,
        "multiclass_nms": True,
    },
    "output_folder": "./ckpt/",
}

# command-line override -> (config section, key)
MODEL_OVERRIDES = {
    "embed_dim": ("model", "embd_dim"),
    "fpn_dim": ("model", "fpn_dim"),
    "head_dim": ("model", "head_dim"),
    "n_mha_win_size": ("model", "n_mha_win_size"),
    "n_head": ("model", "n_head"),
    "max_seq_len": ("dataset", "max_seq_len"),
    "input_dim": ("dataset", "input_dim"),
}


def log(*parts) -> None:
    print(*parts, file=sys.stderr, flush=True)


def proc_status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def seed_everything(seed: int) -> torch.Generator:
    """The CPU part of the package's ``fix_random_seed`` (its CUDA/cuDNN switches do not apply here)."""
    generator = torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)
    return generator


def build_config(args, **dataset_values) -> dict:
    """thumos_i3d.yaml + overrides, loaded with the package's ``load_config`` over a copy of its defaults."""
    raw = copy.deepcopy(THUMOS_I3D)
    raw["dataset"].update(dataset_values)
    for name, (section, key) in MODEL_OVERRIDES.items():
        value = getattr(args, name, None)
        if value is not None:
            raw[section][key] = value
    if getattr(args, "lr", None) is not None:
        raw["opt"]["learning_rate"] = args.lr
    if getattr(args, "weight_decay", None) is not None:
        raw["opt"]["weight_decay"] = args.weight_decay
    # JSON is YAML: the package's own loader reads it and merges its defaults, as the train script does
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        json.dump(raw, f)
        path = f.name
    try:
        cfg = load_config(path, defaults=copy.deepcopy(load_default_config()))
    finally:
        os.unlink(path)
    max_div_factor(cfg)
    return cfg


def max_div_factor(cfg: dict) -> int:
    """The multiple every padded input length must be (the model's own ``max_div_factor``); checks max_seq_len."""
    model = cfg["model"]
    levels = model["backbone_arch"][-1] + 1
    win = model["n_mha_win_size"]
    wins = [win] * levels if isinstance(win, int) else list(win)
    need = max((model["scale_factor"] ** i) * ((w // 2) * 2 if w > 1 else 1) for i, w in enumerate(wins))
    if model["max_seq_len"] % need:
        raise SystemExit(f"max_seq_len {model['max_seq_len']} must be a multiple of {need} (fpn stride x window); e.g. {need * 4}")
    return need


def count_params(model: torch.nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def train_step(model, optimizer, scheduler, ema, video_list, clip):
    """One iteration of the package's ``train_one_epoch`` (its logging aside). Returns (losses, ema seconds)."""
    optimizer.zero_grad(set_to_none=True)
    losses = model(video_list)
    losses["final_loss"].backward()
    if clip > 0.0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    scheduler.step()
    t0 = time.perf_counter()
    if ema is not None:
        ema.update(model)
    return losses, time.perf_counter() - t0


# ----------------------------------------------------------------------------------------------------- speed
def random_video(gen: torch.Generator, index: int, cfg: dict, with_gt: bool, num_segments: int = 5) -> dict:
    data = cfg["dataset"]
    length, fps = data["max_seq_len"], 30.0
    stride, nframes = data["feat_stride"], data["num_frames"]
    video = {
        "video_id": f"random_{index}",
        "feats": torch.randn(data["input_dim"], length, generator=gen),
        "segments": None,
        "labels": None,
        "fps": fps,
        "duration": ((length - 1) * stride + nframes) / fps,
        "feat_stride": stride,
        "feat_num_frames": nframes,
    }
    if with_gt:
        # THUMOS-like lengths in feature steps (about 1 to 30 s at stride 4 / 30 fps), anywhere in the video
        lengths = torch.exp(torch.empty(num_segments).uniform_(math.log(8.0), math.log(200.0), generator=gen))
        starts = torch.rand(num_segments, generator=gen) * (length - lengths)
        video["segments"] = torch.stack([starts, starts + lengths], dim=1).float()
        video["labels"] = torch.randint(0, data["num_classes"], (num_segments,), generator=gen)
    return video


def cmd_speed(args) -> dict:
    torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    cfg = build_config(args, num_classes=args.num_classes)
    model = make_meta_arch(cfg["model_name"], **cfg["model"])
    gen = torch.Generator().manual_seed(args.seed)
    ema_seconds = []
    if args.mode == "inference":
        model.eval()
        video = random_video(gen, 0, cfg, with_gt=False)

        def iteration():
            with torch.no_grad():
                return model([video])
    else:
        model.train()
        optimizer = make_optimizer(model, cfg["opt"])
        # 200 THUMOS training videos, batch 2, drop_last: 100 iterations per epoch
        scheduler = make_scheduler(optimizer, cfg["opt"], 100)
        ema = ModelEma(model)
        videos = [random_video(gen, i, cfg, with_gt=True) for i in range(2)]
        clip = cfg["train_cfg"]["clip_grad_l2norm"]

        def iteration():
            _, ema_s = train_step(model, optimizer, scheduler, ema, videos, clip)
            ema_seconds.append(ema_s)

    baseline = proc_status_mb("VmRSS")
    iteration()  # warm-up, not timed
    ema_seconds.clear()
    seconds = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        out = iteration()
        seconds.append(time.perf_counter() - t0)
    result = {
        "impl": IMPL,
        "mode": args.mode,
        "threads": args.threads,
        "params": count_params(model),
        "seconds": seconds,
        "median_s": statistics.median(seconds),
        "peak_rss_mb": proc_status_mb("VmHWM"),
        "baseline_rss_mb": baseline,
        "max_seq_len": cfg["model"]["max_seq_len"],
        "input_dim": cfg["model"]["input_dim"],
    }
    if args.mode == "inference":
        result["num_detections"] = int(out[0]["segments"].shape[0])
    else:
        result["ema_median_s"] = statistics.median(ema_seconds)
    return result


# ------------------------------------------------------------------------------------------------ train-eval
def cmd_train_eval(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    with open(os.path.join(args.data, "meta.json")) as f:
        meta = json.load(f)
    with open(os.path.join(args.data, "annotations.json")) as f:
        database = json.load(f)["database"]
    classes = meta["classes"]
    if args.input_dim is not None and args.input_dim != meta["input_dim"]:
        raise SystemExit(f"--input-dim {args.input_dim} differs from the data set's {meta['input_dim']}")
    args.input_dim = meta["input_dim"]
    present = {(a["label"], int(a["label_id"])) for v in database.values() for a in v["annotations"]}
    if any(classes[i] != name for name, i in present):
        raise SystemExit("annotations.json labels disagree with meta.json classes")

    rng_generator = seed_everything(args.seed)
    # The THUMOS loader derives its label map from the annotation file and asserts it has num_classes
    # entries; a small subset may lack some classes, so the loader gets the count it will find, the model
    # the full class list (label ids are taken verbatim from the file either way).
    cfg = build_config(
        args,
        json_file=os.path.join(args.data, "annotations.json"),
        feat_folder=os.path.join(args.data, "features"),
        num_classes=len(present),
        feat_stride=meta["stride"],
        num_frames=meta["window"],
    )
    cfg["model"]["num_classes"] = len(classes)
    # Inference pads a video longer than max_seq_len to the next multiple of max_div_factor, and the point
    # generator only buffers max_seq_len * max_buffer_len_factor points (6 x 2304 covers THUMOS14's longest
    # video). With a smaller max_seq_len, raise the factor just enough for the longest test video.
    need = max_div_factor(cfg)
    longest = max(np.load(os.path.join(args.data, "features", f"{vid}.npy"), mmap_mode="r").shape[0] for vid in meta["splits"]["test"])
    padded = -(-longest // need) * need
    if padded > cfg["model"]["max_seq_len"] * cfg["model"]["max_buffer_len_factor"]:
        cfg["model"]["max_buffer_len_factor"] = padded / cfg["model"]["max_seq_len"]
        log(f"max_buffer_len_factor raised to {cfg['model']['max_buffer_len_factor']} for a test video of {longest} steps")

    train_dataset = make_dataset(cfg["dataset_name"], True, cfg["train_split"], **cfg["dataset"])
    cfg["model"]["train_cfg"]["head_empty_cls"] = train_dataset.get_attributes()["empty_label_ids"]
    if args.num_workers > 0:
        train_loader = make_data_loader(train_dataset, True, rng_generator, args.batch_size, args.num_workers)
    else:  # make_data_loader with persistent workers needs worker processes; the same loader in process
        train_loader = torch.utils.data.DataLoader(
            train_dataset,
            batch_size=args.batch_size,
            num_workers=0,
            collate_fn=trivial_batch_collator,
            shuffle=True,
            drop_last=True,
            generator=rng_generator,
        )
    if len(train_loader) == 0:
        raise SystemExit(f"{len(train_dataset)} training videos give no full batch of {args.batch_size}")

    model = make_meta_arch(cfg["model_name"], **cfg["model"])
    optimizer = make_optimizer(model, cfg["opt"])
    opt = cfg["opt"]
    warmup = max(1, round(args.steps * opt["warmup_epochs"] / (opt["epochs"] + opt["warmup_epochs"])))
    scheduler = make_scheduler(optimizer, dict(opt, warmup_epochs=warmup, epochs=max(args.steps - warmup, 0)), 1)
    ema = ModelEma(model, decay=args.ema_decay)
    clip = cfg["train_cfg"]["clip_grad_l2norm"]
    log(
        f"train: {len(train_dataset)} videos, {len(train_loader)} batches/epoch, {args.steps} steps, warm-up {warmup}, "
        f"params {count_params(model)}"
    )

    step, losses_seen = 0, []
    t0 = time.perf_counter()
    while step < args.steps:
        model.train()
        for video_list in train_loader:
            losses, _ = train_step(model, optimizer, scheduler, ema, video_list, clip)
            losses_seen.append({k: float(v.item()) for k, v in losses.items()})
            step += 1
            if step == 1 or step % args.log_every == 0 or step == args.steps:
                log(
                    f"step {step}/{args.steps} lr {scheduler.get_last_lr()[0]:.3g} "
                    + " ".join(f"{k} {v:.4f}" for k, v in losses_seen[-1].items())
                )
            if step == args.steps:
                break
    train_seconds = time.perf_counter() - t0

    eval_model = ema.module if args.eval_weights == "ema" else model
    eval_model.eval()
    val_dataset = make_dataset(cfg["dataset_name"], False, cfg["val_split"], **cfg["dataset"])
    results = {}
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(len(val_dataset)):
            item = val_dataset[i]
            # the model's post-processing already maps feature grid units to seconds:
            # (seg * feat_stride + 0.5 * feat_num_frames) / fps, clipped to [0, duration]
            out = eval_model([item])[0]
            results[out["video_id"]] = [
                {"label": classes[int(label)], "score": float(score), "segment": [float(seg[0]), float(seg[1])]}
                for seg, score, label in zip(out["segments"].tolist(), out["scores"].tolist(), out["labels"].tolist())
            ]
    infer_seconds = time.perf_counter() - t0
    with open(args.out, "w") as f:
        json.dump({"version": "1.3", "results": results, "external_data": {}}, f)

    tail = [x["final_loss"] for x in losses_seen[-10:]]
    return {
        "impl": IMPL,
        "steps": step,
        "train_seconds": train_seconds,
        "infer_seconds": infer_seconds,
        "final_loss": losses_seen[-1]["final_loss"],
        "params": count_params(model),
        "first_loss": losses_seen[0]["final_loss"],
        "mean_loss_last10": sum(tail) / len(tail),
        "warmup_steps": warmup,
        "max_seq_len": cfg["model"]["max_seq_len"],
        "max_buffer_len_factor": cfg["model"]["max_buffer_len_factor"],
        "eval_weights": args.eval_weights,
        "num_train_videos": len(train_dataset),
        "num_test_videos": len(val_dataset),
        "num_detections": sum(len(v) for v in results.values()),
        "threads": torch.get_num_threads(),
        "peak_rss_mb": proc_status_mb("VmHWM"),
    }


def add_model_args(p: argparse.ArgumentParser, input_dim_default) -> None:
    p.add_argument("--input-dim", type=int, default=input_dim_default)
    p.add_argument("--max-seq-len", type=int, default=None, help="default 2304 (must divide by 32 * (window // 2 * 2))")
    p.add_argument("--embed-dim", type=int, default=None, help="default 512")
    p.add_argument("--fpn-dim", type=int, default=None, help="default 512")
    p.add_argument("--head-dim", type=int, default=None, help="default 512")
    p.add_argument("--n-mha-win-size", type=int, default=None, help="default 19")
    p.add_argument("--n-head", type=int, default=None, help="default 4")
    p.add_argument("--seed", type=int, default=0)


def main() -> None:
    parser = argparse.ArgumentParser(description="ActionFormer reference runs (reference venv only)")
    sub = parser.add_subparsers(dest="command", required=True)
    speed = sub.add_parser("speed")
    speed.add_argument("--threads", type=int, required=True)
    speed.add_argument("--mode", choices=["inference", "train"], required=True)
    speed.add_argument("--repeats", type=int, required=True)
    speed.add_argument("--num-classes", type=int, default=20)
    add_model_args(speed, 2048)
    te = sub.add_parser("train-eval")
    te.add_argument("--data", required=True)
    te.add_argument("--steps", type=int, required=True)
    te.add_argument("--batch-size", type=int, default=2)
    te.add_argument("--out", required=True)
    te.add_argument("--threads", type=int, default=None)
    te.add_argument("--lr", type=float, default=None, help="default 1e-4")
    te.add_argument("--weight-decay", type=float, default=None, help="default 0.05")
    te.add_argument("--ema-decay", type=float, default=0.999)
    te.add_argument("--eval-weights", choices=["ema", "model"], default="ema")
    te.add_argument("--num-workers", type=int, default=0)
    te.add_argument("--log-every", type=int, default=50)
    add_model_args(te, None)
    args = parser.parse_args()
    if getattr(args, "steps", 1) < 1 or getattr(args, "repeats", 1) < 1:
        parser.error("--steps / --repeats must be at least 1")

    with contextlib.redirect_stdout(sys.stderr):  # keep stdout for the one JSON line
        result = cmd_speed(args) if args.command == "speed" else cmd_train_eval(args)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
