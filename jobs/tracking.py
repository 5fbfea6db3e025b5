"""MLflow for the training job: where runs are stored, what a run logs, and which checkpoint is the champion.

The one module that talks to MLflow. Every call goes through an ``MlflowClient`` built from an explicit
URI, never through ``mlflow.set_tracking_uri`` or the fluent ``mlflow.start_run`` state, so the same
code works in the driver and in a Ray worker process (which inherits none of the driver's globals).

- ``tracking_uri``: explicit URI, else ``$MLFLOW_TRACKING_URI``, else an embedded SQLite store under ``./mlruns``.
- ``TrainingRun``: one MLflow run as a context manager; it ends FINISHED, FAILED or KILLED, never RUNNING,
  and can be resumed by id (``tal train --resume``). ``RunLogger`` logs into an existing run without owning it.
- ``register_checkpoint``: a new version of the registered model; the ``champion`` alias moves only to a
  better score on the same validation set.
- ``resolve_model``: ``models:/name@alias``, ``models:/name/3``, ``runs:/id/path`` or a path -> a local checkpoint file.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import subprocess
import tempfile
import time
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import mlflow.artifacts
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.utils.validation import MAX_METRICS_PER_BATCH, MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH, MAX_TAG_VAL_LENGTH

# A checkpoint is one file: a progress bar per download is noise in every command that resolves a model (a user's setting wins).
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

log = logging.getLogger(__name__)

TRUNCATED = "...[truncated]"  # ends a param value cut at MLflow's length limit (6000 characters in MLflow 3.17)
CHECKPOINT_SUFFIXES = (".pt", ".pth")

# Version tags written by ``register_checkpoint`` and read back to compare against the champion.
DETECTOR_MODEL = "tal-detector"  # the registered model of detectors (tal train registers every run)
CLASSIFIER_MODEL = "tal-classifier"  # ... of video-level classifiers, which class-agnostic detectors are fused with
SCORE_TAG, METRIC_TAG, VALIDATION_TAG = "score", "metric_name", "validation_key"


# --- where runs live ---------------------------------------------------------------------------
def tracking_uri(explicit: str | None = None, workdir: Path | None = None) -> str:
    """The tracking URI to use: ``explicit``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///{workdir or cwd}/mlruns/mlflow.db``.

    Remote ``http(s)://`` URIs are returned as they are. The default store's folder is created, and its path is
    absolute, so that Ray workers with another working directory reach the same database.
    """
    if explicit and explicit.strip():
        return explicit.strip()
    from_env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if from_env:
        return from_env
    folder = (Path(workdir) if workdir is not None else Path.cwd()).resolve() / "mlruns"
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'mlflow.db'}"


def _sqlite_artifact_location(uri: str) -> str | None:
    """``file://`` URI of ``artifacts/`` beside a SQLite database file; None for any other store.

    Without it MLflow puts a SQL store's artifacts under ``./mlruns`` of whatever the working directory is.
    """
    if not uri.startswith("sqlite:///"):
        return None
    db = uri[len("sqlite:///") :].split("?", 1)[0]
    if not db or db == ":memory:":
        return None
    return (Path(db).resolve().parent / "artifacts").as_uri()


def _client(uri: str) -> MlflowClient:
    # The registry URI is passed too: left out, MLflow derives it from its global state, not from tracking_uri.
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _error_code(exc: MlflowException) -> str:
    return getattr(exc, "error_code", "") or ""


# --- params ------------------------------------------------------------------------------------
def flatten_params(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> flat MLflow params: ``{"optim": {"lr": 0.1}}`` -> ``{"optim.lr": "0.1"}``.

    Dataclasses count as mappings, lists and tuples become JSON, other values ``str(value)``. A value longer
    than MLflow's limit (``MAX_PARAM_VAL_LENGTH``) is cut and ends with ``TRUNCATED``. An empty mapping is
    kept as ``"{}"`` so that its key still shows.
    """
    if is_dataclass(config) and not isinstance(config, type):
        config = asdict(config)
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if is_dataclass(value) and not isinstance(value, type):
            value = asdict(value)
        if isinstance(value, Mapping):
            out.update(flatten_params(value, name) if value else {name: "{}"})
            continue
        if isinstance(value, list | tuple):
            text = json.dumps(value, default=str)
        else:
            text = str(value)
        if len(text) > MAX_PARAM_VAL_LENGTH:
            text = text[: MAX_PARAM_VAL_LENGTH - len(TRUNCATED)] + TRUNCATED
        out[name] = text
    return out


