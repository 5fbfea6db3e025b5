"""Our detectors vs the original ActionFormer (PyPI ``actionformer==1.5.0``), side by side.

    .venv/bin/python benchmarks/detector_vs_actionformer.py [--rounds 3] [--repeats 3] [--threads 2] [--presets ...]

Presets: by default every shipped ``thumos14-*`` preset (but ``thumos14-actionformer-plus``, the
same architecture as ``thumos14-actionformer`` with another recipe) and the dense MultiTHUMOS
presets ``multithumos-mstemba`` and ``multithumos-actionformer`` (65 classes; their training step
is the dense per-step loss, their inference the dense scores turned into segments).

THUMOS14 I3D setting for every model: one video of 2304 steps of 2048-d random features for
inference (forward + decoding + NMS, eval mode), a batch of 2 such videos with 5 ground-truth
segments each for a training step (forward + backward + clipping + AdamW). Every measurement
is a fresh process (``--worker``), and the implementations alternate within each round, so
machine noise (about +-20 % here) hits all of them alike; the figures are medians over rounds
of each process's median. Peak memory is the process's peak RSS (VmHWM) minus its RSS once the
model is built (so it counts what the step needs, not ``import torch``).

The reference runs in ``.venv-reference`` (``bash benchmarks/setup_reference_venv.sh``) through
``benchmarks/_actionformer_reference.py``; without it the reference figures are null.
``--baseline DIR`` also measures the presets as another checkout of this repository has them
(e.g. ``git worktree add /tmp/base <commit>``), in the same rounds, and reports our ratios to it:
a regression check side by side, not against figures from another day.
Besides the ratios to the reference, each preset gets ``inference_vs_ours_actionformer``: the median
over rounds of its inference time over ``thumos14-actionformer``'s in the same round (always measured,
as the yardstick). The issue's target, no preset's inference over 2x our ActionFormer's at THUMOS size
on CPU, is ``target_inference_within_2x_of_actionformer`` (per preset) with ``max_inference_ratio``.
Prints one JSON line.
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

ROOT = Path(__file__).resolve().parent.parent
REFERENCE_PYTHON = ROOT / ".venv-reference" / "bin" / "python"
REFERENCE_SCRIPT = ROOT / "benchmarks" / "_actionformer_reference.py"
OURS_ACTIONFORMER = "thumos14-actionformer"  # the yardstick of inference_vs_ours_actionformer
DENSE_PRESETS = ("multithumos-mstemba", "multithumos-actionformer")
LENGTH, NUM_SEGMENTS, TRAIN_BATCH = 2304, 5, 2
TARGET_INFERENCE_RATIO = 2.0


def default_presets() -> list[str]:
    """Every shipped THUMOS14 preset but the ``-plus`` recipe variant (ActionFormer's architecture), then the dense ones."""
    from tal_models.presets import preset_names

    thumos = [n for n in preset_names() if n.startswith("thumos14-") and not n.endswith("-plus")]
    return sorted(thumos, key=lambda n: n != OURS_ACTIONFORMER) + list(DENSE_PRESETS)


def _rss_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) / 1024
    return float("nan")


def worker(preset_name: str, mode: str, repeats: int, threads: int, seed: int) -> dict:
    """One process, one model, one mode: ``repeats`` timed iterations after one warm-up."""
    import numpy as np
    import torch

    from tal_models.batch import collate
    from tal_models.detectors import build_detector
    from tal_models.optim import build_optimizer
    from tal_models.presets import load_preset

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    preset = load_preset(preset_name)
    model = build_detector(preset.detector)
    g = np.random.default_rng(seed)

    num_classes = preset.detector.num_classes

    def video(i: int) -> dict:
        starts = np.sort(g.choice(np.arange(0, LENGTH - 200, 40), NUM_SEGMENTS, replace=False))
        segments = np.stack([starts, starts + g.integers(8, 200, NUM_SEGMENTS)], axis=1).astype(np.float32)
        features = g.standard_normal((LENGTH, preset.detector.input_dim), dtype=np.float32)
        return {"features": features, "segments": segments, "labels": g.integers(0, num_classes, NUM_SEGMENTS), "video_id": f"v{i}"}

    times = []
    if mode == "inference":
        model.eval()
        batch = collate([video(0)], model.pad_multiple, num_classes)
        baseline = _rss_mb("VmRSS")
        for i in range(repeats + 1):
            started = time.perf_counter()
            with torch.inference_mode():
                model(batch)
            if i:
                times.append(time.perf_counter() - started)
    else:
        model.train()
        batch = collate([video(0), video(1)], model.pad_multiple, num_classes)
        optimizer = build_optimizer(model, preset.optim)
        baseline = _rss_mb("VmRSS")
        for i in range(repeats + 1):
            started = time.perf_counter()
            losses = model(batch)
            optimizer.zero_grad(set_to_none=True)
            losses["final_loss"].backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), preset.optim.clip_grad_norm or 1.0)
            optimizer.step()
            if i:
                times.append(time.perf_counter() - started)
    return {
        "impl": preset_name,
        "mode": mode,
        "task": preset.detector.task,
        "threads": threads,
        "params": sum(p.numel() for p in model.parameters()),
        "seconds": times,
        "median_s": statistics.median(times),
        "peak_rss_mb": _rss_mb("VmHWM"),
        "baseline_rss_mb": baseline,
    }


