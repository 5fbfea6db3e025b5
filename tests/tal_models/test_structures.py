import numpy as np
import pytest
import torch

from tal_models.structures import (
    AnnotationSet,
    Detections,
    LabelMap,
    Segments,
    Unit,
    UnknownLabelError,
    VideoAnnotation,
    matched_tiou,
    pairwise_tiou,
)


def test_pairwise_tiou_hand_computed():
    a = Segments([[0.0, 10.0], [5.0, 7.0]])
    b = Segments([[5.0, 15.0], [20.0, 30.0], [0.0, 10.0]])
    expected = np.array([[5 / 15, 0.0, 1.0], [2 / 10, 0.0, 2 / 10]])
    out = pairwise_tiou(a, b)
    assert out.shape == (2, 3)
    np.testing.assert_allclose(out, expected)


def test_numpy_and_torch_agree_and_keep_backend():
    rng = np.random.default_rng(0)
    starts = rng.uniform(0, 100, (50, 1))
    a = np.hstack([starts, starts + rng.uniform(0, 20, (50, 1))])
    starts = rng.uniform(0, 100, (30, 1))
    b = np.hstack([starts, starts + rng.uniform(0, 20, (30, 1))])
    out_np = pairwise_tiou(a, b)
    out_t = pairwise_tiou(torch.from_numpy(a), torch.from_numpy(b))
    assert isinstance(out_np, np.ndarray) and isinstance(out_t, torch.Tensor)
    np.testing.assert_allclose(out_t.numpy(), out_np, rtol=0, atol=1e-12)
    np.testing.assert_allclose(matched_tiou(a[:30], b), np.diag(pairwise_tiou(a[:30], b)))
    assert ((out_np >= 0) & (out_np <= 1)).all()


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_degenerate_segments_never_give_nan(backend):
    a = np.array([[4.0, 4.0], [4.0, 4.0], [3.0, 5.0], [6.0, 2.0]])  # two points, a segment, an inverted one
    b = np.array([[4.0, 4.0], [5.0, 5.0], [3.0, 5.0], [6.0, 2.0]])
    if backend == "torch":
        a, b = torch.from_numpy(a), torch.from_numpy(b)
    m = np.asarray(pairwise_tiou(a, b))
    assert not np.isnan(m).any()
    assert m[0, 0] == 1.0  # the same instant: identical segments
    assert m[0, 1] == 0.0  # two different instants
    assert m[0, 2] == 0.0  # a point inside a segment has no extent to share
    assert m[2, 2] == 1.0
    assert m[3, 2] == 0.0  # an inverted segment is empty
    np.testing.assert_array_equal(np.asarray(matched_tiou(a, b)), np.diag(m))


def test_tiou_uses_the_reference_float_operations():
    # 0.1 + 0.2 style rounding: the union is (len_b + len_a) - inter, the reference's order.
    a = np.array([[0.1, 0.7]])
    b = np.array([[0.3, 1.3]])
    inter = min(0.7, 1.3) - max(0.1, 0.3)
    union = (1.3 - 0.3) + (0.7 - 0.1) - inter
    assert pairwise_tiou(a, b)[0, 0] == inter / union


def test_segments_validation_names_the_row():
    with pytest.raises(ValueError, match=r"segment 1 ends before it starts"):
        Segments([[0, 1], [5, 2]])
    with pytest.raises(ValueError, match=r"segment 0 is not finite"):
        Segments([[np.nan, 1]])
    with pytest.raises(ValueError, match=r"shape \[N, 2\]"):
        Segments([[0, 1, 2]])
    with pytest.raises(ValueError, match="not finite"):
        Segments(torch.tensor([[0.0, float("inf")]]))
    assert len(Segments([])) == 0
    assert len(Segments([[3.0, 3.0]])) == 1  # zero length is legal


