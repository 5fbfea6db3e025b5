"""``jobs.tracking`` against a local SQLite store and a real ``mlflow server``: runs, resume, registry, model resolution."""

from __future__ import annotations

import pickle
import re
import uuid
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

from jobs.tracking import (
    TRUNCATED,
    ParamConflictError,
    RunLogger,
    TrainingRun,
    flatten_params,
    git_commit,
    register_checkpoint,
    resolve_model,
    tracking_uri,
)

# MLflow's SQL store warns about its own use of SQLAlchemy's deprecated ``noload``.
pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated")


@pytest.fixture(scope="module")
def sqlite_workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("workdir")


@pytest.fixture(params=["sqlite", "server"])
def uri(request, sqlite_workdir, monkeypatch) -> str:
    """The store under test: the embedded default (``tracking_uri(workdir=...)``) or the session's ``mlflow server``."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    if request.param == "server":
        return request.getfixturevalue("mlflow_server")
    return tracking_uri(workdir=sqlite_workdir)


def _experiment() -> str:
    return f"test-{uuid.uuid4().hex[:8]}"  # the stores live for the module or session: each test its own experiment


def _checkpoint(path: Path, seed: int) -> Path:
    torch.save({"weights": torch.randn(4, 3, generator=torch.Generator().manual_seed(seed)), "epoch": seed}, path)
    return path


# --- no store needed ---------------------------------------------------------------------------
def test_tracking_uri_prefers_explicit_then_environment_then_a_sqlite_store_in_workdir(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    assert tracking_uri("https://mlflow.example.com") == "https://mlflow.example.com"
    assert tracking_uri(None, tmp_path) == "http://mlflow.internal:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert tracking_uri(workdir=tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlruns/mlflow.db"
    assert (tmp_path / "mlruns").is_dir()
    monkeypatch.chdir(tmp_path / "mlruns")
    assert tracking_uri() == f"sqlite:///{tmp_path.resolve()}/mlruns/mlruns/mlflow.db"  # absolute: Ray workers have another cwd


def test_flatten_params_dots_nested_keys_writes_lists_as_json_and_truncates_at_mlflows_limit():
    config = {"detector": {"arch": "actionformer", "fpn": {"levels": 6, "strides": [1, 2, 4]}}, "lr": 1e-4, "empty": {}, "note": None}
    config["long"] = "x" * (MAX_PARAM_VAL_LENGTH + 10)
    flat = flatten_params(config)
    assert flat["detector.arch"] == "actionformer"
    assert flat["detector.fpn.levels"] == "6" and flat["detector.fpn.strides"] == "[1, 2, 4]"
    assert flat["lr"] == "0.0001" and flat["empty"] == "{}" and flat["note"] == "None"
    assert len(flat["long"]) == MAX_PARAM_VAL_LENGTH and flat["long"].endswith(TRUNCATED)
    assert flatten_params({"a": 1}, prefix="train") == {"train.a": "1"}


def test_git_commit_is_head_inside_the_repo_and_none_outside(tmp_path):
    commit = git_commit()
    assert commit is None or re.fullmatch(r"[0-9a-f]{40}", commit)
    if (Path(__file__).resolve().parents[2] / ".git").exists():
        assert commit is not None
    assert git_commit(tmp_path) is None


def test_resolve_model_takes_a_local_file_or_a_folder_with_one_checkpoint(tmp_path):
    file = _checkpoint(tmp_path / "model.pt", 0)
    assert resolve_model(str(file)) == file
    folder = tmp_path / "ckpt"
    folder.mkdir()
    _checkpoint(folder / "model.pt", 1)
    assert resolve_model(str(folder)) == folder / "model.pt"
    _checkpoint(folder / "other.pt", 2)
    with pytest.raises(ValueError, match=r"holding 2 checkpoint files"):
        resolve_model(str(folder))
    with pytest.raises(ValueError, match=r"neither a local file"):
        resolve_model(str(tmp_path / "missing.pt"))


# --- against both stores -----------------------------------------------------------------------
def test_a_run_logs_flat_params_metrics_per_step_and_artifacts_then_finishes(uri, tmp_path, sqlite_workdir):
    experiment = _experiment()
    with TrainingRun(uri, experiment, "first", tags={"preset": "demo"}) as run:
        run.log_params({"optim": {"lr": 0.001, "epochs": 3}, "workers": 2, "levels": [1, 2]})
        for epoch in range(3):
            run.log_metrics({"train_loss": 1.0 / (epoch + 1), "val_average_mAP": 0.1 * epoch}, step=epoch)
        with pytest.warns(RuntimeWarning, match="NaN"):
            run.log_metrics({"train_loss": float("nan"), "lr": torch.tensor(0.5)}, step=3)
        run.log_artifact(_checkpoint(tmp_path / "model.pt", 0), "checkpoint")
        run.log_dict({"a": 1}, "config.json")
        run.set_tags({"stage": "test"})
        run_id, artifact_uri = run.run_id, run.artifact_uri
        worker = pickle.loads(pickle.dumps(RunLogger(uri, run_id)))  # what a Ray worker receives: no client inside
        worker.log_metrics({"worker_loss": 0.25}, step=0)
        assert run.metric_history("train_loss") == [(0, 1.0), (1, 0.5), (2, pytest.approx(1 / 3))]

    client = MlflowClient(uri)
    got = client.get_run(run_id)
    assert got.info.status == "FINISHED" and got.info.end_time is not None and got.info.run_name == "first"
    assert client.get_experiment(got.info.experiment_id).name == experiment
    assert got.data.params == {"optim.lr": "0.001", "optim.epochs": "3", "workers": "2", "levels": "[1, 2]"}
    assert got.data.tags["preset"] == "demo" and got.data.tags["stage"] == "test"
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "val_average_mAP")] == [(0, 0.0), (1, 0.1), (2, 0.2)]
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "lr")] == [(3, 0.5)]
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "worker_loss")] == [(0, 0.25)]
    assert sorted(f.path for f in client.list_artifacts(run_id)) == ["checkpoint", "config.json"]
    if uri.startswith("sqlite"):  # the embedded store keeps artifacts beside its database
        assert artifact_uri.startswith((sqlite_workdir.resolve() / "mlruns" / "artifacts").as_uri())
    else:
        assert artifact_uri.startswith("mlflow-artifacts:")


def test_a_body_that_raises_fails_the_run_and_the_exception_propagates(uri):
    experiment = _experiment()
    with pytest.raises(RuntimeError, match="boom"), TrainingRun(uri, experiment) as run:
        run.log_metrics({"loss": 1.0}, step=0)
        raise RuntimeError("boom")
    with pytest.raises(KeyboardInterrupt), TrainingRun(uri, experiment) as interrupted:
        raise KeyboardInterrupt
    client = MlflowClient(uri)
    failed = client.get_run(run.run_id)
    assert failed.info.status == "FAILED" and failed.data.tags["tal.error"] == "RuntimeError: boom"
    assert client.get_run(interrupted.run_id).info.status == "KILLED"
    statuses = {r.info.status for r in client.search_runs([failed.info.experiment_id])}
    assert statuses == {"FAILED", "KILLED"}  # never RUNNING


def test_resume_continues_the_same_run_and_refuses_a_changed_param(uri):
    experiment = _experiment()
    config = {"optim": {"lr": 0.01}, "seed": 0}
    with TrainingRun(uri, experiment, "resumable") as run:
        run.log_params(config)
        for epoch in range(2):
            run.log_metrics({"val_average_mAP": 0.2 + epoch}, step=epoch)
    first_id = run.run_id

    with TrainingRun(uri, experiment, run_id=first_id, tags={"resumed": "yes"}) as resumed:
        assert resumed.run_id == first_id
        assert MlflowClient(uri).get_run(first_id).info.status == "RUNNING"
        assert resumed.log_params(config) == {}  # the same values: nothing new, no error
        assert resumed.log_params({**config, "stop_after": 3}) == {"stop_after": "3"}
        done = {step for step, _ in resumed.metric_history("val_average_mAP")}
        for epoch in range(3):
            if epoch not in done:
                resumed.log_metrics({"val_average_mAP": 0.2 + epoch}, step=epoch)
    got = MlflowClient(uri).get_run(first_id)
    assert got.info.status == "FINISHED" and got.data.tags["resumed"] == "yes"
    assert [m.step for m in MlflowClient(uri).get_metric_history(first_id, "val_average_mAP")] == [0, 1, 2]

    with pytest.raises(ParamConflictError, match=r"optim\.lr: logged '0\.01', now '0\.02'"), TrainingRun(uri, run_id=first_id) as again:
        again.log_params({"optim": {"lr": 0.02}, "seed": 0})
    assert MlflowClient(uri).get_run(first_id).data.params["optim.lr"] == "0.01"
    assert MlflowClient(uri).get_run(first_id).info.status == "FAILED"

    with pytest.raises(ValueError, match="cannot resume MLflow run 'f00d'"), TrainingRun(uri, run_id="f00d"):
        pass


def test_register_moves_the_champion_only_to_a_better_score_on_the_same_validation_set(uri, tmp_path):
    experiment = _experiment()
    scores = {"a": 0.50, "b": 0.40, "c": 0.60, "d": 0.60, "e": 0.90}
    with TrainingRun(uri, experiment, "candidates") as run:
        for i, name in enumerate(scores):
            folder = tmp_path / name
            folder.mkdir()
            run.log_artifact(_checkpoint(folder / "model.pt", i), f"checkpoints/{name}")

    # The SQLite store is this module's own: the default name. The server lives for the session: a name of our own.
    model = "tal-detector" if uri.startswith("sqlite") else f"tal-detector-{uuid.uuid4().hex[:8]}"

    def register(name: str, key: str = "thumos14-val-3f2a"):
        kwargs = {} if model == "tal-detector" else {"model_name": model}
        return register_checkpoint(uri, run.run_id, f"checkpoints/{name}/model.pt", scores[name], key, **kwargs)

    first = register("a")
    assert (first.version, first.promoted, first.previous_version) == (1, True, None)
    worse = register("b")
    assert (worse.version, worse.promoted, worse.previous_version, worse.previous_score) == (2, False, 1, 0.5)
    assert "does not beat" in worse.reason
    better = register("c")
    assert (better.version, better.promoted, better.previous_version, better.previous_score) == (3, True, 1, 0.5)
    tie = register("d")
    assert (tie.version, tie.promoted) == (4, False)  # strictly better only
    elsewhere = register("e", key="activitynet-val-9c1d")
    assert (elsewhere.version, elsewhere.promoted, elsewhere.previous_version) == (5, False, 3)
    assert "validated on another set" in elsewhere.reason

    client = MlflowClient(uri, registry_uri=uri)
    champion = client.get_model_version_by_alias(model, "champion")
    assert champion.version in (3, "3")
    assert champion.tags == {"score": "0.6", "metric_name": "val_average_mAP", "validation_key": "thumos14-val-3f2a"}
    assert client.get_model_version(model, "5").tags["validation_key"] == "activitynet-val-9c1d"

    with pytest.raises(ValueError, match="no such artifact"):
        register_checkpoint(uri, run.run_id, "checkpoints/zz/model.pt", 1.0, "k")

    # From a reference to the very bytes that were logged.
    path = resolve_model(f"models:/{model}@champion", uri, tmp_path / "dl-champion")
    assert path.name == "model.pt" and path.read_bytes() == (tmp_path / "c" / "model.pt").read_bytes()
    assert torch.load(path)["epoch"] == 2
    assert resolve_model(f"models:/{model}/2", uri, tmp_path / "dl-2").read_bytes() == (tmp_path / "b" / "model.pt").read_bytes()
    assert resolve_model(f"models:/{model}/latest", uri, tmp_path / "dl-l").read_bytes() == (tmp_path / "e" / "model.pt").read_bytes()
    by_run = resolve_model(f"runs:/{run.run_id}/checkpoints/a", uri, tmp_path / "dl-run")  # a folder with one .pt
    assert by_run.read_bytes() == (tmp_path / "a" / "model.pt").read_bytes()

    with pytest.raises(ValueError, match=r"no alias 'best' \(versions: \[1, 2, 3, 4, 5\]; aliases: \{'champion': 3\}\)"):
        resolve_model(f"models:/{model}@best", uri)
    with pytest.raises(ValueError, match=r"no version 9 \(versions: \[1, 2, 3, 4, 5\]"):
        resolve_model(f"models:/{model}/9", uri)
    with pytest.raises(ValueError, match=r"no registered model named 'nope' \(registered models: \[.*'tal-detector"):
        resolve_model("models:/nope@champion", uri)
    with pytest.raises(ValueError, match=r"stages are gone"):
        resolve_model(f"models:/{model}/Production", uri)
    with pytest.raises(ValueError, match="no such artifact"):
        resolve_model(f"runs:/{run.run_id}/checkpoints/zz.pt", uri, tmp_path / "dl-missing")
