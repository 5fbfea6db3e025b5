"""Exported files (ONNX through ONNX Runtime, TorchScript) against PyTorch, ``tal export``, and ``--runtime onnx``.

Tiny detectors of every arch; each is exported once per format (module fixture) and compared with the
PyTorch model on padded batches at lengths other than the traced one (64 steps). ``tal detect
--runtime onnx`` is tested in test_cli_detect.py (it needs that module's videos and featurizer).
"""

from __future__ import annotations

import dataclasses
import io
import sys

import numpy as np
import pytest
import requests
import torch
from helpers import free_port

from jobs.cli import main
from jobs.export import (
    EXPORT_FORMATS,
    ExportedModel,
    ExportError,
    build_for_runtime,
    export_checkpoint,
    open_exported,
    require_onnx,
    runtime_detector,
)
from jobs.inference import detect_batch, load_runtime_model
from jobs.serve_config import ServeArgs
from pipelines.store import FeatureSequence
from tal_models.batch import collate
from tal_models.checkpoint import Checkpoint, save_checkpoint
from tal_models.detectors import build_detector
from tal_models.export import DenseGraph
from tal_models.presets import make_config
from tal_models.timing import FeatureTiming

pytestmark = pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")

C, LABELS = 24, ["jump", "run", "wave"]
ARCHS = ("actionformer", "tridet", "temporalmaxer", "dyfadet", "gtad")  # the SSM-based archs do not export (test below)
TIMING = FeatureTiming(5.0, 2, 2)
PROVENANCE = {"backbone": "test-features", "feature_dim": C, "fps": 5.0, "stride": 2, "window": 2}


def _checkpoint(arch: str) -> Checkpoint:
    torch.manual_seed(0)
    model = build_detector(make_config(arch, num_classes=len(LABELS), input_dim=C, max_seq_len=64, embed_dim=16, levels=3)).eval()
    for p in model.cls_head.parameters():  # away from the focal prior, so that many candidates pass the threshold
        torch.nn.init.normal_(p, std=0.3)
    return Checkpoint.from_model(model, LABELS, PROVENANCE, {"epoch": 3, "run_id": "abc"})


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """arch -> {"checkpoint", "path" (model.pt), "onnx" and "torchscript" (bytes of the export)}."""
    root = tmp_path_factory.mktemp("export")
    out = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    for arch in ARCHS:
        checkpoint = _checkpoint(arch)
        save_checkpoint(checkpoint, root / f"{arch}.pt")
        out[arch] = {"checkpoint": checkpoint, "path": root / f"{arch}.pt"}
        for fmt in EXPORT_FORMATS:
            buf = io.BytesIO()
            diff = export_checkpoint(checkpoint, fmt, buf, source=f"{arch}.pt")  # verified at another length on the way
            assert diff is not None and diff <= 1e-4
            out[arch][fmt] = buf.getvalue()
    yield out
    torch.set_num_threads(threads)


def _features(n: int) -> np.ndarray:
    return np.random.default_rng(n).standard_normal((n, C)).astype(np.float32)


def _batch(lengths, seed=0):
    rng = np.random.default_rng(seed)
    seqs = [
        {"features": rng.standard_normal((n, C)).astype(np.float32), "video_id": f"v{n}", "timing": TIMING, "duration": n / 2.5}
        for n in lengths
    ]
    return collate(seqs, 4)