def test_segments_views_and_units():
    s = Segments(np.array([[0.0, 2.0], [1.0, 5.0], [4.0, 4.0]]), Unit.STEPS)
    np.testing.assert_array_equal(s.lengths(), [2, 4, 0])
    np.testing.assert_array_equal(s.centers(), [1, 3, 4])
    assert len(s[1:]) == 2 and s[0].data.tolist() == [[0.0, 2.0]] and s[-1].data.tolist() == [[4.0, 4.0]]
    assert s[np.array([True, False, True])].data.tolist() == [[0, 2], [4, 4]]
    clipped = s.clip(0.5, 4.5)
    assert clipped.data.tolist() == [[0.5, 2.0], [1.0, 4.5], [4.0, 4.0]]
    seconds = s.scale(0.5, Unit.SECONDS)
    assert seconds.unit is Unit.SECONDS and seconds.data[1].tolist() == [0.5, 2.5]
    assert Segments.cat([s, s]).data.shape == (6, 2)
    with pytest.raises(ValueError, match="different units"):
        Segments.cat([s, seconds])
    with pytest.raises(ValueError, match="different units"):
        pairwise_tiou(s, seconds)
    t = s.to_torch()
    assert isinstance(t.data, torch.Tensor) and t.unit is Unit.STEPS
    assert isinstance(t.to_numpy().data, np.ndarray)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_detections_index_sort_and_cat(backend):
    d = Detections("vid", Segments([[0, 1], [2, 3], [4, 5], [6, 7]]), [0.2, 0.9, 0.2, 0.5], [1, 0, 1, 2])
    if backend == "torch":
        d = d.to_torch()
    top = d.sorted_by_score()
    assert np.asarray(top.scores).tolist() == pytest.approx([0.9, 0.5, 0.2, 0.2])
    assert np.asarray(top.segments.data)[2:, 0].tolist() == [0, 4]  # equal scores keep their order
    masked = d[d.labels == 1]
    assert len(masked) == 2 and masked.video_id == "vid"
    assert len(Detections.cat([d, d])) == 8
    with pytest.raises(ValueError, match="disagree in length"):
        Detections("vid", Segments([[0, 1]]), [0.1, 0.2], [0, 1])
    with pytest.raises(ValueError, match="different videos"):
        Detections.cat([d, Detections.empty("other")])


def test_label_map_bijection_and_errors():
    lm = LabelMap({"walk": 3, "run": 7})
    assert lm.id("run") == 7 and lm.name(3) == "walk" and lm.names == ["walk", "run"] and lm.ids == [3, 7]
    assert LabelMap(lm.to_dict()) == lm
    assert LabelMap.from_names(["b", "a", "b"]).to_dict() == {"b": 0, "a": 1}
    with pytest.raises(UnknownLabelError, match="unknown label 'swim'"):
        lm.id("swim")
    with pytest.raises(UnknownLabelError, match="unknown label id 5"):
        lm.name(5)
    with pytest.raises(ValueError, match="used by both"):
        LabelMap({"a": 1, "b": 1})


def _video(vid, subset):
    return VideoAnnotation(vid, Segments([[0, 1]]), [0], duration=10.0, subset=subset)


def test_annotation_set_resolves_v_prefix_and_subsets():
    anns = AnnotationSet({"v_abc": _video("v_abc", "validation"), "xyz": _video("xyz", "Test")}, LabelMap({"a": 0}))
    assert anns.resolve("abc") == "v_abc" and anns.resolve("v_xyz") == "xyz" and anns.resolve("nope") is None
    assert "abc" in anns and anns["abc"].video_id == "v_abc"
    assert list(anns.subset("test").videos) == ["xyz"]
    assert anns.num_instances == 2 and anns.subsets == ["Test", "validation"]
    with pytest.raises(ValueError, match="subset"):
        anns.subset("training")
    with pytest.raises(ValueError, match="1 segments but 2 labels"):
        VideoAnnotation("v", Segments([[0, 1]]), [0, 1])
