"""Dense multi-label detection: per-frame mAP against a plain reference, targets, loss, DenseHead, decoding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tal_models.dense import DenseHead, dense_loss, dense_targets, downsample_targets, segments_from_scores, upsample_masked
from tal_models.evaluation import evaluate_dense, frame_labels, frame_times, scores_at
from tal_models.layers import DilatedTCNBlock
from tal_models.structures import AnnotationSet, LabelMap, Segments, VideoAnnotation
from tal_models.timing import FeatureTiming

MULTITHUMOS = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "multithumos" / "multithumos.json"


# --- a plain reference: loop over classes, sort, precision at every positive ---------------------
def reference_ap(scores: np.ndarray, labels: np.ndarray, ties: str) -> float:
    positives = int(labels.sum())
    if positives == 0:
        return float("nan")
    order = sorted(range(len(scores)), key=lambda i: -scores[i])  # Python's sort is stable
    total, hits = 0.0, 0
    for rank, i in enumerate(order, start=1):
        if labels[i]:
            hits += 1
            if ties == "stable":
                total += hits / rank
            else:  # precision at the last frame scoring the same
                last = max(r for r, j in enumerate(order, start=1) if scores[j] == scores[i])
                total += sum(labels[j] for j in order[:last]) / last
    return total / positives


def random_set(rng, num_videos=4, K=5, empty_class=3):
    """Ground truth with class ``empty_class`` never annotated, and coarse scores (many ties)."""
    label_map = LabelMap({f"c{k}": k + 1 for k in range(K)})  # ids 1..K, as MultiTHUMOS
    videos, scores = {}, {}
    for v in range(num_videos):
        duration = float(rng.uniform(5, 20))
        n = int(rng.integers(1, 6))
        starts = rng.uniform(0, duration, n)
        segs = np.stack([starts, np.minimum(starts + rng.uniform(0.5, 6, n), duration)], 1)
        labels = rng.choice([k + 1 for k in range(K) if k != empty_class], n)
        vid = f"video_{v}"
        videos[vid] = VideoAnnotation(vid, Segments(segs), labels, duration=duration)
        F = int(rng.integers(10, 40))
        scores[vid] = (frame_times(duration, num_frames=F), np.round(rng.random((F, K)), 1))
    return AnnotationSet(videos, label_map), scores


@pytest.mark.parametrize("ties", ["stable", "grouped"])
def test_per_frame_map_equals_plain_reference(ties):
    gt, scores = random_set(np.random.default_rng(0))
    metrics = evaluate_dense(gt, scores, ties=ties)
    S = np.concatenate([scores[v][1] for v in gt.videos])
    Y = np.concatenate([frame_labels(gt[v], gt.label_map, scores[v][0]) for v in gt.videos])
    expected = np.array([reference_ap(S[:, k], Y[:, k], ties) for k in range(5)])
    assert np.isnan(expected[3]) and np.isnan(metrics.per_class_ap[3])  # the class without positives
    np.testing.assert_allclose(metrics.per_class_ap, expected, rtol=1e-12, equal_nan=True)
    assert metrics.mAP == pytest.approx(np.nanmean(expected), rel=1e-12)
    assert metrics.num_classes_evaluated == 4 and metrics.num_frames == S.shape[0]
    # APMeter (super-events / PDAN / MS-TCT): AP 0 for the empty class, counted in the mean
    zero = evaluate_dense(gt, scores, ties=ties, empty_classes="zero")
    assert zero.mAP == pytest.approx(np.nan_to_num(expected).mean(), rel=1e-12)


def test_ties_stable_follows_input_order_grouped_does_not():
    gt = AnnotationSet({"a": VideoAnnotation("a", Segments([[0.5, 1.5]]), [0], duration=4.0)}, LabelMap({"x": 0}))
    times = np.array([0.0, 1.0, 2.0, 3.0])  # frame 1 positive; all scores equal
    first = evaluate_dense(gt, {"a": (times, np.ones((4, 1)))}, ties="stable").mAP
    assert first == pytest.approx(1 / 2)  # the positive is ranked second of four (input order)
    assert evaluate_dense(gt, {"a": (times, np.ones((4, 1)))}, ties="grouped").mAP == pytest.approx(1 / 4)  # the prevalence


def test_perfect_and_reversed_scores():
    gt, scores = random_set(np.random.default_rng(1))
    perfect = {v: (t, frame_labels(gt[v], gt.label_map, t).astype(float)) for v, (t, _) in scores.items()}
    assert evaluate_dense(gt, perfect).mAP == 1.0
    assert evaluate_dense(gt, perfect, ties="grouped").mAP == 1.0
    reversed_ = {v: (t, 1.0 - s) for v, (t, s) in perfect.items()}
    random = evaluate_dense(gt, scores).mAP
    assert evaluate_dense(gt, reversed_).mAP < min(0.5, random)


def test_frame_labels_boundaries_and_columns():
    label_map = LabelMap({"a": 1, "b": 2})
    video = VideoAnnotation("v", Segments([[1.0, 3.0], [2.0, 2.0], [2.5, 4.0]]), [1, 2, 2])
    times = np.array([0.5, 1.0, 2.0, 3.0, 3.5])
    open_ = frame_labels(video, label_map, times)
    closed = frame_labels(video, label_map, times, boundary="closed")
    np.testing.assert_array_equal(open_[:, 0], [0, 0, 1, 0, 0])  # strict: t = 1 and t = 3 are outside
    np.testing.assert_array_equal(closed[:, 0], [0, 1, 1, 1, 0])
    np.testing.assert_array_equal(open_[:, 1], [0, 0, 0, 1, 1])  # the zero-length [2, 2] labels nothing when open
    np.testing.assert_array_equal(closed[:, 1], [0, 0, 1, 1, 1])
    with pytest.raises(ValueError, match="label id 2 is not one of the 2 classes"):
        frame_labels(video, 2, times)  # columns 0..1


def test_frame_times_grids():
    np.testing.assert_allclose(frame_times(10.0, num_frames=25), np.arange(25) * 0.4)  # Charades: j * duration / 25
    np.testing.assert_allclose(frame_times(1.0, fps=4), [0, 0.25, 0.5, 0.75])
    assert frame_times(3.0, num_frames=0).shape == (0,)
    with pytest.raises(ValueError, match="exactly one"):
        frame_times(3.0)


def test_scores_at_interpolates():
    out = scores_at(np.array([0.0, 1.0, 3.0]), np.array([[0.0], [1.0], [0.0]]), np.array([-1.0, 0.5, 2.0, 9.0]))
    np.testing.assert_allclose(out[:, 0], [0.0, 0.5, 0.5, 0.0])


def test_evaluate_dense_errors_and_ignored_videos():
    gt, scores = random_set(np.random.default_rng(2), num_videos=2)
    with pytest.raises(ValueError, match=r"1 of 2 ground-truth videos have no scores, e.g. \['video_1'\]"):
        evaluate_dense(gt, {"video_0": scores["video_0"]})
    t, s = scores["video_1"]
    with pytest.raises(ValueError, match="'video_1': scores have 4 classes, the ground truth has 5"):
        evaluate_dense(gt, {**scores, "video_1": (t, s[:, :4])})
    with pytest.raises(ValueError, match=r"'video_1': scores must be \[F, K\]"):
        evaluate_dense(gt, {**scores, "video_1": (t[:-1], s)})
    bad = s.copy()
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match="'video_1': the score of frame 2, class column 1 is NaN"):
        evaluate_dense(gt, {**scores, "video_1": (t, bad)})
    extra = evaluate_dense(gt, {**scores, "v_unknown": (t, s)})
    assert extra.ignored_videos == ["v_unknown"] and extra.mAP == evaluate_dense(gt, scores).mAP
    assert extra.to_dict()["per_class_AP"]["c3"] is None


# --- targets agree with the evaluation's labels ---------------------------------------------------
@pytest.mark.parametrize("boundary", ["open", "closed"])
def test_dense_targets_agree_with_frame_labels(boundary):
    timing = FeatureTiming(fps=30.0, stride=4, window=16)
    video = VideoAnnotation("v", Segments([[0.4, 2.0], [1.0, 1.8], [2.5, 2.5], [0.0, 0.1]]), [0, 2, 1, 1])
    T = 24
    steps = timing.segments_to_steps(video.segments).to_torch(dtype=torch.float64)
    targets = dense_targets(steps, torch.from_numpy(video.labels), 3, T, boundary)
    labels = frame_labels(video, 3, timing.centers(T), boundary)
    np.testing.assert_array_equal(targets.T.numpy().astype(bool), labels)
    assert targets.shape == (3, T) and 0 < targets.sum() < 3 * T


def test_targets_round_trip_through_segments_from_scores():
    rng = np.random.default_rng(3)
    for _ in range(20):
        T, K = 40, 4
        n = 6
        starts = rng.integers(0, T, n)
        segs = torch.tensor(np.stack([starts - 0.5, np.minimum(starts + rng.integers(1, 8, n), T) - 0.5], 1), dtype=torch.float32)
        labels = torch.from_numpy(rng.integers(0, K, n))
        targets = dense_targets(segs, labels, K, T)
        out_segs, out_scores, out_labels = segments_from_scores(targets.T, threshold=0.5)
        again = dense_targets(out_segs, out_labels, K, T)
        assert torch.equal(again, targets)
        assert torch.all(out_scores == 1.0)
        # runs of one class never touch: overlapping segments of a class were merged
        for k in range(K):
            mine = out_segs[out_labels == k]
            assert bool((mine[1:, 0] > mine[:-1, 1]).all())


def test_segments_from_scores_mean_and_min_length():
    probs = torch.tensor([[0.9, 0.1], [0.7, 0.6], [0.2, 0.2], [0.8, 0.2], [0.1, 0.2]])
    segs, scores, labels = segments_from_scores(probs, threshold=0.5)
    torch.testing.assert_close(segs, torch.tensor([[-0.5, 1.5], [2.5, 3.5], [0.5, 1.5]]))
    torch.testing.assert_close(scores, torch.tensor([0.8, 0.8, 0.6]))
    assert labels.tolist() == [0, 0, 1]
    segs, _, labels = segments_from_scores(probs, threshold=0.5, min_length=2)
    assert segs.tolist() == [[-0.5, 1.5]] and labels.tolist() == [0]
    assert segments_from_scores(torch.zeros(0, 3))[0].shape == (0, 2)


# --- the loss -----------------------------------------------------------------------------------
@pytest.mark.parametrize("gamma", [0.0, 2.0])
def test_dense_loss_ignores_padded_steps(gamma):
    torch.manual_seed(0)
    K, n, T = 3, 7, 12
    logits = torch.randn(1, K, n)
    targets = (torch.rand(1, K, n) > 0.5).float()
    alone = dense_loss(logits, targets, torch.ones(1, 1, n, dtype=torch.bool), focal_gamma=gamma)
    padded_logits = torch.cat([logits, torch.full((1, K, T - n), float("nan"))], dim=2).requires_grad_()
    padded_targets = torch.cat([targets, torch.ones(1, K, T - n)], dim=2)
    mask = torch.arange(T).view(1, 1, T) < n
    padded = dense_loss(padded_logits, padded_targets, mask, focal_gamma=gamma)
    torch.testing.assert_close(padded["final_loss"], alone["final_loss"])
    assert int(padded["num_valid"]) == n
    padded["final_loss"].backward()
    assert torch.isfinite(padded_logits.grad).all() and bool((padded_logits.grad[..., n:] == 0).all())
    if gamma == 0.0:
        expected = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets)  # the mean over K x n
        torch.testing.assert_close(alone["final_loss"], expected)


# --- the head -----------------------------------------------------------------------------------
def pyramid(
    videos: list[torch.Tensor], T: int, levels: int, garbage: float = float("nan")
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-level features ``[D, n_l]`` of each video padded to ``T / 2**l`` with ``garbage``, and the masks."""
    feats, masks = [], []
    for level in range(levels):
        T_l = T // 2**level
        x = torch.full((len(videos), videos[0][level].shape[0], T_l), garbage)
        m = torch.zeros(len(videos), 1, T_l, dtype=torch.bool)
        for i, v in enumerate(videos):
            x[i, :, : v[level].shape[1]] = v[level]
            m[i, :, : v[level].shape[1]] = True
        feats.append(x)
        masks.append(m)
    return feats, masks


