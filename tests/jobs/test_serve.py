"""The Serve application over real HTTP: one app per module, on real Ray, loaded from a real MLflow registry.

The checkpoint is a small untrained TemporalMaxer whose provenance is a real MobileNetV2 extraction
(ImageNet weights from the hub cache, 5 fps, 2-frame clips); correctness is checked against the same
checkpoint run in this process on the same features (``features_for_video`` + ``detect_batch``).
"""

from __future__ import annotations

import concurrent.futures
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from helpers import SERVED_LABELS, free_port, register_untrained_detector, synthetic_video

from jobs.serve_config import ServeArgs
from pipelines.extract import SamplingConfig, features_for_video
from tal_models.checkpoint import Checkpoint

SHARED_VIDEO = Path(__file__).resolve().parents[3] / "shared" / "data" / "videos" / "bigbuckbunny_720p_h264.mp4"
SAMPLING = SamplingConfig(fps=5.0, window=2, stride=2, chunk_frames=16)
LABELS = SERVED_LABELS
MAX_BODY_MB = 2.0  # small, so that a 413 is cheap to provoke
TIMEOUT = 120


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


@pytest.fixture(scope="module")
def served(tmp_path_factory, ray_session, moto_s3):
    from ray import serve

    from jobs.serve import run_app

    root = tmp_path_factory.mktemp("serve")
    uri, checkpoint, backbone = register_untrained_detector(root, "serve-tests", SAMPLING)
    videos = root / "videos"
    videos.mkdir()
    synthetic = videos / "synthetic.mp4"
    shutil.copy(synthetic_video(root, seed=3), synthetic)
    moto_s3.fs.mkdir("serve-videos")
    moto_s3.fs.put(str(synthetic), "serve-videos/in/synthetic.mp4")

    port = free_port()
    args = ServeArgs(
        model="models:/tal-detector@champion",
        mlflow_uri=uri,
        s3_endpoint=moto_s3.endpoint_url,
        video_roots=[str(videos), "s3://serve-videos/in/"],
        max_body_mb=MAX_BODY_MB,
        max_upload_mb=MAX_BODY_MB,
        max_steps=300,
        max_batch_size=8,
        batch_wait_timeout_s=0.02,
    )
    url = run_app(args, "127.0.0.1", port)
    try:
        yield {"url": url, "checkpoint": checkpoint, "backbone": backbone, "synthetic": synthetic, "root": root}
    finally:
        serve.shutdown()


def _in_process(checkpoint: Checkpoint, features: np.ndarray, timing, duration: float) -> list[tuple[str, float, list[float]]]:
    from jobs.inference import detect_batch
    from pipelines.store import FeatureSequence

    seq = FeatureSequence("v", features, timing, timing.centers(len(features)), duration)
    d = detect_batch(checkpoint.build("cpu"), [seq])[0].sorted_by_score()
    return [
        (LABELS[int(label)], float(s), [float(a), float(b)]) for label, s, (a, b) in zip(d.labels, d.scores, np.asarray(d.segments.data))
    ]


def _flat(response: dict) -> list[tuple[str, float, list[float]]]:
    return [(d["label"], d["score"], d["segment"]) for d in response["detections"]]


def _same(got, expected, score_tol=1e-5, time_tol=1e-4):
    assert len(got) == len(expected) > 0
    for (gl, gs, gseg), (el, es, eseg) in zip(got, expected):
        assert gl == el and gs == pytest.approx(es, abs=score_tol) and gseg == pytest.approx(eseg, abs=time_tol)


def _post(url: str, path: str, **kwargs) -> requests.Response:
    return requests.post(url + path, timeout=TIMEOUT, **kwargs)


# --- the endpoints on good input ------------------------------------------------------------------


def test_health_model_and_openapi(served):
    url = served["url"]
    assert requests.get(url + "/healthz", timeout=TIMEOUT).json()["status"] == "ok"
    model = requests.get(url + "/v1/model", timeout=TIMEOUT).json()
    assert (model["name"], model["version"], model["alias"], model["pinned"]) == ("tal-detector", 1, "champion", "models:/tal-detector/1")
    assert model["labels"] == LABELS and model["input_dim"] == 1280
    assert model["provenance"]["backbone"] == "mobilenet_v2" and model["provenance"]["fps"] == 5.0
    assert model["server"] == {
        "max_body_bytes": int(MAX_BODY_MB * 2**20), "max_upload_bytes": int(MAX_BODY_MB * 2**20), "max_steps": 300,
        "max_batch_size": 8, "video_uris": True,
    }  # fmt: skip
    spec = requests.get(url + "/openapi.json", timeout=TIMEOUT).json()
    assert {"/v1/detect", "/v1/detect/video", "/healthz", "/v1/model"} <= set(spec["paths"])
    assert requests.get(url + "/docs", timeout=TIMEOUT).status_code == 200


def test_the_detector_replica_answers_http_itself_without_serves_proxy(served):
    from ray import serve
    from ray.serve.context import _get_global_client

    assert sorted(serve.status().applications["tal"].deployments) == ["Detector", "VideoFeaturizer"]  # no separate ingress
    details = _get_global_client().get_serve_details()
    (group,) = [g for g in details["target_groups"] if g["app_name"] == "tal" and g["protocol"] == "HTTP"]
    (target,) = group["targets"]  # direct ingress: the target is the Detector replica, not a proxy
    assert target["name"].startswith("SERVE_REPLICA::tal#Detector#")
    assert served["url"].endswith(f":{target['port']}") and target["port"] != details["http_options"]["port"]


def test_the_torch_thread_holds_its_thread_count():
    import threading

    from jobs.serve import TorchThread

    worker = TorchThread(num_threads=3)
    assert worker.run(torch.get_num_threads) == 3
    assert worker.run(lambda: threading.current_thread().name).startswith("tal-torch")


def test_features_as_json_and_as_npy_give_the_in_process_detections(served):
    url, checkpoint = served["url"], served["checkpoint"]
    features = np.random.default_rng(1).standard_normal((40, 1280)).astype(np.float32)
    from tal_models.timing import FeatureTiming

    timing = FeatureTiming(5.0, 2, 2, offset=3.0)
    expected = _in_process(checkpoint, features, timing, 20.0)
    body = {"features": features.tolist(), "offset": 3.0, "duration": 20.0, "video_id": "clip"}
    as_json = _post(url, "/v1/detect", json=body)
    assert as_json.status_code == 200, as_json.text
    result = as_json.json()
    assert result["video_id"] == "clip" and result["num_steps"] == 40 and result["model"]["version"] == 1
    assert {"receive_s", "parse_s", "detect_s", "total_s"} <= set(result["timing"])
    _same(_flat(result), expected)
    as_npy = _post(url, "/v1/detect?offset=3&duration=20&top_k=5", data=_npy(features), headers={"content-type": "application/x-npy"})
    assert as_npy.status_code == 200, as_npy.text
    _same(_flat(as_npy.json()), expected[:5])
    # a feature-store row as it is (timestamps, provenance columns) is accepted
    row = {"features": features.tolist(), "timestamps": timing.centers(40).tolist(), "duration": 20.0, "fps": 5.0, "stride": 2, "window": 2}
    row.update(backbone="mobilenet_v2", feature_dim=1280, num_steps=40, num_frames=100, native_fps=25.0, source="x.mp4", schema_version=1)
    as_row = _post(url, "/v1/detect", json=row)
    assert as_row.status_code == 200, as_row.text
    _same(_flat(as_row.json()), expected)


def test_video_upload_detects_like_featurizing_and_detecting_in_process(served):
    url, checkpoint = served["url"], served["checkpoint"]
    with open(SHARED_VIDEO, "rb") as f:
        response = _post(url, "/v1/detect/video?top_k=10", files={"video": (SHARED_VIDEO.name, f, "video/mp4")})
    assert response.status_code == 200, response.text
    result = response.json()
    seq = features_for_video(served["backbone"], str(SHARED_VIDEO), SAMPLING)
    assert result["video_id"] == "bigbuckbunny_720p_h264" and result["num_steps"] == len(seq.features)
    assert result["duration"] == pytest.approx(5.28, abs=0.05)
    assert {"decode_s", "features_s", "detect_s", "total_s"} <= set(result["timing"])
    _same(_flat(result), _in_process(checkpoint, seq.features, seq.timing, seq.duration)[:10], score_tol=1e-4, time_tol=1e-3)


def test_a_video_by_local_path_by_s3_uri_and_by_upload_agree(served):
    url, synthetic = served["url"], served["synthetic"]
    by_path = _post(url, "/v1/detect/video", json={"uri": str(synthetic), "top_k": 20})
    by_s3 = _post(url, "/v1/detect/video", json={"uri": "s3://serve-videos/in/synthetic.mp4", "top_k": 20})
    by_raw_body = _post(url, "/v1/detect/video?top_k=20", data=synthetic.read_bytes(), headers={"content-type": "video/mp4"})
    for r in (by_path, by_s3, by_raw_body):
        assert r.status_code == 200, r.text
    assert by_path.json()["video_id"] == by_s3.json()["video_id"] == "synthetic"
    _same(_flat(by_s3.json()), _flat(by_path.json()), score_tol=1e-6, time_tol=1e-6)
    _same(_flat(by_raw_body.json()), _flat(by_path.json()), score_tol=1e-6, time_tol=1e-6)


# --- bad input: 4xx with a JSON message, and the service keeps serving -------------------------------


def _bad_requests(served) -> list[tuple[str, str, dict, int, str]]:
    root, synthetic = served["root"], served["synthetic"]
    nan = np.zeros((8, 1280), np.float32)
    nan[3, 7] = np.nan
    truncated = SHARED_VIDEO.read_bytes()[: SHARED_VIDEO.stat().st_size // 2]
    json_header = {"content-type": "application/json"}
    oversized = b"0" * int((MAX_BODY_MB + 0.5) * 2**20)
    return [
        ("malformed JSON", "/v1/detect", {"data": b'{"features": [[1, 2]', "headers": json_header}, 400, "malformed_json"),
        ("wrong dimension", "/v1/detect", {"json": {"features": [[0.0] * 7]}}, 422, "wrong_feature_dim"),
        ("empty sequence", "/v1/detect", {"json": {"features": []}}, 422, "empty_sequence"),
        (
            "too long",
            "/v1/detect",
            {"data": _npy(np.zeros((301, 1280), np.float32)), "headers": {"content-type": "application/x-npy"}},
            422,
            "sequence_too_long",
        ),
        (
            "wrong dimension in .npy",
            "/v1/detect",
            {"data": _npy(np.zeros((8, 7), np.float32)), "headers": {"content-type": "application/x-npy"}},
            422,
            "wrong_feature_dim",
        ),
        (
            "truncated .npy",
            "/v1/detect",
            {"data": _npy(np.zeros((8, 1280), np.float32))[:-100], "headers": {"content-type": "application/octet-stream"}},
            400,
            "malformed_npy",
        ),
        ("NaN in .npy", "/v1/detect", {"data": _npy(nan), "headers": {"content-type": "application/x-npy"}}, 422, "non_finite_features"),
        (
            "NaN literal in JSON",
            "/v1/detect",
            {"data": json.dumps({"features": [[float("nan")] * 1280]}).encode(), "headers": json_header},
            422,
            "non_finite_features",
        ),
        (
            "Infinity in JSON",
            "/v1/detect",
            {"data": json.dumps({"features": [[1.0] * 1279 + [float("inf")]]}).encode(), "headers": json_header},
            422,
            "non_finite_features",
        ),
        ("another fps", "/v1/detect", {"json": {"features": [[0.0] * 1280], "fps": 30}}, 422, "timing_mismatch"),
        ("unknown field", "/v1/detect", {"json": {"features": [[0.0] * 1280], "colour": 1}}, 422, "invalid_request"),
        ("wrong content type", "/v1/detect", {"data": b"1,2,3", "headers": {"content-type": "text/csv"}}, 415, "unsupported_media_type"),
        ("oversized body", "/v1/detect", {"data": oversized, "headers": {"content-type": "application/x-npy"}}, 413, "payload_too_large"),
        (
            "oversized chunked body",
            "/v1/detect",
            {"data": iter([oversized[: 2**20]] * 3), "headers": {"content-type": "application/x-npy"}},
            413,
            "payload_too_large",
        ),
        (
            "text upload",
            "/v1/detect/video",
            {"files": {"video": ("notes.mp4", b"just some text, not a video\n" * 20, "video/mp4")}},
            422,
            "video_not_a_video",
        ),
        ("truncated video", "/v1/detect/video", {"files": {"video": ("cut.mp4", truncated, "video/mp4")}}, 422, "video_truncated"),
        ("empty upload", "/v1/detect/video", {"data": b"", "headers": {"content-type": "video/mp4"}}, 422, "video_empty"),
        ("no file field", "/v1/detect/video", {"files": {"clip": ("a.mp4", b"x", "video/mp4")}}, 422, "missing_video"),
        ("oversized upload", "/v1/detect/video", {"files": {"video": ("big.mp4", oversized, "video/mp4")}}, 413, "payload_too_large"),
        ("outside the roots", "/v1/detect/video", {"json": {"uri": "/etc/passwd"}}, 403, "uri_not_allowed"),
        ("dot-dot escape", "/v1/detect/video", {"json": {"uri": str(root / "videos" / ".." / "model.pt")}}, 403, "uri_not_allowed"),
        ("another bucket", "/v1/detect/video", {"json": {"uri": "s3://elsewhere/in/synthetic.mp4"}}, 403, "uri_not_allowed"),
        ("http URI", "/v1/detect/video", {"json": {"uri": "http://127.0.0.1:1/x.mp4"}}, 403, "uri_not_allowed"),
        ("missing object", "/v1/detect/video", {"json": {"uri": "s3://serve-videos/in/nothing.mp4"}}, 404, "video_missing"),
        ("missing file", "/v1/detect/video", {"json": {"uri": str(synthetic.parent / "nothing.mp4")}}, 404, "video_missing"),
        (
            "video wrong type",
            "/v1/detect/video",
            {"data": b"hello", "headers": {"content-type": "text/plain"}},
            415,
            "unsupported_media_type",
        ),
        ("unknown route", "/v1/detect/audio", {"json": {}}, 404, "not_found"),
    ]


def test_every_bad_input_is_a_4xx_json_error_naming_the_problem_and_the_service_keeps_serving(served):
    url = served["url"]
    failures = []
    for name, path, kwargs, status, code in _bad_requests(served):
        try:
            r = _post(url, path, **kwargs)
        except requests.ConnectionError as e:  # the server may close an oversized upload early: acceptable only for 413s
            if status != 413:
                failures.append(f"{name}: connection error {e}")
            continue
        try:
            payload = r.json()
        except ValueError:
            failures.append(f"{name}: {r.status_code} without JSON: {r.text[:200]}")
            continue
        ok = r.status_code == status and (code is None or payload.get("error") == code) and payload.get("message")
        if not ok:
            failures.append(f"{name}: got {r.status_code} {payload}, expected {status} {code}")
    assert not failures, "\n".join(failures)
    assert requests.get(url + "/healthz", timeout=TIMEOUT).json()["status"] == "ok"
    good = _post(url, "/v1/detect", json={"features": [[0.0] * 1280] * 4})
    assert good.status_code == 200 and good.json()["num_steps"] == 4


def test_a_pickled_npy_is_refused_without_running_it(served, tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    buf = io.BytesIO()
    np.save(buf, np.array([Exploit()], dtype=object), allow_pickle=True)
    r = _post(served["url"], "/v1/detect", data=buf.getvalue(), headers={"content-type": "application/x-npy"})
    assert r.status_code == 422 and r.json()["error"] == "invalid_features"
    assert not marker.exists()


# --- load ------------------------------------------------------------------------------------------


def test_a_concurrent_burst_has_no_errors_and_batches_requests(served):
    url = served["url"]
    rng = np.random.default_rng(7)
    bodies = [_npy(rng.standard_normal((int(n), 1280)).astype(np.float32)) for n in rng.integers(8, 60, size=200)]

    def call(body: bytes) -> tuple[int, int]:
        r = _post(url, "/v1/detect", data=body, headers={"content-type": "application/x-npy"})
        return r.status_code, (r.json()["timing"]["batch_size"] if r.status_code == 200 else 0)

    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(call, bodies))
    statuses = [s for s, _ in results]
    assert statuses.count(200) == 200, {s: statuses.count(s) for s in set(statuses)}
    assert max(b for _, b in results) > 1  # @serve.batch put concurrent requests into one forward pass


# --- property-based fuzzing of the OpenAPI schema ------------------------------------------------------


def test_fuzzing_the_openapi_schema_finds_no_server_error(served):
    import schemathesis
    from hypothesis import HealthCheck, given, settings

    url = served["url"]
    schema = schemathesis.openapi.from_url(url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/detect", "/v1/detect/video", "/healthz", "/v1/model"}
    seen: dict[str, set[int]] = {}

    def fuzz(operation) -> None:
        @settings(max_examples=25, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def check(case):
            response = case.call(base_url=url, timeout=TIMEOUT)
            seen.setdefault(operation.path, set()).add(response.status_code)
            assert response.status_code < 500, f"{case.method} {case.path}: {response.status_code} {response.text[:300]}"
            content_type = response.headers.get("content-type") or [""]  # schemathesis: header name -> list of values
            assert content_type[0].startswith("application/json"), content_type

        check()

    for operation in operations:
        fuzz(operation)
    assert any(code >= 400 for code in seen["/v1/detect"])  # the fuzzer did reach the validation