class ParamConflictError(ValueError):
    """A resumed run was given a param value that differs from the one it logged before."""


# --- runs --------------------------------------------------------------------------------------
class RunLogger:
    """Logs into an existing MLflow run; does not start or end it (a Ray worker's view of the driver's run).

    Holds only the URI and the run id (the client is rebuilt after pickling), so it can be sent to workers.
    """

    def __init__(self, uri: str, run_id: str | None):
        self.uri = uri
        self._run_id = run_id
        self._mlflow: MlflowClient | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_mlflow": None}

    @property
    def client(self) -> MlflowClient:
        if self._mlflow is None:
            self._mlflow = _client(self.uri)
        return self._mlflow

    @property
    def run_id(self) -> str:
        if self._run_id is None:
            raise RuntimeError("the MLflow run has not started: use `with TrainingRun(...) as run:` (or run.start())")
        return self._run_id

    @property
    def artifact_uri(self) -> str:
        return self.client.get_run(self.run_id).info.artifact_uri

    def log_params(self, config: Mapping[str, Any]) -> dict[str, str]:
        """Logs ``flatten_params(config)``; returns the params that were new.

        Params the run already holds with the same value are skipped (a resumed run logs its config again);
        a different value raises ``ParamConflictError`` before anything is logged.
        """
        params = flatten_params(config)
        logged = self.client.get_run(self.run_id).data.params
        changed = {k: (logged[k], v) for k, v in params.items() if k in logged and logged[k] != v}
        if changed:
            lines = "; ".join(f"{k}: logged {old!r}, now {new!r}" for k, (old, new) in sorted(changed.items()))
            raise ParamConflictError(
                f"MLflow run {self.run_id} already holds other values for {len(changed)} param(s) ({lines}). A resumed run "
                "must keep its config: resume with the original settings, or start a new run."
            )
        new = {k: v for k, v in params.items() if k not in logged}
        items = [Param(k, v) for k, v in new.items()]
        for i in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self.run_id, params=items[i : i + MAX_PARAMS_TAGS_PER_BATCH])
        return new

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Logs one value per key at ``step`` (an epoch); NaN values are skipped with a warning."""
        now = int(time.time() * 1000)
        batch = []
        for key, value in metrics.items():
            value = float(value)  # also takes numpy and 0-d torch scalars
            if math.isnan(value):
                warnings.warn(f"metric {key!r} is NaN at step {step}: not logged to MLflow", RuntimeWarning, stacklevel=2)
                continue
            batch.append(Metric(key, value, now, int(step)))
        for i in range(0, len(batch), MAX_METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=batch[i : i + MAX_METRICS_PER_BATCH])

    def metric_history(self, key: str) -> list[tuple[int, float]]:
        """``[(step, value), ...]`` of ``key`` in step order (empty if never logged): which epochs a resume can skip."""
        history = self.client.get_metric_history(self.run_id, key)
        return [(m.step, m.value) for m in sorted(history, key=lambda m: (m.step, m.timestamp))]

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        items = [RunTag(k, str(v)[:MAX_TAG_VAL_LENGTH]) for k, v in tags.items()]
        for i in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self.run_id, tags=items[i : i + MAX_PARAMS_TAGS_PER_BATCH])

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        """Uploads a file or a folder's contents under ``artifact_path`` (``runs:/<id>/<artifact_path>/<name>``)."""
        local_path = Path(local_path)
        if local_path.is_dir():
            self.client.log_artifacts(self.run_id, str(local_path), artifact_path)
        elif local_path.is_file():
            self.client.log_artifact(self.run_id, str(local_path), artifact_path)
        else:
            raise FileNotFoundError(f"cannot log {local_path} to MLflow: no such file or folder")

    def log_dict(self, dictionary: Mapping[str, Any], artifact_file: str) -> None:
        """``artifact_file`` ending in .json is written as JSON, .yaml/.yml as YAML."""
        self.client.log_dict(self.run_id, dict(dictionary), artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)


