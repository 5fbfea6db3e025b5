"""Data pipelines: annotation formats and (later) Ray Data feature extraction."""
