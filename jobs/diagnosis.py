"""DETAD error analysis (``tal_models.evaluation.diagnosis``) as files and text: diagnosis.json, three figures
(PNG, or inline SVG for an HTML report) and a console summary. Figures: matplotlib, Agg."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from jobs.plots import _save
from pipelines.atomic import write_json_atomic
from tal_models.evaluation.diagnosis import CHARACTERISTICS, FP_TYPES, Diagnosis

TYPE_NAMES = {
    "true_positive": "true positive",
    "double_detection": "double detection",
    "wrong_label": "wrong label",
    "localization": "localisation",
    "confusion": "confusion",
    "background": "background",
}
TYPE_COLORS = ["#33a02c", "#b2df8a", "#1f78b4", "#fb9a99", "#e31a1c", "#a6cee3"]  # DETAD's palette, in FP_TYPES order
CHARACTERISTIC_NAMES = {"coverage": "coverage", "length": "length", "num_instances": "# instances"}
CHARACTERISTIC_COLORS = ["#386cb0", "#f0027f", "#bf5b17"]
FIGURES = ("false_positives", "false_negatives", "sensitivity")


def write_diagnosis(diagnosis: Diagnosis, out_dir: Path) -> dict[str, Path]:
    """``out_dir/diagnosis.json`` and ``out_dir/diagnosis/{false_positives,false_negatives,sensitivity}.png``."""
    out_dir = Path(out_dir)
    paths = {"diagnosis": out_dir / "diagnosis.json"}
    (out_dir / "diagnosis").mkdir(parents=True, exist_ok=True)
    write_json_atomic(paths["diagnosis"], diagnosis.to_dict(), indent=2)
    for name, fig in _figures(diagnosis).items():
        paths[name] = out_dir / "diagnosis" / f"{name}.png"
        _save(fig, paths[name], dpi=110)
    return paths


def diagnosis_svgs(diagnosis: Diagnosis) -> dict[str, str]:
    """The same three figures as inline ``<svg ...>`` strings (no XML prolog), keyed by ``FIGURES``."""
    out = {}
    with plt.rc_context({"svg.fonttype": "none"}):  # text stays text: smaller, selectable, styled by the page's fonts
        figures = _figures(diagnosis)
    for name, fig in figures.items():
        buf = io.StringIO()
        with plt.rc_context({"svg.fonttype": "none"}):
            fig.savefig(buf, format="svg")
        plt.close(fig)
        text = buf.getvalue()
        out[name] = text[text.index("<svg") :]
    return out


def format_diagnosis(diagnosis: Diagnosis) -> str:
    """A short console summary: false-positive profile of the top G, mAP gains, false-negative rates."""
    fp, fn = diagnosis.false_positives, diagnosis.false_negatives
    lines = [f"DETAD diagnosis ({len(diagnosis.tiou)} tIoU, top {diagnosis.limit_factor}G predictions, bins {diagnosis.bins})"]
    shares = "  ".join(f"{TYPE_NAMES[t]} {100 * fp['breakdown'][t][0]:.1f}%" for t in FP_TYPES)
    lines.append(f"  top-G predictions: {shares}")
    gains = "  ".join(f"{TYPE_NAMES[t]} +{100 * fp['removed_gain'][t]:.2f}" for t in FP_TYPES[1:])
    lines.append(f"  average-mAP_N {100 * diagnosis.normalized_average_mAP:.2f}%, gain if removed: {gains}")
    overall = fn.get("overall_rate")
    lines.append(f"  false-negative rate {100 * overall:.1f}%" if overall is not None else "  false-negative rate: no ground truth")
    for name in CHARACTERISTICS:
        rates = "  ".join(f"{b} {_pct(r)} (n={c})" for b, r, c in zip(fn[name]["bins"], fn[name]["rate"], fn[name]["count"]))
        lines.append(f"    {CHARACTERISTIC_NAMES[name]:<12} {rates}")
    return "\n".join(lines)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _figures(diagnosis: Diagnosis) -> dict[str, plt.Figure]:
    return {
        "false_positives": _false_positive_figure(diagnosis),
        "false_negatives": _characteristic_figure(diagnosis, "false_negatives"),
        "sensitivity": _characteristic_figure(diagnosis, "sensitivity"),
    }


def _false_positive_figure(diagnosis: Diagnosis) -> plt.Figure:
    """Left: stacked type shares of each band of G predictions. Right: average-mAP_N gain when a type is removed."""
    fp = diagnosis.false_positives
    fig, (ax, ax_gain) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    x = np.arange(len(fp["top_k"]))
    bottom = np.zeros(len(x))
    for t, color in zip(FP_TYPES, TYPE_COLORS):
        share = 100 * np.asarray(fp["breakdown"][t], dtype=np.float64)
        ax.bar(x, share, bottom=bottom, color=color, label=TYPE_NAMES[t], width=0.85)
        bottom += share
    ax.set_xticks(x, [f"{k}G" for k in fp["top_k"]])
    ax.set(xlabel="band of top predictions (per class, G = its instances)", ylabel="share (%)", ylim=(0, 100))
    ax.set_title("False positive profile")
    ax.legend(fontsize=8, ncol=3, loc="lower center", bbox_to_anchor=(0.5, 1.08))
    gains = [100 * fp["removed_gain"][t] for t in FP_TYPES[1:]]
    bars = ax_gain.bar(np.arange(len(gains)), gains, color=TYPE_COLORS[1:])
    for bar, g in zip(bars, gains):
        ax_gain.text(bar.get_x() + bar.get_width() / 2, bar.get_height(), f"{g:.1f}", ha="center", va="bottom", fontsize=8)
    ax_gain.set_xticks(np.arange(len(gains)), [TYPE_NAMES[t] for t in FP_TYPES[1:]], rotation=30, ha="right", fontsize=8)
    ax_gain.set(ylabel="average-mAP_N gain (points)", ylim=(0, max(gains + [0.1]) * 1.2))
    ax_gain.set_title("Removing error impact")
    for a in (ax, ax_gain):
        a.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def _characteristic_figure(diagnosis: Diagnosis, kind: str) -> plt.Figure:
    """Bars per bin of each characteristic: false-negative rate, or normalised AP with the overall one dashed."""
    data = diagnosis.false_negatives if kind == "false_negatives" else diagnosis.sensitivity
    fig, ax = plt.subplots(figsize=(11, 4))
    x0, ticks, labels = 0, [], []
    for name, color in zip(CHARACTERISTICS, CHARACTERISTIC_COLORS):
        values = data[name]["rate"] if kind == "false_negatives" else data[name]["normalized_ap"]
        xs = np.arange(x0, x0 + len(values))
        heights = [100 * v if v is not None else 0.0 for v in values]
        ax.bar(xs, heights, color=color, label=CHARACTERISTIC_NAMES[name])
        for xi, v in zip(xs, values):
            ax.text(xi, (100 * v if v is not None else 0) + 1, _pct(v).rstrip("%"), ha="center", fontsize=7)
        ticks += list(xs)
        labels += data[name]["bins"]
        x0 += len(values) + 1
    if kind == "sensitivity":
        ax.axhline(100 * data["overall_normalized_ap"], color="k", linestyle="--", linewidth=1, label="overall AP_N")
        ax.set(ylabel="average-mAP_N (%)", ylim=(0, 100))
        ax.set_title("Sensitivity to instance characteristics")
    else:
        ax.set(ylabel="false-negative rate (%)", ylim=(0, 105))
        ax.set_title("False negatives by instance characteristic")
    ax.set_xticks(ticks, labels, fontsize=8)
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig
