"""The serving contract without Ray: parsing, validation against the model, URI roots, payloads."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest

from jobs.serve_api import (
    DetectFeaturesRequest,
    DynamicBatcher,
    Limits,
    ModelInfo,
    RequestError,
    check_video_uri,
    detections_payload,
    features_request,
    options_from_query,
    parse_json_request,
    parse_npy,
    to_sequence,
)
from tal_models.structures import Detections, Segments, Unit

INFO = ModelInfo(
    reference="models:/tal-detector@champion",
    pinned="models:/tal-detector/3",
    labels=["jump", "run"],
    arch="temporalmaxer",
    input_dim=4,
    provenance={"backbone": "mobilenet_v2", "backbone_sha256": "abc", "feature_dim": 4, "fps": 5.0, "stride": 2, "window": 2},
    registry={"name": "tal-detector", "version": 3, "alias": "champion"},
)
LIMITS = Limits(max_body_bytes=1 << 20, max_upload_bytes=1 << 20, max_steps=100)


def _error(fn, *args) -> RequestError:
    with pytest.raises(RequestError) as info:
        fn(*args)
    return info.value


def _npy(array: np.ndarray, **kwargs) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, **kwargs)
    return buf.getvalue()


def test_a_request_with_the_models_sampling_gives_seconds_through_feature_timing():
    req = parse_json_request(b'{"features": [[0,0,0,0],[1,1,1,1],[2,2,2,2]], "video_id": "v", "top_k": 2}', DetectFeaturesRequest)
    seq = to_sequence(req, INFO, LIMITS)
    # step i is centred at (i * stride + window / 2) / fps = (2i + 1) / 5 s
    np.testing.assert_allclose(seq.timestamps, [0.2, 0.6, 1.0])
    assert seq.duration == pytest.approx((2 * 2 + 2) / 5.0)  # end of the last clip
    assert (seq.video_id, seq.features.dtype, seq.features.shape) == ("v", np.float32, (3, 4))


def test_timestamps_set_the_offset_and_must_be_evenly_spaced():
    req = DetectFeaturesRequest(features=[[0.0] * 4] * 3, timestamps=[10.2, 10.6, 11.0])
    assert to_sequence(req, INFO, LIMITS).timing.offset == pytest.approx(10.0)
    bad = DetectFeaturesRequest(features=[[0.0] * 4] * 3, timestamps=[10.2, 10.6, 12.0])
    assert _error(to_sequence, bad, INFO, LIMITS).code == "invalid_timestamps"
    short = DetectFeaturesRequest(features=[[0.0] * 4] * 3, timestamps=[10.2])
    assert "1 values for 3 feature steps" in _error(to_sequence, short, INFO, LIMITS).message


@pytest.mark.parametrize(
    ("features", "fields", "code"),
    [
        ([[0.0] * 5], {}, "wrong_feature_dim"),
        ([], {}, "empty_sequence"),
        ([[0.0] * 4] * 101, {}, "sequence_too_long"),
        ([[0.0] * 4], {"fps": 15.0}, "timing_mismatch"),
        ([[0.0] * 4], {"backbone": "resnet50"}, "features_mismatch"),
        ([[0.0] * 4], {"feature_dim": 2048}, "features_mismatch"),
        ([[0.0] * 4], {"num_steps": 7}, "invalid_request"),
        ([[0.0] * 4, [0.0] * 3], {}, "invalid_features"),  # ragged rows (found by the schema fuzzer)
    ],
)
def test_features_that_do_not_fit_the_model_are_422_naming_the_field(features, fields, code):
    err = _error(to_sequence, DetectFeaturesRequest(features=features, **fields), INFO, LIMITS)
    assert (err.status, err.code) == (422, code)


def test_the_wrong_width_message_names_both_widths_and_the_backbone():
    err = _error(to_sequence, DetectFeaturesRequest(features=[[0.0] * 5]), INFO, LIMITS)
    assert "5 channels" in err.message and "takes 4" in err.message and "mobilenet_v2" in err.message


def test_non_finite_features_are_refused_with_their_position():
    features = np.zeros((3, 4), np.float32)
    features[2, 1] = np.inf
    err = _error(to_sequence, features_request(features, {}), INFO, LIMITS)
    assert (err.status, err.code) == (422, "non_finite_features") and "step 2, channel 1" in err.message


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"", 400, "empty_body"),
        (b"{not json", 400, "malformed_json"),
        (b"[1, 2]", 422, "invalid_request"),
        (b'{"features": "abc"}', 422, "invalid_request"),
        (b'{"features": [[1]], "colour": "red"}', 422, "invalid_request"),
        (b'{"features": [[1]], "top_k": 0}', 422, "invalid_request"),
    ],
)
def test_json_bodies_malformed_are_400_and_misfit_are_422(body, status, code):
    err = _error(parse_json_request, body, DetectFeaturesRequest)
    assert (err.status, err.code) == (status, code)


def test_npy_bodies_are_read_without_ever_unpickling(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:  # what a hostile client would send: unpickling it would create the marker file
        def __reduce__(self):
            return (open, (str(marker), "w"))

    hostile = _npy(np.array([Exploit()], dtype=object), allow_pickle=True)
    np.load(io.BytesIO(hostile), allow_pickle=True)  # the payload is live: loading it with pickle allowed runs it
    assert marker.exists()
    marker.unlink()
    err = _error(parse_npy, hostile)
    assert (err.status, err.code) == (422, "invalid_features") and not marker.exists()
    assert _error(parse_npy, b"\x93NUMPY garbage").code == "malformed_npy"
    assert _error(parse_npy, b"").code == "empty_body"
    assert _error(parse_npy, _npy(np.array(["a", "b"]))).code == "invalid_features"
    np.testing.assert_array_equal(parse_npy(_npy(np.eye(4, dtype=np.float64))), np.eye(4))


def test_npy_bodies_are_viewed_in_place_and_must_match_their_header():
    features = np.arange(24, dtype=np.float32).reshape(6, 4)
    body = _npy(features)
    view = parse_npy(body)
    np.testing.assert_array_equal(view, features)
    assert view.base is not None and not view.flags.writeable  # a view of the body's bytes, not a copy
    fortran, big_endian = np.asfortranarray(features), features.astype(">f4")
    np.testing.assert_array_equal(parse_npy(_npy(fortran)), features)
    np.testing.assert_array_equal(parse_npy(_npy(big_endian)), features)
    assert parse_npy(_npy(big_endian)).dtype == np.dtype(">f4")  # converted by to_sequence's astype
    for bad in (body[:-3], body + b"\0\0\0\0"):  # truncated, or bytes beyond what the header describes
        err = _error(parse_npy, bad)
        assert (err.status, err.code) == (400, "malformed_npy") and "header describes 96 bytes" in err.message
    archive = io.BytesIO()
    np.savez(archive, features=features)
    assert ".npz" in _error(parse_npy, archive.getvalue()).message


def test_query_options_are_checked_by_name_and_type():
    assert options_from_query({"top_k": "3", "fps": "5"}) == {"top_k": "3", "fps": "5"}
    assert "colour" in _error(options_from_query, {"colour": "red"}).message
    req = features_request(np.zeros((2, 4), np.float32), {"top_k": "3", "score_threshold": "0.5"})
    assert (req.top_k, req.score_threshold) == (3, 0.5)
    assert _error(features_request, np.zeros((2, 4)), {"top_k": "many"}).status == 422


def test_payload_is_best_first_filtered_and_labelled():
    d = Detections(
        "v", Segments(np.array([[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]]), Unit.SECONDS), np.array([0.2, 0.9, 0.5]), np.array([0, 1, 0])
    )
    out = detections_payload(d, INFO.labels, score_threshold=0.3, top_k=None)
    assert [(x["label"], x["score"], x["segment"]) for x in out] == [("run", 0.9, [2.0, 3.0]), ("jump", 0.5, [4.0, 5.0])]
    assert len(detections_payload(d, INFO.labels, None, 1)) == 1


def test_video_uris_must_stay_under_a_root(tmp_path):
    root = tmp_path / "videos"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.mp4").write_bytes(b"x")
    outside = tmp_path / "secret.mp4"
    outside.write_bytes(b"x")
    os.symlink(outside, root / "link.mp4")
    roots = [str(root), "s3://bucket/videos"]
    assert check_video_uri(str(root / "sub" / "a.mp4"), roots) == str((root / "sub" / "a.mp4").resolve())
    assert check_video_uri("s3://bucket/videos/x/a.mp4", roots) == "s3://bucket/videos/x/a.mp4"
    refused = [
        str(root / ".." / "secret.mp4"),  # .. out of the root
        str(root / "link.mp4"),  # a symlink out of the root
        str(tmp_path / "videos2" / "a.mp4"),  # a sibling whose name starts like the root
        "/etc/passwd",
        "s3://bucket/videos/../private/a.mp4",
        "s3://bucket/videos2/a.mp4",
        "s3://other/videos/a.mp4",
        "http://example.com/a.mp4",
        "gs://bucket/videos/a.mp4",
    ]
    for uri in refused:
        err = _error(check_video_uri, uri, roots)
        assert err.status == 403, uri
    assert "started without video roots" in _error(check_video_uri, str(root / "sub" / "a.mp4"), []).message
    assert _error(check_video_uri, "a\x00b", roots).status == 400


def test_model_description_hides_nothing_the_client_needs():
    described = INFO.describe()
    assert (described["name"], described["version"], described["alias"]) == ("tal-detector", 3, "champion")
    assert described["labels"] == ["jump", "run"] and described["provenance"]["backbone"] == "mobilenet_v2"
    assert INFO.summary()["pinned"] == "models:/tal-detector/3"


def test_the_batcher_batches_whatever_waits_while_the_model_is_busy_and_keeps_order():
    import asyncio
    import threading
    import time

    calls: list[list[int]] = []
    lock = threading.Lock()

    def slow_double(items: list[int]) -> list[int]:
        with lock:
            calls.append(list(items))
        time.sleep(0.2)
        if 13 in items:
            raise ValueError("thirteen")
        return [2 * i for i in items]

    async def scenario():
        batcher = DynamicBatcher(slow_double, max_batch_size=4, wait_s=0.001)
        tasks = []
        for i in range(10):  # one every 20 ms while each batch takes 200 ms: later ones must share batches
            tasks.append(asyncio.create_task(batcher.submit(i)))
            await asyncio.sleep(0.02)
        results = await asyncio.gather(*tasks)
        failed = await asyncio.gather(batcher.submit(13), return_exceptions=True)
        after = await batcher.submit(5)  # the batcher survives a failing batch
        return results, failed, after

    results, failed, after = asyncio.run(scenario())
    assert results == [2 * i for i in range(10)] and after == 10
    assert isinstance(failed[0], ValueError)
    assert calls[0] == [0] and max(len(c) for c in calls) == 4  # first alone (idle model), then full batches
    assert sorted(i for c in calls[:-2] for i in c) == list(range(10))


def test_tal_serve_refuses_bad_flags_and_models_in_one_line_before_starting_ray(tmp_path, capsys):
    from jobs.cli import main

    assert main(["serve", "--model", str(tmp_path / "missing.pt")]) == 2
    assert "missing.pt" in capsys.readouterr().err
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    assert main(["serve", "--model", str(tmp_path / "notes.pt")]) == 2
    assert "cannot read as a checkpoint" in capsys.readouterr().err
    assert main(["serve", "--model", "x.pt", "--max-batch-size", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tal serve: error: --max-batch-size") and len(err.strip().splitlines()) == 1


def test_tal_serve_settings_defaults_then_config_then_flags_then_set(tmp_path):
    from jobs.serve import resolve_args

    shipped = Path(__file__).resolve().parents[2] / "infra" / "serve" / "tal.yaml"  # a Serve config: its app's args
    args = resolve_args(str(shipped), {"max_batch_size": 2, "video_roots": None, "model": None}, ["max_steps=100"])
    assert (args.model, args.gpus_per_replica, args.max_batch_size, args.max_steps) == ("models:/tal-detector@champion", 1.0, 2, 100)
    plain = tmp_path / "serve.yaml"
    plain.write_text("model: a.pt\nmax_batch_size: 4\nvideo_roots: [s3://b/v/]\n")
    args = resolve_args(str(plain), {"model": "b.pt"}, ["max_batch_size=1"])
    assert (args.model, args.max_batch_size, args.video_roots, args.max_body_mb) == ("b.pt", 1, ["s3://b/v/"], 64.0)
    assert resolve_args(None, {"model": "c.pt"}, []).video_roots == []
    plain.write_text("model: a.pt\nmax_batch_sise: 4\n")
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['max_batch_sise'\]"):
        resolve_args(str(plain), {}, [])
    with pytest.raises(ValueError, match="no such key"):
        resolve_args(None, {"model": "c.pt"}, ["max_batchsize=1"])
    with pytest.raises(ValueError, match="--model is required"):
        resolve_args(None, {}, [])
    with pytest.raises(ValueError, match="max_batch_size"):
        resolve_args(None, {"model": "c.pt"}, ["max_batch_size=0"])


def test_the_batcher_runs_every_batch_on_the_executor_it_is_given():
    import asyncio
    import concurrent.futures
    import threading

    executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="only-model-thread")

    def names(items: list[int]) -> list[str]:
        return [threading.current_thread().name] * len(items)

    async def scenario():
        batcher = DynamicBatcher(names, max_batch_size=2, wait_s=0.0, executor=executor)
        return await asyncio.gather(*(batcher.submit(i) for i in range(5)))

    assert {name.split("_")[0] for name in asyncio.run(scenario())} == {"only-model-thread"}
    executor.shutdown()


def test_a_lone_request_does_not_wait_for_company_that_is_not_arriving():
    import asyncio
    import time

    async def first_call_seconds(arriving: int) -> float:
        batcher = DynamicBatcher(lambda items: items, max_batch_size=4, wait_s=0.5, arriving=lambda: arriving)
        start = time.perf_counter()
        await batcher.submit(1)
        return time.perf_counter() - start

    assert asyncio.run(first_call_seconds(arriving=0)) < 0.25  # nobody on the way: no wait
    assert asyncio.run(first_call_seconds(arriving=1)) >= 0.5  # a request being parsed: wait_s for it
