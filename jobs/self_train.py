"""Pseudo-label self-training: rounds of training on pseudo ground truth, each round's model labelling the next.

    tal train --config thumos14-actionformer --features STORE --annotations FILE \\
        --pseudo-labels weak_train_results.json [--pseudo-threshold 0.3] [--pseudo-top-k 10] [--rounds 2]

Round 1 trains the (fully supervised) preset on the confident detections of the given results file: a weakly
supervised or zero-shot model's detections on the training videos (``tal evaluate --model REF --subset
validation --out FILE`` writes them for THUMOS14, whose training videos are its Validation subset). Each later
round runs the previous round's best checkpoint over every training video of the store, and its confident
detections (``tal_models.pseudo.select_pseudo_labels``: ``--pseudo-threshold``, ``--pseudo-top-k`` per class)
become the next round's ground truth. Validation always scores against the real annotations of the validation
subset, so the rounds are comparable.

MLflow: one parent run (named ``--run-name``, or the preset and a time) holds the settings and each round's best
score (metric ``round_best_score``, step = round) and the pseudo labels each round produced; every round is a
training run of its own, tagged ``mlflow.parentRunId`` (nested under the parent in the MLflow UI), registered as
any other (the champion changes only when a round beats it on the same validation set).
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from jobs import tracking
from jobs.errors import UsageError
from jobs.inference import detect_sequences, load_model
from pipelines.annotations import read_annotations, write_activitynet_results
from pipelines.store import FeatureStore


def self_train(job) -> dict[str, Any]:
    """``job.rounds`` rounds of ``jobs.train.train_round`` under one parent MLflow run; returns the parent's summary
    with each round's (``rounds``) and the last round's ``best_score``."""
    from jobs.train import _storage_path, _subsets, train_round

    if not job.pseudo_labels:
        raise UsageError("--rounds needs --pseudo-labels (the first round's labels)")
    if job.resume:
        raise UsageError("--resume continues one run: resume the interrupted round's run (its name ends in -roundN) without --rounds")
    uri = tracking.tracking_uri(job.mlflow_uri)
    name = job.run_name or f"{Path(job.config).stem}-selftrain-{time.strftime('%Y%m%d-%H%M%S')}-{os.urandom(3).hex()}"
    out = _storage_path(job.out)
    local = Path(out) / name if "://" not in out else Path(tempfile.mkdtemp(prefix="tal-selftrain-"))
    annotations = read_annotations(job.annotations)
    train_subset, _ = _subsets(annotations, job.train_subset, job.val_subset)
    tags = {"preset": job.config, "tal.self_training_rounds": str(job.rounds), "git_commit": tracking.git_commit() or "unknown"}
    summaries: list[dict[str, Any]] = []
    with tracking.TrainingRun(uri, job.experiment, name, tags=tags) as parent:
        parent.log_params({"rounds": job.rounds, "pseudo_threshold": job.pseudo_threshold, "pseudo_top_k": job.pseudo_top_k,
                           "first_pseudo_labels": str(job.pseudo_labels)})  # fmt: skip
        labels = job.pseudo_labels
        for r in range(1, job.rounds + 1):
            print(f"self-training round {r} of {job.rounds}: pseudo labels from {labels}")
            round_job = replace(job, rounds=1, pseudo_labels=str(labels), run_name=f"{name}-round{r}", parent_run_id=parent.run_id)
            summary = train_round(round_job)
            summaries.append(summary)
            parent.log_metrics({"round_best_score": float(summary["best_score"])}, step=r)
            if r < job.rounds:
                labels = local / f"pseudo_labels_round{r + 1}.json"
                label_training_videos(round_job, summary["mlflow_run_id"], uri, annotations.subset(train_subset).videos, labels)
                parent.log_artifact(str(labels), f"round{r + 1}")
    return {"run_name": name, "mlflow_run_id": parent.run_id, "rounds": summaries, "best_score": summaries[-1]["best_score"]}


def label_training_videos(job, run_id: str, uri: str, video_ids, path: Path) -> Path:
    """The detections of ``run_id``'s best checkpoint on every training video of the store, as a results JSON at ``path``."""
    checkpoint, _ = load_model(f"runs:/{run_id}/checkpoint/model.pt", job.storage_options or None, mlflow_uri=uri)
    store = FeatureStore(job.features, options=job.storage_options or None)
    done = set(store.status().done)
    ids = sorted(v for v in video_ids if v in done)
    detections = detect_sequences(checkpoint, store.read_videos(ids), progress=True, device="cpu")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_activitynet_results(path, detections.values(), checkpoint.label_map)
    return path