class TrainingRun(RunLogger):
    """One MLflow run as a context manager: started (or resumed) on enter, ended on exit, never left RUNNING.

    ``run_id=None`` creates a run in ``experiment`` (created if needed) named ``run_name`` with ``tags``;
    ``run_id`` given resumes that run: the same MLflow run goes back to RUNNING and continues its metrics.
    On exit the run ends FINISHED, FAILED when the body raised (the exception propagates, its type and message
    go to the ``tal.error`` tag) or KILLED on ``KeyboardInterrupt``.
    """

    def __init__(
        self,
        uri: str,
        experiment: str = "tal",
        run_name: str | None = None,
        tags: Mapping[str, str] | None = None,
        run_id: str | None = None,
    ):
        super().__init__(uri, None)
        self.experiment = experiment
        self.run_name = run_name
        self.tags = dict(tags or {})
        self._resume_id = run_id
        self._ended = False

    @property
    def resumed(self) -> bool:
        return self._resume_id is not None

    def start(self) -> TrainingRun:
        if self._run_id is not None:
            raise RuntimeError(f"MLflow run {self._run_id} has already started")
        if self._resume_id is not None:
            self._run_id = self._resume(self._resume_id)
            if self.tags:  # tags may change on resume (a newer commit); experiment and run name may not
                self.set_tags(self.tags)
            return self
        tags = {k: str(v) for k, v in self.tags.items()}
        commit = git_commit()
        if commit is not None:
            tags.setdefault("mlflow.source.git.commit", commit)  # the UI shows it as the run's source version
        run = self.client.create_run(self._experiment_id(), run_name=self.run_name, tags=tags)
        self._run_id = run.info.run_id
        return self

    def _resume(self, run_id: str) -> str:
        try:
            run = self.client.get_run(run_id)
        except MlflowException as exc:
            raise ValueError(f"cannot resume MLflow run {run_id!r}: it is not in the store {self.uri} ({exc.message})") from None
        if run.info.lifecycle_stage == "deleted":
            raise ValueError(f"cannot resume MLflow run {run_id!r}: it was deleted (restore it first: mlflow runs restore)")
        self.client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
        log.info("resuming MLflow run %s (was %s)", run_id, run.info.status)
        return run_id

    def _experiment_id(self) -> str:
        found = self.client.get_experiment_by_name(self.experiment)
        if found is not None:
            if found.lifecycle_stage == "deleted":
                raise ValueError(f"MLflow experiment {self.experiment!r} is deleted: restore it or choose another name")
            return found.experiment_id
        try:
            return self.client.create_experiment(self.experiment, artifact_location=_sqlite_artifact_location(self.uri))
        except MlflowException as exc:  # another process created it in between
            if _error_code(exc) != "RESOURCE_ALREADY_EXISTS":
                raise
            return self.client.get_experiment_by_name(self.experiment).experiment_id

    def end(self, status: str = "FINISHED") -> None:
        """Ends the run with ``status`` (FINISHED, FAILED or KILLED); called by ``__exit__``."""
        self.client.set_terminated(self.run_id, status=status)
        self._ended = True

    def __enter__(self) -> TrainingRun:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> bool:
        if self._run_id is None or self._ended:
            return False
        if exc_type is None or (issubclass(exc_type, SystemExit) and exc.code in (0, None)):
            self.end("FINISHED")
            return False
        status = "KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED"
        try:  # a failure to record the failure must not hide the exception that caused it
            self.set_tags({"tal.error": f"{exc_type.__name__}: {exc}"})
            self.end(status)
        except Exception as record_error:
            log.warning("could not mark MLflow run %s %s: %s", self._run_id, status, record_error)
        return False


