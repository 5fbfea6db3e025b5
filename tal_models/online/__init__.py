"""Online (streaming) temporal action detection: causal layers, the causal pyramid, events, streams."""
