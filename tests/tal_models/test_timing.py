import numpy as np
import pytest
import torch

from tal_models.structures import Segments, Unit
from tal_models.timing import FeatureTiming


def test_centers_follow_the_documented_formula():
    t = FeatureTiming(fps=15, stride=4, window=16, offset=1.0)
    np.testing.assert_allclose(t.centers(3), [1 + 8 / 15, 1 + 12 / 15, 1 + 16 / 15])
    assert t.seconds_per_step == pytest.approx(4 / 15)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_segments_round_trip(backend):
    t = FeatureTiming(fps=30, stride=8, window=16, offset=0.25)
    seconds = Segments(np.array([[0.0, 3.2], [10.5, 10.5], [2.0, 7.75]]))
    if backend == "torch":
        seconds = seconds.to_torch(dtype=torch.float64)
    steps = t.segments_to_steps(seconds)
    assert steps.unit is Unit.STEPS
    back = t.segments_to_seconds(steps)
    np.testing.assert_allclose(np.asarray(back.data), np.asarray(seconds.data), atol=1e-9)
    with pytest.raises(ValueError, match="expected segments in steps"):
        t.segments_to_seconds(seconds)


def test_num_steps_and_validation():
    t = FeatureTiming(fps=10, stride=2, window=4)
    assert [t.num_steps(n) for n in (0, 1, 3, 4, 5, 6, 9)] == [0, 1, 1, 1, 1, 2, 3]
    for bad in ({"fps": 0, "stride": 1, "window": 1}, {"fps": 10, "stride": 0, "window": 1}, {"fps": 10, "stride": 1, "window": 1.5}):
        with pytest.raises(ValueError):
            FeatureTiming(**bad)