# --- the model registry ------------------------------------------------------------------------
@dataclass(frozen=True)
class Registration:
    """What ``register_checkpoint`` did: the new version, whether it took the alias, and why (or why not)."""

    version: int
    promoted: bool
    reason: str
    previous_version: int | None
    previous_score: float | None


def register_checkpoint(
    uri: str,
    run_id: str,
    artifact_path: str,
    score: float,
    validation_key: str,
    model_name: str = DETECTOR_MODEL,
    alias: str = "champion",
    metric_name: str = "val_average_mAP",
) -> Registration:
    """Registers ``runs:/{run_id}/{artifact_path}`` as a new version of ``model_name`` and maybe moves ``alias`` to it.

    The version gets the tags ``score``, ``metric_name`` and ``validation_key``. The alias moves when nobody
    holds it, or when its holder was scored with the same metric on the same validation set
    (``validation_key``) and has a strictly lower score. Scores from different validation sets are not
    comparable, so then the alias stays where it is and ``reason`` says so.
    """
    client = _client(uri)
    score = float(score)
    _require_artifact(client, run_id, artifact_path)
    try:
        client.create_registered_model(model_name, description="Temporal action localization detector checkpoints (torch.save files).")
    except MlflowException as exc:
        if _error_code(exc) != "RESOURCE_ALREADY_EXISTS":
            raise
    holder = client.get_registered_model(model_name).aliases.get(alias)
    version = client.create_model_version(
        model_name,
        source=f"runs:/{run_id}/{artifact_path}",
        run_id=run_id,
        tags={SCORE_TAG: repr(score), METRIC_TAG: metric_name, VALIDATION_TAG: validation_key},
    )
    new = int(version.version)
    if holder is None:
        client.set_registered_model_alias(model_name, alias, str(new))
        return Registration(new, True, f"no {alias} yet: version {new} ({metric_name} {score:.4f}) takes the alias", None, None)

    previous = int(holder)
    held = client.get_model_version(model_name, str(previous)).tags
    previous_score = _float_or_none(held.get(SCORE_TAG))
    keep = _why_not_promote(alias, previous, held, previous_score, score, validation_key, metric_name)
    if keep is not None:
        return Registration(new, False, f"version {new} registered, {alias} stays at version {previous}: {keep}", previous, previous_score)
    client.set_registered_model_alias(model_name, alias, str(new))
    reason = f"{metric_name} {score:.4f} beats {previous_score:.4f} of version {previous} on the same validation set: version {new} is the new {alias}"
    return Registration(new, True, reason, previous, previous_score)


def _why_not_promote(
    alias: str, previous: int, held: Mapping[str, str], previous_score: float | None, score: float, validation_key: str, metric_name: str
) -> str | None:
    """None when the new score may take the alias from version ``previous``; else the reason it may not."""
    if math.isnan(score):
        return "its score is NaN"
    held_key = held.get(VALIDATION_TAG)
    if held_key != validation_key:
        return (
            f"{alias} was validated on another set (version {previous} has validation_key {held_key!r}, this one {validation_key!r}), "
            "so their scores are not comparable; move the alias by hand if the new set should count"
        )
    if held.get(METRIC_TAG) != metric_name:
        return f"{alias} was scored with another metric ({held.get(METRIC_TAG)!r}, this one {metric_name!r})"
    if previous_score is None or math.isnan(previous_score):
        return f"version {previous} has no usable {SCORE_TAG!r} tag ({held.get(SCORE_TAG)!r}) to compare with"
    if score <= previous_score:
        return f"{metric_name} {score:.4f} does not beat {previous_score:.4f}"
    return None


def _float_or_none(text: str | None) -> float | None:
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None


