"""How each encoder's time and memory grow with the video's length: is the SSM linear in ``T``?

    nice -n 5 .venv/bin/python benchmarks/encoder_length_sweep.py [--lengths 2304 9216 36864] [--modes forward train]
        [--encoders ssm ssm_causal graph local_attention causal_attention] [--threads 1] [--max-gb 10]

The encoders are the preset encoders as ``build_encoder(preset.detector.encoder)`` builds them
(projection, stem, downsampling pyramid; no neck, no heads):

- ``ssm``: ``thumos14-actionmamba`` (bidirectional Mamba / DBM blocks, the chunked PyTorch scan);
- ``ssm_causal``: the same config with ``MambaBlock(..., direction="causal")`` blocks (one scan);
- ``graph``: ``thumos14-gtad`` (GCNeXt; the neighbour search is blocked, so its memory is linear
  but its time is quadratic in ``T``);
- ``local_attention``: ``thumos14-actionformer`` (19-step windows);
- ``causal_attention``: ``thumos14-causaltad`` (full causal attention: ``[2B, H, T, T]`` scores).

Input: one video (batch 1) of ``T`` steps of 2048-d random features, every step valid. Modes:
``forward`` (eval mode, ``torch.inference_mode``) and ``train`` (forward + backward of the sum of
all pyramid levels; drop path set to 0, so batch 1 does not skip whole blocks at random). Every
measurement is a fresh process (``--worker``): a short warm-up at ``WARMUP_LENGTH`` steps (first-call
costs), then ``--repeats`` timed runs at ``T`` (median). Peak memory is the process's peak RSS
(VmHWM) minus its RSS once the encoder and the input are built. A length whose memory, extrapolated
from the encoder's previous length in the same mode (``T**2`` for the quadratic ``causal_attention``,
``T`` otherwise), would pass ``--max-gb`` is skipped and said so.

Target (the issue): the SSM's time and peak memory at 4x the length at most 4.5x
(``target_linear``, per encoder and mode, on every 4x step of ``--lengths``).
Progress goes to stderr; one JSON line to stdout.
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
ENCODERS = {
    "ssm": "thumos14-actionmamba",
    "ssm_causal": "thumos14-actionmamba",
    "graph": "thumos14-gtad",
    "local_attention": "thumos14-actionformer",
    "causal_attention": "thumos14-causaltad",
}
QUADRATIC_MEMORY = {"causal_attention"}
LENGTHS = (2304, 9216, 36864)
MODES = ("forward", "train")
WARMUP_LENGTH = 256
TARGET_RATIO = 4.5  # at 4x the length


def worker(encoder: str, mode: str, length: int, repeats: int, threads: int, seed: int) -> dict:
    """One process, one encoder, one mode, one length."""
    from dataclasses import replace

    import torch

    from benchmarks._machine import status_mb
    from tal_models.detectors import build_encoder
    from tal_models.encoders import PyramidEncoder
    from tal_models.layers import MambaBlock
    from tal_models.presets import load_preset

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    cfg = replace(load_preset(ENCODERS[encoder]).detector.encoder, drop_path=0.0, dropout=0.0)
    if encoder == "ssm_causal":
        model = PyramidEncoder(
            cfg, lambda level, stride, index: MambaBlock(cfg.embed_dim, stride, "causal", state_dim=cfg.ssm_state, expand=cfg.ssm_expand)
        )
    else:
        model = build_encoder(cfg)
    model.train(mode == "train")

    def step(x: torch.Tensor, mask: torch.Tensor) -> None:  # the outputs are freed on return
        if mode == "forward":
            with torch.inference_mode():
                model(x, mask, True)
        else:
            feats, _ = model(x, mask, True)
            sum(f.sum() for f in feats).backward()

    step(torch.randn(1, cfg.input_dim, WARMUP_LENGTH), torch.ones(1, 1, WARMUP_LENGTH, dtype=torch.bool))
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    x = torch.randn(1, cfg.input_dim, length)  # built before the baseline: the input is not the step's memory
    mask = torch.ones(1, 1, length, dtype=torch.bool)
    baseline = status_mb("VmRSS")
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        step(x, mask)
        times.append(time.perf_counter() - started)
        model.zero_grad(set_to_none=True)
    return {
        "encoder": encoder,
        "mode": mode,
        "length": length,
        "params": sum(p.numel() for p in model.parameters()),
        "seconds": [round(t, 3) for t in times],
        "median_s": statistics.median(times),
        "peak_mb": round(status_mb("VmHWM") - baseline, 1),
    }


def measure(encoder: str, mode: str, length: int, repeats: int, threads: int, seed: int) -> dict | None:
    cmd = [sys.executable, __file__, "--worker", encoder, "--modes", mode, "--lengths", str(length)]
    cmd += ["--repeats", str(repeats), "--threads", str(threads), "--seed", str(seed)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    if proc.returncode != 0:
        print(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _available_mb() -> float:
    """MemAvailable of the machine (shared: others' processes count), in MB."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    return float("inf")


def _skip_reason(encoder: str, T: int, previous: tuple[int, float] | None, max_gb: float) -> str | None:
    """Why ``T`` is not measured: its peak, extrapolated from the previous length, passes ``max_gb`` or what the machine has free."""
    if previous is None:
        return None
    power = 2 if encoder in QUADRATIC_MEMORY else 1
    predicted = previous[1] * (T / previous[0]) ** power
    if predicted > max_gb * 1024:
        return f"extrapolated peak {predicted / 1024:.1f} GB (x (T / {previous[0]})**{power}) > --max-gb {max_gb:g}"
    available = _available_mb()
    if predicted > available - 2048:
        return f"extrapolated peak {predicted / 1024:.1f} GB > the machine's available {available / 1024:.1f} GB less 2 GB"
    return None


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b > 0 else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoders", nargs="+", choices=list(ENCODERS), default=list(ENCODERS))
    parser.add_argument("--lengths", nargs="+", type=int, default=list(LENGTHS), help="steps, multiples of 32")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per process (after a short warm-up)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-gb", type=float, default=10.0, help="skip a length whose extrapolated peak memory passes this")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.modes[0], args.lengths[0], args.repeats, args.threads, args.seed)))
        return

    from benchmarks._machine import busy_since, cpu_times, loadavg

    lengths = sorted(args.lengths)
    load_before, cpu_start, started = loadavg(), cpu_times(), time.perf_counter()
    results: dict[str, dict[str, dict[str, dict]]] = {}
    for encoder in args.encoders:
        for mode in args.modes:
            rows = results.setdefault(encoder, {}).setdefault(mode, {})
            previous: tuple[int, float] | None = None
            for T in lengths:
                reason = _skip_reason(encoder, T, previous, args.max_gb)
                if reason:
                    rows[str(T)] = {"skipped": reason}
                    print(f"{encoder:16s} {mode:7s} T={T:6d} skipped: {reason}", file=sys.stderr)
                    continue
                r = measure(encoder, mode, T, args.repeats, args.threads, args.seed)
                if r is None:
                    rows[str(T)] = {"failed": True}
                    continue
                rows[str(T)] = {"time_s": round(r["median_s"], 3), "peak_mb": r["peak_mb"], "params": r["params"]}
                previous = (T, max(r["peak_mb"], 1.0))
                print(
                    f"{encoder:16s} {mode:7s} T={T:6d} {r['median_s']:8.2f} s {r['peak_mb']:8.0f} MB  "
                    f"(load {loadavg()[0]:.2f}, {time.perf_counter() - started:.0f} s so far)",
                    file=sys.stderr,
                )
            ratios, target = {}, {}
            for a, b in zip(lengths[:-1], lengths[1:]):
                ra, rb = rows.get(str(a), {}), rows.get(str(b), {})
                if "time_s" not in ra or "time_s" not in rb:
                    continue
                key = f"{b}/{a}"
                ratios[key] = {"time": _ratio(rb["time_s"], ra["time_s"]), "memory": _ratio(rb["peak_mb"], ra["peak_mb"])}
                if b == 4 * a:
                    target[key] = all(v is not None and v <= TARGET_RATIO for v in ratios[key].values())
            rows["ratios"] = ratios
            rows["target_linear"] = all(target.values()) if target else None
    print(
        json.dumps(
            {
                "benchmark": "encoder_length_sweep",
                "setting": {
                    "batch": 1,
                    "input_dim": 2048,
                    "threads": args.threads,
                    "repeats": args.repeats,
                    "warmup_length": WARMUP_LENGTH,
                },
                "encoders": {e: ENCODERS[e] for e in args.encoders},
                "target": f"time and peak memory at 4x the length <= {TARGET_RATIO}x",
                "results": results,
                "load_before": load_before,
                "load_after": loadavg(),
                "machine_busy": busy_since(cpu_start),
                "cpu_count": os.cpu_count(),
                "wall_s": round(time.perf_counter() - started, 1),
            }
        )
    )


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
