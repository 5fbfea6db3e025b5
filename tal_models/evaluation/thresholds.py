"""tIoU threshold lists, built the way the reference evaluators build them."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# the named protocols: THUMOS14's (fully supervised papers), THUMOS14's weakly supervised one, ActivityNet's
PROTOCOLS = {"thumos14": "0.3:0.7:0.1", "weak": "0.1:0.7:0.1", "activitynet": "0.5:0.95:0.05"}


def parse_tiou(values: Sequence[str] | str) -> np.ndarray:
    """Thresholds from ``["0.3", "0.5"]``, a range ``"0.5:0.95:0.05"`` (stop included) or a protocol's name
    (``PROTOCOLS``: ``weak`` is THUMOS14's weakly supervised 0.1:0.7:0.1).

    A range becomes ``np.linspace(start, stop, n)``, the exact floats the ActivityNet and
    ActionFormer evaluators use (``np.linspace(0.5, 0.95, 10)``), so matches at a tIoU that
    equals a threshold are decided identically.
    """
    if isinstance(values, str):
        values = [values]
    out: list[float] = []
    for text in values:
        text = PROTOCOLS.get(text.strip().lower(), text)
        if ":" in text:
            parts = text.split(":")
            if len(parts) != 3:
                raise ValueError(f"a tIoU range is start:stop:step, got {text!r}")
            try:
                start, stop, step = (float(p) for p in parts)
            except ValueError:
                raise ValueError(f"a tIoU range is start:stop:step of numbers, got {text!r}") from None
            if step <= 0 or stop < start:
                raise ValueError(f"a tIoU range needs start <= stop and step > 0, got {text!r}")
            count = round((stop - start) / step) + 1
            out.extend(np.linspace(start, stop, count).tolist())
        else:
            try:
                out.append(float(text))
            except ValueError:
                raise ValueError(f"a tIoU threshold is a number, got {text!r}") from None
    tiou = np.asarray(out, dtype=np.float64)
    if tiou.size == 0 or not np.all((tiou > 0) & (tiou <= 1)):
        raise ValueError(f"tIoU thresholds must lie in (0, 1], got {out}")
    return tiou