def random_video(n: int, D: int, levels: int) -> list[torch.Tensor]:
    return [torch.randn(D, -(-n // 2**level)) for level in range(levels)]  # ceil(n / 2**l) valid level steps


@pytest.mark.parametrize("fusion, upsample, with_fuser", [("sum", "nearest", False), ("sum", "linear", True), ("concat", "linear", False)])
def test_dense_head_shapes_and_padding_invariance(fusion, upsample, with_fuser):
    torch.manual_seed(0)
    D, K, L = 6, 4, 3
    fuser = DilatedTCNBlock(8, kernel_size=3, dilation=2) if with_fuser else None
    head = DenseHead(D, K, L, fused_dim=8, fusion=fusion, upsample=upsample, fuser=fuser, aux_heads=True).eval()
    videos = [random_video(n, D, L) for n in (13, 32, 5)]
    feats, masks = pyramid(videos, 32, L)
    out = head(feats, masks)
    assert out.shape == (3, K, 32)
    assert bool((out.masked_select(~masks[0].expand_as(out)) == 0).all()) and torch.isfinite(out).all()
    for i, (n, video) in enumerate(zip((13, 32, 5), videos)):
        T_alone = -(-n // 4) * 4  # its own multiple of 2**(L - 1)
        f, m = pyramid([video], T_alone, L, garbage=0.0)
        torch.testing.assert_close(out[i, :, :n], head(f, m)[0, :, :n], atol=1e-5, rtol=0)
    aux = head.level_logits(feats, masks)
    assert [a.shape for a in aux] == [(3, K, 32), (3, K, 16), (3, K, 8)]
    assert all(torch.isfinite(a).all() for a in aux)


def test_dense_head_gradients_reach_every_level():
    torch.manual_seed(0)
    head = DenseHead([6, 6, 6], 3, 3, fused_dim=8)
    feats, masks = pyramid([random_video(16, 6, 3), random_video(9, 6, 3)], 16, 3)
    feats = [f.nan_to_num(0.0).requires_grad_() for f in feats]
    targets = torch.stack([dense_targets(torch.tensor([[2.0, 7.0]]), torch.tensor([1]), 3, 16)] * 2)
    loss = dense_loss(head(feats, masks), targets, masks[0])["final_loss"]
    loss.backward()
    for level, (f, m) in enumerate(zip(feats, masks)):
        assert f.grad[m.expand_as(f)].abs().sum() > 0, f"no gradient reaches level {level}"
        assert bool((f.grad[~m.expand_as(f)] == 0).all())
    assert all(p.grad is not None for p in head.parameters() if p.requires_grad)
    assert downsample_targets(targets, 4).shape == (2, 3, 4)


def test_upsample_masked_reads_valid_steps_only():
    x = torch.tensor([[[1.0, 3.0, float("nan"), float("nan")]]])  # 2 valid level steps of 4, stride 2
    mask = torch.tensor([[[True, True, False, False]]])
    near = upsample_masked(x, mask, 8, "nearest")[0, 0, :4]
    lin = upsample_masked(x, mask, 8, "linear")[0, 0, :4]
    torch.testing.assert_close(near, torch.tensor([1.0, 3.0, 3.0, 3.0]))  # position 3 rounds up to padding: left instead
    torch.testing.assert_close(lin, torch.tensor([1.0, 2.0, 3.0, 3.0]))


def test_dense_head_rejects_bad_configuration():
    with pytest.raises(ValueError, match="in_dim lists 2 levels, expected 3"):
        DenseHead([4, 4], 3, 3)
    with pytest.raises(ValueError, match="fusion"):
        DenseHead(4, 3, 3, fusion="max")
    with pytest.raises(RuntimeError, match="aux_heads"):
        DenseHead(4, 3, 1).level_logits([torch.zeros(1, 4, 2)], [torch.ones(1, 1, 2, dtype=torch.bool)])


# --- the real MultiTHUMOS file --------------------------------------------------------------------
def test_multithumos_frame_labels_overlap():
    if not MULTITHUMOS.is_file():
        pytest.skip(f"{MULTITHUMOS} not found")
    from pipelines.annotations import read_multithumos

    gt = read_multithumos(MULTITHUMOS).subset("testing")
    labels = np.concatenate([frame_labels(v, gt.label_map, frame_times(v.duration, fps=2.0)) for v in gt])
    assert labels.shape[1] == 65
    per_frame = labels.sum(axis=1)
    assert per_frame.max() >= 3 and (per_frame > 1).mean() > 0.1  # dense: several actions at once, often
    assert (labels.sum(axis=0) > 0).all()  # every class has positive frames in the test videos
