"""``tal evaluate --diagnose`` in process (jobs.cli.main): the JSON and the three figures, and its misuse."""

import json
from pathlib import Path

import pytest
from helpers import one_thread  # noqa: F401 (autouse: tiny tensors on one thread)

from jobs.cli import main

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.exists(), reason=f"shared data not found at {DATA}")
CASE = DATA / "eval_cases" / "mmaction2_two_videos"
PNG = b"\x89PNG\r\n\x1a\n"


@needs_data
def test_diagnose_writes_json_and_figures_beside_the_metrics(tmp_path, capsys):
    out = tmp_path / "run" / "metrics.json"
    args = ["evaluate", "--ground-truth", CASE / "ground_truth.json", "--predictions", CASE / "predictions.json"]
    assert main([*map(str, args), "--tiou", "0.5:0.95:0.05", "--output", str(out), "--diagnose"]) == 0
    printed = capsys.readouterr().out
    diagnosis = json.loads((tmp_path / "run" / "diagnosis.json").read_text())
    metrics = json.loads(out.read_text())
    assert diagnosis["average_mAP"] == pytest.approx(metrics["average_mAP"], abs=1e-12)
    assert diagnosis["num_ground_truth"] == 4 and diagnosis["num_predictions"] == 14 and len(diagnosis["tiou"]) == 10
    assert set(diagnosis["false_negatives"]) >= {"coverage", "length", "num_instances"}
    for name in ("false_positives", "false_negatives", "sensitivity"):
        png = tmp_path / "run" / "diagnosis" / f"{name}.png"
        assert png.read_bytes()[:8] == PNG and png.stat().st_size > 10_000
        assert str(png) in printed
    assert "DETAD diagnosis" in printed and "gain if removed" in printed
    # The report's inline figures, from the JSON read back.
    from jobs.diagnosis import diagnosis_svgs, format_diagnosis
    from tal_models.evaluation import Diagnosis

    back = Diagnosis.from_dict(diagnosis)
    svgs = diagnosis_svgs(back)
    assert sorted(svgs) == ["false_negatives", "false_positives", "sensitivity"]
    assert all(svg.startswith("<svg") and svg.rstrip().endswith("</svg>") for svg in svgs.values())
    assert "Removing error impact" in svgs["false_positives"]
    assert format_diagnosis(back) in printed


@needs_data
def test_diagnose_without_output_is_a_usage_error(tmp_path, capsys):
    args = ["evaluate", "--ground-truth", CASE / "ground_truth.json", "--predictions", CASE / "predictions.json", "--diagnose"]
    assert main(list(map(str, args))) == 2
    err = capsys.readouterr().err
    assert "--diagnose needs --output" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_diagnose_with_a_model_writes_into_the_output_directory(tmp_path, capsys):
    """--model mode: an untrained tiny detector still predicts (badly); the analysis goes into --output DIR and is listed."""
    import torch
    from helpers import SYNTHETIC_CLASSES, SYNTHETIC_DIM, synthetic_store

    from pipelines.store import FeatureStore
    from tal_models.checkpoint import Checkpoint, save_checkpoint
    from tal_models.detectors import build_detector
    from tal_models.presets import make_config

    store_uri, gt = synthetic_store(tmp_path, videos=6, steps=64)
    torch.manual_seed(0)
    model = build_detector(make_config("temporalmaxer", num_classes=len(SYNTHETIC_CLASSES), input_dim=SYNTHETIC_DIM, max_seq_len=64,
                                       embed_dim=16, levels=3)).eval()  # fmt: skip
    save_checkpoint(Checkpoint.from_model(model, list(SYNTHETIC_CLASSES), FeatureStore(store_uri).provenance.to_dict()), tmp_path / "m.pt")
    out = tmp_path / "eval"
    args = ["evaluate", "--model", tmp_path / "m.pt", "--features", store_uri, "--annotations", gt, "--output", out]
    assert main([*map(str, args), "--tiou", "0.5", "--timeline-videos", "0", "--diagnose"]) == 0
    printed = capsys.readouterr().out
    diagnosis = json.loads((out / "diagnosis.json").read_text())
    assert diagnosis["average_mAP"] == pytest.approx(json.loads((out / "metrics.json").read_text())["average_mAP"], abs=1e-12)
    assert diagnosis["num_ground_truth"] > 0 and diagnosis["num_predictions"] > 0
    for name in ("false_positives", "false_negatives", "sensitivity"):
        assert (out / "diagnosis" / f"{name}.png").read_bytes()[:8] == PNG
        assert str(out / "diagnosis" / f"{name}.png") in printed
    assert "DETAD diagnosis" in printed