def _run(cmd: list[str]) -> dict | None:
    proc = subprocess.run(
        cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": cmd[cmd.index("--threads") + 1]}
    )
    if proc.returncode != 0:
        print(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(impl: str, mode: str, repeats: int, threads: int, baseline: Path | None = None) -> dict | None:
    if impl == "reference":
        if not REFERENCE_PYTHON.exists():
            return None
        cmd = [str(REFERENCE_PYTHON), str(REFERENCE_SCRIPT), "speed", "--mode", mode, "--repeats", str(repeats), "--threads", str(threads)]
    elif impl.startswith(BASELINE):  # the same worker, in the other checkout (its own tal_models first on sys.path)
        script = baseline / "benchmarks" / Path(__file__).name
        cmd = [
            sys.executable,
            str(script),
            "--worker",
            impl[len(BASELINE) :],
            "--mode",
            mode,
            "--repeats",
            str(repeats),
            "--threads",
            str(threads),
        ]
    else:
        cmd = [sys.executable, __file__, "--worker", impl, "--mode", mode, "--repeats", str(repeats), "--threads", str(threads)]
    return _run(cmd)


BASELINE = "baseline:"


def _ratios(ours: dict, other: dict) -> dict:
    return {
        "inference": round(ours["inference_s"] / other["inference_s"], 3),
        "train_step": round(ours["train_step_s"] / other["train_step_s"], 3),
        "peak_train_memory": round(ours["peak_train_mb"] / other["peak_train_mb"], 3),
        "peak_inference_memory": round(ours["peak_inference_mb"] / other["peak_inference_mb"], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="timed iterations per process")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--presets", nargs="+", help="default: every thumos14-* preset but -plus, and the dense multithumos ones")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=("inference", "train"), help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--baseline", type=Path, metavar="DIR", help="another checkout of this repository to measure side by side")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.mode, args.repeats, args.threads, args.seed)))
        return

    presets = args.presets or default_presets()
    measured = presets if OURS_ACTIONFORMER in presets else [OURS_ACTIONFORMER, *presets]
    impls = ["reference", *measured]
    if args.baseline:
        impls += [BASELINE + p for p in presets]
    runs: dict[tuple[str, str], list[dict]] = {}
    load_before = os.getloadavg()
    started = time.perf_counter()
    for r in range(args.rounds):
        order = impls if r % 2 == 0 else impls[::-1]
        for mode in ("inference", "train"):
            for impl in order:
                result = measure(impl, mode, args.repeats, args.threads, args.baseline)
                if result is not None:
                    result["round"] = r
                    runs.setdefault((impl, mode), []).append(result)
                    print(f"round {r + 1} {mode:9s} {impl:24s} {result['median_s']:.3f} s", file=sys.stderr)

    def summary(impl: str) -> dict | None:
        inf, train = runs.get((impl, "inference")), runs.get((impl, "train"))
        if not inf or not train:
            return None
        return {
            "params": inf[0]["params"],
            "inference_s": statistics.median(x["median_s"] for x in inf),
            "train_step_s": statistics.median(x["median_s"] for x in train),
            "peak_inference_mb": statistics.median(x["peak_rss_mb"] - x["baseline_rss_mb"] for x in inf),
            "peak_train_mb": statistics.median(x["peak_rss_mb"] - x["baseline_rss_mb"] for x in train),
            "peak_train_rss_mb": statistics.median(x["peak_rss_mb"] for x in train),
        }

    def vs_ours_actionformer(impl: str) -> float | None:
        """The median over rounds of ``impl``'s inference time over ours_actionformer's in the same round."""
        yardstick = {x["round"]: x["median_s"] for x in runs.get((OURS_ACTIONFORMER, "inference"), [])}
        paired = [x["median_s"] / yardstick[x["round"]] for x in runs.get((impl, "inference"), []) if x["round"] in yardstick]
        return round(statistics.median(paired), 3) if paired else None

    ref = summary("reference")
    results = {"reference": ref}
    within: dict[str, bool] = {}
    for preset in measured:
        ours = summary(preset)
        if ours:
            ours["task"] = runs[(preset, "inference")][0].get("task")
            ours["inference_vs_ours_actionformer"] = vs_ours_actionformer(preset)
            if ours["inference_vs_ours_actionformer"] is not None:
                within[preset] = ours["inference_vs_ours_actionformer"] <= TARGET_INFERENCE_RATIO
        if ours and ref:
            ours["ratios"] = _ratios(ours, ref)
        base = summary(BASELINE + preset) if args.baseline else None
        if ours and base:
            ours["vs_baseline"] = _ratios(ours, base)
            results[BASELINE + preset] = base
        results[preset] = ours
    print(
        json.dumps(
            {
                "benchmark": "detector_vs_actionformer",
                "setting": {"length": LENGTH, "input_dim": 2048, "classes": 20, "train_batch": TRAIN_BATCH, "threads": args.threads},
                "rounds": args.rounds,
                "baseline": str(args.baseline) if args.baseline else None,
                "repeats": args.repeats,
                "results": results,
                "target_inference_within_2x_of_actionformer": within,
                "max_inference_ratio": max((results[p]["inference_vs_ours_actionformer"] for p in within), default=None),
                "load_before": [round(x, 2) for x in load_before],
                "load_after": [round(x, 2) for x in os.getloadavg()],
                "cpu_count": os.cpu_count(),
                "wall_s": round(time.perf_counter() - started, 1),
            }
        )
    )


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