def _require_artifact(client: MlflowClient, run_id: str, artifact_path: str) -> None:
    """Refuses to register a path the run does not hold: such a version could never be loaded."""
    parent = artifact_path.rstrip("/").rpartition("/")[0] or None
    try:
        listed = [f.path for f in client.list_artifacts(run_id, parent)]
    except MlflowException as exc:
        raise ValueError(f"cannot register runs:/{run_id}/{artifact_path}: {exc.message}") from None
    if artifact_path.rstrip("/") not in listed:
        raise ValueError(
            f"cannot register runs:/{run_id}/{artifact_path}: the run holds no such artifact (under {parent or '/'}: {listed})"
        )


# --- from a model reference to a local file ----------------------------------------------------
_ALIAS_URI = re.compile(r"^models:/(?P<name>[^/@]+)@(?P<alias>[^/]+)(?:/(?P<sub>.+))?$")
_VERSION_URI = re.compile(r"^models:/(?P<name>[^/@]+)/(?P<version>[^/]+)(?:/(?P<sub>.+))?$")
_RUNS_URI = re.compile(r"^runs:/(?P<run_id>[^/]+)/(?P<path>.+)$")


def resolve_model(model: str, uri: str | None = None, dst: Path | None = None) -> Path:
    """A checkpoint reference -> the local path of its checkpoint file, downloading it into ``dst`` if needed.

    ``model`` is ``models:/<name>@<alias>``, ``models:/<name>/<version>`` (or ``/latest``), ``runs:/<run_id>/<path>``
    (each optionally followed by a path inside the artifact) or a local file or folder. A folder must hold exactly
    one ``.pt``/``.pth`` file. ``uri`` is the tracking/registry store (default ``tracking_uri()``); ``dst`` defaults
    to a new temporary folder. Unknown names, aliases, versions and runs raise ``ValueError`` naming what exists.
    """
    if model.startswith("file://"):
        model = model[len("file://") :]
    if not model.startswith(("models:/", "runs:/")):
        local = Path(model).expanduser()
        if not local.exists():
            raise ValueError(f"model {model!r} is neither a local file nor a models:/ or runs:/ URI")
        return _checkpoint_file(local, model)

    client = _client(uri or tracking_uri())
    target = Path(dst) if dst is not None else Path(tempfile.mkdtemp(prefix="tal-model-"))
    target.mkdir(parents=True, exist_ok=True)
    if model.startswith("runs:/"):
        match = _RUNS_URI.match(model)
        if match is None:
            raise ValueError(f"{model!r}: expected runs:/<run_id>/<artifact path>")
        local = _download_run_artifact(client, match["run_id"], match["path"], target)
    else:
        source, sub = _model_version_source(client, model)
        local = _download_source(client, source, sub, target, uri or tracking_uri())
    return _checkpoint_file(local, model)


def pin_model(model: str, uri: str | None = None) -> tuple[str, dict[str, Any]]:
    """A model reference -> (a reference that cannot move, what the registry says about it).

    ``models:/name@alias`` becomes ``models:/name/<version the alias holds now>``, so that every replica of a
    server loads the same weights even if the alias moves meanwhile. The dict holds ``name``, ``version``,
    ``alias`` and ``run_id`` (registry references) or nothing (paths, ``runs:/``).
    """
    if not model.startswith("models:/"):
        return model, {}
    match = _ALIAS_URI.match(model) or _VERSION_URI.match(model)
    if match is None:
        raise ValueError(f"{model!r}: expected models:/<name>@<alias> or models:/<name>/<version>")
    client = _client(uri or tracking_uri())
    _model_version_source(client, model)  # unknown names, aliases and versions: ValueError naming what exists
    name = match["name"]
    if "alias" in match.groupdict():
        version = client.get_model_version_by_alias(name, match["alias"])
        alias = match["alias"]
    else:
        number = match["version"]
        if number == "latest":
            number = str(max(int(v.version) for v in client.search_model_versions(f"name='{_quote(name)}'")))
        version = client.get_model_version(name, number)
        alias = None
    pinned = f"models:/{name}/{version.version}" + (f"/{match['sub']}" if match["sub"] else "")
    info = {"name": name, "version": int(version.version), "alias": alias, "run_id": version.run_id, "tags": dict(version.tags or {})}
    return pinned, info


