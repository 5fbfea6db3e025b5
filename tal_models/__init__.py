"""The models of the platform, pure PyTorch/NumPy: nothing here imports Ray or does I/O beyond
what its caller hands it (a path or a file object).

Data and results
    ``structures`` (``Segments``, ``Detections``, ``LabelMap``, ``VideoAnnotation``, ``AnnotationSet``, ``tiou``),
    ``timing`` (``FeatureTiming``: feature steps <-> seconds, the one formula), ``batch`` (``Batch``,
    ``collate``: the one place that pads; ``random_crop``).
Detectors
    ``detectors`` (the ``Detector`` protocol, ``build_detector``; one module per family: ``one_stage``,
    ``dense`` (per-step multi-label)), ``refine`` (BRN boundary refinement, a one-stage head option),
    ``dense`` (per-step targets, loss, the dense head, runs -> segments),
    ``layers`` (masked temporal blocks by concept, with the hand-written autograd ``kernels``),
    ``encoders`` (the feature pyramid), ``necks``, ``heads`` and ``trident`` (dense heads), ``points``
    (anchor points), ``targets`` (label assignment), ``losses``, ``decode`` (dense outputs -> detections),
    ``postprocess`` (NMS, Soft-NMS, score voting, classifier fusion).
Configuration and training
    ``config`` (frozen dataclasses <-> dicts <-> YAML, ``--set`` overrides, the int checks),
    ``presets`` (the papers' configurations and the shipped preset files), ``optim`` (AdamW, warm-up +
    cosine, EMA), ``training`` (the epoch loops), ``checkpoint`` (one ``torch.load(weights_only=True)`` file).
Evaluation
    ``evaluation`` (detection mAP with the ActivityNet reference semantics, Recall@k, proposal AR@AN,
    the per-frame mAP of the dense protocols).
"""