@pytest.mark.parametrize("fmt", EXPORT_FORMATS)
@pytest.mark.parametrize("arch", ARCHS)
def test_exported_dense_outputs_equal_pytorch_at_other_lengths_with_padding(exported, arch, fmt):
    model = exported[arch]["checkpoint"].build("cpu")
    detector, info = runtime_detector(exported[arch][fmt], f"{arch}.{fmt}")
    assert info.format == fmt and info.labels == LABELS and info.provenance == PROVENANCE and info.config == model.config
    assert info.metadata == {"epoch": 3, "run_id": "abc"} and info.source == f"{arch}.pt"
    for lengths in ((32,), (96, 41), (200, 13), (8, 5)):  # one unpadded, then two videos of different lengths
        batch = _batch(lengths)
        with torch.no_grad():
            want = model.dense(batch.features, batch.mask)
        got = detector.dense(batch.features, batch.mask.float() if len(lengths) == 2 else batch.mask)  # a float mask too
        assert torch.equal(got.valid, want.valid) and got.points.level_lengths == want.points.level_lengths
        valid = want.valid
        assert not valid.all() or len(lengths) == 1
        torch.testing.assert_close(got.cls_logits[valid], want.cls_logits[valid], atol=1e-4, rtol=0)
        torch.testing.assert_close(got.reg_offsets[valid], want.reg_offsets[valid], atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_detections_through_onnx_runtime_equal_pytorchs(exported, arch):
    model = exported[arch]["checkpoint"].build("cpu")
    detector = runtime_detector(exported[arch]["onnx"], arch, num_threads=2)[0]
    seqs = [FeatureSequence(f"v{n}", _features(n), TIMING, TIMING.centers(n), n / 2.5) for n in (150, 57)]
    for want, got in zip(detect_batch(model, seqs), detect_batch(detector, seqs)):
        assert got.video_id == want.video_id and len(got) == len(want) > 10
        # the same set: detections whose scores tie within float noise may come out in either order
        order = lambda d: np.lexsort(  # noqa: E731
            (np.round(np.asarray(d.scores), 4), np.round(np.asarray(d.segments.data), 3).T[1], np.round(np.asarray(d.segments.data), 3).T[0], np.asarray(d.labels))
        )
        want, got = want[order(want)], got[order(got)]
        np.testing.assert_allclose(got.scores, want.scores, atol=1e-5)
        np.testing.assert_allclose(got.segments.data, want.segments.data, atol=1e-4)
        np.testing.assert_array_equal(got.labels, want.labels)


def test_tal_export_writes_files_that_load_and_run(exported, tmp_path, capsys):
    arch = "tridet"
    checkpoint_path = exported[arch]["path"]
    for fmt, suffix in (("onnx", ".onnx"), ("torchscript", ".ts")):
        out = tmp_path / f"model{suffix}"
        assert main(["export", "--model", str(checkpoint_path), "--format", fmt, "--out", str(out), "--opset", "18"]) == 0
        printed = capsys.readouterr().out
        assert str(out) in printed and "max |diff| vs PyTorch" in printed and "tridet" in printed
        loaded, where = load_runtime_model(str(out))
        assert isinstance(loaded, ExportedModel) and where == str(out)
        assert loaded.labels == LABELS and loaded.provenance == PROVENANCE and loaded.info.format == fmt
        assert loaded.info.opset == (18 if fmt == "onnx" else None)
    # the .onnx runs with --runtime onnx, and not with torch (it has no weights for PyTorch)
    onnx_model = load_runtime_model(str(tmp_path / "model.onnx"))[0]
    features = np.random.default_rng(3).standard_normal((70, C)).astype(np.float32)
    want = exported[arch]["checkpoint"].build("cpu").detect(features, TIMING, 28.0)
    got = build_for_runtime(onnx_model, "onnx").detect(features, TIMING, 28.0)
    torch.testing.assert_close(got.scores, want.scores, atol=1e-5, rtol=0)
    with pytest.raises(ExportError, match="run it with --runtime onnx"):
        build_for_runtime(onnx_model, "torch")
    with pytest.raises(ExportError, match=r"torchscript export; --runtime onnx needs a \.onnx file"):
        build_for_runtime(load_runtime_model(str(tmp_path / "model.ts"))[0], "onnx")


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--format", "onnx", "--out", "{tmp}/model.ts"], "must end in .onnx"),
        (["--format", "onnx", "--out", "{tmp}/m.onnx", "--opset", "11"], "--opset must be an int >= 13"),
        (["--format", "torchscript", "--out", "{tmp}"], "must end in .ts"),
        (["--format", "onnx", "--out", "{tmp}/m.onnx", "--opset", "99"], "the ONNX exporter failed at opset 99"),
    ],
)
def test_tal_export_refuses_bad_flags_with_one_line(exported, tmp_path, capsys, argv, needle):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(["export", "--model", str(exported["temporalmaxer"]["path"]), *argv]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1


def test_unknown_format_missing_model_and_a_foreign_file_are_clear_errors(exported, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--model", str(exported["temporalmaxer"]["path"]), "--format", "tflite"])
    assert exit_info.value.code == 2 and "invalid choice: 'tflite'" in capsys.readouterr().err
    assert main(["export", "--model", str(tmp_path / "nope.pt"), "--format", "onnx"]) == 2
    assert "no such checkpoint file" in capsys.readouterr().err
    with pytest.raises(ExportError, match="unknown export format 'tflite'"):
        export_checkpoint(exported["temporalmaxer"]["checkpoint"], "tflite", io.BytesIO())
    with pytest.raises(ExportError, match="cannot read as ONNX or TorchScript"):
        open_exported(b"not a model at all", "junk.onnx")
    # an ONNX model of someone else's (no tal metadata) is refused
    onnx = require_onnx()
    foreign = onnx.load_from_string(exported["temporalmaxer"]["onnx"])
    del foreign.metadata_props[:]
    with pytest.raises(ExportError, match="without 'tal' metadata"):
        open_exported(foreign.SerializeToString(), "foreign.onnx")


def test_missing_onnx_packages_are_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # what an environment without onnxruntime gives on import
    with pytest.raises(ExportError, match="pip install onnx onnxruntime"):
        require_onnx()


def test_an_onnx_graph_refuses_features_of_the_wrong_width(exported):
    detector = runtime_detector(exported["actionformer"]["onnx"], "af.onnx")[0]
    with pytest.raises(ValueError, match=rf"features must be \[T, {C}\], got \(40, 32\)"):
        detector.detect(np.zeros((40, 32), np.float32))
    with pytest.raises(ValueError, match=rf"features must be \[B, {C}, T\]"):
        detector.dense(np.zeros((1, 32, 40), np.float32), np.ones((1, 40), bool))


def test_serve_with_the_onnx_runtime_answers_like_pytorch_over_http(exported, tmp_path, ray_session):
    from ray import serve

    from jobs.serve import run_app

    arch = "actionformer"
    onnx_path = tmp_path / "served.onnx"
    onnx_path.write_bytes(exported[arch]["onnx"])
    features = np.random.default_rng(4).standard_normal((90, C)).astype(np.float32)
    want = exported[arch]["checkpoint"].build("cpu").detect(features, TIMING, 36.0).to_numpy().sorted_by_score()
    port = free_port()
    args = ServeArgs(model=str(onnx_path), runtime="onnx", max_batch_size=2, batch_wait_timeout_s=0.0, cpus_per_replica=1.0)
    url = run_app(args, "127.0.0.1", port, quiet=True)
    try:
        body = {"features": features.tolist(), "fps": 5.0, "stride": 2, "window": 2, "duration": 36.0, "score_threshold": 0.0}
        response = requests.post(url + "/v1/detect", json=body, timeout=120)
        assert response.status_code == 200, response.text
        got = response.json()["detections"]
        assert len(got) == len(want) > 10
        np.testing.assert_allclose([d["score"] for d in got], want.scores, atol=1e-5)
        np.testing.assert_allclose([d["segment"] for d in got], want.segments.data, atol=1e-4)
        assert [d["label"] for d in got] == [LABELS[c] for c in want.labels]
        wrong = requests.post(url + "/v1/detect", json={"features": [[0.0] * 7]}, timeout=120)
        assert wrong.status_code == 422 and wrong.json()["error"] == "wrong_feature_dim"
    finally:
        serve.shutdown()


def test_serving_an_onnx_file_with_the_torch_runtime_is_refused_before_ray_starts(exported, tmp_path, capsys):
    onnx_path = tmp_path / "m.onnx"
    onnx_path.write_bytes(exported["temporalmaxer"]["onnx"])
    assert main(["serve", "--model", str(onnx_path)]) == 2
    assert "serve it with runtime onnx" in capsys.readouterr().err


@pytest.mark.parametrize(
    "arch, task, needle",
    [
        ("actionmamba", "detection", "actionmamba does not export: its selective scan"),
        ("causaltad", "detection", "causaltad does not export: its selective scan"),
        ("actionformer", "dense", "this checkpoint is a dense"),
        ("mstemba", "dense", "this checkpoint is a dense"),
    ],
)
def test_what_cannot_export_is_refused_naming_why(arch, task, needle):
    config = dataclasses.replace(make_config(arch, num_classes=len(LABELS), input_dim=C, max_seq_len=64, embed_dim=16, levels=3), task=task)
    checkpoint = Checkpoint.from_model(build_detector(config), LABELS, PROVENANCE, {})
    with pytest.raises(ExportError, match=needle):
        export_checkpoint(checkpoint, "onnx", io.BytesIO())


def test_dense_graph_refuses_what_is_not_one_stage():
    with pytest.raises(TypeError, match="exports one-stage detectors"):
        DenseGraph(torch.nn.Linear(2, 2))
