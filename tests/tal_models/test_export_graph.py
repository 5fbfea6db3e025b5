"""The dense part as a graph (``DenseGraph``), its TorchScript trace at other lengths, and ``RuntimeDetector``
decoding a runtime's outputs exactly as the PyTorch detector does. Pure torch: ONNX is tested in tests/jobs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tal_models.batch import collate
from tal_models.detectors import build_detector
from tal_models.export import DenseGraph, RuntimeDetector, dense_outputs, example_inputs
from tal_models.layers.kernels import ChannelLayerNorm, NormMLP, NormPointwise
from tal_models.presets import make_config
from tal_models.timing import FeatureTiming

pytestmark = [
    pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning"),  # Python ints read off shapes: checked at other lengths
    pytest.mark.filterwarnings("ignore:`torch.jit.trace:FutureWarning"),  # deprecated in torch 2.14; still what TorchScript files need
]

C, K = 24, 3
ARCHS = ("actionformer", "tridet", "temporalmaxer")


def _model(arch: str):
    torch.manual_seed(0)
    model = build_detector(make_config(arch, num_classes=K, input_dim=C, max_seq_len=64, embed_dim=16, levels=3)).eval()
    for p in model.cls_head.parameters():  # away from the focal prior, so that many candidates pass the threshold
        torch.nn.init.normal_(p, std=0.3)
    return model


def _padded_batch(lengths: tuple[int, ...], multiple: int, seed: int = 0, timing: FeatureTiming | None = None):
    rng = np.random.default_rng(seed)
    seqs = [
        {
            "features": rng.standard_normal((n, C)).astype(np.float32),
            "video_id": f"v{i}",
            "timing": timing,
            "duration": n / 2.0 if timing else None,
        }
        for i, n in enumerate(lengths)
    ]
    return collate(seqs, multiple)


def test_the_kernels_inference_path_equals_their_autograd_forward_exactly():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 13)
    w, b = torch.randn(8), torch.randn(8)
    pw, pb = torch.randn(5, 8, 1), torch.randn(5)
    w1, b1, w2, b2 = torch.randn(32, 8, 1), torch.randn(32), torch.randn(8, 32, 1), torch.randn(8)
    assert torch.equal(ChannelLayerNorm.infer(x, w, b, 1e-5), ChannelLayerNorm.apply(x, w, b, 1e-5))
    assert torch.equal(NormPointwise.infer(x, w, b, 1e-5, pw, pb), NormPointwise.apply(x, w, b, 1e-5, pw, pb))
    assert torch.equal(NormMLP.infer(x, w, b, 1e-5, w1, b1, w2, b2), NormMLP.apply(x, w, b, 1e-5, w1, b1, w2, b2))


@pytest.mark.parametrize("arch", ARCHS)
def test_dense_graph_is_the_detectors_dense_part_with_a_bool_or_float_mask(arch):
    model = _model(arch)
    batch = _padded_batch((50, 21), model.pad_multiple)
    with torch.no_grad():
        want = model.dense(batch.features, batch.mask)
        for mask in (batch.mask[:, 0], batch.mask[:, 0].float()):
            cls_logits, reg_offsets, valid = DenseGraph(model)(batch.features, mask)
            assert (
                torch.equal(cls_logits, want.cls_logits) and torch.equal(reg_offsets, want.reg_offsets) and torch.equal(valid, want.valid)
            )
    p = sum(batch.features.shape[-1] // s for s in model.config.strides)
    assert cls_logits.shape == (2, p, K) and reg_offsets.shape == (2, p, 2) and valid.dtype == torch.bool


@pytest.mark.parametrize("arch", ARCHS)
def test_a_torchscript_trace_is_exact_at_other_lengths_and_on_padded_batches(arch):
    model = _model(arch)
    graph = DenseGraph(model).eval()
    inputs = example_inputs(model.config)
    assert inputs[0].shape[-1] == 64 and not inputs[1][1].all()  # traced on a padded batch of 64 steps
    with torch.no_grad():
        traced = torch.jit.trace(graph, inputs, check_trace=False)
        for lengths in ((32, 32), (96, 41), (200, 7), (17,)):  # none of them 64; the first one unpadded
            batch = _padded_batch(lengths, model.pad_multiple)
            want = graph(batch.features, batch.mask[:, 0])
            got = traced(batch.features, batch.mask[:, 0])
            assert torch.equal(got[2], want[2])
            valid = want[2]
            for g, w in zip(got[:2], want[:2]):
                assert g.shape == w.shape
                torch.testing.assert_close(g[valid], w[valid], atol=1e-4, rtol=0)


def _torch_runtime(model):
    graph = DenseGraph(model).eval()

    def run(features: np.ndarray, mask: np.ndarray):
        assert features.dtype == np.float32 and mask.dtype == np.bool_ and mask.ndim == 2  # the graph's input contract
        with torch.no_grad():
            return [t.numpy() for t in graph(torch.from_numpy(features), torch.from_numpy(mask))]

    return run


@pytest.mark.parametrize("arch", ARCHS)
def test_runtime_detector_decodes_like_the_detector(arch):
    model = _model(arch)
    runtime = RuntimeDetector(model.config, _torch_runtime(model))
    assert runtime.pad_multiple == model.pad_multiple
    batch = _padded_batch((61, 30), model.pad_multiple, seed=1, timing=FeatureTiming(5.0, 2, 2))
    want, got = model.forward_inference(batch), runtime.forward_inference(batch)
    for w, g in zip(want, got):
        assert len(w) > 0 and len(g) == len(w) and g.video_id == w.video_id
        torch.testing.assert_close(g.scores, w.scores)
        torch.testing.assert_close(g.segments.data, w.segments.data)
        assert torch.equal(g.labels, w.labels)
    features = np.random.default_rng(2).standard_normal((45, C)).astype(np.float32)
    one, other = model.detect(features, FeatureTiming(5.0, 2, 2), 20.0), runtime.detect(features, FeatureTiming(5.0, 2, 2), 20.0)
    torch.testing.assert_close(other.scores, one.scores)
    torch.testing.assert_close(other.segments.data, one.segments.data)


def test_runtime_detector_refuses_bad_input_and_outputs_that_do_not_fit_its_config():
    model = _model("temporalmaxer")
    runtime = RuntimeDetector(model.config, _torch_runtime(model))
    with pytest.raises(ValueError, match=rf"features must be \[T, {C}\], got \(10, {C + 1}\)"):
        runtime.detect(np.zeros((10, C + 1), np.float32))
    with pytest.raises(ValueError, match="NaN or infinite"):
        runtime.detect(np.full((10, C), np.nan, np.float32))
    with pytest.raises(ValueError, match="multiple of 4"):
        runtime.dense(np.zeros((1, C, 10), np.float32), np.ones((1, 10), bool))
    with pytest.raises(TypeError, match="inference only"):
        runtime.forward_training(_padded_batch((8,), 4))
    # a graph of another model (two classes) is refused, not decoded
    other = _model("temporalmaxer")
    other_config = make_config("temporalmaxer", num_classes=2, input_dim=C, max_seq_len=64, embed_dim=16, levels=3)
    with pytest.raises(ValueError, match=r"this config wants \[B, 14, 2\]"):
        dense_outputs(other_config, 8, *_torch_runtime(other)(np.zeros((1, C, 8), np.float32), np.ones((1, 8), bool)))
