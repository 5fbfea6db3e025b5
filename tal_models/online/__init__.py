"""Online (causal) detection: a causal pyramid with an O(1) incremental state, the event rule, streams.

``encoder`` (``CausalEncoderConfig``, ``CausalPyramid``: causal blocks whose ``step`` advances one
feature step), ``events`` (``Event``, ``EventRuleConfig``, ``EventRule``: per-step scores -> start /
update / end events), ``stream`` (``OnlineStream``: pushes steps through a model and the rule).
The detector itself is ``tal_models.detectors.online.OnlineDetector``.
"""
