"""Data pipelines: videos -> features -> the feature store, and the annotation formats.

``video`` (decoding through PyAV, typed failure reasons), ``backbones`` and ``weights`` (torchvision
frame and clip backbones; weights from a path, ``s3://`` or the torch hub cache, never downloaded),
``extract`` (Ray Data: list -> decode -> backbone -> Parquet parts, resumable), ``store`` (the
Parquet feature store, local or S3, with its manifest), ``feature_import`` (ActionFormer/OpenTAD
``.npy`` features in and out), ``synth`` (the demo's synthetic archive), ``annotations`` (THUMOS14,
ActivityNet, MultiTHUMOS, EPIC-Kitchens-100 readers and writers), ``atomic`` (the one atomic writer).
"""