def _model_version_source(client: MlflowClient, model: str) -> tuple[str, str | None]:
    """``models:/...`` -> (the version's source URI, the sub-path asked for inside it)."""
    match = _ALIAS_URI.match(model) or _VERSION_URI.match(model)
    if match is None:
        raise ValueError(f"{model!r}: expected models:/<name>@<alias> or models:/<name>/<version>")
    name = match["name"]
    try:
        registered = client.get_registered_model(name)
    except MlflowException:
        names = sorted(m.name for m in client.search_registered_models(max_results=50))
        raise ValueError(f"{model!r}: no registered model named {name!r} (registered models: {names or 'none'})") from None
    versions = sorted(int(v.version) for v in client.search_model_versions(f"name='{_quote(name)}'"))
    aliases = {a: int(v) for a, v in registered.aliases.items()}  # values are str over REST, int from SQL stores
    exists = f"versions: {versions or 'none'}; aliases: {aliases or 'none'}"
    if "alias" in match.groupdict():
        if match["alias"] not in aliases:
            raise ValueError(f"{model!r}: model {name!r} has no alias {match['alias']!r} ({exists})")
        version = str(aliases[match["alias"]])
    else:
        version = match["version"]
        if version == "latest":
            if not versions:
                raise ValueError(f"{model!r}: model {name!r} has no versions yet")
            version = str(versions[-1])
        if not version.isdigit():
            raise ValueError(f"{model!r}: {version!r} is not a version number (stages are gone in MLflow 3: use models:/{name}@<alias>)")
        if int(version) not in versions:
            raise ValueError(f"{model!r}: model {name!r} has no version {version} ({exists})")
    return client.get_model_version(name, version).source, match["sub"]


def _quote(name: str) -> str:
    return name.replace("'", "\\'")


def _download_source(client: MlflowClient, source: str, sub: str | None, target: Path, uri: str) -> Path:
    match = _RUNS_URI.match(source)
    if match is not None:
        path = f"{match['path'].rstrip('/')}/{sub}" if sub else match["path"]
        return _download_run_artifact(client, match["run_id"], path, target)
    # A version registered from a plain artifact URI (not through register_checkpoint).
    full = f"{source.rstrip('/')}/{sub}" if sub else source
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=full, dst_path=str(target), tracking_uri=uri))


def _download_run_artifact(client: MlflowClient, run_id: str, path: str, target: Path) -> Path:
    try:
        client.get_run(run_id)
    except MlflowException:
        raise ValueError(f"runs:/{run_id}/{path}: no run {run_id!r} in the store") from None
    try:
        return Path(client.download_artifacts(run_id, path, str(target)))
    except (MlflowException, OSError) as exc:
        parent = path.rstrip("/").rpartition("/")[0] or None
        try:
            listed = [f.path for f in client.list_artifacts(run_id, parent)]
        except MlflowException:
            listed = []
        raise ValueError(f"runs:/{run_id}/{path}: the run holds no such artifact (under {parent or '/'}: {listed}; {exc})") from None


def _checkpoint_file(local: Path, model: str) -> Path:
    if local.is_file():
        return local
    found = sorted(p for p in local.rglob("*") if p.is_file() and p.suffix in CHECKPOINT_SUFFIXES)
    if len(found) != 1:
        names = [str(p.relative_to(local)) for p in found]
        raise ValueError(f"{model!r} is a folder holding {len(found)} checkpoint files {names}: name one file inside it")
    return found[0]


# --- provenance --------------------------------------------------------------------------------
def git_commit(path: str | Path | None = None) -> str | None:
    """HEAD commit of the git work tree holding ``path`` (default: this package's source); None outside one."""
    git = shutil.which("git")
    if git is None:
        return None
    where = Path(path) if path is not None else Path(__file__).resolve().parent
    try:
        out = subprocess.run([git, "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and re.fullmatch(r"[0-9a-f]{40,64}", commit) else None
